// minGRU and minLSTM: the input makes each step's coefficients, one linear_recurrence runs them.
#include "linear_recurrent.hpp"

#include <cmath>

#include "../autograd/ops.hpp"
#include "../autograd/profiler.hpp"
#include "../autograd/tape.hpp"
#include "../core/kernels.hpp"
#include "../core/math.hpp"
#include "../core/parallel.hpp"

namespace loom::nn {

Tensor min_rnn_g(const Tensor& v)
{
    return where(v.ge(scalar_tensor(0, v.dtype())), relu(v) + 0.5, sigmoid(v));
}

Tensor min_rnn_log_g(const Tensor& v)
{
    // log sigmoid(v) = -softplus(-v) = v - softplus(v); relu keeps the other branch's log finite
    // where it is not taken.
    return where(v.ge(scalar_tensor(0, v.dtype())), log(relu(v) + 0.5), v - softplus(v));
}

namespace {
// log(1 − σ(d)) = −softplus(d) and log σ(d) + log g(pre) = d − softplus(d) + log g(pre), where
// log g(v) = log(v + 1/2) for v ≥ 0 and log σ(v) = v − softplus(v) below: min_rnn_log_g's
// branches, computed both and selected, so that the loop vectorises (exp_of, log_of and
// log1p_of are branch-free polynomials for float).
template <class T>
LOOM_VECTOR_CLONES void log_coefficient_values(const T* __restrict d, const T* __restrict pre, T* __restrict log_a,
                                               T* __restrict log_b, std::int64_t n)
{
    for (std::int64_t i = 0; i < n; ++i) {
        const T x = d[i], v = pre[i];
        const T s = softplus_of(x);
        const T log_g = select_of(v >= T(0), log_of(std::max(v, T(0)) + T(0.5)), -softplus_of(-v));
        log_a[i] = -s;
        log_b[i] = x - s + log_g;
    }
}

// Their gradients: d softplus(d) = σ(d), d log g(v) = 1 / (v + 1/2) for v ≥ 0 and 1 − σ(v) below.
// A gradient that did not arrive is null.
template <class T>
LOOM_VECTOR_CLONES void log_coefficient_grads(const T* __restrict d, const T* __restrict pre, const T* __restrict g_a,
                                              const T* __restrict g_b, T* __restrict g_d, T* __restrict g_pre,
                                              std::int64_t n)
{
    for (std::int64_t i = 0; i < n; ++i) {
        const T a = g_a ? g_a[i] : T(0), b = g_b ? g_b[i] : T(0), v = pre[i];
        const T sd = sigmoid_of(d[i]);
        g_d[i] = b * (T(1) - sd) - a * sd;
        g_pre[i] = b * select_of(v >= T(0), T(1) / (std::max(v, T(0)) + T(0.5)), T(1) - sigmoid_of(v));
    }
}

// minLSTM's d = log i′ − log f′ for gates i′ = σ(ki), f′ = σ(kf): as log σ(k) = −softplus(−k),
// d = softplus(−kf) − softplus(−ki).
template <class T>
LOOM_VECTOR_CLONES void gate_log_ratio_values(const T* __restrict kf, const T* __restrict ki, T* __restrict d,
                                              std::int64_t n)
{
    for (std::int64_t i = 0; i < n; ++i) d[i] = softplus_of(-kf[i]) - softplus_of(-ki[i]);
}

// Its gradients: ∂d/∂kf = −σ(−kf) = σ(kf) − 1 and ∂d/∂ki = σ(−ki) = 1 − σ(ki).
template <class T>
LOOM_VECTOR_CLONES void gate_log_ratio_grads(const T* __restrict kf, const T* __restrict ki, const T* __restrict g,
                                             T* __restrict g_kf, T* __restrict g_ki, std::int64_t n)
{
    for (std::int64_t i = 0; i < n; ++i) {
        g_kf[i] = g[i] * (sigmoid_of(kf[i]) - T(1));
        g_ki[i] = g[i] * (T(1) - sigmoid_of(ki[i]));
    }
}

// fn(i0, i1) over [0, n) in one block per thread when n is large: the loops above are all
// arithmetic (five polynomials an element forward), so they scale with threads.
template <class F> void over_elements(std::int64_t n, F&& fn)
{
    kernels::over_blocks(n, n < kernels::kThreadedElements ? 1 : get_num_threads(), std::forward<F>(fn));
}

// The fused ops' two operands have one shape and dtype: their callers make them so.
void check_alike(const char* op, const Tensor& a, const Tensor& b)
{
    LOOM_CHECK(a.sizes() == b.sizes() && a.dtype() == b.dtype(), op,
               "internal: expects two operands of one shape and dtype, got {} {} and {} {}", a.sizes(), a.dtype(),
               b.sizes(), b.dtype());
}

// Both layers' log-space coefficients (log a, log b) from d and the candidate's pre-activation
// `pre`: minGRU's d is its gate's pre-activation k, minLSTM's is log i′ − log f′. One tape entry
// and one pass over [T, B, H] each way, where the same from ops made eleven passes forward and
// as many back (they were a third of a minGRU training step); under create_graph backward is
// those ops.
std::pair<Tensor, Tensor> log_coefficients(const Tensor& d, const Tensor& pre)
{
    const char* op = "min_rnn_log_coefficients";
    const autograd::detail::ProfiledOp profiled(op);
    check_alike(op, d, pre);
    const Tensor dc = kernels::contiguous(d), prec = kernels::contiguous(pre);
    Tensor log_a = empty(d.sizes(), d.dtype()), log_b = empty(d.sizes(), d.dtype());
    dispatch_floating(op, d.dtype(), [&]<class T>() {
        over_elements(dc.numel(), [&](std::int64_t i0, std::int64_t i1) {
            log_coefficient_values(dc.data_ptr<T>() + i0, prec.data_ptr<T>() + i0, log_a.data_ptr<T>() + i0,
                                   log_b.data_ptr<T>() + i0, i1 - i0);
        });
    });
    const Tensor inputs[] = {d, pre}, outputs[] = {log_a, log_b};
    autograd::internal::record_outputs(op, inputs, outputs, inputs, [op](const autograd::BackwardContext& c) {
        const Tensor &d = c.saved[0], &pre = c.saved[1], &g_a = c.grads[0], &g_b = c.grads[1];
        if (c.create_graph) {
            const Tensor sd = sigmoid(d);
            Tensor g_d = g_b.defined() ? g_b * (1.0 - sd) : Tensor();
            if (g_a.defined()) g_d = g_d.defined() ? g_d - g_a * sd : -(g_a * sd);
            // relu keeps the branch not taken finite, as in min_rnn_log_g.
            const Tensor slope = where(pre.ge(scalar_tensor(0, pre.dtype())), 1.0 / (relu(pre) + 0.5), 1.0 - sigmoid(pre));
            return autograd::GradList{c.needs[0] ? g_d : Tensor(), c.needs[1] && g_b.defined() ? g_b * slope : Tensor()};
        }
        const Tensor dc = kernels::contiguous(d), prec = kernels::contiguous(pre);
        const Tensor gac = g_a.defined() ? kernels::contiguous(g_a) : Tensor(),
                     gbc = g_b.defined() ? kernels::contiguous(g_b) : Tensor();
        Tensor g_d = empty(d.sizes(), d.dtype()), g_pre = empty(d.sizes(), d.dtype());
        dispatch_floating(op, d.dtype(), [&]<class T>() {
            const T* g_a_data = gac.defined() ? gac.data_ptr<T>() : nullptr;
            const T* g_b_data = gbc.defined() ? gbc.data_ptr<T>() : nullptr;
            over_elements(dc.numel(), [&](std::int64_t i0, std::int64_t i1) {
                log_coefficient_grads(dc.data_ptr<T>() + i0, prec.data_ptr<T>() + i0, g_a_data ? g_a_data + i0 : nullptr,
                                      g_b_data ? g_b_data + i0 : nullptr, g_d.data_ptr<T>() + i0, g_pre.data_ptr<T>() + i0,
                                      i1 - i0);
            });
        });
        return autograd::GradList{c.needs[0] ? std::move(g_d) : Tensor(),
                                  c.needs[1] && g_b.defined() ? std::move(g_pre) : Tensor()};
    });
    return {log_a, log_b};
}

// minLSTM's d from its gates' pre-activations, as one tape entry and one pass each way, where
// softplus, negation and subtraction made five (a fifth of a minLSTM training step); under
// create_graph backward is ops.
Tensor gate_log_ratio(const Tensor& kf, const Tensor& ki)
{
    const char* op = "min_lstm_gate_log_ratio";
    const autograd::detail::ProfiledOp profiled(op);
    check_alike(op, kf, ki);
    const Tensor kfc = kernels::contiguous(kf), kic = kernels::contiguous(ki);
    Tensor d = empty(kf.sizes(), kf.dtype());
    dispatch_floating(op, kf.dtype(), [&]<class T>() {
        over_elements(d.numel(), [&](std::int64_t i0, std::int64_t i1) {
            gate_log_ratio_values(kfc.data_ptr<T>() + i0, kic.data_ptr<T>() + i0, d.data_ptr<T>() + i0, i1 - i0);
        });
    });
    return autograd::internal::record(op, {kf, ki}, std::move(d), {kf, ki}, [op](const autograd::BackwardContext& c) {
        const Tensor &kf = c.saved[0], &ki = c.saved[1];
        if (c.create_graph)
            return autograd::GradList{c.needs[0] ? -(c.grad() * sigmoid(-kf)) : Tensor(),
                                      c.needs[1] ? c.grad() * sigmoid(-ki) : Tensor()};
        const Tensor kfc = kernels::contiguous(kf), kic = kernels::contiguous(ki), g = kernels::contiguous(c.grad());
        Tensor g_kf = empty(kf.sizes(), kf.dtype()), g_ki = empty(kf.sizes(), kf.dtype());
        dispatch_floating(op, kf.dtype(), [&]<class T>() {
            over_elements(g.numel(), [&](std::int64_t i0, std::int64_t i1) {
                gate_log_ratio_grads(kfc.data_ptr<T>() + i0, kic.data_ptr<T>() + i0, g.data_ptr<T>() + i0,
                                     g_kf.data_ptr<T>() + i0, g_ki.data_ptr<T>() + i0, i1 - i0);
            });
        });
        return autograd::GradList{c.needs[0] ? std::move(g_kf) : Tensor(), c.needs[1] ? std::move(g_ki) : Tensor()};
    });
}
}  // namespace

// ---- the shared layer ----

namespace {
// Whether step t is within sequence b, as bool [T, B, 1]; undefined when every sequence is T long.
Tensor running_steps(const std::string& op, const Tensor& lengths, std::int64_t T, std::int64_t B)
{
    if (!lengths.defined()) return Tensor();
    LOOM_CHECK(lengths.dtype() == kInt64 && lengths.sizes() == Shape{B}, op,
               "expects lengths as int64 [B] = [{}], got {} {}", B, lengths.dtype(), lengths.sizes());
    const std::int64_t shortest = amin(lengths).item<std::int64_t>(), longest = amax(lengths).item<std::int64_t>();
    LOOM_CHECK(shortest >= 1 && longest <= T, op, "lengths must lie in [1, T] = [1, {}], got {} to {}", T, shortest,
               longest);
    return arange(double(T), kInt64).unsqueeze(1).lt(lengths.unsqueeze(0)).unsqueeze(2);
}
}  // namespace

Tensor MinRecurrent::candidate(const Tensor& pre) const { return options.log_space() ? min_rnn_g(pre) : pre; }

RecurrentOutput MinRecurrent::forward(const Tensor& input, const Tensor& h0, const Tensor& lengths)
{
    const std::string op = type_name();
    const MinRecurrentOptions& o = options;
    const char* layout = o.batch_first() ? "[B, T, I]" : "[T, B, I] (time-major; set batch_first for [B, T, I])";
    LOOM_CHECK(input.dim() == 3, op, "expects input {}, got shape {}", layout, input.sizes());
    LOOM_CHECK(input.size(2) == o.input_size(), op, "expects input {} with I = {}, got shape {} (dim 2 is {})", layout,
               o.input_size(), input.sizes(), input.size(2));
    LOOM_CHECK(input.dtype() == o.dtype(), op, "expects input of the parameters' dtype {}, got {}", o.dtype(),
               input.dtype());
    const Tensor x = o.batch_first() ? input.transpose(0, 1) : input;
    const std::int64_t T = x.size(0), B = x.size(1), H = o.hidden_size();
    LOOM_CHECK(T > 0 && B > 0, op, "expects at least one step and one sequence, got input shape {}", input.sizes());
    Tensor initial;
    if (h0.defined()) {
        LOOM_CHECK(h0.sizes() == (Shape{1, B, H}), op, "h0 has shape {}, expected [1, B, H] = [1, {}, {}]", h0.sizes(),
                   B, H);
        LOOM_CHECK(h0.dtype() == o.dtype(), op, "h0 has dtype {}, the parameters {}", h0.dtype(), o.dtype());
        initial = h0.select(0, 0);
        if (o.log_space()) {
            const double least = amin(initial.detach()).item<double>();
            LOOM_CHECK(least > 0, op,
                       "h0 must be positive in log space (log_space(true)), but holds {}; every state of the "
                       "log-space form is positive (pass g(v) for a state v of any sign, or use log_space(false))",
                       least);
            initial = log(initial);
        }
    }
    auto [a, b] = coefficients(x);
    const Tensor running = running_steps(op, lengths, T, B);
    if (running.defined()) {
        // Past the end: a = 1 and b = 0 (log a = 0, log b = -inf), the state held as it was.
        const Tensor one = scalar_tensor(o.log_space() ? 0.0 : 1.0, a.dtype());
        const Tensor none = scalar_tensor(o.log_space() ? -INFINITY : 0.0, b.dtype());
        a = where(running, a, one);
        b = where(running, b, none);
    }
    Tensor h = o.log_space() ? exp(log_linear_recurrence(a, b, initial)) : linear_recurrence(a, b, initial);
    RecurrentOutput out;
    if (running.defined()) out.output = where(running, h, scalar_tensor(0, h.dtype()));
    else out.output = h;
    if (o.batch_first()) out.output = out.output.transpose(0, 1);
    out.state = {h.select(0, T - 1).unsqueeze(0)};
    return out;
}

Tensor MinRecurrent::step(const Tensor& x, const Tensor& h)
{
    const std::string op = type_name() + "::step";
    const MinRecurrentOptions& o = options;
    LOOM_CHECK(x.dim() == 2 && x.size(1) == o.input_size(), op, "expects x [B, I] with I = {}, got shape {}",
               o.input_size(), x.sizes());
    LOOM_CHECK(h.sizes() == (Shape{x.size(0), o.hidden_size()}), op, "expects h [B, H] = [{}, {}], got shape {}",
               x.size(0), o.hidden_size(), h.sizes());
    LOOM_CHECK(x.dtype() == o.dtype() && h.dtype() == o.dtype(), op,
               "expects x and h of the parameters' dtype {}, got {} and {}", o.dtype(), x.dtype(), h.dtype());
    return next_state(x, h);
}

// ---- minGRU ----

MinGRU::MinGRU(MinRecurrentOptions o) : MinRecurrent(std::move(o))
{
    const auto& p = options;
    LOOM_CHECK(p.input_size() > 0 && p.hidden_size() > 0, "MinGRU", "expects positive sizes, got input {} hidden {}",
               p.input_size(), p.hidden_size());
    linear_z = register_module("linear_z", std::make_shared<Dense>(p.input_size(), p.hidden_size(), p.bias(), p.dtype()));
    linear_h = register_module("linear_h", std::make_shared<Dense>(p.input_size(), p.hidden_size(), p.bias(), p.dtype()));
}

std::string MinGRU::type_name() const { return "MinGRU"; }

std::pair<Tensor, Tensor> MinGRU::coefficients(const Tensor& x) const
{
    const Tensor k = (*linear_z)(x), pre = (*linear_h)(x);
    // log(1 - sigmoid(k)) and log(sigmoid(k) g(pre)), fused: d = k.
    if (options.log_space()) return log_coefficients(k, pre);
    const Tensor z = sigmoid(k);
    return {1.0 - z, z * pre};
}

Tensor MinGRU::next_state(const Tensor& x, const Tensor& h) const
{
    const Tensor z = sigmoid((*linear_z)(x));
    return (1.0 - z) * h + z * candidate((*linear_h)(x));
}

// ---- minLSTM ----

MinLSTM::MinLSTM(MinRecurrentOptions o) : MinRecurrent(std::move(o))
{
    const auto& p = options;
    LOOM_CHECK(p.input_size() > 0 && p.hidden_size() > 0, "MinLSTM", "expects positive sizes, got input {} hidden {}",
               p.input_size(), p.hidden_size());
    linear_f = register_module("linear_f", std::make_shared<Dense>(p.input_size(), p.hidden_size(), p.bias(), p.dtype()));
    linear_i = register_module("linear_i", std::make_shared<Dense>(p.input_size(), p.hidden_size(), p.bias(), p.dtype()));
    linear_h = register_module("linear_h", std::make_shared<Dense>(p.input_size(), p.hidden_size(), p.bias(), p.dtype()));
}

std::string MinLSTM::type_name() const { return "MinLSTM"; }

std::pair<Tensor, Tensor> MinLSTM::coefficients(const Tensor& x) const
{
    const Tensor kf = (*linear_f)(x), ki = (*linear_i)(x), pre = (*linear_h)(x);
    if (options.log_space()) {
        // log(f / (f + i)) = -softplus(log i - log f) and log(i / (f + i)) = d - softplus(d) for
        // d = log i - log f.
        return log_coefficients(gate_log_ratio(kf, ki), pre);
    }
    const Tensor f = sigmoid(kf), i = sigmoid(ki), sum = f + i;
    return {f / sum, i / sum * pre};
}

Tensor MinLSTM::next_state(const Tensor& x, const Tensor& h) const
{
    const Tensor f = sigmoid((*linear_f)(x)), i = sigmoid((*linear_i)(x)), sum = f + i;
    return f / sum * h + i / sum * candidate((*linear_h)(x));
}

// ---- the causal convolution ----

CausalConv1d::CausalConv1d(std::int64_t channels_, std::int64_t kernel_, bool with_bias, DType dtype)
    : channels(channels_), kernel(kernel_)
{
    LOOM_CHECK(channels > 0 && kernel > 0, "CausalConv1d", "expects positive sizes, got {} channels, kernel {}",
               channels, kernel);
    // PyTorch's Conv1d: bound 1/sqrt(fan_in), fan_in = in_channels / groups * kernel = kernel.
    const double bound = 1 / std::sqrt(double(kernel));
    weight = register_parameter("weight", uniform({channels, 1, kernel}, -bound, bound, dtype));
    if (with_bias) bias = register_parameter("bias", uniform({channels}, -bound, bound, dtype));
}

std::string CausalConv1d::type_name() const { return "CausalConv1d"; }

Tensor CausalConv1d::forward(const Tensor& x, const Tensor& before) const
{
    LOOM_CHECK(x.dim() == 3 && x.size(2) == channels, "CausalConv1d", "expects x [T, B, C] with C = {}, got shape {}",
               channels, x.sizes());
    const std::int64_t T = x.size(0), B = x.size(1);
    LOOM_CHECK(!before.defined() || before.sizes() == (Shape{kernel - 1, B, channels}), "CausalConv1d",
               "expects the earlier inputs as [kernel - 1, B, C] = [{}, {}, {}], got shape {}", kernel - 1, B, channels,
               before.sizes());
    const Tensor padded =
        kernel == 1 ? x : concat({before.defined() ? before : zeros({kernel - 1, B, channels}, x.dtype()), x}, 0);
    const Tensor w = weight.select(1, 0);  // [C, kernel]
    Tensor out;
    for (std::int64_t k = 0; k < kernel; ++k) {
        const Tensor term = padded.narrow(0, k, T) * w.select(1, k);
        out = out.defined() ? out + term : term;
    }
    return bias.defined() ? out + bias : out;
}

// ---- the selective state-space block ----

namespace {

Tensor silu(const Tensor& v) { return v * sigmoid(v); }

}  // namespace

SelectiveSSM::SelectiveSSM(SelectiveSSMOptions o) : options(std::move(o))
{
    auto& p = options;
    LOOM_CHECK(p.d_model() > 0 && p.d_state() > 0 && p.d_conv() > 0 && p.expand() > 0 && p.dt_rank() >= 0,
               "SelectiveSSM", "expects positive d_model, d_state, d_conv and expand and dt_rank >= 0, got {}, {}, {}, {}, {}",
               p.d_model(), p.d_state(), p.d_conv(), p.expand(), p.dt_rank());
    if (p.dt_rank() == 0) p.dt_rank((p.d_model() + 15) / 16);
    inner = p.expand() * p.d_model();
    const std::int64_t E = inner, N = p.d_state(), R = p.dt_rank();
    const DType dt = p.dtype();
    // Mamba's initialisation. A_log = log 1..N for every channel: the state's decay rates.
    A_log = register_parameter("A_log", log(arange(N, kFloat64) + 1.0).unsqueeze(0).expand({E, N}).contiguous().to(dt));
    D = register_parameter("D", ones({E}, dt));
    in_proj = register_module("in_proj", std::make_shared<Dense>(p.d_model(), 2 * E, p.bias(), dt));
    conv1d = register_module("conv1d", std::make_shared<CausalConv1d>(E, p.d_conv(), p.conv_bias(), dt));
    x_proj = register_module("x_proj", std::make_shared<Dense>(E, R + 2 * N, false, dt));
    dt_proj = register_module("dt_proj", std::make_shared<Dense>(R, E, true, dt));
    out_proj = register_module("out_proj", std::make_shared<Dense>(E, p.d_model(), p.bias(), dt));
    {
        NoGradGuard no_grad;
        const double bound = 1 / std::sqrt(double(R));
        Tensor(dt_proj->weight).uniform_(-bound, bound);
        // Step sizes log-uniform in [0.001, 0.1] (at least 1e-4), stored as softplus's inverse.
        const Tensor step = clamp(exp(uniform({E}, std::log(0.001), std::log(0.1), kFloat64)), 1e-4, std::nullopt);
        Tensor(dt_proj->bias).copy_((step + log(1.0 - exp(-step))).to(dt));
    }
}

std::string SelectiveSSM::type_name() const { return "SelectiveSSM"; }

void SelectiveSSM::check_state(const char* op, const SelectiveSSMState& state, std::int64_t B) const
{
    const std::int64_t E = inner, K1 = options.d_conv() - 1, N = options.d_state();
    LOOM_CHECK(!state.conv.defined() || state.conv.sizes() == (Shape{K1, B, E}), op,
               "state.conv has shape {}, expected [d_conv - 1, B, E] = [{}, {}, {}]", state.conv.sizes(), K1, B, E);
    LOOM_CHECK(!state.ssm.defined() || state.ssm.sizes() == (Shape{B, E, N}), op,
               "state.ssm has shape {}, expected [B, E, N] = [{}, {}, {}]", state.ssm.sizes(), B, E, N);
    for (const Tensor* t : {&state.conv, &state.ssm})
        LOOM_CHECK(!t->defined() || t->dtype() == options.dtype(), op, "a state tensor has dtype {}, the parameters {}",
                   t->dtype(), options.dtype());
}

std::pair<Tensor, Tensor> SelectiveSSM::selective_scan(const Tensor& u, const Tensor& z, const Tensor& h0,
                                                       const Tensor& running) const
{
    const std::int64_t R = options.dt_rank(), N = options.d_state();
    const Tensor projected = (*x_proj)(u);  // [T, B, R + 2N]
    const Tensor B_t = projected.narrow(2, R, N), C_t = projected.narrow(2, R + N, N);  // [T, B, N]
    Tensor delta = softplus((*dt_proj)(projected.narrow(2, 0, R)));  // [T, B, E]
    // Past a sequence's end a step of size 0: exp(0 A) = 1 and 0 B u = 0 hold the state as it was.
    if (running.defined()) delta = where(running, delta, scalar_tensor(0, delta.dtype()));
    // h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t per channel and state, y_t = C_t . h_t: one
    // fused op, which keeps one [T, B, E, N] array where the same with ops keeps several.
    auto [scanned, h_last] = loom::selective_scan(u, delta, -exp(A_log), B_t, C_t, h0);
    return {(scanned + u * D) * silu(z), h_last};
}

SelectiveSSMOutput SelectiveSSM::forward(const Tensor& input, const SelectiveSSMState& initial, const Tensor& lengths)
{
    const std::string op = "SelectiveSSM";
    LOOM_CHECK(input.dim() == 3 && input.size(2) == options.d_model(), op,
               "expects input [T, B, d_model] with d_model = {}, got shape {}", options.d_model(), input.sizes());
    LOOM_CHECK(input.dtype() == options.dtype(), op, "expects input of the parameters' dtype {}, got {}",
               options.dtype(), input.dtype());
    const std::int64_t T = input.size(0), B = input.size(1), K1 = options.d_conv() - 1;
    LOOM_CHECK(T > 0 && B > 0, op, "expects at least one step and one sequence, got input shape {}", input.sizes());
    check_state(op.c_str(), initial, B);
    const Tensor running = running_steps(op, lengths, T, B);
    const auto xz = (*in_proj)(input).chunk(2, 2);  // the block's input and its gate, [T, B, E] each
    const Tensor u = silu(conv1d->forward(xz[0], initial.conv));
    auto [y, h_last] = selective_scan(u, xz[1], initial.ssm, running);
    SelectiveSSMOutput out{(*out_proj)(y), {}};
    if (running.defined()) out.output = where(running, out.output, scalar_tensor(0, out.output.dtype()));
    if (K1 > 0) {
        const Tensor before = initial.conv.defined() ? initial.conv : zeros({K1, B, inner}, input.dtype());
        const Tensor inputs = concat({before, xz[0]}, 0);  // [K1 + T, B, E]: step t's input at K1 + t
        if (!running.defined()) {
            out.state.conv = inputs.narrow(0, T, K1);
        } else {
            // Sequence b's last K1 inputs before its end: rows lengths[b] .. lengths[b] + K1 - 1.
            const Tensor rows = (arange(double(K1), kInt64).unsqueeze(1) + lengths.unsqueeze(0)).unsqueeze(2);
            out.state.conv = inputs.gather(0, rows.expand({K1, B, inner}).contiguous());
        }
    }
    out.state.ssm = h_last;
    return out;
}

SelectiveSSMOutput SelectiveSSM::step(const Tensor& x, const SelectiveSSMState& state)
{
    LOOM_CHECK(x.dim() == 2 && x.size(1) == options.d_model(), "SelectiveSSM::step",
               "expects x [B, d_model] with d_model = {}, got shape {}", options.d_model(), x.sizes());
    SelectiveSSMOutput out = forward(x.unsqueeze(0), state);
    out.output = out.output.select(0, 0);
    return out;
}

}  // namespace loom::nn
