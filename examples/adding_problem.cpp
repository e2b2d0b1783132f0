// adding_problem: the long-term-dependency benchmark of Hochreiter & Schmidhuber (1997).
// Each step carries a value in [0, 1) and a marker; exactly two steps are marked, one in each
// half of the sequence, and the target is the sum of their values. Always answering 1 scores an
// MSE of about 0.167; a model must carry a value across up to T steps to do better. Compares a
// tanh RNN, an LSTM, a GRU and a custom minimal gated unit (see custom_cell.cpp) at each length:
// test MSE, and the training steps needed to get below 0.01 (checked every 50 steps).
#include <loom/loom.hpp>

#include <CLI/CLI.hpp>

#include <cstdio>
#include <sstream>

#include "adding_data.hpp"
#include "minimal_gated_unit.hpp"

using namespace loom;

namespace {

struct Model : nn::Module {
    std::function<Tensor(const Tensor&)> run;  // [T, B, 2] -> last hidden state [B, H]
    std::shared_ptr<nn::Dense> head;
};

std::unique_ptr<Model> make_model(const std::string& kind, std::int64_t H)
{
    auto m = std::make_unique<Model>();
    if (kind == "mgu") {
        auto rnn = std::make_shared<nn::Recurrent<MinimalGatedUnit>>(nn::RecurrentOptions(2, H));
        m->run = [rnn](const Tensor& x) { return rnn->forward(x).h_n().select(0, 0); };
        m->register_child("rnn", rnn);
    } else {
        const auto cell = nn::cell_kind_from_name(kind);
        auto rnn = std::make_shared<nn::RecurrentLayer>(cell, nn::RecurrentOptions(2, H));
        if (kind == "lstm") nn::lstm_forget_bias_(*rnn);
        m->run = [rnn](const Tensor& x) { return rnn->forward(x).h_n().select(0, 0); };
        m->register_child("rnn", rnn);
    }
    m->head = std::make_shared<nn::Dense>(H, 1);
    m->register_child("head", m->head);
    return m;
}

}  // namespace

int main(int argc, char** argv)
{
    CLI::App app{"adding_problem: which recurrent cells learn a long dependency"};
    std::vector<std::int64_t> lengths = {50};
    std::vector<std::string> models = {"rnn", "lstm", "gru", "mgu"};
    std::int64_t steps = 600, batch = 64, hidden = 32, seed = 0;
    double lr = 5e-3;
    app.add_option("--lengths", lengths, "sequence lengths, e.g. --lengths 50 100 200")->check(CLI::Range(4, 100000));
    app.add_option("--models", models, "any of rnn lstm gru mgu")->check(CLI::IsMember({"rnn", "lstm", "gru", "mgu"}));
    app.add_option("--steps", steps, "training steps per model and length")->check(CLI::Range(1, 10000000));
    app.add_option("--batch", batch, "sequences per step")->check(CLI::Range(1, 100000));
    app.add_option("--hidden", hidden, "hidden size")->check(CLI::Range(1, 4096));
    app.add_option("--lr", lr, "Adam learning rate")->check(CLI::PositiveNumber);
    app.add_option("--seed", seed, "random seed");
    CLI11_PARSE(app, argc, argv);

    std::printf("%-6s %6s %10s %14s  %s\n", "model", "T", "test MSE", "steps < 0.01", "(always answering 1: MSE 0.167)");
    for (const std::int64_t T : lengths) {
        Generator test_gen(static_cast<std::uint64_t>(seed) + 1000 + std::uint64_t(T));
        const auto [x_test, y_test] = adding_batch(T, 1000, test_gen);
        for (const std::string& kind : models) {
            manual_seed(static_cast<std::uint64_t>(seed));
            Generator gen(static_cast<std::uint64_t>(seed) + std::uint64_t(T));
            auto model = make_model(kind, hidden);
            optim::Adam opt(model->parameters(), optim::AdamOptions(lr));
            const auto test_mse = [&] {
                NoGradGuard no_grad;
                return nn::mse_loss(model->head->forward(model->run(x_test)), y_test).item<double>();
            };
            std::int64_t solved_at = -1;
            for (std::int64_t step = 1; step <= steps; ++step) {
                const auto [x, y] = adding_batch(T, batch, gen);
                opt.zero_grad();
                nn::mse_loss(model->head->forward(model->run(x)), y).backward();
                nn::utils::clip_grad_norm(model->parameters(), 1.0);
                opt.step();
                if (solved_at < 0 && step % 50 == 0 && test_mse() < 0.01) solved_at = step;
            }
            const double mse = test_mse();
            std::printf("%-6s %6lld %10.4f %14s  %s\n", kind.c_str(), (long long)T, mse,
                        solved_at > 0 ? std::to_string(solved_at).c_str() : "-",
                        mse < 0.01 ? "learned it" : mse < 0.1 ? "partly" : "no better than guessing");
            std::fflush(stdout);
        }
    }
    return 0;
}
