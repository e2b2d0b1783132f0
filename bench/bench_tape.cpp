// The cost of recording one op on the tape: a small elementwise add, with and without recording.
// The difference between the two is what the tape costs per op.
#include <benchmark/benchmark.h>

#include <loom/loom.hpp>

using namespace loom;

static void add_no_grad(benchmark::State& state)
{
    const Tensor a = randn({4}), b = randn({4});
    NoGradGuard no_grad;
    for (auto _ : state) benchmark::DoNotOptimize(add(a, b));
}

static void add_recorded(benchmark::State& state)
{
    Tensor a = randn({4}).requires_grad_(), b = randn({4}).requires_grad_();
    for (auto _ : state) benchmark::DoNotOptimize(add(a, b));  // each result dies at once; the tape reclaims it
}

static void add_recorded_and_swept(benchmark::State& state)
{
    // A chain of 64 recorded adds and one backward over it: per-op cost of record + sweep.
    Tensor a = randn({4}).requires_grad_();
    const Tensor b = randn({4});
    for (auto _ : state) {
        Tensor x = a;
        for (int i = 0; i < 64; ++i) x = add(x, b);
        x.sum().backward();
    }
    state.SetItemsProcessed(state.iterations() * 64);
}

BENCHMARK(add_no_grad);
BENCHMARK(add_recorded);
BENCHMARK(add_recorded_and_swept);
BENCHMARK_MAIN();
