// Defect class 5: what is safe across threads, and what is refused. Each thread has its own
// tape and its own default generator; leaves (parameters) may be shared, and several threads
// may backpropagate into one at once. Built and run under ThreadSanitizer by .ci/run.
#include "helpers.hpp"

#include <cblas.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <iterator>
#include <memory>
#include <mutex>
#include <thread>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

using namespace loom;
using testing::check_error;
using testing::close_tensors;
using testing::values;

TEST_CASE("backward on another thread's history is refused, whatever that thread's tape holds")
{
    Tensor w = randn({3}, kFloat64).requires_grad_();
    Tensor loss = (w * w).sum();  // recorded on this thread
    for (bool busy : {false, true}) {
        std::string message;
        std::thread other([&] {
            Tensor mine = (w * 2.0).sum();  // the other thread has entries of its own
            (void)mine;
            if (!busy) mine = Tensor();
            try {
                loss.backward();
            } catch (const Error& e) {
                message = e.what();
            }
        });
        other.join();
        CHECK(message.find("another thread") != std::string::npos);
    }
    loss.backward();  // on the thread that recorded it, it works and nothing was lost
    CHECK(close_tensors(w.grad(), w * 2.0, 1e-15));
}

TEST_CASE("an op on another thread's non-leaf is refused; a detached copy is fine")
{
    Tensor w = randn({3}, kFloat64).requires_grad_();
    const Tensor h = tanh(w);  // a non-leaf of this thread
    std::string message;
    std::thread other([&] {
        try {
            (void)(h * 2.0);
        } catch (const Error& e) {
            message = e.what();
        }
        Tensor ok = (h.detach() * w).sum();  // w is a leaf: shared leaves are fine
        ok.backward();
    });
    other.join();
    CHECK(message.find("another thread") != std::string::npos);
    CHECK(message.find("mul") == 0);
    CHECK(w.grad().defined());
}

TEST_CASE("a non-leaf may outlive the thread that recorded it, or die on another thread while its own records and sweeps")
{
    Tensor w = randn({3}, kFloat64).requires_grad_();
    // Results kept past their thread's end: their slot records outlive its tape.
    std::vector<Tensor> kept;
    std::thread([&] {
        for (int i = 0; i < 3000; ++i) kept.push_back(tanh(w * double(i)));
    }).join();
    REQUIRE(kept.back().requires_grad());
    CHECK_FALSE(kept.back().is_leaf());
    check_error([&] { kept.back().sum().backward(); }, {"another thread"});
    kept.clear();  // they die here, after their tape
    (w * 2.0).sum().backward();  // this tape's reset frees the records they held
    // Results handed to another thread, which drops them while their own thread goes on
    // recording, compacting and sweeping.
    std::thread([&] {
        std::vector<Tensor> handed;
        for (int i = 0; i < 3000; ++i) handed.push_back(w * double(i) + 1.0);  // held by nothing else
        std::thread dropper([moved = std::move(handed)]() mutable { moved.clear(); });
        for (int i = 0; i < 20; ++i) (w * 3.0).tanh().sum().backward();
        dropper.join();
        w.zero_grad();
        (w * 2.0).sum().backward();  // the handed results' entries are dead now: the tape empties
        CHECK(autograd::tape_size() == 0);
        CHECK(close_tensors(w.grad(), full({3}, 2.0, kFloat64), 1e-12));
    }).join();
}

TEST_CASE("threads backpropagating into one shared leaf sum their gradients exactly")
{
    Generator gen(1);
    Tensor w = randn({8, 8}, kFloat64, &gen).requires_grad_();
    const int threads = 4, rounds = 25;
    std::vector<Tensor> inputs;
    for (int t = 0; t < threads; ++t) inputs.push_back(randn({5, 8}, kFloat64, &gen));
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
        pool.emplace_back([&, t] {
            for (int r = 0; r < rounds; ++r) tanh(matmul(inputs[t], w)).sum().backward();
        });
    for (auto& th : pool) th.join();
    // The same sum, one thread at a time.
    Tensor expected = zeros({8, 8}, kFloat64);
    for (int t = 0; t < threads; ++t) {
        Tensor v = w.detach().clone().requires_grad_();
        tanh(matmul(inputs[t], v)).sum().backward();
        expected = expected + v.grad() * double(rounds);
    }
    CHECK(close_tensors(w.grad(), expected, 1e-12));
}

