// Fused recurrent layers: per layer and direction, the input projection of all steps is one GEMM,
// each step is one GEMM plus one gate kernel, and backpropagation through time is written by
// hand in one tape entry whose weight gradients are one GEMM over all steps. The composed path
// (the cells' equations run op by op) computes the same values; tests hold them to 1e-12.
#include "fused_recurrent.hpp"

#include <cblas.h>

#include <cmath>

#include "../core/kernels.hpp"
#include "../core/math.hpp"

namespace loom::nn::detail {

namespace {

// C [M, N] = alpha * op(A) op(B) + beta * C, all row-major and contiguous.
template <class T>
void gemm(bool trans_a, bool trans_b, std::int64_t M, std::int64_t N, std::int64_t K, const T* A, const T* B,
          T beta, T* C)
{
    if (M == 0 || N == 0) return;
    const int lda = int(trans_a ? M : K), ldb = int(trans_b ? K : N);
    const auto ta = trans_a ? CblasTrans : CblasNoTrans, tb = trans_b ? CblasTrans : CblasNoTrans;
    if constexpr (std::is_same_v<T, float>)
        cblas_sgemm(CblasRowMajor, ta, tb, int(M), int(N), int(K), 1.0f, A, lda, B, ldb, beta, C, int(N));
    else
        cblas_dgemm(CblasRowMajor, ta, tb, int(M), int(N), int(K), 1.0, A, lda, B, ldb, beta, C, int(N));
}

template <class T> T sigmoid_of(T v) { return T(1) / (T(1) + std::exp(-v)); }

// rows [n, width] += bias [width]
template <class T> void add_bias(T* rows, std::int64_t n, std::int64_t width, const Tensor& bias)
{
    if (!bias.defined()) return;
    const T* b = bias.data_ptr<T>();
    for (std::int64_t r = 0; r < n; ++r)
        for (std::int64_t j = 0; j < width; ++j) rows[r * width + j] += b[j];
}

// out [width] = sum of rows [n, width]
template <class T> Tensor column_sums(const T* rows, std::int64_t n, std::int64_t width, DType dtype)
{
    Tensor out = zeros({width}, dtype);
    T* o = out.data_ptr<T>();
    for (std::int64_t r = 0; r < n; ++r)
        for (std::int64_t j = 0; j < width; ++j) o[j] += rows[r * width + j];
    return out;
}

struct Dims {
    std::int64_t T, B, I, H, G;
};

template <class T> RecurrentOutput run(CellKind kind, Nonlinearity nl, const Tensor& x_in, const FusedWeights& w,
                                       const State& initial, const std::vector<std::int64_t>& lengths, bool reverse,
                                       std::function<void(const Tensor&)> on_grad_h)
{
    const DType dt = x_in.dtype();
    const Tensor x = kernels::contiguous(x_in);
    const Tensor w_ih = kernels::contiguous(w.w_ih), w_hh = kernels::contiguous(w.w_hh);
    const Dims d{x.size(0), x.size(1), x.size(2), w_hh.size(1), w_hh.size(0) / w_hh.size(1)};
    const std::int64_t BH = d.B * d.H, GH = d.G * d.H;
    const bool lstm = kind == CellKind::LSTM, gru = kind == CellKind::GRU;
    const auto active = [&](std::int64_t t, std::int64_t b) { return lengths.empty() || t < lengths[b]; };

    // Input projection of every step: one GEMM.
    Tensor gx = empty({d.T, d.B, GH}, dt);
    gemm<T>(false, true, d.T * d.B, GH, d.I, x.data_ptr<T>(), w_ih.data_ptr<T>(), T(0), gx.data_ptr<T>());
    add_bias<T>(gx.data_ptr<T>(), d.T * d.B, GH, w.b_ih);

    // What backward needs, per step: the state entering it and the gate activations.
    Tensor h_prev = empty({d.T, d.B, d.H}, dt), gates = empty({d.T, d.B, GH}, dt);
    Tensor c_prev = lstm ? empty({d.T, d.B, d.H}, dt) : Tensor(), c_new = lstm ? empty({d.T, d.B, d.H}, dt) : Tensor();
    Tensor gh_n = gru ? empty({d.T, d.B, d.H}, dt) : Tensor();  // h W_hn + b_hn, which the reset gate scales
    Tensor y = zeros({d.T, d.B, d.H}, dt);
    Tensor h = initial.empty() ? zeros({d.B, d.H}, dt) : kernels::clone(initial[0]);
    Tensor c = lstm ? (initial.size() > 1 ? kernels::clone(initial[1]) : zeros({d.B, d.H}, dt)) : Tensor();
    Tensor gh = empty({d.B, GH}, dt);
    T *ph = h.data_ptr<T>(), *pgh = gh.data_ptr<T>(), *py = y.data_ptr<T>();
    T* pc = lstm ? c.data_ptr<T>() : nullptr;

    for (std::int64_t s = 0; s < d.T; ++s) {
        const std::int64_t t = reverse ? d.T - 1 - s : s;
        std::copy(ph, ph + BH, h_prev.data_ptr<T>() + t * BH);
        if (lstm) std::copy(pc, pc + BH, c_prev.data_ptr<T>() + t * BH);
        gemm<T>(false, true, d.B, GH, d.H, ph, w_hh.data_ptr<T>(), T(0), pgh);  // one GEMM per step
        add_bias<T>(pgh, d.B, GH, w.b_hh);
        const T* pgx = gx.data_ptr<T>() + t * d.B * GH;
        T* pg = gates.data_ptr<T>() + t * d.B * GH;
        for (std::int64_t b = 0; b < d.B; ++b) {  // the fused gate kernel
            const T *xb = pgx + b * GH, *hb = pgh + b * GH;
            T* g = pg + b * GH;
            const bool on = active(t, b);
            for (std::int64_t j = 0; j < d.H; ++j) {
                T h_new;
                const std::int64_t k = b * d.H + j;
                if (lstm) {
                    const T i = sigmoid_of(xb[j] + hb[j]), f = sigmoid_of(xb[d.H + j] + hb[d.H + j]);
                    const T gg = tanh_of(xb[2 * d.H + j] + hb[2 * d.H + j]);
                    const T o = sigmoid_of(xb[3 * d.H + j] + hb[3 * d.H + j]);
                    g[j] = i, g[d.H + j] = f, g[2 * d.H + j] = gg, g[3 * d.H + j] = o;
                    const T cn = f * pc[k] + i * gg;
                    c_new.data_ptr<T>()[t * BH + k] = cn;
                    h_new = o * tanh_of(cn);
                    if (on) pc[k] = cn;
                } else if (gru) {
                    const T r = sigmoid_of(xb[j] + hb[j]), z = sigmoid_of(xb[d.H + j] + hb[d.H + j]);
                    const T n = tanh_of(xb[2 * d.H + j] + r * hb[2 * d.H + j]);
                    g[j] = r, g[d.H + j] = z, g[2 * d.H + j] = n;
                    gh_n.data_ptr<T>()[t * BH + k] = hb[2 * d.H + j];
                    h_new = (1 - z) * n + z * ph[k];
                } else {
                    const T a = xb[j] + hb[j];
                    h_new = nl == Nonlinearity::Tanh ? tanh_of(a) : (a > 0 ? a : T(0));
                    g[j] = h_new;
                }
                if (on) {
                    ph[k] = h_new;
                    py[t * BH + k] = h_new;
                }
            }
        }
    }

    RecurrentOutput result{y, {h}};
    if (lstm) result.state.push_back(c);
    std::vector<Tensor> inputs = {x_in, w.w_ih, w.w_hh, w.b_ih, w.b_hh, initial.empty() ? Tensor() : initial[0],
                                  initial.size() > 1 ? initial[1] : Tensor()};
    if (!autograd::should_record(inputs)) return result;

    // ---- backpropagation through time, by hand ----
    auto backward = [=](const autograd::BackwardContext& ctx) {
        const auto active = [&](std::int64_t t, std::int64_t b) { return lengths.empty() || t < lengths[b]; };
        const Tensor &xs = ctx.saved[0], &w_ih_s = ctx.saved[1], &w_hh_s = ctx.saved[2];
        const T* pw_hh = w_hh_s.data_ptr<T>();
        Tensor dy = ctx.grads[0].defined() ? kernels::contiguous(ctx.grads[0]) : Tensor();
        Tensor dh = ctx.grads[1].defined() ? kernels::clone(ctx.grads[1]) : zeros({d.B, d.H}, dt);
        Tensor dc = lstm ? (ctx.grads.size() > 2 && ctx.grads[2].defined() ? kernels::clone(ctx.grads[2])
                                                                          : zeros({d.B, d.H}, dt))
                         : Tensor();
        Tensor dgx = zeros({d.T, d.B, GH}, dt);
        Tensor dgh = gru ? zeros({d.T, d.B, GH}, dt) : dgx;  // the same for RNN and LSTM
        Tensor grad_h = on_grad_h ? zeros({d.T, d.B, d.H}, dt) : Tensor();
        Tensor dh_prev = empty({d.B, d.H}, dt);
        T *pdh = dh.data_ptr<T>(), *pdc = lstm ? dc.data_ptr<T>() : nullptr, *pdhp = dh_prev.data_ptr<T>();
        for (std::int64_t s = d.T - 1; s >= 0; --s) {
            const std::int64_t t = reverse ? d.T - 1 - s : s;
            const T* g = gates.data_ptr<T>() + t * d.B * GH;
            const T* hp = h_prev.data_ptr<T>() + t * BH;
            T* dgx_t = dgx.data_ptr<T>() + t * d.B * GH;
            T* dgh_t = dgh.data_ptr<T>() + t * d.B * GH;
            std::fill(pdhp, pdhp + BH, T(0));
            for (std::int64_t b = 0; b < d.B; ++b) {
                if (!active(t, b)) continue;  // the state passed through unchanged: dh, dc carry on as they are
                const T* gb = g + b * GH;
                T *ax = dgx_t + b * GH, *ah = dgh_t + b * GH;
                for (std::int64_t j = 0; j < d.H; ++j) {
                    const std::int64_t k = b * d.H + j;
                    const T dh_new = pdh[k] + (dy.defined() ? dy.data_ptr<T>()[t * BH + k] : T(0));
                    if (grad_h.defined()) grad_h.data_ptr<T>()[t * BH + k] = dh_new;
                    if (lstm) {
                        const T i = gb[j], f = gb[d.H + j], gg = gb[2 * d.H + j], o = gb[3 * d.H + j];
                        const T tc = tanh_of(c_new.data_ptr<T>()[t * BH + k]);
                        const T dct = pdc[k] + dh_new * o * (1 - tc * tc);
                        ax[j] = dct * gg * i * (1 - i);
                        ax[d.H + j] = dct * c_prev.data_ptr<T>()[t * BH + k] * f * (1 - f);
                        ax[2 * d.H + j] = dct * i * (1 - gg * gg);
                        ax[3 * d.H + j] = dh_new * tc * o * (1 - o);
                        pdc[k] = dct * f;
                        pdh[k] = 0;
                    } else if (gru) {
                        const T r = gb[j], z = gb[d.H + j], n = gb[2 * d.H + j];
                        const T dn = dh_new * (1 - z) * (1 - n * n);
                        const T dr = dn * gh_n.data_ptr<T>()[t * BH + k] * r * (1 - r);
                        const T dz = dh_new * (hp[k] - n) * z * (1 - z);
                        ax[j] = ah[j] = dr;
                        ax[d.H + j] = ah[d.H + j] = dz;
                        ax[2 * d.H + j] = dn;
                        ah[2 * d.H + j] = dn * r;
                        pdh[k] = dh_new * z;  // the direct path h -> h'
                    } else {
                        const T hn = gb[j];
                        ax[j] = nl == Nonlinearity::Tanh ? dh_new * (1 - hn * hn) : (hn > 0 ? dh_new : T(0));
                        pdh[k] = 0;
                    }
                }
            }
            gemm<T>(false, false, d.B, d.H, GH, dgh_t, pw_hh, T(0), pdhp);  // through W_hh
            for (std::int64_t k = 0; k < BH; ++k) pdh[k] += pdhp[k];
        }
        if (on_grad_h) on_grad_h(grad_h);
        std::vector<Tensor> grads(7);
        const T *pdgx = dgx.data_ptr<T>(), *pdgh = dgh.data_ptr<T>();
        if (ctx.needs[0]) {
            grads[0] = empty({d.T, d.B, d.I}, dt);
            gemm<T>(false, false, d.T * d.B, d.I, GH, pdgx, w_ih_s.data_ptr<T>(), T(0), grads[0].data_ptr<T>());
        }
        if (ctx.needs[1]) {  // weight gradients: one GEMM over all steps
            grads[1] = empty({GH, d.I}, dt);
            gemm<T>(true, false, GH, d.I, d.T * d.B, pdgx, xs.data_ptr<T>(), T(0), grads[1].data_ptr<T>());
        }
        if (ctx.needs[2]) {
            grads[2] = empty({GH, d.H}, dt);
            gemm<T>(true, false, GH, d.H, d.T * d.B, pdgh, h_prev.data_ptr<T>(), T(0), grads[2].data_ptr<T>());
        }
        if (ctx.needs[3]) grads[3] = column_sums<T>(pdgx, d.T * d.B, GH, dt);
        if (ctx.needs[4]) grads[4] = column_sums<T>(pdgh, d.T * d.B, GH, dt);
        if (ctx.needs[5]) grads[5] = dh;
        if (ctx.needs[6]) grads[6] = dc;
        return grads;
    };
    std::vector<Tensor> outputs = {y, h};
    if (lstm) outputs.push_back(c);
    autograd::push_entry(kind == CellKind::LSTM ? "LSTM" : kind == CellKind::GRU ? "GRU" : "RNN", inputs, outputs,
                         std::vector<Tensor>{x, w_ih, w_hh}, backward);
    return result;
}

}  // namespace

RecurrentOutput fused_layer(CellKind kind, Nonlinearity nonlinearity, const Tensor& x, const FusedWeights& w,
                            const State& initial, const std::vector<std::int64_t>& lengths, bool reverse,
                            std::function<void(const Tensor&)> on_grad_h)
{
    return dispatch_floating("recurrent layer", x.dtype(), [&]<class T>() {
        return run<T>(kind, nonlinearity, x, w, initial, lengths, reverse, std::move(on_grad_h));
    });
}

}  // namespace loom::nn::detail
