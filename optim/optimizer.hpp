/// \file
/// Optimizers with PyTorch's update rules, parameter groups, and state for checkpoints.
#pragma once
#include <array>
#include <map>
#include <string>
#include <vector>

#include "../core/options.hpp"
#include "../core/tensor.hpp"

namespace loom::optim {

/// SGD's options, as torch::optim::SGDOptions.
class SGDOptions {
    /// Learning rate.
    LOOM_OPTION(double, lr, 0.01)
    /// Momentum factor; 0: none.
    LOOM_OPTION(double, momentum, 0.0)
    /// Dampening of the momentum.
    LOOM_OPTION(double, dampening, 0.0)
    /// Nesterov momentum.
    LOOM_OPTION(bool, nesterov, false)
    /// L2 penalty added to the gradient.
    LOOM_OPTION(double, weight_decay, 0.0)
public:
    SGDOptions() = default;
    /// Options with learning rate `lr`.
    explicit SGDOptions(double lr) : lr_(lr) {}
};

/// Adam's and AdamW's options, as torch::optim::AdamOptions.
class AdamOptions {
    /// Learning rate.
    LOOM_OPTION(double, lr, 1e-3)
    /// Decay of the running average of the gradient.
    LOOM_OPTION(double, beta1, 0.9)
    /// Decay of the running average of its square.
    LOOM_OPTION(double, beta2, 0.999)
    /// Added to the denominator for stability.
    LOOM_OPTION(double, eps, 1e-8)
    LOOM_OPTION(double, weight_decay, 0.0)  ///< Adam: added to the gradient; AdamW: decoupled
    /// Use the largest running average of the squared gradient so far (AMSGrad).
    LOOM_OPTION(bool, amsgrad, false)
public:
    AdamOptions() = default;
    /// Options with learning rate `lr`.
    explicit AdamOptions(double lr) : lr_(lr) {}
    /// Sets both betas.
    AdamOptions& betas(double b1, double b2) { return beta1(b1).beta2(b2); }
};

/// RMSprop's options, as torch::optim::RMSpropOptions.
class RMSpropOptions {
    /// Learning rate.
    LOOM_OPTION(double, lr, 0.01)
    /// Decay of the running average of the squared gradient.
    LOOM_OPTION(double, alpha, 0.99)
    /// Added to the denominator for stability.
    LOOM_OPTION(double, eps, 1e-8)
    /// L2 penalty added to the gradient.
    LOOM_OPTION(double, weight_decay, 0.0)
    /// Momentum factor; 0: none.
    LOOM_OPTION(double, momentum, 0.0)
    /// Normalise by the variance instead of the second moment.
    LOOM_OPTION(bool, centered, false)
public:
    RMSpropOptions() = default;
    /// Options with learning rate `lr`.
    explicit RMSpropOptions(double lr) : lr_(lr) {}
};

/// Adagrad's options, as torch::optim::AdagradOptions.
class AdagradOptions {
    /// Learning rate.
    LOOM_OPTION(double, lr, 0.01)
    /// Learning-rate decay per step.
    LOOM_OPTION(double, lr_decay, 0.0)
    /// L2 penalty added to the gradient.
    LOOM_OPTION(double, weight_decay, 0.0)
    /// Starting value of the sum of squared gradients.
    LOOM_OPTION(double, initial_accumulator_value, 0.0)
    /// Added to the denominator for stability.
    LOOM_OPTION(double, eps, 1e-10)
public:
    AdagradOptions() = default;
    /// Options with learning rate `lr`.
    explicit AdagradOptions(double lr) : lr_(lr) {}
};

/// Throw loom::Error for options PyTorch rejects: negative or non-finite rates, betas outside [0, 1), ...
void validate_options(const SGDOptions& o);
/// Throws loom::Error naming the first out-of-range option.
void validate_options(const AdamOptions& o);
/// Throws loom::Error naming the first out-of-range option.
void validate_options(const RMSpropOptions& o);
/// Throws loom::Error naming the first out-of-range option.
void validate_options(const AdagradOptions& o);

/// Parameters that share options, as PyTorch's param groups.
template <class Options> struct ParamGroup {
    /// The group's parameters.
    std::vector<Tensor> params;
    /// Their options.
    Options options;
};

/// The base owns the loop: step() checks every gradient and every state tensor first, then
/// calls update_parameter() for each parameter that has a gradient (others are skipped, as in
/// PyTorch). A step that throws has changed nothing: the built-in rules cannot fail once the
/// checks pass, and around a rule of one's own, which may, step() keeps the parameters, their
/// state and their step counts and puts them back if it throws.
class Optimizer {
public:
    virtual ~Optimizer() = default;
    Optimizer(const Optimizer&) = delete;
    Optimizer& operator=(const Optimizer&) = delete;