TEST_CASE("threads replaying scans over one shared weight sum their gradients exactly")
{
    // Each thread traces, caches and replays its own program; the weight is shared.
    Generator gen(2);
    Tensor w = randn({4, 4}, kFloat64, &gen).requires_grad_();
    const int threads = 4, rounds = 10;
    std::vector<Tensor> inputs;
    for (int t = 0; t < threads; ++t) inputs.push_back(randn({6, 3, 4}, kFloat64, &gen));
    const auto loss = [&w](const Tensor& xs) {
        const ScanOutput r = scan(
            [&w](const std::vector<Tensor>& c, const std::vector<Tensor>& x) -> ScanStepResult {
                const Tensor h = tanh(matmul(c[0], w) + x[0]);
                return {{h}, {h}};
            },
            {zeros({3, 4}, kFloat64)}, {xs});
        REQUIRE(r.eager_reason.empty());
        return r.ys[0].sum();
    };
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
        pool.emplace_back([&, t] {
            for (int r = 0; r < rounds; ++r) loss(inputs[t]).backward();
        });
    for (auto& th : pool) th.join();
    Tensor expected = zeros({4, 4}, kFloat64);
    for (int t = 0; t < threads; ++t) {
        const std::vector<Tensor> g = grad({loss(inputs[t])}, {w});
        expected = expected + g[0] * double(rounds);
    }
    CHECK(close_tensors(w.grad(), expected, 1e-12));
}

TEST_CASE("each thread has its own default generator, reproducible from manual_seed")
{
    manual_seed(7);
    const auto main_values = values(randn({16}));
    std::vector<std::vector<double>> got(4);
    std::vector<std::thread> pool;
    for (int t = 0; t < 4; ++t)
        pool.emplace_back([&, t] {
            manual_seed(7);
            for (int k = 0; k < 50; ++k) (void)randn({8});  // race on a shared generator, if there were one
            manual_seed(7);
            got[t] = values(randn({16}));
        });
    for (auto& th : pool) th.join();
    for (const auto& g : got) CHECK(g == main_values);
    // Building layers on several threads at once is safe too.
    std::vector<std::thread> builders;
    for (int t = 0; t < 2; ++t) builders.emplace_back([] { nn::LSTM lstm(nn::LSTMOptions(4, 8).num_layers(2)); });
    for (auto& th : builders) th.join();
}

TEST_CASE("threads training their own models at once do not interfere")
{
    std::vector<double> losses(2);
    std::vector<std::thread> pool;
    for (int t = 0; t < 2; ++t)
        pool.emplace_back([&, t] {
            manual_seed(3);
            nn::GRU gru(nn::GRUOptions(2, 4));
            optim::Adam opt(gru.parameters(), optim::AdamOptions(0.01));
            const Tensor x = randn({6, 3, 2});
            for (int step = 0; step < 5; ++step) {
                opt.zero_grad();
                Tensor loss = gru(x).output.pow(2).mean();
                loss.backward();
                opt.step();
                losses[t] = loss.item<double>();
            }
        });
    for (auto& th : pool) th.join();
    CHECK(losses[0] == losses[1]);  // the same seed on each thread: the same run
}

// A header's owner (the thread that made it) counts its handles without atomic writes, and other
// threads count theirs atomically (core/tensor.cpp, "Reference counts"). A tensor's storage is
// held by its header alone, so a weak_ptr to it tells when the header was freed.
TEST_CASE("a handle copied on its tensor's thread and dropped on another is freed by that thread, or at once once it has ended")
{
    Tensor t = ones({1000}, kFloat64);
    const std::weak_ptr<Storage> bytes = t.impl().storage;
    Tensor copy = t;  // counted by this thread
    t = Tensor();
    std::thread([moved = std::move(copy)]() mutable { moved = Tensor(); }).join();
    CHECK_FALSE(bytes.expired());  // queued for this thread, which has made nothing since
    const Tensor next = zeros({2});
    CHECK(bytes.expired());

    // Made by threads that then end, each tag perhaps taken again by the next thread: dropped
    // here, the last handle frees each at once.
    std::vector<Tensor> made;
    std::vector<std::weak_ptr<Storage>> theirs;
    for (int i = 0; i < 3; ++i)
        std::thread([&] {
            made.push_back(full({1000}, double(i), kFloat64));
            made.push_back(made.back());
            theirs.push_back(made.back().impl().storage);
        }).join();
    CHECK(made[0].impl_ptr().use_count() == 2);
    CHECK(made[0].sum().item<double>() == 0.0);
    CHECK(made[5].sum().item<double>() == 2000.0);
    made.erase(made.begin() + 1);
    CHECK_FALSE(theirs[0].expired());
    made.clear();
    for (const auto& w : theirs) CHECK(w.expired());
}

