/// \file
/// scan: a step function run over time, traced once and replayed, as JAX's lax.scan.
///
/// `scan(step, init, xs)` calls `step(carry, x_t) -> {carry, y}` for t = 0 .. T-1 over the first
/// dim of every tensor of `xs`, and returns the last carry and every step's y stacked along a new
/// first dim. It does not call the step T times: it traces the step on the first input, traces
/// it again on other values of the same shapes, and when both traces are the same program of ops
/// it can replay, it runs that program over all T steps on raw buffers and records ONE tape
/// entry, whose backward runs the program's adjoint in reverse. Ops that do not depend on the
/// carry (the input projection x_t W^T + b) run once over all steps, one GEMM instead of T; the
/// weight gradients of ops inside the loop are one GEMM over all steps too. A product inside the
/// loop added to such a value (a gated cell's h W_hh^T + b_hh) accumulates into it, and a run of
/// elementwise ops over values of one size is one pass per step, a few KiB at a time.
///
/// Values and gradients are the eager loop's: every op in a replayed program computes with the
/// same formulas as the eager op (autograd/pointwise.hpp), so a float64 replay agrees with the
/// eager loop to rounding. Replayable ops: add, sub, mul, div, neg, exp, log, tanh, sigmoid, relu,
/// linear, 2-D matmul, and the ops that move elements (reshape, view, squeeze, unsqueeze,
/// permute, transpose, expand, slice, select, narrow, chunk, split, concat, clone).
///
/// It runs the eager loop instead, and says why once on stderr (and in ScanOutput::eager_reason),
/// when the step calls an op it cannot replay, when the two traces differ (the step draws random
/// numbers, or its ops or shapes depend on the data), or when T < 2. Anomaly mode runs eagerly
/// too, so that a NaN is named with its op. create_graph through a replayed scan works: its
/// backward then calls the step again over all steps and differentiates that eager loop, so the
/// step must still be valid then (capture what it reads by value).
///
/// The step must be a function of its arguments and of tensors it reads from outside: those
/// that require grad (parameters) receive gradients; those that do not are constants, read when
/// scan is called. Forward hooks of modules called in the step run while tracing, not per step.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "../core/tensor.hpp"

namespace loom {

/// What a step returns: the next carry (same count, shapes and dtypes as the carry it got) and
/// this step's outputs.
struct ScanStepResult {
    std::vector<Tensor> carry;  ///< the next carry
    std::vector<Tensor> y;      ///< this step's outputs, stacked over steps by scan
};

/// step(carry, x_t): x_t holds one slice x[t] of each tensor of xs.
using ScanStep = std::function<ScanStepResult(const std::vector<Tensor>& carry, const std::vector<Tensor>& x)>;

/// Options of scan().
struct ScanOptions {
    /// Run t = T-1 down to 0 (ys are still indexed by t).
    bool reverse = false;
    /// int64 [B], each in [0, T]: row b of every carry and y (their dim 0 is B) runs only while
    /// t < lengths[b]; past that its carry is held and its y is zero.
    Tensor lengths;
    /// false: always the eager loop.
    bool replay = true;
    /// Keep what the step computes for `checkpoint_every` steps at a time instead of for every
    /// step: backward computes each segment's values again from the carries, which are kept for
    /// every step (about one more forward of the loop; the hoisted input projection is kept). It
    /// applies to a replayed scan; the eager loop keeps every op's tensors, and scan says so
    /// when it runs eagerly.
    bool checkpoint = false;
    /// Steps per segment under `checkpoint`; 0: ceil(sqrt(T)).
    std::int64_t checkpoint_every = 0;
};

/// The final carry and the stacked ys ([T, ...] each).
struct ScanOutput {
    std::vector<Tensor> carry;  ///< the carry after the last step
    std::vector<Tensor> ys;     ///< each output of the step, stacked: [T, ...]
    /// Empty when the step was replayed; otherwise why it ran eagerly.
    std::string eager_reason;
};

/// Runs `step` over the first dim of `xs` from `init`; see the file's comment. `params` names
/// tensors the step reads that must receive gradients (any tensor it reads that requires grad
/// does); JAX's lax.scan(f, init, xs) with loom's tape.
ScanOutput scan(const ScanStep& step, const std::vector<Tensor>& init, const std::vector<Tensor>& xs,
                const std::vector<Tensor>& params = {}, const ScanOptions& options = {});

namespace detail {
/// scan() without the eager fallback: the replayed result, or nothing with `why` set.
bool try_replay_scan(const ScanStep& step, const std::vector<Tensor>& init, const std::vector<Tensor>& xs,
                     const std::vector<Tensor>& params, const ScanOptions& options, ScanOutput& out);
/// Prints "loom: scan runs eagerly: <why>" on stderr, once per distinct reason and process.
void say_once_why_eager(const std::string& why);
}  // namespace detail

}  // namespace loom
