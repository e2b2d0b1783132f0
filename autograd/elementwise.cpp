// Elementwise ops. Broadcast inputs get their gradient summed back to their own shape.
#include <cmath>

#include "../core/kernels.hpp"
#include "../core/math.hpp"
#include "ops.hpp"
#include "pointwise.hpp"
#include "profiler.hpp"
#include "tape.hpp"

namespace loom {

void pointwise::fail_no_formula() { throw Error("internal: a pointwise formula was asked for with no kind"); }

using autograd::BackwardContext;
using autograd::internal::record;
using Grads = autograd::GradList;
using pointwise::pairs_with;
using pointwise::readable_in_place;

namespace {

Tensor scalar_like(double value, const Tensor& t) { return scalar_tensor(value, t.dtype()); }

// `value` as a 0-d tensor of t's dtype for `op`; an error, never a truncation, when it does not fit.
Tensor scalar_operand(const char* op, double value, const Tensor& t)
{
    check_scalar_fits(op, value, t.dtype());
    return scalar_tensor(value, t.dtype());
}

// A backward closure for an op whose formula is Op's (pointwise.hpp): where nothing asks for the
// closure, the sweep runs the formula itself (sweep.cpp). The op saves what Op reads, in order.
template <class Op, class F> autograd::internal::PointwiseBackward<static_cast<std::uint8_t>(Op::kind), F> swept_as(F backward)
{
    return {std::move(backward)};
}

// g summed to input k's shape (undoing a broadcast), or undefined when k needs no gradient.
Tensor reduce_to(const BackwardContext& c, std::size_t k, const Tensor& g)
{
    if (!c.needs[k]) return Tensor();
    if (g.sizes() == c.input_shape(k)) return g;  // nothing to undo, as in most adds: no call
    return sum_to(g, c.input_shape(k));
}
// The same for a gradient computed for k alone (g * y) or taken from the context: passed on
// without a copy of its handle when it already has k's shape.
Tensor reduce_to(const BackwardContext& c, std::size_t k, Tensor&& g)
{
    if (!c.needs[k]) return Tensor();
    if (g.sizes() == c.input_shape(k)) return std::move(g);
    return sum_to(g, c.input_shape(k));
}

// Whether input k has the shape and dtype of g, the gradient of the entry's output. An input
// marked like the output needs no compare: each gradient the sweep hands a backward has its
// output's shape and dtype (checked as it was summed). Forced inline, as readable_in_place and
// pairs_with are: as calls, such checks cost W7's gradient 0.5% more instructions.
[[gnu::always_inline]] inline bool input_like_grad(const BackwardContext& c, std::size_t k, const Tensor& g)
{
    return c.inputs[k].like_output() || (c.input_dtype(k) == g.dtype() && c.input_shape(k) == g.sizes());
}

// Input k's gradient fn(g, v) computed element by element straight into the sum the sweep keeps
// for k, when the sweep offers it and the incoming gradient g and the operand v are contiguous,
// of k's shape and dtype (no broadcast to undo): no tensor is made for the gradient, and the sum
// is added in the same pass. False where it cannot; backward then returns the gradient.
// g may also be one value spread over k's shape (a loss's gradient, from a large sum or mean).
// `last_read_of_grad`: backward reads g no more after this, so the sweep may hand g's own buffer
// to k (each element read, then written over) instead of making one; g is undefined after that.
template <class Fn>
bool summed_in_place(const BackwardContext& c, std::size_t k, Fn fn, const Tensor& v, bool last_read_of_grad)
{
    if (!c.sums || !c.needs[k]) return false;
    const Tensor& g = c.grad();
    const DType dtype = g.dtype();
    bool spread = false;
    if (!readable_in_place(g, &spread) || !pairs_with(v, g) || !input_like_grad(c, k, g)) return false;
    const autograd::GradientBuffer sum = c.gradient_buffer(k, last_read_of_grad);
    if (!sum) return false;
    dispatch_floating("backward", dtype, [&]<class T>() {
        // Handed over, g's values are in the sum (and g is undefined).
        const T* gp = sum.holds_incoming ? sum.sum->data_ptr<T>() : g.data_ptr<T>();
        const T* vp = v.data_ptr<T>();
        sum.write_from<T>(gp, spread, [fn, vp](T gi, std::int64_t i) { return fn(gi, vp[i]); });
    });
    return true;
}

// The gradient of an op whose derivative is piecewise constant in x (abs, relu, clamp):
// grad_fn(g, x) elementwise. It is linear in g and has zero derivative in x, so its own
// backward is itself applied to the incoming gradient.
template <class Fn> Tensor masked_gradient(const char* op, const Tensor& g, const Tensor& x, Fn grad_fn)
{
    Tensor out = kernels::zip_floating(op, g, x, grad_fn);
    return record(op, {g}, std::move(out), {x}, [op, grad_fn](const BackwardContext& c) {
        return Grads{masked_gradient(op, c.grad(), c.saved[0], grad_fn)};
    });
}

// g * (1 - y^2), the gradient of tanh through its output y; differentiable in both.
Tensor tanh_backward(const Tensor& g, const Tensor& y)
{
    Tensor out = kernels::zip_floating("tanh", g, y, [](auto u, auto v) { return pointwise::Tanh::grad(u, v, v); });
    return record("tanh_backward", {g, y}, std::move(out), {g, y}, [](const BackwardContext& c) {
        const Tensor &g = c.saved[0], &y = c.saved[1];
        return Grads{c.needs[0] ? tanh_backward(c.grad(), y) : Tensor(), c.needs[1] ? c.grad() * g * y * -2.0 : Tensor()};
    });
}

// g * y (1 - y), the gradient of sigmoid through its output y; differentiable in both.
Tensor sigmoid_backward(const Tensor& g, const Tensor& y)
{
    Tensor out = kernels::zip_floating("sigmoid", g, y, [](auto u, auto v) { return pointwise::Sigmoid::grad(u, v, v); });
    return record("sigmoid_backward", {g, y}, std::move(out), {g, y}, [](const BackwardContext& c) {
        const Tensor &g = c.saved[0], &y = c.saved[1];
        return Grads{c.needs[0] ? sigmoid_backward(c.grad(), y) : Tensor(),
                     c.needs[1] ? c.grad() * g * (1.0 - 2.0 * y) : Tensor()};
    });
}

}  // namespace

// ---- binary ----

Tensor add(const Tensor& a, const Tensor& b)
{
    const autograd::detail::ProfiledOp profiled("add");
    Tensor out = kernels::zip_numeric("add", a, b, [](auto x, auto y) { return pointwise::Add::value(x, y); });
    return record("add", {a, b}, std::move(out), {}, swept_as<pointwise::Add>([](const BackwardContext& c) {
        // Both inputs receive the gradient as it is: the last one that needs it takes it.
        if (!c.needs[1]) return Grads{reduce_to(c, 0, c.take_grad()), Tensor()};
        return Grads{reduce_to(c, 0, c.grad()), reduce_to(c, 1, c.take_grad())};
    }));
}

Tensor sub(const Tensor& a, const Tensor& b)
{
    const autograd::detail::ProfiledOp profiled("sub");
    Tensor out = kernels::zip_numeric("sub", a, b, [](auto x, auto y) { return pointwise::Sub::value(x, y); });
    return record("sub", {a, b}, std::move(out), {}, swept_as<pointwise::Sub>([](const BackwardContext& c) {
        Tensor negated = c.needs[1] ? reduce_to(c, 1, -c.grad()) : Tensor();
        return Grads{reduce_to(c, 0, c.take_grad()), std::move(negated)};
    }));
}

Tensor mul(const Tensor& a, const Tensor& b)
{
    const autograd::detail::ProfiledOp profiled("mul");
    Tensor out = kernels::zip_numeric("mul", a, b, [](auto x, auto y) { return pointwise::Mul::value(x, y); });
    return record("mul", {a, b}, std::move(out), {a, b}, swept_as<pointwise::Mul>([](const BackwardContext& c) {
        const Tensor &x = c.saved[0], &y = c.saved[1];
        const auto times = [](auto g, auto v) { return g * v; };
        Grads grads(2);
        if (c.needs[0] && !summed_in_place(c, 0, times, y, !c.needs[1])) grads[0] = reduce_to(c, 0, c.grad() * y);
        if (c.needs[1] && !summed_in_place(c, 1, times, x, true)) grads[1] = reduce_to(c, 1, c.grad() * x);
        return grads;
    }));
}

Tensor div(const Tensor& a, const Tensor& b)
{
    const autograd::detail::ProfiledOp profiled("div");
    Tensor out = kernels::zip_floating("div", a, b, [](auto x, auto y) { return pointwise::Div::value(x, y); });
    return record("div", {a, b}, std::move(out), {b, out}, swept_as<pointwise::Div>([](const BackwardContext& c) {
        const Tensor &y = c.saved[0], &q = c.saved[1];
        return Grads{c.needs[0] ? reduce_to(c, 0, c.grad() / y) : Tensor(),
                     c.needs[1] ? reduce_to(c, 1, -(c.grad() * q / y)) : Tensor()};
    }));
}

Tensor pow(const Tensor& base, const Tensor& exponent)
{
    const autograd::detail::ProfiledOp profiled("pow");
    Tensor out = kernels::zip_floating("pow", base, exponent, [](auto x, auto e) { return std::pow(x, e); });
    return record("pow", {base, exponent}, std::move(out), {base, exponent, out}, [](const BackwardContext& c) {
        const Tensor &x = c.saved[0], &e = c.saved[1], &y = c.saved[2];
        Grads g(2);
        if (c.needs[0]) g[0] = reduce_to(c, 0, c.grad() * e * pow(x, e - 1.0));
        if (c.needs[1]) {
            // d/de x^e = x^e log x; taken as 0 where x == 0, as PyTorch does.
            const Tensor at_zero = eq(x, scalar_like(0, x));
            g[1] = reduce_to(c, 1, c.grad() * y * log(where(at_zero, scalar_like(1, x), x)));
        }
        return g;
    });
}

Tensor pow(const Tensor& base, double exponent)
{
    const autograd::detail::ProfiledOp profiled("pow");
    // A square is x * x, correctly rounded, at a fraction of std::pow's cost: losses and norms square a lot.
    Tensor out = exponent == 2 ? kernels::map_floating("pow", base, [](auto x) { return x * x; })
                               : kernels::map_floating("pow", base, [exponent](auto x) {
                                     return static_cast<decltype(x)>(std::pow(x, exponent));
                                 });
    return record("pow", {base}, std::move(out), {base}, [exponent](const BackwardContext& c) {
        // The square's gradient without std::pow(x, 1): a tenth of the time on a [T, B, H] output.
        if (exponent == 2) {
            if (summed_in_place(c, 0, [](auto g, auto x) { return g * x * 2; }, c.saved[0], true)) return Grads{Tensor()};
            return Grads{c.grad() * c.saved[0] * 2.0};
        }
        const auto power_grad = [exponent](auto g, auto x) {
            using T = decltype(x);
            return g * static_cast<T>(exponent) * static_cast<T>(std::pow(x, exponent - 1));  // as the forward computes
        };
        if (summed_in_place(c, 0, power_grad, c.saved[0], true)) return Grads{Tensor()};
        return Grads{c.grad() * exponent * pow(c.saved[0], exponent - 1)};
    });
}

namespace {

// Share of the gradient that goes to `a` in maximum(a, b) (Max) or minimum(a, b): 1, 0, or 1/2 on ties.
template <bool Max> Tensor extremum(const char* op, const Tensor& a, const Tensor& b)
{
    const autograd::detail::ProfiledOp profiled(op);
    Tensor out = kernels::zip_floating(op, a, b, [](auto x, auto y) {
        if (std::isnan(x) || std::isnan(y)) return x + y;
        return Max ? std::max(x, y) : std::min(x, y);
    });
    return record(op, {a, b}, std::move(out), {a, b}, [op](const BackwardContext& c) {
        const Tensor &x = c.saved[0], &y = c.saved[1];
        const Tensor share = kernels::zip_floating(op, x, y, [](auto u, auto v) {
            using T = decltype(u);
            return u == v ? T(0.5) : ((Max ? u > v : u < v) ? T(1) : T(0));
        });
        return Grads{c.needs[0] ? reduce_to(c, 0, c.grad() * share) : Tensor(),
                     c.needs[1] ? reduce_to(c, 1, c.grad() * (1.0 - share)) : Tensor()};
    });
}

}  // namespace

Tensor maximum(const Tensor& a, const Tensor& b) { return extremum<true>("maximum", a, b); }
Tensor minimum(const Tensor& a, const Tensor& b) { return extremum<false>("minimum", a, b); }

// ---- unary ----

Tensor neg(const Tensor& x)
{
    const autograd::detail::ProfiledOp profiled("neg");
    Tensor out = kernels::map_numeric("neg", x, [](auto v) { return pointwise::Neg::value(v); });
    return record("neg", {x}, std::move(out), {},
                  swept_as<pointwise::Neg>([](const BackwardContext& c) { return Grads{-c.grad()}; }));
}

Tensor exp(const Tensor& x)
{
    const autograd::detail::ProfiledOp profiled("exp");
    Tensor out = kernels::map_floating("exp", x, [](auto v) { return pointwise::Exp::value(v); });
    return record("exp", {x}, std::move(out), {out}, swept_as<pointwise::Exp>([](const BackwardContext& c) {
        if (summed_in_place(c, 0, [](auto g, auto y) { return pointwise::Exp::grad(g, y, y); }, c.saved[0], true))
            return Grads{Tensor()};
        return Grads{c.grad() * c.saved[0]};
    }));
}

Tensor log(const Tensor& x)
{
    const autograd::detail::ProfiledOp profiled("log");
    Tensor out = kernels::map_floating("log", x, [](auto v) { return pointwise::Log::value(v); });
    return record("log", {x}, std::move(out), {x}, swept_as<pointwise::Log>([](const BackwardContext& c) {
        if (summed_in_place(c, 0, [](auto g, auto v) { return pointwise::Log::grad(g, v, v); }, c.saved[0], true))
            return Grads{Tensor()};
        return Grads{c.grad() / c.saved[0]};
    }));
}

Tensor sqrt(const Tensor& x)
{
    const autograd::detail::ProfiledOp profiled("sqrt");
    Tensor out = kernels::map_floating("sqrt", x, [](auto v) { return std::sqrt(v); });
    return record("sqrt", {x}, std::move(out), {out}, [](const BackwardContext& c) {
        return Grads{c.grad() / (2.0 * c.saved[0])};
    });
}

Tensor abs(const Tensor& x)
{
    const autograd::detail::ProfiledOp profiled("abs");
    Tensor out = kernels::map_numeric("abs", x, [](auto v) { return v < 0 ? wrapping_sub(decltype(v)(0), v) : v; });
    return record("abs", {x}, std::move(out), {x}, [](const BackwardContext& c) {
        return Grads{masked_gradient("abs_backward", c.grad(), c.saved[0], [](auto g, auto v) {
            return v > 0 ? g : (v < 0 ? -g : decltype(g)(0));
        })};
    });
}

Tensor tanh(const Tensor& x)
{
    const autograd::detail::ProfiledOp profiled("tanh");
    Tensor out = kernels::map_floating("tanh", x, [](auto v) { return pointwise::Tanh::value(v); });
    return record("tanh", {x}, std::move(out), {out}, swept_as<pointwise::Tanh>([](const BackwardContext& c) {
        const auto tanh_grad = [](auto g, auto y) { return pointwise::Tanh::grad(g, y, y); };
        if (summed_in_place(c, 0, tanh_grad, c.saved[0], true)) return Grads{Tensor()};
        return Grads{tanh_backward(c.grad(), c.saved[0])};
    }));
}

Tensor sigmoid(const Tensor& x)
{
    const autograd::detail::ProfiledOp profiled("sigmoid");
    Tensor out = kernels::map_floating("sigmoid", x, [](auto v) { return pointwise::Sigmoid::value(v); });
    return record("sigmoid", {x}, std::move(out), {out}, swept_as<pointwise::Sigmoid>([](const BackwardContext& c) {
        const auto sigmoid_grad = [](auto g, auto y) { return pointwise::Sigmoid::grad(g, y, y); };
        if (summed_in_place(c, 0, sigmoid_grad, c.saved[0], true)) return Grads{Tensor()};
        return Grads{sigmoid_backward(c.grad(), c.saved[0])};
    }));
}

namespace {
// Compiled for AVX2 as well: in float32 softplus_of is branch-free polynomials.
template <class T> LOOM_VECTOR_CLONES void softplus_values(const T* x, T* y, std::int64_t n)
{
    for (std::int64_t i = 0; i < n; ++i) y[i] = softplus_of(x[i]);
}
}  // namespace

Tensor softplus(const Tensor& x)
{
    const autograd::detail::ProfiledOp profiled("softplus");
    const Tensor xc = kernels::contiguous(x);
    Tensor out = empty(x.sizes(), x.dtype());
    dispatch_floating("softplus", x.dtype(), [&]<class T>() { softplus_values(xc.data_ptr<T>(), out.data_ptr<T>(), xc.numel()); });
    return record("softplus", {x}, std::move(out), {x}, [](const BackwardContext& c) { return Grads{c.grad() * sigmoid(c.saved[0])}; });
}

Tensor relu(const Tensor& x)
{
    const autograd::detail::ProfiledOp profiled("relu");
    Tensor out = kernels::map_floating("relu", x, [](auto v) { return pointwise::Relu::value(v); });
    return record("relu", {x}, std::move(out), {out}, swept_as<pointwise::Relu>([](const BackwardContext& c) {
        return Grads{masked_gradient("relu_backward", c.grad(), c.saved[0], [](auto g, auto y) {
            return pointwise::Relu::grad(g, y, y);
        })};
    }));
}

Tensor clamp(const Tensor& x, std::optional<double> min, std::optional<double> max)
{
    const autograd::detail::ProfiledOp profiled("clamp");
    LOOM_CHECK(min || max, "clamp", "expects at least one of min and max");
    LOOM_CHECK(!min || !max || *min <= *max, "clamp", "expects min <= max, got min={} max={}", *min, *max);
    if (min) check_scalar_fits("clamp", *min, x.dtype());
    if (max) check_scalar_fits("clamp", *max, x.dtype());
    const double lo = min.value_or(-INFINITY), hi = max.value_or(INFINITY);
    Tensor out = kernels::map_numeric("clamp", x, [lo, hi](auto v) {
        using T = decltype(v);
        return v < lo ? static_cast<T>(lo) : (v > hi ? static_cast<T>(hi) : v);
    });
    return record("clamp", {x}, std::move(out), {x}, [lo, hi](const BackwardContext& c) {
        return Grads{masked_gradient("clamp_backward", c.grad(), c.saved[0], [lo, hi](auto g, auto v) {
            return v >= lo && v <= hi ? g : decltype(g)(0);
        })};
    });
}

// ---- selection ----

namespace {
// out = c ? a : b over n values; a step of 0 reads one value throughout. Both sides are read
// first and chosen by a bit mask, not a branch mispredicted half the time on a random mask.
template <class T>
LOOM_VECTOR_CLONES void select_values(const bool* __restrict c, const T* __restrict a, std::int64_t step_a,
                                      const T* __restrict b, std::int64_t step_b, T* __restrict out, std::int64_t n)
{
    for (std::int64_t i = 0; i < n; ++i) {
        out[i] = select_of(c[i], a[i * step_a], b[i * step_b]);
    }
}
}  // namespace

Tensor where(const Tensor& cond, const Tensor& a, const Tensor& b)
{
    const autograd::detail::ProfiledOp profiled("where");
    LOOM_CHECK(cond.dtype() == kBool, "where", "expects a bool condition, got {}", cond.dtype());
    kernels::check_same_dtype("where", a, b);
    const Shape shape = broadcast_shapes("where", cond.sizes(), broadcast_shapes("where", a.sizes(), b.sizes()));
    Tensor out = empty(shape, a.dtype());
    // Contiguous operands of the result's shape, or single values (a scalar branch, as the
    // backward's zero): one flat loop instead of the strided walk.
    const auto flat = [&](const Tensor& t) { return (t.sizes() == shape && t.is_contiguous()) || t.numel() == 1; };
    const bool all_flat = cond.sizes() == shape && cond.is_contiguous() && flat(a) && flat(b);
    dispatch(a.dtype(), [&]<class T>() {
        const bool* pc = cond.data_ptr<bool>();
        const T *pa = a.data_ptr<T>(), *pb = b.data_ptr<T>();
        T* po = out.data_ptr<T>();
        if (all_flat)
            return select_values(pc, pa, a.numel() == 1 ? 0 : 1, pb, b.numel() == 1 ? 0 : 1, po, out.numel());
        const Shape sc = kernels::broadcast_strides(cond, shape), sa = kernels::broadcast_strides(a, shape),
                    sb = kernels::broadcast_strides(b, shape), so = contiguous_strides(shape);
        kernels::for_each_offset<4>(shape, {sc.data(), sa.data(), sb.data(), so.data()}, {0, 0, 0, 0},
                                    [&](const auto& o) { po[o[3]] = pc[o[0]] ? pa[o[1]] : pb[o[2]]; });
    });
    return record("where", {a, b}, std::move(out), {cond}, [](const BackwardContext& c) {
        const Tensor zero = scalar_like(0, c.grad());
        return Grads{c.needs[0] ? reduce_to(c, 0, where(c.saved[0], c.grad(), zero)) : Tensor(),
                     c.needs[1] ? reduce_to(c, 1, where(c.saved[0], zero, c.grad())) : Tensor()};
    });
}

Tensor masked_fill(const Tensor& x, const Tensor& mask, double value)
{
    const autograd::detail::ProfiledOp profiled("masked_fill");
    LOOM_CHECK(broadcast_shapes("masked_fill", x.sizes(), mask.sizes()) == x.sizes(), "masked_fill",
               "mask of shape {} does not broadcast to the input's shape {}", mask.sizes(), x.sizes());
    return where(mask, scalar_operand("masked_fill", value, x), x);
}

// ---- comparisons and logic ----

#define LOOM_COMPARISON(name, expr)                                                             \
    Tensor name(const Tensor& a, const Tensor& b)                                             \
    {                                                                                         \
        const autograd::detail::ProfiledOp profiled(#name);                                   \
        return kernels::zip_any(#name, a, b, [](auto x, auto y) { return static_cast<bool>(expr); }); \
    }
LOOM_COMPARISON(eq, x == y)
LOOM_COMPARISON(ne, x != y)
LOOM_COMPARISON(lt, x < y)
LOOM_COMPARISON(le, x <= y)
LOOM_COMPARISON(gt, x > y)
LOOM_COMPARISON(ge, x >= y)
#undef LOOM_COMPARISON

namespace {
void check_bool(std::string_view op, const Tensor& t)
{
    LOOM_CHECK(t.dtype() == kBool, op, "expects bool masks, got {}", t.dtype());
}
}  // namespace

Tensor logical_not(const Tensor& mask)
{
    const autograd::detail::ProfiledOp profiled("logical_not");
    check_bool("logical_not", mask);
    return kernels::map_typed<bool>(mask, [](bool v) { return !v; });
}

Tensor logical_and(const Tensor& a, const Tensor& b)
{
    const autograd::detail::ProfiledOp profiled("logical_and");
    check_bool("logical_and", a);
    check_bool("logical_and", b);
    return kernels::zip_any("logical_and", a, b, [](auto x, auto y) { return static_cast<bool>(x && y); });
}

Tensor logical_or(const Tensor& a, const Tensor& b)
{
    const autograd::detail::ProfiledOp profiled("logical_or");
    check_bool("logical_or", a);
    check_bool("logical_or", b);
    return kernels::zip_any("logical_or", a, b, [](auto x, auto y) { return static_cast<bool>(x || y); });
}

// ---- operators ----

Tensor operator+(const Tensor& a, const Tensor& b) { return add(a, b); }
Tensor operator-(const Tensor& a, const Tensor& b) { return sub(a, b); }
Tensor operator*(const Tensor& a, const Tensor& b) { return mul(a, b); }
Tensor operator/(const Tensor& a, const Tensor& b) { return div(a, b); }
Tensor operator-(const Tensor& x) { return neg(x); }
Tensor operator+(const Tensor& a, double b) { return add(a, scalar_operand("add", b, a)); }
Tensor operator-(const Tensor& a, double b) { return sub(a, scalar_operand("sub", b, a)); }
Tensor operator*(const Tensor& a, double b) { return mul(a, scalar_operand("mul", b, a)); }
Tensor operator/(const Tensor& a, double b) { return div(a, scalar_operand("div", b, a)); }
Tensor operator+(double a, const Tensor& b) { return add(scalar_operand("add", a, b), b); }
Tensor operator-(double a, const Tensor& b) { return sub(scalar_operand("sub", a, b), b); }
Tensor operator*(double a, const Tensor& b) { return mul(scalar_operand("mul", a, b), b); }
Tensor operator/(double a, const Tensor& b) { return div(scalar_operand("div", a, b), b); }

}  // namespace loom
