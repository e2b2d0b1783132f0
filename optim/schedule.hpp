// Learning-rate schedules with PyTorch's semantics. Construct one after its optimizer (it takes the
// current rates as base rates, and sets the starting rate). A Scheduler is stepped by time:
// step() once per epoch or step, after optimizer.step(). A MetricScheduler is stepped by a
// metric: step(validation_loss). train::fit steps either kind once per epoch.
#pragma once
#include <optional>

#include "optimizer.hpp"

namespace loom::optim {

// What every schedule has: the optimizer whose rates it sets, a step count, and its state for
// checkpoints.
class Schedule {
public:
    virtual ~Schedule() = default;
    virtual std::string name() const = 0;
    std::int64_t last_epoch() const { return last_epoch_; }
    std::vector<double> last_lr() const;
    virtual NamedTensorMap state_dict() const;
    // Checks the whole state before taking any of it.
    virtual void load_state_dict(const NamedTensorMap& state);
    // Whether epoch_end needs the validation loss.
    virtual bool needs_metric() const = 0;
    // What train::fit calls after each epoch, with the validation loss when there is validation data.
    virtual void epoch_end(std::optional<double> validation_loss) = 0;

protected:
    explicit Schedule(Optimizer& optimizer);
    Optimizer& optimizer_;
    std::vector<double> base_lrs_;
    std::int64_t last_epoch_ = 0;
};

// Stepped by time: the rate follows from the step count.
class Scheduler : public Schedule {
public:
    virtual void step();
    bool needs_metric() const override { return false; }
    void epoch_end(std::optional<double>) override { step(); }

protected:
    explicit Scheduler(Optimizer& optimizer) : Schedule(optimizer) {}
    void initial_step() { apply(); }
    // The rate of `group` at last_epoch_, from its current rate (PyTorch's chainable form).
    virtual double next_lr(std::size_t group, double current) const = 0;
    void apply();
};

// Stepped by a metric, such as the validation loss.
class MetricScheduler : public Schedule {
public:
    virtual void step(double metric) = 0;
    bool needs_metric() const override { return true; }
    // Whether a lower metric is better (a loss); train::fit feeds it the validation loss, so
    // it must be.
    virtual bool lower_is_better() const { return true; }
    void epoch_end(std::optional<double> validation_loss) override;

protected:
    explicit MetricScheduler(Optimizer& optimizer) : Schedule(optimizer) {}
};

// lr = base * gamma^floor(epoch / step_size)
class StepLR : public Scheduler {
public:
    StepLR(Optimizer& optimizer, std::int64_t step_size, double gamma = 0.1);
    std::string name() const override { return "StepLR"; }

private:
    double next_lr(std::size_t group, double current) const override;
    std::int64_t step_size_;
    double gamma_;
};

// lr = base * gamma^epoch
class ExponentialLR : public Scheduler {
public:
    ExponentialLR(Optimizer& optimizer, double gamma);
    std::string name() const override { return "ExponentialLR"; }

private:
    double next_lr(std::size_t group, double current) const override;
    double gamma_;
};

// lr = eta_min + (base - eta_min) (1 + cos(pi epoch / T_max)) / 2
class CosineAnnealingLR : public Scheduler {
public:
    CosineAnnealingLR(Optimizer& optimizer, std::int64_t T_max, double eta_min = 0);
    std::string name() const override { return "CosineAnnealingLR"; }

private:
    double next_lr(std::size_t group, double current) const override;
    std::int64_t T_max_;
    double eta_min_;
};

// Linear warm-up (PyTorch's LinearLR): the factor goes from start_factor to end_factor over
// total_iters steps, then stays.
class LinearLR : public Scheduler {
public:
    LinearLR(Optimizer& optimizer, double start_factor = 1.0 / 3, double end_factor = 1.0, std::int64_t total_iters = 5);
    std::string name() const override { return "LinearLR"; }

private:
    double next_lr(std::size_t group, double current) const override;
    double start_, end_;
    std::int64_t total_;
};

// Multiplies the rate by `factor` when the metric has not improved for `patience` steps.
class ReduceLROnPlateau : public MetricScheduler {
public:
    enum class Mode { Min, Max };
    enum class ThresholdMode { Rel, Abs };
    ReduceLROnPlateau(Optimizer& optimizer, Mode mode = Mode::Min, double factor = 0.1, std::int64_t patience = 10,
                      double threshold = 1e-4, ThresholdMode threshold_mode = ThresholdMode::Rel,
                      std::int64_t cooldown = 0, double min_lr = 0, double eps = 1e-8);
    void step(double metric) override;
    std::string name() const override { return "ReduceLROnPlateau"; }
    bool lower_is_better() const override { return mode_ == Mode::Min; }
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
