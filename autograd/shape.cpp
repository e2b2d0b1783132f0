// Views, copies, joins and indexing. A view's backward lays the gradient back out in the input's shape.
#include "../core/kernels.hpp"
#include "ops.hpp"
#include "profiler.hpp"
#include "tape.hpp"

namespace loom {

using autograd::BackwardContext;
using autograd::internal::record;
using Grads = autograd::GradList;

namespace {

Tensor reshape_back(const char* op, const Tensor& x, Tensor out)
{
    const autograd::detail::ProfiledOp profiled(op);
    return record(op, {x}, std::move(out), {}, [](const BackwardContext& c) {
        return Grads{reshape(c.grad(), c.input_shape(0))};
    });
}

}  // namespace

Tensor reshape(const Tensor& x, const Shape& shape) { return reshape_back("reshape", x, kernels::reshape(x, shape)); }
Tensor view(const Tensor& x, const Shape& shape) { return reshape_back("view", x, kernels::view(x, shape)); }
Tensor squeeze(const Tensor& x, std::optional<std::int64_t> dim) { return reshape_back("squeeze", x, kernels::squeeze(x, dim)); }
Tensor unsqueeze(const Tensor& x, std::int64_t dim) { return reshape_back("unsqueeze", x, kernels::unsqueeze(x, dim)); }

Tensor permute(const Tensor& x, const Shape& dims)
{
    const autograd::detail::ProfiledOp profiled("permute");
    Tensor out = kernels::permute(x, dims);
    Shape inverse(dims.size());
    for (std::size_t i = 0; i < dims.size(); ++i) inverse[wrap_dim("permute", dims[i], x.dim())] = static_cast<std::int64_t>(i);
    return record("permute", {x}, std::move(out), {}, [inverse](const BackwardContext& c) {
        return Grads{permute(c.grad(), inverse)};
    });
}

Tensor transpose(const Tensor& x, std::int64_t dim0, std::int64_t dim1)
{
    const autograd::detail::ProfiledOp profiled("transpose");
    const std::int64_t d0 = wrap_dim("transpose", dim0, x.dim()), d1 = wrap_dim("transpose", dim1, x.dim());
    if (x.dim() == 0) return x;  // a 0-d tensor transposes to itself, as in PyTorch
    Shape dims(x.dim());
    for (std::int64_t i = 0; i < x.dim(); ++i) dims[i] = i;
    std::swap(dims[d0], dims[d1]);
    return permute(x, dims);
}

Tensor expand(const Tensor& x, const Shape& shape)
{
    const autograd::detail::ProfiledOp profiled("expand");
    Tensor out = kernels::expand(x, shape);
    return record("expand", {x}, std::move(out), {}, [](const BackwardContext& c) {
        return Grads{sum_to(c.grad(), c.input_shape(0))};
    });
}

Tensor sum_to(const Tensor& x, const Shape& shape)
{
    const autograd::detail::ProfiledOp profiled("sum_to");
    if (x.sizes() == shape) return x;  // the common case, first: it runs in every add's backward
    LOOM_CHECK(broadcast_shapes("sum_to", shape, x.sizes()) == x.sizes(), "sum_to",
               "shape {} does not broadcast to the input's shape {}", shape, x.sizes());
    Tensor out = kernels::sum_to(x, shape);
    return record("sum_to", {x}, std::move(out), {}, [](const BackwardContext& c) {
        return Grads{expand(c.grad(), c.input_shape(0))};
    });
}

Tensor sum_to(Tensor&& x, const Shape& shape)
{
    if (x.sizes() == shape) {
        const autograd::detail::ProfiledOp profiled("sum_to");
        return std::move(x);
    }
    return sum_to(static_cast<const Tensor&>(x), shape);
}

Tensor broadcast_to(const Tensor& x, const Shape& shape) { return expand(x, shape); }

Tensor slice(const Tensor& x, std::int64_t dim, std::int64_t start, std::int64_t end, std::int64_t step)
{
    const autograd::detail::ProfiledOp profiled("slice");
    Tensor out = kernels::slice(x, dim, start, end, step);
    return autograd::record_region("slice", x, out, [dim, start, end, step](const Tensor& whole) {
        return kernels::slice(whole, dim, start, end, step);
    });
}

Tensor narrow(const Tensor& x, std::int64_t dim, std::int64_t start, std::int64_t length)
{
    const autograd::detail::ProfiledOp profiled("narrow");
    const std::int64_t d = wrap_indexed_dim("narrow", dim, x.dim());
    const std::int64_t n = x.sizes()[d];
    if (start < 0 && start >= -n) start += n;
    // length <= n - start, not start + length <= n: the sum may overflow.
    LOOM_CHECK(start >= 0 && start <= n && length >= 0 && length <= n - start, "narrow",
               "start {} and length {} are outside dim {} of size {} (shape {})", start, length, d, n, x.sizes());
    return slice(x, d, start, start + length, 1);
}

Tensor select(const Tensor& x, std::int64_t dim, std::int64_t index)
{
    const autograd::detail::ProfiledOp profiled("select");
    Tensor out = kernels::select(x, dim, index);
    return autograd::record_region("select", x, out,
                                   [dim, index](const Tensor& whole) { return kernels::select(whole, dim, index); });
}

namespace {

// Zeros of `shape` with `source`'s slices added at `index` along dim d: index_select's gradient,
// as a differentiable op.
Tensor index_add(const Shape& shape, std::int64_t d, const Tensor& index, const Tensor& source)
{
    const autograd::detail::ProfiledOp profiled("index_add");
    Tensor z = zeros(shape, source.dtype());
    kernels::index_add_into(z, d, index, source);
    return record("index_add", {source}, std::move(z), {index}, [d](const BackwardContext& c) {
        return Grads{index_select(c.grad(), d, c.saved[0])};
    });
}

// Zeros of `shape` with `source` added at `index` along dim d: gather's gradient, as a differentiable op.
Tensor scatter_add(const Shape& shape, std::int64_t d, const Tensor& index, const Tensor& source)
{
    const autograd::detail::ProfiledOp profiled("scatter_add");
    Tensor z = zeros(shape, source.dtype());
    kernels::scatter_add_into(z, d, index, kernels::contiguous(source));
    return record("scatter_add", {source}, std::move(z), {index}, [d](const BackwardContext& c) {
        return Grads{gather(c.grad(), d, c.saved[0])};
    });
}

}  // namespace

Tensor index_select(const Tensor& x, std::int64_t dim, const Tensor& index)
{
    const autograd::detail::ProfiledOp profiled("index_select");
    Tensor out = kernels::index_select(x, dim, index);
    const std::int64_t d = wrap_indexed_dim("index_select", dim, x.dim());
    return record("index_select", {x}, std::move(out), {index}, [d](const BackwardContext& c) {
        return Grads{index_add(c.input_shape(0), d, c.saved[0], c.grad())};
    });
}

Tensor gather(const Tensor& x, std::int64_t dim, const Tensor& index)
{
    const autograd::detail::ProfiledOp profiled("gather");
    Tensor out = kernels::gather(x, dim, index);
    const std::int64_t d = wrap_indexed_dim("gather", dim, x.dim());
    return record("gather", {x}, std::move(out), {index}, [d](const BackwardContext& c) {
        return Grads{scatter_add(c.input_shape(0), d, c.saved[0], c.grad())};
    });
}

Tensor contiguous(const Tensor& x)
{
    const autograd::detail::ProfiledOp profiled("contiguous");
    if (x.is_contiguous()) return x;
    return clone(x);
}

Tensor clone(const Tensor& x)
{
    const autograd::detail::ProfiledOp profiled("clone");
    return record("clone", {x}, kernels::clone(x), {}, [](const BackwardContext& c) { return Grads{c.take_grad()}; });
}

Tensor to(const Tensor& x, DType dtype)
{
    const autograd::detail::ProfiledOp profiled("to");
    if (x.dtype() == dtype) return x;
    Tensor out = kernels::to(x, dtype);
    if (!is_floating(dtype)) return out;  // an integer or bool result carries no gradient
    return record("to", {x}, std::move(out), {}, [](const BackwardContext& c) {
        return Grads{to(c.grad(), c.input_dtype(0))};
    });
}

Tensor concat(const std::vector<Tensor>& tensors, std::int64_t dim)
{
    const autograd::detail::ProfiledOp profiled("concat");
    Tensor out = kernels::concat(tensors, dim);
    Shape sizes;
    for (const Tensor& t : tensors) sizes.push_back(t.sizes()[wrap_dim("concat", dim, t.dim())]);
    return record("concat", tensors, out, {}, [sizes, dim](const BackwardContext& c) {
        Grads g;
        std::int64_t at = 0;
        for (std::size_t i = 0; i < sizes.size(); ++i) {
            if (c.needs[i]) g.push_back(slice(c.grad(), dim, at, at + sizes[i], 1));
            else g.emplace_back();
            at += sizes[i];
        }
        return g;
    });
}

Tensor stack(const std::vector<Tensor>& tensors, std::int64_t dim)
{
    const autograd::detail::ProfiledOp profiled("stack");
    LOOM_CHECK(!tensors.empty(), "stack", "expects at least one tensor");
    const std::int64_t d = wrap_dim("stack", dim, tensors[0].dim() + 1);
    std::vector<Tensor> parts;
    for (std::size_t i = 0; i < tensors.size(); ++i) {
        LOOM_CHECK(tensors[i].sizes() == tensors[0].sizes(), "stack", "tensor {} has shape {}, expected {}", i,
                   tensors[i].sizes(), tensors[0].sizes());
        parts.push_back(unsqueeze(tensors[i], d));
    }
    return concat(parts, d);
}

std::vector<Tensor> split(const Tensor& x, std::int64_t split_size, std::int64_t dim)
{
    const autograd::detail::ProfiledOp profiled("split");
    LOOM_CHECK(split_size > 0, "split", "expects a positive split size, got {}", split_size);
    const std::int64_t d = wrap_indexed_dim("split", dim, x.dim());
    std::vector<Tensor> parts;
    const std::int64_t n = x.sizes()[d];
    const std::int64_t count = n == 0 ? 0 : (n - 1) / split_size + 1;
    try {
        parts.reserve(static_cast<std::size_t>(count));
    } catch (const std::exception&) {  // bad_alloc or length_error: say it as loom does
        fail("split", "cannot hold {} parts of size {} of dim {} (size {})", count, split_size, d, n);
    }
    for (std::int64_t at = 0; at < n; at += std::min(split_size, n - at))  // never steps past n: no overflow
        parts.push_back(narrow(x, d, at, std::min(split_size, n - at)));
    return parts;
}

std::vector<Tensor> chunk(const Tensor& x, std::int64_t chunks, std::int64_t dim)
{
    const autograd::detail::ProfiledOp profiled("chunk");
    LOOM_CHECK(chunks > 0, "chunk", "expects a positive number of chunks, got {}", chunks);
    const std::int64_t n = x.sizes()[wrap_indexed_dim("chunk", dim, x.dim())];
    return split(x, n == 0 ? 1 : (n - 1) / chunks + 1, dim);  // ceil(n / chunks) without overflow
}

Tensor one_hot(const Tensor& indices, std::int64_t num_classes, DType dtype)
{
    const autograd::detail::ProfiledOp profiled("one_hot");
    return kernels::one_hot(indices, num_classes, dtype);
}

// ---- linear algebra ----

namespace {

// a [..., n, k] @ b [..., k, m] with identical batch dims: the one matmul primitive.
Tensor bmm(const Tensor& a, const Tensor& b)
{
    const autograd::detail::ProfiledOp profiled("bmm");
    Tensor out = kernels::bmm(a, b);
    return record("matmul", {a, b}, std::move(out), {a, b}, [](const BackwardContext& c) {
        const Tensor &x = c.saved[0], &y = c.saved[1];
        // A 2-D operand's gradient is added where the sweep sums it when it offers that: a weight
        // multiplied at every step (h @ W) then costs one GEMM at beta = 1 a step, no addition.
        const auto gradient = [&](std::size_t k, const Tensor& left, const Tensor& right) {
            if (!c.needs[k]) return Tensor();
            if (left.dim() == 2) {
                if (const Tensor sum_so_far = c.accumulator(k); sum_so_far.defined()) {
                    kernels::matmul_into(sum_so_far, left, right, 1.0);
                    return Tensor();
                }
            }
            return bmm(left, right);
        };
        return Grads{gradient(0, c.grad(), transpose(y, -1, -2)), gradient(1, transpose(x, -1, -2), c.grad())};
    });
}

}  // namespace

Tensor matmul(const Tensor& a, const Tensor& b)
{
    const autograd::detail::ProfiledOp profiled("matmul");
    LOOM_CHECK(a.dim() >= 1 && b.dim() >= 1, "matmul", "expects operands of at least 1 dim, got {} and {}", a.sizes(),
               b.sizes());
    kernels::check_same_dtype("matmul", a, b);
    const std::int64_t k = a.sizes().back(), kb = b.dim() == 1 ? b.sizes()[0] : b.sizes()[b.dim() - 2];
    LOOM_CHECK(k == kb, "matmul", "inner sizes differ: {} @ {} ({} vs {})", a.sizes(), b.sizes(), k, kb);
    if (a.dim() == 1 && b.dim() == 1) return sum(a * b);
    if (a.dim() == 1) return squeeze(matmul(unsqueeze(a, 0), b), -2);
    if (b.dim() == 1) return squeeze(matmul(a, unsqueeze(b, -1)), -1);
    if (b.dim() == 2 && a.dim() > 2) {  // fold a's batch into rows: one GEMM instead of many
        Shape out_shape = a.sizes();
        out_shape.back() = b.sizes()[1];
        return reshape(bmm(reshape(a, {-1, k}), b), out_shape);
    }
    if (a.dim() == 2 && b.dim() == 2) return bmm(a, b);
    const Shape batch = broadcast_shapes("matmul", Shape(a.sizes().begin(), a.sizes().end() - 2),
                                         Shape(b.sizes().begin(), b.sizes().end() - 2));
    Shape sa = batch, sb = batch;
    sa.insert(sa.end(), a.sizes().end() - 2, a.sizes().end());
    sb.insert(sb.end(), b.sizes().end() - 2, b.sizes().end());
    return bmm(a.sizes() == sa ? a : expand(a, sa), b.sizes() == sb ? b : expand(b, sb));
}

Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias)
{
    const autograd::detail::ProfiledOp profiled("linear");
    LOOM_CHECK(weight.dim() == 2, "linear", "expects weight [out_features, in_features], got shape {}",
               weight.sizes());
    const std::int64_t out_features = weight.sizes()[0], in_features = weight.sizes()[1];
    LOOM_CHECK(x.dim() >= 1 && x.sizes().back() == in_features, "linear",
               "expects input [..., {}] for weight of shape {}, got shape {}", in_features, weight.sizes(), x.sizes());
    kernels::check_same_dtype("linear", x, weight);
    check_floating("linear", x.dtype());
    if (bias.defined()) {
        LOOM_CHECK(bias.dim() == 1 && bias.sizes()[0] == out_features, "linear",
                   "expects bias [{}] for weight of shape {}, got shape {}", out_features, weight.sizes(),
                   bias.sizes());
        kernels::check_same_dtype("linear", x, bias);
    }
    Shape out_shape = x.sizes();
    out_shape.back() = out_features;
    std::int64_t rows = 1;
    for (std::int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.sizes()[d];  // out_shape's count is already checked
    Tensor out = empty({rows, out_features}, x.dtype());
    if (bias.defined()) kernels::copy_into(out, bias);
    kernels::matmul_into(out, kernels::reshape(x, {rows, in_features}), kernels::permute(weight, {1, 0}),
                         bias.defined() ? 1.0 : 0.0);
    out = kernels::view(out, out_shape);
    const bool has_bias = bias.defined();
    const auto backward = [has_bias, rows, in_features, out_features](const BackwardContext& c) {
        const Tensor &x = c.saved[0], &w = c.saved[1];
        const Tensor g = reshape(c.grad(), {rows, out_features});
        Grads grads(c.needs.size());
        if (c.needs[0]) grads[0] = reshape(matmul(g, w), c.input_shape(0));
        if (c.needs[1]) {
            const Tensor x2 = reshape(x, {rows, in_features});
            if (const Tensor sum_so_far = c.accumulator(1); sum_so_far.defined())
                kernels::matmul_into(sum_so_far, kernels::permute(g, {1, 0}), x2, 1.0);
            else
                grads[1] = matmul(transpose(g, 0, 1), x2);
        }
        if (has_bias && c.needs[2]) {
            if (const Tensor sum_so_far = c.accumulator(2); sum_so_far.defined())
                kernels::add_column_sums(sum_so_far, kernels::contiguous(g));
            else
                grads[2] = sum(g, {0});
        }
        return grads;
    };
    if (has_bias) return record("linear", {x, weight, bias}, std::move(out), {x, weight}, backward);
    return record("linear", {x, weight}, std::move(out), {x, weight}, backward);
}

}  // namespace loom
