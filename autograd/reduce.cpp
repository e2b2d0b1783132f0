// Reductions. sum and amax/amin are primitives; mean, var, norm and softmax are composed from ops.
#include <cmath>

#include "../core/kernels.hpp"
#include "ops.hpp"
#include "tape.hpp"

namespace loom {

using autograd::BackwardContext;
using autograd::record;
using Grads = std::vector<Tensor>;

namespace {

// A reduced gradient of shape `reduced` (keepdim or not) laid back out over `input` by broadcasting.
Tensor unreduce(const Tensor& g, const Shape& input, const Shape& dims, bool keepdim)
{
    Tensor r = g;
    if (!keepdim) {
        Shape kept_shape = input;
        if (dims.empty()) std::fill(kept_shape.begin(), kept_shape.end(), 1);
        if (!input.empty())  // a 0-d input: dims 0 and -1 name the tensor itself, nothing to keep
            for (auto d : dims) kept_shape[wrap_dim("sum", d, static_cast<std::int64_t>(input.size()))] = 1;
        r = reshape(g, kept_shape);
    }
    return expand(r, input);
}

// How many elements each result of reducing `dims` covers; checks the dims, naming `op`.
std::int64_t reduced_count(std::string_view op, const Tensor& x, const Shape& dims)
{
    if (dims.empty()) return x.numel();
    std::int64_t n = 1;
    std::vector<bool> seen(static_cast<std::size_t>(std::max<std::int64_t>(x.dim(), 1)), false);
    for (auto d : dims) {
        const auto w = wrap_dim(op, d, x.dim());
        LOOM_CHECK(!seen[w], op, "dim {} repeats in {}", w, dims);
        seen[w] = true;
        n *= x.dim() == 0 ? 1 : x.sizes()[w];
    }
    return n;
}

// amax/amin: the gradient is shared among the elements equal to the extreme value.
Tensor extreme(const char* op, const Tensor& x, const Shape& dims, bool keepdim, bool is_max)
{
    Tensor out = is_max ? kernels::amax(x, dims, keepdim) : kernels::amin(x, dims, keepdim);
    return record(op, {x}, out, {x, out}, [op, dims, keepdim](const BackwardContext& c) {
        const Tensor& in = c.saved[0];
        const Shape& shape = in.sizes();
        // Shared among the elements equal to the result, NaN counting as equal to a NaN result.
        const Tensor hit = kernels::zip_floating(op, in, unreduce(c.saved[1], shape, dims, keepdim), [](auto x, auto m) {
            using T = decltype(x);
            return x == m || (std::isnan(x) && std::isnan(m)) ? T(1) : T(0);
        });
        const Tensor count = kernels::sum(hit, dims, true);
        return Grads{hit * unreduce(c.grad(), shape, dims, keepdim) / kernels::expand(count, shape)};
    });
}

}  // namespace

Tensor sum(const Tensor& x, const Shape& dims, bool keepdim)
{
    Tensor out = kernels::sum(x, dims, keepdim);
    return record("sum", {x}, out, {}, [dims, keepdim](const BackwardContext& c) {
        return Grads{unreduce(c.grad(), c.input_shape(0), dims, keepdim)};
    });
}

Tensor mean(const Tensor& x, const Shape& dims, bool keepdim)
{
    check_floating("mean", x.dtype());
    const std::int64_t n = reduced_count("mean", x, dims);
    return sum(x, dims, keepdim) / static_cast<double>(n);
}

Tensor amax(const Tensor& x, const Shape& dims, bool keepdim) { return extreme("amax", x, dims, keepdim, true); }
Tensor amin(const Tensor& x, const Shape& dims, bool keepdim) { return extreme("amin", x, dims, keepdim, false); }

Tensor argmax(const Tensor& x, std::optional<std::int64_t> dim, bool keepdim) { return kernels::argmax(x, dim, keepdim); }
Tensor argmin(const Tensor& x, std::optional<std::int64_t> dim, bool keepdim) { return kernels::argmin(x, dim, keepdim); }

Tensor var(const Tensor& x, const Shape& dims, bool unbiased, bool keepdim)
{
    check_floating("var", x.dtype());
    const std::int64_t n = reduced_count("var", x, dims);
    LOOM_CHECK(n > (unbiased ? 1 : 0), "var", "needs at least {} elements to reduce, got {} (shape {})",
               unbiased ? 2 : 1, n, x.sizes());
    const Tensor centered = x - mean(x, dims, true);
    return sum(centered * centered, dims, keepdim) / static_cast<double>(unbiased ? n - 1 : n);
}

Tensor norm(const Tensor& x, double p, const Shape& dims, bool keepdim)
{
    check_floating("norm", x.dtype());
    LOOM_CHECK(p > 0, "norm", "expects p > 0 (or infinity), got {}", p);
    reduced_count("norm", x, dims);
    if (std::isinf(p)) return amax(abs(x), dims, keepdim);
    if (p == 2) return sqrt(sum(x * x, dims, keepdim));
    if (p == 1) return sum(abs(x), dims, keepdim);
    return pow(sum(pow(abs(x), p), dims, keepdim), 1.0 / p);
}

Tensor softmax(const Tensor& x, std::int64_t dim)
{
    // Shifting by the (constant) max changes nothing mathematically and keeps exp from overflowing.
    const Tensor e = exp(x - kernels::amax(x, {dim}, true));
    return e / sum(e, {dim}, true);
}

Tensor log_softmax(const Tensor& x, std::int64_t dim)
{
    const Tensor shifted = x - kernels::amax(x, {dim}, true);
    return shifted - log(sum(exp(shifted), {dim}, true));
}

}  // namespace loom
