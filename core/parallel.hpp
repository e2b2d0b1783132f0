/// \file
/// Threads for loom's own kernels: the linear recurrences split their lanes, or their steps in
/// chunks, across threads (the fused layers and GEMMs thread inside OpenBLAS).
#pragma once
#include <cstdint>
#include <functional>

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
}  // namespace kernels

}  // namespace loom
