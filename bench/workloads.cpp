// loom's side of the benchmark race: the workloads of bench/torch_reference.py, same sizes, same
// loss, same Adam update, same output line. Run each workload in its own process.
// Usage: workloads WORKLOAD [--threads N] [--infer] [--steps N] [--composed] [--checkpoint]
// WORKLOAD: W1-rnn W1-gru W1-lstm W2-lstm W2-gru W3 W4 W5 W6
#include <loom/loom.hpp>

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

Workload build(const std::string& name, bool fused, bool checkpoint)
{
    Workload w;
    const auto layer = [&](nn::CellKind kind, nn::RecurrentOptions o) {
        auto m = std::make_shared<nn::RecurrentLayer>(kind, o.fused(fused).checkpoint(checkpoint));
        w.keep.push_back(m);
        append(w.params, *m);
        return m;
    };
    if (name.rfind("W1", 0) == 0) {
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
    } else if (name == "W2-lstm" || name == "W2-gru" || name == "W4") {
        const std::int64_t V = 96, E = 64, H = 256, B = 32, T = 64;
        auto emb = std::make_shared<nn::Embedding>(V, E);
        auto head = std::make_shared<nn::Dense>(H, V);
        append(w.params, *emb);
        w.keep.push_back(emb);
        std::function<Tensor(const Tensor&)> rnn;
        if (name == "W4") {
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
        auto rnn = layer(nn::CellKind::LSTM, nn::RecurrentOptions(I, H));
        const Tensor x = randn({T, B, I});
        w.loss = [=] { return (*rnn)(x).output.pow(2).mean(); };
        w.flops = lstm_flops(T, B, I, H, 4);
    } else if (name == "W6") {
        const std::int64_t I = 128, H = 256, B = 32, T = 64;
        auto rnn = layer(nn::CellKind::LSTM, nn::RecurrentOptions(I, H).num_layers(2).bidirectional(true));
        const Tensor x = randn({T, B, I});
        w.loss = [=] { return (*rnn)(x).output.pow(2).mean(); };
        w.flops = 2 * lstm_flops(T, B, I, H, 4) + 2 * lstm_flops(T, B, 2 * H, H, 4);
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

}  // namespace

int main(int argc, char** argv)
{
    if (argc < 2) {
        std::fprintf(stderr, "usage: workloads WORKLOAD [--threads N] [--infer] [--steps N] [--composed] [--checkpoint]\n");
        return 2;
    }
    const std::string name = argv[1];
    int threads = 2, steps = 0;
    bool infer = false, fused = true, checkpoint = false;
    for (int i = 2; i < argc; ++i) {
        if (!std::strcmp(argv[i], "--threads") && i + 1 < argc) threads = std::atoi(argv[++i]);
        else if (!std::strcmp(argv[i], "--steps") && i + 1 < argc) steps = std::atoi(argv[++i]);
        else if (!std::strcmp(argv[i], "--infer")) infer = true;
        else if (!std::strcmp(argv[i], "--composed")) fused = false;
        else if (!std::strcmp(argv[i], "--checkpoint")) checkpoint = true;
    }
    manual_seed(0);
    set_num_threads(threads);
    Workload w = build(name, fused, checkpoint);
    Adam adam(w.params);
    const auto train_step = [&] {
        for (auto& p : w.params) p.zero_grad();
        w.loss().backward();
        adam.update();
    };
    const auto infer_step = [&] {
        NoGradGuard no_grad;
        (void)w.loss();
    };
    const bool heavy = name == "W3" || name == "W5";
    if (!steps) steps = heavy ? 5 : 20;
    for (int i = 0; i < (heavy ? 1 : 3); ++i) infer ? infer_step() : train_step();
    std::vector<double> times;
    for (int i = 0; i < steps; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        infer ? infer_step() : train_step();
        times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(times.begin(), times.end());
    const double ms = times[times.size() / 2];
    const double flops = infer ? w.flops : 3 * w.flops;
    rusage usage{};
    getrusage(RUSAGE_SELF, &usage);
    const char* variant = !fused ? " composed" : checkpoint ? " checkpoint" : "";
    std::printf("%s %s threads=%d ms=%.3f gflops=%.1f peak_rss_mib=%.0f%s\n", name.c_str(), infer ? "infer" : "train",
                threads, ms, flops / ms / 1e6, double(usage.ru_maxrss) / 1024, variant);
    return 0;
}
