// Update rules follow PyTorch's single-tensor implementations (torch/optim/*.py) step for step,
// first-step and bias-correction details included; the conformance test holds them to 1e-12.
#include "optimizer.hpp"

#include <charconv>
#include <cmath>
#include <set>

#include "../autograd/ops.hpp"
#include "../autograd/profiler.hpp"
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
        steps_.push_back(0);
    }
    lrs_.push_back(lr);
}

void Optimizer::zero_grad()
{
    for (auto& p : params_) p.zero_grad();
}

double Optimizer::lr(std::size_t group) const
{
    LOOM_CHECK(group < lrs_.size(), name(), "has {} parameter group(s), asked for the rate of group {}", lrs_.size(),
               group);
    return lrs_[group];
}

void Optimizer::set_lr(double lr, std::size_t group)
{
    check_finite(name(), "learning rate", lr, 0);
    LOOM_CHECK(group < lrs_.size(), name(), "has {} parameter group(s), asked to set the rate of group {}",
               lrs_.size(), group);
    lrs_[group] = lr;
}

void Optimizer::set_lr(double lr)
{
    for (std::size_t g = 0; g < lrs_.size(); ++g) set_lr(lr, g);
}

void Optimizer::step()
{
    const autograd::detail::ProfiledRegion timed(autograd::Profiler::Event::Kind::Step, "optimizer step");
    NoGradGuard no_grad;
    for (std::size_t i = 0; i < params_.size(); ++i) {
        const Tensor& p = params_[i];
        const Tensor g = p.grad();
        if (!g.defined()) continue;
        LOOM_CHECK(g.sizes() == p.sizes() && g.dtype() == p.dtype(), name(),
                   "parameter {} is {} {}, its gradient {} {}", i, p.dtype(), p.sizes(), g.dtype(), g.sizes());
        for (const auto& [kind, t] : state_tensors(i))
            LOOM_CHECK(!t.defined() || (t.sizes() == p.sizes() && t.dtype() == p.dtype()), name(),
                       "the {} state of parameter {} is {} {}, the parameter {} {} (was the model moved with to() "
                       "after the optimizer was built? build the optimizer after moving it)",
                       kind, i, t.dtype(), t.sizes(), p.dtype(), p.sizes());
    }
    const auto update_all = [&] {
        for (std::size_t i = 0; i < params_.size(); ++i) {
            const Tensor g = params_[i].grad();
            if (g.defined()) update_parameter(i, params_[i], g, ++steps_[i]);
        }
    };
    if (!update_can_throw()) return update_all();
    // A rule of one's own may throw part-way: keep what it can change, and put it back if it does.
    std::vector<Tensor> values(params_.size());
    std::vector<NamedTensorMap> states(params_.size());
    for (std::size_t i = 0; i < params_.size(); ++i) {
        if (params_[i].grad().defined()) values[i] = params_[i].clone();
        for (const auto& [kind, t] : state_tensors(i))
            if (t.defined()) states[i].emplace(kind, t.clone());
    }
    const std::vector<std::int64_t> steps = steps_;
    try {
        update_all();
    } catch (...) {
        for (std::size_t i = 0; i < params_.size(); ++i)
            if (values[i].defined()) Tensor(params_[i]).copy_(values[i]);
        set_state(states);
        steps_ = steps;
        throw;
    }
}

NamedTensorMap Optimizer::state_dict() const
{
    NamedTensorMap out;
    out["num_params"] = scalar_tensor(double(params_.size()), kInt64);
    for (std::size_t g = 0; g < lrs_.size(); ++g) out[fmt::format("lr.{}", g)] = scalar_tensor(lrs_[g], kFloat64);
    for (std::size_t i = 0; i < params_.size(); ++i) {
        out[fmt::format("step.{}", i)] = scalar_tensor(double(steps_[i]), kInt64);
        for (const auto& [kind, t] : state_tensors(i))
            if (t.defined()) out[fmt::format("state.{}.{}", i, kind)] = t;
    }
    return out;
}

namespace {

// The parameter index of "state.<i>.<kind>", or an error naming the key.
std::size_t parameter_index(const std::string& op, const std::string& key, std::string_view digits, std::size_t count)
{
    std::size_t i = 0;
    const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), i);
    LOOM_CHECK(!digits.empty() && ec == std::errc() && end == digits.data() + digits.size(), op,
               "malformed optimizer state key \"{}\" (expected state.<parameter index>.<kind>)", key);
    LOOM_CHECK(i < count, op, "state \"{}\" names parameter {}, but the optimizer has {}", key, i, count);
    return i;
}

}  // namespace

