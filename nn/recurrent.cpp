// Recurrent cells, the built-in layers, and the runner that takes any cell over time. The
// kinds' equations and their fused layers live in cell_kinds.cpp, one type per kind.
#include "recurrent.hpp"

#include <cmath>
#include <optional>

#include "../autograd/scan.hpp"
#include "cell_kinds.hpp"

namespace loom::nn {

namespace {

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

// The weights of a built-in cell, shaped and named as PyTorch's.
#define LOOM_CELL_PARAMETERS(gates)                                                              \
    weight_ih = register_parameter("weight_ih", recurrent_init({gates * H, I}, H, dtype));       \
    weight_hh = register_parameter("weight_hh", recurrent_init({gates * H, H}, H, dtype));       \
    if (bias) {                                                                                  \
        bias_ih = register_parameter("bias_ih", recurrent_init({gates * H}, H, dtype));          \
        bias_hh = register_parameter("bias_hh", recurrent_init({gates * H}, H, dtype));          \
    }

namespace {
State builtin_cell_step(CellKind kind, const Cell& cell, const Tensor& x, const State& state, const LayerWeights& w,
                        Nonlinearity nl)
{
    check_cell_input(cell, x, state);
    return detail::cell_kind_row(kind).composed_step(linear(x, w.w_ih, w.b_ih), state, w, nl);
}
}  // namespace

RNNCell::RNNCell(std::int64_t I, std::int64_t H, bool bias, Nonlinearity nl, DType dtype)
    : Cell(I, H), nonlinearity(nl)
{
    LOOM_CELL_PARAMETERS(1)
}

State RNNCell::forward(const Tensor& x, const State& state)
{
    return builtin_cell_step(CellKind::RNN, *this, x, state, {weight_ih, weight_hh, bias_ih, bias_hh}, nonlinearity);
}

LSTMCell::LSTMCell(std::int64_t I, std::int64_t H, bool bias, DType dtype) : Cell(I, H, 2) { LOOM_CELL_PARAMETERS(4) }

State LSTMCell::forward(const Tensor& x, const State& state)
{
    return builtin_cell_step(CellKind::LSTM, *this, x, state, {weight_ih, weight_hh, bias_ih, bias_hh},
                             Nonlinearity::Tanh);
}

GRUCell::GRUCell(std::int64_t I, std::int64_t H, bool bias, DType dtype) : Cell(I, H) { LOOM_CELL_PARAMETERS(3) }

State GRUCell::forward(const Tensor& x, const State& state)
{
    return builtin_cell_step(CellKind::GRU, *this, x, state, {weight_ih, weight_hh, bias_ih, bias_hh},
                             Nonlinearity::Tanh);
}

#undef LOOM_CELL_PARAMETERS

// ---- running over time ----
//
// A forward call reads top to bottom: prepare() checks the input, the initial state and the
// lengths; run_stack() goes through layers and directions, calling run_direction for each; a
// direction is either the fused layer or run_steps(), the composed path, which calls the step
// at every time step.

namespace {

struct Lengths {
    std::vector<std::int64_t> values;  // empty: every sequence runs all T steps
    std::vector<Tensor> masks;         // per step: bool [B, 1], true while t < length
    Tensor tensor;                     // int64 [B]; undefined when empty
};

// The checked input, time-major, and its lengths.
struct Prepared {
    Tensor x;  // [T, B, I]
    Lengths lengths;
};

Prepared prepare(const std::string& op, const RecurrentOptions& o, std::size_t state_size, const Tensor& input,
                 const State& initial, const Tensor& lengths)
{
    const char* layout = o.batch_first() ? "[B, T, I]" : "[T, B, I] (time-major; set batch_first for [B, T, I])";
    LOOM_CHECK(input.dim() == 3, op, "expects input {}, got shape {}", layout, input.sizes());
    LOOM_CHECK(input.size(2) == o.input_size(), op, "expects input {} with I = {}, got shape {} (dim 2 is {})", layout,
               o.input_size(), input.sizes(), input.size(2));
    Prepared p{o.batch_first() ? input.transpose(0, 1) : input, {}};
    const std::int64_t T = p.x.size(0), B = p.x.size(1), H = o.hidden_size();
    const std::int64_t LD = o.num_layers() * (o.bidirectional() ? 2 : 1);
    LOOM_CHECK(T > 0 && B > 0, op, "expects at least one step and one sequence, got input shape {}", input.sizes());

    LOOM_CHECK(initial.empty() || initial.size() == state_size, op,
               "expects {} initial state tensor(s) (h0{}), got {}", state_size, state_size == 2 ? ", c0" : "",
               initial.size());
    for (std::size_t k = 0; k < initial.size(); ++k) {
        LOOM_CHECK(initial[k].defined(), op, "initial state {} is an undefined tensor", k);
        LOOM_CHECK(initial[k].sizes() == (Shape{LD, B, H}), op,
                   "initial state {} has shape {}, expected [L*D, B, H] = [{}, {}, {}]", k, initial[k].sizes(), LD, B,
                   H);
        LOOM_CHECK(initial[k].dtype() == input.dtype(), op, "initial state {} has dtype {}, the input {}", k,
                   initial[k].dtype(), input.dtype());
    }

    if (lengths.defined()) {
        LOOM_CHECK(lengths.dtype() == kInt64 && lengths.sizes() == Shape{B}, op,
                   "expects lengths as int64 [B] = [{}], got {} {}", B, lengths.dtype(), lengths.sizes());
        const Tensor values = lengths.contiguous();
        for (std::int64_t b = 0; b < B; ++b) {
            const std::int64_t n = values.data_ptr<std::int64_t>()[b];
            LOOM_CHECK(n >= 1 && n <= T, op, "length {} of sequence {} is outside [1, T] = [1, {}]", n, b, T);
            p.lengths.values.push_back(n);
        }
        p.lengths.tensor = values;
        const Tensor col = values.unsqueeze(1);
        for (std::int64_t t = 0; t < T; ++t) p.lengths.masks.push_back(gt(col, scalar_tensor(double(t), kInt64)));
    }
    return p;
}

// Stacks layers and directions the way PyTorch does: directions concatenated on the feature
// dim, dropout between layers, final states ordered layer by layer, forward before reverse.
// run_direction(layer, direction, x [T, B, F], s0) runs one layer in one direction.
template <class RunDirection>
RecurrentOutput run_stack(const RecurrentOptions& o, std::size_t state_size, const Tensor& x, const State& initial,
                          bool training, Generator* dropout_gen, RunDirection&& run_direction)
{
    const std::int64_t D = o.bidirectional() ? 2 : 1;
    std::vector<std::vector<Tensor>> finals(state_size), all(state_size);
    Tensor layer_input = x;
    for (std::int64_t l = 0; l < o.num_layers(); ++l) {
        std::vector<Tensor> direction_outputs;
        for (std::int64_t d = 0; d < D; ++d) {
            State s0;
            for (const Tensor& init : initial) s0.push_back(init.select(0, l * D + d));
            RecurrentOutput r = run_direction(l, d, layer_input, s0);
            direction_outputs.push_back(r.output);
            for (std::size_t k = 0; k < state_size; ++k) finals[k].push_back(r.state[k]);
            for (std::size_t k = 0; k < r.all_states.size(); ++k) all[k].push_back(r.all_states[k]);
        }
        layer_input = D == 1 ? direction_outputs[0] : concat(direction_outputs, 2);
        if (l + 1 < o.num_layers() && training && o.dropout() > 0)
            layer_input = Dropout(o.dropout(), dropout_gen)(layer_input);
    }
    RecurrentOutput result;
    result.output = o.batch_first() ? layer_input.transpose(0, 1) : layer_input;
    for (auto& f : finals) result.state.push_back(stack(f, 0));
    if (o.all_states()) {
        NoGradGuard no_grad;
        for (auto& a : all) result.all_states.push_back(stack(a, 0));
    }
    return result;
}

// The composed path's loop over one layer and direction: step(x_t, state) at every time step in
// processing order, with masked updates past each sequence's length. Every state the step
// returns is checked, so a cell that changes the batch or the width is named at once.
struct StepLoop {
    std::string op;
    std::int64_t layer, direction;
    std::size_t state_size;
    std::int64_t hidden;
    Lengths lens;
    std::int64_t T;  // steps in the whole sequence

