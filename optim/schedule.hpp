/// \file
/// Learning-rate schedules with PyTorch's semantics. Construct one after its optimizer (it takes the
/// current rates as base rates, and sets the starting rate). A Scheduler is stepped by time:
/// step() once per epoch or step, after optimizer.step(). A MetricScheduler is stepped by a
/// metric: step(validation_loss). train::fit steps either kind once per epoch.
#pragma once
#include <optional>

#include "optimizer.hpp"

namespace loom::optim {

/// What every schedule has: the optimizer whose rates it sets, a step count, and its state for
/// checkpoints.
class Schedule {
public:
    virtual ~Schedule() = default;
    /// The schedule's name ("StepLR").
    virtual std::string name() const = 0;
    /// Steps taken.
    std::int64_t last_epoch() const { return last_epoch_; }
    /// Each group's learning rate after the last step.
    std::vector<double> last_lr() const;
    /// Step count and what the schedule keeps, for checkpoints.
    virtual NamedTensorMap state_dict() const;
    /// Checks the whole state before taking any of it.
    virtual void load_state_dict(const NamedTensorMap& state);
    /// Whether epoch_end needs the validation loss.
    virtual bool needs_metric() const = 0;
    /// What train::fit calls after each epoch, with the validation loss when there is validation data.
    virtual void epoch_end(std::optional<double> validation_loss) = 0;

protected:
    /// Takes the optimizer's current rates as base rates.
    explicit Schedule(Optimizer& optimizer);
    /// The optimizer whose rates it sets.
    Optimizer& optimizer_;
    /// Each group's rate when the schedule was made.
    std::vector<double> base_lrs_;
    /// Steps taken.
    std::int64_t last_epoch_ = 0;
};

/// Stepped by time: the rate follows from the step count.
class Scheduler : public Schedule {
public:
    /// One step: advances the count and sets the rates.
    virtual void step();
    bool needs_metric() const override { return false; }
    void epoch_end(std::optional<double>) override { step(); }

protected:
    /// Takes the optimizer's current rates as base rates.
    explicit Scheduler(Optimizer& optimizer) : Schedule(optimizer) {}
    /// Sets the rates for the current step count (the constructor of a subclass calls it).
    void initial_step() { apply(); }
    /// The rate of `group` at last_epoch_, from its current rate (PyTorch's chainable form).
    virtual double next_lr(std::size_t group, double current) const = 0;
    /// Writes each group's next_lr() for the current step count into the optimizer.
    void apply();
};

/// Stepped by a metric, such as the validation loss.
class MetricScheduler : public Schedule {
public:
    /// One step, with the metric it watches.
    virtual void step(double metric) = 0;
    bool needs_metric() const override { return true; }
    /// Whether a lower metric is better (a loss); train::fit feeds it the validation loss, so
    /// it must be.
    virtual bool lower_is_better() const { return true; }
    void epoch_end(std::optional<double> validation_loss) override;

protected:
    /// Takes the optimizer's current rates as base rates.
    explicit MetricScheduler(Optimizer& optimizer) : Schedule(optimizer) {}
};

/// lr = base * gamma^floor(epoch / step_size)
class StepLR : public Scheduler {
public:
    /// Multiplies the rate by `gamma` every `step_size` steps.
    StepLR(Optimizer& optimizer, std::int64_t step_size, double gamma = 0.1);
    /// "StepLR".
    std::string name() const override { return "StepLR"; }

private:
    double next_lr(std::size_t group, double current) const override;
    std::int64_t step_size_;
    double gamma_;
};

/// lr = base * gamma^epoch
class ExponentialLR : public Scheduler {
public:
    /// Multiplies the rate by `gamma` every step.
    ExponentialLR(Optimizer& optimizer, double gamma);
    /// "ExponentialLR".
    std::string name() const override { return "ExponentialLR"; }

private:
    double next_lr(std::size_t group, double current) const override;
    double gamma_;
};

/// lr = eta_min + (base - eta_min) (1 + cos(pi epoch / T_max)) / 2
class CosineAnnealingLR : public Scheduler {
public:
    /// Cosine from the base rate down to `eta_min` over `T_max` steps.
    CosineAnnealingLR(Optimizer& optimizer, std::int64_t T_max, double eta_min = 0);
    /// "CosineAnnealingLR".
    std::string name() const override { return "CosineAnnealingLR"; }

private:
    double next_lr(std::size_t group, double current) const override;
    std::int64_t T_max_;
    double eta_min_;
};

/// Linear warm-up (PyTorch's LinearLR): the factor goes from start_factor to end_factor over
/// total_iters steps, then stays.
class LinearLR : public Scheduler {
public:
    /// Linear from start_factor x base to end_factor x base over total_iters steps.
    LinearLR(Optimizer& optimizer, double start_factor = 1.0 / 3, double end_factor = 1.0, std::int64_t total_iters = 5);
    /// "LinearLR".
    std::string name() const override { return "LinearLR"; }

private:
    double next_lr(std::size_t group, double current) const override;
    double start_, end_;
    std::int64_t total_;
};

/// Multiplies the rate by `factor` when the metric has not improved for `patience` steps.
class ReduceLROnPlateau : public MetricScheduler {
public:
    /// Whether a better metric is smaller (Min) or larger (Max).
    enum class Mode { Min, Max };
    /// Whether `threshold` is relative to the best value (Rel) or absolute (Abs).
    enum class ThresholdMode { Rel, Abs };
    /// Multiplies the rate by `factor` after `patience` steps without improvement, as PyTorch's; see its documentation for the arguments.
    ReduceLROnPlateau(Optimizer& optimizer, Mode mode = Mode::Min, double factor = 0.1, std::int64_t patience = 10,
                      double threshold = 1e-4, ThresholdMode threshold_mode = ThresholdMode::Rel,
                      std::int64_t cooldown = 0, double min_lr = 0, double eps = 1e-8);
    /// One step with the watched metric (e.g. the validation loss).
    void step(double metric) override;
    /// "ReduceLROnPlateau".
    std::string name() const override { return "ReduceLROnPlateau"; }
    bool lower_is_better() const override { return mode_ == Mode::Min; }
    /// Step count, best value and patience counters, for checkpoints.
    NamedTensorMap state_dict() const override;
    void load_state_dict(const NamedTensorMap& state) override;

private:
    bool better(double a) const;
    Mode mode_;
    double factor_;
    std::int64_t patience_;
    double threshold_;
    ThresholdMode threshold_mode_;
    std::int64_t cooldown_;
    double min_lr_, eps_;
    double best_;
    std::int64_t bad_epochs_ = 0, cooldown_counter_ = 0;
};

}  // namespace loom::optim
