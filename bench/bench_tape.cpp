// The cost of recording one op on the tape: an elementwise add on 14-element vectors (the size of
// W7, ADBench's LSTM), with and without recording. The difference between the first two is what
// recording costs per op; add_recorded_and_swept's time per item is record + backward per op.
#include <benchmark/benchmark.h>

#include <loom/loom.hpp>

#include <cstdlib>
#include <utility>
#include <vector>

using namespace loom;

// The floor the three below are measured against: a plain C++ add of two 14-element vectors into
// a new std::vector per result, as an op that returns a fresh tensor does.
static void add_plain_vector(benchmark::State& state)
{
    std::vector<float> a(14), b(14);
    for (std::size_t i = 0; i < a.size(); ++i) a[i] = float(i) * 0.5f, b[i] = 1.0f - float(i);
    for (auto _ : state) {
        std::vector<float> out(a.size());
        for (std::size_t i = 0; i < a.size(); ++i) out[i] = a[i] + b[i];
        benchmark::DoNotOptimize(out.data());
        benchmark::ClobberMemory();
    }
}

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

// loom's threads for one benchmark (0: as set), restored after it.
class ThreadsFor {
public:
    explicit ThreadsFor(std::int64_t threads) : previous_(get_num_threads())
    {
        if (threads > 0) set_num_threads(static_cast<int>(threads));
    }
    ~ThreadsFor() { set_num_threads(previous_); }
    ThreadsFor(const ThreadsFor&) = delete;
    ThreadsFor& operator=(const ThreadsFor&) = delete;

private:
    int previous_;
};

// linear_recurrence forward over T steps of n lanes on `threads` threads (Args: T, n, threads;
// 0: as set, by default all the machine's), against the same loop in plain C++ over the same
// arrays on one thread (it is memory-bound: 3 arrays read or written per step). Wide (4096 x 16 x
// 256) splits the lanes across threads; narrow and long (262144 x 16) runs the two-pass chunked
// scan over steps on three threads or more, on one thread below that.
static void linear_recurrence_forward(benchmark::State& state)
{
    const std::int64_t T = state.range(0), n = state.range(1);
    const ThreadsFor threads(state.range(2));
    const Tensor a = rand({T, n}), b = randn({T, n});
    NoGradGuard no_grad;
    for (auto _ : state) benchmark::DoNotOptimize(linear_recurrence(a, b));
    state.SetBytesProcessed(state.iterations() * 3 * a.numel() * 4);
}

// Forward and backward of a narrow, long recurrence (Args: T, n, threads), seeded with dL/dh = w:
// both directions run the chunked scan on three threads or more.
static void linear_recurrence_narrow_forward_backward(benchmark::State& state)
{
    const std::int64_t T = state.range(0), n = state.range(1);
    const ThreadsFor threads(state.range(2));
    const Tensor a = rand({T, n}).requires_grad_(), b = randn({T, n}).requires_grad_(), w = randn({T, n});
    for (auto _ : state) {
        a.zero_grad();
        b.zero_grad();
        linear_recurrence(a, b).backward(w);
    }
    state.SetBytesProcessed(state.iterations() * 8 * a.numel() * 4);
}

static void linear_recurrence_plain_loop(benchmark::State& state)
{
    const std::int64_t T = state.range(0), n = state.range(1);
    const Tensor a = rand({T, n}), b = randn({T, n});
    const float *pa = a.data_ptr<float>(), *pb = b.data_ptr<float>();
    std::vector<float> h(static_cast<std::size_t>(T * n));  // allocated once, as loom's storage cache does
    for (auto _ : state) {
        for (std::int64_t i = 0; i < n; ++i) h[i] = pb[i];
        for (std::int64_t t = 1; t < T; ++t)
            for (std::int64_t i = 0; i < n; ++i) h[t * n + i] = pa[t * n + i] * h[(t - 1) * n + i] + pb[t * n + i];
        benchmark::DoNotOptimize(h.data());
    }
    state.SetBytesProcessed(state.iterations() * 3 * a.numel() * 4);
}

// Forward and backward (the gradient of a, b and h0) through the tape.
static void linear_recurrence_forward_backward(benchmark::State& state)
{
    const Tensor a = rand({4096, 16, 256}).requires_grad_(), b = randn({4096, 16, 256}).requires_grad_();
    const Tensor w = randn({4096, 16, 256});
    for (auto _ : state) {
        a.zero_grad();
        b.zero_grad();
        (linear_recurrence(a, b) * w).sum().backward();
    }
}

// Forward and backward of the op alone, seeded with dL/dh = w (no loss ops), against the same
// two passes in plain C++ over the same arrays: h forward; then g_t = w_t + a_{t+1} g_{t+1},
// da_t = g_t h_{t-1}, db_t = g_t backward (8 arrays read or written: a, b, h forward; dh, a, h,
// da, db backward).
static void linear_recurrence_op_forward_backward(benchmark::State& state)
{
    const Tensor a = rand({4096, 16, 256}).requires_grad_(), b = randn({4096, 16, 256}).requires_grad_();
    const Tensor w = randn({4096, 16, 256});
    for (auto _ : state) {
        a.zero_grad();
        b.zero_grad();
        linear_recurrence(a, b).backward(w);
    }
    state.SetBytesProcessed(state.iterations() * 8 * a.numel() * 4);
}