TEST_CASE("a tensor's maker takes back the handles it moved past its byte's 255, and merges for other threads' handles as before")
{
    Tensor t = ones({1000}, kFloat64);
    const std::weak_ptr<Storage> bytes = t.impl().storage;
    std::vector<Tensor> copies(300, t);  // 255 in this thread's byte, then a batch moved to the shared word
    Tensor held;
    std::thread([&] { held = t; }).join();  // counted in the shared word too
    CHECK(t.impl_ptr().use_count() == 302);
    copies.clear();  // the byte runs out and takes its batch back: still this thread's to count
    CHECK(t.impl().owner.load() == detail::thread_tag);
    CHECK(t.impl_ptr().use_count() == 2);
    t = Tensor();  // the last count here, with only the other thread's handle in the shared word: merged
    CHECK(held.impl().owner.load() == detail::kNoOwner);
    CHECK(held.impl_ptr().use_count() == 1);
    std::thread([moved = std::move(held)]() mutable { moved = Tensor(); }).join();
    CHECK(bytes.expired());  // freed by that thread's drop, at once
}

TEST_CASE("a weak handle made on another thread than its tensor's locks on either, and on neither once the tensor is gone")
{
    Tensor t = ones({1000}, kFloat64);
    const std::weak_ptr<Storage> bytes = t.impl().storage;
    detail::WeakTensor weak;
    std::thread([&] { weak = detail::WeakTensor(t); }).join();
    CHECK(weak.lock().is_same(t));  // still this thread's to count: queued to be merged
    const Tensor next = zeros({2});  // merged now
    CHECK(weak.lock().is_same(t));
    CHECK(t.impl_ptr().use_count() == 1);
    bool locked_there = false;
    std::thread([&] { locked_there = weak.lock().is_same(t); }).join();
    CHECK(locked_there);
    t = Tensor();
    CHECK(bytes.expired());
    CHECK_FALSE(weak.lock().defined());
    std::thread([&] { locked_there = weak.lock().defined(); }).join();
    CHECK_FALSE(locked_there);
}

#ifndef __SANITIZE_THREAD__  // ThreadSanitizer does not follow a forked child of a threaded process
TEST_CASE("in a forked child, a tensor made by a thread that did not come along is freed when its last handle goes")
{
    std::vector<Tensor> made;
    std::weak_ptr<Storage> bytes;
    std::mutex mutex;
    std::condition_variable changed;
    bool handed = false, done = false;
    std::thread maker([&] {
        std::unique_lock lock(mutex);
        made.push_back(ones({1000}, kFloat64));
        made.push_back(made.back());
        bytes = made.back().impl().storage;
        handed = true;
        changed.notify_all();
        changed.wait(lock, [&] { return done; });  // alive in the parent while it forks
    });
    {
        std::unique_lock lock(mutex);
        changed.wait(lock, [&] { return handed; });
    }
    const pid_t child = fork();
    REQUIRE(child >= 0);
    if (child == 0) {
        made.clear();
        _exit(bytes.expired() ? 0 : 1);
    }
    int status = 0;
    waitpid(child, &status, 0);
    CHECK((WIFEXITED(status) && WEXITSTATUS(status) == 0));
    {
        const std::lock_guard lock(mutex);
        done = true;
    }
    changed.notify_all();
    maker.join();
    made.clear();  // its thread has ended: freed at once
    CHECK(bytes.expired());
}
#endif

TEST_CASE("tensors passed between threads, copied and dropped on each, all read right and are all freed once the threads end")
{
    constexpr int kThreads = 4, kRounds = 1500;
    std::mutex mutex;
    std::vector<Tensor> passed;  // guarded by mutex
    std::vector<std::weak_ptr<Storage>> made;  // guarded by mutex
    std::atomic<int> wrong{0};
    std::vector<std::thread> pool;
    for (int id = 1; id <= kThreads; ++id)
        pool.emplace_back([&, id] {
            for (int r = 0; r < kRounds; ++r) {
                const Tensor mine = full({300}, double(id), kFloat64);
                Tensor theirs;
                {
                    const std::lock_guard lock(mutex);
                    made.push_back(mine.impl().storage);
                    passed.push_back(mine);  // copied here, dropped wherever it is taken
                    if (passed.size() > 8) {
                        theirs = std::move(passed.front());
                        passed.erase(passed.begin());
                    }
                }
                if (!theirs.defined()) continue;
                const Tensor again = theirs;
                if (again.sum().item<double>() != 300.0 * again.data_ptr<double>()[0]) ++wrong;
            }
        });
    for (auto& th : pool) th.join();
    CHECK(wrong == 0);
    passed.clear();
    CHECK(made.size() == std::size_t(kThreads * kRounds));
    CHECK(std::count_if(made.begin(), made.end(), [](const auto& w) { return !w.expired(); }) == 0);
}

