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

#include <algorithm>
#include <cctype>
#include <climits>
#include <cmath>

#include "../core/kernels.hpp"
#include "../core/math.hpp"
#include "../autograd/ops.hpp"
#include "../autograd/profiler.hpp"
#include "../autograd/tape.hpp"

namespace loom::nn {

namespace detail {

namespace {

// rows [n, width] += bias [width]; bias may be null.
template <class T> void add_bias(T* rows, std::int64_t n, std::int64_t width, const T* bias)
{
    if (!bias) return;
    for (std::int64_t r = 0; r < n; ++r)
        for (std::int64_t j = 0; j < width; ++j) rows[r * width + j] += bias[j];
}

// rows [n, width] = bias [width] in every row; nothing when bias is null.
template <class T> void copy_bias(T* rows, std::int64_t n, std::int64_t width, const T* bias)
{
    if (!bias) return;
    for (std::int64_t r = 0; r < n; ++r) std::copy_n(bias, width, rows + r * width);
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
    T* grad_c;          // out, LSTM only, when asked: dL/dc of the state leaving the step (through h and the next step)
};

// h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh)  (or relu)
struct RNNKind {
    static constexpr const char* name = "RNN";
    static constexpr std::int64_t gates = 1, saved = 1;  // saved: h'
    static constexpr std::size_t states = 1;
    static constexpr bool separate_hidden_grad = false;

    template <class T> LOOM_VECTOR_CLONES static void step(const StepRow<T>& r, std::int64_t H, Nonlinearity nl)
    {
#pragma GCC ivdep
        for (std::int64_t j = 0; j < H; ++j) {
            const T a = r.x[j] + r.h[j];
            const T h = nl == Nonlinearity::Tanh ? tanh_of(a) : (a > 0 ? a : T(0));
            r.saved[j] = h;
            r.next[0][j] = h;
        }
    }
    template <class T> LOOM_VECTOR_CLONES static void step_backward(const StepGradRow<T>& r, std::int64_t H, Nonlinearity nl)
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
        const Tensor pre = gx + linear(s[0], w.w_hh, w.b_hh);
        return {nl == Nonlinearity::Tanh ? tanh(pre) : relu(pre)};
    }
};

// i,f,g,o = split(x W_ih^T + b_ih + h W_hh^T + b_hh); c' = s(f) c + s(i) tanh(g); h' = s(o) tanh(c')
struct LSTMKind {
    static constexpr const char* name = "LSTM";
    static constexpr std::int64_t gates = 4, saved = 5;  // saved: i, f, g, o, tanh(c')
    static constexpr std::size_t states = 2;
    static constexpr bool separate_hidden_grad = false;

    template <class T> LOOM_VECTOR_CLONES static void step(const StepRow<T>& r, std::int64_t H, Nonlinearity)
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
        // Two instances rather than a test in the loop, which would stop it vectorising.
        if (r.grad_c) step_backward_rows<true>(r, H);
        else step_backward_rows<false>(r, H);
    }
    template <bool KeepGradC, class T> LOOM_VECTOR_CLONES static void step_backward_rows(const StepGradRow<T>& r, std::int64_t H)
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
            if constexpr (KeepGradC) r.grad_c[j] = dc;
            r.d_state[1][j] = dc * f;
            r.d_state[0][j] = 0;
        }
    }
    static State composed(const Tensor& gx, const State& s, const LayerWeights& w, Nonlinearity)
    {
        const auto g = (gx + linear(s[0], w.w_hh, w.b_hh)).chunk(4, 1);  // i, f, g, o
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

    template <class T> LOOM_VECTOR_CLONES static void step(const StepRow<T>& r, std::int64_t H, Nonlinearity)
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
    template <class T> LOOM_VECTOR_CLONES static void step_backward(const StepGradRow<T>& r, std::int64_t H, Nonlinearity)
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
        const auto x = gx.chunk(3, 1), h = linear(s[0], w.w_hh, w.b_hh).chunk(3, 1);  // r, z, n
        const Tensor r = sigmoid(x[0] + h[0]), z = sigmoid(x[1] + h[1]);
        const Tensor n = tanh(x[2] + r * h[2]);
        return {(1.0 - z) * n + z * s[0]};
    }
};

template <class T> T* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; }