static void linear_recurrence_plain_forward_backward(benchmark::State& state)
{
    const Tensor ta = rand({4096, 16, 256}), tb = randn({4096, 16, 256}), tw = randn({4096, 16, 256});
    const std::int64_t T = 4096, n = 16 * 256;
    const float *pa = ta.data_ptr<float>(), *pb = tb.data_ptr<float>(), *pw = tw.data_ptr<float>();
    // Allocated once: the floor, with no page ever faulted in again.
    std::vector<float> h(static_cast<std::size_t>(T * n)), ga(h.size()), gb(h.size()), g(static_cast<std::size_t>(n));
    for (auto _ : state) {
        for (std::int64_t i = 0; i < n; ++i) h[i] = pb[i];
        for (std::int64_t t = 1; t < T; ++t)
            for (std::int64_t i = 0; i < n; ++i) h[t * n + i] = pa[t * n + i] * h[(t - 1) * n + i] + pb[t * n + i];
        for (std::int64_t i = 0; i < n; ++i) g[i] = 0;
        for (std::int64_t t = T; t-- > 0;)
            for (std::int64_t i = 0; i < n; ++i) {
                const float next = t + 1 < T ? pa[(t + 1) * n + i] * g[i] : 0.0f;
                g[i] = pw[t * n + i] + next;
                gb[t * n + i] = g[i];
                ga[t * n + i] = t > 0 ? g[i] * h[(t - 1) * n + i] : 0.0f;
            }
        benchmark::DoNotOptimize(ga.data());
        benchmark::DoNotOptimize(gb.data());
    }
    state.SetBytesProcessed(state.iterations() * 8 * ta.numel() * 4);
}

// A training step (forward and backward, the loss a weighted sum of the outputs) over T = 1024,
// B = 16, width 256, input width 256: a minGRU layer written with ops and linear_recurrence,
// against loom's fused GRU layer of the same width on the same data.
static void mingru_training_step(benchmark::State& state)
{
    const std::int64_t T = 1024, B = 16, I = 256, H = 256;
    manual_seed(0);
    const Tensor x = randn({T, B, I}), w = randn({T, B, H});
    const Tensor w_z = (randn({H, I}) * 0.05).requires_grad_(), b_z = zeros({H}).requires_grad_();
    const Tensor w_h = (randn({H, I}) * 0.05).requires_grad_(), b_h = zeros({H}).requires_grad_();
    for (auto _ : state) {
        for (const Tensor& p : {w_z, b_z, w_h, b_h}) p.zero_grad();
        const Tensor z = sigmoid(linear(x, w_z, b_z)), h_tilde = linear(x, w_h, b_h);
        (linear_recurrence(1.0 - z, z * h_tilde) * w).sum().backward();
    }
}

static void gru_fused_training_step(benchmark::State& state)
{
    const std::int64_t T = 1024, B = 16, I = 256, H = 256;
    manual_seed(0);
    const Tensor x = randn({T, B, I}), w = randn({T, B, H});
    nn::GRU gru(nn::GRUOptions(I, H));
    for (auto _ : state) {
        gru.zero_grad();
        (gru(x).output * w).sum().backward();
    }
}

BENCHMARK(add_plain_vector);
BENCHMARK(add_no_grad);
BENCHMARK(add_recorded);
BENCHMARK(add_recorded_and_swept);
BENCHMARK(select_backward_per_step)->Arg(500)->Arg(1000)->Arg(2000)->Arg(4000)->Unit(benchmark::kMillisecond);
// The narrow recurrence on 1 to 16 threads shows what the chunked scan gains with the cores there are.
BENCHMARK(linear_recurrence_forward)
    ->Args({4096, 16 * 256, 0})
    ->Args({262144, 16, 0})
    ->ArgsProduct({{262144}, {16}, {1, 2, 4, 8, 16}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(linear_recurrence_plain_loop)->Args({4096, 16 * 256})->Args({262144, 16})->Unit(benchmark::kMillisecond);
BENCHMARK(linear_recurrence_narrow_forward_backward)
    ->ArgsProduct({{262144}, {16}, {1, 2, 4, 8, 16}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(linear_recurrence_forward_backward)->Unit(benchmark::kMillisecond);
BENCHMARK(linear_recurrence_op_forward_backward)->Unit(benchmark::kMillisecond);
BENCHMARK(linear_recurrence_plain_forward_backward)->Unit(benchmark::kMillisecond);
BENCHMARK(mingru_training_step)->Unit(benchmark::kMillisecond);
BENCHMARK(gru_fused_training_step)->Unit(benchmark::kMillisecond);

int main(int argc, char** argv)
{
    // LOOM_BENCH_ITERATIONS=n: the four add benchmarks again, as count/<name>, each run exactly n
    // iterations, so that bench/instructions.sh can take what one costs from two counts.
    if (const char* n = std::getenv("LOOM_BENCH_ITERATIONS")) {
        using Fn = void (*)(benchmark::State&);
        const std::pair<const char*, Fn> adds[] = {{"count/add_plain_vector", add_plain_vector},
                                                   {"count/add_no_grad", add_no_grad},
                                                   {"count/add_recorded", add_recorded},
                                                   {"count/add_recorded_and_swept", add_recorded_and_swept}};
        for (const auto& [name, fn] : adds) benchmark::RegisterBenchmark(name, fn)->Iterations(std::atoll(n));
    }
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
