// loom's side of the benchmark race: the workloads of bench/torch_reference.py, same sizes, same
// loss, same Adam update, same output line. Run each workload in its own process.
// Usage: workloads WORKLOAD [--threads N] [--infer] [--steps N] [--composed] [--checkpoint] [--cells] [--eager] [--profile]
// (--cells: W3 and W5 with Recurrent<LSTMCell>, the layer run step by step as a cell of one's own;
// --eager: W1-cell and W4-cell with the cell run step by step instead of replayed;
// --profile: after the timed steps, one more under autograd::Profiler, its table on stderr)
// WORKLOAD: W1-rnn W1-gru W1-lstm W1-cell W2-lstm W2-gru W3 W4 W4-cell W5 W6 W8-mingru W8-mingru-plain W8-minlstm W8-gru (W1-cell,
// W4-cell: a user's LSTM cell through Recurrent<Cell> at W1-lstm's and W4's sizes), or W3-sgemm, W2-lstm-sgemm: the
// GEMMs alone of that workload, same shapes, called straight on OpenBLAS (its limit).
#include <loom/loom.hpp>

#include <cblas.h>

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>

using namespace loom;

namespace {

struct Workload {
    std::vector<Tensor> params;
    std::function<Tensor()> loss;
    double flops;  // forward matmuls of the recurrent part
    std::vector<std::shared_ptr<nn::Module>> keep;
};

double lstm_flops(double T, double B, double I, double H, double gates) { return 2 * T * B * (I + H) * gates * H; }

void append(std::vector<Tensor>& to, const nn::Module& m)
{
    for (auto& p : m.parameters()) to.push_back(p);
}

// An LSTM cell written from primitive ops and run in a loop: what a researcher writes.
struct HandLSTM : nn::Module {
    std::shared_ptr<nn::Dense> ih, hh;
    std::int64_t H;
    HandLSTM(std::int64_t I, std::int64_t H_) : H(H_)
    {
        ih = register_module("ih", std::make_shared<nn::Dense>(I, 4 * H));
        hh = register_module("hh", std::make_shared<nn::Dense>(H, 4 * H));
    }
    Tensor forward(const Tensor& x)
    {
        const std::int64_t T = x.size(0), B = x.size(1);
        Tensor h = zeros({B, H}), c = zeros({B, H});
        std::vector<Tensor> outs;
        for (std::int64_t t = 0; t < T; ++t) {
            const auto g = ((*ih)(x.select(0, t)) + (*hh)(h)).chunk(4, 1);
            c = sigmoid(g[1]) * c + sigmoid(g[0]) * tanh(g[2]);
            h = sigmoid(g[3]) * tanh(c);
            outs.push_back(h);
        }
        return stack(outs, 0);
    }
};

// The same LSTM cell as a Cell, for Recurrent<Cell>: what a researcher's own cell looks like.
// Recurrent<Cell> traces and replays it (scan) unless `replay` is off (--eager).
struct UserLSTMCell : nn::Cell {
    std::shared_ptr<nn::Dense> ih, hh;
    bool replay = true;
    UserLSTMCell(std::int64_t I, std::int64_t H) : nn::Cell(I, H, 2)
    {
        ih = register_module("ih", std::make_shared<nn::Dense>(I, 4 * H));
        hh = register_module("hh", std::make_shared<nn::Dense>(H, 4 * H));
    }
    nn::State forward(const Tensor& x, const nn::State& s) override
    {
        const auto g = ((*ih)(x) + (*hh)(s[0])).chunk(4, 1);
        const Tensor c = sigmoid(g[1]) * s[1] + sigmoid(g[0]) * tanh(g[2]);
        return {sigmoid(g[3]) * tanh(c), c};
    }
    bool replayable() const override { return replay; }
};

Workload build(const std::string& name, bool fused, bool checkpoint, bool cells, bool eager)
{
    Workload w;
    const auto layer = [&](nn::CellKind kind, nn::RecurrentOptions o) {
        auto m = std::make_shared<nn::RecurrentLayer>(kind, o.fused(fused).checkpoint(checkpoint));
        w.keep.push_back(m);
        append(w.params, *m);
        return m;
    };
    // A user's own LSTM cell through Recurrent<Cell>, with layer() it would build the fused LSTM.
    const auto user_cell = [&](std::int64_t I, std::int64_t H) {
        auto m = std::make_shared<nn::Recurrent<UserLSTMCell>>(nn::RecurrentOptions(I, H).checkpoint(checkpoint));
        m->cell(0).replay = !eager;
        w.keep.push_back(m);
        append(w.params, *m);
        return m;
    };
    if (name == "W1-cell") {  // W1-lstm's sizes
        const std::int64_t T = 100, B = 1, I = 8, H = 32;
        auto rnn = user_cell(I, H);
        auto head = std::make_shared<nn::Dense>(H, 1);
        append(w.params, *head);
        w.keep.push_back(head);
        const Tensor x = randn({T, B, I}), y = randn({B, 1});
        w.loss = [=] { return nn::mse_loss((*head)((*rnn)(x).output.select(0, T - 1)), y); };
        w.flops = lstm_flops(T, B, I, H, 4);
    } else if (name.rfind("W1", 0) == 0) {
        const auto kind = nn::cell_kind_from_name(name.substr(3));
        const double gates = name == "W1-rnn" ? 1 : name == "W1-gru" ? 3 : 4;
        const std::int64_t T = 100, B = 1, I = 8, H = 32;
        auto rnn = layer(kind, nn::RecurrentOptions(I, H));
        auto head = std::make_shared<nn::Dense>(H, 1);
        append(w.params, *head);
        w.keep.push_back(head);
        const Tensor x = randn({T, B, I}), y = randn({B, 1});
        w.loss = [=] { return nn::mse_loss((*head)((*rnn)(x).output.select(0, T - 1)), y); };
        w.flops = lstm_flops(T, B, I, H, gates);
    } else if (name == "W2-lstm" || name == "W2-gru" || name == "W4" || name == "W4-cell") {
        const std::int64_t V = 96, E = 64, H = 256, B = 32, T = 64;
        auto emb = std::make_shared<nn::Embedding>(V, E);
        auto head = std::make_shared<nn::Dense>(H, V);
        append(w.params, *emb);
        w.keep.push_back(emb);
        std::function<Tensor(const Tensor&)> rnn;
        if (name == "W4-cell") {
            auto r = user_cell(E, H);
            rnn = [r](const Tensor& x) { return (*r)(x).output; };
        } else if (name == "W4") {
            auto hand = std::make_shared<HandLSTM>(E, H);
            append(w.params, *hand);
            w.keep.push_back(hand);
            rnn = [hand](const Tensor& x) { return hand->forward(x); };
        } else {
            auto r = layer(name == "W2-gru" ? nn::CellKind::GRU : nn::CellKind::LSTM, nn::RecurrentOptions(E, H));
            rnn = [r](const Tensor& x) { return (*r)(x).output; };
        }
        append(w.params, *head);
        w.keep.push_back(head);
        const Tensor tok = randint(0, V, {T, B}), tgt = randint(0, V, {T, B});
        w.loss = [=] { return nn::cross_entropy((*head)(rnn((*emb)(tok))).reshape({-1, V}), tgt.reshape({-1})); };
        w.flops = lstm_flops(T, B, E, H, name == "W2-gru" ? 3 : 4);
    } else if (name == "W3" || name == "W5") {
        const bool w3 = name == "W3";
        const std::int64_t I = w3 ? 512 : 64, H = w3 ? 1024 : 256, B = w3 ? 64 : 16, T = w3 ? 50 : 2000;
        const Tensor x = randn({T, B, I});
        if (cells) {  // Recurrent<LSTMCell>: the same layer run step by step, as a cell of one's own runs
            auto rnn = std::make_shared<nn::Recurrent<nn::LSTMCell>>(nn::RecurrentOptions(I, H).checkpoint(checkpoint));
            w.keep.push_back(rnn);
            append(w.params, *rnn);
            w.loss = [=] { return (*rnn)(x).output.pow(2).mean(); };
        } else {
            auto rnn = layer(nn::CellKind::LSTM, nn::RecurrentOptions(I, H));
            w.loss = [=] { return (*rnn)(x).output.pow(2).mean(); };
        }
        w.flops = lstm_flops(T, B, I, H, 4);
    } else if (name == "W6") {
        const std::int64_t I = 128, H = 256, B = 32, T = 64;
        auto rnn = layer(nn::CellKind::LSTM, nn::RecurrentOptions(I, H).num_layers(2).bidirectional(true));
        const Tensor x = randn({T, B, I});
        w.loss = [=] { return (*rnn)(x).output.pow(2).mean(); };
        w.flops = 2 * lstm_flops(T, B, I, H, 4) + 2 * lstm_flops(T, B, 2 * H, H, 4);
    } else if (name == "W8-mingru" || name == "W8-mingru-plain" || name == "W8-minlstm" || name == "W8-gru") {
        // A minGRU (log space, nn::MinGRU; W8-mingru-plain: its plain form) and a minLSTM (log
        // space) against a GRU of the same width, over a long sequence.
        const std::int64_t I = 256, H = 256, B = 16, T = 1024;
        const Tensor x = randn({T, B, I});
        if (name == "W8-minlstm") {
            auto rnn = std::make_shared<nn::MinLSTM>(nn::MinLSTMOptions(I, H));
            w.keep.push_back(rnn);
            append(w.params, *rnn);
            w.loss = [=] { return (*rnn)(x).output.pow(2).mean(); };
            w.flops = 2.0 * double(T * B * I) * 3 * double(H);
        } else if (name != "W8-gru") {
            auto rnn = std::make_shared<nn::MinGRU>(nn::MinGRUOptions(I, H).log_space(name == "W8-mingru"));
            w.keep.push_back(rnn);
            append(w.params, *rnn);
            w.loss = [=] { return (*rnn)(x).output.pow(2).mean(); };
            w.flops = 2.0 * double(T * B * I) * 2 * double(H);
        } else {
            auto rnn = layer(nn::CellKind::GRU, nn::RecurrentOptions(I, H));
            w.loss = [=] { return (*rnn)(x).output.pow(2).mean(); };
            w.flops = lstm_flops(T, B, I, H, 3);
        }
    } else {
        std::fprintf(stderr, "unknown workload %s\n", name.c_str());
        std::exit(2);
    }
    return w;
}

// torch.optim.Adam(lr=1e-3) with its defaults, written inline until optim/ has it.
struct Adam {
    std::vector<Tensor> params, m, v;
    int step = 0;
    explicit Adam(std::vector<Tensor> p) : params(std::move(p))
    {
        for (auto& t : params) m.push_back(zeros_like(t)), v.push_back(zeros_like(t));
    }
    void update()
    {
        NoGradGuard no_grad;
        ++step;
        const double b1 = 0.9, b2 = 0.999, lr = 1e-3, eps = 1e-8;
        const double c1 = 1 - std::pow(b1, step), c2 = 1 - std::pow(b2, step);
        for (std::size_t i = 0; i < params.size(); ++i) {
            const Tensor g = params[i].grad();
            if (!g.defined()) continue;
            m[i].mul_(b1).add_(g, 1 - b1);
            v[i].mul_(b2).add_(g * g, 1 - b2);
            params[i].add_(m[i] / (sqrt(v[i] / c2) + eps), -lr / c1);
        }
    }
};

double median(std::vector<double> v)
{
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

// The GEMMs a fused LSTM layer over [T, B, I] with hidden size H runs, straight on OpenBLAS:
// forward, the input projection over all steps and one hidden product per step; backward, one
// product through W_hh per step, then dx, dW_ih and dW_hh over all steps; and, with V > 0, a
// Dense head H -> V over every step (forward, dx, dW). Prints the median ms of each phase: what
// the workload would take if everything but its GEMMs were free.
void sgemm_limit(const char* name, int T, int B, int I, int H, int V, int threads, int steps)
{
    const int G = 4 * H;
    const std::size_t TB = std::size_t(T) * B;
    openblas_set_num_threads(threads);
    std::vector<float> x(TB * I, 0.01f), w_ih(std::size_t(G) * I, 0.01f), w_hh(std::size_t(G) * H, 0.01f),
        gates(TB * G, 0.01f), h(TB * H, 0.01f), dx(x.size()), dw_ih(w_ih.size()), dw_hh(w_hh.size()),
        dh(std::size_t(B) * H), w_out(std::size_t(V) * H, 0.01f), logits(TB * V, 0.01f), dw_out(w_out.size()),
        dh_all(TB * H);
    const auto RM = CblasRowMajor;
    const auto N = CblasNoTrans, Tr = CblasTrans;
    const auto forward = [&] {
        cblas_sgemm(RM, N, Tr, T * B, G, I, 1, x.data(), I, w_ih.data(), I, 1, gates.data(), G);
        for (int t = 0; t < T; ++t)
            cblas_sgemm(RM, N, Tr, B, G, H, 1, h.data() + std::size_t(t) * B * H, H, w_hh.data(), H, 1,
                        gates.data() + std::size_t(t) * B * G, G);
        if (V) cblas_sgemm(RM, N, Tr, T * B, V, H, 1, h.data(), H, w_out.data(), H, 1, logits.data(), V);
    };
    const auto backward = [&] {
        if (V) {
            cblas_sgemm(RM, N, N, T * B, H, V, 1, logits.data(), V, w_out.data(), H, 0, dh_all.data(), H);
            cblas_sgemm(RM, Tr, N, V, H, T * B, 1, logits.data(), V, h.data(), H, 1, dw_out.data(), H);
        }
        for (int t = T - 1; t >= 0; --t)
            cblas_sgemm(RM, N, N, B, H, G, 1, gates.data() + std::size_t(t) * B * G, G, w_hh.data(), H, 0, dh.data(), H);
        cblas_sgemm(RM, N, N, T * B, I, G, 1, gates.data(), G, w_ih.data(), I, 0, dx.data(), I);
        cblas_sgemm(RM, Tr, N, G, I, T * B, 1, gates.data(), G, x.data(), I, 1, dw_ih.data(), I);
        cblas_sgemm(RM, Tr, N, G, H, T * B, 1, gates.data(), G, h.data(), H, 1, dw_hh.data(), H);
    };
    const auto time = [](const auto& f) {
        const auto t0 = std::chrono::steady_clock::now();
        f();
        return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    };
    forward(), backward();
    std::vector<double> f, b;
    for (int i = 0; i < steps; ++i) f.push_back(time(forward)), b.push_back(time(backward));
    std::printf("%s threads=%d forward_ms=%.3f backward_ms=%.3f ms=%.3f\n", name, threads, median(f), median(b),
                median(f) + median(b));
}

}  // namespace

int main(int argc, char** argv)
{
    if (argc < 2) {
        std::fprintf(stderr,
                     "usage: workloads WORKLOAD [--threads N] [--infer] [--steps N] [--composed] [--checkpoint] "
                     "[--cells] [--eager]\n");
        return 2;
    }
    const std::string name = argv[1];
    int threads = 2, steps = 0;
    bool infer = false, fused = true, checkpoint = false, cells = false, profile = false, eager = false;
    for (int i = 2; i < argc; ++i) {
        if (!std::strcmp(argv[i], "--threads") && i + 1 < argc) threads = std::atoi(argv[++i]);
        else if (!std::strcmp(argv[i], "--steps") && i + 1 < argc) steps = std::atoi(argv[++i]);
        else if (!std::strcmp(argv[i], "--infer")) infer = true;
        else if (!std::strcmp(argv[i], "--composed")) fused = false;
        else if (!std::strcmp(argv[i], "--checkpoint")) checkpoint = true;
        else if (!std::strcmp(argv[i], "--cells")) cells = true;
        else if (!std::strcmp(argv[i], "--profile")) profile = true;
        else if (!std::strcmp(argv[i], "--eager")) eager = true;
    }
    if (name == "W3-sgemm" || name == "W2-lstm-sgemm") {
        if (name == "W3-sgemm") sgemm_limit("W3-sgemm", 50, 64, 512, 1024, 0, threads, steps ? steps : 5);
        else sgemm_limit("W2-lstm-sgemm", 64, 32, 64, 256, 96, threads, steps ? steps : 20);
        return 0;
    }
    manual_seed(0);
    set_num_threads(threads);
    Workload w = build(name, fused, checkpoint, cells, eager);
    Adam adam(w.params);
    std::vector<double> forward_times, backward_times;  // of the timed training steps, for the phases
    const auto since = [](auto t0) {
        return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    };
    const auto train_step = [&] {
        for (auto& p : w.params) p.zero_grad();
        const auto t0 = std::chrono::steady_clock::now();
        const Tensor loss = w.loss();
        forward_times.push_back(since(t0));
        const auto t1 = std::chrono::steady_clock::now();
        loss.backward();
        backward_times.push_back(since(t1));
        adam.update();
    };
    const auto infer_step = [&] {
        NoGradGuard no_grad;
        (void)w.loss();
    };
    const bool heavy = name == "W3" || name == "W5" || name.rfind("W8", 0) == 0;
    if (!steps) steps = heavy ? 5 : 20;
    for (int i = 0; i < (heavy ? 1 : 3); ++i) infer ? infer_step() : train_step();
    std::vector<double> times;
    forward_times.clear(), backward_times.clear();
    for (int i = 0; i < steps; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        infer ? infer_step() : train_step();
        times.push_back(since(t0));
    }
    const double ms = median(times);
    const double flops = infer ? w.flops : 3 * w.flops;
    rusage usage{};
    getrusage(RUSAGE_SELF, &usage);
    const std::string variant = std::string(!fused ? " composed" : "") + (cells ? " cells" : "") + (eager ? " eager" : "") +
                                (checkpoint ? " checkpoint" : "");
    const std::string phases = infer ? std::string()
                                     : fmt::format(" forward_ms={:.3f} backward_ms={:.3f}", median(forward_times),
                                                   median(backward_times));
    std::printf("%s %s threads=%d ms=%.3f gflops=%.1f peak_rss_mib=%.0f%s%s\n", name.c_str(), infer ? "infer" : "train",
                threads, ms, flops / ms / 1e6, double(usage.ru_maxrss) / 1024, phases.c_str(), variant.c_str());
    if (profile) {
        autograd::Profiler profiler;
        infer ? infer_step() : train_step();
        profiler.stop();
        std::fprintf(stderr, "%s", profiler.table(15).c_str());
    }
    return 0;
}
