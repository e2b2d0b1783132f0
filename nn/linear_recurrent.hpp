/// \file
/// Recurrent layers linear in their state: minGRU and minLSTM (Feng et al. 2024, "Were RNNs All
/// We Needed?") and Mamba's selective state-space block (Gu & Dao 2023). Their gates read the
/// input only, never the state, so the state follows h_t = a_t h_{t-1} + b_t, and a whole sequence
/// is one linear_recurrence: trained over all steps at once, and run one step at a time (step())
/// for generation, with the same numbers.
#pragma once
#include <memory>

#include "../core/options.hpp"
#include "layers.hpp"
#include "recurrent_types.hpp"

namespace loom::nn {

/// The options of MinGRU and MinLSTM.
class MinRecurrentOptions {
public:
    /// A layer reading `input_size` features into `hidden_size` units.
    MinRecurrentOptions(std::int64_t input_size, std::int64_t hidden_size)
        : input_size_(input_size), hidden_size_(hidden_size) {}
    /// Features per step of the input.
    LOOM_OPTION(std::int64_t, input_size, 0)
    /// Units of the state.
    LOOM_OPTION(std::int64_t, hidden_size, 0)
    /// Whether the linear maps have biases.
    LOOM_OPTION(bool, bias, true)
    /// Input and output as [B, T, F] instead of [T, B, F].
    LOOM_OPTION(bool, batch_first, false)
    /// Feng et al.'s log-space form (the default, theirs for training): the candidate state goes
    /// through g(v) = v + 1/2 for v >= 0 and sigmoid(v) below, so every state is positive, and the
    /// recurrence runs in log space (log_linear_recurrence), finite however long the sequence.
    /// false: their plain form, the candidate state unbounded, through linear_recurrence.
    LOOM_OPTION(bool, log_space, true)
    /// The parameters' dtype.
    LOOM_OPTION(DType, dtype, kFloat32)
};
/// The options of MinGRU.
using MinGRUOptions = MinRecurrentOptions;
/// The options of MinLSTM.
using MinLSTMOptions = MinRecurrentOptions;

/// The base of MinGRU and MinLSTM: checks, layout and the recurrence; each kind says how the
/// input makes its coefficients.
class MinRecurrent : public Module {
public:
    /// input [T, B, I] ([B, T, I] with batch_first); h0 [1, B, H], the state before the first
    /// step (positive in log space; it is the state itself, not passed through g), or undefined
    /// for zeros; lengths: int64 [B] in [1, T], or undefined when every sequence is T long.
    /// Returns every step's state as output [T, B, H] ([B, T, H] with batch_first; zeros past a
    /// sequence's length, as the recurrent layers) and each sequence's last state as
    /// state {h_n [1, B, H]}. Past its length a sequence's coefficients become a = 1, b = 0, so
    /// the recurrence carries its state unchanged to the end.
    RecurrentOutput forward(const Tensor& input, const Tensor& h0 = {}, const Tensor& lengths = {});
    /// forward().
    RecurrentOutput operator()(const Tensor& input, const Tensor& h0 = {}, const Tensor& lengths = {})
    {
        return forward(input, h0, lengths);
    }
    /// One step, for generation: x [B, I] and the state h [B, H] to the next state [B, H];
    /// forward()'s numbers, step by step.
    Tensor step(const Tensor& x, const Tensor& h);
    /// The options it was built with.
    MinRecurrentOptions options;

protected:
    /// Keeps the options.
    explicit MinRecurrent(MinRecurrentOptions options_) : options(std::move(options_)) {}
    /// The coefficients of h_t = a_t h_{t-1} + b_t for input x [..., I]: {a, b}, or in log space
    /// {log a, log b}.
    virtual std::pair<Tensor, Tensor> coefficients(const Tensor& x) const = 0;
    /// h' = a h + b for one step, from the input x [B, I] (not in log space: step() runs it).
    virtual Tensor next_state(const Tensor& x, const Tensor& h) const = 0;
    /// The candidate state: linear_h's output through g in log space, as is otherwise.
    Tensor candidate(const Tensor& pre) const;
};

/// minGRU: z_t = sigmoid(linear_z(x_t)), h~_t = g(linear_h(x_t)) (log space; linear_h(x_t) in the
/// plain form), h_t = (1 - z_t) h_{t-1} + z_t h~_t. Parameters as Feng et al.'s code:
/// linear_z.weight [H, I], linear_z.bias [H], linear_h.weight, linear_h.bias.
class MinGRU : public MinRecurrent {
public:
    /// A layer with `options`, initialised as PyTorch's nn.Linear.
    explicit MinGRU(MinRecurrentOptions options);
    std::string type_name() const override;
    std::shared_ptr<Dense> linear_z;  ///< the update gate's map
    std::shared_ptr<Dense> linear_h;  ///< the candidate state's map

protected:
    std::pair<Tensor, Tensor> coefficients(const Tensor& x) const override;
    Tensor next_state(const Tensor& x, const Tensor& h) const override;
};

/// minLSTM: f_t = sigmoid(linear_f(x_t)), i_t = sigmoid(linear_i(x_t)), normalised to
/// f'_t = f_t / (f_t + i_t) and i'_t = i_t / (f_t + i_t); h~_t = g(linear_h(x_t)) (log space;
/// linear_h(x_t) in the plain form); h_t = f'_t h_{t-1} + i'_t h~_t. Parameters as Feng et al.'s
/// code: linear_f, linear_i and linear_h, each .weight [H, I] and .bias [H].
class MinLSTM : public MinRecurrent {
public:
    /// A layer with `options`, initialised as PyTorch's nn.Linear.
    explicit MinLSTM(MinRecurrentOptions options);
    std::string type_name() const override;
    std::shared_ptr<Dense> linear_f;  ///< the forget gate's map
    std::shared_ptr<Dense> linear_i;  ///< the input gate's map
    std::shared_ptr<Dense> linear_h;  ///< the candidate state's map

protected:
    std::pair<Tensor, Tensor> coefficients(const Tensor& x) const override;
    Tensor next_state(const Tensor& x, const Tensor& h) const override;
};

/// A depthwise causal convolution over time, as Mamba's conv1d (PyTorch's nn.Conv1d with
/// groups = channels and padding = kernel - 1, its output cut to the input's length): channel c
/// of step t is bias[c] + sum_k weight[c, 0, k] x[t - (kernel - 1) + k, c], reading zeros (or
/// the given earlier inputs) before the first step.
class CausalConv1d : public Module {
public:
    /// `channels` channels, `kernel` steps wide, with PyTorch's initialisation.
    CausalConv1d(std::int64_t channels, std::int64_t kernel, bool bias = true, DType dtype = kFloat32);
    /// x [T, B, C]; before: the kernel - 1 inputs before the first step [kernel - 1, B, C], or
    /// undefined for zeros. Returns [T, B, C].
    Tensor forward(const Tensor& x, const Tensor& before = {}) const;
    std::string type_name() const override;
    Tensor weight;  ///< [channels, 1, kernel], PyTorch's layout
    Tensor bias;    ///< [channels]; undefined without bias
    std::int64_t channels;  ///< channels, convolved each on its own
    std::int64_t kernel;    ///< steps read per output step
};

/// The options of SelectiveSSM, named as Mamba's reference module.
class SelectiveSSMOptions {
public:
    /// A block over `d_model` features.
    explicit SelectiveSSMOptions(std::int64_t d_model) : d_model_(d_model) {}
    /// Features in and out.
    LOOM_OPTION(std::int64_t, d_model, 0)
    /// N: the state's size per channel.
    LOOM_OPTION(std::int64_t, d_state, 16)
    /// The causal convolution's width.
    LOOM_OPTION(std::int64_t, d_conv, 4)
    /// E = expand x d_model channels inside the block.
    LOOM_OPTION(std::int64_t, expand, 2)
    /// The rank of the step size's projection; 0: ceil(d_model / 16), as Mamba.
    LOOM_OPTION(std::int64_t, dt_rank, 0)
    /// Biases on in_proj and out_proj (Mamba: none).
    LOOM_OPTION(bool, bias, false)
    /// A bias on the convolution (Mamba: yes).
    LOOM_OPTION(bool, conv_bias, true)
    /// The parameters' dtype.
    LOOM_OPTION(DType, dtype, kFloat32)
};

/// A selective state-space block's state between calls: what step() carries, and what forward()
/// starts from and ends with.
struct SelectiveSSMState {
    Tensor conv;  ///< the convolution's last d_conv - 1 inputs [d_conv - 1, B, E]
    Tensor ssm;   ///< the state-space state h [B, E, N]
};

/// What SelectiveSSM::forward returns.
struct SelectiveSSMOutput {
    Tensor output;            ///< [T, B, d_model]
    SelectiveSSMState state;  ///< after the last step
};

/// Mamba's block (Gu & Dao 2023, its reference module mamba_simple.Mamba), time-major: x and a
/// gate z from in_proj; x through the causal convolution and SiLU, giving u [T, B, E]; from u,
/// x_proj makes the step sizes' low-rank input, B_t and C_t [T, B, N]; delta = softplus(dt_proj(.))
/// [T, B, E]; A = -exp(A_log) [E, N]; then, per channel e and state n,
///     h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t   (one linear_recurrence over [T, B, E, N])
///     y_t = C_t . h_t + D u_t,   out = out_proj(y_t * SiLU(z_t)).
/// A is discretised by zero-order hold and B by delta_t B_t, as the reference code does.
/// Parameters as Mamba's: in_proj.weight [2E, d_model], conv1d.weight [E, 1, d_conv],
/// conv1d.bias, x_proj.weight [dt_rank + 2N, E], dt_proj.weight [E, dt_rank], dt_proj.bias,
/// A_log [E, N], D [E], out_proj.weight [d_model, E]; initialised as Mamba's (A_log = log 1..N,
/// D = 1, dt_proj.bias the inverse softplus of steps drawn log-uniformly in [0.001, 0.1]).
/// The [T, B, E, N] arrays of the recurrence are held for backward: memory grows with N.
class SelectiveSSM : public Module {
public:
    /// A block with `options`.
    explicit SelectiveSSM(SelectiveSSMOptions options);
    /// input [T, B, d_model], from `initial` (undefined tensors: zeros). Returns every step's
    /// output and the state after the last step. lengths: int64 [B] in [1, T], or undefined
    /// when every sequence is T long; past a sequence's end its outputs are zeros and its state
    /// (both parts) is the one after its last step, as if it had been run alone.
    SelectiveSSMOutput forward(const Tensor& input, const SelectiveSSMState& initial = {}, const Tensor& lengths = {});
    /// forward().
    SelectiveSSMOutput operator()(const Tensor& input, const SelectiveSSMState& initial = {}, const Tensor& lengths = {})
    {
        return forward(input, initial, lengths);
    }
    /// One step for generation: x [B, d_model] and the state (undefined tensors: zeros) to the
    /// output [B, d_model] and the next state; forward()'s numbers, step by step.
    SelectiveSSMOutput step(const Tensor& x, const SelectiveSSMState& state);
    std::string type_name() const override;
    std::shared_ptr<Dense> in_proj;          ///< d_model -> 2E: the block's input and its gate
    std::shared_ptr<CausalConv1d> conv1d;    ///< over time, per channel
    std::shared_ptr<Dense> x_proj;           ///< E -> dt_rank + 2N: the step sizes' input, B and C
    std::shared_ptr<Dense> dt_proj;          ///< dt_rank -> E: the step sizes (before softplus)
    Tensor A_log;                            ///< [E, N]: A = -exp(A_log)
    Tensor D;                                ///< [E]: the skip connection's weights
    std::shared_ptr<Dense> out_proj;         ///< E -> d_model
    SelectiveSSMOptions options;             ///< as built (dt_rank resolved)
    std::int64_t inner;                      ///< E

private:
    // From u [T, B, E] (after the convolution and SiLU) and the gate z [T, B, E]: the output and
    // the last ssm state, from h0 [B, E, N] (undefined: zeros); running: bool [T, B, 1], whether
    // step t is within sequence b (undefined: all are).
    std::pair<Tensor, Tensor> selective_scan(const Tensor& u, const Tensor& z, const Tensor& h0,
                                             const Tensor& running) const;
    void check_state(const char* op, const SelectiveSSMState& state, std::int64_t B) const;
};

/// Feng et al.'s g: v + 1/2 for v >= 0, sigmoid(v) below; positive, continuous, and linear for
/// large v.
Tensor min_rnn_g(const Tensor& v);
/// log(g(v)), computed without forming g(v) where it is tiny.
Tensor min_rnn_log_g(const Tensor& v);

}  // namespace loom::nn
