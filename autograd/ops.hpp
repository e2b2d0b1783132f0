// The differentiable ops users call. Each is defined once, its backward written right below its forward.
#pragma once
#include <optional>
#include <vector>

#include "../core/tensor.hpp"

// In namespace loom, not loom::autograd: these are the ops users write (loom::tanh, as
// torch::tanh); the tape's own types are in loom::autograd (tape.hpp).
namespace loom {

// ---- elementwise, with NumPy broadcasting ----
Tensor add(const Tensor& a, const Tensor& b);
Tensor sub(const Tensor& a, const Tensor& b);
Tensor mul(const Tensor& a, const Tensor& b);
Tensor div(const Tensor& a, const Tensor& b);
Tensor pow(const Tensor& base, const Tensor& exponent);
Tensor pow(const Tensor& base, double exponent);
Tensor maximum(const Tensor& a, const Tensor& b);  // ties share the gradient equally
Tensor minimum(const Tensor& a, const Tensor& b);
Tensor neg(const Tensor& x);
Tensor exp(const Tensor& x);
Tensor log(const Tensor& x);
Tensor sqrt(const Tensor& x);
Tensor abs(const Tensor& x);
Tensor tanh(const Tensor& x);
Tensor sigmoid(const Tensor& x);
Tensor relu(const Tensor& x);
Tensor clamp(const Tensor& x, std::optional<double> min, std::optional<double> max);
// cond ? a : b elementwise; cond is a bool mask; all three broadcast.
Tensor where(const Tensor& cond, const Tensor& a, const Tensor& b);
Tensor masked_fill(const Tensor& x, const Tensor& mask, double value);

// ---- comparisons and logic: bool masks, not differentiable ----
Tensor eq(const Tensor& a, const Tensor& b);
Tensor ne(const Tensor& a, const Tensor& b);
Tensor lt(const Tensor& a, const Tensor& b);
Tensor le(const Tensor& a, const Tensor& b);
Tensor gt(const Tensor& a, const Tensor& b);
Tensor ge(const Tensor& a, const Tensor& b);
Tensor logical_not(const Tensor& mask);
Tensor logical_and(const Tensor& a, const Tensor& b);
Tensor logical_or(const Tensor& a, const Tensor& b);

// ---- reductions; an empty `dims` means all dims ----
Tensor sum(const Tensor& x, const Shape& dims = {}, bool keepdim = false);
Tensor mean(const Tensor& x, const Shape& dims = {}, bool keepdim = false);
Tensor amax(const Tensor& x, const Shape& dims = {}, bool keepdim = false);  // ties share the gradient
Tensor amin(const Tensor& x, const Shape& dims = {}, bool keepdim = false);
Tensor argmax(const Tensor& x, std::optional<std::int64_t> dim = std::nullopt, bool keepdim = false);
Tensor argmin(const Tensor& x, std::optional<std::int64_t> dim = std::nullopt, bool keepdim = false);
Tensor var(const Tensor& x, const Shape& dims = {}, bool unbiased = true, bool keepdim = false);
Tensor norm(const Tensor& x, double p = 2, const Shape& dims = {}, bool keepdim = false);
Tensor softmax(const Tensor& x, std::int64_t dim);      // stable: shifts by the max
Tensor log_softmax(const Tensor& x, std::int64_t dim);  // stable: log-sum-exp
// softmax over `dim` of the entries where the bool `mask` (broadcast to x) is false: entries
// where it is true get weight exactly 0 and no gradient, e.g. padding in attention. A slice with
// every entry masked is all zeros, not NaN.
Tensor masked_softmax(const Tensor& x, const Tensor& mask, std::int64_t dim);

// ---- shape and indexing ----
Tensor reshape(const Tensor& x, const Shape& shape);
Tensor view(const Tensor& x, const Shape& shape);
Tensor permute(const Tensor& x, const Shape& dims);
Tensor transpose(const Tensor& x, std::int64_t dim0, std::int64_t dim1);
Tensor squeeze(const Tensor& x, std::optional<std::int64_t> dim = std::nullopt);
Tensor unsqueeze(const Tensor& x, std::int64_t dim);
Tensor expand(const Tensor& x, const Shape& shape);
Tensor broadcast_to(const Tensor& x, const Shape& shape);
// Sums x down to `shape`, which must broadcast to x's shape (undoes a broadcast).
Tensor sum_to(const Tensor& x, const Shape& shape);
Tensor narrow(const Tensor& x, std::int64_t dim, std::int64_t start, std::int64_t length);
Tensor slice(const Tensor& x, std::int64_t dim, std::int64_t start, std::int64_t end, std::int64_t step = 1);
Tensor select(const Tensor& x, std::int64_t dim, std::int64_t index);
Tensor index_select(const Tensor& x, std::int64_t dim, const Tensor& index);
Tensor gather(const Tensor& x, std::int64_t dim, const Tensor& index);
Tensor contiguous(const Tensor& x);
Tensor clone(const Tensor& x);
Tensor to(const Tensor& x, DType dtype);
Tensor concat(const std::vector<Tensor>& tensors, std::int64_t dim = 0);
Tensor stack(const std::vector<Tensor>& tensors, std::int64_t dim = 0);
std::vector<Tensor> split(const Tensor& x, std::int64_t split_size, std::int64_t dim = 0);
std::vector<Tensor> chunk(const Tensor& x, std::int64_t chunks, std::int64_t dim = 0);
Tensor one_hot(const Tensor& indices, std::int64_t num_classes, DType dtype = kInt64);

// ---- linear algebra ----
// 1-D, 2-D and batched operands like numpy.matmul; batch dims broadcast.
Tensor matmul(const Tensor& a, const Tensor& b);
// x [..., in] @ weight [out, in]^T + bias [out] (bias may be undefined), as torch's F.linear: a
// dense layer in one op. Its backward adds the weight's and the bias's gradients where the sweep
// sums them (a GEMM with beta = 1), so a weight used at every step costs no extra additions.
Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias = {});

// ---- recurrences ----
// h_t = a_t * h_{t-1} + b_t for every step t of b [T, ...], from h0 (one step's shape; undefined:
// zeros), returning every h_t [T, ...]; with `reverse`, h_t = a_t * h_{t+1} + b_t from the last
// step. a [T, ...] broadcasts to b along its trailing dims (a gate shared over the batch, say).
// The linear recurrence of minGRU, minLSTM and diagonal state-space layers, in one tape entry;
// its backward is the same recurrence run the other way.
Tensor linear_recurrence(const Tensor& a, const Tensor& b, const Tensor& h0 = {}, bool reverse = false);

// ---- operators ----
Tensor operator+(const Tensor& a, const Tensor& b);
Tensor operator-(const Tensor& a, const Tensor& b);
Tensor operator*(const Tensor& a, const Tensor& b);
Tensor operator/(const Tensor& a, const Tensor& b);
Tensor operator-(const Tensor& x);
Tensor operator+(const Tensor& a, double b);
Tensor operator-(const Tensor& a, double b);
Tensor operator*(const Tensor& a, double b);
Tensor operator/(const Tensor& a, double b);
Tensor operator+(double a, const Tensor& b);
Tensor operator-(double a, const Tensor& b);
Tensor operator*(double a, const Tensor& b);
Tensor operator/(double a, const Tensor& b);

}  // namespace loom
