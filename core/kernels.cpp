#include "kernels.hpp"

#include "allocator.hpp"
#include "math.hpp"

#include <cblas.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <limits>
#include <numeric>

namespace loom::kernels {

namespace {
// Runs block(b) for every b in [0, blocks) on the threads there are, each summing into a
// partial of its own, then fold(b) for each in order: a sum split so is the same on any number of
// threads (a sum of many elements, a bias's gradient over many rows).
template <class Block, class Fold> void blocks_then_folded_in_order(std::int64_t blocks, const Block& block, const Fold& fold)
{
    over_blocks(blocks, std::min<std::int64_t>(get_num_threads(), blocks), [&](std::int64_t b0, std::int64_t b1) {
        for (std::int64_t b = b0; b < b1; ++b) block(b);
    });
    for (std::int64_t b = 0; b < blocks; ++b) fold(b);
}
}  // namespace

// ---- views ----

Tensor as_strided(const Tensor& t, Shape shape, Shape strides, std::int64_t offset)
{
    TensorHandle handle = detail::new_tensor_header();
    TensorImpl* impl = handle.get();
    impl->storage = shared_storage(t);
    impl->set_layout(std::move(shape), std::move(strides));
    impl->dtype = t.dtype();
    impl->set_storage_offset(offset);
    return Tensor(std::move(handle));
}

Tensor alias(const Tensor& t) { return as_strided(t, t.sizes(), t.strides(), t.storage_offset()); }

Shape infer_shape(std::string_view op, const Shape& shape, std::int64_t numel)
{
    Shape out = shape;
    std::int64_t known = 1, infer_at = -1;
    for (std::size_t i = 0; i < out.size(); ++i) {
        if (out[i] == -1) {
            LOOM_CHECK(infer_at < 0, op, "only one dimension can be -1, got {}", shape);
            infer_at = static_cast<std::int64_t>(i);
        } else {
            LOOM_CHECK(out[i] >= 0, op, "invalid dimension {} in shape {}", out[i], shape);
            LOOM_CHECK(!__builtin_mul_overflow(known, out[i], &known), op, "shape {} has more than 2^63 - 1 elements",
                       shape);
        }
    }
    if (infer_at >= 0) {
        LOOM_CHECK(known != 0 && numel % known == 0, op, "cannot infer -1 in shape {} for {} elements", shape, numel);
        out[infer_at] = numel / known;
    }
    const std::int64_t count = checked_numel(op, out);
    LOOM_CHECK(count == numel, op, "cannot reshape a tensor of {} elements to shape {} ({} elements)", numel, shape,
               count);
    return out;
}

Tensor view(const Tensor& t, const Shape& shape)
{
    Shape out = infer_shape("view", shape, t.numel());
    LOOM_CHECK(t.is_contiguous(), "view", "needs a contiguous tensor (shape {}, strides {}); use reshape()",
               t.sizes(), t.strides());
    return as_strided(t, out, contiguous_strides(out), t.storage_offset());
}

Tensor reshape(const Tensor& t, const Shape& shape)
{
    infer_shape("reshape", shape, t.numel());
    return view(t.is_contiguous() ? t : clone(t), shape);
}

Tensor permute(const Tensor& t, const Shape& dims)
{
    const auto nd = t.dim();
    LOOM_CHECK(static_cast<std::int64_t>(dims.size()) == nd, "permute",
               "expects {} dims for a tensor of shape {}, got {}", nd, t.sizes(), dims);
    Shape shape(nd), strides(nd);
    SmallVector<bool, 8> seen(static_cast<std::size_t>(nd), false);  // inline: no allocation per call
    for (std::int64_t i = 0; i < nd; ++i) {
        const auto d = wrap_dim("permute", dims[i], nd);
        LOOM_CHECK(!seen[d], "permute", "dim {} repeats in {}", d, dims);
        seen[d] = true;
        shape[i] = t.sizes()[d];
        strides[i] = t.impl().stride(d);
    }
    return as_strided(t, shape, strides, t.storage_offset());
}

Shape broadcast_strides(const Tensor& t, const Shape& shape)
{
    const std::size_t lead = shape.size() - t.sizes().size();
    Shape strides(shape.size(), 0);
    for (std::size_t i = 0; i < t.sizes().size(); ++i)
        strides[lead + i] = t.sizes()[i] == 1 && shape[lead + i] != 1 ? 0 : t.impl().stride(i);
    return strides;
}

Tensor expand(const Tensor& t, const Shape& shape)
{
    LOOM_CHECK(shape.size() >= t.sizes().size(), "expand", "cannot expand shape {} to fewer dims {}", t.sizes(),
               shape);
    Shape target = shape;
    const std::size_t lead = shape.size() - t.sizes().size();
    for (std::size_t i = 0; i < target.size(); ++i) {
        if (i >= lead && target[i] == -1) target[i] = t.sizes()[i - lead];
        LOOM_CHECK(target[i] >= 0, "expand", "cannot expand shape {} to {}: size {} at dim {} is negative{}",
                   t.sizes(), shape, target[i], i, i < lead && target[i] == -1 ? " (-1 keeps a size only in dims the "
                                                                                 "tensor has)" : "");
        const std::int64_t have = i < lead ? 1 : t.sizes()[i - lead];
        LOOM_CHECK(have == target[i] || have == 1, "expand", "cannot expand shape {} to {} (dim {}: {} vs {})",
                   t.sizes(), shape, i, have, target[i]);
    }
    checked_numel("expand", target);
    return as_strided(t, target, broadcast_strides(t, target), t.storage_offset());
}

Tensor slice(const Tensor& t, std::int64_t dim, std::int64_t start, std::int64_t end, std::int64_t step)
{
    dim = wrap_indexed_dim("slice", dim, t.dim());
    LOOM_CHECK(step > 0, "slice", "expects a positive step, got {}", step);
    const std::int64_t n = t.sizes()[dim];
    if (start < 0) start += n;  // no overflow: start < 0 <= n
    if (end < 0) end += n;
    start = std::clamp<std::int64_t>(start, 0, n);
    end = std::clamp<std::int64_t>(end, start, n);
    Shape shape = t.sizes(), strides = t.strides();
    shape[dim] = end == start ? 0 : (end - start - 1) / step + 1;  // ceil without overflow for any step
    if (shape[dim] > 1) strides[dim] *= step;  // then step < n: no overflow; a single element needs no stride
    // An empty result reaches no element: its offset stays put (start * stride might not fit).
    const bool empty_result = std::find(shape.begin(), shape.end(), 0) != shape.end();
    return as_strided(t, shape, strides, t.storage_offset() + (empty_result ? 0 : start * t.impl().stride(dim)));
}

Tensor select(const Tensor& t, std::int64_t dim, std::int64_t index)
{
    LOOM_CHECK(t.dim() > 0, "select", "cannot select from a 0-d tensor");
    dim = wrap_indexed_dim("select", dim, t.dim());
    const std::int64_t n = t.sizes()[dim];
    LOOM_CHECK(index >= -n && index < n, "select", "index {} is out of range for dim {} of size {} (shape {})", index,
               dim, n, t.sizes());
    if (index < 0) index += n;
    Shape shape = t.sizes(), strides = t.strides();
    shape.erase(shape.begin() + dim);
    strides.erase(strides.begin() + dim);
    const bool empty_result = std::find(shape.begin(), shape.end(), 0) != shape.end();
    return as_strided(t, shape, strides, t.storage_offset() + (empty_result ? 0 : index * t.impl().stride(dim)));
}

Tensor unsqueeze(const Tensor& t, std::int64_t dim)
{
    dim = wrap_dim("unsqueeze", dim, t.dim() + 1);
    Shape shape = t.sizes(), strides = t.strides();
    // The new dim has size 1, so its stride is never used to step; any value that fits will do.
    std::int64_t stride = 1;
    if (dim < t.dim() && __builtin_mul_overflow(t.impl().stride(dim), t.sizes()[dim], &stride)) stride = 1;
    shape.insert(shape.begin() + dim, 1);
    strides.insert(strides.begin() + dim, stride);
    return as_strided(t, shape, strides, t.storage_offset());
}

Tensor squeeze(const Tensor& t, std::optional<std::int64_t> dim)
{
    Shape shape, strides;
    const std::int64_t only = dim ? wrap_dim("squeeze", *dim, t.dim()) : -1;
    for (std::int64_t i = 0; i < t.dim(); ++i) {
        const bool drop = t.sizes()[i] == 1 && (only < 0 || i == only);
        if (!drop) {
            shape.push_back(t.sizes()[i]);
            strides.push_back(t.impl().stride(i));
        }
    }
    return as_strided(t, shape, strides, t.storage_offset());
}

// ---- copies ----

namespace {
// Whether src, broadcast to `shape`, is src's elements repeated over shape's leading dims: src's
// sizes, past its leading 1s, are shape's last dims.
bool repeats_over_leading_dims(const Tensor& src, const Shape& shape)
{
    std::int64_t first = 0;
    while (first < src.dim() && src.sizes()[first] == 1) ++first;
    const std::int64_t kept = src.dim() - first, lead = static_cast<std::int64_t>(shape.size()) - kept;
    if (lead < 0) return false;
    for (std::int64_t d = 0; d < kept; ++d)
        if (src.sizes()[first + d] != shape[lead + d]) return false;
    return true;
}
}  // namespace

void copy_into(const Tensor& dst, const Tensor& src)
{
    LOOM_CHECK(src.dim() <= dst.dim() && broadcast_shapes("copy_", src.sizes(), dst.sizes()) == dst.sizes(),
               "copy_", "source of shape {} does not broadcast to destination shape {}", src.sizes(), dst.sizes());
    const Shape ss = broadcast_strides(src, dst.sizes());
    dispatch(dst.dtype(), [&]<class D>() {
        dispatch(src.dtype(), [&]<class S>() {
            D* d = dst.data_ptr<D>();
            const S* s = src.data_ptr<S>();
            if (dst.is_contiguous() && src.is_contiguous() && src.sizes() == dst.sizes()) {
                over_elements(dst.numel(), [&](std::int64_t i0, std::int64_t i1) {
                    for (std::int64_t i = i0; i < i1; ++i) d[i] = convert_value<D>("convert", s[i]);
                });
                return;
            }
            // A contiguous source repeated over the destination's leading dims (a bias over a
            // batch): copied row by row.
            if (const std::int64_t width = src.numel(); dst.is_contiguous() && src.is_contiguous() && width > 0 &&
                                                        repeats_over_leading_dims(src, dst.sizes())) {
                over_rows(dst.numel() / width, width, [&](std::int64_t r0, std::int64_t r1) {
                    for (std::int64_t r = r0; r < r1; ++r)
                        for (std::int64_t j = 0; j < width; ++j) d[r * width + j] = convert_value<D>("convert", s[j]);
                });
                return;
            }
            for_each_offset<2>(dst.sizes(), {dst.strides().data(), ss.data()}, {0, 0},
                               [&](const auto& o) { d[o[0]] = convert_value<D>("convert", s[o[1]]); });
        });
    });
}

bool is_dense(const Tensor& t)
{
    SmallVector<std::pair<std::int64_t, std::int64_t>, 6> dims;  // (stride, size) of each dim that steps
    for (std::int64_t i = 0; i < t.dim(); ++i) {
        if (t.sizes()[i] == 0) return true;
        if (t.sizes()[i] > 1) dims.push_back({t.impl().stride(i), t.sizes()[i]});
    }
    std::sort(dims.begin(), dims.end());
    std::int64_t expected = 1;
    for (const auto& [stride, size] : dims) {
        if (stride != expected) return false;
        expected *= size;
    }
    return true;
}

Tensor clone_keeping_layout(const Tensor& t)
{
    if (t.is_contiguous() || !is_dense(t)) return clone(t);
    Tensor block = empty({t.numel()}, t.dtype());
    dispatch(t.dtype(), [&]<class T>() { std::copy_n(t.data_ptr<T>(), t.numel(), block.data_ptr<T>()); });
    return as_strided(block, t.sizes(), t.strides(), 0);
}

void add_into_strided(const Tensor& dst, const Tensor& src)
{
    check_same_dtype("accumulate gradient", dst, src);
    LOOM_CHECK(src.sizes() == dst.sizes(), "accumulate gradient", "internal: shapes {} and {} differ", src.sizes(),
               dst.sizes());
    dispatch_floating("accumulate gradient", dst.dtype(), [&]<class T>() {
        T* d = dst.data_ptr<T>();
        const T* s = src.data_ptr<T>();
        // Both laid out alike in one block each (contiguous, or both transposed): element i of
        // one block matches element i of the other.
        if ((dst.is_contiguous() && src.is_contiguous()) || (dst.strides() == src.strides() && is_dense(dst))) {
            const std::int64_t n = dst.numel();
            for (std::int64_t i = 0; i < n; ++i) d[i] += s[i];
            return;
        }
        for_each_offset<2>(dst.sizes(), {dst.strides().data(), src.strides().data()}, {0, 0},
                           [&](const auto& o) { d[o[0]] += s[o[1]]; });
    });
}

Tensor clone(const Tensor& t)
{
    Tensor out = empty(t.sizes(), t.dtype());
    copy_into(out, t);
    return out;
}

Tensor contiguous(const Tensor& t) { return t.is_contiguous() ? t : clone(t); }

Tensor to(const Tensor& t, DType dtype)
{
    if (t.dtype() == dtype) return t;
    Tensor out = empty(t.sizes(), dtype);
    copy_into(out, t);
    return out;
}

// ---- reductions ----

namespace {

struct Reduction {
    Tensor input;      // contiguous, reduced dims moved last
    Shape out_shape;   // kept dims (keepdim: reduced dims as 1)
    std::int64_t outer = 1, inner = 1;
};

Reduction prepare(std::string_view op, const Tensor& t, const Shape& dims_in, bool keepdim)
{
    const auto nd = t.dim();
    // Inline: a std::vector<bool> here was a malloc and a free per reduction.
    SmallVector<bool, 8> reduced(static_cast<std::size_t>(std::max<std::int64_t>(nd, 0)), dims_in.empty());
    for (auto d : dims_in) {
        const auto w = wrap_dim(op, d, nd);
        if (nd == 0) continue;
        LOOM_CHECK(!reduced[w], op, "dim {} repeats in {}", w, dims_in);
        reduced[w] = true;
    }
    Shape order, out_shape;
    Reduction r;
    for (std::int64_t i = 0; i < nd; ++i)
        if (!reduced[i]) {
            order.push_back(i);
            out_shape.push_back(t.sizes()[i]);
            LOOM_CHECK(!__builtin_mul_overflow(r.outer, t.sizes()[i], &r.outer), op,
                       "the result of reducing shape {} would have more than 2^63 - 1 elements", t.sizes());
        } else if (keepdim) {
            out_shape.push_back(1);
        }
    for (std::int64_t i = 0; i < nd; ++i)
        if (reduced[i]) {
            order.push_back(i);
            // Saturates: it can only overflow when another dim is 0, and then nothing is read.
            if (__builtin_mul_overflow(r.inner, t.sizes()[i], &r.inner)) r.inner = INT64_MAX;
        }
    // Reduced dims already last (a sum over all of them, or the trailing ones): no view to make
    // of them first, which cost more than summing a small tensor.
    bool in_order = true;
    for (std::size_t i = 0; i < order.size(); ++i) in_order = in_order && order[i] == static_cast<std::int64_t>(i);
    r.input = contiguous(in_order ? t : permute(t, order));
    r.out_shape = std::move(out_shape);
    return r;
}

// acc = combine(acc, x) over each reduced block, written as Out.
template <class F>
Tensor reduce(std::string_view op, const Tensor& t, const Shape& dims, bool keepdim, DType out_dtype, F&& combine,
              bool needs_elements)
{
    Reduction r = prepare(op, t, dims, keepdim);
    LOOM_CHECK(!needs_elements || r.inner > 0, op, "cannot reduce over an empty dimension (shape {})", t.sizes());
    Tensor out = empty(r.out_shape, out_dtype);
    dispatch(t.dtype(), [&]<class T>() {
        dispatch(out_dtype, [&]<class O>() {
            const T* in = r.input.data_ptr<T>();
            O* o = out.data_ptr<O>();
            for (std::int64_t i = 0; i < r.outer; ++i) o[i] = static_cast<O>(combine(in + i * r.inner, r.inner));
        });
    });
    return out;
}

// Whether a beats b as the maximum (Max) or the minimum: NaN beats every number, both ways,
// so max, min, argmax and argmin all propagate NaN (and find the first one), as PyTorch does.
template <bool Max, class T> bool beats(T a, T b)
{
    if constexpr (std::is_floating_point_v<T>)
        if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && !std::isnan(b);
    return Max ? a > b : a < b;
}

template <bool Max> Tensor extreme(std::string_view op, const Tensor& t, const Shape& dims, bool keepdim)
{
    check_numeric(op, t.dtype());
    return reduce(op, t, dims, keepdim, t.dtype(), [](const auto* p, std::int64_t n) {
        auto best = p[0];
        for (std::int64_t j = 1; j < n; ++j)
            if (beats<Max>(p[j], best)) best = p[j];
        return best;
    }, true);
}

template <bool Max> Tensor arg_extreme(std::string_view op, const Tensor& t, std::optional<std::int64_t> dim, bool keepdim)
{
    check_numeric(op, t.dtype());
    Tensor src = dim ? t : reshape(t, {-1});
    Shape dims = {dim ? *dim : 0};
    if (src.dim() == 0) src = reshape(src, {1});
    Tensor out = reduce(op, src, dims, keepdim && dim.has_value(), kInt64, [](const auto* p, std::int64_t n) {
        std::int64_t best = 0;
        for (std::int64_t j = 1; j < n; ++j)
            if (beats<Max>(p[j], p[best])) best = j;
        return best;
    }, true);
    return out;
}

}  // namespace

Tensor sum(const Tensor& t, const Shape& dims, bool keepdim)
{
    const DType out_dtype = t.dtype() == kBool ? kInt64 : t.dtype();
    return reduce("sum", t, dims, keepdim, out_dtype, [](const auto* p, std::int64_t n) {
        using T = std::remove_cvref_t<decltype(*p)>;
        using Acc = std::conditional_t<std::is_floating_point_v<T>, double, std::int64_t>;
        const auto sum_of = [p](std::int64_t j0, std::int64_t j1) {
            Acc acc = 0;
            for (std::int64_t j = j0; j < j1; ++j) acc = wrapping_add(acc, static_cast<Acc>(p[j]));
            return acc;
        };
        if (n < kernels::kThreadedElementwise) return sum_of(0, n);
        // Long: blocks of a fixed size summed on the threads there are, then in order, so the
        // result is the same on any number of threads.
        const std::int64_t blocks = (n + kThreadedElements - 1) / kThreadedElements;
        std::vector<Acc> partial(static_cast<std::size_t>(blocks));
        Acc acc = 0;
        blocks_then_folded_in_order(
            blocks,
            [&](std::int64_t b) {
                partial[std::size_t(b)] = sum_of(b * kThreadedElements, std::min(n, (b + 1) * kThreadedElements));
            },
            [&](std::int64_t b) { acc = wrapping_add(acc, partial[std::size_t(b)]); });
        return acc;
    }, false);
}

Tensor amax(const Tensor& t, const Shape& dims, bool keepdim) { return extreme<true>("max", t, dims, keepdim); }
Tensor amin(const Tensor& t, const Shape& dims, bool keepdim) { return extreme<false>("min", t, dims, keepdim); }
Tensor argmax(const Tensor& t, std::optional<std::int64_t> dim, bool keepdim)
{
    return arg_extreme<true>("argmax", t, dim, keepdim);
}
Tensor argmin(const Tensor& t, std::optional<std::int64_t> dim, bool keepdim)
{
    return arg_extreme<false>("argmin", t, dim, keepdim);
}

namespace {

// Sums the leading `lead` dims of a contiguous float tensor row by row, in the order and double
// precision of sum() but without its transposing copy: a bias's gradient over a batch.
Tensor sum_leading(const Tensor& t, std::size_t lead, const Shape& shape)
{
    std::int64_t rows = 1;
    for (std::size_t i = 0; i < lead; ++i) rows *= t.sizes()[i];
    const std::int64_t width = rows == 0 ? 0 : t.numel() / rows;
    Tensor out = empty(shape, t.dtype());
    dispatch_floating("sum", t.dtype(), [&]<class T>() {
        // Inline up to 16 sums (a bias's gradient, a scalar's): a heap vector was a malloc and a
        // free for every broadcast operand's gradient.
        SmallVector<double, 16> acc(static_cast<std::size_t>(std::max<std::int64_t>(width, 0)), 0.0);
        const T* p = t.data_ptr<T>();
        for (std::int64_t r = 0; r < rows; ++r)
            for (std::int64_t j = 0; j < width; ++j) acc[j] += p[r * width + j];
        T* o = out.data_ptr<T>();
        for (std::int64_t j = 0; j < width; ++j) o[j] = static_cast<T>(acc[j]);
    });
    return out;
}

}  // namespace

Tensor sum_to(const Tensor& t, const Shape& shape)
{
    if (t.sizes() == shape) return t;
    const std::size_t lead = t.sizes().size() - shape.size();
    Shape dims;
    for (std::size_t i = 0; i < t.sizes().size(); ++i)
        if (i < lead || (shape[i - lead] == 1 && t.sizes()[i] != 1)) dims.push_back(static_cast<std::int64_t>(i));
    if (dims.size() == lead && lead > 0 && t.is_contiguous() && is_floating(t.dtype())) return sum_leading(t, lead, shape);
    Tensor s = dims.empty() ? t : sum(t, dims, true);
    return reshape(s, shape);
}

// ---- indexing ----

namespace {

void check_index_tensor(std::string_view op, const Tensor& index)
{
    LOOM_CHECK(index.dtype() == kInt64, op, "expects an int64 index tensor, got {}", index.dtype());
}

std::int64_t checked_index(std::string_view op, std::int64_t i, std::int64_t n, std::int64_t dim)
{
    LOOM_CHECK(i >= -n && i < n, op, "index {} is out of range for dim {} of size {}", i, dim, n);
    return i < 0 ? i + n : i;
}

}  // namespace

Tensor index_select(const Tensor& t, std::int64_t dim, const Tensor& index)
{
    check_index_tensor("index_select", index);
    LOOM_CHECK(index.dim() <= 1, "index_select", "expects a 1-D index, got shape {}", index.sizes());
    dim = wrap_indexed_dim("index_select", dim, t.dim());
    const Tensor idx = contiguous(index);
    Shape shape = t.sizes();
    shape[dim] = idx.numel();
    Tensor out = empty(shape, t.dtype());
    const std::int64_t* p = idx.data_ptr<std::int64_t>();
    for (std::int64_t i = 0; i < idx.numel(); ++i)
        copy_into(select(out, dim, i), select(t, dim, checked_index("index_select", p[i], t.sizes()[dim], dim)));
    return out;
}

void index_add_into(const Tensor& dst, std::int64_t dim, const Tensor& index, const Tensor& src)
{
    const Tensor idx = contiguous(index);
    const std::int64_t* p = idx.data_ptr<std::int64_t>();
    dispatch_numeric("index_add", dst.dtype(), [&]<class T>() {
        for (std::int64_t i = 0; i < idx.numel(); ++i) {
            const Tensor d = select(dst, dim, checked_index("index_add", p[i], dst.sizes()[dim], dim));
            const Tensor s = select(src, dim, i);
            const Shape ss = s.strides();
            T* pd = d.data_ptr<T>();
            const T* ps = s.data_ptr<T>();
            for_each_offset<2>(d.sizes(), {d.strides().data(), ss.data()}, {0, 0},
                               [&](const auto& o) { pd[o[0]] += ps[o[1]]; });
        }
    });
}

namespace {

// Visits gather/scatter positions: f(offset in t, offset in index/src, index value -> element of t).
template <class F> void for_each_gather(std::string_view op, const Tensor& t, std::int64_t dim, const Tensor& index,
                                        const Tensor& other, F&& f)
{
    check_index_tensor(op, index);
    LOOM_CHECK(index.dim() == t.dim(), op, "index of shape {} must have as many dims as the input {}", index.sizes(),
               t.sizes());
    for (std::int64_t d = 0; d < t.dim(); ++d)
        LOOM_CHECK(d == dim || index.sizes()[d] <= t.sizes()[d], op,
                   "index shape {} exceeds input shape {} at dim {}", index.sizes(), t.sizes(), d);
    Shape t_strides = t.strides();
    t_strides[dim] = 0;
    const std::int64_t* pi = index.data_ptr<std::int64_t>();
    const std::int64_t n = t.sizes()[dim], step = t.impl().stride(dim);
    for_each_offset<3>(index.sizes(), {t_strides.data(), index.strides().data(), other.strides().data()}, {0, 0, 0},
                       [&](const auto& o) { f(o[0] + checked_index(op, pi[o[1]], n, dim) * step, o[2]); });
}

}  // namespace

Tensor gather(const Tensor& t, std::int64_t dim, const Tensor& index)
{
    dim = wrap_indexed_dim("gather", dim, t.dim());
    Tensor out = empty(index.sizes(), t.dtype());
    dispatch(t.dtype(), [&]<class T>() {
        const T* pt = t.data_ptr<T>();
        T* po = out.data_ptr<T>();
        for_each_gather("gather", t, dim, index, out, [&](std::int64_t ot, std::int64_t oo) { po[oo] = pt[ot]; });
    });
    return out;
}

void scatter_add_into(const Tensor& dst, std::int64_t dim, const Tensor& index, const Tensor& src)
{
    dispatch_numeric("scatter_add", dst.dtype(), [&]<class T>() {
        T* pd = dst.data_ptr<T>();
        const T* ps = src.data_ptr<T>();
        for_each_gather("scatter_add", dst, dim, index, src, [&](std::int64_t od, std::int64_t os) { pd[od] += ps[os]; });
    });
}

Tensor concat(const std::vector<Tensor>& tensors, std::int64_t dim)
{
    LOOM_CHECK(!tensors.empty(), "concat", "expects at least one tensor");
    const Tensor& first = tensors[0];
    LOOM_CHECK(first.dim() > 0, "concat", "cannot concatenate 0-d tensors; unsqueeze them or use stack");
    dim = wrap_dim("concat", dim, first.dim());
    Shape shape = first.sizes();
    shape[dim] = 0;
    for (std::size_t i = 0; i < tensors.size(); ++i) {
        const Tensor& t = tensors[i];
        LOOM_CHECK(t.dtype() == first.dtype(), "concat", "tensor {} has dtype {}, expected {}", i, t.dtype(),
                   first.dtype());
        bool same = t.dim() == first.dim();
        for (std::int64_t d = 0; same && d < t.dim(); ++d) same = d == dim || t.sizes()[d] == first.sizes()[d];
        LOOM_CHECK(same, "concat", "tensor {} has shape {}, expected {} except at dim {}", i, t.sizes(),
                   first.sizes(), dim);
        LOOM_CHECK(!__builtin_add_overflow(shape[dim], t.sizes()[dim], &shape[dim]), "concat",
                   "the joined size of dim {} exceeds 2^63 - 1", dim);
    }
    Tensor out = empty(shape, first.dtype());
    std::int64_t at = 0;
    for (const Tensor& t : tensors) {
        copy_into(slice(out, dim, at, at + t.sizes()[dim], 1), t);
        at += t.sizes()[dim];
    }
    return out;
}

Tensor one_hot(const Tensor& indices, std::int64_t num_classes, DType dtype)
{
    check_index_tensor("one_hot", indices);
    LOOM_CHECK(num_classes > 0, "one_hot", "expects num_classes > 0, got {}", num_classes);
    const Tensor idx = contiguous(indices);
    Shape shape = idx.sizes();
    shape.push_back(num_classes);
    Tensor out = zeros(shape, dtype);
    const std::int64_t* p = idx.data_ptr<std::int64_t>();
    dispatch(dtype, [&]<class T>() {
        T* o = out.data_ptr<T>();
        for (std::int64_t i = 0; i < idx.numel(); ++i) {
            LOOM_CHECK(p[i] >= 0 && p[i] < num_classes, "one_hot", "class {} is outside [0, {})", p[i], num_classes);
            o[i * num_classes + p[i]] = T(1);
        }
    });
    return out;
}

// ---- linear algebra ----

namespace {

// How BLAS can read a strided matrix without copying it.
struct BlasOperand {
    CBLAS_TRANSPOSE trans;
    int ld;
};

std::optional<BlasOperand> blas_layout(std::int64_t rows, std::int64_t cols, std::int64_t row_stride,
                                       std::int64_t col_stride)
{
    if (col_stride == 1 || cols == 1) {
        const std::int64_t ld = rows == 1 ? std::max<std::int64_t>(cols, 1) : row_stride;
        if (ld >= std::max<std::int64_t>(cols, 1) && ld <= INT_MAX) return BlasOperand{CblasNoTrans, int(ld)};
    }
    if (row_stride == 1 || rows == 1) {
        const std::int64_t ld = cols == 1 ? std::max<std::int64_t>(rows, 1) : col_stride;
        if (ld >= std::max<std::int64_t>(rows, 1) && ld <= INT_MAX) return BlasOperand{CblasTrans, int(ld)};
    }
    return std::nullopt;
}

// c [n, m] (row-major, contiguous) = a b + beta c, a and b read as their layouts say; the sizes
// are checked against BLAS's int by the callers.
template <class T>
void blas_gemm(const BlasOperand& la, const BlasOperand& lb, std::int64_t n, std::int64_t m, std::int64_t k,
               const T* a, const T* b, T beta, T* c)
{
    if constexpr (std::is_same_v<T, float>)
        cblas_sgemm(CblasRowMajor, la.trans, lb.trans, int(n), int(m), int(k), 1.0f, a, la.ld, b, lb.ld, beta, c, int(m));
    else
        cblas_dgemm(CblasRowMajor, la.trans, lb.trans, int(n), int(m), int(k), 1.0, a, la.ld, b, lb.ld, beta, c, int(m));
}

// Makes the last two dims BLAS-readable, copying only when they are not.
Tensor blas_ready(const Tensor& t, BlasOperand& layout)
{
    const auto nd = t.dim();
    auto l = blas_layout(t.sizes()[nd - 2], t.sizes()[nd - 1], t.impl().stride(nd - 2), t.impl().stride(nd - 1));
    if (l) {
        layout = *l;
        return t;
    }
    Tensor c = clone(t);
    layout = *blas_layout(c.sizes()[nd - 2], c.sizes()[nd - 1], c.impl().stride(nd - 2), c.impl().stride(nd - 1));
    return c;
}

}  // namespace

Tensor bmm(const Tensor& a_in, const Tensor& b_in)
{
    check_same_dtype("matmul", a_in, b_in);
    check_floating("matmul", a_in.dtype());
    const auto nd = a_in.dim();
    LOOM_CHECK(nd >= 2 && b_in.dim() == nd, "matmul", "internal: bmm expects equal ranks >= 2, got {} and {}",
               a_in.sizes(), b_in.sizes());
    const std::int64_t n = a_in.sizes()[nd - 2], k = a_in.sizes()[nd - 1], m = b_in.sizes()[nd - 1];
    LOOM_CHECK(b_in.sizes()[nd - 2] == k, "matmul", "inner sizes differ: {} @ {} ({} vs {})", a_in.sizes(),
               b_in.sizes(), k, b_in.sizes()[nd - 2]);
    LOOM_CHECK(n <= INT_MAX && k <= INT_MAX && m <= INT_MAX, "matmul", "matrix too large for BLAS: {} @ {}",
               a_in.sizes(), b_in.sizes());
    const Shape batch(a_in.sizes().begin(), a_in.sizes().end() - 2);
    LOOM_CHECK(Shape(b_in.sizes().begin(), b_in.sizes().end() - 2) == batch, "matmul",
               "internal: batch dims differ: {} vs {}", a_in.sizes(), b_in.sizes());
    Shape out_shape = batch;
    out_shape.push_back(n);
    out_shape.push_back(m);
    if (k == 0) return zeros(out_shape, a_in.dtype());
    Tensor out = empty(out_shape, a_in.dtype());
    if (n == 0 || m == 0) return out;
    BlasOperand la{}, lb{};
    const Tensor a = blas_ready(a_in, la), b = blas_ready(b_in, lb);
    const Shape batch_strides_out = contiguous_strides(batch);
    dispatch_floating("matmul", a.dtype(), [&]<class T>() {
        const T* pa = a.data_ptr<T>();
        const T* pb = b.data_ptr<T>();
        T* po = out.data_ptr<T>();
        for_each_offset<3>(batch, {a.strides().data(), b.strides().data(), batch_strides_out.data()}, {0, 0, 0},
                           [&](const auto& o) {
                               blas_gemm<T>(la, lb, n, m, k, pa + o[0], pb + o[1], T(0), po + o[2] * n * m);
                           });
    });
    return out;
}

void matmul_into(const Tensor& out, const Tensor& a_in, const Tensor& b_in, double beta)
{
    check_same_dtype("matmul", a_in, b_in);
    check_same_dtype("matmul", out, a_in);
    check_floating("matmul", a_in.dtype());
    LOOM_CHECK(a_in.dim() == 2 && b_in.dim() == 2 && out.dim() == 2 && out.is_contiguous(), "matmul",
               "internal: matmul_into expects 2-D operands and a contiguous 2-D out, got {} @ {} into {}",
               a_in.sizes(), b_in.sizes(), out.sizes());
    const std::int64_t n = a_in.sizes()[0], k = a_in.sizes()[1], m = b_in.sizes()[1];
    LOOM_CHECK(b_in.sizes()[0] == k && out.sizes()[0] == n && out.sizes()[1] == m, "matmul",
               "internal: matmul_into of {} @ {} into {}", a_in.sizes(), b_in.sizes(), out.sizes());
    LOOM_CHECK(n <= INT_MAX && k <= INT_MAX && m <= INT_MAX, "matmul", "matrix too large for BLAS: {} @ {}",
               a_in.sizes(), b_in.sizes());
    if (n == 0 || m == 0) return;
    if (k == 0) {  // BLAS may not scale C when k is 0
        dispatch_floating("matmul", out.dtype(), [&]<class T>() {
            T* o = out.data_ptr<T>();
            for (std::int64_t i = 0; i < n * m; ++i) o[i] = beta == 0 ? T(0) : T(beta) * o[i];
        });
        return;
    }
    BlasOperand la{}, lb{};
    const Tensor a = blas_ready(a_in, la), b = blas_ready(b_in, lb);
    // A small product (a linear layer on one step of a small batch) costs BLAS more to call and to
    // pack than to compute: 1.3 us for [1, 32] by [32, 128], where these loops take a tenth.
    const bool small = n * m * k <= kSmallProduct && (beta == 0 || beta == 1) && la.trans == CblasNoTrans && la.ld == k;
    dispatch_floating("matmul", a.dtype(), [&]<class T>() {
        if (small && lb.trans == CblasNoTrans && lb.ld == m)
            small_gemm<T>(n, m, k, a.data_ptr<T>(), b.data_ptr<T>(), out.data_ptr<T>(), beta == 1);
        else if (small && lb.trans == CblasTrans && lb.ld == k)
            small_gemm_nt<T>(n, m, k, a.data_ptr<T>(), b.data_ptr<T>(), out.data_ptr<T>(), beta == 1);
        else
            blas_gemm<T>(la, lb, n, m, k, a.data_ptr<T>(), b.data_ptr<T>(), T(beta), out.data_ptr<T>());
    });
}

template <class T> void add_column_sums(const T* rows, std::int64_t n, std::int64_t width, T* out)
{
    if (n * width < kThreadedElementwise) {
        for (std::int64_t r = 0; r < n; ++r)
            for (std::int64_t j = 0; j < width; ++j) out[j] += rows[r * width + j];
        return;
    }
    // Many rows: blocks of a fixed number of rows summed on the threads there are, then added in
    // order, so the result is the same on any number of threads.
    const std::int64_t per_block = std::max<std::int64_t>(1, kThreadedElements / width);
    const std::int64_t blocks = (n + per_block - 1) / per_block;
    std::vector<T> partial(static_cast<std::size_t>(blocks * width), T(0));
    blocks_then_folded_in_order(
        blocks,
        [&](std::int64_t b) {
            T* sum = partial.data() + b * width;
            for (std::int64_t r = b * per_block; r < std::min(n, (b + 1) * per_block); ++r)
                for (std::int64_t j = 0; j < width; ++j) sum[j] += rows[r * width + j];
        },
        [&](std::int64_t b) {
            for (std::int64_t j = 0; j < width; ++j) out[j] += partial[std::size_t(b * width + j)];
        });
}
template void add_column_sums<float>(const float*, std::int64_t, std::int64_t, float*);
template void add_column_sums<double>(const double*, std::int64_t, std::int64_t, double*);

void add_column_sums(const Tensor& out, const Tensor& rows)
{
    check_same_dtype("accumulate gradient", out, rows);
    LOOM_CHECK(out.dim() == 1 && rows.dim() == 2 && rows.sizes()[1] == out.sizes()[0] && out.is_contiguous() &&
                   rows.is_contiguous(),
               "accumulate gradient", "internal: add_column_sums of {} into {}", rows.sizes(), out.sizes());
    dispatch_floating("accumulate gradient", out.dtype(), [&]<class T>() {
        add_column_sums<T>(rows.data_ptr<T>(), rows.sizes()[0], rows.sizes()[1], out.data_ptr<T>());
    });
}

namespace {
// Columns [n0, n0 + Block) of one row of C, summed in registers over all of K.
template <std::int64_t Block, class T>
[[gnu::always_inline]] inline void small_gemm_block(std::int64_t N, std::int64_t K, const T* a, const T* B, T* c,
                                                    std::int64_t n0, bool accumulate)
{
    T acc[Block] = {};
    if (accumulate) std::copy_n(c + n0, Block, acc);
    for (std::int64_t k = 0; k < K; ++k)
        for (std::int64_t i = 0; i < Block; ++i) acc[i] += a[k] * B[k * N + n0 + i];
    std::copy_n(acc, Block, c + n0);
}

// In an unnamed namespace: GCC makes no AVX2 clone of a template with vague linkage (an
// explicitly instantiated one), so the exported small_gemm calls these.
template <class T>
LOOM_VECTOR_CLONES void small_gemm_loops(std::int64_t M, std::int64_t N, std::int64_t K, const T* A, const T* B, T* C,
                                   bool accumulate)
{
    if (K == 1) {  // an outer product (a weight's gradient at batch 1): one pass per row
        for (std::int64_t m = 0; m < M; ++m)
            for (std::int64_t n = 0; n < N; ++n) C[m * N + n] = (accumulate ? C[m * N + n] : T(0)) + A[m] * B[n];
        return;
    }
    for (std::int64_t m = 0; m < M; ++m) {
        const T* a = A + m * K;
        T* c = C + m * N;
        std::int64_t n0 = 0;
        for (; n0 + 32 <= N; n0 += 32) small_gemm_block<32>(N, K, a, B, c, n0, accumulate);
        // A narrow product (a weight's 8 input features) in blocks too: one element at a time
        // down a column of B cost a step of a small cell more than the rest of its backward.
        if (n0 + 16 <= N) small_gemm_block<16>(N, K, a, B, c, n0, accumulate), n0 += 16;
        if (n0 + 8 <= N) small_gemm_block<8>(N, K, a, B, c, n0, accumulate), n0 += 8;
        for (std::int64_t n = n0; n < N; ++n) {
            T sum = accumulate ? c[n] : T(0);
            for (std::int64_t k = 0; k < K; ++k) sum += a[k] * B[k * N + n];
            c[n] = sum;
        }
    }
}
}  // namespace

template <class T>
void small_gemm(std::int64_t M, std::int64_t N, std::int64_t K, const T* A, const T* B, T* C, bool accumulate)
{
    small_gemm_loops<T>(M, N, K, A, B, C, accumulate);
}
template void small_gemm<float>(std::int64_t, std::int64_t, std::int64_t, const float*, const float*, float*, bool);
template void small_gemm<double>(std::int64_t, std::int64_t, std::int64_t, const double*, const double*, double*, bool);

template <class T>
void gemm(std::string_view op, bool trans_a, bool trans_b, std::int64_t M, std::int64_t N, std::int64_t K, const T* A,
          const T* B, T beta, T* C)
{
    if (M == 0 || N == 0) return;
    // BLAS takes int sizes: refuse what would wrap rather than compute on a truncated size.
    LOOM_CHECK(M <= INT_MAX && N <= INT_MAX && K <= INT_MAX, op,
               "a matrix product of [{}, {}] by [{}, {}] exceeds BLAS's int sizes", M, K, K, N);
    const BlasOperand la{trans_a ? CblasTrans : CblasNoTrans, int(trans_a ? M : K)};
    const BlasOperand lb{trans_b ? CblasTrans : CblasNoTrans, int(trans_b ? K : N)};
    blas_gemm<T>(la, lb, M, N, K, A, B, beta, C);
}
template void gemm<float>(std::string_view, bool, bool, std::int64_t, std::int64_t, std::int64_t, const float*,
                          const float*, float, float*);
template void gemm<double>(std::string_view, bool, bool, std::int64_t, std::int64_t, std::int64_t, const double*,
                           const double*, double, double*);

void fail_dtypes_differ(std::string_view op, const Tensor& a, const Tensor& b)
{
    fail(op, "dtypes differ: {} (shape {}) and {} (shape {}); convert one with .to()", a.dtype(), a.sizes(), b.dtype(),
         b.sizes());
}

namespace {
template <class T>
LOOM_VECTOR_CLONES void small_gemm_nt_loops(std::int64_t M, std::int64_t N, std::int64_t K, const T* A, const T* B, T* C,
                                      bool accumulate)
{
    constexpr std::int64_t lanes = 8;
    for (std::int64_t m = 0; m < M; ++m) {
        const T* a = A + m * K;
        T* c = C + m * N;
        for (std::int64_t n = 0; n < N; ++n) {
            const T* b = B + n * K;
            T part[lanes] = {};
            std::int64_t k = 0;
            for (; k + lanes <= K; k += lanes)
                for (std::int64_t l = 0; l < lanes; ++l) part[l] += a[k + l] * b[k + l];
            T sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
            for (; k < K; ++k) sum += a[k] * b[k];
            c[n] = accumulate ? c[n] + sum : sum;
        }
    }
}
}  // namespace

template <class T>
void small_gemm_nt(std::int64_t M, std::int64_t N, std::int64_t K, const T* A, const T* B, T* C, bool accumulate)
{
    small_gemm_nt_loops<T>(M, N, K, A, B, C, accumulate);
}
template void small_gemm_nt<float>(std::int64_t, std::int64_t, std::int64_t, const float*, const float*, float*, bool);
template void small_gemm_nt<double>(std::int64_t, std::int64_t, std::int64_t, const double*, const double*, double*,
                                    bool);

}  // namespace loom::kernels