// One layer and direction of the fused kind K over a sequence, cut into segments of processing
// order: steps [s0, s1) cover the times [t0, t0 + n), n = s1 - s0, in one direction or the
// other. Without checkpointing the whole sequence is one segment whose buffers forward keeps
// for backward; with it, forward keeps only the state entering each segment, and backward
// recomputes a segment's buffers from it just before sweeping back through it. Both run the
// same code, so they compute the same numbers.
template <class T, class K> struct FusedLayer {
    static constexpr std::size_t S = K::states;
    Tensor x, w_ih, w_hh, b_ih, b_hh;
    Tensor w_hh_t;  // [H, GH]: W_hh transposed, set when a step's product is small (small_gemm)
    std::int64_t steps, B, I, H, GH, SH, BH;
    std::vector<std::int64_t> lengths;
    bool reverse;
    Nonlinearity nl;
    T* step_states[2] = {nullptr, nullptr};  // when set, forward writes every step's state here, [T, B, H] each

    bool active(std::int64_t t, std::int64_t b) const { return lengths.empty() || t < lengths[b]; }
    std::int64_t first_time(std::int64_t s0, std::int64_t s1) const { return reverse ? steps - s1 : s0; }
    std::int64_t time_of(std::int64_t s) const { return reverse ? steps - 1 - s : s; }

    // px [n, B, GH] = x[t0 : t0 + n] W_ih^T + b_ih
    void project(std::int64_t s0, std::int64_t s1, T* px) const
    {
        const std::int64_t t0 = first_time(s0, s1), rows = (s1 - s0) * B;
        // The bias goes in first and the product is added onto it (beta = 1): BLAS then skips
        // the pass that zeroes C for beta = 0, and no second pass adds the bias.
        const T* bias = ptr_or_null<T>(b_ih);
        copy_bias<T>(px, rows, GH, bias);
        kernels::gemm<T>("recurrent layer", false, true, rows, GH, I, x.data_ptr<T>() + t0 * B * I, w_ih.data_ptr<T>(), T(bias ? 1 : 0), px);
    }

    // Runs steps [s0, s1) from `state` (updated in place). Keeps what backward needs in `saved`
    // [n, B, SH] and `entering` [S, n, B, H] when they are given (else `saved` is one step's
    // scratch, [B, SH]), and writes outputs into y when it is given.
    void forward(std::int64_t s0, std::int64_t s1, const T* px, T* saved, bool keep_saved, T* entering,
                 T* const* state, T* next, T* gh, T* y) const
    {
        const std::int64_t t0 = first_time(s0, s1), n = s1 - s0;
        const T *p_w_hh = w_hh.data_ptr<T>(), *p_b_hh = ptr_or_null<T>(b_hh);
        for (std::int64_t s = s0; s < s1; ++s) {
            const std::int64_t t = time_of(s), u = t - t0;
            if (entering)
                for (std::size_t k = 0; k < S; ++k) std::copy_n(state[k], BH, entering + (std::int64_t(k) * n + u) * BH);
            if (w_hh_t.defined()) {
                kernels::small_gemm<T>(B, GH, H, state[0], w_hh_t.data_ptr<T>(), gh);
                add_bias<T>(gh, B, GH, p_b_hh);
            } else {  // one GEMM per step, onto the bias as in project()
                copy_bias<T>(gh, B, GH, p_b_hh);
                kernels::gemm<T>("recurrent layer", false, true, B, GH, H, state[0], p_w_hh, T(p_b_hh ? 1 : 0), gh);
            }
            for (std::int64_t b = 0; b < B; ++b) {
                const StepRow<T> row{px + (u * B + b) * GH, gh + b * GH,
                                     {state[0] + b * H, S > 1 ? state[1] + b * H : nullptr},
                                     {next + b * H, S > 1 ? next + BH + b * H : nullptr},
                                     saved + ((keep_saved ? u * B : 0) + b) * SH};
                K::step(row, H, nl);
                if (active(t, b)) {  // past its length a sequence keeps its state and outputs zero
                    for (std::size_t k = 0; k < S; ++k) std::copy_n(row.next[k], H, state[k] + b * H);
                    if (y) std::copy_n(row.next[0], H, y + t * BH + b * H);
                }
                if (step_states[0])
                    for (std::size_t k = 0; k < S; ++k) std::copy_n(state[k] + b * H, H, step_states[k] + t * BH + b * H);
            }
        }
    }

    // Backpropagates through steps [s1, s0) from d_state, given the segment's saved values and
    // entering states, and adds the segment's share of every gradient.
    struct Grads {
        const T* dy;
        T* grad_h;  // when asked: dL/dh_t [T, B, H]
        T* grad_c;  // when asked (LSTM): dL/dc_t [T, B, H]
        T* d_state[2];
        T *dx, *dw_ih, *dw_hh, *db_ih, *db_hh;
    };
    void backward(std::int64_t s0, std::int64_t s1, const T* saved, const T* entering, T* dgx, T* dgh, T* through,
                  const Grads& g) const
    {
        const std::int64_t t0 = first_time(s0, s1), n = s1 - s0;
        std::fill_n(dgx, n * B * GH, T(0));
        if (dgh != dgx) std::fill_n(dgh, n * B * GH, T(0));
        const T* p_w_hh = w_hh.data_ptr<T>();
        for (std::int64_t s = s1 - 1; s >= s0; --s) {
            const std::int64_t t = time_of(s), u = t - t0;
            for (std::int64_t b = 0; b < B; ++b) {
                if (!active(t, b)) continue;  // the state passed through unchanged: its gradient carries on
                T* dh = g.d_state[0] + b * H;
                if (g.dy)
                    for (std::int64_t j = 0; j < H; ++j) dh[j] += g.dy[t * BH + b * H + j];
                if (g.grad_h) std::copy_n(dh, H, g.grad_h + t * BH + b * H);
                const StepGradRow<T> row{saved + (u * B + b) * SH,
                                         {entering + u * BH + b * H, S > 1 ? entering + (n + u) * BH + b * H : nullptr},
                                         {dh, S > 1 ? g.d_state[1] + b * H : nullptr},
                                         dgx + (u * B + b) * GH,
                                         dgh + (u * B + b) * GH,
                                         g.grad_c ? g.grad_c + t * BH + b * H : nullptr};
                K::step_backward(row, H, nl);
            }
            if (w_hh_t.defined()) kernels::small_gemm<T>(B, H, GH, dgh + u * B * GH, p_w_hh, through);  // through W_hh
            else kernels::gemm<T>("recurrent layer", false, false, B, H, GH, dgh + u * B * GH, p_w_hh, T(0), through);
            for (std::int64_t k = 0; k < BH; ++k) g.d_state[0][k] += through[k];
        }
        const std::int64_t rows = n * B;  // the segment's weight gradients: one GEMM each
        if (g.dx) kernels::gemm<T>("recurrent layer", false, false, rows, I, GH, dgx, w_ih.data_ptr<T>(), T(0), g.dx + t0 * B * I);
        if (g.dw_ih) kernels::gemm<T>("recurrent layer", true, false, GH, I, rows, dgx, x.data_ptr<T>() + t0 * B * I, T(1), g.dw_ih);
        if (g.dw_hh) kernels::gemm<T>("recurrent layer", true, false, GH, H, rows, dgh, entering, T(1), g.dw_hh);
        if (g.db_ih) kernels::add_column_sums<T>(dgx, rows, GH, g.db_ih);
        if (g.db_hh) kernels::add_column_sums<T>(dgh, rows, GH, g.db_hh);
    }
};

