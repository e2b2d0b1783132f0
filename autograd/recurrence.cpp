// linear_recurrence: h_t = a_t * h_{t-1} + b_t over the first dim, as one op and one tape entry,
// and log_linear_recurrence, the same in log space for positive a and b.
// Its backward is the same recurrence run the other way in time, written with differentiable
// ops (this op among them), so it can be differentiated again.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../core/kernels.hpp"
#include "ops.hpp"
#include "profiler.hpp"
#include "tape.hpp"

namespace loom {

using autograd::BackwardContext;
using autograd::internal::record;
using Grads = autograd::GradList;

namespace {

// The recurrence over contiguous [steps, n] arrays, from h0 (none: zeros) at the first step
// processed: t = 0 upward, or t = steps - 1 downward when `reverse`. Vectorised over n.
template <class T>
void run_recurrence(const T* a, const T* b, const T* h0, T* h, std::int64_t steps, std::int64_t n, bool reverse)
{
    for (std::int64_t s = 0; s < steps; ++s) {
        const std::int64_t t = reverse ? steps - 1 - s : s;
        const T* prev = s == 0 ? h0 : h + (reverse ? t + 1 : t - 1) * n;
        const T* at = a + t * n;
        const T* bt = b + t * n;
        T* ht = h + t * n;
        if (prev)
            for (std::int64_t i = 0; i < n; ++i) ht[i] = at[i] * prev[i] + bt[i];
        else
            for (std::int64_t i = 0; i < n; ++i) ht[i] = bt[i];
    }
}

// The backward of run_recurrence in one pass, the other way in time: g_t = dh_t + a_next g_next
// (the step processed just before), db_t = g_t, da_t = g_t * h_before(t), and dh0 = a_first g_first.
template <class T>
void run_recurrence_backward(const T* a, const T* h, const T* h0, const T* dh, T* da, T* db, T* dh0,
                             std::int64_t steps, std::int64_t n, bool reverse)
{
    for (std::int64_t s = 0; s < steps; ++s) {
        const std::int64_t t = reverse ? s : steps - 1 - s;  // forward's last step first
        const std::int64_t later = reverse ? t - 1 : t + 1, earlier = reverse ? t + 1 : t - 1;
        const T* g_later = s == 0 ? nullptr : db + later * n;
        const T* a_later = s == 0 ? nullptr : a + later * n;
        const T* before = s == steps - 1 ? h0 : h + earlier * n;
        const T* dht = dh + t * n;
        T* dbt = db + t * n;
        T* dat = da + t * n;
        for (std::int64_t i = 0; i < n; ++i) {
            const T g = g_later ? dht[i] + a_later[i] * g_later[i] : dht[i];
            dbt[i] = g;
            dat[i] = before ? g * before[i] : T(0);
        }
    }
    const std::int64_t first = reverse ? steps - 1 : 0;
    if (dh0)
        for (std::int64_t i = 0; i < n; ++i) dh0[i] = a[first * n + i] * db[first * n + i];
}

// log(exp(u) + exp(v)) without overflow; exact when either is -inf.
template <class T> T log_add_exp(T u, T v)
{
    if (u == -std::numeric_limits<T>::infinity()) return v;
    if (v == -std::numeric_limits<T>::infinity()) return u;
    return std::max(u, v) + std::log1p(std::exp(-std::abs(u - v)));
}

// The recurrence in log space over contiguous [steps, n] arrays: l_t = log(exp(la_t + l_before)
// + exp(lb_t)), from lh0 (none: the first step is lb alone), in the order run_recurrence uses.
template <class T>
void run_log_recurrence(const T* la, const T* lb, const T* lh0, T* l, std::int64_t steps, std::int64_t n, bool reverse)
{
    for (std::int64_t s = 0; s < steps; ++s) {
        const std::int64_t t = reverse ? steps - 1 - s : s;
        const T* prev = s == 0 ? lh0 : l + (reverse ? t + 1 : t - 1) * n;
        for (std::int64_t i = 0; i < n; ++i)
            l[t * n + i] = prev ? log_add_exp(la[t * n + i] + prev[i], lb[t * n + i]) : lb[t * n + i];
    }
}

// Its backward, the other way in time. w_t = exp(la_t + l_before - l_t) is the share of the
// carried state in l_t (0 at a first step without lh0): g_t = dl_t + w_later g_later,
// dla_t = g_t w_t, dlb_t = g_t (1 - w_t), dlh0 = g_first w_first.
template <class T>
void run_log_recurrence_backward(const T* la, const T* l, const T* lh0, const T* dl, T* dla, T* dlb, T* dlh0,
                                 std::int64_t steps, std::int64_t n, bool reverse)
{
    std::vector<T> g(static_cast<std::size_t>(n), T(0)), w_later(static_cast<std::size_t>(n), T(0));
    for (std::int64_t s = 0; s < steps; ++s) {
        const std::int64_t t = reverse ? s : steps - 1 - s;
        const T* before = s == steps - 1 ? lh0 : l + (reverse ? t + 1 : t - 1) * n;
        for (std::int64_t i = 0; i < n; ++i) {
            const T gt = dl[t * n + i] + w_later[std::size_t(i)] * g[std::size_t(i)];
            const T w = before ? std::exp(la[t * n + i] + before[i] - l[t * n + i]) : T(0);
            dla[t * n + i] = gt * w;
            dlb[t * n + i] = gt - gt * w;
            g[std::size_t(i)] = gt;
            w_later[std::size_t(i)] = w;
        }
    }
    if (dlh0)
        for (std::int64_t i = 0; i < n; ++i) dlh0[i] = g[std::size_t(i)] * w_later[std::size_t(i)];
}

// x [T, ...] moved one step along dim 0, `first` filling the step left open: toward the start
// (x_{t+1} at t, `first` at T - 1) or toward the end (x_{t-1} at t, `first` at 0).
Tensor shifted(const Tensor& x, const Tensor& first, bool toward_start)
{
    const std::int64_t T = x.size(0);
    const Tensor fill = unsqueeze(first, 0);
    if (T == 1) return fill;
    return toward_start ? concat({narrow(x, 0, 1, T - 1), fill}, 0) : concat({fill, narrow(x, 0, 0, T - 1)}, 0);
}

// The checks both recurrences make, naming their arguments as the caller does.
void check_recurrence_arguments(const char* op, const Tensor& a, const Tensor& b, const Tensor& h0, const char* an,
                                const char* bn, const char* h0n)
{
    LOOM_CHECK(a.defined() && b.defined(), op, "expects coefficients {} and inputs {}, got an undefined tensor", an, bn);
    LOOM_CHECK(b.dim() >= 1 && b.size(0) >= 1, op, "expects {} [T, ...] with at least one step, got shape {}",
               bn, b.sizes());
    LOOM_CHECK(is_floating(b.dtype()) && a.dtype() == b.dtype(), op,
               "expects {} and {} of one float dtype, got {} and {}", an, bn, a.dtype(), b.dtype());
    bool fits = a.dim() == b.dim() && a.size(0) == b.size(0);
    for (std::int64_t k = 1; fits && k < b.dim(); ++k) fits = a.size(k) == b.size(k) || a.size(k) == 1;
    LOOM_CHECK(fits, op,
               "expects {} [T, ...] over {}'s {} steps that broadcasts to {}'s shape {} along its trailing dims, got "
               "shape {}",
               an, bn, b.size(0), bn, b.sizes(), a.sizes());
    const Shape step_shape(b.sizes().begin() + 1, b.sizes().end());
    if (h0.defined())
        LOOM_CHECK(h0.sizes() == step_shape && h0.dtype() == b.dtype(), op,
                   "expects {} of one step's shape {} and dtype {}, got shape {} and dtype {}", h0n, step_shape,
                   b.dtype(), h0.sizes(), h0.dtype());
}

}  // namespace

Tensor linear_recurrence(const Tensor& a, const Tensor& b, const Tensor& h0, bool reverse)
{
    const autograd::detail::ProfiledOp profiled("linear_recurrence");
    const char* op = "linear_recurrence";
    check_recurrence_arguments(op, a, b, h0, "a", "b", "h0");
    const std::int64_t steps = b.size(0), n = b.numel() / steps;
    const Tensor ac = kernels::contiguous(kernels::expand(a, b.sizes())), bc = kernels::contiguous(b);
    const Tensor hc = h0.defined() ? kernels::contiguous(h0) : Tensor();
    Tensor h = empty(b.sizes(), b.dtype());
    dispatch_floating(op, b.dtype(), [&]<class T>() {
        run_recurrence<T>(ac.data_ptr<T>(), bc.data_ptr<T>(), hc.defined() ? hc.data_ptr<T>() : nullptr,
                          h.data_ptr<T>(), steps, n, reverse);
    });
    return record(op, {a, b, h0}, h, {a, h0, h}, [reverse](const BackwardContext& c) {
        const Tensor &a = c.saved[0], &h0 = c.saved[1], &h = c.saved[2];
        const std::int64_t T = h.size(0), first = reverse ? T - 1 : 0;
        if (!c.create_graph) {
            // One fused pass over the arrays; the path below records the same with ops.
            const std::int64_t n = h.numel() / T;
            const Tensor ac = kernels::contiguous(kernels::expand(a, h.sizes())), dh = kernels::contiguous(c.grad());
            const Tensor hc = h0.defined() ? kernels::contiguous(h0) : Tensor();
            Tensor da = empty(h.sizes(), h.dtype()), db = empty(h.sizes(), h.dtype());
            Tensor dh0 = c.needs[2] ? empty(h0.sizes(), h.dtype()) : Tensor();
            dispatch_floating("linear_recurrence", h.dtype(), [&]<class T>() {
                run_recurrence_backward<T>(ac.data_ptr<T>(), kernels::contiguous(h).data_ptr<T>(),
                                           hc.defined() ? hc.data_ptr<T>() : nullptr, dh.data_ptr<T>(), da.data_ptr<T>(),
                                           db.data_ptr<T>(), dh0.defined() ? dh0.data_ptr<T>() : nullptr, h.size(0), n,
                                           reverse);
            });
            return Grads{c.needs[0] ? kernels::sum_to(da, c.input_shape(0)) : Tensor(), c.needs[1] ? db : Tensor(),
                         dh0};
        }
        const Tensor a_full = expand(a, h.sizes());
        const Tensor none = zeros_like(h.select(0, 0));
        // dL/dh_t through every later step: g_t = dh_t + a_{t+1} g_{t+1} (reverse: a_{t-1} g_{t-1}),
        // the recurrence the other way, its coefficients moved one step.
        const Tensor g = linear_recurrence(shifted(a_full, none, !reverse), c.grad(), {}, !reverse);
        Grads grads(3);
        if (c.needs[0]) {
            // h_{t-1} at t (reverse: h_{t+1}), h0 where the recurrence starts.
            const Tensor before = shifted(h, h0.defined() ? h0 : none, reverse);
            grads[0] = sum_to(g * before, c.input_shape(0));
        }
        if (c.needs[1]) grads[1] = g;
        if (c.needs[2]) grads[2] = a_full.select(0, first) * g.select(0, first);
        return grads;
    });
}

Tensor log_linear_recurrence(const Tensor& log_a, const Tensor& log_b, const Tensor& log_h0, bool reverse)
{
    const autograd::detail::ProfiledOp profiled("log_linear_recurrence");
    const char* op = "log_linear_recurrence";
    check_recurrence_arguments(op, log_a, log_b, log_h0, "log_a", "log_b", "log_h0");
    const std::int64_t steps = log_b.size(0), n = log_b.numel() / steps;
    const Tensor lac = kernels::contiguous(kernels::expand(log_a, log_b.sizes())), lbc = kernels::contiguous(log_b);
    const Tensor lhc = log_h0.defined() ? kernels::contiguous(log_h0) : Tensor();
    Tensor l = empty(log_b.sizes(), log_b.dtype());
    dispatch_floating(op, log_b.dtype(), [&]<class T>() {
        run_log_recurrence<T>(lac.data_ptr<T>(), lbc.data_ptr<T>(), lhc.defined() ? lhc.data_ptr<T>() : nullptr,
                              l.data_ptr<T>(), steps, n, reverse);
    });
    return record(op, {log_a, log_b, log_h0}, l, {log_a, log_h0, l}, [reverse](const BackwardContext& c) {
        const Tensor &la = c.saved[0], &lh0 = c.saved[1], &l = c.saved[2];
        const std::int64_t steps = l.size(0), first = reverse ? steps - 1 : 0;
        if (!c.create_graph) {
            const std::int64_t n = l.numel() / steps;
            const Tensor lac = kernels::contiguous(kernels::expand(la, l.sizes())), dl = kernels::contiguous(c.grad());
            const Tensor lhc = lh0.defined() ? kernels::contiguous(lh0) : Tensor();
            Tensor dla = empty(l.sizes(), l.dtype()), dlb = empty(l.sizes(), l.dtype());
            Tensor dlh0 = c.needs[2] ? empty(lh0.sizes(), l.dtype()) : Tensor();
            dispatch_floating("log_linear_recurrence", l.dtype(), [&]<class T>() {
                run_log_recurrence_backward<T>(lac.data_ptr<T>(), kernels::contiguous(l).data_ptr<T>(),
                                               lhc.defined() ? lhc.data_ptr<T>() : nullptr, dl.data_ptr<T>(),
                                               dla.data_ptr<T>(), dlb.data_ptr<T>(),
                                               dlh0.defined() ? dlh0.data_ptr<T>() : nullptr, steps, n, reverse);
            });
            return Grads{c.needs[0] ? kernels::sum_to(dla, c.input_shape(0)) : Tensor(), c.needs[1] ? dlb : Tensor(),
                         dlh0};
        }
        // The same with ops: w_t = exp(la_t + l_before - l_t), where l_before at the first step is
        // lh0, or -inf without it (w = 0 there), and g runs the linear recurrence backward.
        const Tensor la_full = expand(la, l.sizes());
        const Tensor no_state = full_like(l.select(0, 0), -std::numeric_limits<double>::infinity());
        const Tensor w = exp(la_full + shifted(l, lh0.defined() ? lh0 : no_state, reverse) - l);
        const Tensor g = linear_recurrence(shifted(w, zeros_like(l.select(0, 0)), !reverse), c.grad(), {}, !reverse);
        Grads grads(3);
        if (c.needs[0]) grads[0] = sum_to(g * w, c.input_shape(0));
        if (c.needs[1]) grads[1] = g - g * w;
        if (c.needs[2]) grads[2] = g.select(0, first) * w.select(0, first);
        return grads;
    });
}

}  // namespace loom
