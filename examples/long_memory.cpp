// long_memory: remembering across long sequences, what the linear-recurrent models were made for,
// with an LSTM, a GRU, minGRU, minLSTM (Feng et al. 2024) and Mamba's selective SSM (Gu & Dao
// 2023) at several lengths T:
//   1. selective copying (Gu & Dao 2023, section 4.1): K data tokens scattered at random among
//      noise in the first T steps, then K markers; at the markers the model must write the data
//      tokens in order. Scored by token accuracy on held-out sequences (chance: 1 / symbols).
//   2. the adding problem (Hochreiter & Schmidhuber 1997) at the same lengths, scored by MSE
//      (always answering 1 scores about 0.167).
// Prints one line per model and length with the training time per step and the score, then
// "test_accuracy_<model>" and "test_mse_<model>" lines for the longest of --lengths. At the longer
// --time-lengths (up to 2048 by default) each model's copying step is timed only, and
// long_memory_time.svg shows milliseconds per training step against T over all of them.
#include <loom/loom.hpp>

#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <sstream>

#include "adding_data.hpp"

using namespace loom;

namespace {

// A recurrent core between an input layer and a head, the same for every model: LSTM and GRU
// (fused, `layers` stacked), minGRU and minLSTM (`layers` stacked), or `layers` residual Mamba blocks.
struct SequenceModel : nn::Module {
    std::shared_ptr<nn::Module> input;  // Embedding (copying) or Dense (adding)
    std::shared_ptr<nn::RecurrentLayer> rnn;
    std::vector<std::shared_ptr<nn::MinRecurrent>> mins;
    std::vector<std::shared_ptr<nn::SelectiveSSM>> ssms;
    std::shared_ptr<nn::Dense> head;

    SequenceModel(const std::string& kind, std::shared_ptr<nn::Module> input_layer, std::int64_t H, std::int64_t layers,
                  std::int64_t outputs, std::int64_t ssm_state)
    {
        input = register_module("input", std::move(input_layer));
        if (kind == "lstm" || kind == "gru") {
            rnn = register_module("rnn", std::make_shared<nn::RecurrentLayer>(nn::cell_kind_from_name(kind),
                                                                               nn::RecurrentOptions(H, H).num_layers(layers)));
        } else if (kind == "mingru" || kind == "minlstm") {
            for (std::int64_t k = 0; k < layers; ++k) {
                std::shared_ptr<nn::MinRecurrent> m;
                if (kind == "mingru") m = std::make_shared<nn::MinGRU>(nn::MinGRUOptions(H, H));
                else m = std::make_shared<nn::MinLSTM>(nn::MinLSTMOptions(H, H));
                mins.push_back(register_module("rnn" + std::to_string(k), m));
            }
        } else {
            for (std::int64_t k = 0; k < layers; ++k)
                ssms.push_back(register_module("ssm" + std::to_string(k),
                                               std::make_shared<nn::SelectiveSSM>(nn::SelectiveSSMOptions(H).d_state(ssm_state))));
        }
        head = register_module("head", std::make_shared<nn::Dense>(H, outputs));
    }
    // x: tokens [T, B] (copying) or features [T, B, 2] (adding) -> [T, B, outputs]
    Tensor forward(const Tensor& x)
    {
        Tensor h = x.dtype() == kInt64 ? std::static_pointer_cast<nn::Embedding>(input)->forward(x)
                                       : std::static_pointer_cast<nn::Dense>(input)->forward(x);
        if (rnn) h = (*rnn)(h).output;
        for (auto& m : mins) h = (*m)(h).output;
        for (auto& s : ssms) h = h + (*s)(h).output;
        return head->forward(h);
    }
};

// Selective copying: inputs [T + K, B] (0 noise, 1 marker, 2.. data) and targets [K, B].
std::pair<Tensor, Tensor> copying_batch(std::int64_t T, std::int64_t K, std::int64_t symbols, std::int64_t B,
                                        Generator& gen)
{
    std::vector<std::int64_t> x(static_cast<std::size_t>((T + K) * B), 0), y(static_cast<std::size_t>(K * B));
    for (std::int64_t b = 0; b < B; ++b) {
        std::vector<std::int64_t> positions;  // K distinct steps in [0, T), in order
        while (std::int64_t(positions.size()) < K) {
            const std::int64_t p = gen.randint(0, T);
            if (std::find(positions.begin(), positions.end(), p) == positions.end()) positions.push_back(p);
        }
        std::sort(positions.begin(), positions.end());
        for (std::int64_t k = 0; k < K; ++k) {
            const std::int64_t token = 2 + gen.randint(0, symbols);
            x[std::size_t(positions[std::size_t(k)] * B + b)] = token;
            x[std::size_t((T + k) * B + b)] = 1;
            y[std::size_t(k * B + b)] = token;
        }
    }
    return {from_vector<std::int64_t>(x, {T + K, B}), from_vector<std::int64_t>(y, {K, B})};
}

// Selective copying's loss: cross-entropy at the K marker steps after the T data steps.
auto copying_loss(std::int64_t T, std::int64_t K, std::int64_t symbols)
{
    return [=](const Tensor& out, const Tensor& y) {
        return nn::cross_entropy(out.narrow(0, T, K).reshape({-1, 2 + symbols}), y.reshape({-1}));
    };
}

struct Score {
    double ms_per_step, value;
};

template <class Batch, class Loss, class Evaluate>
Score train_and_score(SequenceModel& model, std::int64_t steps, double lr, Batch batch, Loss loss, Evaluate evaluate)
{
    optim::Adam adam(model.parameters(), optim::AdamOptions(lr));
    const auto start = std::chrono::steady_clock::now();
    for (std::int64_t step = 0; step < steps; ++step) {
        const auto [x, y] = batch();
        adam.zero_grad();
        const Tensor l = loss(model.forward(x), y);
        l.backward();
        nn::utils::clip_grad_norm(model.parameters(), 1.0);
        adam.step();
    }
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    NoGradGuard no_grad;
    return {ms / double(steps), evaluate()};
}

std::vector<std::string> split_list(const std::string& text)
{
    std::vector<std::string> out;
    std::stringstream in(text);
    for (std::string item; std::getline(in, item, ',');) out.push_back(item);
    return out;
}

}  // namespace

