// Update rules follow PyTorch's single-tensor implementations (torch/optim/*.py) step for step,
// first-step and bias-correction details included; the conformance test holds them to 1e-12.
#include "optimizer.hpp"

#include <cmath>
#include <set>

#include "../autograd/ops.hpp"
#include "../autograd/tape.hpp"

namespace loom::optim {

namespace {

void check_finite(std::string_view op, const char* what, double v, double low)
{
    LOOM_CHECK(std::isfinite(v) && v >= low, op, "invalid {}: {} (expected a finite value >= {})", what, v, low);
}

void check_beta(std::string_view op, const char* what, double v)
{
    LOOM_CHECK(std::isfinite(v) && v >= 0 && v < 1, op, "invalid {}: {} (expected a value in [0, 1))", what, v);
}

// g + weight_decay * p, PyTorch's L2 penalty added to the gradient.
Tensor with_decay(const Tensor& g, const Tensor& p, double weight_decay)
{
    return weight_decay != 0 ? g + p * weight_decay : g;
}

}  // namespace

void validate_options(const SGDOptions& o)
{
    check_finite("SGD", "learning rate", o.lr(), 0);
    check_finite("SGD", "momentum", o.momentum(), 0);
    check_finite("SGD", "dampening", o.dampening(), -INFINITY);
    check_finite("SGD", "weight_decay", o.weight_decay(), 0);
    LOOM_CHECK(!o.nesterov() || (o.momentum() > 0 && o.dampening() == 0), "SGD",
               "nesterov momentum requires a momentum > 0 and zero dampening (got momentum {}, dampening {})",
               o.momentum(), o.dampening());
}

void validate_options(const AdamOptions& o)
{
    check_finite("Adam", "learning rate", o.lr(), 0);
    check_finite("Adam", "eps", o.eps(), 0);
    check_beta("Adam", "beta1", o.beta1());
    check_beta("Adam", "beta2", o.beta2());
    check_finite("Adam", "weight_decay", o.weight_decay(), 0);
}

void validate_options(const RMSpropOptions& o)
{
    check_finite("RMSprop", "learning rate", o.lr(), 0);
    check_finite("RMSprop", "eps", o.eps(), 0);
    check_finite("RMSprop", "alpha", o.alpha(), 0);
    check_finite("RMSprop", "momentum", o.momentum(), 0);
    check_finite("RMSprop", "weight_decay", o.weight_decay(), 0);
}

void validate_options(const AdagradOptions& o)
{
    check_finite("Adagrad", "learning rate", o.lr(), 0);
    check_finite("Adagrad", "lr_decay", o.lr_decay(), 0);
    check_finite("Adagrad", "eps", o.eps(), 0);
    check_finite("Adagrad", "weight_decay", o.weight_decay(), 0);
    check_finite("Adagrad", "initial_accumulator_value", o.initial_accumulator_value(), 0);
}

// ---- the base ----

void Optimizer::add_group(const std::vector<Tensor>& params, double lr)
{
    LOOM_CHECK(!params.empty(), "optimizer", "a parameter group has no parameters");
    for (const Tensor& p : params) {
        LOOM_CHECK(p.defined() && p.requires_grad() && p.is_leaf(), "optimizer",
                   "can only optimize leaf tensors that require grad (parameter {} of shape {})", params_.size(),
                   p.defined() ? p.sizes() : Shape{});
        for (std::size_t i = 0; i < params_.size(); ++i)
            LOOM_CHECK(!params_[i].is_same(p), "optimizer",
                       "a parameter of shape {} appears twice (as parameters {} and {})", p.sizes(), i, params_.size());
        params_.push_back(p);
        group_of_.push_back(lrs_.size());
        state_.emplace_back();
        steps_.push_back(0);
    }
    lrs_.push_back(lr);
}

void Optimizer::zero_grad()
{
    for (auto& p : params_) p.zero_grad();
}

void Optimizer::set_lr(double lr, std::size_t group)
{
    check_finite(name(), "learning rate", lr, 0);
    lrs_.at(group) = lr;
}

void Optimizer::set_lr(double lr)
{
    for (std::size_t g = 0; g < lrs_.size(); ++g) set_lr(lr, g);
}

Tensor& Optimizer::state(std::size_t param, const std::string& key, double init)
{
    auto& slot = state_[param];
    auto it = slot.find(key);
    if (it == slot.end()) it = slot.emplace(key, full_like(params_[param].detach(), init)).first;
    return it->second;
}

bool Optimizer::has_state(std::size_t param, const std::string& key) const { return state_[param].count(key) > 0; }

NamedTensorMap Optimizer::state_dict() const
{
    NamedTensorMap out;
    out["num_params"] = scalar_tensor(double(params_.size()), kInt64);
    for (std::size_t g = 0; g < lrs_.size(); ++g) out[fmt::format("lr.{}", g)] = scalar_tensor(lrs_[g], kFloat64);
    for (std::size_t i = 0; i < params_.size(); ++i) {
        out[fmt::format("step.{}", i)] = scalar_tensor(double(steps_[i]), kInt64);
        for (const auto& [key, t] : state_[i]) out[fmt::format("state.{}.{}", i, key)] = t;
    }
    return out;
}

void Optimizer::load_state_dict(const NamedTensorMap& state)
{
    const auto get = [&](const std::string& key) -> const Tensor& {
        const auto it = state.find(key);
        LOOM_CHECK(it != state.end(), name(), "the optimizer state has no \"{}\"", key);
        return it->second;
    };
    const auto count = get("num_params").item<std::int64_t>();
    LOOM_CHECK(count == static_cast<std::int64_t>(params_.size()), name(),
               "the optimizer state is for {} parameters, this optimizer has {}", count, params_.size());
    const std::vector<std::string> keys = state_keys();
    std::vector<std::map<std::string, Tensor>> new_state(params_.size());
    for (const auto& [key, t] : state) {
        if (key.rfind("state.", 0) != 0) continue;
        const auto dot = key.find('.', 6);
        LOOM_CHECK(dot != std::string::npos, name(), "malformed optimizer state key \"{}\"", key);
        const std::size_t i = std::stoul(key.substr(6, dot - 6));
        const std::string kind = key.substr(dot + 1);
        LOOM_CHECK(i < params_.size(), name(), "state \"{}\" names parameter {} of {}", key, i, params_.size());
        LOOM_CHECK(std::find(keys.begin(), keys.end(), kind) != keys.end(), name(),
                   "{} keeps no \"{}\" state (was this state saved by another optimizer?)", name(), kind);
        LOOM_CHECK(t.sizes() == params_[i].sizes(), name(), "state \"{}\" has shape {}, parameter {} has shape {}", key,
                   t.sizes(), i, params_[i].sizes());
        new_state[i][kind] = t.to(params_[i].dtype()).clone();
    }
    std::vector<double> lrs;
    for (std::size_t g = 0; g < lrs_.size(); ++g) lrs.push_back(get(fmt::format("lr.{}", g)).item<double>());
    std::vector<std::int64_t> steps;
    for (std::size_t i = 0; i < params_.size(); ++i) steps.push_back(get(fmt::format("step.{}", i)).item<std::int64_t>());
    state_ = std::move(new_state);
    lrs_ = std::move(lrs);
    steps_ = std::move(steps);
}

// ---- the rules ----

SGD::SGD(std::vector<ParamGroup<SGDOptions>> groups) : OptimizerWith(std::move(groups)) {}

void SGD::step()
{
    NoGradGuard no_grad;
    for (std::size_t i = 0; i < parameters().size(); ++i) {
        Tensor p = parameters()[i];
        if (!p.grad().defined()) continue;
        const SGDOptions& o = options_[group_of(i)];
        Tensor d_p = with_decay(p.grad(), p, o.weight_decay());
        if (o.momentum() != 0) {
            const bool first = !has_state(i, "momentum_buffer");
            Tensor& buf = state(i, "momentum_buffer");
            if (first) buf.copy_(d_p);
            else buf.mul_(o.momentum()).add_(d_p, 1 - o.dampening());
            d_p = o.nesterov() ? d_p + buf * o.momentum() : buf;
        }
        p.add_(d_p, -lr(group_of(i)));
    }
}

Adam::Adam(std::vector<ParamGroup<AdamOptions>> groups, bool decoupled)
    : OptimizerWith(std::move(groups)), decoupled_(decoupled)
{
}

void Adam::step()
{
    NoGradGuard no_grad;
    for (std::size_t i = 0; i < parameters().size(); ++i) {
        Tensor p = parameters()[i];
        if (!p.grad().defined()) continue;
        const AdamOptions& o = options_[group_of(i)];
        const double lr_now = lr(group_of(i));
        Tensor g = p.grad();
        if (decoupled_) p.mul_(1 - lr_now * o.weight_decay());
        else g = with_decay(g, p, o.weight_decay());
        Tensor& m = state(i, "exp_avg");
        Tensor& v = state(i, "exp_avg_sq");
        const auto step = double(++step_count(i));
        m.mul_(o.beta1()).add_(g, 1 - o.beta1());
        v.mul_(o.beta2()).add_(g * g, 1 - o.beta2());
        const double bias_correction1 = 1 - std::pow(o.beta1(), step);
        const double bias_correction2_sqrt = std::sqrt(1 - std::pow(o.beta2(), step));
        Tensor second = v;
        if (o.amsgrad()) {
            Tensor& v_max = state(i, "max_exp_avg_sq");
            v_max.copy_(maximum(v_max, v));
            second = v_max;
        }
        const Tensor denom = sqrt(second) / bias_correction2_sqrt + o.eps();
        p.add_(m / denom, -lr_now / bias_correction1);
    }
}

RMSprop::RMSprop(std::vector<ParamGroup<RMSpropOptions>> groups) : OptimizerWith(std::move(groups)) {}

void RMSprop::step()
{
    NoGradGuard no_grad;
    for (std::size_t i = 0; i < parameters().size(); ++i) {
        Tensor p = parameters()[i];
        if (!p.grad().defined()) continue;
        const RMSpropOptions& o = options_[group_of(i)];
        const Tensor g = with_decay(p.grad(), p, o.weight_decay());
        ++step_count(i);
        Tensor& square_avg = state(i, "square_avg");
        square_avg.mul_(o.alpha()).add_(g * g, 1 - o.alpha());
        Tensor avg;
        if (o.centered()) {
            Tensor& grad_avg = state(i, "grad_avg");
            grad_avg.mul_(o.alpha()).add_(g, 1 - o.alpha());
            avg = sqrt(square_avg - grad_avg * grad_avg) + o.eps();
        } else {
            avg = sqrt(square_avg) + o.eps();
        }
        if (o.momentum() > 0) {
            Tensor& buf = state(i, "momentum_buffer");
            buf.mul_(o.momentum()).add_(g / avg);
            p.add_(buf, -lr(group_of(i)));
        } else {
            p.add_(g / avg, -lr(group_of(i)));
        }
    }
}

Adagrad::Adagrad(std::vector<ParamGroup<AdagradOptions>> groups) : OptimizerWith(std::move(groups))
{
    for (std::size_t i = 0; i < parameters().size(); ++i)
        state(i, "sum", options_[group_of(i)].initial_accumulator_value());
}

void Adagrad::step()
{
    NoGradGuard no_grad;
    for (std::size_t i = 0; i < parameters().size(); ++i) {
        Tensor p = parameters()[i];
        if (!p.grad().defined()) continue;
        const AdagradOptions& o = options_[group_of(i)];
        const auto step = double(++step_count(i));
        const Tensor g = with_decay(p.grad(), p, o.weight_decay());
        const double clr = lr(group_of(i)) / (1 + (step - 1) * o.lr_decay());
        Tensor& sum = state(i, "sum");
        sum.add_(g * g);
        p.add_(g / (sqrt(sum) + o.eps()), -clr);
    }
}

}  // namespace loom::optim