    /// Updates every parameter from its gradient (parameters without one are skipped).
    void step();
    /// Forgets every parameter's gradient (PyTorch's set_to_none=True).
    void zero_grad();
    /// The algorithm's name ("Adam").
    virtual std::string name() const = 0;
    /// The kinds of per-parameter state this optimizer keeps ("exp_avg", ...).
    virtual std::vector<std::string> state_keys() const = 0;

    /// Number of parameter groups.
    std::size_t num_groups() const { return lrs_.size(); }
    /// Learning rate of `group`.
    double lr(std::size_t group = 0) const;
    /// Sets the learning rate of `group` (schedules use it).
    void set_lr(double lr, std::size_t group);
    void set_lr(double lr);  ///< every group
    /// Every parameter, in order.
    const std::vector<Tensor>& parameters() const { return params_; }
    /// How many updates parameter `param` has had.
    std::int64_t step_count(std::size_t param) const { return steps_.at(param); }

    /// Moments, step counts and learning rates, as tensors: "state.<i>.<name>", "step.<i>", "lr.<g>".
    NamedTensorMap state_dict() const;
    /// Checks the whole state against these parameters (count, shapes, kinds of state) before
    /// taking any of it: a state that does not fit changes nothing.
    void load_state_dict(const NamedTensorMap& state);

protected:
    Optimizer() = default;
    /// Registers groups: every parameter once, a leaf that requires grad, in float32 or float64.
    void add_group(const std::vector<Tensor>& params, double lr);
    /// The group parameter `param` belongs to.
    std::size_t group_of(std::size_t param) const { return group_of_[param]; }

