// The cost of recording one op on the tape: an elementwise add on 14-element vectors (the size of
// W7, ADBench's LSTM), with and without recording. The difference between the first two is what
// recording costs per op; add_recorded_and_swept's time per item is record + backward per op.
#include <benchmark/benchmark.h>

#include <loom/loom.hpp>

using namespace loom;

static void add_no_grad(benchmark::State& state)
{
    const Tensor a = randn({14}), b = randn({14});
    NoGradGuard no_grad;
    for (auto _ : state) benchmark::DoNotOptimize(add(a, b));
}

static void add_recorded(benchmark::State& state)
{
    Tensor a = randn({14}).requires_grad_(), b = randn({14}).requires_grad_();
    for (auto _ : state) benchmark::DoNotOptimize(add(a, b));  // each result dies at once; the tape reclaims it
}

static void add_recorded_and_swept(benchmark::State& state)
{
    // A chain of 64 recorded adds and one backward over it: per-op cost of record + sweep.
    Tensor a = randn({14}).requires_grad_();
    const Tensor b = randn({14});
    for (auto _ : state) {
        Tensor x = a;
        for (int i = 0; i < 64; ++i) x = add(x, b);
        x.sum().backward();
    }
    state.SetItemsProcessed(state.iterations() * 64);
}

// Backward of a 2-layer tanh RNN written by hand that takes its input step by step with
// select() (B = 32, H = 128): the time per step must stay flat as T grows (it grew with T while
// each step's gradient was a full-size tensor).
static void select_backward_per_step(benchmark::State& state)
{
    const std::int64_t T = state.range(0), B = 32, H = 128;
    manual_seed(0);
    const Tensor x = randn({T, B, H}).requires_grad_();
    const Tensor w1 = (randn({H, H}) * 0.05).requires_grad_(), w2 = (randn({H, H}) * 0.05).requires_grad_();
    for (auto _ : state) {
        state.PauseTiming();
        Tensor h1 = zeros({B, H}), h2 = zeros({B, H});
        std::vector<Tensor> layer1;
        for (std::int64_t t = 0; t < T; ++t) layer1.push_back(h1 = tanh(x.select(0, t) + matmul(h1, w1)));
        const Tensor seq = stack(layer1, 0);  // what a second layer reads
        for (std::int64_t t = 0; t < T; ++t) h2 = tanh(seq.select(0, t) + matmul(h2, w2));
        const Tensor loss = h2.sum();
        state.ResumeTiming();
        loss.backward();
    }
    state.counters["steps_per_s"] =
        benchmark::Counter(double(T), benchmark::Counter::kIsIterationInvariantRate);
}

BENCHMARK(add_no_grad);
BENCHMARK(add_recorded);
BENCHMARK(add_recorded_and_swept);
BENCHMARK(select_backward_per_step)->Arg(500)->Arg(1000)->Arg(2000)->Arg(4000)->Unit(benchmark::kMillisecond);
BENCHMARK_MAIN();