int main(int argc, char** argv)
{
    CLI::App app{"long_memory: selective copying and the adding problem with LSTM, GRU, minGRU, minLSTM and Mamba"};
    std::string lengths_text = "128", time_lengths_text = "256,512,1024,2048", models_text = "lstm,gru,mingru,minlstm,ssm",
                out = ".";
    std::int64_t steps = 800, hidden = 64, layers = 2, tokens = 4, symbols = 8, batch = 32, seed = 1, ssm_state = 8;
    double lr = 3e-3;
    app.add_option("--lengths", lengths_text, "comma-separated sequence lengths T to train and score at");
    app.add_option("--time-lengths", time_lengths_text,
                   "comma-separated longer lengths at which each model's copying step is only timed (3 steps), for the "
                   "chart; \"\" for none");
    app.add_option("--models", models_text, "comma-separated: lstm, gru, mingru, minlstm, ssm");
    app.add_option("--steps", steps, "Adam steps per model, task and length")->check(CLI::PositiveNumber);
    app.add_option("--hidden", hidden, "width of every model")->check(CLI::PositiveNumber);
    app.add_option("--layers", layers, "stacked layers (blocks for ssm)")->check(CLI::Range(1, 8));
    app.add_option("--tokens", tokens, "data tokens to copy, K")->check(CLI::PositiveNumber);
    app.add_option("--symbols", symbols, "distinct data tokens")->check(CLI::Range(2, 1000));
    app.add_option("--batch", batch, "sequences per step")->check(CLI::PositiveNumber);
    app.add_option("--lr", lr, "Adam learning rate")->check(CLI::PositiveNumber);
    app.add_option("--ssm-state", ssm_state, "N, the selective SSM's state per channel (Mamba: 16)")->check(CLI::PositiveNumber);
    app.add_option("--seed", seed, "random seed");
    app.add_option("--out", out, "folder for the SVG")->check(CLI::ExistingDirectory);
    CLI11_PARSE(app, argc, argv);
    std::vector<std::int64_t> lengths, time_lengths;
    for (auto [text, list] : {std::pair{&lengths_text, &lengths}, std::pair{&time_lengths_text, &time_lengths}})
        for (const auto& t : split_list(*text)) {
            list->push_back(std::stoll(t));
            if (list->back() < 2 * tokens) {
                std::fprintf(stderr, "long_memory: length %s is shorter than twice --tokens (%lld)\n", t.c_str(), (long long)tokens);
                return 2;
            }
        }
    if (lengths.empty()) {
        std::fprintf(stderr, "long_memory: --lengths names no length\n");
        return 2;
    }
    const auto models = split_list(models_text);
    for (const auto& m : models)
        if (m != "lstm" && m != "gru" && m != "mingru" && m != "minlstm" && m != "ssm") {
            std::fprintf(stderr, "long_memory: unknown model \"%s\" (expected lstm, gru, mingru, minlstm or ssm)\n", m.c_str());
            return 2;
        }

    std::printf("%-8s %6s %12s %14s %12s %12s\n", "model", "T", "copy ms/step", "copy accuracy", "add ms/step", "add mse");
    std::vector<train::Series> times;
    std::vector<std::string> final_lines;
    for (const auto& kind : models) {
        train::Series copy_time{kind + " copying", {}, {}};
        for (std::int64_t T : lengths) {
            manual_seed(std::uint64_t(seed));
            Generator gen(std::uint64_t(seed) + 1), test_gen(std::uint64_t(seed) + 2);
            SequenceModel copier(kind, std::make_shared<nn::Embedding>(2 + symbols, hidden), hidden, layers, 2 + symbols, ssm_state);
            const auto [test_x, test_y] = copying_batch(T, tokens, symbols, 256, test_gen);
            const Score copy = train_and_score(
                copier, steps, lr, [&] { return copying_batch(T, tokens, symbols, batch, gen); },
                copying_loss(T, tokens, symbols),
                [&] {
                    const Tensor predicted = argmax(copier.forward(test_x).narrow(0, T, tokens), 2);
                    return predicted.eq(test_y).to(kFloat64).mean().item<double>();
                });
            SequenceModel adder(kind, std::make_shared<nn::Dense>(2, hidden), hidden, layers, 1, ssm_state);
            const auto [add_x, add_y] = adding_batch(T, 256, test_gen);
            const Score add = train_and_score(
                adder, steps, lr, [&] { return adding_batch(T, batch, gen); },
                [&](const Tensor& out, const Tensor& y) { return nn::mse_loss(out.select(0, T - 1), y); },
                [&] { return nn::mse_loss(adder.forward(add_x).select(0, T - 1), add_y).item<double>(); });
            std::printf("%-8s %6lld %12.1f %14.3f %12.1f %12.4f\n", kind.c_str(), (long long)T, copy.ms_per_step, copy.value,
                        add.ms_per_step, add.value);
            std::fflush(stdout);
            copy_time.x.push_back(double(T));
            copy_time.y.push_back(copy.ms_per_step);
            if (T == lengths.back()) {
                final_lines.push_back(fmt::format("test_accuracy_{} {:.4f}", kind, copy.value));
                final_lines.push_back(fmt::format("test_mse_{} {:.5f}", kind, add.value));
            }
        }
        // Longer sequences, timed only: a fresh copier's training steps, after one untimed step
        // that allocates what the rest reuse.
        for (std::int64_t T : time_lengths) {
            manual_seed(std::uint64_t(seed));
            Generator gen(std::uint64_t(seed) + 1);
            SequenceModel copier(kind, std::make_shared<nn::Embedding>(2 + symbols, hidden), hidden, layers, 2 + symbols, ssm_state);
            const auto batch_at_T = [&] { return copying_batch(T, tokens, symbols, batch, gen); };
            const auto loss = copying_loss(T, tokens, symbols);
            train_and_score(copier, 1, lr, batch_at_T, loss, [] { return 0.0; });
            const Score timed = train_and_score(copier, 3, lr, batch_at_T, loss, [] { return 0.0; });
            std::printf("%-8s %6lld %12.1f %14s %12s %12s\n", kind.c_str(), (long long)T, timed.ms_per_step, "(timed)", "", "");
            std::fflush(stdout);
            copy_time.x.push_back(double(T));
            copy_time.y.push_back(timed.ms_per_step);
        }
        times.push_back(copy_time);
    }
    std::printf("\nat T = %lld (copying: chance %.3f; adding: always answering 1 scores about 0.167):\n",
                (long long)lengths.back(), 1.0 / double(symbols));
    for (const auto& line : final_lines) std::printf("%s\n", line.c_str());
    train::plot_svg(out + "/long_memory_time.svg", "training step time against sequence length (selective copying)",
                    "sequence length T", "ms per training step", times);
    std::printf("chart: %s/long_memory_time.svg\n", out.c_str());
    return 0;
}
