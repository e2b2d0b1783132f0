// linear_recurrence: h_t = a_t * h_{t-1} + b_t over the first dim, as one op and one tape entry,
// and log_linear_recurrence, the same in log space for positive a and b.
// Its backward is the same recurrence run the other way in time, written with differentiable
// ops (this op among them), so it can be differentiated again.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../core/kernels.hpp"
#include "../core/math.hpp"
#include "../core/parallel.hpp"
#include "ops.hpp"
#include "profiler.hpp"
#include "tape.hpp"

namespace loom {

using autograd::BackwardContext;
using autograd::internal::record;
using Grads = autograd::GradList;

namespace {

// One recurrence h_s = c_s * h_{s-1} + b_s over contiguous [steps, n] arrays, in the order its
// steps are processed: step s is time t(s) (from the last when `reverse`). The coefficient of
// step s is read `coefficient_shift` elements from row t(s) of c: the forward reads its own
// row; the backward, run the other way, reads the row of the step processed after it in forward.
template <class T> struct Recurrence {
    const T* c;
    std::int64_t coefficient_shift;
    const T* b;
    const T* init;  // the state before step 0; null: zeros
    T* h;
    std::int64_t steps, n;
    bool reverse;

    std::int64_t row(std::int64_t s) const { return (reverse ? steps - 1 - s : s) * n; }
    const T* coefficient(std::int64_t s) const { return c + (row(s) + coefficient_shift); }

    // Steps [s0, s1) over lanes [i0, i1), from `prev` (the state before s0; null: zeros).
    void run(const T* prev, std::int64_t s0, std::int64_t s1, std::int64_t i0, std::int64_t i1) const
    {
        for (std::int64_t s = s0; s < s1; ++s) {
            const T* bs = b + row(s);
            T* hs = h + row(s);
            if (prev) {
                const T* cs = coefficient(s);
                for (std::int64_t i = i0; i < i1; ++i) hs[i] = cs[i] * prev[i] + bs[i];
            } else {
                for (std::int64_t i = i0; i < i1; ++i) hs[i] = bs[i];
            }
            prev = hs;
        }
    }
};

// Lanes per thread worth splitting the lanes for (a few vectors each): narrower recurrences
// split their steps instead.
constexpr std::int64_t kLanesPerThread = 64;

// Threads for work over [steps, n] split by lanes: several only when it is large, and wide
// enough that each gets kLanesPerThread lanes (threads writing lanes of one cache line would only
// slow each other).
std::int64_t lane_threads(std::int64_t steps, std::int64_t n)
{
    return steps * n < kernels::kThreadedElements
               ? 1
               : std::min<std::int64_t>(get_num_threads(), std::max<std::int64_t>(1, n / kLanesPerThread));
}

// fn(i0, i1) on each block of lanes, one per lane_threads() thread.
template <class F> void over_lanes(std::int64_t steps, std::int64_t n, F&& fn)
{
    kernels::over_blocks(n, lane_threads(steps, n), std::forward<F>(fn));
}

// Runs r on up to get_num_threads() threads. Wide (over_lanes splits it): each thread runs every
// step over its block of lanes. Narrow and long, on three threads or more: the two-pass chunked scan. Each thread runs
// its chunk of steps from a zero state (the first from the real one) and the product of its
// coefficients; then, one chunk after another, the true state entering each chunk is known (the
// end of the previous chunk plus its product times the state entering it); last, each chunk
// after the first adds the running product of its coefficients times that state to every step.
// On two threads that cannot win (each runs half the steps, then one of them the second half
// again, reading memory again), so a narrow recurrence there runs on one.
template <class T> void run_recurrence(const Recurrence<T>& r)
{
    if (lane_threads(r.steps, r.n) > 1)
        return over_lanes(r.steps, r.n, [&](std::int64_t i0, std::int64_t i1) { r.run(r.init, 0, r.steps, i0, i1); });
    const std::int64_t threads =
        r.steps * r.n < kernels::kThreadedElements ? 1 : std::min<std::int64_t>(get_num_threads(), r.steps);
    if (threads < 3) return r.run(r.init, 0, r.steps, 0, r.n);
    const std::int64_t chunks = threads, n = r.n;
    const auto first_step = [&](std::int64_t k) { return r.steps * k / chunks; };
    std::vector<T> product(static_cast<std::size_t>(chunks * n)), entering(static_cast<std::size_t>(chunks * n));
    kernels::run_tasks(chunks, [&](std::int64_t k) {
        const std::int64_t s0 = first_step(k), s1 = first_step(k + 1);
        r.run(k == 0 ? r.init : nullptr, s0, s1, 0, n);
        if (k == 0) return;
        T* p = product.data() + k * n;
        std::copy(r.coefficient(s0), r.coefficient(s0) + n, p);
        for (std::int64_t s = s0 + 1; s < s1; ++s) {
            const T* cs = r.coefficient(s);
            for (std::int64_t i = 0; i < n; ++i) p[i] *= cs[i];
        }
    });
    for (std::int64_t k = 1; k < chunks; ++k) {
        const T* end = r.h + r.row(first_step(k) - 1);  // chunk k-1's last step, from a zero state
        T* in = entering.data() + k * n;
        const T *before = entering.data() + (k - 1) * n, *p = product.data() + (k - 1) * n;
        for (std::int64_t i = 0; i < n; ++i) in[i] = k == 1 ? end[i] : end[i] + p[i] * before[i];
    }
    kernels::run_tasks(chunks - 1, [&](std::int64_t j) {
        const std::int64_t k = j + 1;
        const T* in = entering.data() + k * n;
        std::vector<T> running(static_cast<std::size_t>(n), T(1));
        for (std::int64_t s = first_step(k); s < first_step(k + 1); ++s) {
            const T* cs = r.coefficient(s);
            T* hs = r.h + r.row(s);
            for (std::int64_t i = 0; i < n; ++i) {
                running[std::size_t(i)] *= cs[i];
                hs[i] += running[std::size_t(i)] * in[i];
            }
        }
    });
}

// h over contiguous [steps, n] arrays from h0 (none: zeros), t = 0 upward or downward when `reverse`.
template <class T>
void forward_recurrence(const T* a, const T* b, const T* h0, T* h, std::int64_t steps, std::int64_t n, bool reverse)
{
    run_recurrence(Recurrence<T>{a, 0, b, h0, h, steps, n, reverse});
}

// The backward of forward_recurrence, the other way in time: g_t = dh_t + a_next g_next (the step
// processed just after t in forward), the same recurrence, into db; then da_t = g_t * h_before(t)
// and dh0 = a_first g_first.
template <class T>
void backward_recurrence(const T* a, const T* h, const T* h0, const T* dh, T* da, T* db, T* dh0, std::int64_t steps,
                         std::int64_t n, bool reverse)
{
    // Run backward (order !reverse), step s's coefficient is a at the time processed before it
    // here: one row later in time when this order counts down, one row earlier when it counts up.
    run_recurrence(Recurrence<T>{a, reverse ? -n : n, dh, nullptr, db, steps, n, !reverse});
    over_lanes(steps, n, [&](std::int64_t i0, std::int64_t i1) {
        for (std::int64_t t = 0; t < steps; ++t) {
            const std::int64_t earlier = reverse ? t + 1 : t - 1;
            const T* before = earlier < 0 || earlier >= steps ? h0 : h + earlier * n;
            const T* gt = db + t * n;
            T* dat = da + t * n;
            for (std::int64_t i = i0; i < i1; ++i) dat[i] = before ? gt[i] * before[i] : T(0);
        }
    });
    const std::int64_t first = reverse ? steps - 1 : 0;
    if (dh0)
        for (std::int64_t i = 0; i < n; ++i) dh0[i] = a[first * n + i] * db[first * n + i];
}

// One step of the log recurrence over lanes [i0, i1), from the state before it: l = log(exp(u) +
// exp(lb)) for u = la + before, without overflow, exact when either is -inf. Branch-free (exp_of,
// log1p_of and select_of vectorise for float) and compiled for AVX2 as well, as the step below.
template <class T>
LOOM_VECTOR_CLONES void log_step(const T* __restrict la, const T* __restrict lb, const T* __restrict before,
                                 T* __restrict l, std::int64_t i0, std::int64_t i1)
{
    constexpr T minus_inf = -std::numeric_limits<T>::infinity();
    for (std::int64_t i = i0; i < i1; ++i) {
        const T u = la[i] + before[i], v = lb[i];
        const T sum = std::max(u, v) + log1p_of(exp_of(-std::abs(u - v)));
        l[i] = select_of(u == minus_inf, v, select_of(v == minus_inf, u, sum));
    }
}

// One step of its backward over lanes [i0, i1): g = dl + w_later g (g and w_later carried from
// the step processed before), w = exp(la + l_before - l), dla = g w, dlb = g (1 - w).
template <class T>
LOOM_VECTOR_CLONES void log_step_backward(const T* __restrict dl, const T* __restrict la, const T* __restrict before,
                                          const T* __restrict l, T* __restrict dla, T* __restrict dlb,
                                          T* __restrict g, T* __restrict w_later, std::int64_t i0, std::int64_t i1)
{
    for (std::int64_t i = i0; i < i1; ++i) {
        const T gt = dl[i] + w_later[i] * g[i], w = exp_of(la[i] + before[i] - l[i]);
        dla[i] = gt * w;
        dlb[i] = gt - gt * w;
        g[i] = gt;
        w_later[i] = w;
    }
}

// The recurrence in log space over contiguous [steps, n] arrays: l_t = log(exp(la_t + l_before)
// + exp(lb_t)), from lh0 (none: the first step is lb alone), t upward or downward when `reverse`;
// lanes split across threads (each has a transcendental per element: no chunked scan).
template <class T>
void run_log_recurrence(const T* la, const T* lb, const T* lh0, T* l, std::int64_t steps, std::int64_t n, bool reverse)
{
    over_lanes(steps, n, [&](std::int64_t i0, std::int64_t i1) {
        for (std::int64_t s = 0; s < steps; ++s) {
            const std::int64_t t = reverse ? steps - 1 - s : s;
            const T* prev = s == 0 ? lh0 : l + (reverse ? t + 1 : t - 1) * n;
            if (prev) log_step(la + t * n, lb + t * n, prev, l + t * n, i0, i1);
            else std::copy(lb + t * n + i0, lb + t * n + i1, l + t * n + i0);
        }
    });
}

// Its backward, the other way in time. w_t = exp(la_t + l_before - l_t) is the share of the
// carried state in l_t (0 at a first step without lh0): g_t = dl_t + w_later g_later,
// dla_t = g_t w_t, dlb_t = g_t (1 - w_t), dlh0 = g_first w_first.
template <class T>
void run_log_recurrence_backward(const T* la, const T* l, const T* lh0, const T* dl, T* dla, T* dlb, T* dlh0,
                                 std::int64_t steps, std::int64_t n, bool reverse)
{
    over_lanes(steps, n, [&](std::int64_t i0, std::int64_t i1) {
        std::vector<T> g(static_cast<std::size_t>(n), T(0)), w_later(static_cast<std::size_t>(n), T(0));
        for (std::int64_t s = 0; s < steps; ++s) {
            const std::int64_t t = reverse ? s : steps - 1 - s;
            const T* before = s == steps - 1 ? lh0 : l + (reverse ? t + 1 : t - 1) * n;
            if (before) {
                log_step_backward(dl + t * n, la + t * n, before, l + t * n, dla + t * n, dlb + t * n, g.data(),
                                  w_later.data(), i0, i1);
                continue;
            }
            for (std::int64_t i = i0; i < i1; ++i) {  // the first step, from no state: w = 0
                const T gt = dl[t * n + i] + w_later[std::size_t(i)] * g[std::size_t(i)];
                dla[t * n + i] = T(0);
                dlb[t * n + i] = gt;
                g[std::size_t(i)] = gt;
                w_later[std::size_t(i)] = T(0);
            }
        }
        if (dlh0)
            for (std::int64_t i = i0; i < i1; ++i) dlh0[i] = g[std::size_t(i)] * w_later[std::size_t(i)];
    });
}

// One step of one channel of the selective scan over its n states: h = exp(d A) before + du B.
// A loop of its own, so that it vectorises (exp_of for float), compiled for AVX2 as well.
template <class T>
LOOM_VECTOR_CLONES void selective_step(const T* __restrict A, const T* __restrict before, const T* __restrict B, T d,
                                       T du, T* __restrict h, std::int64_t n)
{
    for (std::int64_t i = 0; i < n; ++i) h[i] = exp_of(d * A[i]) * before[i] + du * B[i];
}

// Its backward for one channel, given gy = dL/dy_t and g = dL/dh_t from later steps (carried back
// to dL/dh_{t-1} on return): adds into dA, dB and dC, and leaves in parts_delta and parts_u the
// terms that sum to dL/d(delta) and dL/du (summed by the caller: a sum would not vectorise).
template <class T>
LOOM_VECTOR_CLONES void selective_step_backward(const T* __restrict A, const T* __restrict before,
                                                const T* __restrict B, const T* __restrict C, const T* __restrict h,
                                                T d, T u, T gy, T* __restrict g, T* __restrict dA, T* __restrict dB,
                                                T* __restrict dC, T* __restrict parts_delta, T* __restrict parts_u,
                                                std::int64_t n)
{
    for (std::int64_t i = 0; i < n; ++i) {
        const T gi = g[i] + gy * C[i], a = exp_of(d * A[i]), d_exponent = gi * before[i] * a;
        dC[i] += gy * h[i];
        dA[i] += d_exponent * d;
        dB[i] += gi * d * u;
        parts_delta[i] = d_exponent * A[i] + gi * B[i] * u;
        parts_u[i] = gi * B[i];
        g[i] = gi * a;
    }
}

// The selective scan's arrays, contiguous: u and delta [T, Bt, E], A [E, N], B and C [T, Bt, N],
// h0 [Bt, E, N] (null: zeros). Lane (b, e, n) runs h = exp(delta A) h + delta B u; y sums C h over n.
template <class T> struct SelectiveScan {
    const T *u, *delta, *A, *B, *C, *h0;
    std::int64_t steps, batch, E, N;

    std::int64_t row(std::int64_t t, std::int64_t b) const { return t * batch + b; }
    const T* h_before(const T* h, std::int64_t t, std::int64_t b, const T* zeros) const
    {
        if (t > 0) return h + row(t - 1, b) * E * N;
        return h0 ? h0 + b * E * N : zeros;
    }

    // Sequences [b0, b1): every h_t into h [T, Bt, E, N], y [T, Bt, E].
    void forward(T* h, T* y, std::int64_t b0, std::int64_t b1) const
    {
        const std::vector<T> zeros(static_cast<std::size_t>(E * N), T(0));
        for (std::int64_t b = b0; b < b1; ++b)
            for (std::int64_t t = 0; t < steps; ++t) {
                const std::int64_t r = row(t, b);
                const T *before = h_before(h, t, b, zeros.data()), *Bt = B + r * N, *Ct = C + r * N;
                for (std::int64_t e = 0; e < E; ++e) {
                    const T d = delta[r * E + e];
                    T* he = h + (r * E + e) * N;
                    selective_step(A + e * N, before + e * N, Bt, d, d * u[r * E + e], he, N);
                    T acc = 0;
                    for (std::int64_t n = 0; n < N; ++n) acc += Ct[n] * he[n];
                    y[r * E + e] = acc;
                }
            }
    }

    // Its backward over sequences [b0, b1), the other way in time: g (dL/dh_t, carried back as
    // g exp(delta_t A)) gets C_t dy_t at each step and dh_last at the last. dA is added into (the
    // caller's buffer for this block of sequences); every other gradient is written.
    void backward(const T* h, const T* dy, const T* dh_last, T* du, T* ddelta, T* dA, T* dB, T* dC, T* dh0,
                  std::int64_t b0, std::int64_t b1) const
    {
        const std::vector<T> zeros(static_cast<std::size_t>(E * N), T(0));
        std::vector<T> g(static_cast<std::size_t>(E * N)), parts_delta(static_cast<std::size_t>(N)),
            parts_u(static_cast<std::size_t>(N));
        for (std::int64_t b = b0; b < b1; ++b) {
            if (dh_last) std::copy(dh_last + b * E * N, dh_last + (b + 1) * E * N, g.begin());
            else std::fill(g.begin(), g.end(), T(0));
            for (std::int64_t t = steps; t-- > 0;) {
                const std::int64_t r = row(t, b);
                const T* before = h_before(h, t, b, zeros.data());
                T *dBt = dB + r * N, *dCt = dC + r * N;
                std::fill(dBt, dBt + N, T(0));
                std::fill(dCt, dCt + N, T(0));
                for (std::int64_t e = 0; e < E; ++e) {
                    const T d = delta[r * E + e];
                    selective_step_backward(A + e * N, before + e * N, B + r * N, C + r * N, h + (r * E + e) * N, d,
                                            u[r * E + e], dy ? dy[r * E + e] : T(0), g.data() + e * N, dA + e * N,
                                            dBt, dCt, parts_delta.data(), parts_u.data(), N);
                    T d_delta = 0, d_u = 0;
                    for (std::int64_t n = 0; n < N; ++n) {
                        d_delta += parts_delta[std::size_t(n)];
                        d_u += parts_u[std::size_t(n)];
                    }
                    ddelta[r * E + e] = d_delta;
                    du[r * E + e] = d_u * d;
                }
            }
            if (dh0) std::copy(g.begin(), g.end(), dh0 + b * E * N);
        }
    }
};

// fn(k, b0, b1) on each of up to get_num_threads() blocks of the batch, when there is work enough.
template <class F> void over_sequences(std::int64_t batch, std::int64_t work, F&& fn)
{
    const std::int64_t threads =
        work < kernels::kThreadedElements ? 1 : std::min<std::int64_t>(get_num_threads(), batch);
    if (threads <= 1) return fn(std::int64_t(0), std::int64_t(0), batch);
    kernels::run_tasks(threads, [&](std::int64_t k) {
        const auto [b0, b1] = kernels::block(batch, k, threads);
        fn(k, b0, b1);
    });
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
        forward_recurrence<T>(ac.data_ptr<T>(), bc.data_ptr<T>(), hc.defined() ? hc.data_ptr<T>() : nullptr,
                          h.data_ptr<T>(), steps, n, reverse);
    });
    return record(op, {a, b, h0}, std::move(h), {a, h0, h}, [reverse](const BackwardContext& c) {
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
                backward_recurrence<T>(ac.data_ptr<T>(), kernels::contiguous(h).data_ptr<T>(),
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

std::pair<Tensor, Tensor> selective_scan(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                                         const Tensor& C, const Tensor& h0)
{
    const autograd::detail::ProfiledOp profiled("selective_scan");
    const char* op = "selective_scan";
    for (const Tensor* t : {&u, &delta, &A, &B, &C})
        LOOM_CHECK(t->defined(), op, "expects u, delta, A, B and C, got an undefined tensor");
    LOOM_CHECK(u.dim() == 3 && u.size(0) >= 1, op, "expects u [T, B, E] with at least one step, got shape {}",
               u.sizes());
    LOOM_CHECK(is_floating(u.dtype()), op, "expects a float dtype, got u of {}", u.dtype());
    const std::int64_t T = u.size(0), Bt = u.size(1), E = u.size(2);
    LOOM_CHECK(A.dim() == 2 && A.size(0) == E, op, "expects A [E, N] with E = {}, got shape {}", E, A.sizes());
    const std::int64_t N = A.size(1);
    const std::pair<const char*, const Tensor*> named[] = {{"delta", &delta}, {"A", &A}, {"B", &B}, {"C", &C}, {"h0", &h0}};
    const Shape expected[] = {u.sizes(), A.sizes(), {T, Bt, N}, {T, Bt, N}, {Bt, E, N}};
    for (std::size_t k = 0; k < 5; ++k) {
        const auto [name, t] = named[k];
        if (!t->defined()) continue;  // only h0 may be (checked above)
        LOOM_CHECK(t->sizes() == expected[k] && t->dtype() == u.dtype(), op,
                   "expects {} of shape {} and dtype {}, got shape {} and dtype {}", name, expected[k], u.dtype(),
                   t->sizes(), t->dtype());
    }
    const Tensor uc = kernels::contiguous(u), dc = kernels::contiguous(delta), Ac = kernels::contiguous(A),
                 Bc = kernels::contiguous(B), Cc = kernels::contiguous(C);
    const Tensor hc = h0.defined() ? kernels::contiguous(h0) : Tensor();
    Tensor h = empty({T, Bt, E, N}, u.dtype()), y = empty({T, Bt, E}, u.dtype());
    dispatch_floating(op, u.dtype(), [&]<class S>() {
        const SelectiveScan<S> scan{uc.data_ptr<S>(), dc.data_ptr<S>(), Ac.data_ptr<S>(), Bc.data_ptr<S>(),
                                    Cc.data_ptr<S>(), hc.defined() ? hc.data_ptr<S>() : nullptr, T, Bt, E, N};
        over_sequences(Bt, h.numel(), [&](std::int64_t, std::int64_t b0, std::int64_t b1) {
            scan.forward(h.data_ptr<S>(), y.data_ptr<S>(), b0, b1);
        });
    });
    Tensor h_last = kernels::clone(kernels::select(h, 0, T - 1));  // its own bytes: a state may be written in place
    const Tensor inputs[] = {u, delta, A, B, C, h0}, outputs[] = {y, h_last};
    const Tensor saved[] = {u, delta, A, B, C, h0, h};  // the inputs themselves: under create_graph they carry history
    autograd::internal::record_outputs(op, inputs, outputs, saved, [](const BackwardContext& c) {
        const Tensor &u = c.saved[0], &delta = c.saved[1], &A = c.saved[2], &B = c.saved[3], &C = c.saved[4],
                     &h0 = c.saved[5];
        const Tensor &dy = c.grads[0], &dh_last = c.grads[1];
        if (!c.create_graph) {
            // One fused pass back over the saved states; the path below records the same with ops.
            const Tensor &h = c.saved[6];
            const std::int64_t Bt = u.size(1);
            const Tensor uc = kernels::contiguous(u), dc = kernels::contiguous(delta), Ac = kernels::contiguous(A),
                         Bc = kernels::contiguous(B), Cc = kernels::contiguous(C);
            const Tensor hc = h0.defined() ? kernels::contiguous(h0) : Tensor();
            const Tensor dyc = dy.defined() ? kernels::contiguous(dy) : Tensor(),
                         dhc = dh_last.defined() ? kernels::contiguous(dh_last) : Tensor();
            Tensor du = empty(u.sizes(), u.dtype()), ddelta = empty(u.sizes(), u.dtype());
            Tensor dB = empty(B.sizes(), u.dtype()), dC = empty(C.sizes(), u.dtype());
            Tensor dh0 = c.needs[5] ? empty(h0.sizes(), u.dtype()) : Tensor();
            const std::int64_t blocks = std::max<std::int64_t>(1, std::min<std::int64_t>(get_num_threads(), Bt));
            Tensor dA_parts = zeros({blocks, A.size(0), A.size(1)}, u.dtype());  // summed after: blocks run at once
            dispatch_floating("selective_scan", u.dtype(), [&]<class S>() {
                const SelectiveScan<S> scan{uc.data_ptr<S>(), dc.data_ptr<S>(), Ac.data_ptr<S>(), Bc.data_ptr<S>(),
                                            Cc.data_ptr<S>(), hc.defined() ? hc.data_ptr<S>() : nullptr,
                                            u.size(0), Bt, A.size(0), A.size(1)};
                over_sequences(Bt, h.numel(), [&](std::int64_t k, std::int64_t b0, std::int64_t b1) {
                    scan.backward(h.data_ptr<S>(), dyc.defined() ? dyc.data_ptr<S>() : nullptr,
                                  dhc.defined() ? dhc.data_ptr<S>() : nullptr, du.data_ptr<S>(), ddelta.data_ptr<S>(),
                                  dA_parts.data_ptr<S>() + k * A.numel(), dB.data_ptr<S>(), dC.data_ptr<S>(),
                                  dh0.defined() ? dh0.data_ptr<S>() : nullptr, b0, b1);
                });
            });
            const auto wanted = [&](std::size_t k, Tensor g) { return c.needs[k] ? std::move(g) : Tensor(); };
            return Grads{wanted(0, du), wanted(1, ddelta), wanted(2, kernels::sum_to(dA_parts, A.sizes())),
                         wanted(3, dB), dy.defined() ? wanted(4, dC) : Tensor(), dh0};  // C reaches y alone
        }
        // The same with ops, the states computed again from the inputs so that they carry history.
        const Tensor decay = exp(delta.unsqueeze(3) * A), Bx = B.unsqueeze(2);  // [T, B, E, N], [T, B, 1, N]
        const Tensor h = linear_recurrence(decay, (delta * u).unsqueeze(3) * Bx, h0);
        const Tensor step_zeros = zeros_like(h.select(0, 0));
        const Tensor from_y = dy.defined() ? dy.unsqueeze(3) * C.unsqueeze(2) : zeros_like(h);
        // dL/dh_t = from_y_t + decay_{t+1} dL/dh_{t+1}, from dh_last after the last step.
        const Tensor g = linear_recurrence(shifted(decay, ones_like(step_zeros), true), from_y, dh_last, true);
        const Tensor d_exponent = g * shifted(h, h0.defined() ? h0 : step_zeros, false) * decay;
        const Tensor g_B = (g * Bx).sum({3});  // [T, B, E]
        Grads grads(6);
        if (c.needs[0]) grads[0] = g_B * delta;
        if (c.needs[1]) grads[1] = (d_exponent * A).sum({3}) + g_B * u;
        if (c.needs[2]) grads[2] = (d_exponent * delta.unsqueeze(3)).sum({0, 1});
        if (c.needs[3]) grads[3] = (g * (delta * u).unsqueeze(3)).sum({2});
        if (c.needs[4] && dy.defined()) grads[4] = (dy.unsqueeze(3) * h).sum({2});
        if (c.needs[5]) grads[5] = decay.select(0, 0) * g.select(0, 0);
        return grads;
    });
    return {y, h_last};
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
    return record(op, {log_a, log_b, log_h0}, std::move(l), {log_a, log_h0, l}, [reverse](const BackwardContext& c) {
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
