/// \file
/// loom::dist: data-parallel training over MPI (OpenMPI), as Horovod and PyTorch's mpi backend do.
/// Optional: built as libloom_dist when meson finds MPI. Every process holds the whole model and
/// a shard of each batch; gradients are averaged across processes before the optimizer's step, so
/// every process takes the same step. Depends on nn, optim and train; nothing below knows of it.
#pragma once
#include <cstdint>
#include <cstdio>
#include <exception>
#include <memory>
#include <vector>

#include "../nn/module.hpp"
#include "../train/train.hpp"

namespace loom::dist {

/// MPI_Init on construction, MPI_Finalize on destruction; one per process, first thing in main.
/// Started without mpirun, the program is a world of one process and MPI is not started; every
/// call below then works on that one process (an average of one, a broadcast to itself).
class Environment {
public:
    /// Starts MPI with the program's arguments (when run under mpirun).
    Environment(int* argc, char*** argv);
    ~Environment();
    Environment(const Environment&) = delete;
    Environment& operator=(const Environment&) = delete;
};

/// This process's index among the world's.
int rank();
/// Number of processes.
int world_size();
bool is_main();  ///< rank 0: the one process that writes files and prints
/// Waits until every process reaches it.
void barrier();

/// Ends the whole job: prints "rank r: <message>" to stderr and calls MPI_Abort, so that no
/// process waits forever on one that stopped. For an exception escaping the training loop.
[[noreturn]] void abort(const std::exception& error);

/// Runs f(); an exception from it ends the job through abort(). Returns f's result.
template <class F> auto run_or_abort(F&& f) -> decltype(f())
{
    try {
        return f();
    } catch (const std::exception& e) {
        abort(e);
    }
}

/// The names, shapes and dtypes of the module's parameters and buffers must be the same on every
/// process: if not, every process throws a loom::Error naming the first difference.
void check_same_model(const nn::Module& model);

/// Copies the parameters and buffers of process `root` to every process.
void broadcast_parameters(nn::Module& model, int root = 0);

/// Averages the gradients of `parameters` across processes after backward(). Gradients travel in
/// buckets of about bucket_bytes each, filled from the last parameter back (the order backward
/// finishes them in). The average is weighted by each process's `weight` (its examples in the
/// batch), so shards of unequal size give exactly the gradient of the whole batch's mean loss. A
/// parameter without a gradient counts as zero; one without a gradient on every process keeps none.
///
/// Called before backward(), start_during_backward() overlaps the reduction with backward, as
/// PyTorch's DDP does: each bucket's all-reduce starts as soon as every gradient in it is final
/// (register_post_accumulate_grad_hook), and average() then only waits for what is left. Without
/// it, average() packs and starts every bucket after backward.
class GradientAverager {
public:
    /// Averages the gradients of `parameters` across processes, in buckets of about `bucket_bytes`; a collective.
    explicit GradientAverager(std::vector<Tensor> parameters, std::size_t bucket_bytes = 1 << 20);
    /// Makes the next average() start each bucket's all-reduce during the backward() before it,
    /// buckets in order (the same on every process); `weight` is the one average() will be given.
    /// Every process must call it, or none.
    void start_during_backward(double weight = 1);
    /// Replaces each gradient by the weighted average over processes; `weight` is this process's share (e.g. its examples in the batch).
    void average(double weight = 1);
    /// Number of buckets (one all-reduce each).
    std::size_t buckets() const;
    /// How many buckets the last average() found already started during backward.
    std::size_t buckets_started_during_backward() const;

private:
    struct State;  // shared with the hooks on the parameters, which hold it weakly
    std::shared_ptr<State> state_;
};

/// Each process's share of a shuffled order of n examples. Epoch e's order is the same on every
/// process (shuffled from seed + e); process r takes positions r, r + W, r + 2W, ... and shares
/// are padded by wrapping around, so every process gets ceil(n / W) examples and the same number
/// of batches.
class ShardSampler {
public:
    ShardSampler(std::int64_t n, std::uint64_t seed, int rank = dist::rank(), int world_size = dist::world_size(),
                 bool shuffle = true);  ///< shuffle = false: the examples in order, every epoch
    /// This process's indices in epoch `epoch`'s order.
    std::vector<std::int64_t> indices(std::int64_t epoch) const;

private:
    std::int64_t n_;
    std::uint64_t seed_;
    int rank_, world_;
    bool shuffle_;
};

/// What train::fit needs to train across processes: checks that every process built the same
/// model, copies process 0's weights to all, and averages gradients in buckets of bucket_bytes.
/// Set it as FitOptions::parallel; batch_size is then the batch of each process.
train::Parallel data_parallel(nn::Module& model, std::size_t bucket_bytes = 1 << 20);

/// A sum across processes, e.g. of examples seen or of losses.
double sum(double value);

}  // namespace loom::dist
