// custom_cell: a new recurrent architecture in twenty lines, checked and trained.
//
// The cell is a minimal gated unit (Zhou et al. 2016): one gate f decides how much of the state
// to overwrite. Recurrent<Cell> gives it stacking, bidirectionality and lengths for free; the
// tape gives its gradients. The program
//   1. gradchecks the cell (float64, 2 layers, bidirectional, variable lengths), then
//   2. trains it to output the sum of 20 numbers drawn from U(-1, 1), scaled by 1/sqrt(20), against
//      the baseline of always answering 0 (MSE = the target's variance, 1/3);
//   3. profiles ten more training steps: where a step's time goes, op by op and by scope
//      (`custom_cell --trace step.json` also writes the timeline for ui.perfetto.dev).
// Expected output: "gradcheck passed ...", a loss falling well below the baseline, the profile.
#include <loom/loom.hpp>

#include <chrono>
#include <cstdio>
#include <string>

using namespace loom;

// The new cell, in twenty lines: class MinimalGatedUnit : public nn::Cell, with a forward that
// maps (x, state) to the next state. It lives in minimal_gated_unit.hpp so that
// adding_problem.cpp can race the very same cell against the built-in ones.
#include "minimal_gated_unit.hpp"

int main(int argc, char** argv)
{
    manual_seed(0);

    // 1. Its gradients, against finite differences in float64.
    nn::Recurrent<MinimalGatedUnit> checked(
        nn::RecurrentOptions(2, 3).num_layers(2).bidirectional(true).dtype(kFloat64));
    const Tensor x_check = randn({5, 2, 2}, kFloat64);
    const Tensor lengths = from_vector<std::int64_t>({5, 3}, {2});
    const GradcheckResult check =
        gradcheck_parameters([&] { return checked(x_check, {}, lengths).output; }, checked.parameters());
    std::printf("%s\n", check.report().c_str());
    if (!check.ok) return 1;

    // 2. Train it: read 20 numbers, output their scaled sum.
    const std::int64_t T = 20, B = 64, H = 16;
    nn::Recurrent<MinimalGatedUnit> rnn(nn::RecurrentOptions(1, H));
    nn::Dense head(H, 1);
    std::vector<Tensor> params = rnn.parameters();
    for (auto& p : head.parameters()) params.push_back(p);
    std::printf("%zu parameters in %zu tensors; baseline (always 0) MSE %.4f\n", std::size_t(rnn.parameter_count() + head.parameter_count()),
                params.size(), 1.0 / 3);

    const double lr = 0.1;
    const auto train_step = [&] {
        const Tensor x = uniform({T, B, 1}, -1, 1);
        const Tensor target = x.sum({0}) / std::sqrt(double(T));  // [B, 1], variance 1/3
        Tensor prediction;
        {
            autograd::Scope scope("recurrent layer");
            prediction = rnn(x).output.select(0, T - 1);
        }
        autograd::Scope scope("head and loss");
        const Tensor loss = nn::mse_loss(head(prediction), target);
        for (auto& p : params) p.zero_grad();
        loss.backward();
        {
            NoGradGuard no_grad;
            for (auto& p : params) p.add_(p.grad(), -lr);
        }
        return loss.item<double>();
    };
    double first = 0, last = 0;
    for (int step = 0; step <= 1000; ++step) {
        last = train_step();
        if (step == 0) first = last;
        if (step % 200 == 0) std::printf("step %4d  mse %.5f\n", step, last);
    }
    std::printf("mse fell from %.4f to %.5f: %.0fx below the baseline\n", first, last, (1.0 / 3) / last);

    // 3. Where a step's time goes: ten steps under the profiler, and ten without it for its own cost.
    const auto start = std::chrono::steady_clock::now();
    for (int step = 0; step < 10; ++step) train_step();
    const double plain_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    autograd::Profiler profiler;
    for (int step = 0; step < 10; ++step) train_step();
    profiler.stop();
    std::printf("\nten training steps take %.2f ms, %.2f ms profiled:\n%s", plain_ms, profiler.seconds() * 1e3,
                profiler.table(12).c_str());
    if (argc == 3 && std::string(argv[1]) == "--trace") {
        profiler.chrome_trace(argv[2]);
        std::printf("timeline: %s\n", argv[2]);
    }
    return last < (1.0 / 3) / 5 ? 0 : 1;
}
