/// \file
/// Threads for loom's own kernels: the linear recurrences split their lanes, or their steps in
/// chunks, across threads (the fused layers and GEMMs thread inside OpenBLAS).
#pragma once
#include <cstdint>
#include <functional>
#include <utility>

namespace loom {

/// The threads loom's kernels and OpenBLAS may use, as libtorch's torch::set_num_threads;
/// at least 1. By default, the hardware's concurrency.
void set_num_threads(int threads);
/// The threads set by set_num_threads, as libtorch's torch::get_num_threads.
int get_num_threads();

namespace kernels {
/// Runs task(k) for every k in [0, tasks), each on its own thread (k = 0 on this one), and returns
/// when all are done; the first exception a task throws is rethrown. Starting a thread costs tens
/// of microseconds: for work much larger than that.
void run_tasks(std::int64_t tasks, const std::function<void(std::int64_t)>& task);

/// Below this many elements a kernel runs on one thread: starting threads would cost more.
inline constexpr std::int64_t kThreadedElements = std::int64_t(1) << 16;

/// [i0, i1) of the k-th of `parts` equal blocks of [0, n).
inline std::pair<std::int64_t, std::int64_t> block(std::int64_t n, std::int64_t k, std::int64_t parts)
{
    return {n * k / parts, n * (k + 1) / parts};
}

/// fn(i0, i1) on each of `parts` equal blocks of [0, n), one per thread (run_tasks); on this
/// thread alone, over all of [0, n), when parts <= 1.
template <class F> void over_blocks(std::int64_t n, std::int64_t parts, F&& fn)
{
    if (parts <= 1) return fn(std::int64_t(0), n);
    run_tasks(parts, [&](std::int64_t k) {
        const auto [i0, i1] = block(n, k, parts);
        fn(i0, i1);
    });
}
}  // namespace kernels

}  // namespace loom
