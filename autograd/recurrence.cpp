// linear_recurrence: h_t = a_t * h_{t-1} + b_t over the first dim, as one op and one tape entry.
// Its backward is the same recurrence run the other way in time, written with differentiable
// ops (this op among them), so it can be differentiated again.
#include "../core/kernels.hpp"
#include "ops.hpp"
#include "tape.hpp"

namespace loom {

using autograd::BackwardContext;
using autograd::internal::record;
using Grads = std::vector<Tensor>;

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

// x [T, ...] moved one step along dim 0, `first` filling the step left open: toward the start
// (x_{t+1} at t, `first` at T - 1) or toward the end (x_{t-1} at t, `first` at 0).
Tensor shifted(const Tensor& x, const Tensor& first, bool toward_start)
{
    const std::int64_t T = x.size(0);
    const Tensor fill = unsqueeze(first, 0);
    if (T == 1) return fill;
    return toward_start ? concat({narrow(x, 0, 1, T - 1), fill}, 0) : concat({fill, narrow(x, 0, 0, T - 1)}, 0);
}

}  // namespace

Tensor linear_recurrence(const Tensor& a, const Tensor& b, const Tensor& h0, bool reverse)
{
    const char* op = "linear_recurrence";
    LOOM_CHECK(a.defined() && b.defined(), op, "expects coefficients a and inputs b, got an undefined tensor");
    LOOM_CHECK(b.dim() >= 1 && b.size(0) >= 1, op, "expects b [T, ...] with at least one step, got shape {}",
               b.sizes());
    LOOM_CHECK(is_floating(b.dtype()) && a.dtype() == b.dtype(), op,
               "expects a and b of one float dtype, got {} and {}", a.dtype(), b.dtype());
    bool fits = a.dim() == b.dim() && a.size(0) == b.size(0);
    for (std::int64_t k = 1; fits && k < b.dim(); ++k) fits = a.size(k) == b.size(k) || a.size(k) == 1;
    LOOM_CHECK(fits, op,
               "expects a [T, ...] over b's {} steps that broadcasts to b's shape {} along its trailing dims, got "
               "shape {}",
               b.size(0), b.sizes(), a.sizes());
    const Shape step_shape(b.sizes().begin() + 1, b.sizes().end());
    if (h0.defined())
        LOOM_CHECK(h0.sizes() == step_shape && h0.dtype() == b.dtype(), op,
                   "expects h0 of one step's shape {} and dtype {}, got shape {} and dtype {}", step_shape, b.dtype(),
                   h0.sizes(), h0.dtype());
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

}  // namespace loom
