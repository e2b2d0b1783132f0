#include "parallel.hpp"

#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "error.hpp"

namespace loom {

namespace {
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
