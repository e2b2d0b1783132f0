/// \file
/// Training helpers, a small layer and not a framework: fit() with callbacks, gradient
/// accumulation and lr_find(); a progress line, a metrics log, SVG charts (logging.cpp); and
/// padding and batching of variable-length sequences.
#pragma once
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <cmath>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "../core/random.hpp"
#include "../core/tensor.hpp"
#include "../nn/module.hpp"
#include "../optim/optimizer.hpp"
#include "../optim/schedule.hpp"

namespace loom::train {

/// Named values in the order they print; read one by name with at("val_loss").
class Metrics {
public:
    /// One named value.
    using Entry = std::pair<std::string, double>;
    Metrics() = default;
    /// The given values, in order.
    Metrics(std::initializer_list<Entry> entries) : entries_(entries) {}
    /// Values from a range of Entry.
    template <class It> Metrics(It first, It last) : entries_(first, last) {}
    /// Appends a value.
    void emplace_back(std::string name, double value) { entries_.emplace_back(std::move(name), value); }
    /// The value named `name`; an error naming the metrics there are when it is missing.
    double at(std::string_view name) const;
    /// Whether a value is named `name`.
    bool contains(std::string_view name) const;
    /// Number of values.
    std::size_t size() const { return entries_.size(); }
    /// First value, in order.
    auto begin() const { return entries_.begin(); }
    /// Past the last value.
    auto end() const { return entries_.end(); }

private:
    std::vector<Entry> entries_;
};

/// On a terminal, a line rewritten in place: "epoch 2/5 [=====>    ] 120/200 loss 1.23 | 12.3 it/s | ETA 0:07".
/// Elsewhere (CI logs, pipes) nothing until finish(), which always prints one line.
class Progress {
public:
    /// A progress line for `total` steps labelled `label`, written to `out`.
    Progress(std::string label, std::int64_t total, std::FILE* out = stdout);
    /// Shows `done` of the total steps and the metrics so far (redrawn at most a few times a second).
    void update(std::int64_t done, const Metrics& metrics);
    /// Prints the final line with `metrics`.
    void finish(const Metrics& metrics);
    /// Seconds since construction.
    double seconds() const;

private:
    std::string line(std::int64_t done, const Metrics& metrics) const;
    std::string label_;
    std::int64_t total_;
    std::FILE* out_;
    bool terminal_;
    std::chrono::steady_clock::time_point start_, last_draw_;
};

/// One row per call: JSON Lines for a path ending in .jsonl, CSV for .csv (header from the first row).
class MetricsLog {
public:
    /// Opens (creates, or with `append` extends) the log at `path`.
    explicit MetricsLog(const std::string& path, bool append = false);
    /// Appends one row.
    void write(const Metrics& row);
    /// The log's path.
    const std::string& path() const { return path_; }

private:
    std::string path_;
    std::ofstream out_;
    bool csv_, wrote_header_;
};

/// Reads a JSON Lines metrics log: one map per row.
std::vector<std::map<std::string, double>> read_metrics(const std::string& path);

/// One line of a chart.
struct Series {
    /// Its name in the legend.
    std::string name;
    std::vector<double> x;  ///< abscissae
    std::vector<double> y;  ///< values, one per x
};
/// A line chart as SVG text: axes with ticks, one coloured line per series, a legend. NaN and
/// infinite points are skipped; an error when no series has a finite point.
std::string svg_chart(const std::string& title, const std::string& x_label, const std::string& y_label,
                      const std::vector<Series>& series);
/// svg_chart() written to `path`, atomically.
void plot_svg(const std::string& path, const std::string& title, const std::string& x_label,
              const std::string& y_label, const std::vector<Series>& series);

/// Token sequences of any lengths -> time-major [T, B] int64 padded with `pad`, and lengths [B].
std::pair<Tensor, Tensor> pad_sequences(const std::vector<std::vector<std::int64_t>>& sequences, std::int64_t pad = 0);
/// Feature sequences [len_b, F] -> [T, B, F] padded with zeros, and lengths [B].
std::pair<Tensor, Tensor> pad_sequences(const std::vector<Tensor>& sequences);
/// Indices 0..n-1 in mini-batches of `batch` (the last may be smaller), shuffled when `gen` is given.
std::vector<std::vector<std::int64_t>> minibatches(std::int64_t n, std::int64_t batch, Generator* gen = nullptr);

// ---- gradient report ----

/// One parameter's numbers: |dL/dw|, |w| and, when the weights before the optimizer's step are
/// given, the size of the update relative to the weight, |w - w_before| / |w_before| (NaN
/// without them; the rule of thumb is about 1e-3 per step). Norms are L2 over all elements.
struct ParameterReport {
    /// The parameter's name.
    std::string name;
    double grad_norm = NAN;     ///< L2 norm of its gradient; NaN when it has none yet
    double weight_norm = NAN;   ///< L2 norm of its values
    double update_ratio = NAN;  ///< norm of the last update over weight_norm
};

/// The report of every named parameter, for table() or a metrics log.
struct GradientReport {
    /// One row per parameter, in order.
    std::vector<ParameterReport> rows;
    /// An aligned table, one line per parameter.
    std::string table() const;
    /// For a MetricsLog: `grad_norm/<name>`, `weight_norm/<name>`, `update_ratio/<name>` of each
    /// parameter (the update ratio only when known).
    Metrics metrics() const;
};

/// Copies of the weights, to give gradient_report() before optimizer.step().
NamedTensorMap snapshot(const nn::NamedTensors& parameters);

/// After backward() (and, with `before_step` from snapshot(), after step()): the report of
/// every named parameter, in order. before_step must hold every parameter, with its shape.
GradientReport gradient_report(const nn::NamedTensors& parameters, const NamedTensorMap& before_step = {});

// ---- fit ----

/// A mini-batch: input (and lengths for variable-length sequences) and target.
struct Batch {
    Tensor input;    ///< the model's input
    Tensor target;   ///< what the loss compares with
    Tensor lengths;  ///< int64 [B] sequence lengths; undefined when all are full
};

/// Examples addressed by index; get() assembles a batch of them.
struct Dataset {
    /// Number of examples.
    std::int64_t size = 0;
    /// Assembles the batch of the examples at `indices`.
    std::function<Batch(const std::vector<std::int64_t>& indices)> get;
};

/// Splits off the last `fraction` of a shuffled order as validation set.
std::pair<Dataset, Dataset> split(const Dataset& data, double fraction, Generator& gen);

/// Training across processes; dist::data_parallel() (dist/dist.hpp) fills it, and train knows
/// nothing of MPI. With world_size > 1, fit draws each process's batches from its shard of each
/// epoch's order, averages the gradients after backward (before clipping), sums the training
/// metrics across processes, and only rank 0 prints and writes files.
struct Parallel {
    int rank = 0;        ///< this process's index
    int world_size = 1;  ///< number of processes
    /// This process's share of the n examples in epoch `epoch`'s order (shuffled or in order).
    std::function<std::vector<std::int64_t>(std::int64_t n, bool shuffle, std::uint64_t seed, std::int64_t epoch)> shard;
    /// Optional: called before the backward() whose gradients average_gradients will average,
    /// with the same weight, so that it can start averaging during that backward().
    std::function<void(double weight)> before_backward;
    std::function<void(double weight)> average_gradients;  ///< weight: this process's examples in the batch
    /// Sums a value over processes.
    std::function<double(double)> sum;
};

/// What train::fit returns.
struct History {
    std::vector<Metrics> epochs;  ///< per epoch: epoch, train_loss, val_loss, ... as logged
    std::int64_t best_epoch = 0;  ///< 1-based; 0 without validation
    /// Best validation loss seen.
    double best_val_loss = INFINITY;
    /// Whether a callback stopped training before the last epoch (early stopping, or your own).
    bool stopped_early = false;
};

class Callback;

/// How train::fit trains: epochs, batches, clipping, gradient accumulation, and the callbacks
/// that run inside its loop. The options verbose, log, gradient_report_every, best_checkpoint
/// (and restore_best) and early_stopping are shorthands that add the built-in callbacks
/// (ProgressLine, MetricsLogger, GradientReportLogger, BestModel, EarlyStopping, in that order)
/// before your own.
struct FitOptions {
    /// Passes over the training data.
    std::int64_t epochs = 10;
    /// Examples per mini-batch.
    std::int64_t batch_size = 32;
    /// Shuffle the order each epoch.
    bool shuffle = true;
    std::uint64_t seed = 0;  ///< shuffling order
    double clip_grad_norm = 0;  ///< 0: no clipping
    /// Sum the gradients of this many mini-batches (each loss divided by their count) before one
    /// optimizer step: a batch k times larger in the memory of one. The last group of an epoch
    /// may be shorter. 1: a step per mini-batch.
    std::int64_t accumulate = 1;
    std::int64_t early_stopping = 0;  ///< stop after this many epochs without a better validation loss; 0: never
    std::string best_checkpoint;  ///< where to keep the best model's state (safetensors); empty: nowhere
    bool restore_best = true;  ///< reload the best state at the end (needs validation data)
    std::string log;  ///< metrics log path (.jsonl or .csv); empty: none
    bool accuracy = false;  ///< also report accuracy: argmax of the output's last dim vs the target
    bool bits_per_character = false;  ///< also report loss / ln 2
    bool verbose = true;  ///< progress line and one line per epoch
    /// Every this many optimizer steps, write the model's gradient report (with update ratios)
    /// as one row to gradient_log (.jsonl or .csv) beside "step" and "epoch". 0: never.
    std::int64_t gradient_report_every = 0;
    /// Where the gradient reports go (.jsonl or .csv).
    std::string gradient_log;
    Parallel parallel;  ///< one process unless dist::data_parallel() says otherwise
    /// Your callbacks, called in this order after the built-in ones.
    std::vector<std::shared_ptr<Callback>> callbacks;
};

/// What fit's callbacks see and may change: where training is, the batch being trained on,
/// and the way to stop. Fields not yet known at a call are empty (output and loss before
/// backward, epoch_metrics before the epoch's end).
struct FitState {
    /// The state of a fit() of `model` with `optimizer`, `options` and `history` about to begin.
    FitState(nn::Module& model_, optim::Optimizer& optimizer_, const FitOptions& options_, History& history_)
        : model(model_), optimizer(optimizer_), options(options_), history(history_)
    {
    }
    /// The model being trained.
    nn::Module& model;
    /// Its optimizer.
    optim::Optimizer& optimizer;
    /// fit's options.
    const FitOptions& options;
    /// What fit will return, filled as training goes.
    History& history;
    std::int64_t epoch = 0;    ///< 1-based
    std::int64_t step = 0;     ///< optimizer steps taken so far
    std::int64_t batch = 0;    ///< 0-based index of the mini-batch within the epoch
    std::int64_t batches = 0;  ///< mini-batches in this epoch (on this process)
    /// The mini-batch (on_batch_begin to on_batch_end).
    const Batch* data = nullptr;
    /// The model's output for it (after backward).
    Tensor output;
    /// Its loss, as computed (after backward).
    Tensor loss;
    /// Mean training loss of the epoch so far.
    double running_loss = NAN;
    /// The epoch's row (on_epoch_end): epoch, train_loss, ..., val_loss, ..., lr, seconds.
    Metrics epoch_metrics;
    /// Whether this process writes files and prints (rank 0).
    bool main_process = true;
    /// Set it to stop training: after this mini-batch when set during one (the epoch is then
    /// validated and logged as usual), else after this epoch.
    bool stop_training = false;
};

/// Code of your own inside train::fit's loop, as Keras's callbacks. Override what you need.
/// after_backward runs once per optimizer step with the gradients complete (accumulated and,
/// across processes, averaged), before clipping and the step: where gradients are inspected.
class Callback {
public:
    virtual ~Callback() = default;
    /// Before the first epoch.
    virtual void on_train_begin(FitState&) {}
    /// After the last epoch (also after an early stop).
    virtual void on_train_end(FitState&) {}
    /// Before an epoch's first mini-batch.
    virtual void on_epoch_begin(FitState&) {}
    /// After an epoch's validation; epoch_metrics holds its row.
    virtual void on_epoch_end(FitState&) {}
    /// Before a mini-batch's forward.
    virtual void on_batch_begin(FitState&) {}
    /// After a mini-batch (and, when it completed a group, the optimizer's step).
    virtual void on_batch_end(FitState&) {}
    /// With the gradients of a complete step, before clipping and optimizer.step().
    virtual void after_backward(FitState&) {}
};

/// Stops training after `patience` epochs without a better validation loss.
class EarlyStopping : public Callback {
public:
    /// Stops after `patience` epochs (> 0) without improvement; says so when `verbose`.
    explicit EarlyStopping(std::int64_t patience, bool verbose = true);
    /// Counts the epochs since the best.
    void on_epoch_end(FitState& state) override;

private:
    std::int64_t patience_;
    bool verbose_;
};

/// Keeps the model's state of the epoch with the best validation loss, writes it to `path`
/// (safetensors; empty: nowhere) and, with `restore`, loads it back when training ends.
class BestModel : public Callback {
public:
    /// Keeps the best state; see the class.
    explicit BestModel(std::string path = {}, bool restore = true);
    /// Copies the state when the epoch was the best so far.
    void on_epoch_end(FitState& state) override;
    /// Restores the best state.
    void on_train_end(FitState& state) override;

private:
    std::string path_;
    bool restore_;
    NamedTensorMap best_;
};

/// Writes each epoch's row to a metrics log (.jsonl or .csv), on the main process.
class MetricsLogger : public Callback {
public:
    /// Logs to `path`.
    explicit MetricsLogger(std::string path);
    /// Opens the log.
    void on_train_begin(FitState& state) override;
    /// Writes the row.
    void on_epoch_end(FitState& state) override;

private:
    std::string path_;
    std::unique_ptr<MetricsLog> log_;
};

/// The progress line during an epoch and one line at its end, on the main process.
class ProgressLine : public Callback {
public:
    /// Starts the epoch's line.
    void on_epoch_begin(FitState& state) override;
    /// Redraws it with the running loss.
    void on_batch_end(FitState& state) override;
    /// Prints the epoch's metrics.
    void on_epoch_end(FitState& state) override;

private:
    std::unique_ptr<Progress> progress_;
};

/// Every `every` optimizer steps, the model's gradient report (with update ratios) as one row of
/// a metrics log at `path`, beside "step" and "epoch".
class GradientReportLogger : public Callback {
public:
    /// Reports every `every` (> 0) steps to `path`.
    GradientReportLogger(std::int64_t every, std::string path);
    /// Opens the log.
    void on_train_begin(FitState& state) override;
    /// Snapshots the weights before a reported step.
    void after_backward(FitState& state) override;
    /// Writes the report after the step.
    void on_batch_end(FitState& state) override;

private:
    std::int64_t every_;
    std::string path_;
    std::unique_ptr<MetricsLog> log_;
    NamedTensorMap before_;
    std::int64_t pending_step_ = 0;
};

/// Computes the model's output for a batch.
using ForwardFn = std::function<Tensor(const Batch&)>;
/// Computes the loss from the output and the batch.
using LossFn = std::function<Tensor(const Tensor& output, const Batch&)>;

/// Trains for options.epochs over shuffled mini-batches of `train_data`, evaluating on
/// `validation` (may have size 0) after each epoch; steps `schedule` once per epoch if given
/// (a MetricScheduler such as ReduceLROnPlateau with the validation loss, so it needs validation data).
History fit(nn::Module& model, optim::Optimizer& optimizer, const ForwardFn& forward, const LossFn& loss,
            const Dataset& train_data, const Dataset& validation, const FitOptions& options = {},
            optim::Schedule* schedule = nullptr);

/// The sweep of train::lr_find.
struct LrFindOptions {
    double start_lr = 1e-7;  ///< the first step's learning rate
    double end_lr = 10;      ///< the last step's, if the loss has not diverged by then
    std::int64_t steps = 100;  ///< steps of the sweep, the rate growing by the same factor each
    std::int64_t batch_size = 32;  ///< examples per step
    double smoothing = 0.98;  ///< of the loss: an exponential moving average, debiased
    double diverge = 4;  ///< stop once the smoothed loss exceeds this many times its minimum
    std::uint64_t seed = 0;  ///< the order of the batches
    std::string chart;  ///< an SVG of smoothed loss against log10(learning rate); empty: none
};

/// What train::lr_find measured.
struct LrFindResult {
    std::vector<double> lrs;     ///< the rate of each step taken
    std::vector<double> losses;  ///< the smoothed loss after it
    /// The rate where the smoothed loss fell fastest against log(rate): a starting point for
    /// training (Smith 2015's range test, as fastai reads it).
    double suggested_lr = NAN;
};

/// Smith's learning-rate range test: trains from `model`'s current weights for up to
/// options.steps mini-batches with the rate growing exponentially from start_lr to end_lr,
/// stopping when the loss diverges, then puts the model's and the optimizer's state back as they
/// were. Written as a callback over fit().
LrFindResult lr_find(nn::Module& model, optim::Optimizer& optimizer, const ForwardFn& forward, const LossFn& loss,
                     const Dataset& data, const LrFindOptions& options = {});

/// Mean loss (and accuracy) of `model` over `data`, in eval mode and without recording.
Metrics evaluate(nn::Module& model, const ForwardFn& forward, const LossFn& loss, const Dataset& data,
                 std::int64_t batch_size, bool accuracy);

}  // namespace loom::train
