/// \file
/// The differentiable ops users call. Each is defined once, its backward written right below its forward.
#pragma once
#include <optional>
#include <utility>
#include <vector>

#include "../core/tensor.hpp"

/// In namespace loom, not loom::autograd: these are the ops users write (loom::tanh, as
/// torch::tanh); the tape's own types are in loom::autograd (tape.hpp).
namespace loom {

// ---- elementwise, with NumPy broadcasting ----
/// a + b elementwise, broadcast.
Tensor add(const Tensor& a, const Tensor& b);
/// a - b elementwise, broadcast.
Tensor sub(const Tensor& a, const Tensor& b);
/// a * b elementwise, broadcast.
Tensor mul(const Tensor& a, const Tensor& b);
/// a / b elementwise, broadcast.
Tensor div(const Tensor& a, const Tensor& b);
/// base^exponent elementwise, broadcast.
Tensor pow(const Tensor& base, const Tensor& exponent);
/// base^exponent elementwise.
Tensor pow(const Tensor& base, double exponent);
Tensor maximum(const Tensor& a, const Tensor& b);  ///< ties share the gradient equally
/// The smaller of a and b elementwise; ties share the gradient equally.
Tensor minimum(const Tensor& a, const Tensor& b);
/// -x.
Tensor neg(const Tensor& x);
/// e^x.
Tensor exp(const Tensor& x);
/// Natural logarithm.
Tensor log(const Tensor& x);
/// Square root.
Tensor sqrt(const Tensor& x);
/// |x|; its gradient at 0 is 0.
Tensor abs(const Tensor& x);
/// Hyperbolic tangent.
Tensor tanh(const Tensor& x);
/// Logistic sigmoid.
Tensor sigmoid(const Tensor& x);
/// log(1 + e^x), computed without overflow; its derivative is sigmoid(x). As torch's
/// F.softplus with beta 1 (and no threshold: exact everywhere).
Tensor softplus(const Tensor& x);
/// max(x, 0); its gradient at 0 is 0.
Tensor relu(const Tensor& x);
/// x clamped to [min, max]; either bound may be absent. No gradient where x is outside.
Tensor clamp(const Tensor& x, std::optional<double> min, std::optional<double> max);
/// cond ? a : b elementwise; cond is a bool mask; all three broadcast.
Tensor where(const Tensor& cond, const Tensor& a, const Tensor& b);
/// x with `value` where the bool `mask` (broadcast) is true; no gradient there.
Tensor masked_fill(const Tensor& x, const Tensor& mask, double value);

// ---- comparisons and logic: bool masks, not differentiable ----
/// a == b elementwise.
Tensor eq(const Tensor& a, const Tensor& b);
/// a != b elementwise.
Tensor ne(const Tensor& a, const Tensor& b);
/// a < b elementwise.
Tensor lt(const Tensor& a, const Tensor& b);
/// a <= b elementwise.
Tensor le(const Tensor& a, const Tensor& b);
/// a > b elementwise.
Tensor gt(const Tensor& a, const Tensor& b);
/// a >= b elementwise.
Tensor ge(const Tensor& a, const Tensor& b);
/// Elementwise not of a bool mask.
Tensor logical_not(const Tensor& mask);
/// Elementwise and of bool masks.
Tensor logical_and(const Tensor& a, const Tensor& b);
/// Elementwise or of bool masks.
Tensor logical_or(const Tensor& a, const Tensor& b);

// ---- reductions; an empty `dims` means all dims ----
/// Sum over `dims`; x may have at most 64 dims.
Tensor sum(const Tensor& x, const Shape& dims = {}, bool keepdim = false);
/// Mean over `dims`.
Tensor mean(const Tensor& x, const Shape& dims = {}, bool keepdim = false);
Tensor amax(const Tensor& x, const Shape& dims = {}, bool keepdim = false);  ///< ties share the gradient
/// Minimum over `dims`; ties share the gradient.
Tensor amin(const Tensor& x, const Shape& dims = {}, bool keepdim = false);
/// Index of the largest entry along `dim` (flat index when absent), int64.
Tensor argmax(const Tensor& x, std::optional<std::int64_t> dim = std::nullopt, bool keepdim = false);
/// Index of the smallest entry along `dim` (flat index when absent), int64.
Tensor argmin(const Tensor& x, std::optional<std::int64_t> dim = std::nullopt, bool keepdim = false);
/// Variance over `dims`, Bessel-corrected when `unbiased`.
Tensor var(const Tensor& x, const Shape& dims = {}, bool unbiased = true, bool keepdim = false);
/// p-norm over `dims`.
Tensor norm(const Tensor& x, double p = 2, const Shape& dims = {}, bool keepdim = false);
Tensor softmax(const Tensor& x, std::int64_t dim);  ///< stable: shifts by the max
Tensor log_softmax(const Tensor& x, std::int64_t dim);  ///< stable: log-sum-exp
/// softmax over `dim` of the entries where the bool `mask` (broadcast to x) is false: entries
/// where it is true get weight exactly 0 and no gradient, e.g. padding in attention. A slice with
/// every entry masked is all zeros, not NaN.
Tensor masked_softmax(const Tensor& x, const Tensor& mask, std::int64_t dim);

// ---- shape and indexing ----
/// Same elements in a new shape (one -1 is inferred): a view when contiguous, else a copy.
Tensor reshape(const Tensor& x, const Shape& shape);
/// Same elements in a new shape; contiguous tensors only (a view).
Tensor view(const Tensor& x, const Shape& shape);
/// Reorders the dims (a view).
Tensor permute(const Tensor& x, const Shape& dims);
/// Swaps two dims (a view).
Tensor transpose(const Tensor& x, std::int64_t dim0, std::int64_t dim1);
/// Drops `dim` if its size is 1, or every dim of size 1 (a view).
Tensor squeeze(const Tensor& x, std::optional<std::int64_t> dim = std::nullopt);
/// Inserts a dim of size 1 at `dim` (a view).
Tensor unsqueeze(const Tensor& x, std::int64_t dim);
/// Broadcasts size-1 dims to `shape` (a view; -1 keeps a size).
Tensor expand(const Tensor& x, const Shape& shape);
/// x broadcast to `shape` by NumPy's rules (a view).
Tensor broadcast_to(const Tensor& x, const Shape& shape);
/// Sums x down to `shape`, which must broadcast to x's shape (undoes a broadcast).
Tensor sum_to(const Tensor& x, const Shape& shape);
/// sum_to() of a tensor handed over (a gradient in a backward function): returned as it is,
/// without copying the handle, when it already has `shape`.
Tensor sum_to(Tensor&& x, const Shape& shape);
/// `length` entries of `dim` from `start` (a view).
Tensor narrow(const Tensor& x, std::int64_t dim, std::int64_t start, std::int64_t length);
/// Entries start, start+step, ... < end of `dim` (a view).
Tensor slice(const Tensor& x, std::int64_t dim, std::int64_t start, std::int64_t end, std::int64_t step = 1);
/// Entry `index` of `dim`, the dim dropped (a view).
Tensor select(const Tensor& x, std::int64_t dim, std::int64_t index);
/// The entries of `dim` at the int64 `index` (a copy).
Tensor index_select(const Tensor& x, std::int64_t dim, const Tensor& index);
/// Gathers along `dim` at the int64 `index`.
Tensor gather(const Tensor& x, std::int64_t dim, const Tensor& index);
/// x if contiguous, else a contiguous copy.
Tensor contiguous(const Tensor& x);
/// A contiguous copy.
Tensor clone(const Tensor& x);
/// Converted to `dtype`.
Tensor to(const Tensor& x, DType dtype);
/// Joins tensors along an existing dim.
Tensor concat(const std::vector<Tensor>& tensors, std::int64_t dim = 0);
/// Joins tensors along a new dim.
Tensor stack(const std::vector<Tensor>& tensors, std::int64_t dim = 0);
/// Pieces of `split_size` along `dim`, as views.
std::vector<Tensor> split(const Tensor& x, std::int64_t split_size, std::int64_t dim = 0);
/// `chunks` pieces along `dim`, as views.
std::vector<Tensor> chunk(const Tensor& x, std::int64_t chunks, std::int64_t dim = 0);
/// One-hot rows for int64 `indices`: a new last dim of `num_classes`.
Tensor one_hot(const Tensor& indices, std::int64_t num_classes, DType dtype = kInt64);

// ---- linear algebra ----
/// 1-D, 2-D and batched operands like numpy.matmul; batch dims broadcast.
Tensor matmul(const Tensor& a, const Tensor& b);
/// x [..., in] @ weight [out, in]^T + bias [out] (bias may be undefined), as torch's F.linear: a
/// dense layer in one op. Its backward adds the weight's and the bias's gradients where the sweep
/// sums them (a GEMM with beta = 1), so a weight used at every step costs no extra additions.
Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias = {});

