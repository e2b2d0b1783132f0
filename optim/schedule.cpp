#include "schedule.hpp"

#include <cmath>
#include <numbers>

namespace loom::optim {

namespace {
const Tensor& entry(const NamedTensorMap& state, const std::string& key, const std::string& who)
{
    const auto it = state.find(key);
    LOOM_CHECK(it != state.end(), who, "the schedule state has no \"{}\"", key);
    LOOM_CHECK(it->second.numel() == 1, who, "the schedule state \"{}\" has shape {}, expected one value", key,
               it->second.sizes());
    return it->second;
}
}  // namespace

Schedule::Schedule(Optimizer& optimizer) : optimizer_(optimizer)
{
    for (std::size_t g = 0; g < optimizer.num_groups(); ++g) base_lrs_.push_back(optimizer.lr(g));
}

void Scheduler::apply()
{
    for (std::size_t g = 0; g < base_lrs_.size(); ++g) optimizer_.set_lr(next_lr(g, optimizer_.lr(g)), g);
}

void Scheduler::step()
{
    ++last_epoch_;
    apply();
}

std::vector<double> Schedule::last_lr() const
{
    std::vector<double> out;
    for (std::size_t g = 0; g < base_lrs_.size(); ++g) out.push_back(optimizer_.lr(g));
    return out;
}

NamedTensorMap Schedule::state_dict() const
{
    NamedTensorMap out;
    out["last_epoch"] = scalar_tensor(double(last_epoch_), kInt64);
    for (std::size_t g = 0; g < base_lrs_.size(); ++g) out[fmt::format("base_lr.{}", g)] = scalar_tensor(base_lrs_[g], kFloat64);
    return out;
}

void Schedule::load_state_dict(const NamedTensorMap& state)
{
    std::vector<double> bases;
    for (std::size_t g = 0; g < base_lrs_.size(); ++g)
        bases.push_back(entry(state, fmt::format("base_lr.{}", g), name()).item<double>());
    const auto last_epoch = entry(state, "last_epoch", name()).item<std::int64_t>();
    LOOM_CHECK(last_epoch >= 0, name(), "the schedule state has last_epoch {}, expected >= 0", last_epoch);
    last_epoch_ = last_epoch;
    base_lrs_ = std::move(bases);
}

void MetricScheduler::epoch_end(std::optional<double> validation_loss)
{
    LOOM_CHECK(validation_loss.has_value(), name(), "is stepped with the validation loss: give fit validation data");
    step(*validation_loss);
}

StepLR::StepLR(Optimizer& optimizer, std::int64_t step_size, double gamma)
    : Scheduler(optimizer), step_size_(step_size), gamma_(gamma)
{
    LOOM_CHECK(step_size > 0 && std::isfinite(gamma) && gamma > 0, "StepLR",
               "expects step_size > 0 and gamma > 0, got {} and {}", step_size, gamma);
    initial_step();
}

double StepLR::next_lr(std::size_t, double current) const
{
    return last_epoch_ == 0 || last_epoch_ % step_size_ != 0 ? current : current * gamma_;
}

ExponentialLR::ExponentialLR(Optimizer& optimizer, double gamma) : Scheduler(optimizer), gamma_(gamma)
{
    LOOM_CHECK(std::isfinite(gamma) && gamma > 0, "ExponentialLR", "expects gamma > 0, got {}", gamma);
    initial_step();
}

double ExponentialLR::next_lr(std::size_t, double current) const
{
    return last_epoch_ == 0 ? current : current * gamma_;
}

CosineAnnealingLR::CosineAnnealingLR(Optimizer& optimizer, std::int64_t T_max, double eta_min)
    : Scheduler(optimizer), T_max_(T_max), eta_min_(eta_min)
{
    LOOM_CHECK(T_max > 0 && std::isfinite(eta_min) && eta_min >= 0, "CosineAnnealingLR",
               "expects T_max > 0 and eta_min >= 0, got {} and {}", T_max, eta_min);
    initial_step();
}

double CosineAnnealingLR::next_lr(std::size_t group, double current) const
{
    // PyTorch's recursive form, so rounding follows it step for step.
    const double pi = std::numbers::pi, e = double(last_epoch_), T = double(T_max_), base = base_lrs_[group];
    if (last_epoch_ == 0) return current;
    if ((last_epoch_ - 1 - T_max_) % (2 * T_max_) == 0)
        return current + (base - eta_min_) * (1 - std::cos(pi / T)) / 2;
    return (1 + std::cos(pi * e / T)) / (1 + std::cos(pi * (e - 1) / T)) * (current - eta_min_) + eta_min_;
}

LinearLR::LinearLR(Optimizer& optimizer, double start_factor, double end_factor, std::int64_t total_iters)
    : Scheduler(optimizer), start_(start_factor), end_(end_factor), total_(total_iters)
{
    LOOM_CHECK(start_factor > 0 && start_factor <= 1 && end_factor >= 0 && end_factor <= 1 && total_iters > 0,
               "LinearLR", "expects 0 < start_factor <= 1, 0 <= end_factor <= 1 and total_iters > 0, got {}, {}, {}",
               start_factor, end_factor, total_iters);
    initial_step();
}

double LinearLR::next_lr(std::size_t, double current) const
{
    if (last_epoch_ == 0) return current * start_;
    if (last_epoch_ > total_) return current;
    return current * (1 + (end_ - start_) / (double(total_) * start_ + double(last_epoch_ - 1) * (end_ - start_)));
}

ReduceLROnPlateau::ReduceLROnPlateau(Optimizer& optimizer, Mode mode, double factor, std::int64_t patience,
                                     double threshold, ThresholdMode threshold_mode, std::int64_t cooldown,
                                     double min_lr, double eps)
    : MetricScheduler(optimizer), mode_(mode), factor_(factor), patience_(patience), threshold_(threshold),
      threshold_mode_(threshold_mode), cooldown_(cooldown), min_lr_(min_lr), eps_(eps),
      best_(mode == Mode::Min ? INFINITY : -INFINITY)
{
    LOOM_CHECK(factor > 0 && factor < 1, "ReduceLROnPlateau", "expects 0 < factor < 1, got {}", factor);
    LOOM_CHECK(patience >= 0 && cooldown >= 0 && min_lr >= 0 && threshold >= 0, "ReduceLROnPlateau",
               "expects non-negative patience, cooldown, min_lr and threshold, got {}, {}, {} and {}", patience,
               cooldown, min_lr, threshold);
    LOOM_CHECK(std::isfinite(min_lr) && std::isfinite(threshold), "ReduceLROnPlateau",
               "expects finite min_lr and threshold, got {} and {}", min_lr, threshold);
    LOOM_CHECK(eps >= 0 && std::isfinite(eps), "ReduceLROnPlateau",
               "expects a finite eps >= 0 (the least change of learning rate worth making), got {}", eps);
}

bool ReduceLROnPlateau::better(double a) const
{
    const bool rel = threshold_mode_ == ThresholdMode::Rel;
    if (mode_ == Mode::Min) return a < (rel ? best_ * (1 - threshold_) : best_ - threshold_);
    return a > (rel ? best_ * (1 + threshold_) : best_ + threshold_);
}

void ReduceLROnPlateau::step(double metric)
{
    ++last_epoch_;
    if (better(metric)) {
        best_ = metric;
        bad_epochs_ = 0;
    } else {
        ++bad_epochs_;
    }
    if (cooldown_counter_ > 0) {
        --cooldown_counter_;
        bad_epochs_ = 0;
    }
    if (bad_epochs_ > patience_) {
        for (std::size_t g = 0; g < base_lrs_.size(); ++g) {
            const double old_lr = optimizer_.lr(g), new_lr = std::max(old_lr * factor_, min_lr_);
            if (old_lr - new_lr > eps_) optimizer_.set_lr(new_lr, g);
        }
        cooldown_counter_ = cooldown_;
        bad_epochs_ = 0;
    }
}

NamedTensorMap ReduceLROnPlateau::state_dict() const
{
    NamedTensorMap out = Schedule::state_dict();
    out["best"] = scalar_tensor(best_, kFloat64);
    out["bad_epochs"] = scalar_tensor(double(bad_epochs_), kInt64);
    out["cooldown_counter"] = scalar_tensor(double(cooldown_counter_), kInt64);
    return out;
}

void ReduceLROnPlateau::load_state_dict(const NamedTensorMap& state)
{
    const double best = entry(state, "best", name()).item<double>();
    const auto bad = entry(state, "bad_epochs", name()).item<std::int64_t>();
    const auto cooldown = entry(state, "cooldown_counter", name()).item<std::int64_t>();
    Schedule::load_state_dict(state);
    best_ = best;
    bad_epochs_ = bad;
    cooldown_counter_ = cooldown;
}

}  // namespace loom::optim
