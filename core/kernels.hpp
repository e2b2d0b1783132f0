/// \file
/// Value-level kernels: they compute, never record. autograd/ wraps them in differentiable ops.
#pragma once
#include <array>
#include <cstdint>
#include <optional>
#include <vector>

#include "parallel.hpp"
#include "tensor.hpp"
#include "tensor_block.hpp"

namespace loom::kernels {

// ---- views: new handles on the same storage ----
/// A view with the given sizes, strides and offset (in elements).
Tensor as_strided(const Tensor& t, Shape shape, Shape strides, std::int64_t offset);
Tensor view(const Tensor& t, const Shape& shape);  ///< contiguous input only; one -1 allowed
Tensor reshape(const Tensor& t, const Shape& shape);  ///< a view when contiguous, else a copy
/// Reordered dims (a view).
Tensor permute(const Tensor& t, const Shape& dims);
/// Size-1 dims broadcast to `shape` (a view).
Tensor expand(const Tensor& t, const Shape& shape);
/// Entries start, start+step, ... < end of `dim` (a view).
Tensor slice(const Tensor& t, std::int64_t dim, std::int64_t start, std::int64_t end, std::int64_t step);
/// Entry `index` of `dim`, the dim dropped (a view).
Tensor select(const Tensor& t, std::int64_t dim, std::int64_t index);
/// A size-1 dim inserted at `dim` (a view).
Tensor unsqueeze(const Tensor& t, std::int64_t dim);
/// `dim` (or every size-1 dim) dropped (a view).
Tensor squeeze(const Tensor& t, std::optional<std::int64_t> dim);
Tensor alias(const Tensor& t);  ///< same view, no autograd node
/// `shape` with its one -1 resolved for `numel` elements; errors name `op`.
Shape infer_shape(std::string_view op, const Shape& shape, std::int64_t numel);

// ---- copies ----
void copy_into(const Tensor& dst, const Tensor& src);  ///< src broadcasts to dst; converts dtype
/// add_into for any layouts, with the checks.
void add_into_strided(const Tensor& dst, const Tensor& src);
/// dst += src, same shape and floating dtype. Inline where both are contiguous of one shape and
/// dtype, a sweep's usual sum: for a 14-element gradient, the general kernel's checks and
/// dispatch cost about 40 instructions a call, as much as the add itself.
[[gnu::always_inline]] inline void add_into(const Tensor& dst, const Tensor& src)
{
    const DType dtype = dst.dtype();
    if (src.dtype() == dtype && dst.is_contiguous() && src.is_contiguous() && dst.sizes() == src.sizes()) {
        const auto add = [&]<class T>() {  // both of dtype T, tested above
            T* d = dst.unsafe_data<T>();
            const T* s = src.unsafe_data<T>();
            for (std::int64_t i = 0, n = dst.numel(); i < n; ++i) d[i] += s[i];
        };
        if (dtype == kFloat64) return add.template operator()<double>();
        if (dtype == kFloat32) return add.template operator()<float>();
    }
    add_into_strided(dst, src);
}
Tensor contiguous(const Tensor& t);  ///< t itself when already contiguous
/// Whether t's elements fill one block of storage without gaps or overlaps, its dims in some
/// order: a contiguous tensor, or a permutation of one such as a transposed matrix.
bool is_dense(const Tensor& t);
/// A copy laid out like t when t is dense (a transposed gradient stays transposed, so adding more
/// of the same layout into it is a linear pass), a contiguous copy otherwise.
Tensor clone_keeping_layout(const Tensor& t);
/// A contiguous copy.
Tensor clone(const Tensor& t);
Tensor to(const Tensor& t, DType dtype);  ///< t itself when the dtype already matches

// ---- reductions; dims empty = all ----
/// Sum over `dims`.
Tensor sum(const Tensor& t, const Shape& dims, bool keepdim);
/// Maximum over `dims`.
Tensor amax(const Tensor& t, const Shape& dims, bool keepdim);
/// Minimum over `dims`.
Tensor amin(const Tensor& t, const Shape& dims, bool keepdim);
/// Index of the maximum along `dim` (flat when absent).
Tensor argmax(const Tensor& t, std::optional<std::int64_t> dim, bool keepdim);
/// Index of the minimum along `dim` (flat when absent).
Tensor argmin(const Tensor& t, std::optional<std::int64_t> dim, bool keepdim);
/// Sums `t` down to `shape`, undoing a broadcast.
Tensor sum_to(const Tensor& t, const Shape& shape);

// ---- indexing ----
/// Rows of `dim` at int64 `index`.
Tensor index_select(const Tensor& t, std::int64_t dim, const Tensor& index);
/// dst's rows of `dim` at `index` += src.
void index_add_into(const Tensor& dst, std::int64_t dim, const Tensor& index, const Tensor& src);
/// Gathers along `dim` at `index`.
Tensor gather(const Tensor& t, std::int64_t dim, const Tensor& index);
/// dst at `index` along `dim` += src.
void scatter_add_into(const Tensor& dst, std::int64_t dim, const Tensor& index, const Tensor& src);
/// Joins along `dim`.
Tensor concat(const std::vector<Tensor>& tensors, std::int64_t dim);
/// One-hot rows of int64 indices.
Tensor one_hot(const Tensor& indices, std::int64_t num_classes, DType dtype);

// ---- linear algebra ----
/// a [..., n, k] @ b [..., k, m] -> [..., n, m], batch dims equal. Strided operands go to BLAS as they are.
Tensor bmm(const Tensor& a, const Tensor& b);
/// out [n, m] = a [n, k] @ b [k, m] + beta * out, for 2-D operands (strided or transposed views
/// are read as they are) and a contiguous out: with beta = 1 a product is added where it lands.
void matmul_into(const Tensor& out, const Tensor& a, const Tensor& b, double beta);
/// out [m] += the sum of the rows of rows [n, m]; both contiguous, same floating dtype.
void add_column_sums(const Tensor& out, const Tensor& rows);

/// Raw-pointer forms for fused kernels (the recurrent layers), float or double; nothing above
/// core/ calls BLAS itself. C [M, N] = op(A) op(B) + beta * C, all row-major and contiguous, op
/// transposing where asked; `op` names the error when a size exceeds BLAS's int.
template <class T>
void gemm(std::string_view op, bool trans_a, bool trans_b, std::int64_t M, std::int64_t N, std::int64_t K, const T* A,
          const T* B, T beta, T* C);
/// out [width] += the sum of the rows of rows [n, width].
template <class T> void add_column_sums(const T* rows, std::int64_t n, std::int64_t width, T* out);
/// A product M * N * K at most this is too small for BLAS to pay for its call and for repacking
/// its operands (a recurrent step at B = 1, H = 32, where packing took a third of the time):
/// small_gemm or small_gemm_nt runs it, in matmul_into (matmul, linear) as in the fused layers.
constexpr std::int64_t kSmallProduct = std::int64_t(1) << 16;
/// C [M, N] = A [M, K] B [K, N] (+ C when `accumulate`), all row-major and contiguous, as plain
/// loops that vectorise: blocks of 32 columns (then 16, then 8) are summed in registers over all
/// of K.
template <class T>
void small_gemm(std::int64_t M, std::int64_t N, std::int64_t K, const T* A, const T* B, T* C, bool accumulate = false);
/// C [M, N] = A [M, K] B^T (+ C when `accumulate`) for B [N, K] (a linear layer's weight), all
/// row-major and contiguous: each element one dot product, summed in eight interleaved partial
/// sums so that the loop vectorises.
template <class T>
void small_gemm_nt(std::int64_t M, std::int64_t N, std::int64_t K, const T* A, const T* B, T* C, bool accumulate = false);

// ---- elementwise machinery ----

/// Visits every index of `shape` in row-major order, handing `f` the element offset of each operand.
template <std::size_t N, class F>
void for_each_offset(const Shape& shape, const std::array<const std::int64_t*, N>& strides,
                     std::array<std::int64_t, N> offsets, F&& f)
{
    const auto nd = static_cast<std::int64_t>(shape.size());
    for (auto s : shape)
        if (s == 0) return;
    if (nd == 0) {
        f(offsets);
        return;
    }
    std::vector<std::int64_t> index(static_cast<std::size_t>(nd), 0);
    const std::int64_t inner = shape[nd - 1];
    std::array<std::int64_t, N> inner_stride;
    for (std::size_t k = 0; k < N; ++k) inner_stride[k] = strides[k][nd - 1];
    while (true) {
        auto o = offsets;
        for (std::int64_t i = 0; i < inner; ++i) {
            f(o);
            for (std::size_t k = 0; k < N; ++k) o[k] += inner_stride[k];
        }
        std::int64_t d = nd - 2;
        for (; d >= 0; --d) {
            for (std::size_t k = 0; k < N; ++k) offsets[k] += strides[k][d];
            if (++index[d] < shape[d]) break;
            for (std::size_t k = 0; k < N; ++k) offsets[k] -= strides[k][d] * shape[d];
            index[d] = 0;
        }
        if (d < 0) return;
    }
}

/// Strides of `t` seen through a broadcast to `shape` (0 where t is broadcast).
Shape broadcast_strides(const Tensor& t, const Shape& shape);

/// Whether every element of t is one value in memory (each stride 0 or its size 1): a
/// scalar seen through expand().
inline bool all_strides_zero(const Tensor& t)
{
    const TensorImpl& impl = t.impl();
    for (std::int64_t d = 0; d < t.dim(); ++d)
        if (impl.shape[d] != 1 && impl.stride(d) != 0) return false;
    return true;
}

/// o[i] = f(x[i]) for i < n, where o is a new tensor's bytes: restrict tells the compiler so,
/// which spares a vector loop its overlap checks (see zip_contiguous).
template <class R, class T, class F>
[[gnu::always_inline]] inline void map_contiguous(R* __restrict o, const T* x, std::int64_t n, F& f)
{
    for (std::int64_t i = 0; i < n; ++i) o[i] = f(x[i]);
}

/// out[i] = f(x[i]) for T = x's C++ type, which the caller checked; the result dtype follows
/// f's return type.
template <class T, class F> Tensor map_typed(const Tensor& x, F&& f)
{
    using R = decltype(f(T{}));
    const bool contiguous = x.is_contiguous();
    const std::int64_t n = x.numel();
    R* o;
    Tensor out = contiguous ? detail::new_contiguous_like<R>(x, n, o) : empty(x.sizes(), dtype_of<R>());
    if (!contiguous) o = out.data_ptr<R>();
    const T* in = x.unsafe_data<T>();
    if (contiguous) {
        // Captured by value: see zip_typed.
        over_elements(n, [o, in, &f](std::int64_t i0, std::int64_t i1) { map_contiguous(o + i0, in + i0, i1 - i0, f); });
    } else {
        const Shape out_strides = contiguous_strides(x.sizes());
        for_each_offset<2>(x.sizes(), {x.strides().data(), out_strides.data()}, {0, 0},
                           [&](const auto& off) { o[off[1]] = f(in[off[0]]); });
    }
    return out;
}

/// out = f(x) elementwise over float32/float64 tensors.
template <class F> Tensor map_floating(std::string_view op, const Tensor& x, F&& f)
{
    return dispatch_floating(op, x.dtype(), [&]<class T>() { return map_typed<T>(x, f); });
}

/// out = f(x) elementwise over float32/float64/int64 tensors.
template <class F> Tensor map_numeric(std::string_view op, const Tensor& x, F&& f)
{
    return dispatch_numeric(op, x.dtype(), [&]<class T>() { return map_typed<T>(x, f); });
}

/// check_same_dtype's failure, out of line.
[[noreturn, gnu::cold]] void fail_dtypes_differ(std::string_view op, const Tensor& a, const Tensor& b);
/// Throws loom::Error naming `op` unless a and b have the same dtype. Inline: every binary op
/// asks it.
inline void check_same_dtype(std::string_view op, const Tensor& a, const Tensor& b)
{
    if (a.dtype() != b.dtype()) [[unlikely]]
        fail_dtypes_differ(op, a, b);
}

/// f(a, b) for same-shaped a and b where one is contiguous and the other one value seen through
/// a broadcast (a loss's gradient, spread over its input): the value read once, the elements
/// split as over_elements splits them. Undefined when neither is such a value. Out of line: a
/// rare case kept out of every small op's inlined code.
template <class T, class F> [[gnu::noinline]] Tensor zip_spread(const Tensor& a, const Tensor& b, F& f)
{
    using R = decltype(f(T{}, T{}));
    const bool b_spread = a.is_contiguous() && all_strides_zero(b);
    if (!b_spread && !(b.is_contiguous() && all_strides_zero(a))) return Tensor();
    const T* pa = a.data_ptr<T>();
    const T* pb = b.data_ptr<T>();
    Tensor out = detail::empty_like_contiguous(b_spread ? a : b, dtype_of<R>());
    R* o = out.data_ptr<R>();
    over_elements(out.numel(), [&](std::int64_t i0, std::int64_t i1) {
        if (b_spread)
            for (std::int64_t i = i0; i < i1; ++i) o[i] = f(pa[i], *pb);
        else
            for (std::int64_t i = i0; i < i1; ++i) o[i] = f(*pa, pb[i]);
    });
    return out;
}

/// f(a, b) broadcast to their common shape: zip_typed's general case, out of line so that the
/// contiguous case stays small enough to inline into each op.
template <class T, class F>
[[gnu::noinline]] Tensor zip_broadcast(std::string_view op, const Tensor& a, const Tensor& b, F& f)
{
    using R = decltype(f(T{}, T{}));
    const T* pa = a.data_ptr<T>();
    const T* pb = b.data_ptr<T>();
    const Shape shape = broadcast_shapes(op, a.sizes(), b.sizes());
    Tensor out = empty(shape, dtype_of<R>());
    R* o = out.data_ptr<R>();
    const Shape sa = broadcast_strides(a, shape), sb = broadcast_strides(b, shape);
    for (auto s : shape)
        if (s == 0) return out;
    // The dims walked as one: size-1 dims dropped, and a dim merged into the block inside it
    // wherever both operands step over that block in one stride (the output, contiguous,
    // always does), innermost first. [T, B, H] + [H] becomes [T·B, H]; the inner loop is then as
    // long as it can be, and a broadcast or contiguous operand in it is a plain vector loop.
    SmallVector<std::int64_t, 6> size, stride_a, stride_b;
    for (std::int64_t d = static_cast<std::int64_t>(shape.size()) - 1; d >= 0; --d) {
        if (shape[d] == 1) continue;
        if (!size.empty() && sa[d] == stride_a.back() * size.back() && sb[d] == stride_b.back() * size.back()) {
            size.back() *= shape[d];
            continue;
        }
        size.push_back(shape[d]);
        stride_a.push_back(sa[d]);
        stride_b.push_back(sb[d]);
    }
    if (size.empty()) {
        *o = f(*pa, *pb);
        return out;
    }
    const std::int64_t n = size[0], ia = stride_a[0], ib = stride_b[0];
    const std::size_t outer = size.size() - 1;
    SmallVector<std::int64_t, 6> index(outer, 0);
    std::int64_t offset_a = 0, offset_b = 0;
    for (R* row = o;; row += n) {
        const T *x = pa + offset_a, *y = pb + offset_b;
        if (ia == 1 && ib == 1) {
            for (std::int64_t i = 0; i < n; ++i) row[i] = f(x[i], y[i]);
        } else if (ia == 0 && ib == 1) {
            const T v = *x;
            for (std::int64_t i = 0; i < n; ++i) row[i] = f(v, y[i]);
        } else if (ia == 1 && ib == 0) {
            const T v = *y;
            for (std::int64_t i = 0; i < n; ++i) row[i] = f(x[i], v);
        } else {
            for (std::int64_t i = 0; i < n; ++i) row[i] = f(x[i * ia], y[i * ib]);
        }
        std::size_t k = 0;
        for (; k < outer; ++k) {
            offset_a += stride_a[k + 1];
            offset_b += stride_b[k + 1];
            if (++index[k] < size[k + 1]) break;
            offset_a -= stride_a[k + 1] * size[k + 1];
            offset_b -= stride_b[k + 1] * size[k + 1];
            index[k] = 0;
        }
        if (k == outer) return out;
    }
}

/// o[i] = f(a[i], b[i]) for i < n, where o is a new tensor's bytes: restrict tells the compiler
/// so, which spares the vector loop its overlap checks (15 of the ~320 instructions of an add of
/// 14 floats with no grad).
template <class R, class T, class F>
[[gnu::always_inline]] inline void zip_contiguous(R* __restrict o, const T* a, const T* b, std::int64_t n, F& f)
{
    for (std::int64_t i = 0; i < n; ++i) o[i] = f(a[i], b[i]);
}

/// out = f(a, b) with broadcasting, for T = the operands' C++ type, which the caller checked both
/// are (zip_floating and the others below); `op` names the call in errors.
template <class T, class F> Tensor zip_typed(std::string_view op, const Tensor& a, const Tensor& b, F&& f)
{
    using R = decltype(f(T{}, T{}));
    const T* pa = a.unsafe_data<T>();
    const T* pb = b.unsafe_data<T>();
    // Equal shapes, or tensor op scalar (as long as the scalar adds no dims): no broadcasting.
    const bool same_shape = a.sizes() == b.sizes();
    if ((same_shape || (b.numel() == 1 && b.dim() <= a.dim())) && a.is_contiguous() && b.is_contiguous()) {
        const std::int64_t n = a.numel();
        R* o;
        Tensor out = detail::new_contiguous_like<R>(a, n, o);
        // The pointers captured by value: captured by reference, they would be locals whose
        // address escapes to the threaded path, stored to the stack on every small op.
        over_elements(n, [o, pa, pb, same_shape, &f](std::int64_t i0, std::int64_t i1) {
            if (same_shape) return zip_contiguous(o + i0, pa + i0, pb + i0, i1 - i0, f);
            const T scalar = *pb;
            const auto with_scalar = [&](T x) { return f(x, scalar); };
            map_contiguous(o + i0, pa + i0, i1 - i0, with_scalar);
        });
        return out;
    }
    if (same_shape && (a.is_contiguous() || b.is_contiguous()))
        if (Tensor out = zip_spread<T>(a, b, f); out.defined()) return out;
    return zip_broadcast<T>(op, a, b, f);
}

/// out = f(a, b) with broadcasting; both operands must have the same dtype.
template <class F> Tensor zip_floating(std::string_view op, const Tensor& a, const Tensor& b, F&& f)
{
    check_same_dtype(op, a, b);
    return dispatch_floating(op, a.dtype(), [&]<class T>() { return zip_typed<T>(op, a, b, f); });
}
/// An elementwise op of two broadcast tensors of the same int or float dtype.
template <class F> Tensor zip_numeric(std::string_view op, const Tensor& a, const Tensor& b, F&& f)
{
    check_same_dtype(op, a, b);
    return dispatch_numeric(op, a.dtype(), [&]<class T>() { return zip_typed<T>(op, a, b, f); });
}
/// An elementwise op of two broadcast tensors of the same dtype, any dtype.
template <class F> Tensor zip_any(std::string_view op, const Tensor& a, const Tensor& b, F&& f)
{
    check_same_dtype(op, a, b);
    return dispatch(a.dtype(), [&]<class T>() { return zip_typed<T>(op, a, b, f); });
}

}  // namespace loom::kernels
