// W7, loom's side: the ADBench LSTM objective (l = 2, c = 1024, b = 14, float64) timed in one
// run: loom's primal (tensor ops under NoGradGuard), loom's gradient (the same ops recorded, then
// backward), the plain C++ primal (no tensors, no AD), and the primal and gradient of the same
// objective written with scan (the loop over characters traced once and replayed). Median of --repeats.
// Usage: adbench_lstm [--repeats N] [--chars C] [--count primal|gradient|plain N]
// --count runs N objectives of one kind, untimed, and prints their loss: bench/instructions.sh
// counts the instructions of two such runs, so that what one objective costs is their difference.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <algorithm>
#include <functional>

#include "adbench_lstm.hpp"

using namespace loom;

namespace {

template <class F> double median_ms(int repeats, F&& f)
{
    f();  // warm-up
    std::vector<double> times;
    for (int i = 0; i < repeats; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        f();
        times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(times.begin(), times.end());
    return times[times.size() / 2];
}

}  // namespace

int main(int argc, char** argv)
{
    int repeats = 20, chars = 1024, count = 0;
    const char* count_kind = nullptr;
    for (int i = 1; i < argc; ++i) {
        if (!std::strcmp(argv[i], "--repeats") && i + 1 < argc) repeats = std::atoi(argv[++i]);
        else if (!std::strcmp(argv[i], "--chars") && i + 1 < argc) chars = std::atoi(argv[++i]);
        else if (!std::strcmp(argv[i], "--count") && i + 2 < argc) {
            count_kind = argv[++i];
            count = std::atoi(argv[++i]);
        } else {
            std::fprintf(stderr, "adbench_lstm: unknown argument '%s'\n", argv[i]);
            return 2;
        }
    }
    set_num_threads(1);
    const adbench::LstmInput input = adbench::make_lstm_input(2, chars, 14);
    adbench::LstmTensors x = adbench::to_tensors(input);
    x.main.requires_grad_();
    x.extra.requires_grad_();

    // One objective's primal (under NoGradGuard), returning its loss, and its gradient, returning
    // the gradient's norm: timed below, or run --count times.
    using Objective = Tensor (*)(const Tensor&, const Tensor&, const Tensor&, const Tensor&);
    const auto primal = [&](Objective objective) {
        NoGradGuard no_grad;
        return objective(x.main, x.extra, x.state, x.sequence).item<double>();
    };
    const auto gradient = [&](Objective objective) {
        x.main.zero_grad();
        x.extra.zero_grad();
        objective(x.main, x.extra, x.state, x.sequence).backward();
        return std::sqrt((x.main.grad().pow(2).sum() + x.extra.grad().pow(2).sum()).item<double>());
    };

    if (count_kind) {
        std::function<double()> one;
        if (!std::strcmp(count_kind, "primal")) one = [&] { return primal(adbench::lstm_objective); };
        else if (!std::strcmp(count_kind, "gradient")) one = [&] { return gradient(adbench::lstm_objective); };
        else if (!std::strcmp(count_kind, "plain")) one = [&] { return adbench::lstm_objective_plain(input); };
        else {
            std::fprintf(stderr, "adbench_lstm: --count takes primal, gradient or plain, not '%s'\n", count_kind);
            return 2;
        }
        double sum = 0;
        for (int i = 0; i < count; ++i) sum += one();
        std::printf("W7 count=%d %s sum=%.15g\n", count, count_kind, sum);
        return 0;
    }

    struct Timed {
        double primal, loss, gradient, gradient_norm;
    };
    const auto time_objective = [&](Objective objective) {
        Timed t{};
        t.primal = median_ms(repeats, [&] { t.loss = primal(objective); });
        t.gradient = median_ms(repeats, [&] { t.gradient_norm = gradient(objective); });
        return t;
    };
    const Timed ops = time_objective(adbench::lstm_objective), scanned = time_objective(adbench::lstm_objective_scan);
    double plain_loss = 0;
    const double plain = median_ms(repeats, [&] { plain_loss = adbench::lstm_objective_plain(input); });
    std::printf("W7 loom-primal ms=%.3f loss=%.15g\n", ops.primal, ops.loss);
    std::printf("W7 loom-gradient ms=%.3f grad_norm=%.15g\n", ops.gradient, ops.gradient_norm);
    std::printf("W7 plain-primal ms=%.3f loss=%.15g\n", plain, plain_loss);
    std::printf("W7 scan-primal ms=%.3f loss=%.15g\n", scanned.primal, scanned.loss);
    std::printf("W7 scan-gradient ms=%.3f grad_norm=%.15g\n", scanned.gradient, scanned.gradient_norm);
    return 0;
}
