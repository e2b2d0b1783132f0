/// \file
/// Recurrent cells, the layers RNN/LSTM/GRU, and Recurrent<Cell>, which runs any cell over time.
/// Conventions are PyTorch's: gate orders (LSTM i,f,g,o; GRU r,z,n with the reset gate applied
/// after the hidden matmul), parameter names (weight_ih_l0, ..._reverse), time-major [T, B, F].
#pragma once
#include <functional>
#include <string_view>

#include "../core/options.hpp"
#include "layers.hpp"
#include "recurrent_types.hpp"

namespace loom::nn {



/// The options of the recurrent layers, as libtorch's RNNOptions, LSTMOptions and GRUOptions.
class RecurrentOptions {
public:
    /// A layer reading `input_size` features into `hidden_size` units.
    RecurrentOptions(std::int64_t input_size, std::int64_t hidden_size)
        : input_size_(input_size), hidden_size_(hidden_size) {}
    /// Features per step of the input.
    LOOM_OPTION(std::int64_t, input_size, 0)
    /// Units of the state.
    LOOM_OPTION(std::int64_t, hidden_size, 0)
    /// Layers stacked.
    LOOM_OPTION(std::int64_t, num_layers, 1)
    /// Whether the layers have biases.
    LOOM_OPTION(bool, bias, true)
    /// Input and output as [B, T, F] instead of [T, B, F].
    LOOM_OPTION(bool, batch_first, false)
    LOOM_OPTION(double, dropout, 0.0)  ///< between stacked layers, in training
    /// Both directions, their outputs concatenated.
    LOOM_OPTION(bool, bidirectional, false)
    LOOM_OPTION(Nonlinearity, nonlinearity, Nonlinearity::Tanh)  ///< RNN only
    /// The parameters' dtype.
    LOOM_OPTION(DType, dtype, kFloat32)
    /// Built-in layers only: one tape entry per layer and direction with a hand-written BPTT
    /// (true), or the cells' equations recorded op by op (false). Both give the same numbers.
    LOOM_OPTION(bool, fused, true)
    /// Keep the state of every k-th step instead of every step's values, and recompute each
    /// segment of k steps in backward, so a layer's memory for backward grows like T/k + k
    /// instead of T (about one more forward of compute). k is checkpoint_every, or ceil(sqrt(T))
    /// when that is 0. Fused and composed layers and Recurrent<Cell> alike; a composed or
    /// Recurrent<Cell> layer runs its cell again in backward (forward hooks fire again, and a cell
    /// drawing random numbers gets the default generator's numbers again), and cannot be
    /// differentiated twice. What would make the re-run differ is an error: a cell switched
    /// between train() and eval() or given or stripped of hooks before backward, a buffer changed
    /// in place, a tensor requiring grad that the cell reads without registering it, or numbers
    /// drawn from a Generator of the cell's own. A Recurrent<Cell> whose step is replayed (scan)
    /// keeps every step's state and the values inside the step for one segment at a time, and
    /// backward computes each segment's again with the traced program, not by calling the cell:
    /// the checks above on a re-run do not apply to it, and it can be differentiated twice
    /// (create_graph runs the cell step by step again, and differentiates that).
    LOOM_OPTION(bool, checkpoint, false)
    /// Checkpoint every this many steps (0: the square root of the length).
    LOOM_OPTION(std::int64_t, checkpoint_every, 0)
    /// Also return every step's state of every layer and direction (RecurrentOutput::all_h,
    /// all_c): values to look at, off the tape. Off by default; nothing is copied when off.
    LOOM_OPTION(bool, all_states, false)
};
/// As libtorch's name.
using RNNOptions = RecurrentOptions;
/// As libtorch's name.
using LSTMOptions = RecurrentOptions;
/// As libtorch's name.
using GRUOptions = RecurrentOptions;


/// The norm of each step of a per-step tensor [T, ...] (dL/dh_t from state_gradient_hook, or
/// all_h()[k]): [T], the curve of vanishing and exploding gradients in one line.
Tensor step_norms(const Tensor& per_step);

namespace detail {
/// Runs a recurrent module's forward through its hooks, which see (input, lengths, initial...) ->
/// (output, state...); the per-step states (all_states) pass by them untouched.
RecurrentOutput call_recurrent_with_hooks(
    Module& module, const Tensor& input, const State& initial, const Tensor& lengths,
    const std::function<RecurrentOutput(const Tensor& input, const State& initial, const Tensor& lengths)>& forward);
}  // namespace detail

// ---- cells ----

/// Maps (x [B, I], state) to the next state. Subclass it to define a new architecture.
class Cell : public Module {
public:
    /// A cell mapping `input_size` features to `hidden_size` units with `state_size` state tensors (h; h and c for an LSTM).
    Cell(std::int64_t input_size, std::int64_t hidden_size, std::size_t state_size = 1);
    /// One step: the next state from the input x_t [B, input_size] and the state.
    virtual State forward(const Tensor& x, const State& state) = 0;
    /// Hooks see (x, state...) -> (state...).
    State operator()(const Tensor& x, const State& state)
    {
        if (!has_hooks()) return forward(x, state);
        Tensors inputs{x};
        inputs.insert(inputs.end(), state.begin(), state.end());
        return call_with_hooks(std::move(inputs), [this](const Tensors& in) {
            return forward(in[0], State(in.begin() + 1, in.end()));
        });
    }
    /// The zero state for a batch of B.
    State initial_state(std::int64_t batch, DType dtype) const;
    /// Whether Recurrent<Cell> may trace this cell's step and replay it over time (scan). A cell
    /// whose step depends on more than its arguments and its tensors (a counter of calls, a flag
    /// changed between steps) must return false: a replay runs what the traces saw. The
    /// built-in cells say no too, as each of their steps is one fused op already.
    virtual bool replayable() const { return true; }
    std::int64_t input_size;   ///< features per step of the input
    std::int64_t hidden_size;  ///< units of each state tensor
    /// Number of state tensors.
    std::size_t state_size;
};

/// h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh)  (or relu)
class RNNCell : public Cell {
public:
    /// An Elman cell: h' = nonlinearity(x W_ih^T + b_ih + h W_hh^T + b_hh).
    RNNCell(std::int64_t input_size, std::int64_t hidden_size, bool bias = true,
            Nonlinearity nonlinearity = Nonlinearity::Tanh, DType dtype = kFloat32);
    /// One step.
    State forward(const Tensor& x, const State& state) override;
    bool replayable() const override { return false; }
    Tensor weight_ih;  ///< [gates x hidden_size, input_size], gates stacked in PyTorch's order
    Tensor weight_hh;  ///< [gates x hidden_size, hidden_size]
    Tensor bias_ih;    ///< [gates x hidden_size]; undefined without bias
    Tensor bias_hh;    ///< [gates x hidden_size]; undefined without bias
    /// Tanh or ReLU.
    Nonlinearity nonlinearity;
};

/// i,f,g,o = split(x W_ih^T + b_ih + h W_hh^T + b_hh); c' = s(f) c + s(i) tanh(g); h' = s(o) tanh(c')
class LSTMCell : public Cell {
public:
    /// An LSTM cell with PyTorch's equations and gate order (i, f, g, o).
    LSTMCell(std::int64_t input_size, std::int64_t hidden_size, bool bias = true, DType dtype = kFloat32);
    /// One step: (h, c) to (h', c').
    State forward(const Tensor& x, const State& state) override;
    bool replayable() const override { return false; }
    Tensor weight_ih;  ///< [gates x hidden_size, input_size], gates stacked in PyTorch's order
    Tensor weight_hh;  ///< [gates x hidden_size, hidden_size]
    Tensor bias_ih;    ///< [gates x hidden_size]; undefined without bias
    Tensor bias_hh;    ///< [gates x hidden_size]; undefined without bias
};

/// r = s(x W_ir + b_ir + h W_hr + b_hr); z likewise; n = tanh(x W_in + b_in + r (h W_hn + b_hn));
/// h' = (1 - z) n + z h
class GRUCell : public Cell {
public:
    /// A GRU cell with PyTorch's equations and gate order (r, z, n).
    GRUCell(std::int64_t input_size, std::int64_t hidden_size, bool bias = true, DType dtype = kFloat32);
    /// One step.
    State forward(const Tensor& x, const State& state) override;
    bool replayable() const override { return false; }
    Tensor weight_ih;  ///< [gates x hidden_size, input_size], gates stacked in PyTorch's order
    Tensor weight_hh;  ///< [gates x hidden_size, hidden_size]
    Tensor bias_ih;    ///< [gates x hidden_size]; undefined without bias
    Tensor bias_hh;    ///< [gates x hidden_size]; undefined without bias
};

// ---- running over time ----

/// One step of layer `layer`, direction `direction` (0 forward, 1 reverse).
using StepFn = std::function<State(std::int64_t layer, std::int64_t direction, const Tensor& x, const State& state)>;
/// The tensors a step of layer `layer`, direction `direction` reads besides its input and state
/// (its cell's parameters).
using ParametersFn = std::function<std::vector<Tensor>(std::int64_t layer, std::int64_t direction)>;

/// What a step of layer `layer`, direction `direction` runs besides its tensors, as lines to
/// compare (Module::call_state() of its cell: training flags and hooks). With checkpoint(true) it
/// is taken in forward and again before backward runs the step again; any difference is an error.
using CallStateFn = std::function<std::vector<std::string>(std::int64_t layer, std::int64_t direction)>;

/// Runs `step` over input [T, B, I] for every layer and direction with the options' stacking,
/// bidirectionality, dropout between layers, batch_first and per-sequence lengths (int64 [B],
/// any order, each in [1, T]): outputs past a sequence's length are zero and its final state is
/// the one at its own last step, as PyTorch's pack_padded_sequence gives. `op` names errors.
/// Every state tensor the step returns must be [B, H] in the input's dtype. With checkpoint(true)
/// `parameters` must name every tensor each step reads (parameters and buffers: an in-place
/// change to one before backward is then an error), and `call_state`, where given, what else it
/// depends on; `step` is kept for backward, which runs segments of it again. With `replay` each
/// layer and direction runs through scan(): the step is traced and replayed when it can be
/// (checkpointed too: the replay's backward computes segments again), and run step by step
/// otherwise (saying why once); `step` is then kept for backward too (create_graph runs it again).
RecurrentOutput run_recurrent(const std::string& op, const RecurrentOptions& options, std::size_t state_size,
                              const StepFn& step, const Tensor& input, const State& initial, const Tensor& lengths,
                              bool training, Generator* dropout_gen = nullptr, const ParametersFn& parameters = nullptr,
                              const CallStateFn& call_state = nullptr, bool replay = false);

/// Throws loom::Error naming `op` for sizes, layers, dropout or a dtype that cannot run.
void check_recurrent_options(const std::string& op, const RecurrentOptions& options);

/// Any cell over time: Recurrent<MyCell>(RecurrentOptions(I, H).num_layers(2).bidirectional(true)).
/// Cells are built as CellT(input_size, hidden_size) and moved to options.dtype(), or by `make`,
/// which must build them in options.dtype(); they are named cell_l0, cell_l0_reverse, ...
template <class CellT> class Recurrent : public Module {
public:
    /// Makes the cell of each layer and direction; by default CellT(input_size, hidden_size).
    using Factory = std::function<std::shared_ptr<CellT>(std::int64_t input_size, std::int64_t hidden_size)>;
    /// A layer of cells from `make` (or CellT's constructor), one per layer and direction.
    explicit Recurrent(RecurrentOptions options, Factory make = nullptr) : options(std::move(options))
    {
        const RecurrentOptions& o = this->options;
        check_recurrent_options("Recurrent", o);
        const bool own_factory = !make;
        if (own_factory) make = [](std::int64_t i, std::int64_t h) { return std::make_shared<CellT>(i, h); };
        const std::int64_t D = o.bidirectional() ? 2 : 1;
        for (std::int64_t l = 0; l < o.num_layers(); ++l)
            for (std::int64_t d = 0; d < D; ++d) {
                const std::int64_t in = l == 0 ? o.input_size() : D * o.hidden_size();
                auto cell = make(in, o.hidden_size());
                LOOM_CHECK(cell && cell->input_size == in && cell->hidden_size == o.hidden_size(), "Recurrent",
                           "the cell factory must build a cell of input size {} and hidden size {}", in,
                           o.hidden_size());
                if (own_factory) cell->to(o.dtype());
                for (const Tensor& p : cell->parameters())
                    LOOM_CHECK(p.dtype() == o.dtype(), "Recurrent",
                               "the cell factory built a {} parameter, but the options say dtype {}; set "
                               "RecurrentOptions::dtype to match",
                               p.dtype(), o.dtype());
                cells_.push_back(register_module(fmt::format("cell_l{}{}", l, d ? "_reverse" : ""), cell));
            }
    }
    /// Runs the sequence `input` from `initial` (zeros when empty); `lengths` (int64 [B]) stops each sequence at its length.
    RecurrentOutput forward(const Tensor& input, const State& initial = {}, const Tensor& lengths = {})
    {
        const std::int64_t D = options.bidirectional() ? 2 : 1;
        // The step holds the cells themselves: with checkpoint(true) backward calls it again.
        return run_recurrent(
            fmt::format("Recurrent<{}>", cells_.at(0)->type_name()), options, cells_.at(0)->state_size,
            [cells = cells_, D](std::int64_t l, std::int64_t d, const Tensor& x, const State& s) {
                return (*cells[l * D + d])(x, s);
            },
            input, initial, lengths, is_training(), nullptr,
            [this, D](std::int64_t l, std::int64_t d) {
                std::vector<Tensor> read = cells_[l * D + d]->parameters();
                for (const auto& [name, buffer] : cells_[l * D + d]->named_buffers()) read.push_back(buffer);
                return read;
            },
            [cells = cells_, D](std::int64_t l, std::int64_t d) { return cells[l * D + d]->call_state(); },
            replayable());
    }
    /// forward(), with the module's hooks.
    RecurrentOutput operator()(const Tensor& input, const State& initial = {}, const Tensor& lengths = {})
    {
        if (!has_hooks()) return forward(input, initial, lengths);
        return detail::call_recurrent_with_hooks(*this, input, initial, lengths,
                                                 [this](const Tensor& x, const State& s0, const Tensor& lens) {
                                                     return forward(x, s0, lens);
                                                 });
    }
    /// The cell of `layer` and `direction`.
    CellT& cell(std::int64_t layer, std::int64_t direction = 0)
    {
        return *cells_.at(layer * (options.bidirectional() ? 2 : 1) + direction);
    }
    /// Whether forward traces the cells' step once and replays it (scan): unless a cell says it
    /// cannot be (Cell::replayable) or a module in a cell has a hook, which must run at every step.
    bool replayable() const
    {
        return std::all_of(cells_.begin(), cells_.end(), [](const auto& c) { return c->replayable() && !c->tree_has_hooks(); });
    }
    /// The options it was built with.
    RecurrentOptions options;

private:
    std::vector<std::shared_ptr<CellT>> cells_;
};

// ---- built-in layers ----



/// RNN, LSTM and GRU layers with PyTorch's parameters: weight_ih_l{k}[_reverse] [G*H, I or D*H],
/// weight_hh_l{k}[_reverse] [G*H, H], bias_ih_l{k}[_reverse] and bias_hh_l{k}[_reverse] [G*H].
class RecurrentLayer : public Module {
public:
    /// A layer of `kind` with `options`; parameters named as PyTorch's.
    RecurrentLayer(CellKind kind, RecurrentOptions options);
    /// input [T, B, I] ([B, T, I] with batch_first); initial: h0 (and c0) [L*D, B, H], or none for
    /// zeros; lengths: int64 [B] or none.
    RecurrentOutput forward(const Tensor& input, const State& initial = {}, const Tensor& lengths = {});
    /// Runs the sequence, as Recurrent::forward.
    RecurrentOutput operator()(const Tensor& input, const State& initial = {}, const Tensor& lengths = {});
    std::string type_name() const override;
    /// Called during backward, for each layer and direction, with the gradient that flows into
    /// every step's state: {dL/dh_t} ({dL/dh_t, dL/dc_t} for an LSTM), [T, B, H] each, time-major
    /// (the picture of vanishing and exploding gradients). Fused layers only; costs nothing unset.
    std::function<void(std::int64_t layer, std::int64_t direction, const State& grads)> state_gradient_hook;
    /// The parameters of `layer` and `direction`.
    const LayerWeights& weights(std::int64_t layer, std::int64_t direction) const;
    /// RNN, LSTM or GRU.
    CellKind kind;
    /// The options it was built with.
    RecurrentOptions options;

private:
    std::vector<LayerWeights> weights_;  ///< [layer * D + direction]
};

/// An Elman RNN, as torch::nn::RNN.
class RNN : public RecurrentLayer {
public:
    /// A layer with `options`.
    explicit RNN(RecurrentOptions options) : RecurrentLayer(CellKind::RNN, std::move(options)) {}
};
/// An LSTM, as torch::nn::LSTM.
class LSTM : public RecurrentLayer {
public:
    /// A layer with `options`.
    explicit LSTM(RecurrentOptions options) : RecurrentLayer(CellKind::LSTM, std::move(options)) {}
};
/// A GRU, as torch::nn::GRU.
class GRU : public RecurrentLayer {
public:
    /// A layer with `options`.
    explicit GRU(RecurrentOptions options) : RecurrentLayer(CellKind::GRU, std::move(options)) {}
};

/// Sets the forget-gate slice of every LSTM input bias to `value` and of every hidden bias to 0,
/// so the gate starts open (Jozefowicz et al. 2015; Keras' unit_forget_bias).
void lstm_forget_bias_(RecurrentLayer& lstm, double value = 1.0);
/// Sets the forget gate's biases to `value` (split between bias_ih and bias_hh), a common initialisation.
void lstm_forget_bias_(LSTMCell& cell, double value = 1.0);

}  // namespace loom::nn
