// Reductions. sum and amax/amin are primitives; mean, var, norm and softmax are composed from ops.
#include <cmath>
#include <limits>
#include <type_traits>

#include "../core/kernels.hpp"
#include "ops.hpp"
#include "profiler.hpp"
#include "tape.hpp"

namespace loom {

using autograd::BackwardContext;
using autograd::internal::record;
using Grads = autograd::GradList;

namespace {

// The dims a reduction over `dims` (none: all) of a `rank`-dim input reduces, as bits. sum's
// backward keeps this rather than the Shape of dims: its closure then fits std::function's inline
// storage, where a captured Shape cost a heap allocation per recorded sum. Hence at most 64 dims.
std::uint64_t reduced_dims(std::string_view op, const Shape& dims, std::int64_t rank)
{
    LOOM_CHECK(rank <= 64, op, "reduces tensors of at most 64 dims, got {}", rank);
    if (rank == 0) return 0;  // a 0-d input: dims 0 and -1 name the tensor itself, nothing to keep
    if (dims.empty()) return rank == 64 ? ~std::uint64_t(0) : (std::uint64_t(1) << rank) - 1;
    std::uint64_t reduced = 0;
    for (auto d : dims) reduced |= std::uint64_t(1) << wrap_dim(op, d, rank);
    return reduced;
}

// A reduced gradient (keepdim or not) laid back out over `input` by broadcasting; `reduced` as
// from reduced_dims.
Tensor unreduce(const Tensor& g, const Shape& input, std::uint64_t reduced, bool keepdim)
{
    if (keepdim) return expand(g, input);
    Shape kept_shape = input;
    for (std::size_t d = 0; d < input.size(); ++d)
        if ((reduced >> d) & 1) kept_shape[d] = 1;
    return expand(reshape(g, kept_shape), input);
}

// How many elements each result of reducing `dims` covers; checks the dims, naming `op`.
std::int64_t reduced_count(std::string_view op, const Tensor& x, const Shape& dims)
{
    if (dims.empty()) return x.numel();
    std::int64_t n = 1;
    // Inline: a std::vector<bool> here was a malloc and a free for every mean, var and norm over dims.
    SmallVector<bool, 8> seen(static_cast<std::size_t>(std::max<std::int64_t>(x.dim(), 1)), false);
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
    const autograd::detail::ProfiledOp profiled(op);
    Tensor out = is_max ? kernels::amax(x, dims, keepdim) : kernels::amin(x, dims, keepdim);
    return record(op, {x}, std::move(out), {x, out}, [op, dims, keepdim](const BackwardContext& c) {
        const Tensor& in = c.saved[0];
        const Shape& shape = in.sizes();
        const std::uint64_t reduced = reduced_dims(op, dims, in.dim());
        // Shared among the elements equal to the result, NaN counting as equal to a NaN result.
        const Tensor hit = kernels::zip_floating(op, in, unreduce(c.saved[1], shape, reduced, keepdim), [](auto x, auto m) {
            using T = decltype(x);
            return x == m || (std::isnan(x) && std::isnan(m)) ? T(1) : T(0);
        });
        const Tensor count = kernels::sum(hit, dims, true);
        return Grads{hit * unreduce(c.grad(), shape, reduced, keepdim) / kernels::expand(count, shape)};
    });
}

}  // namespace

namespace {
// The gradient of a sum of a small input to one value, that value at every element, written
// straight into the sweep's sum for the input (BackwardContext::gradient_buffer) when it offers
// one. The broadcast view it replaces would reach the ops below as a gradient they could not
// write from into their own inputs' sums (it is not contiguous): a loss is mostly such a sum,
// and on small tensors those ops' bookkeeping is what costs. A large input keeps the view,
// which takes no memory: a buffer there would add a full-size array to the sweep's peak (W5's
// loss over its [2000, 16, 256] outputs: +32 MiB) for one pass saved below.
constexpr std::int64_t kSpreadAtMost = 1024;  // elements
bool spread_in_place(const BackwardContext& c)
{
    const Tensor& g = c.grad();
    if (!c.sums || !c.needs[0] || g.numel() != 1 || c.input_dtype(0) != g.dtype() || !is_floating(g.dtype()))
        return false;
    if (numel_of(c.input_shape(0)) > kSpreadAtMost) return false;
    const autograd::GradientBuffer sum = c.gradient_buffer(0);
    if (!sum) return false;
    dispatch_floating("sum", g.dtype(), [&]<class T>() {
        const T value = *g.data_ptr<T>();
        sum.write<T>([value](std::int64_t) { return value; });
    });
    return true;
}
}  // namespace

Tensor sum(const Tensor& x, const Shape& dims, bool keepdim)
{
    const autograd::detail::ProfiledOp profiled("sum");
    Tensor out = kernels::sum(x, dims, keepdim);  // checks dims
    return record("sum", {x}, std::move(out), {}, [reduced = reduced_dims("sum", dims, x.dim()), keepdim](const BackwardContext& c) {
        if (spread_in_place(c)) return Grads{Tensor()};
        return Grads{unreduce(c.grad(), c.input_shape(0), reduced, keepdim)};
    });
}

Tensor mean(const Tensor& x, const Shape& dims, bool keepdim)
{
    const autograd::detail::ProfiledOp profiled("mean");
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
    const autograd::detail::ProfiledOp profiled("var");
    check_floating("var", x.dtype());
    const std::int64_t n = reduced_count("var", x, dims);
    LOOM_CHECK(n > (unbiased ? 1 : 0), "var", "needs at least {} elements to reduce, got {} (shape {})",
               unbiased ? 2 : 1, n, x.sizes());
    const Tensor centered = x - mean(x, dims, true);
    return sum(centered * centered, dims, keepdim) / static_cast<double>(unbiased ? n - 1 : n);
}

Tensor norm(const Tensor& x, double p, const Shape& dims, bool keepdim)
{
    const autograd::detail::ProfiledOp profiled("norm");
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
    const autograd::detail::ProfiledOp profiled("softmax");
    // Shifting by the (constant) max changes nothing mathematically and keeps exp from overflowing.
    const Tensor e = exp(x - kernels::amax(x, {dim}, true));
    return e / sum(e, {dim}, true);
}

Tensor log_softmax(const Tensor& x, std::int64_t dim)
{
    const autograd::detail::ProfiledOp profiled("log_softmax");
    const Tensor shifted = x - kernels::amax(x, {dim}, true);
    return shifted - log(sum(exp(shifted), {dim}, true));
}

Tensor masked_softmax(const Tensor& x, const Tensor& mask, std::int64_t dim)
{
    const autograd::detail::ProfiledOp profiled("masked_softmax");
    check_floating("masked_softmax", x.dtype());
    LOOM_CHECK(mask.dtype() == kBool, "masked_softmax", "expects a bool mask (true = leave out), got {}", mask.dtype());
    const std::int64_t d = wrap_indexed_dim("masked_softmax", dim, x.dim());
    LOOM_CHECK(broadcast_shapes("masked_softmax", x.sizes(), mask.sizes()) == x.sizes(), "masked_softmax",
               "mask of shape {} does not broadcast to the input's shape {}", mask.sizes(), x.sizes());
    const Tensor in = kernels::contiguous(x), left_out = kernels::contiguous(kernels::expand(mask, x.sizes()));
    Tensor out = empty(x.sizes(), x.dtype());
    std::int64_t outer = 1, inner = 1;
    for (std::int64_t k = 0; k < d; ++k) outer *= x.sizes()[k];
    for (std::int64_t k = d + 1; k < x.dim(); ++k) inner *= x.sizes()[k];
    const std::int64_t n = x.sizes()[d];
    dispatch(x.dtype(), [&]<class T>() {
        if constexpr (std::is_floating_point_v<T>) {
            const T* px = in.data_ptr<T>();
            const bool* pm = left_out.data_ptr<bool>();
            T* po = out.data_ptr<T>();
            for (std::int64_t o = 0; o < outer; ++o)
                for (std::int64_t i = 0; i < inner; ++i) {
                    const std::int64_t base = o * n * inner + i;
                    T top = -std::numeric_limits<T>::infinity();
                    for (std::int64_t k = 0; k < n; ++k)
                        if (!pm[base + k * inner]) top = std::max(top, px[base + k * inner]);
                    T total = 0;
                    for (std::int64_t k = 0; k < n; ++k) {
                        const std::int64_t at = base + k * inner;
                        po[at] = pm[at] ? T(0) : std::exp(px[at] - top);
                        total += po[at];
                    }
                    // A row with every entry left out stays all zeros (no 0/0).
                    if (total > 0)
                        for (std::int64_t k = 0; k < n; ++k) po[base + k * inner] /= total;
                }
        }
    });
    return record("masked_softmax", {x}, std::move(out), {out}, [d](const BackwardContext& c) {
        // Softmax's Jacobian-vector product; left-out entries have y = 0 and so get no gradient.
        const Tensor& y = c.saved[0];
        return Grads{y * (c.grad() - sum(c.grad() * y, {d}, true))};
    });
}

}  // namespace loom