// ---- recurrences ----
/// h_t = a_t * h_{t-1} + b_t for every step t of b [T, ...], from h0 (one step's shape; undefined:
/// zeros), returning every h_t [T, ...]; with `reverse`, h_t = a_t * h_{t+1} + b_t from the last
/// step. a [T, ...] broadcasts to b along its trailing dims (a gate shared over the batch, say).
/// The linear recurrence of minGRU, minLSTM and diagonal state-space layers, in one tape entry;
/// its backward is the same recurrence run the other way.
Tensor linear_recurrence(const Tensor& a, const Tensor& b, const Tensor& h0 = {}, bool reverse = false);
/// linear_recurrence in log space for positive coefficients and inputs (Heinsen 2023): from
/// log_a and log_b [T, ...] (and log_h0, one step's shape; undefined: no initial state), returns
/// log h_t = log(exp(log_a_t + log h_{t-1}) + exp(log_b_t)) for every step, so long sequences
/// whose products underflow (minGRU's and minLSTM's gates over thousands of steps) stay finite.
/// Broadcasting, `reverse`, one tape entry and a differentiable backward as linear_recurrence.
Tensor log_linear_recurrence(const Tensor& log_a, const Tensor& log_b, const Tensor& log_h0 = {},
                             bool reverse = false);

