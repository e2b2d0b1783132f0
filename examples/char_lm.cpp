// char_lm: a character-level language model of Moby-Dick. Embedding -> LSTM (or GRU, minGRU, minLSTM, Mamba) ->
// Dense, trained by truncated backpropagation through time with the state carried across
// batches, gradient clipping, Adam and a cosine learning-rate schedule. Chapters 131-135 are
// held out: validation bits per character are measured on them after every epoch, when a
// checkpoint is also written (--resume continues from it). Ends by sampling text.
//
// Expected (defaults, 2 cores, under two minutes): the loss falls from ln(82) = 4.4 and the
// program ends with a line "val_bpc <number>" (2.17 here after 1600 steps; uniform guessing is
// log2(82) = 6.36).
#include <loom/loom.hpp>

#include <CLI/CLI.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>

#include "processes.hpp"

using namespace loom;

namespace {

std::vector<char32_t> decode_utf8(const std::string& s)
{
    std::vector<char32_t> out;
    for (std::size_t i = 0; i < s.size();) {
        const auto c = static_cast<unsigned char>(s[i]);
        const int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        if (n == 0 || i + n > s.size()) {  // not UTF-8: keep the byte as its own symbol
            out.push_back(c);
            ++i;
            continue;
        }
        char32_t cp = n == 1 ? c : c & (0x7f >> n);
        for (int k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3f);
        out.push_back(cp);
        i += n;
    }
    return out;
}

std::string encode_utf8(char32_t c)
{
    std::string s;
    if (c < 0x80) s += char(c);
    else if (c < 0x800) s += char(0xc0 | (c >> 6)), s += char(0x80 | (c & 0x3f));
    else if (c < 0x10000) s += char(0xe0 | (c >> 12)), s += char(0x80 | ((c >> 6) & 0x3f)), s += char(0x80 | (c & 0x3f));
    else
        s += char(0xf0 | (c >> 18)), s += char(0x80 | ((c >> 12) & 0x3f)), s += char(0x80 | ((c >> 6) & 0x3f)),
            s += char(0x80 | (c & 0x3f));
    return s;
}

struct CharModel : nn::Module {
    std::shared_ptr<nn::Embedding> embed;
    std::shared_ptr<nn::RecurrentLayer> rnn;                 // --cell lstm or gru: one stacked layer
    std::vector<std::shared_ptr<nn::MinRecurrent>> min_rnns;  // --cell mingru or minlstm: one per layer
    std::shared_ptr<nn::Dense> ssm_in;                        // --cell ssm: embedding -> H,
    std::vector<std::shared_ptr<nn::SelectiveSSM>> ssms;      // then residual Mamba blocks of width H
    std::shared_ptr<nn::Dense> head;
    // tie: the output layer shares the embedding's table (E must equal H).
    CharModel(std::int64_t V, std::int64_t E, std::int64_t H, std::int64_t layers, const std::string& cell, bool tie)
    {
        embed = register_module("embed", std::make_shared<nn::Embedding>(V, E));
        if (cell == "ssm") {
            ssm_in = register_module("ssm_in", std::make_shared<nn::Dense>(E, H));
            for (std::int64_t k = 0; k < layers; ++k)
                ssms.push_back(register_module("ssm" + std::to_string(k),
                                               std::make_shared<nn::SelectiveSSM>(nn::SelectiveSSMOptions(H))));
        } else if (cell == "mingru" || cell == "minlstm") {
            for (std::int64_t k = 0; k < layers; ++k) {
                const auto options = nn::MinRecurrentOptions(k == 0 ? E : H, H);
                std::shared_ptr<nn::MinRecurrent> layer;
                if (cell == "mingru") layer = std::make_shared<nn::MinGRU>(options);
                else layer = std::make_shared<nn::MinLSTM>(options);
                min_rnns.push_back(register_module("rnn" + std::to_string(k), layer));
            }
        } else {
            rnn = register_module("rnn", std::make_shared<nn::RecurrentLayer>(
                                             nn::cell_kind_from_name(cell),
                                             nn::RecurrentOptions(E, H).num_layers(layers).dropout(layers > 1 ? 0.1 : 0)));
        }
        head = register_module("head", tie ? std::make_shared<nn::Dense>(embed->weight) : std::make_shared<nn::Dense>(H, V));
    }
    // tokens [T, B] -> logits [T, B, V], and the state to carry on.
    std::pair<Tensor, nn::State> forward(const Tensor& tokens, const nn::State& state)
    {
        if (rnn) {
            auto out = rnn->forward(embed->forward(tokens), state);
            return {head->forward(out.output), out.state};
        }
        Tensor h = embed->forward(tokens);
        nn::State next;
        if (ssm_in) {  // the state: each block's convolution window and ssm state, in turn
            h = ssm_in->forward(h);
            for (std::size_t k = 0; k < ssms.size(); ++k) {
                auto out = (*ssms[k])(h, state.empty() ? nn::SelectiveSSMState{} : nn::SelectiveSSMState{state[2 * k], state[2 * k + 1]});
                h = h + out.output;
                next.push_back(out.state.conv);
                next.push_back(out.state.ssm);
            }
            return {head->forward(h), next};
        }
        for (std::size_t k = 0; k < min_rnns.size(); ++k) {
            auto out = (*min_rnns[k])(h, state.empty() ? Tensor() : state[k]);
            h = out.output;
            next.push_back(out.h_n());
        }
        return {head->forward(h), next};
    }
};

nn::State detached(const nn::State& s)
{
    nn::State out;
    for (const auto& t : s) out.push_back(t.detach());
    return out;
}

// B parallel streams over `ids`: stream b reads ids[b * L, (b + 1) * L).
Tensor streams(const std::vector<std::int64_t>& ids, std::int64_t B)
{
    const auto L = static_cast<std::int64_t>(ids.size()) / B;
    return from_vector<std::int64_t>(std::vector<std::int64_t>(ids.begin(), ids.begin() + L * B), {B, L}).t().contiguous();
}

int train_and_sample(int argc, char** argv, Processes& processes)
{
    CLI::App app{"char_lm: a character-level LSTM/GRU language model"};
    std::string text_path = std::string(LOOM_EXAMPLE_DATA) + "/moby_dick.txt", cell = "lstm", out_dir = "char_lm_out";
    // The defaults learn the most in two minutes on 2 cores: one wide layer learns more per second
    // than two narrow ones, and its per-step GEMMs are large enough for a second thread to pay.
    std::int64_t layers = 1, hidden = 256, embed = 32, seq_len = 64, batch = 32, steps = 1600, epochs = 3, seed = 1;
    double lr = 5e-3, clip = 1.0, temperature = 0.8;
    int threads = 2;  // OpenBLAS threads spin-wait badly when the cores are busy: --threads 1 then
    bool resume = false;
    app.add_option("--text", text_path, "UTF-8 text to learn; its last 5% (Moby-Dick: chapters 131-135) is held out");
    app.add_option("--cell", cell,
                   "lstm, gru, or the linear-recurrent mingru or minlstm (Feng et al. 2024) or ssm (Mamba's block, "
                   "residual, of width --hidden)")
        ->check(CLI::IsMember({"lstm", "gru", "mingru", "minlstm", "ssm"}));
    app.add_option("--layers", layers, "stacked recurrent layers")->check(CLI::Range(1, 8));
    app.add_option("--hidden", hidden, "hidden size")->check(CLI::Range(1, 4096));
    app.add_option("--embed", embed, "embedding size")->check(CLI::Range(1, 4096));
    app.add_option("--seq-len", seq_len, "steps of backpropagation through time")->check(CLI::Range(1, 10000));
    app.add_option("--batch", batch, "parallel streams")->check(CLI::Range(1, 4096));
    app.add_option("--steps", steps, "training steps in all")->check(CLI::Range(1, 10000000));
    app.add_option("--epochs", epochs, "validation and checkpoint after each of these parts of the steps")->check(CLI::Range(1, 1000));
    app.add_option("--lr", lr, "peak learning rate (Adam, cosine schedule)")->check(CLI::PositiveNumber);
    app.add_option("--clip", clip, "gradient norm clip")->check(CLI::PositiveNumber);
    app.add_option("--temperature", temperature, "sampling temperature")->check(CLI::PositiveNumber);
    app.add_option("--seed", seed, "random seed");
    auto* threads_option = app.add_option("--threads", threads, "OpenBLAS threads (under mpirun: 1 per process unless given)")
                               ->check(CLI::Range(1, 256));
    app.add_option("--out", out_dir, "folder for the checkpoint, metrics log and loss chart");
    app.add_flag("--resume", resume, "continue from the checkpoint in --out");
    bool no_overlap = false;
    app.add_flag("--no-overlap", no_overlap,
                 "under mpirun: average the gradients after backward, not bucket by bucket during it");
    bool tie_weights = false;
    app.add_flag("--tie-weights", tie_weights,
                 "the output layer shares the embedding's table (Press & Wolf 2017); the embedding is then as wide "
                 "as the hidden state, whatever --embed says");
    std::string tensorboard_dir;
    app.add_option("--tensorboard", tensorboard_dir,
                   "also log to TensorBoard event files in this folder: each step's loss and learning rate, each "
                   "epoch's bits per character, and every 100 steps each parameter's weight and gradient histograms");
    CLI11_PARSE(app, argc, argv);

    // Under mpirun the processes share the cores: one BLAS thread each unless told otherwise.
    if (processes.world_size > 1 && threads_option->count() == 0) threads = 1;
    set_num_threads(threads);
    const bool main_process = processes.is_main();
    manual_seed(static_cast<std::uint64_t>(seed));
    std::ifstream in(text_path, std::ios::binary);
    if (!in) {
        std::fprintf(stderr, "char_lm: cannot open %s\n", text_path.c_str());
        return 1;
    }
    const std::vector<char32_t> chars = decode_utf8({std::istreambuf_iterator<char>(in), {}});
    std::map<char32_t, std::int64_t> index;
    for (char32_t c : chars) index.emplace(c, 0);
    std::vector<char32_t> vocab;
    for (auto& [c, i] : index) i = static_cast<std::int64_t>(vocab.size()), vocab.push_back(c);
    const auto V = static_cast<std::int64_t>(vocab.size());
    std::vector<std::int64_t> ids;
    for (char32_t c : chars) ids.push_back(index[c]);
    // Hold out the last chapters: from "CHAPTER 131." when present, else the last 5%.
    const std::string marker = "CHAPTER 131.";
    std::size_t split = ids.size() * 95 / 100;
    const std::vector<char32_t> pattern = decode_utf8(marker);
    const auto found = std::search(chars.begin(), chars.end(), pattern.begin(), pattern.end());
    if (found != chars.end()) split = static_cast<std::size_t>(found - chars.begin());
    const std::vector<std::int64_t> train_ids(ids.begin(), ids.begin() + split), val_ids(ids.begin() + split, ids.end());
    if (static_cast<std::int64_t>(train_ids.size()) < batch * (seq_len + 1) ||
        static_cast<std::int64_t>(val_ids.size()) < batch * (seq_len + 1)) {
        std::fprintf(stderr, "char_lm: the text is too short for --batch %lld --seq-len %lld\n", (long long)batch,
                     (long long)seq_len);
        return 1;
    }
    if (main_process)
        std::printf("text %s: %zu characters, %lld distinct; training on %zu, validating on %zu\n", text_path.c_str(),
                    chars.size(), (long long)V, train_ids.size(), val_ids.size());

    if (tie_weights) embed = hidden;
    CharModel model(V, embed, hidden, layers, cell, tie_weights);
    if (main_process) std::printf("%s", model.summary().c_str());
    optim::Adam opt(model.parameters(), optim::AdamOptions(lr));
    optim::CosineAnnealingLR schedule(opt, steps, lr / 20);
    if (main_process) std::filesystem::create_directories(out_dir);
    const std::string checkpoint = out_dir + "/checkpoint.safetensors", log_path = out_dir + "/metrics.jsonl";
    std::int64_t start = 0;
    if (resume) {
        const auto info = optim::load_checkpoint(checkpoint, model, opt, &schedule);
        start = info.step;
        if (main_process) std::printf("resumed from %s at step %lld\n", checkpoint.c_str(), (long long)start);
    }
    processes.share_weights(model);  // under mpirun: rank 0's weights to all, and averaged gradients from here
    std::optional<train::MetricsLog> log;  // rank 0 alone writes files
    if (main_process) log.emplace(log_path, resume);
    std::unique_ptr<train::SummaryWriter> board;  // --tensorboard, rank 0 alone
    if (main_process && !tensorboard_dir.empty()) {
        board = std::make_unique<train::SummaryWriter>(tensorboard_dir);
        std::string summary = "    " + model.summary();  // indented: Markdown keeps its columns
        for (std::size_t at = summary.find('\n'); at != std::string::npos && at + 1 < summary.size(); at = summary.find('\n', at + 1))
            summary.insert(at + 1, "    ");
        board->add_text("model", summary, start);
    }
    if (processes.world_size > 1 && main_process)
        std::printf("%d processes, each with %lld streams of its own and %d BLAS thread%s\n", processes.world_size,
                    (long long)batch, threads, threads > 1 ? "s" : "");

    // Each process reads its own `batch` of the world_size * batch streams over the text.
    const Tensor train_streams = streams(train_ids, batch * processes.world_size)
                                     .narrow(1, processes.rank * batch, batch)
                                     .contiguous(),
                 val_streams = streams(val_ids, batch);
    const std::int64_t per_stream = train_streams.size(0);
    const std::int64_t steps_per_epoch = (steps + epochs - 1) / epochs;
    const auto evaluate = [&] {  // mean bits per character over the held-out streams
        NoGradGuard no_grad;
        model.eval();
        nn::State state;
        double nats = 0;
        std::int64_t count = 0;
        for (std::int64_t at = 0; at + seq_len + 1 <= val_streams.size(0); at += seq_len) {
            const Tensor x = val_streams.narrow(0, at, seq_len), y = val_streams.narrow(0, at + 1, seq_len);
            auto [logits, next] = model.forward(x, state);
            state = next;
            nn::CrossEntropyOptions sum;
            sum.reduction = nn::Reduction::Sum;
            nats += nn::cross_entropy(logits.reshape({-1, V}), y.reshape({-1}), sum).item<double>();
            count += y.numel();
        }
        model.train();
        return nats / double(count) / std::log(2.0);
    };

    nn::State state;
    double val_bpc = NAN;
    const auto training_start = std::chrono::steady_clock::now();
    for (std::int64_t epoch_start = start - start % steps_per_epoch; epoch_start < steps; epoch_start += steps_per_epoch) {
        const std::int64_t epoch = epoch_start / steps_per_epoch + 1, epoch_end = std::min(steps, epoch_start + steps_per_epoch);
        train::Progress progress(fmt::format("epoch {}/{}", epoch, epochs), epoch_end - epoch_start);
        double loss_sum = 0;
        std::int64_t loss_count = 0;
        for (std::int64_t step = std::max(start, epoch_start); step < epoch_end; ++step) {
            std::int64_t at = (step * seq_len) % (per_stream - seq_len - 1);
            if (at < seq_len) state.clear();  // the streams wrapped around: start afresh
            const Tensor x = train_streams.narrow(0, at, seq_len), y = train_streams.narrow(0, at + 1, seq_len);
            auto [logits, next] = model.forward(x, state);
            state = detached(next);  // truncated BPTT: carry the state, not its history
            const Tensor loss = nn::cross_entropy(logits.reshape({-1, V}), y.reshape({-1}));
            opt.zero_grad();
            if (!no_overlap) processes.before_backward();
            loss.backward();
            processes.average_gradients();
            if (board && (step + 1) % 100 == 0)
                for (const auto& [name, p] : model.named_parameters()) {
                    board->add_histogram("weights/" + name, p, step + 1);
                    board->add_histogram("gradients/" + name, p.grad(), step + 1);
                }
            nn::utils::clip_grad_norm(model.parameters(), clip);
            opt.step();
            schedule.step();
            if (board) {
                board->add_scalar("batch/loss", loss.item<double>(), step + 1);
                board->add_scalar("batch/lr", opt.lr(), step + 1);
            }
            loss_sum += loss.item<double>();
            ++loss_count;
            if (main_process) progress.update(step + 1 - epoch_start, {{"loss", loss.item<double>()}});
        }
        val_bpc = evaluate();  // every process: the same weights, the same number
        const double train_loss = processes.sum(loss_sum) / processes.sum(double(std::max<std::int64_t>(loss_count, 1)));
        if (!main_process) continue;
        progress.finish({{"loss", train_loss}, {"val_bpc", val_bpc}, {"lr", opt.lr()}});
        log->write({{"epoch", double(epoch)}, {"step", double(epoch_end)}, {"train_loss", train_loss},
                    {"train_bpc", train_loss / std::log(2.0)}, {"val_bpc", val_bpc}, {"lr", opt.lr()}});
        optim::save_checkpoint(checkpoint, model, opt, &schedule, {.epoch = epoch, .step = epoch_end});
        if (board) {
            board->add_scalar("epoch/train_bpc", train_loss / std::log(2.0), epoch);
            board->add_scalar("epoch/val_bpc", val_bpc, epoch);
            board->flush();
        }
    }
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - training_start).count();
    const double sequences = double(std::max<std::int64_t>(steps - start, 0) * batch);  // trained on by this process
    const double all_per_second = processes.sum(sequences / seconds);
    const double averaging_share = processes.sum(processes.averaging_seconds / seconds) / processes.world_size;
    if (!main_process) return 0;
    std::printf("%.1f sequences of %lld characters per second per process, %.1f in all (%d process%s)\n",
                all_per_second / processes.world_size, (long long)seq_len, all_per_second, processes.world_size,
                processes.world_size > 1 ? "es" : "");
    if (processes.world_size > 1)
        std::printf("waiting for the averaged gradients after backward took %.1f%% of the training time (%s)\n",
                    100 * averaging_share,
                    no_overlap ? "all of the averaging: --no-overlap" : "buckets started during backward");