TEST_CASE("OpenBLAS's threads, started again by loom at load, compute GEMMs from several threads, and the environment is left as it was")
{
    // loom sets OPENBLAS_THREAD_TIMEOUT only for OpenBLAS to read, then takes it out again.
    if (std::getenv("GOTO_THREAD_TIMEOUT") == nullptr) CHECK(std::getenv("OPENBLAS_THREAD_TIMEOUT") == nullptr);
    const int threads = get_num_threads();
#ifndef __SANITIZE_THREAD__  // ThreadSanitizer's run keeps OpenBLAS on one thread: its threads are not instrumented
    // More threads than OpenBLAS started with: it starts the rest on the restarted pool.
    const int openblas_threads = openblas_get_num_threads(), wanted = std::max(4, threads + 2);
    set_num_threads(wanted);
#endif
    // Large enough for OpenBLAS to split each product across its threads.
    const Tensor a = randn({192, 160}, kFloat64), b = randn({160, 176}, kFloat64);
    const std::vector<double> av = values(a), bv = values(b);
    std::vector<double> expected(192 * 176, 0.0);
    for (std::size_t i = 0; i < 192; ++i)
        for (std::size_t k = 0; k < 160; ++k)
            for (std::size_t j = 0; j < 176; ++j) expected[i * 176 + j] += av[i * 160 + k] * bv[k * 176 + j];
    std::vector<double> worst(2, 0.0);
    std::vector<std::thread> pool;
    for (int t = 0; t < 2; ++t)
        pool.emplace_back([&, t] {
            for (int repeat = 0; repeat < 3; ++repeat) {
                const std::vector<double> got = values(matmul(a, b));
                for (std::size_t i = 0; i < got.size(); ++i) worst[t] = std::max(worst[t], std::abs(got[i] - expected[i]));
            }
        });
    for (auto& th : pool) th.join();
#ifndef __SANITIZE_THREAD__
    // This process's threads: this one and OpenBLAS's, one fewer than it computes on (none lost in
    // the restart, none started twice).
    const auto tasks = std::distance(std::filesystem::directory_iterator("/proc/self/task"),
                                     std::filesystem::directory_iterator());
    CHECK(tasks == std::max(openblas_threads, wanted));
#endif
    set_num_threads(threads);
    CHECK(worst[0] < 1e-10);
    CHECK(worst[1] < 1e-10);
}

TEST_CASE("run_tasks runs each task once: from several threads at once, nested, after a failure, and in a forked child")
{
    // Each call counts its tasks into its own array: every k once, none twice.
    const auto counted = [](std::int64_t tasks) {
        std::vector<std::atomic<int>> seen(static_cast<std::size_t>(tasks));
        kernels::run_tasks(tasks, [&](std::int64_t k) { seen[std::size_t(k)].fetch_add(1); });
        return std::all_of(seen.begin(), seen.end(), [](const std::atomic<int>& c) { return c.load() == 1; });
    };
    CHECK(counted(1));
    CHECK(counted(7));
    CHECK(counted(3));  // fewer than the pool has workers now
    // Calls from four threads at once: one holds the pool, the others start threads of their own.
    std::atomic<int> good{0};
    {
        std::vector<std::thread> callers;
        for (int i = 0; i < 4; ++i)
            callers.emplace_back([&] {
                for (int round = 0; round < 50; ++round) good += counted(5) ? 1 : 0;
            });
        for (std::thread& t : callers) t.join();
    }
    CHECK(good == 200);
    // A task's own call (the pool is held by the call that runs it).
    std::atomic<int> inner{0};
    kernels::run_tasks(4, [&](std::int64_t) { inner += counted(3) ? 1 : 0; });
    CHECK(inner == 4);
    // A failing task: its exception comes back, every other task still ran, and the pool serves the next call.
    std::atomic<int> ran{0};
    CHECK_THROWS_WITH_AS(kernels::run_tasks(6,
                                            [&](std::int64_t k) {
                                                ++ran;
                                                if (k == 2) throw Error("task 2 failed");
                                            }),
                         "task 2 failed", Error);
    CHECK(ran == 6);
    CHECK(counted(6));
#ifndef __SANITIZE_THREAD__  // ThreadSanitizer does not follow a forked child of a threaded process
    // A child of fork() has none of the pool's threads: it must make its own, not wait for them.
    const pid_t child = fork();
    REQUIRE(child >= 0);
    if (child == 0) _exit(counted(5) && counted(9) ? 0 : 1);
    int status = 0;
    for (int waited = 0; waited < 200 && waitpid(child, &status, WNOHANG) == 0; ++waited)
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    if (waitpid(child, &status, WNOHANG) == 0) {
        kill(child, SIGKILL);
        waitpid(child, &status, 0);
        FAIL("the forked child's run_tasks did not return within 10 s");
    }
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
#endif
}
