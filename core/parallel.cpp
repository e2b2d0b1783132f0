#include "parallel.hpp"

#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include <unistd.h>

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

namespace {

// Worker threads kept between calls of run_tasks, asleep (not spinning: OpenBLAS's threads may
// want the cores) until a call hands them tasks. Starting a thread per task per call cost tens of
// microseconds each, serially, on the calling thread; a call that wakes sleeping workers costs
// one wake-up for all of them. One call uses the pool at a time: another thread's call, or a
// task's own call, starts threads of its own as before.
class Pool {
public:
    // Runs task(k) for every k in [0, tasks) on this thread and up to tasks - 1 workers; false,
    // running nothing, when another call holds the pool.
    bool try_run(std::int64_t tasks, const std::function<void(std::int64_t)>& task)
    {
        const std::unique_lock<std::mutex> use(in_use_, std::try_to_lock);
        if (!use.owns_lock()) return false;
        const std::size_t wanted = static_cast<std::size_t>(tasks - 1);
        try {
            while (workers_ < wanted) {
                std::thread(&Pool::work, this, workers_).detach();
                ++workers_;
            }
        } catch (const std::exception&) {
            // No more threads (resources): those there are take the tasks.
        }
        {
            const std::lock_guard<std::mutex> lock(mutex_);
            job_ = &task;
            tasks_ = tasks;
            next_.store(0, std::memory_order_relaxed);
            participants_ = std::min(workers_, wanted);
            running_ = participants_;
            ++generation_;
        }
        wake_.notify_all();
        take_tasks(task, tasks);
        std::unique_lock<std::mutex> lock(mutex_);
        done_.wait(lock, [&] { return running_ == 0; });
        job_ = nullptr;
        return true;
    }

private:
    void take_tasks(const std::function<void(std::int64_t)>& task, std::int64_t tasks)
    {
        for (std::int64_t k; (k = next_.fetch_add(1, std::memory_order_relaxed)) < tasks;) task(k);
    }

    // Worker `index`: sleeps until a call starts, takes tasks if it is among the call's
    // participants, and says when it is done. Runs until the process ends.
    void work(std::size_t index)
    {
        std::uint64_t seen = 0;
        std::unique_lock<std::mutex> lock(mutex_);
        for (;;) {
            wake_.wait(lock, [&] { return generation_ != seen; });
            seen = generation_;
            if (index >= participants_) continue;
            const std::function<void(std::int64_t)>& task = *job_;
            const std::int64_t tasks = tasks_;
            lock.unlock();
            take_tasks(task, tasks);
            lock.lock();
            if (--running_ == 0) done_.notify_one();
        }
    }

    std::mutex in_use_;  // held by the call using the pool
    std::mutex mutex_;  // guards what follows but next_
    std::condition_variable wake_, done_;
    std::size_t workers_ = 0;  // started; only the call holding in_use_ changes it
    std::uint64_t generation_ = 0;  // one more for each call
    const std::function<void(std::int64_t)>* job_ = nullptr;
    std::int64_t tasks_ = 0;
    std::size_t participants_ = 0;  // workers 0 .. participants_ - 1 take part in this call
    std::size_t running_ = 0;  // participants not yet done
    std::atomic<std::int64_t> next_{0};  // the next task to take
};

// The process's pool, made at first use and never destroyed (its workers sleep until exit). A
// child made by fork() has none of its parent's threads: there a new pool is made (the parent's
// is left as it is). The lock is taken only then, never in the process that made the pool, so a
// fork cannot leave it held.
Pool& pool()
{
    static std::atomic<Pool*> current{new Pool};
    static std::atomic<pid_t> owner{getpid()};
    static std::mutex remaking;
    const pid_t self = getpid();
    if (owner.load(std::memory_order_acquire) != self) {
        const std::lock_guard<std::mutex> lock(remaking);
        if (owner.load(std::memory_order_relaxed) != self) {
            current.store(new Pool, std::memory_order_relaxed);
            owner.store(self, std::memory_order_release);
        }
    }
    return *current.load(std::memory_order_acquire);
}

}  // namespace

void kernels::run_tasks(std::int64_t tasks, const std::function<void(std::int64_t)>& task)
{
    std::exception_ptr failure;
    std::mutex failure_mutex;
    const std::function<void(std::int64_t)> guarded = [&](std::int64_t k) {
        try {
            task(k);
        } catch (...) {
            const std::lock_guard<std::mutex> lock(failure_mutex);
            if (!failure) failure = std::current_exception();
        }
    };
    if (tasks <= 1) {
        if (tasks == 1) guarded(0);
    } else if (!pool().try_run(tasks, guarded)) {
        std::vector<std::thread> threads;
        std::int64_t started = 1;
        try {
            threads.reserve(static_cast<std::size_t>(tasks - 1));
            for (; started < tasks; ++started) threads.emplace_back(guarded, started);
        } catch (const std::exception&) {
            // No thread could be started for the rest (resources): they run here instead.
        }
        for (std::int64_t k = started; k < tasks; ++k) guarded(k);
        guarded(0);
        for (std::thread& t : threads) t.join();
    }
    if (failure) std::rethrow_exception(failure);
}

}  // namespace loom