/// Mamba's selective scan (Gu & Dao 2023) fused: for u and delta [T, B, E], A [E, N], B and C
/// [T, B, N] and h0 [B, E, N] (undefined: zeros), runs h_t = exp(delta_t A) * h_{t-1} + delta_t
/// B_t u_t per sequence, channel and state, and returns y [T, B, E] with y_t = sum over N of
/// C_t h_t, and h after the last step [B, E, N]. One tape entry that keeps every h_t (one
/// [T, B, E, N] array, where the same written with ops keeps several); its backward is one fused
/// pass the other way, recorded with ops under create_graph.
std::pair<Tensor, Tensor> selective_scan(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                                         const Tensor& C, const Tensor& h0 = {});

// ---- operators ----
/// add(a, b).
Tensor operator+(const Tensor& a, const Tensor& b);
/// sub(a, b).
Tensor operator-(const Tensor& a, const Tensor& b);
/// mul(a, b).
Tensor operator*(const Tensor& a, const Tensor& b);
/// div(a, b).
Tensor operator/(const Tensor& a, const Tensor& b);
/// neg(x).
Tensor operator-(const Tensor& x);
/// a + b for a scalar b.
Tensor operator+(const Tensor& a, double b);
/// a - b for a scalar b.
Tensor operator-(const Tensor& a, double b);
/// a * b for a scalar b.
Tensor operator*(const Tensor& a, double b);
/// a / b for a scalar b.
Tensor operator/(const Tensor& a, double b);
/// a + b for a scalar a.
Tensor operator+(double a, const Tensor& b);
/// a - b for a scalar a.
Tensor operator-(double a, const Tensor& b);
/// a * b for a scalar a.
Tensor operator*(double a, const Tensor& b);
/// a / b for a scalar a.
Tensor operator/(double a, const Tensor& b);

}  // namespace loom