void Optimizer::load_state_dict(const NamedTensorMap& state)
{
    const std::string op = name();
    const auto scalar = [&](const std::string& key) -> const Tensor& {
        const auto it = state.find(key);
        LOOM_CHECK(it != state.end(), op, "the optimizer state has no \"{}\"", key);
        LOOM_CHECK(it->second.numel() == 1, op, "the optimizer state \"{}\" has shape {}, expected one value", key,
                   it->second.sizes());
        return it->second;
    };
    const auto count = scalar("num_params").item<std::int64_t>();
    LOOM_CHECK(count == static_cast<std::int64_t>(params_.size()), op,
               "the optimizer state is for {} parameters, this optimizer has {}", count, params_.size());
    const std::vector<std::string> keys = state_keys();
    std::vector<NamedTensorMap> new_state(params_.size());
    for (const auto& [key, t] : state) {
        if (key.rfind("state.", 0) != 0) continue;
        const auto dot = key.find('.', 6);
        LOOM_CHECK(dot != std::string::npos, op, "malformed optimizer state key \"{}\"", key);
        const std::size_t i = parameter_index(op, key, std::string_view(key).substr(6, dot - 6), params_.size());
        const std::string kind = key.substr(dot + 1);
        LOOM_CHECK(std::find(keys.begin(), keys.end(), kind) != keys.end(), op,
                   "{} keeps no \"{}\" state (was this state saved by another optimizer?)", op, kind);
        LOOM_CHECK(t.sizes() == params_[i].sizes(), op, "state \"{}\" has shape {}, parameter {} has shape {}", key,
                   t.sizes(), i, params_[i].sizes());
        LOOM_CHECK(is_floating(t.dtype()), op, "state \"{}\" has dtype {}, expected float32 or float64", key, t.dtype());
        new_state[i][kind] = t.to(params_[i].dtype()).clone();
    }
    std::vector<double> lrs;
    for (std::size_t g = 0; g < lrs_.size(); ++g) {
        const double lr = scalar(fmt::format("lr.{}", g)).item<double>();
        check_finite(op, "learning rate in the state", lr, 0);
        lrs.push_back(lr);
    }
    std::vector<std::int64_t> steps;
    for (std::size_t i = 0; i < params_.size(); ++i) {
        const auto step = scalar(fmt::format("step.{}", i)).item<std::int64_t>();
        LOOM_CHECK(step >= 0, op, "the optimizer state has step {} for parameter {}, expected >= 0", step, i);
        steps.push_back(step);
    }
    set_state(new_state);
    lrs_ = std::move(lrs);
    steps_ = std::move(steps);
}

// ---- the rules ----

void SGD::update(const Tensor& p, const Tensor& grad, SGDState& s, const SGDOptions& o, double lr, std::int64_t)
{
    Tensor d_p = with_decay(grad, p, o.weight_decay());
    if (o.momentum() != 0) {
        if (!s.momentum_buffer.defined()) s.momentum_buffer = d_p.clone();
        else s.momentum_buffer.mul_(o.momentum()).add_(d_p, 1 - o.dampening());
        d_p = o.nesterov() ? d_p + s.momentum_buffer * o.momentum() : s.momentum_buffer;
    }
    Tensor(p).add_(d_p, -lr);
}

namespace {

// The moments and the step of Adam and AdamW, once the gradient is decided.
void adam_step(const Tensor& p, const Tensor& g, AdamState& s, const AdamOptions& o, double lr, std::int64_t step)
{
    Tensor& m = state_tensor(s.exp_avg, p);
    Tensor& v = state_tensor(s.exp_avg_sq, p);
    m.mul_(o.beta1()).add_(g, 1 - o.beta1());
    v.mul_(o.beta2()).add_(g * g, 1 - o.beta2());
    const double bias_correction1 = 1 - std::pow(o.beta1(), double(step));
    const double bias_correction2_sqrt = std::sqrt(1 - std::pow(o.beta2(), double(step)));
    Tensor second = v;
    if (o.amsgrad()) {
        Tensor& v_max = state_tensor(s.max_exp_avg_sq, p);
        v_max.copy_(maximum(v_max, v));
        second = v_max;
    }
    const Tensor denom = sqrt(second) / bias_correction2_sqrt + o.eps();
    Tensor(p).add_(m / denom, -lr / bias_correction1);
}

}  // namespace

void Adam::update(const Tensor& p, const Tensor& grad, AdamState& s, const AdamOptions& o, double lr,
                  std::int64_t step)
{
    adam_step(p, with_decay(grad, p, o.weight_decay()), s, o, lr, step);
}

void AdamW::update(const Tensor& p, const Tensor& grad, AdamState& s, const AdamOptions& o, double lr,
                   std::int64_t step)
{
    Tensor(p).mul_(1 - lr * o.weight_decay());
    adam_step(p, grad, s, o, lr, step);
}

void RMSprop::update(const Tensor& p, const Tensor& grad, RMSpropState& s, const RMSpropOptions& o, double lr,
                     std::int64_t)
{
    const Tensor g = with_decay(grad, p, o.weight_decay());
    Tensor& square_avg = state_tensor(s.square_avg, p);
    square_avg.mul_(o.alpha()).add_(g * g, 1 - o.alpha());
    Tensor avg;
    if (o.centered()) {
        Tensor& grad_avg = state_tensor(s.grad_avg, p);
        grad_avg.mul_(o.alpha()).add_(g, 1 - o.alpha());
        avg = sqrt(square_avg - grad_avg * grad_avg) + o.eps();
    } else {
        avg = sqrt(square_avg) + o.eps();
    }
    if (o.momentum() > 0) {
        Tensor& buf = state_tensor(s.momentum_buffer, p);
        buf.mul_(o.momentum()).add_(g / avg);
        Tensor(p).add_(buf, -lr);
    } else {
        Tensor(p).add_(g / avg, -lr);
    }
}

Adagrad::Adagrad(const std::vector<ParamGroup<AdagradOptions>>& groups) : OptimizerWith(groups)
{
    for (std::size_t i = 0; i < parameters().size(); ++i)
        state_tensor(mutable_state(i).sum, parameters()[i], options(group_of(i)).initial_accumulator_value());
}

void Adagrad::update(const Tensor& p, const Tensor& grad, AdagradState& s, const AdagradOptions& o, double lr,
                     std::int64_t step)
{
    const Tensor g = with_decay(grad, p, o.weight_decay());
    const double clr = lr / (1 + double(step - 1) * o.lr_decay());
    Tensor& sum = state_tensor(s.sum, p);
    sum.add_(g * g);
    Tensor(p).add_(g / (sqrt(sum) + o.eps()), -clr);
}

}  // namespace loom::optim