    /// Whether update_parameter may throw after the checks (a rule of one's own): step() then
    /// keeps what it could change, to put back. The built-in rules say false.
    virtual bool update_can_throw() const { return true; }
    /// One parameter's update; `step` counts its updates, this one included. Called only after
    /// every check has passed.
    virtual void update_parameter(std::size_t param, const Tensor& p, const Tensor& grad, std::int64_t step) = 0;
    /// The state tensors of one parameter by kind; undefined where not created yet.
    virtual std::vector<std::pair<std::string, Tensor>> state_tensors(std::size_t param) const = 0;
    /// Replaces every parameter's state with checked tensors, keyed by kind.
    virtual void set_state(const std::vector<NamedTensorMap>& state) = 0;

private:
    std::vector<Tensor> params_;
    std::vector<std::size_t> group_of_;
    std::vector<double> lrs_;
    std::vector<std::int64_t> steps_;
};

/// One named state tensor of an optimizer's per-parameter state struct.
template <class State> struct StateField {
    /// Its key in state_dict().
    const char* name;
    /// The member holding it.
    Tensor State::*member;
};

/// The state tensor `slot`, created as `init` in p's shape and dtype the first time.
inline Tensor& state_tensor(Tensor& slot, const Tensor& p, double init = 0)
{
    if (!slot.defined()) slot = full_like(p, init);
    return slot;
}

/// An optimizer with options per group and a typed state per parameter. State lists its tensors
/// once, in State::fields(); the update rule, the checks and the checkpoint all go through it.
template <class Options, class State> class OptimizerWith : public Optimizer {
public:
    /// The options of `group`.
    const Options& options(std::size_t group = 0) const { return options_.at(group); }
    /// The state of parameter `param`.
    const State& state(std::size_t param) const { return state_.at(param); }
    /// The names of the state's fields.
    std::vector<std::string> state_keys() const override
    {
        std::vector<std::string> keys;
        for (const auto& f : State::fields()) keys.emplace_back(f.name);
        return keys;
    }

protected:
    /// One group per entry of `groups`.
    explicit OptimizerWith(const std::vector<ParamGroup<Options>>& groups)
    {
        LOOM_CHECK(!groups.empty(), "optimizer", "expects at least one parameter group, got none");
        const auto fields = State::fields();
        for (std::size_t i = 0; i < fields.size(); ++i)
            for (std::size_t j = 0; j < i; ++j)
                LOOM_CHECK(std::string_view(fields[i].name) != fields[j].name, "optimizer",
                           "the state's fields() name \"{}\" twice; each state tensor needs a name of its own, which "
                           "keys it in state_dict()",
                           fields[i].name);
        for (const auto& g : groups) {
            validate_options(g.options);
            add_group(g.params, g.options.lr());
            options_.push_back(g.options);
        }
        state_.resize(parameters().size());
    }
    /// The rule: one parameter with its state, its group's options and learning rate.
    virtual void update(const Tensor& p, const Tensor& grad, State& state, const Options& o, double lr,
                        std::int64_t step) = 0;
    /// The state of parameter `param`, to update.
    State& mutable_state(std::size_t param) { return state_[param]; }

private:
    void update_parameter(std::size_t i, const Tensor& p, const Tensor& grad, std::int64_t step) final
    {
        update(p, grad, state_[i], options_[group_of(i)], lr(group_of(i)), step);
    }
    std::vector<std::pair<std::string, Tensor>> state_tensors(std::size_t i) const final
    {
        std::vector<std::pair<std::string, Tensor>> out;
        for (const auto& f : State::fields()) out.emplace_back(f.name, state_[i].*f.member);
        return out;
    }
    void set_state(const std::vector<NamedTensorMap>& state) final
    {
        std::vector<State> next(state.size());
        for (std::size_t i = 0; i < state.size(); ++i)
            for (const auto& f : State::fields()) {
                const auto it = state[i].find(f.name);
                if (it != state[i].end()) next[i].*f.member = it->second;
            }
        state_ = std::move(next);
    }
    std::vector<Options> options_;
    std::vector<State> state_;
};

/// SGD's state per parameter.
struct SGDState {
    /// With momentum: the velocity.
    Tensor momentum_buffer;
    /// The fields, for state_dict().
    static auto fields() { return std::array{StateField<SGDState>{"momentum_buffer", &SGDState::momentum_buffer}}; }
};

/// Stochastic gradient descent with momentum, dampening, Nesterov and weight decay, as torch::optim::SGD.
class SGD : public OptimizerWith<SGDOptions, SGDState> {
public:
    /// One group of `params`.
    SGD(std::vector<Tensor> params, SGDOptions options) : SGD(std::vector<ParamGroup<SGDOptions>>{{params, options}}) {}
    /// Several groups.
    explicit SGD(const std::vector<ParamGroup<SGDOptions>>& groups) : OptimizerWith(groups) {}
    /// "SGD".
    std::string name() const override { return "SGD"; }

private:
    void update(const Tensor& p, const Tensor& grad, SGDState& s, const SGDOptions& o, double lr,
                std::int64_t step) final;
    bool update_can_throw() const final { return false; }
};

/// Adam's state per parameter.
struct AdamState {
    /// Running averages of the gradient, of its square, and (amsgrad) the largest of the latter.
    Tensor exp_avg;         ///< running average of the gradient
    Tensor exp_avg_sq;      ///< running average of its square
    Tensor max_exp_avg_sq;  ///< with amsgrad: the largest exp_avg_sq so far
    /// The fields, for state_dict().
    static auto fields()
    {
        return std::array{StateField<AdamState>{"exp_avg", &AdamState::exp_avg},
                          StateField<AdamState>{"exp_avg_sq", &AdamState::exp_avg_sq},
                          StateField<AdamState>{"max_exp_avg_sq", &AdamState::max_exp_avg_sq}};
    }
};

/// Adam (Kingma & Ba): weight decay is added to the gradient (an L2 penalty).
class Adam : public OptimizerWith<AdamOptions, AdamState> {
public:
    /// One group of `params`.
    Adam(std::vector<Tensor> params, AdamOptions options = {})
        : Adam(std::vector<ParamGroup<AdamOptions>>{{params, options}}) {}
    /// Several groups.
    explicit Adam(const std::vector<ParamGroup<AdamOptions>>& groups) : OptimizerWith(groups) {}
    /// "Adam".
    std::string name() const override { return "Adam"; }

private:
    void update(const Tensor& p, const Tensor& grad, AdamState& s, const AdamOptions& o, double lr,
                std::int64_t step) final;
    bool update_can_throw() const final { return false; }
};

/// AdamW (Loshchilov & Hutter): weight decay is decoupled from the gradient, p *= 1 - lr * wd.
class AdamW : public OptimizerWith<AdamOptions, AdamState> {
public:
    /// One group of `params`; weight decay 1e-2 by default, as PyTorch's.
    AdamW(std::vector<Tensor> params, AdamOptions options = AdamOptions().weight_decay(1e-2))
        : AdamW(std::vector<ParamGroup<AdamOptions>>{{params, options}}) {}
    /// Several groups.
    explicit AdamW(const std::vector<ParamGroup<AdamOptions>>& groups) : OptimizerWith(groups) {}
    /// "AdamW".
    std::string name() const override { return "AdamW"; }

private:
    void update(const Tensor& p, const Tensor& grad, AdamState& s, const AdamOptions& o, double lr,
                std::int64_t step) final;
    bool update_can_throw() const final { return false; }
};

/// RMSprop's state per parameter.
struct RMSpropState {
    /// Running average of the squared gradient; the momentum buffer (momentum > 0) and the average gradient (centered).
    Tensor square_avg;       ///< running average of the squared gradient
    Tensor momentum_buffer;  ///< with momentum: the velocity
    Tensor grad_avg;         ///< when centered: running average of the gradient
    /// The fields, for state_dict().
    static auto fields()
    {
        return std::array{StateField<RMSpropState>{"square_avg", &RMSpropState::square_avg},
                          StateField<RMSpropState>{"momentum_buffer", &RMSpropState::momentum_buffer},
                          StateField<RMSpropState>{"grad_avg", &RMSpropState::grad_avg}};
    }
};

/// RMSprop, as torch::optim::RMSprop.
class RMSprop : public OptimizerWith<RMSpropOptions, RMSpropState> {
public:
    /// One group of `params`.
    RMSprop(std::vector<Tensor> params, RMSpropOptions options = {})
        : RMSprop(std::vector<ParamGroup<RMSpropOptions>>{{params, options}}) {}
    /// Several groups.
    explicit RMSprop(const std::vector<ParamGroup<RMSpropOptions>>& groups) : OptimizerWith(groups) {}
    /// "RMSprop".
    std::string name() const override { return "RMSprop"; }

private:
    void update(const Tensor& p, const Tensor& grad, RMSpropState& s, const RMSpropOptions& o, double lr,
                std::int64_t step) final;
    bool update_can_throw() const final { return false; }
};

/// Adagrad's state per parameter.
struct AdagradState {
    /// Sum of squared gradients.
    Tensor sum;
    /// The fields, for state_dict().
    static auto fields() { return std::array{StateField<AdagradState>{"sum", &AdagradState::sum}}; }
};

/// Adagrad, as torch::optim::Adagrad.
class Adagrad : public OptimizerWith<AdagradOptions, AdagradState> {
public:
    /// One group of `params`.
    Adagrad(std::vector<Tensor> params, AdagradOptions options = {})
        : Adagrad(std::vector<ParamGroup<AdagradOptions>>{{params, options}}) {}
    /// Several groups.
    explicit Adagrad(const std::vector<ParamGroup<AdagradOptions>>& groups);
    /// "Adagrad".
    std::string name() const override { return "Adagrad"; }

private:
    void update(const Tensor& p, const Tensor& grad, AdagradState& s, const AdagradOptions& o, double lr,
                std::int64_t step) final;
    bool update_can_throw() const final { return false; }
};

}  // namespace loom::optim
