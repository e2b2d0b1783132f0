#include "parallel.hpp"

#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "error.hpp"

namespace loom {

// Exported by OpenBLAS but not in its headers: it reads its environment variables at load, stops
// its threads (as before a fork()) and starts them (reading the timeout it read).
extern "C" {
void openblas_read_env(void);
int blas_thread_shutdown_(void);
int blas_thread_init(void);
}

namespace {
// After each call OpenBLAS's idle threads spin (sched_yield) for 2^28 cycles, about 0.1 s, before
// they sleep: on the cores where loom's own threaded kernels run next (run_tasks), which then get
// a part of a core each. W8's minGRU step ran 115 ms with that, 99-103 ms with OpenBLAS's
// OPENBLAS_THREAD_TIMEOUT at 24 (2^24 cycles, a few ms), while W2's LSTM, whose GEMMs come
// closer together than that, was the same; at 20 W2 lost 6%. OpenBLAS reads the variable when
// it starts its threads, which it did when it was loaded, before loom: so unless the user set
// it, loom sets it for OpenBLAS to read (and takes it out of the environment again, which child
// processes inherit) and has OpenBLAS start its threads again, here, before any call can be
// running (libloom is linked, not dlopen()ed, as its initial-exec thread-locals require). At once
// rather than at OpenBLAS's next call, so that no OpenBLAS function meets a stopped pool (older
// versions' openblas_set_num_threads added threads to one without starting it).
[[gnu::constructor]] void shorten_openblas_spin()
{
    if (std::getenv("OPENBLAS_THREAD_TIMEOUT") || std::getenv("GOTO_THREAD_TIMEOUT")) return;
    if (setenv("OPENBLAS_THREAD_TIMEOUT", "24", 0) != 0) return;  // no memory: OpenBLAS keeps its own
    openblas_read_env();
    unsetenv("OPENBLAS_THREAD_TIMEOUT");
    blas_thread_shutdown_();
    blas_thread_init();
}

int hardware_threads() { return std::max(1, static_cast<int>(std::thread::hardware_concurrency())); }
std::atomic<int> num_threads{hardware_threads()};
}  // namespace

void set_num_threads(int threads)
{
    LOOM_CHECK(threads >= 1, "set_num_threads", "expects at least 1 thread, got {}", threads);
    num_threads.store(threads, std::memory_order_relaxed);
    openblas_set_num_threads(threads);
}

int get_num_threads() { return num_threads.load(std::memory_order_relaxed); }

void kernels::run_tasks(std::int64_t tasks, const std::function<void(std::int64_t)>& task)
{
    std::exception_ptr failure;
    std::mutex failure_mutex;
    const auto guarded = [&](std::int64_t k) {
        try {
            task(k);
        } catch (...) {
            const std::lock_guard<std::mutex> lock(failure_mutex);
            if (!failure) failure = std::current_exception();
        }
    };
    std::vector<std::thread> threads;
    std::int64_t started = 1;
    try {
        threads.reserve(static_cast<std::size_t>(std::max<std::int64_t>(tasks - 1, 0)));
        for (; started < tasks; ++started) threads.emplace_back(guarded, started);
    } catch (const std::exception&) {
        // No thread could be started for the rest (resources): they run here instead.
    }
    for (std::int64_t k = started; k < tasks; ++k) guarded(k);
    if (tasks > 0) guarded(0);
    for (std::thread& t : threads) t.join();
    if (failure) std::rethrow_exception(failure);
}

}  // namespace loom
