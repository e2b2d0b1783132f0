// The built-in cell kinds, one type each, and the fused layer written once over them.
//
// A kind's type says how many gate blocks its weights hold, how many state tensors it carries
// and how many values per hidden unit a step keeps for backward; `step` and `step_backward`
// work on one sequence's row of H units through plain pointers (so the loops over units
// vectorise), and `composed` is the same step written with differentiable ops. Adding a fused
// kind is one such type and one row in `rows` below.
//
// The fused layer, per layer and direction: the input projection of all steps is one GEMM,
// each step one GEMM plus the kind's step over every row, and backpropagation through time is
// written by hand in one tape entry whose weight gradients are one GEMM over all steps. The
// composed path computes the same values; tests hold the two to 1e-12.
#include "cell_kinds.hpp"

#include <cblas.h>

#include <algorithm>
#include <cctype>
#include <climits>
#include <cmath>

#include "../core/kernels.hpp"
#include "../core/math.hpp"

namespace loom::nn {

namespace detail {

namespace {

// C [M, N] = op(A) op(B) + beta * C, all row-major and contiguous.
template <class T>
void gemm(bool trans_a, bool trans_b, std::int64_t M, std::int64_t N, std::int64_t K, const T* A, const T* B,
          T beta, T* C)
{
    if (M == 0 || N == 0) return;
    // BLAS takes int sizes: refuse what would wrap rather than compute on a truncated size.
    LOOM_CHECK(M <= INT_MAX && N <= INT_MAX && K <= INT_MAX, "recurrent layer",
               "a matrix product of [{}, {}] by [{}, {}] exceeds BLAS's int sizes", M, K, K, N);
    const int lda = int(trans_a ? M : K), ldb = int(trans_b ? K : N);
    const auto ta = trans_a ? CblasTrans : CblasNoTrans, tb = trans_b ? CblasTrans : CblasNoTrans;
    if constexpr (std::is_same_v<T, float>)
        cblas_sgemm(CblasRowMajor, ta, tb, int(M), int(N), int(K), 1.0f, A, lda, B, ldb, beta, C, int(N));
    else
        cblas_dgemm(CblasRowMajor, ta, tb, int(M), int(N), int(K), 1.0, A, lda, B, ldb, beta, C, int(N));
}

template <class T> T sigmoid_of(T v)
{
    if constexpr (std::is_same_v<T, float>) return sigmoid_float(v);
    else return T(1) / (T(1) + std::exp(-v));
}

// rows [n, width] += bias [width]; bias may be null.
template <class T> void add_bias(T* rows, std::int64_t n, std::int64_t width, const T* bias)
{
    if (!bias) return;
    for (std::int64_t r = 0; r < n; ++r)
        for (std::int64_t j = 0; j < width; ++j) rows[r * width + j] += bias[j];
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

Tensor hidden_projection(const Tensor& h, const Tensor& w_hh, const Tensor& b_hh)
{
    Tensor gh = matmul(h, w_hh.t());
    return b_hh.defined() ? gh + b_hh : gh;
}

// One sequence's row of one step, forward. The rows a step reads and writes never overlap, which
// the kinds' loops tell the compiler (GCC ivdep) so it vectorises them without alias checks.
template <class T> struct StepRow {
    const T* x;         // input projection x W_ih^T + b_ih, [G*H]
    const T* h;         // hidden projection h W_hh^T + b_hh, [G*H]
    const T* state[2];  // the state entering the step: h (and c), [H] each
    T* next[2];         // the state leaving it
    T* saved;           // [saved*H]: what step_backward needs
};

// One sequence's row of one step, backward.
template <class T> struct StepGradRow {
    const T* saved;
    const T* state[2];  // the state entering the step
    T* d_state[2];      // in: dL/d(state leaving the step); out: dL/d(state entering it), but for the W_hh path
    T* dx;              // out: dL/d(input projection), [G*H]
    T* dh;              // out: dL/d(hidden projection), [G*H]; the same as dx unless separate_hidden_grad
};

// h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh)  (or relu)
struct RNNKind {
    static constexpr const char* name = "RNN";
    static constexpr std::int64_t gates = 1, saved = 1;  // saved: h'
    static constexpr std::size_t states = 1;
    static constexpr bool separate_hidden_grad = false;

    template <class T> static void step(const StepRow<T>& r, std::int64_t H, Nonlinearity nl)
    {
#pragma GCC ivdep
        for (std::int64_t j = 0; j < H; ++j) {
            const T a = r.x[j] + r.h[j];
            const T h = nl == Nonlinearity::Tanh ? tanh_of(a) : (a > 0 ? a : T(0));
            r.saved[j] = h;
            r.next[0][j] = h;
        }
    }
    template <class T> static void step_backward(const StepGradRow<T>& r, std::int64_t H, Nonlinearity nl)
    {
#pragma GCC ivdep
        for (std::int64_t j = 0; j < H; ++j) {
            const T dh = r.d_state[0][j], h = r.saved[j];
            r.dx[j] = nl == Nonlinearity::Tanh ? dh * (1 - h * h) : (h > 0 ? dh : T(0));
            r.d_state[0][j] = 0;
        }
    }
    static State composed(const Tensor& gx, const State& s, const LayerWeights& w, Nonlinearity nl)
    {
        const Tensor pre = gx + hidden_projection(s[0], w.w_hh, w.b_hh);
        return {nl == Nonlinearity::Tanh ? tanh(pre) : relu(pre)};
    }
};

// i,f,g,o = split(x W_ih^T + b_ih + h W_hh^T + b_hh); c' = s(f) c + s(i) tanh(g); h' = s(o) tanh(c')
struct LSTMKind {
    static constexpr const char* name = "LSTM";
    static constexpr std::int64_t gates = 4, saved = 5;  // saved: i, f, g, o, tanh(c')
    static constexpr std::size_t states = 2;
    static constexpr bool separate_hidden_grad = false;

    template <class T> static void step(const StepRow<T>& r, std::int64_t H, Nonlinearity)
    {
        T* g = r.saved;
#pragma GCC ivdep
        for (std::int64_t j = 0; j < H; ++j) {
            const T i = sigmoid_of(r.x[j] + r.h[j]), f = sigmoid_of(r.x[H + j] + r.h[H + j]);
            const T gg = tanh_of(r.x[2 * H + j] + r.h[2 * H + j]), o = sigmoid_of(r.x[3 * H + j] + r.h[3 * H + j]);
            const T c = f * r.state[1][j] + i * gg, tc = tanh_of(c);
            g[j] = i, g[H + j] = f, g[2 * H + j] = gg, g[3 * H + j] = o, g[4 * H + j] = tc;
            r.next[1][j] = c;
            r.next[0][j] = o * tc;
        }
    }
    template <class T> static void step_backward(const StepGradRow<T>& r, std::int64_t H, Nonlinearity)
    {
        const T* g = r.saved;
#pragma GCC ivdep
        for (std::int64_t j = 0; j < H; ++j) {
            const T i = g[j], f = g[H + j], gg = g[2 * H + j], o = g[3 * H + j], tc = g[4 * H + j];
            const T dh = r.d_state[0][j];
            const T dc = r.d_state[1][j] + dh * o * (1 - tc * tc);
            r.dx[j] = dc * gg * i * (1 - i);
            r.dx[H + j] = dc * r.state[1][j] * f * (1 - f);
            r.dx[2 * H + j] = dc * i * (1 - gg * gg);
            r.dx[3 * H + j] = dh * tc * o * (1 - o);
            r.d_state[1][j] = dc * f;
            r.d_state[0][j] = 0;
        }
    }
    static State composed(const Tensor& gx, const State& s, const LayerWeights& w, Nonlinearity)
    {
        const auto g = (gx + hidden_projection(s[0], w.w_hh, w.b_hh)).chunk(4, 1);  // i, f, g, o
        const Tensor c = sigmoid(g[1]) * s[1] + sigmoid(g[0]) * tanh(g[2]);
        return {sigmoid(g[3]) * tanh(c), c};
    }
};

// r = s(x_r + h_r); z = s(x_z + h_z); n = tanh(x_n + r h_n); h' = (1 - z) n + z h, where
// x_* = x W_i*^T + b_i* and h_* = h W_h*^T + b_h*: the reset gate applies after the hidden matmul.
struct GRUKind {
    static constexpr const char* name = "GRU";
    static constexpr std::int64_t gates = 3, saved = 4;  // saved: r, z, n, h_n
    static constexpr std::size_t states = 1;
    static constexpr bool separate_hidden_grad = true;  // r scales h_n but not x_n

    template <class T> static void step(const StepRow<T>& r, std::int64_t H, Nonlinearity)
    {
        T* g = r.saved;
#pragma GCC ivdep
        for (std::int64_t j = 0; j < H; ++j) {
            const T rr = sigmoid_of(r.x[j] + r.h[j]), z = sigmoid_of(r.x[H + j] + r.h[H + j]);
            const T n = tanh_of(r.x[2 * H + j] + rr * r.h[2 * H + j]);
            g[j] = rr, g[H + j] = z, g[2 * H + j] = n, g[3 * H + j] = r.h[2 * H + j];
            r.next[0][j] = (1 - z) * n + z * r.state[0][j];
        }
    }
    template <class T> static void step_backward(const StepGradRow<T>& r, std::int64_t H, Nonlinearity)
    {
        const T* g = r.saved;
#pragma GCC ivdep
        for (std::int64_t j = 0; j < H; ++j) {
            const T rr = g[j], z = g[H + j], n = g[2 * H + j], h_n = g[3 * H + j];
            const T dh = r.d_state[0][j];
            const T dn = dh * (1 - z) * (1 - n * n);
            const T dr = dn * h_n * rr * (1 - rr);
            const T dz = dh * (r.state[0][j] - n) * z * (1 - z);
            r.dx[j] = r.dh[j] = dr;
            r.dx[H + j] = r.dh[H + j] = dz;
            r.dx[2 * H + j] = dn;
            r.dh[2 * H + j] = dn * rr;
            r.d_state[0][j] = dh * z;  // the direct path h -> h'
        }
    }
    static State composed(const Tensor& gx, const State& s, const LayerWeights& w, Nonlinearity)
    {
        const auto x = gx.chunk(3, 1), h = hidden_projection(s[0], w.w_hh, w.b_hh).chunk(3, 1);  // r, z, n
        const Tensor r = sigmoid(x[0] + h[0]), z = sigmoid(x[1] + h[1]);
        const Tensor n = tanh(x[2] + r * h[2]);
        return {(1.0 - z) * n + z * s[0]};
    }
};

template <class T> T* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; }

// The fused layer, written once over a kind K.
template <class T, class K> RecurrentOutput run(const FusedArgs& a)
{
    constexpr std::size_t S = K::states;
    const DType dt = a.x.dtype();
    // Every step's rows go to BLAS as one int-sized matrix: refuse before allocating anything.
    LOOM_CHECK(a.x.size(0) * a.x.size(1) <= INT_MAX, K::name,
               "T x B = {} x {} rows exceed what one BLAS call takes (2^31 - 1); split the batch or the sequence",
               a.x.size(0), a.x.size(1));
    const Tensor x = kernels::contiguous(a.x);
    const Tensor w_ih = kernels::contiguous(a.weights.w_ih), w_hh = kernels::contiguous(a.weights.w_hh);
    const Tensor b_ih = a.weights.b_ih.defined() ? kernels::contiguous(a.weights.b_ih) : Tensor();
    const Tensor b_hh = a.weights.b_hh.defined() ? kernels::contiguous(a.weights.b_hh) : Tensor();
    const std::int64_t steps = x.size(0), B = x.size(1), I = x.size(2), H = w_hh.size(1);
    const std::int64_t GH = K::gates * H, SH = K::saved * H, BH = B * H;
    const std::vector<std::int64_t> lengths = a.lengths;
    const bool reverse = a.reverse;
    const Nonlinearity nl = a.nonlinearity;
    const auto active = [lengths](std::int64_t t, std::int64_t b) { return lengths.empty() || t < lengths[b]; };

    // Input projection of every step: one GEMM.
    Tensor gx = empty({steps, B, GH}, dt);
    T* px = gx.data_ptr<T>();
    gemm<T>(false, true, steps * B, GH, I, x.data_ptr<T>(), w_ih.data_ptr<T>(), T(0), px);
    add_bias<T>(px, steps * B, GH, ptr_or_null<T>(b_ih));

    // What backward needs: each step's entering state and the values the kind saves.
    Tensor saved = empty({steps, B, SH}, dt), entering = empty({Shape::value_type(S), steps, B, H}, dt);
    Tensor y = zeros({steps, B, H}, dt), next = empty({Shape::value_type(S), B, H}, dt), gh = empty({B, GH}, dt);
    State state;
    for (std::size_t k = 0; k < S; ++k)
        state.push_back(k < a.initial.size() ? kernels::clone(a.initial[k]) : zeros({B, H}, dt));
    T *p_saved = saved.data_ptr<T>(), *p_entering = entering.data_ptr<T>(), *py = y.data_ptr<T>();
    T *p_next = next.data_ptr<T>(), *p_gh = gh.data_ptr<T>();
    T* p_state[2] = {state[0].data_ptr<T>(), S > 1 ? state[1].data_ptr<T>() : nullptr};
    const T *p_w_hh = w_hh.data_ptr<T>(), *p_b_hh = ptr_or_null<T>(b_hh);

    for (std::int64_t s = 0; s < steps; ++s) {
        const std::int64_t t = reverse ? steps - 1 - s : s;
        for (std::size_t k = 0; k < S; ++k) std::copy_n(p_state[k], BH, p_entering + (std::int64_t(k) * steps + t) * BH);
        gemm<T>(false, true, B, GH, H, p_state[0], p_w_hh, T(0), p_gh);  // one GEMM per step
        add_bias<T>(p_gh, B, GH, p_b_hh);
        for (std::int64_t b = 0; b < B; ++b) {
            const StepRow<T> row{px + (t * B + b) * GH, p_gh + b * GH,
                                 {p_state[0] + b * H, S > 1 ? p_state[1] + b * H : nullptr},
                                 {p_next + b * H, S > 1 ? p_next + BH + b * H : nullptr}, p_saved + (t * B + b) * SH};
            K::step(row, H, nl);
            if (!active(t, b)) continue;  // past its length a sequence keeps its state and outputs zero
            for (std::size_t k = 0; k < S; ++k) std::copy_n(row.next[k], H, p_state[k] + b * H);
            std::copy_n(row.next[0], H, py + t * BH + b * H);
        }
    }

    RecurrentOutput result{y, state};
    std::vector<Tensor> inputs = {a.x,
                                  a.weights.w_ih,
                                  a.weights.w_hh,
                                  a.weights.b_ih,
                                  a.weights.b_hh,
                                  a.initial.empty() ? Tensor() : a.initial[0],
                                  a.initial.size() > 1 ? a.initial[1] : Tensor()};
    if (!autograd::should_record(inputs)) return result;

    // ---- backpropagation through time, by hand ----
    auto backward = [=, on_grad_h = a.on_grad_h](const autograd::BackwardContext& ctx) {
        const Tensor &xs = ctx.saved[0], &w_ih_s = ctx.saved[1], &w_hh_s = ctx.saved[2];
        const Tensor dy = ctx.grads[0].defined() ? kernels::contiguous(ctx.grads[0]) : Tensor();
        State d_state;
        for (std::size_t k = 0; k < S; ++k)
            d_state.push_back(ctx.grads[1 + k].defined() ? kernels::clone(ctx.grads[1 + k]) : zeros({B, H}, dt));
        Tensor dgx = zeros({steps, B, GH}, dt);
        Tensor dgh = K::separate_hidden_grad ? zeros({steps, B, GH}, dt) : dgx;
        Tensor grad_h = on_grad_h ? zeros({steps, B, H}, dt) : Tensor();
        Tensor through_w_hh = empty({B, H}, dt);
        const T *p_dy = ptr_or_null<T>(dy), *p_saved = saved.data_ptr<T>(), *p_entering = entering.data_ptr<T>();
        const T* p_w_hh = w_hh_s.data_ptr<T>();
        T *p_dgx = dgx.data_ptr<T>(), *p_dgh = dgh.data_ptr<T>(), *p_grad_h = ptr_or_null<T>(grad_h);
        T* p_through = through_w_hh.data_ptr<T>();
        T* p_d[2] = {d_state[0].data_ptr<T>(), S > 1 ? d_state[1].data_ptr<T>() : nullptr};
        for (std::int64_t s = steps - 1; s >= 0; --s) {
            const std::int64_t t = reverse ? steps - 1 - s : s;
            for (std::int64_t b = 0; b < B; ++b) {
                if (!active(t, b)) continue;  // the state passed through unchanged: its gradient carries on
                T* dh = p_d[0] + b * H;
                if (p_dy)
                    for (std::int64_t j = 0; j < H; ++j) dh[j] += p_dy[t * BH + b * H + j];
                if (p_grad_h) std::copy_n(dh, H, p_grad_h + t * BH + b * H);
                const StepGradRow<T> row{p_saved + (t * B + b) * SH,
                                         {p_entering + t * BH + b * H, S > 1 ? p_entering + (steps + t) * BH + b * H : nullptr},
                                         {dh, S > 1 ? p_d[1] + b * H : nullptr},
                                         p_dgx + (t * B + b) * GH,
                                         p_dgh + (t * B + b) * GH};
                K::step_backward(row, H, nl);
            }
            gemm<T>(false, false, B, H, GH, p_dgh + t * B * GH, p_w_hh, T(0), p_through);  // through W_hh
            for (std::int64_t k = 0; k < BH; ++k) p_d[0][k] += p_through[k];
        }
        if (on_grad_h) on_grad_h(grad_h);
        std::vector<Tensor> grads(7);
        if (ctx.needs[0]) {
            grads[0] = empty({steps, B, I}, dt);
            gemm<T>(false, false, steps * B, I, GH, p_dgx, w_ih_s.data_ptr<T>(), T(0), grads[0].data_ptr<T>());
        }
        if (ctx.needs[1]) {  // weight gradients: one GEMM over all steps
            grads[1] = empty({GH, I}, dt);
            gemm<T>(true, false, GH, I, steps * B, p_dgx, xs.data_ptr<T>(), T(0), grads[1].data_ptr<T>());
        }
        if (ctx.needs[2]) {
            grads[2] = empty({GH, H}, dt);
            gemm<T>(true, false, GH, H, steps * B, p_dgh, p_entering, T(0), grads[2].data_ptr<T>());
        }
        if (ctx.needs[3]) grads[3] = column_sums<T>(p_dgx, steps * B, GH, dt);
        if (ctx.needs[4]) grads[4] = column_sums<T>(p_dgh, steps * B, GH, dt);
        for (std::size_t k = 0; k < S; ++k)
            if (ctx.needs[5 + k]) grads[5 + k] = d_state[k];
        return grads;
    };
    std::vector<Tensor> outputs = {y};
    outputs.insert(outputs.end(), state.begin(), state.end());
    autograd::push_entry(K::name, inputs, outputs, std::vector<Tensor>{x, w_ih, w_hh}, backward);
    return result;
}

template <class K> RecurrentOutput fused(const FusedArgs& args)
{
    return dispatch_floating(K::name, args.x.dtype(), [&]<class T>() { return run<T, K>(args); });
}

template <class K> constexpr CellKindRow row_of(CellKind kind)
{
    return {kind, K::name, K::gates, K::states, &K::composed, &fused<K>};
}

constexpr CellKindRow rows[] = {row_of<RNNKind>(CellKind::RNN), row_of<LSTMKind>(CellKind::LSTM),
                                row_of<GRUKind>(CellKind::GRU)};

}  // namespace

const CellKindRow& cell_kind_row(CellKind kind)
{
    for (const auto& r : rows)
        if (r.kind == kind) return r;
    fail("recurrent layer", "unknown cell kind {}", int(kind));
}

Tensor input_projection(const Tensor& x, const Tensor& w_ih, const Tensor& b_ih)
{
    Tensor gx = matmul(x, w_ih.t());
    return b_ih.defined() ? gx + b_ih : gx;
}

}  // namespace detail

const char* cell_kind_name(CellKind kind) { return detail::cell_kind_row(kind).name; }

CellKind cell_kind_from_name(std::string_view name)
{
    std::string known;
    for (const auto& r : detail::rows) {
        const std::string_view n = r.name;
        if (std::equal(name.begin(), name.end(), n.begin(), n.end(),
                       [](char a, char b) { return std::tolower(static_cast<unsigned char>(a)) == std::tolower(static_cast<unsigned char>(b)); }))
            return r.kind;
        known += fmt::format("{}{}", known.empty() ? "" : ", ", n);
    }
    fail("cell_kind_from_name", "unknown cell kind \"{}\" (expected one of {}, in any case)", name, known);
}

}  // namespace loom::nn