    // Loss chart from the log, and a sample from the model.
    std::vector<double> e, train_bpc, val;
    for (const auto& row : train::read_metrics(log_path))
        e.push_back(row.at("epoch")), train_bpc.push_back(row.at("train_bpc")), val.push_back(row.at("val_bpc"));
    if (!e.empty())
        train::plot_svg(out_dir + "/loss.svg", "char_lm: bits per character", "epoch", "bits per character",
                        {{"train", e, train_bpc}, {"validation", e, val}});

    NoGradGuard no_grad;
    model.eval();
    Generator gen(static_cast<std::uint64_t>(seed));
    std::string sample = "Call me";
    std::vector<std::int64_t> prompt;
    for (char32_t c : decode_utf8(sample)) prompt.push_back(index.count(c) ? index[c] : 0);
    nn::State s;
    Tensor logits;
    for (std::int64_t id : prompt) std::tie(logits, s) = model.forward(from_vector<std::int64_t>({id}, {1, 1}), s);
    for (int i = 0; i < 300; ++i) {
        const Tensor p = (logits.reshape({V}) / temperature).softmax(0);
        double u = gen.uniform01(), acc = 0;
        std::int64_t next = V - 1;
        for (std::int64_t k = 0; k < V; ++k)
            if ((acc += p.select(0, k).item<double>()) > u) {
                next = k;
                break;
            }
        sample += encode_utf8(vocab[next]);
        std::tie(logits, s) = model.forward(from_vector<std::int64_t>({next}, {1, 1}), s);
    }
    std::printf("sample (temperature %.2f):\n%s\n\n", temperature, sample.c_str());
    std::printf("metrics: %s, chart: %s/loss.svg, checkpoint: %s\n", log_path.c_str(), out_dir.c_str(), checkpoint.c_str());
    std::printf("val_bpc %.4f\n", val_bpc);
    return 0;
}

}  // namespace

int main(int argc, char** argv)
{
    Processes processes(&argc, &argv);
    return processes.run([&] { return train_and_sample(argc, argv, processes); });
}
