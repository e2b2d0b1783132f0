/// \file
/// Threads for loom's own kernels: the linear recurrences split their lanes, or their steps in
/// chunks, across threads, and large elementwise passes their elements (the fused layers and
/// GEMMs thread inside OpenBLAS).
#pragma once
#include <algorithm>
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
/// Runs task(k) for every k in [0, tasks) on this thread and up to tasks - 1 others, and returns
/// when all are done; the first exception a task throws is rethrown. Tasks must not wait for one
/// another: any of them may run on this thread, in any order. The other threads are loom's
/// pool, kept asleep between calls (while another call holds it, this one starts threads of its
/// own). Waking them costs tens of microseconds: for work much larger than that.
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
/// From this many elements an elementwise pass splits across threads. Below it the pass costs
/// less than starting the threads would; above it, one core's pass over memory is the limit
/// that the other cores lift (W8's exp over 4M floats).
inline constexpr std::int64_t kThreadedElementwise = std::int64_t(1) << 20;

/// over_rows' split, out of line: the small ops that call over_rows stay small enough to inline.
template <class F> [[gnu::noinline]] void over_rows_threaded(std::int64_t rows, std::int64_t width, const F& fn)
{
    over_blocks(rows, std::min({std::int64_t(get_num_threads()), rows * width / kThreadedElements, rows}), fn);
}

/// fn(r0, r1) over rows [0, rows) of `width` elements each: on this thread below
/// kThreadedElementwise elements in all, else in blocks of at least kThreadedElements elements
/// (and one row), one per thread. fn must only touch its rows.
template <class F> void over_rows(std::int64_t rows, std::int64_t width, F&& fn)
{
    if (rows * width < kThreadedElementwise) [[likely]]
        return fn(std::int64_t(0), rows);
    // A copy, made on this path alone: `fn` passed by reference would have to be in memory
    // on the one above too, its captures stored there before every small op.
    const std::decay_t<F> copy(fn);
    over_rows_threaded(rows, width, copy);
}

/// fn(i0, i1) over [0, n), split as over_rows splits rows of one element.
template <class F> void over_elements(std::int64_t n, F&& fn) { over_rows(n, 1, std::forward<F>(fn)); }
}  // namespace kernels

}  // namespace loom
