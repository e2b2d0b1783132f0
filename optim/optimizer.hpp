// Optimizers with PyTorch's update rules, parameter groups, and state for checkpoints.
#pragma once
#include <map>
#include <string>
#include <vector>

#include "../core/options.hpp"
#include "../nn/safetensors.hpp"

namespace loom::optim {

class SGDOptions {
    LOOM_OPTION(double, lr, 0.01)
    LOOM_OPTION(double, momentum, 0.0)
    LOOM_OPTION(double, dampening, 0.0)
    LOOM_OPTION(bool, nesterov, false)
    LOOM_OPTION(double, weight_decay, 0.0)
public:
    SGDOptions() = default;
    explicit SGDOptions(double lr) : lr_(lr) {}
};

class AdamOptions {
    LOOM_OPTION(double, lr, 1e-3)
    LOOM_OPTION(double, beta1, 0.9)
    LOOM_OPTION(double, beta2, 0.999)
    LOOM_OPTION(double, eps, 1e-8)
    LOOM_OPTION(double, weight_decay, 0.0)  // Adam: added to the gradient; AdamW: decoupled
    LOOM_OPTION(bool, amsgrad, false)
public:
    AdamOptions() = default;
    explicit AdamOptions(double lr) : lr_(lr) {}
    AdamOptions& betas(double b1, double b2) { return beta1(b1).beta2(b2); }
};

class RMSpropOptions {
    LOOM_OPTION(double, lr, 0.01)
    LOOM_OPTION(double, alpha, 0.99)
    LOOM_OPTION(double, eps, 1e-8)
    LOOM_OPTION(double, weight_decay, 0.0)
    LOOM_OPTION(double, momentum, 0.0)
    LOOM_OPTION(bool, centered, false)
public:
    RMSpropOptions() = default;
    explicit RMSpropOptions(double lr) : lr_(lr) {}
};

class AdagradOptions {
    LOOM_OPTION(double, lr, 0.01)
    LOOM_OPTION(double, lr_decay, 0.0)
    LOOM_OPTION(double, weight_decay, 0.0)
    LOOM_OPTION(double, initial_accumulator_value, 0.0)
    LOOM_OPTION(double, eps, 1e-10)
public:
    AdagradOptions() = default;
    explicit AdagradOptions(double lr) : lr_(lr) {}
};

// Throw loom::Error for options PyTorch rejects: negative or non-finite rates, betas outside [0, 1), ...
void validate_options(const SGDOptions& o);
void validate_options(const AdamOptions& o);
void validate_options(const RMSpropOptions& o);
void validate_options(const AdagradOptions& o);

template <class Options> struct ParamGroup {
    std::vector<Tensor> params;
    Options options;
};

class Optimizer {
public:
    virtual ~Optimizer() = default;
    Optimizer(const Optimizer&) = delete;
    Optimizer& operator=(const Optimizer&) = delete;

    // One update of every parameter that has a gradient (others are skipped, as in PyTorch).
    virtual void step() = 0;
    void zero_grad();
    virtual std::string name() const = 0;
    // The kinds of per-parameter state this optimizer keeps ("exp_avg", ...).
    virtual std::vector<std::string> state_keys() const = 0;

    std::size_t num_groups() const { return lrs_.size(); }
    double lr(std::size_t group = 0) const { return lrs_.at(group); }
    void set_lr(double lr, std::size_t group);
    void set_lr(double lr);  // every group
    const std::vector<Tensor>& parameters() const { return params_; }

    // Moments, step counts and learning rates, as tensors: "state.<i>.<name>", "step.<i>", "lr.<g>".
    NamedTensorMap state_dict() const;
    // Checks the state against these parameters (count, shapes, kinds of state) before taking any.
    void load_state_dict(const NamedTensorMap& state);

protected:
    Optimizer() = default;
    // Registers groups: every parameter once, a leaf that requires grad, in float32 or float64.
    void add_group(const std::vector<Tensor>& params, double lr);
    // The per-parameter state tensor `key`, created as zeros (or `init`) the first time.
    Tensor& state(std::size_t param, const std::string& key, double init = 0);
    bool has_state(std::size_t param, const std::string& key) const;
    std::int64_t& step_count(std::size_t param) { return steps_[param]; }
    std::size_t group_of(std::size_t param) const { return group_of_[param]; }

private:
    std::vector<Tensor> params_;
    std::vector<std::size_t> group_of_;
    std::vector<double> lrs_;
    std::vector<std::map<std::string, Tensor>> state_;
    std::vector<std::int64_t> steps_;
};

// Each optimizer keeps its options per group; the learning rate lives in the base, where
// schedules change it.
template <class Options> class OptimizerWith : public Optimizer {
public:
    explicit OptimizerWith(std::vector<ParamGroup<Options>> groups)
    {
        for (auto& g : groups) {
            validate_options(g.options);
            add_group(g.params, g.options.lr());
            options_.push_back(g.options);
        }
    }
    const Options& options(std::size_t group = 0) const { return options_.at(group); }

protected:
    std::vector<Options> options_;
};

class SGD : public OptimizerWith<SGDOptions> {
public:
    SGD(std::vector<Tensor> params, SGDOptions options) : SGD(std::vector<ParamGroup<SGDOptions>>{{params, options}}) {}
    explicit SGD(std::vector<ParamGroup<SGDOptions>> groups);
    void step() override;
    std::string name() const override { return "SGD"; }
    std::vector<std::string> state_keys() const override { return {"momentum_buffer"}; }
};

// Adam (Kingma & Ba); AdamW (Loshchilov & Hutter) decouples weight decay from the gradient.
class Adam : public OptimizerWith<AdamOptions> {
public:
    Adam(std::vector<Tensor> params, AdamOptions options = {})
        : Adam(std::vector<ParamGroup<AdamOptions>>{{params, options}}) {}
    explicit Adam(std::vector<ParamGroup<AdamOptions>> groups, bool decoupled = false);
    void step() override;
    std::string name() const override { return decoupled_ ? "AdamW" : "Adam"; }
    std::vector<std::string> state_keys() const override { return {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}; }
    bool decoupled_;
};

class AdamW : public Adam {
public:
    AdamW(std::vector<Tensor> params, AdamOptions options = AdamOptions().weight_decay(1e-2))
        : Adam(std::vector<ParamGroup<AdamOptions>>{{params, options}}, true) {}
    explicit AdamW(std::vector<ParamGroup<AdamOptions>> groups) : Adam(std::move(groups), true) {}
};

class RMSprop : public OptimizerWith<RMSpropOptions> {
public:
    RMSprop(std::vector<Tensor> params, RMSpropOptions options = {})
        : RMSprop(std::vector<ParamGroup<RMSpropOptions>>{{params, options}}) {}
    explicit RMSprop(std::vector<ParamGroup<RMSpropOptions>> groups);
    void step() override;
    std::string name() const override { return "RMSprop"; }
    std::vector<std::string> state_keys() const override { return {"square_avg", "momentum_buffer", "grad_avg"}; }
};

class Adagrad : public OptimizerWith<AdagradOptions> {
public:
    Adagrad(std::vector<Tensor> params, AdagradOptions options = {})
        : Adagrad(std::vector<ParamGroup<AdagradOptions>>{{params, options}}) {}
    explicit Adagrad(std::vector<ParamGroup<AdagradOptions>> groups);
    void step() override;
    std::string name() const override { return "Adagrad"; }
    std::vector<std::string> state_keys() const override { return {"sum"}; }
};

}  // namespace loom::optim