    std::int64_t time_of(std::int64_t i) const { return direction == 0 ? i : T - 1 - i; }

    // Runs processing steps [i0, i1) from s, updated in place. x holds the times from x_first on
    // (all of them, or one segment's). Writes each step's output to outputs[t] and, when `steps`
    // has a row per state tensor, its state, detached, to steps[k][t].
    template <class Step>
    void run(Step& step, const Tensor& x, std::int64_t x_first, std::int64_t i0, std::int64_t i1, State& s,
             std::vector<Tensor>& outputs, std::vector<std::vector<Tensor>>& steps) const
    {
        const std::int64_t B = x.size(1);
        const Tensor no_output = lens.masks.empty() ? Tensor() : zeros({1}, x.dtype());
        for (std::int64_t i = i0; i < i1; ++i) {
            const std::int64_t t = time_of(i);
            // In anomaly mode a NaN is named with its op and, through this scope, its step.
            std::optional<autograd::Scope> scope;
            if (autograd::anomaly_mode_enabled()) scope.emplace(fmt::format("step {}", t));
            State next = step(x.select(0, t - x_first), s);
            scope.reset();
            LOOM_CHECK(next.size() == state_size, op,
                       "the cell of layer {} direction {} returned {} state tensor(s) at step {}, expected {}", layer,
                       direction, next.size(), t, state_size);
            for (std::size_t k = 0; k < state_size; ++k)
                LOOM_CHECK(next[k].defined() && next[k].sizes() == (Shape{B, hidden}) && next[k].dtype() == x.dtype(),
                           op,
                           "the cell of layer {} direction {} returned state tensor {} of shape {} and dtype {} at "
                           "step {}, expected [B, H] = [{}, {}] and {}",
                           layer, direction, k, next[k].defined() ? next[k].sizes() : Shape{},
                           next[k].defined() ? dtype_name(next[k].dtype()) : "undefined", t, B, hidden, x.dtype());
            if (lens.masks.empty()) {
                outputs[t] = next[0];
                s = std::move(next);
            } else {
                outputs[t] = where(lens.masks[t], next[0], no_output);
                for (std::size_t k = 0; k < state_size; ++k) s[k] = where(lens.masks[t], next[k], s[k]);
            }
            for (std::size_t k = 0; k < steps.size(); ++k) steps[k][t] = s[k].detach();
        }
    }
};

State initial_or_zeros(const StepLoop& loop, const Tensor& x, const State& s0)
{
    return s0.empty() ? State(loop.state_size, zeros({x.size(1), loop.hidden}, x.dtype())) : s0;
}

std::vector<std::vector<Tensor>> step_rows(const StepLoop& loop, bool all_states)
{
    return std::vector<std::vector<Tensor>>(all_states ? loop.state_size : 0,
                                            std::vector<Tensor>(static_cast<std::size_t>(loop.T)));
}

RecurrentOutput assemble(const std::vector<Tensor>& outputs, State final_state,
                         const std::vector<std::vector<Tensor>>& steps)
{
    RecurrentOutput result{stack(outputs, 0), std::move(final_state), {}};
    for (auto& per_step : steps) result.all_states.push_back(stack(per_step, 0));
    return result;
}

template <class Step>
RecurrentOutput run_steps(const StepLoop& loop, const Tensor& x, const State& s0, bool all_states, Step&& step)
{
    State s = initial_or_zeros(loop, x, s0);
    std::vector<Tensor> outputs(static_cast<std::size_t>(loop.T));
    auto steps = step_rows(loop, all_states);
    loop.run(step, x, 0, 0, loop.T, s, outputs, steps);
    return assemble(outputs, std::move(s), steps);
}

// Puts the thread's default generator back as it was when this guard was made.
struct RestoreGenerator {
    std::array<std::uint64_t, 4> state = default_generator().state();
    ~RestoreGenerator() { default_generator().set_state(state); }
};

// run_steps with checkpoints (RecurrentOptions::checkpoint): forward keeps only the state
// entering every `every`-th step, and the default generator's state there, and records one tape
// entry. Its backward runs each segment again with grad on, from those states, through the
// same loop, and differentiates it, last segment first; so a cell that draws from the default
// generator (dropout inside the cell) draws the same numbers again.
// What a step depends on besides its tensors, as lines (Module::call_state of its cell); null
// for a step that depends on nothing else.
using CallState = std::function<std::vector<std::string>()>;

// The first line where `now` differs from `then`, as "was ..., is now ...".
std::string first_difference(const std::vector<std::string>& then, const std::vector<std::string>& now)
{
    for (std::size_t k = 0; k < std::max(then.size(), now.size()); ++k) {
        const std::string a = k < then.size() ? then[k] : "nothing", b = k < now.size() ? now[k] : "nothing";
        if (a != b) return fmt::format("\"{}\" at forward, \"{}\" now", a, b);
    }
    return {};
}

template <class Step>
RecurrentOutput run_steps_checkpointed(const StepLoop& loop, std::int64_t every, const Tensor& x, const State& s0,
                                       bool all_states, const std::vector<Tensor>& params, Step step,
                                       CallState call_state)
{
    State s = initial_or_zeros(loop, x, s0);
    std::vector<Tensor> inputs{x};
    inputs.insert(inputs.end(), s.begin(), s.end());
    inputs.insert(inputs.end(), params.begin(), params.end());
    if (!autograd::should_record(inputs)) return run_steps(loop, x, s0, all_states, step);
    std::vector<Tensor> outputs(static_cast<std::size_t>(loop.T));
    auto steps = step_rows(loop, all_states);
    std::vector<State> entering;
    std::vector<std::array<std::uint64_t, 4>> generators;
    std::vector<Tensor> results;  // fresh handles: a cell may return a state it was given
    const std::vector<std::string> state_at_forward = call_state ? call_state() : std::vector<std::string>();
    {
        NoGradGuard no_grad;
        const std::uint64_t own_draws = loom::detail::draws_from_own_generators();
        for (std::int64_t i0 = 0; i0 < loop.T; i0 += every) {
            entering.push_back(s);
            generators.push_back(default_generator().state());
            loop.run(step, x, 0, i0, std::min(loop.T, i0 + every), s, outputs, steps);
        }
        // Backward replays the default generator alone; numbers drawn from another would differ.
        LOOM_CHECK(loom::detail::draws_from_own_generators() == own_draws, loop.op,
                   "with checkpoint(true) the cell runs again in backward, and it drew random numbers from a "
                   "Generator of its own, which the re-run cannot replay; draw from the default generator (no "
                   "Generator argument), or build the layer without checkpoint(true)");

        results.push_back(stack(outputs, 0));
        for (const Tensor& state : s) results.push_back(state.detach());
    }
    // Saved, so that an in-place change to any of them before backward is an error, not a wrong recomputation.
    std::vector<Tensor> saved{x};
    saved.insert(saved.end(), entering[0].begin(), entering[0].end());
    saved.insert(saved.end(), params.begin(), params.end());
    auto backward = [loop, every, entering = std::move(entering), generators = std::move(generators), step,
                     call_state, state_at_forward](const autograd::BackwardContext& c) mutable {
        LOOM_CHECK(!c.create_graph, loop.op,
                   "a checkpointed layer cannot be differentiated twice (create_graph): its backward runs segments "
                   "again; build it without checkpoint(true)");
        if (call_state) {
            const std::string changed = first_difference(state_at_forward, call_state());
            LOOM_CHECK(changed.empty(), loop.op,
                       "with checkpoint(true) backward runs the cell of layer {} direction {} again, but the cell "
                       "changed since forward ({}: train()/eval() or a hook added or removed), so it would compute "
                       "something else; change the cell after backward, or build the layer without checkpoint(true)",
                       loop.layer, loop.direction, changed);
        }
        const std::size_t S = loop.state_size;
        const Tensor& x = c.saved[0];
        const std::vector<Tensor> params(c.saved.begin() + 1 + std::ptrdiff_t(S), c.saved.end());
        const std::int64_t T = loop.T, B = x.size(1);
        const Tensor& dy = c.grads[0];
        State d_state(S);
        for (std::size_t k = 0; k < S; ++k)
            d_state[k] = c.grads[1 + k].defined() ? c.grads[1 + k] : zeros({B, loop.hidden}, x.dtype());
        Tensor dx = c.needs[0] ? zeros(x.sizes(), x.dtype()) : Tensor();
        std::vector<Tensor> d_params(params.size());
        const RestoreGenerator restore;
        for (std::size_t seg = entering.size(); seg-- > 0;) {
            const std::int64_t i0 = std::int64_t(seg) * every, i1 = std::min(T, i0 + every), n = i1 - i0;
            const std::int64_t t_first = loop.direction == 0 ? i0 : T - i1;  // the segment's earliest time
            const Tensor x_seg = x.narrow(0, t_first, n).detach().requires_grad_();
            State s(S), s_in(S);
            for (std::size_t k = 0; k < S; ++k) s[k] = s_in[k] = entering[seg][k].detach().requires_grad_();
            std::vector<Tensor> outputs(static_cast<std::size_t>(T));
            std::vector<std::vector<Tensor>> no_steps;
            const std::uint64_t first = autograd::detail::next_sequence();
            default_generator().set_state(generators[seg]);
            {
                GradModeGuard grad_on(true);
                loop.run(step, x_seg, t_first, i0, i1, s, outputs, no_steps);
            }
            std::vector<Tensor> roots, seeds;
            for (std::int64_t t = t_first; dy.defined() && t < t_first + n; ++t)
                if (outputs[t].requires_grad()) roots.push_back(outputs[t]), seeds.push_back(dy.select(0, t));
            for (std::size_t k = 0; k < S; ++k)
                if (s[k].requires_grad()) roots.push_back(s[k]), seeds.push_back(d_state[k]);
            std::vector<Tensor> wrt = s_in;
            wrt.push_back(x_seg);
            std::vector<std::size_t> trained;  // the parameters that want a gradient
            for (std::size_t p = 0; p < params.size(); ++p)
                if (params[p].requires_grad()) trained.push_back(p), wrt.push_back(params[p]);
            const std::vector<Tensor> g = roots.empty() ? std::vector<Tensor>(wrt.size())
                                                        : autograd::detail::grad_since(first, roots, wrt, seeds);
            for (std::size_t k = 0; k < S; ++k) d_state[k] = g[k].defined() ? g[k] : zeros_like(d_state[k]);
            if (dx.defined() && g[S].defined()) {
                NoGradGuard no_grad;
                dx.narrow(0, t_first, n).copy_(g[S]);
            }
            for (std::size_t j = 0; j < trained.size(); ++j) {
                const Tensor& gp = g[S + 1 + j];
                Tensor& sum = d_params[trained[j]];
                if (gp.defined()) sum = sum.defined() ? sum + gp : gp;
            }
        }
        std::vector<Tensor> grads{dx};
        grads.insert(grads.end(), d_state.begin(), d_state.end());
        grads.insert(grads.end(), d_params.begin(), d_params.end());
        return grads;
    };
    autograd::push_entry("checkpointed steps", inputs, results, saved, autograd::detail::as_backward_fn(std::move(backward)));
    RecurrentOutput result{results[0], State(results.begin() + 1, results.end()), {}};
    for (auto& per_step : steps) result.all_states.push_back(stack(per_step, 0));
    return result;
}

std::int64_t checkpoint_interval(const RecurrentOptions& o, std::int64_t T)
{
    return o.checkpoint_every() > 0 ? o.checkpoint_every() : std::int64_t(std::ceil(std::sqrt(double(T))));
}

// run_steps through scan(): the step traced and replayed, or nothing when it cannot be, `why`
// then saying why. The output and final state are run_steps' own; so are the per-step states,
// which for a sequence past its end hold its final state (or, in reverse, its initial one).
template <class Step>
std::optional<RecurrentOutput> replay_steps(const StepLoop& loop, const Tensor& x, const State& s0, bool all_states,
                                            std::int64_t checkpoint_every, const std::vector<Tensor>& params,
                                            const Step& step, std::string& why)
{
    const State s = initial_or_zeros(loop, x, s0);
    ScanOptions options;
    options.reverse = loop.direction == 1;
    options.lengths = loop.lens.tensor;
    options.checkpoint = checkpoint_every > 0;
    options.checkpoint_every = checkpoint_every;
    const ScanStep scan_step = [step, all_states](const std::vector<Tensor>& carry, const std::vector<Tensor>& x_t) {
        State next = step(x_t[0], carry);
        std::vector<Tensor> y = all_states ? next : std::vector<Tensor>{next.at(0)};
        return ScanStepResult{std::move(next), std::move(y)};
    };
    ScanOutput r;
    if (!loom::detail::try_replay_scan(scan_step, s, {x}, params, options, r)) {
        why = std::move(r.eager_reason);
        return std::nullopt;
    }
    RecurrentOutput out{r.ys[0], r.carry, {}};
    if (all_states) {
        NoGradGuard no_grad;
        const Tensor running = loop.lens.masks.empty() ? Tensor() : stack(loop.lens.masks, 0);  // [T, B, 1]
        for (std::size_t k = 0; k < loop.state_size; ++k) {
            const Tensor held = (loop.direction == 0 ? r.carry[k] : s[k]).unsqueeze(0);
            out.all_states.push_back(running.defined() ? where(running, r.ys[k], held) : r.ys[k].detach());
        }
    }
    return out;
}

// One layer and direction of the composed path, checkpointed when the options say so; `step`
// and `params` (the tensors step reads besides x_t and the state) are then kept for backward.
// With `replay`, it runs through scan() when the step can be replayed.
template <class Step>
RecurrentOutput run_direction_steps(const std::string& op, const RecurrentOptions& o, std::size_t state_size,
                                    const Lengths& lens, std::int64_t l, std::int64_t d, const Tensor& x,
                                    const State& s0, const std::vector<Tensor>& params, Step step,
                                    CallState call_state = nullptr, bool replay = false)
{
    const StepLoop loop{op, l, d, state_size, o.hidden_size(), lens, x.size(0)};
    if (replay) {
        std::string why;
        const std::int64_t every = o.checkpoint() ? checkpoint_interval(o, x.size(0)) : 0;
        if (auto out = replay_steps(loop, x, s0, o.all_states(), every, params, step, why)) return std::move(*out);
        loom::detail::say_once_why_eager(fmt::format("{}: {}", op, why));
    }
    if (!o.checkpoint()) return run_steps(loop, x, s0, o.all_states(), step);
    return run_steps_checkpointed(loop, checkpoint_interval(o, x.size(0)), x, s0, o.all_states(), params,
                                  std::move(step), std::move(call_state));
}

}  // namespace

void check_recurrent_options(const std::string& op, const RecurrentOptions& o)
{
    LOOM_CHECK(o.input_size() > 0 && o.hidden_size() > 0, op, "expects positive sizes, got input {} and hidden {}",
               o.input_size(), o.hidden_size());
    LOOM_CHECK(o.num_layers() >= 1, op, "expects num_layers >= 1, got {}", o.num_layers());
    LOOM_CHECK(o.dropout() >= 0 && o.dropout() < 1, op, "expects dropout in [0, 1), got {}", o.dropout());
    LOOM_CHECK(is_floating(o.dtype()), op, "expects a float32 or float64 dtype, got {}", o.dtype());
    LOOM_CHECK(o.checkpoint_every() >= 0, op, "expects checkpoint_every >= 0 (0: every ceil(sqrt(T)) steps), got {}",
               o.checkpoint_every());
    LOOM_CHECK(o.checkpoint_every() == 0 || o.checkpoint(), op,
               "checkpoint_every({}) is set but checkpoint is off; set checkpoint(true) as well, or leave "
               "checkpoint_every at 0",
               o.checkpoint_every());
}

RecurrentOutput run_recurrent(const std::string& op, const RecurrentOptions& options, std::size_t state_size,
                              const StepFn& step, const Tensor& input, const State& initial, const Tensor& lengths,
                              bool training, Generator* dropout_gen, const ParametersFn& parameters,
                              const CallStateFn& call_state, bool replay)
{
    check_recurrent_options(op, options);
    LOOM_CHECK(!options.checkpoint() || parameters, op,
               "checkpoint(true) needs the parameters each step reads, to send their gradients on from the "
               "segments it runs again: pass them to run_recurrent");
    const Prepared p = prepare(op, options, state_size, input, initial, lengths);
    return run_stack(options, state_size, p.x, initial, training, dropout_gen,
                     [&](std::int64_t l, std::int64_t d, const Tensor& x, const State& s0) {
                         return run_direction_steps(
                             op, options, state_size, p.lengths, l, d, x, s0,
                             (options.checkpoint() || replay) && parameters ? parameters(l, d) : std::vector<Tensor>{},
                             [step, l, d](const Tensor& x_t, const State& s) { return step(l, d, x_t, s); },
                             call_state ? CallState([call_state, l, d] { return call_state(l, d); }) : nullptr, replay);
                     });
}

const Tensor& RecurrentOutput::all_h() const
{
    LOOM_CHECK(!all_states.empty(), "RecurrentOutput::all_h",
               "this output has no per-step states: build the layer with RecurrentOptions::all_states(true)");
    return all_states[0];
}

const Tensor& RecurrentOutput::all_c() const
{
    LOOM_CHECK(!all_states.empty(), "RecurrentOutput::all_c",
               "this output has no per-step states: build the layer with RecurrentOptions::all_states(true)");
    LOOM_CHECK(all_states.size() > 1, "RecurrentOutput::all_c",
               "this layer's state is h alone (an RNN or GRU); only an LSTM has a cell state c");
    return all_states[1];
}

Tensor step_norms(const Tensor& per_step)
{
    LOOM_CHECK(per_step.defined() && per_step.dim() >= 1 && is_floating(per_step.dtype()), "step_norms",
               "expects a float tensor [T, ...] of per-step values, got {}",
               per_step.defined() ? fmt::format("shape {} and dtype {}", per_step.sizes(), per_step.dtype())
                                  : std::string("an undefined tensor"));
    NoGradGuard no_grad;
    return per_step.reshape({per_step.size(0), -1}).norm(2, {1});
}

// ---- built-in layers ----

RecurrentLayer::RecurrentLayer(CellKind kind_, RecurrentOptions options_) : kind(kind_), options(std::move(options_))
{
    const std::string name = type_name();
    check_recurrent_options(name, options);
    LOOM_CHECK(kind == CellKind::RNN || options.nonlinearity() == Nonlinearity::Tanh, name,
               "nonlinearity is an option of RNN only");
    const std::int64_t G = detail::cell_kind_row(kind).gates, H = options.hidden_size();
    const std::int64_t D = options.bidirectional() ? 2 : 1;
    const auto init = [&](const std::string& n, const Shape& shape) {
        return register_parameter(n, recurrent_init(shape, H, options.dtype()));
    };
    for (std::int64_t l = 0; l < options.num_layers(); ++l)
        for (std::int64_t d = 0; d < D; ++d) {
            const std::string suffix = fmt::format("_l{}{}", l, d ? "_reverse" : "");
            const std::int64_t in = l == 0 ? options.input_size() : D * H;
            LayerWeights w;
            w.w_ih = init("weight_ih" + suffix, {G * H, in});
            w.w_hh = init("weight_hh" + suffix, {G * H, H});
            if (options.bias()) {
                w.b_ih = init("bias_ih" + suffix, {G * H});
                w.b_hh = init("bias_hh" + suffix, {G * H});
            }
            weights_.push_back(std::move(w));
        }
}

std::string RecurrentLayer::type_name() const { return cell_kind_name(kind); }

const LayerWeights& RecurrentLayer::weights(std::int64_t layer, std::int64_t direction) const
{
    const std::int64_t D = options.bidirectional() ? 2 : 1;
    LOOM_CHECK(layer >= 0 && layer < options.num_layers() && direction >= 0 && direction < D, type_name(),
               "has no layer {} direction {} ({} layer(s), {} direction(s))", layer, direction, options.num_layers(), D);
    return weights_[static_cast<std::size_t>(layer * D + direction)];
}

RecurrentOutput detail::call_recurrent_with_hooks(
    Module& module, const Tensor& input, const State& initial, const Tensor& lengths,
    const std::function<RecurrentOutput(const Tensor& input, const State& initial, const Tensor& lengths)>& forward)
{
    Tensors inputs{input, lengths};
    inputs.insert(inputs.end(), initial.begin(), initial.end());
    State all_states;
    Tensors outputs = module.call_with_hooks(std::move(inputs), [&](const Tensors& in) {
        RecurrentOutput r = forward(in[0], State(in.begin() + 2, in.end()), in[1]);
        all_states = std::move(r.all_states);
        Tensors out{r.output};
        out.insert(out.end(), r.state.begin(), r.state.end());
        return out;
    });
    return RecurrentOutput{outputs.at(0), State(outputs.begin() + 1, outputs.end()), std::move(all_states)};
}

RecurrentOutput RecurrentLayer::operator()(const Tensor& input, const State& initial, const Tensor& lengths)
{
    if (!has_hooks()) return forward(input, initial, lengths);
    return detail::call_recurrent_with_hooks(*this, input, initial, lengths,
                                             [this](const Tensor& x, const State& s0, const Tensor& lens) {
                                                 return forward(x, s0, lens);
                                             });
}

RecurrentOutput RecurrentLayer::forward(const Tensor& input, const State& initial, const Tensor& lengths)
{
    const std::string name = type_name();
    const detail::CellKindRow& row = detail::cell_kind_row(kind);
    const DType weight_dtype = weights_.at(0).w_ih.dtype();  // follows Module::to, unlike options.dtype()
    LOOM_CHECK(input.dtype() == weight_dtype, name, "input has dtype {}, the layer's weights {}", input.dtype(),
               weight_dtype);
    LOOM_CHECK(options.fused() || !state_gradient_hook, name,
               "state_gradient_hook needs the fused layer (fused(true)); with fused(false), register_hook on the "
               "states of a cell loop instead");
    const Prepared p = prepare(name, options, row.state_size, input, initial, lengths);
    const Nonlinearity nl = options.nonlinearity();
    return run_stack(options, row.state_size, p.x, initial, is_training(), nullptr,
                     [&](std::int64_t l, std::int64_t d, const Tensor& x, const State& s0) {
                         const LayerWeights& w = weights(l, d);
                         if (options.fused()) {
                             std::function<void(const State&)> on_state_grads;
                             if (state_gradient_hook)
                                 on_state_grads = [hook = state_gradient_hook, l, d](const State& g) { hook(l, d, g); };
                             const std::int64_t every = options.checkpoint() ? checkpoint_interval(options, x.size(0)) : 0;
                             return row.fused(
                                 {x, w, s0, p.lengths.values, d == 1, nl, on_state_grads, every, options.all_states()});
                         }
                         // The input projection of every step at once, then the equations step by step.
                         const Tensor gx = linear(x, w.w_ih, w.b_ih);
                         std::vector<Tensor> hidden_weights{w.w_hh};
                         if (w.b_hh.defined()) hidden_weights.push_back(w.b_hh);
                         return run_direction_steps(name, options, row.state_size, p.lengths, l, d, gx, s0,
                                                    hidden_weights,
                                                    [w, nl, kind_row = &row](const Tensor& gx_t, const State& s) {
                                                        return kind_row->composed_step(gx_t, s, w, nl);
                                                    });
                     });
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
            const LayerWeights& w = lstm.weights(l, d);
            set_forget_bias(w.b_ih, w.b_hh, lstm.options.hidden_size(), value);
        }
}

void lstm_forget_bias_(LSTMCell& cell, double value)
{
    set_forget_bias(cell.bias_ih, cell.bias_hh, cell.hidden_size, value);
}

}  // namespace loom::nn
