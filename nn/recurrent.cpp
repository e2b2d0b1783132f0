#include "recurrent.hpp"

#include "fused_recurrent.hpp"

#include <cmath>

namespace loom::nn {

namespace {

std::int64_t gate_count(CellKind kind) { return kind == CellKind::LSTM ? 4 : kind == CellKind::GRU ? 3 : 1; }

// The equations, once: each takes the input projection gx = x W_ih^T + b_ih ([B, G*H]).
Tensor hidden_projection(const Tensor& h, const Tensor& w_hh, const Tensor& b_hh)
{
    Tensor gh = matmul(h, w_hh.t());
    return b_hh.defined() ? gh + b_hh : gh;
}

State rnn_step(const Tensor& gx, const State& s, const Tensor& w_hh, const Tensor& b_hh, Nonlinearity nl)
{
    const Tensor pre = gx + hidden_projection(s[0], w_hh, b_hh);
    return {nl == Nonlinearity::Tanh ? tanh(pre) : relu(pre)};
}

State lstm_step(const Tensor& gx, const State& s, const Tensor& w_hh, const Tensor& b_hh)
{
    const auto gates = (gx + hidden_projection(s[0], w_hh, b_hh)).chunk(4, 1);  // i, f, g, o
    const Tensor c = sigmoid(gates[1]) * s[1] + sigmoid(gates[0]) * tanh(gates[2]);
    return {sigmoid(gates[3]) * tanh(c), c};
}

State gru_step(const Tensor& gx, const State& s, const Tensor& w_hh, const Tensor& b_hh)
{
    const auto x = gx.chunk(3, 1), h = hidden_projection(s[0], w_hh, b_hh).chunk(3, 1);  // r, z, n
    const Tensor r = sigmoid(x[0] + h[0]), z = sigmoid(x[1] + h[1]);
    const Tensor n = tanh(x[2] + r * h[2]);
    return {(1.0 - z) * n + z * s[0]};
}

Tensor input_projection(const Tensor& x, const Tensor& w_ih, const Tensor& b_ih)
{
    Tensor gx = matmul(x, w_ih.t());
    return b_ih.defined() ? gx + b_ih : gx;
}

void check_cell_input(const Cell& cell, const Tensor& x, const State& state)
{
    const std::string name = cell.type_name();
    LOOM_CHECK(x.dim() == 2 && x.size(1) == cell.input_size, name, "expects input [B, {}], got shape {}",
               cell.input_size, x.sizes());
    LOOM_CHECK(state.size() == cell.state_size, name, "expects a state of {} tensor(s), got {}", cell.state_size,
               state.size());
    for (std::size_t k = 0; k < state.size(); ++k)
        LOOM_CHECK(state[k].sizes() == (Shape{x.size(0), cell.hidden_size}), name,
                   "state tensor {} has shape {}, expected [{}, {}]", k, state[k].sizes(), x.size(0),
                   cell.hidden_size);
}

// U(-1/sqrt(H), 1/sqrt(H)): PyTorch's default for every recurrent weight and bias.
Tensor recurrent_init(const Shape& shape, std::int64_t hidden, DType dtype)
{
    const double k = 1 / std::sqrt(double(hidden));
    return uniform(shape, -k, k, dtype);
}

}  // namespace

// ---- cells ----

Cell::Cell(std::int64_t input_size_, std::int64_t hidden_size_, std::size_t state_size_)
    : input_size(input_size_), hidden_size(hidden_size_), state_size(state_size_)
{
    LOOM_CHECK(input_size > 0 && hidden_size > 0, "Cell", "expects positive sizes, got input {} and hidden {}",
               input_size, hidden_size);
}

State Cell::initial_state(std::int64_t batch, DType dtype) const
{
    return State(state_size, zeros({batch, hidden_size}, dtype));
}

#define LOOM_CELL_PARAMETERS(gates)                                                              \
    weight_ih = register_parameter("weight_ih", recurrent_init({gates * H, I}, H, dtype));       \
    weight_hh = register_parameter("weight_hh", recurrent_init({gates * H, H}, H, dtype));       \
    if (bias) {                                                                                  \
        bias_ih = register_parameter("bias_ih", recurrent_init({gates * H}, H, dtype));          \
        bias_hh = register_parameter("bias_hh", recurrent_init({gates * H}, H, dtype));          \
    }

RNNCell::RNNCell(std::int64_t I, std::int64_t H, bool bias, Nonlinearity nl, DType dtype)
    : Cell(I, H), nonlinearity(nl)
{
    LOOM_CELL_PARAMETERS(1)
}

State RNNCell::forward(const Tensor& x, const State& state)
{
    check_cell_input(*this, x, state);
    return rnn_step(input_projection(x, weight_ih, bias_ih), state, weight_hh, bias_hh, nonlinearity);
}

LSTMCell::LSTMCell(std::int64_t I, std::int64_t H, bool bias, DType dtype) : Cell(I, H, 2) { LOOM_CELL_PARAMETERS(4) }

State LSTMCell::forward(const Tensor& x, const State& state)
{
    check_cell_input(*this, x, state);
    return lstm_step(input_projection(x, weight_ih, bias_ih), state, weight_hh, bias_hh);
}

GRUCell::GRUCell(std::int64_t I, std::int64_t H, bool bias, DType dtype) : Cell(I, H) { LOOM_CELL_PARAMETERS(3) }

State GRUCell::forward(const Tensor& x, const State& state)
{
    check_cell_input(*this, x, state);
    return gru_step(input_projection(x, weight_ih, bias_ih), state, weight_hh, bias_hh);
}

#undef LOOM_CELL_PARAMETERS

// ---- running over time ----

namespace {

// Runs one layer in one direction over x [T, B, F] from state s0 ([B, H] each).
using DirectionFn = std::function<RecurrentOutput(std::int64_t layer, std::int64_t direction, const Tensor& x,
                                                  const State& s0)>;

struct Lengths {
    std::vector<std::int64_t> values;  // empty: every sequence runs all T steps
    std::vector<Tensor> masks;         // per step: bool [B, 1], true while t < length
};

// Validates input, initial state and lengths, then stacks layers and directions the way PyTorch
// does: directions concatenated on the feature dim, dropout between layers, final states
// ordered layer by layer, forward before reverse.
RecurrentOutput run_layers(const char* op, const RecurrentOptions& o, std::size_t state_size,
                           const std::function<DirectionFn(const Lengths&)>& make_direction, const Tensor& input,
                           const State& initial, const Tensor& lengths, bool training, Generator* dropout_gen)
{
    const char* layout = o.batch_first() ? "[B, T, I]" : "[T, B, I] (time-major; set batch_first for [B, T, I])";
    LOOM_CHECK(input.dim() == 3, op, "expects input {}, got shape {}", layout, input.sizes());
    LOOM_CHECK(input.size(2) == o.input_size(), op, "expects input {} with I = {}, got shape {} (dim 2 is {})", layout,
               o.input_size(), input.sizes(), input.size(2));
    const Tensor x = o.batch_first() ? input.transpose(0, 1) : input;
    const std::int64_t T = x.size(0), B = x.size(1), H = o.hidden_size(), L = o.num_layers();
    const std::int64_t D = o.bidirectional() ? 2 : 1;
    LOOM_CHECK(T > 0 && B > 0, op, "expects at least one step and one sequence, got input shape {}", input.sizes());

    LOOM_CHECK(initial.empty() || initial.size() == state_size, op,
               "expects {} initial state tensor(s) (h0{}), got {}", state_size, state_size == 2 ? ", c0" : "",
               initial.size());
    for (std::size_t k = 0; k < initial.size(); ++k) {
        LOOM_CHECK(initial[k].sizes() == (Shape{L * D, B, H}), op,
                   "initial state {} has shape {}, expected [L*D, B, H] = [{}, {}, {}]", k, initial[k].sizes(), L * D,
                   B, H);
        LOOM_CHECK(initial[k].dtype() == input.dtype(), op, "initial state {} has dtype {}, the input {}", k,
                   initial[k].dtype(), input.dtype());
    }

    Lengths lens;
    if (lengths.defined()) {
        LOOM_CHECK(lengths.dtype() == kInt64 && lengths.sizes() == Shape{B}, op,
                   "expects lengths as int64 [B] = [{}], got {} {}", B, lengths.dtype(), lengths.sizes());
        const Tensor values = lengths.contiguous();
        for (std::int64_t b = 0; b < B; ++b) {
            const std::int64_t n = values.data_ptr<std::int64_t>()[b];
            LOOM_CHECK(n >= 1 && n <= T, op, "length {} of sequence {} is outside [1, T] = [1, {}]", n, b, T);
            lens.values.push_back(n);
        }
        const Tensor col = values.unsqueeze(1);
        for (std::int64_t t = 0; t < T; ++t) lens.masks.push_back(gt(col, scalar_tensor(double(t), kInt64)));
    }
    const DirectionFn run_direction = make_direction(lens);

    std::vector<std::vector<Tensor>> finals(state_size);
    Tensor layer_input = x;
    for (std::int64_t l = 0; l < L; ++l) {
        std::vector<Tensor> direction_outputs;
        for (std::int64_t d = 0; d < D; ++d) {
            State s0;
            if (!initial.empty())
                for (std::size_t k = 0; k < state_size; ++k) s0.push_back(initial[k].select(0, l * D + d));
            RecurrentOutput r = run_direction(l, d, layer_input, s0);
            direction_outputs.push_back(r.output);
            for (std::size_t k = 0; k < state_size; ++k) finals[k].push_back(r.state[k]);
        }
        layer_input = D == 1 ? direction_outputs[0] : concat(direction_outputs, 2);
        if (l + 1 < L && training && o.dropout() > 0) layer_input = Dropout(o.dropout(), dropout_gen)(layer_input);
    }
    RecurrentOutput result;
    result.output = o.batch_first() ? layer_input.transpose(0, 1) : layer_input;
    for (auto& f : finals) result.state.push_back(stack(f, 0));
    return result;
}

// The composed path: `step` (a cell's equations, op by op) at every time step, in processing
// order, with masked updates past each sequence's length. `project`, if set, maps the whole
// input sequence first (the built-in layers' one-GEMM input projection).
using ProjectFn = std::function<Tensor(std::int64_t layer, std::int64_t direction, const Tensor& x)>;

std::function<DirectionFn(const Lengths&)> composed(const char* op, std::size_t state_size, std::int64_t hidden,
                                                    const ProjectFn& project, const StepFn& step)
{
    return [=](const Lengths& lens) -> DirectionFn {
        return [=](std::int64_t l, std::int64_t d, const Tensor& x, const State& s0) {
            const std::int64_t T = x.size(0), B = x.size(1);
            State s = s0;
            if (s.empty()) s.assign(state_size, zeros({B, hidden}, x.dtype()));
            const Tensor projected = project ? project(l, d, x) : x;
            const Tensor no_output = zeros({1}, x.dtype());
            std::vector<Tensor> outputs(static_cast<std::size_t>(T));
            for (std::int64_t i = 0; i < T; ++i) {
                const std::int64_t t = d == 0 ? i : T - 1 - i;
                State next = step(l, d, projected.select(0, t), s);
                LOOM_CHECK(next.size() == state_size, op, "the cell returned {} state tensor(s), expected {}",
                           next.size(), state_size);
                if (lens.masks.empty()) {
                    outputs[t] = next[0];
                    s = std::move(next);
                } else {
                    outputs[t] = where(lens.masks[t], next[0], no_output);
                    for (std::size_t k = 0; k < state_size; ++k) s[k] = where(lens.masks[t], next[k], s[k]);
                }
            }
            return RecurrentOutput{stack(outputs, 0), s};
        };
    };
}

void check_options(const char* op, const RecurrentOptions& o)
{
    LOOM_CHECK(o.input_size() > 0 && o.hidden_size() > 0, op, "expects positive sizes, got input {} and hidden {}",
               o.input_size(), o.hidden_size());
    LOOM_CHECK(o.num_layers() >= 1, op, "expects num_layers >= 1, got {}", o.num_layers());
    LOOM_CHECK(o.dropout() >= 0 && o.dropout() < 1, op, "expects dropout in [0, 1), got {}", o.dropout());
    LOOM_CHECK(is_floating(o.dtype()), op, "expects a float32 or float64 dtype, got {}", o.dtype());
}

}  // namespace

RecurrentOutput run_recurrent(const char* op, const RecurrentOptions& options, std::size_t state_size,
                              const StepFn& step, const Tensor& input, const State& initial, const Tensor& lengths,
                              bool training, Generator* dropout_gen)
{
    check_options(op, options);
    return run_layers(op, options, state_size, composed(op, state_size, options.hidden_size(), nullptr, step), input,
                      initial, lengths, training, dropout_gen);
}

// ---- built-in layers ----

RecurrentLayer::RecurrentLayer(CellKind kind_, RecurrentOptions options_) : kind(kind_), options(std::move(options_))
{
    const std::string name = type_name();
    check_options(name.c_str(), options);
    LOOM_CHECK(kind == CellKind::RNN || options.nonlinearity() == Nonlinearity::Tanh, name,
               "nonlinearity is an option of RNN only");
    const std::int64_t G = gate_count(kind), H = options.hidden_size(), D = options.bidirectional() ? 2 : 1;
    for (std::int64_t l = 0; l < options.num_layers(); ++l)
        for (std::int64_t d = 0; d < D; ++d) {
            const std::string suffix = fmt::format("_l{}{}", l, d ? "_reverse" : "");
            const std::int64_t in = l == 0 ? options.input_size() : D * H;
            std::vector<Tensor> w;
            w.reserve(4);
            w.push_back(register_parameter("weight_ih" + suffix, recurrent_init({G * H, in}, H, options.dtype())));
            w.push_back(register_parameter("weight_hh" + suffix, recurrent_init({G * H, H}, H, options.dtype())));
            if (options.bias()) {
                w.push_back(register_parameter("bias_ih" + suffix, recurrent_init({G * H}, H, options.dtype())));
                w.push_back(register_parameter("bias_hh" + suffix, recurrent_init({G * H}, H, options.dtype())));
            }
            weights_.push_back(std::move(w));
        }
}

std::string RecurrentLayer::type_name() const
{
    return kind == CellKind::LSTM ? "LSTM" : kind == CellKind::GRU ? "GRU" : "RNN";
}

std::vector<Tensor> RecurrentLayer::weights(std::int64_t layer, std::int64_t direction) const
{
    return weights_.at(layer * (options.bidirectional() ? 2 : 1) + direction);
}

RecurrentOutput RecurrentLayer::forward(const Tensor& input, const State& initial, const Tensor& lengths)
{
    const std::string name = type_name();
    const DType weight_dtype = weights_.at(0).at(0).dtype();  // follows Module::to, unlike options.dtype()
    LOOM_CHECK(input.dtype() == weight_dtype, name, "input has dtype {}, the layer's weights {}", input.dtype(),
               weight_dtype);
    const std::int64_t D = options.bidirectional() ? 2 : 1;
    const std::size_t state_size = kind == CellKind::LSTM ? 2 : 1;
    const auto w = [this, D](std::int64_t l, std::int64_t d, std::size_t k) {
        const auto& ws = weights_[l * D + d];
        return k < ws.size() ? ws[k] : Tensor();
    };
    if (options.fused()) {
        const auto fused = [&](const Lengths& lens) -> DirectionFn {
            return [&, lens](std::int64_t l, std::int64_t d, const Tensor& x, const State& s0) {
                std::function<void(const Tensor&)> on_grad_h;
                if (hidden_gradient_hook) {
                    auto hook = hidden_gradient_hook;
                    on_grad_h = [hook, l, d](const Tensor& g) { hook(l, d, g); };
                }
                return detail::fused_layer(kind, options.nonlinearity(), x, {w(l, d, 0), w(l, d, 1), w(l, d, 2), w(l, d, 3)},
                                           s0, lens.values, d == 1, on_grad_h);
            };
        };
        return run_layers(name.c_str(), options, state_size, fused, input, initial, lengths, is_training(), nullptr);
    }
    LOOM_CHECK(!hidden_gradient_hook, name, "hidden_gradient_hook needs the fused layer (fused(true))");
    // The input projection of every step at once: one GEMM per layer and direction.
    const ProjectFn project = [w](std::int64_t l, std::int64_t d, const Tensor& x) {
        return input_projection(x, w(l, d, 0), w(l, d, 2));
    };
    const StepFn step = [this, w](std::int64_t l, std::int64_t d, const Tensor& gx, const State& s) {
        switch (kind) {
        case CellKind::LSTM: return lstm_step(gx, s, w(l, d, 1), w(l, d, 3));
        case CellKind::GRU: return gru_step(gx, s, w(l, d, 1), w(l, d, 3));
        default: return rnn_step(gx, s, w(l, d, 1), w(l, d, 3), options.nonlinearity());
        }
    };
    return run_layers(name.c_str(), options, state_size,
                      composed(name.c_str(), state_size, options.hidden_size(), project, step), input, initial,
                      lengths, is_training(), nullptr);
}

namespace {
void set_forget_bias(const Tensor& b_ih, const Tensor& b_hh, std::int64_t H, double value)
{
    LOOM_CHECK(b_ih.defined(), "lstm_forget_bias_", "the LSTM has no biases (bias=false)");
    NoGradGuard no_grad;
    b_ih.narrow(0, H, H).fill_(value);
    b_hh.narrow(0, H, H).fill_(0);
}
}  // namespace

void lstm_forget_bias_(RecurrentLayer& lstm, double value)
{
    LOOM_CHECK(lstm.kind == CellKind::LSTM, "lstm_forget_bias_", "expects an LSTM, got {}", lstm.type_name());
    for (std::int64_t l = 0; l < lstm.options.num_layers(); ++l)
        for (std::int64_t d = 0; d < (lstm.options.bidirectional() ? 2 : 1); ++d) {
            const auto w = lstm.weights(l, d);
            LOOM_CHECK(w.size() == 4, "lstm_forget_bias_", "the LSTM has no biases (bias=false)");
            set_forget_bias(w[2], w[3], lstm.options.hidden_size(), value);
        }
}

void lstm_forget_bias_(LSTMCell& cell, double value)
{
    set_forget_bias(cell.bias_ih, cell.bias_hh, cell.hidden_size, value);
}

}  // namespace loom::nn