// The fused layer, written once over a kind K.
template <class T, class K> RecurrentOutput run(const FusedArgs& a)
{
    const autograd::detail::ProfiledOp profiled(K::name);
    constexpr std::size_t S = K::states;
    const DType dt = a.x.dtype();
    // Every step's rows go to BLAS as one int-sized matrix: refuse before allocating anything.
    LOOM_CHECK(a.x.size(0) * a.x.size(1) <= INT_MAX, K::name,
               "T x B = {} x {} rows exceed what one BLAS call takes (2^31 - 1); split the batch or the sequence",
               a.x.size(0), a.x.size(1));
    FusedLayer<T, K> L;
    L.x = kernels::contiguous(a.x);
    L.w_ih = kernels::contiguous(a.weights.w_ih);
    L.w_hh = kernels::contiguous(a.weights.w_hh);
    L.b_ih = a.weights.b_ih.defined() ? kernels::contiguous(a.weights.b_ih) : Tensor();
    L.b_hh = a.weights.b_hh.defined() ? kernels::contiguous(a.weights.b_hh) : Tensor();
    L.steps = L.x.size(0), L.B = L.x.size(1), L.I = L.x.size(2), L.H = L.w_hh.size(1);
    L.GH = K::gates * L.H, L.SH = K::saved * L.H, L.BH = L.B * L.H;
    if (L.B * L.GH * L.H <= kernels::kSmallProduct) L.w_hh_t = kernels::contiguous(kernels::permute(L.w_hh, {1, 0}));
    L.lengths = a.lengths;
    L.reverse = a.reverse;
    L.nl = a.nonlinearity;
    const std::int64_t steps = L.steps, B = L.B, H = L.H, GH = L.GH, SH = L.SH, BH = L.BH;

    std::vector<Tensor> inputs = {a.x,
                                  a.weights.w_ih,
                                  a.weights.w_hh,
                                  a.weights.b_ih,
                                  a.weights.b_hh,
                                  a.initial.empty() ? Tensor() : a.initial[0],
                                  a.initial.size() > 1 ? a.initial[1] : Tensor()};
    const bool record = autograd::should_record(inputs);
    // Segments: the whole sequence, or `checkpoint` steps each when checkpointing a recorded layer.
    const std::int64_t segment = record && a.checkpoint > 0 ? std::min(a.checkpoint, steps) : std::max<std::int64_t>(steps, 1);
    const std::int64_t segments = steps == 0 ? 0 : (steps + segment - 1) / segment;
    const bool checkpointing = segments > 1;

    Tensor y = zeros({steps, B, H}, dt), next = empty({Shape::value_type(S), B, H}, dt), gh = empty({B, GH}, dt);
    State state;
    for (std::size_t k = 0; k < S; ++k)
        state.push_back(k < a.initial.size() ? kernels::clone(a.initial[k]) : zeros({B, H}, dt));
    T* p_state[2] = {state[0].data_ptr<T>(), S > 1 ? state[1].data_ptr<T>() : nullptr};
    State all_states;  // every step's state, when asked
    if (a.all_states) {
        for (std::size_t k = 0; k < S; ++k) {
            all_states.push_back(zeros({steps, B, H}, dt));
            L.step_states[k] = all_states.back().data_ptr<T>();
        }
    }

    // Kept for backward: every step's input projection, saved values and entering state; or,
    // checkpointing, the state entering each segment. Under no grad, nothing.
    const bool keep_all = record && !checkpointing;
    Tensor gx = empty({std::min(segment, steps), B, GH}, dt);
    Tensor saved = keep_all ? empty({steps, B, SH}, dt) : empty({B, SH}, dt);
    Tensor entering = keep_all ? empty({Shape::value_type(S), steps, B, H}, dt) : Tensor();
    Tensor checkpoints = checkpointing ? empty({segments, Shape::value_type(S), B, H}, dt) : Tensor();
    for (std::int64_t i = 0; i < segments; ++i) {
        const std::int64_t s0 = i * segment, s1 = std::min(steps, s0 + segment);
        if (checkpointing)
            for (std::size_t k = 0; k < S; ++k)
                std::copy_n(p_state[k], BH, checkpoints.data_ptr<T>() + (i * std::int64_t(S) + std::int64_t(k)) * BH);
        L.project(s0, s1, gx.data_ptr<T>());
        L.forward(s0, s1, gx.data_ptr<T>(), saved.data_ptr<T>(), keep_all, ptr_or_null<T>(entering), p_state,
                  next.data_ptr<T>(), gh.data_ptr<T>(), y.data_ptr<T>());
    }

    L.step_states[0] = L.step_states[1] = nullptr;  // a checkpointed backward reruns forward: not into these
    RecurrentOutput result{y, state, all_states};
    if (!record) return result;

    // ---- backpropagation through time, by hand ----
    auto backward = [=, on_state_grads = a.on_state_grads](const autograd::BackwardContext& ctx) {
        LOOM_CHECK(!ctx.create_graph, K::name,
                   "the fused layer cannot be differentiated twice (create_graph): its backward is hand-written "
                   "BPTT, not recorded ops; build the layer with fused(false) for second derivatives");
        const Tensor dy = ctx.grads[0].defined() ? kernels::contiguous(ctx.grads[0]) : Tensor();
        State d_state;
        for (std::size_t k = 0; k < S; ++k)
            d_state.push_back(ctx.grads[1 + k].defined() ? kernels::clone(ctx.grads[1 + k]) : zeros({B, H}, dt));
        const std::int64_t rows = std::min(segment, steps);
        Tensor dgx = empty({rows, B, GH}, dt);
        Tensor dgh = K::separate_hidden_grad ? empty({rows, B, GH}, dt) : dgx;
        Tensor grad_h = on_state_grads ? zeros({steps, B, H}, dt) : Tensor();
        Tensor grad_c = on_state_grads && S > 1 ? zeros({steps, B, H}, dt) : Tensor();
        Tensor through_w_hh = empty({B, H}, dt);
        std::vector<Tensor> grads(7);
        if (ctx.needs[0]) grads[0] = empty({steps, B, L.I}, dt);
        if (ctx.needs[1]) grads[1] = zeros({GH, L.I}, dt);
        if (ctx.needs[2]) grads[2] = zeros({GH, H}, dt);
        if (ctx.needs[3]) grads[3] = zeros({GH}, dt);
        if (ctx.needs[4]) grads[4] = zeros({GH}, dt);
        const typename FusedLayer<T, K>::Grads g{
            ptr_or_null<T>(dy), ptr_or_null<T>(grad_h), ptr_or_null<T>(grad_c),
            {d_state[0].data_ptr<T>(), S > 1 ? d_state[1].data_ptr<T>() : nullptr},
            ptr_or_null<T>(grads[0]), ptr_or_null<T>(grads[1]), ptr_or_null<T>(grads[2]), ptr_or_null<T>(grads[3]),
            ptr_or_null<T>(grads[4])};
        if (!checkpointing) {
            L.backward(0, steps, saved.data_ptr<T>(), entering.data_ptr<T>(), dgx.data_ptr<T>(), dgh.data_ptr<T>(),
                       through_w_hh.data_ptr<T>(), g);
        } else {  // recompute each segment from its checkpoint, last segment first
            Tensor seg_gx = empty({rows, B, GH}, dt), seg_saved = empty({rows, B, SH}, dt);
            Tensor seg_entering = empty({Shape::value_type(S), rows, B, H}, dt);  // used as [S, n, B, H]
            Tensor seg_state = empty({Shape::value_type(S), B, H}, dt), seg_next = empty({Shape::value_type(S), B, H}, dt);
            Tensor seg_gh = empty({B, GH}, dt);
            T* p_seg_state[2] = {seg_state.data_ptr<T>(), S > 1 ? seg_state.data_ptr<T>() + BH : nullptr};
            for (std::int64_t i = segments - 1; i >= 0; --i) {
                const std::int64_t s0 = i * segment, s1 = std::min(steps, s0 + segment);
                std::copy_n(checkpoints.data_ptr<T>() + i * std::int64_t(S) * BH, std::int64_t(S) * BH,
                            seg_state.data_ptr<T>());
                L.project(s0, s1, seg_gx.data_ptr<T>());
                L.forward(s0, s1, seg_gx.data_ptr<T>(), seg_saved.data_ptr<T>(), true, seg_entering.data_ptr<T>(),
                          p_seg_state, seg_next.data_ptr<T>(), seg_gh.data_ptr<T>(), nullptr);
                L.backward(s0, s1, seg_saved.data_ptr<T>(), seg_entering.data_ptr<T>(), dgx.data_ptr<T>(),
                           dgh.data_ptr<T>(), through_w_hh.data_ptr<T>(), g);
            }
        }
        if (on_state_grads) on_state_grads(S > 1 ? State{grad_h, grad_c} : State{grad_h});
        for (std::size_t k = 0; k < S; ++k)
            if (ctx.needs[5 + k]) grads[5 + k] = d_state[k];
        return grads;
    };
    std::vector<Tensor> outputs = {y};
    outputs.insert(outputs.end(), state.begin(), state.end());
    // Saved so that the tape checks their versions: backward reads x and the weights, and a
    // checkpointed layer's recomputation reads the biases too.
    autograd::push_entry(K::name, inputs, outputs, std::vector<Tensor>{L.x, L.w_ih, L.w_hh, L.b_ih, L.b_hh}, autograd::detail::as_backward_fn(backward));
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
