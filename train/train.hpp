/// \file
/// Training helpers, a small layer and not a framework: a progress line, a metrics log,
/// SVG charts, and padding and batching of variable-length sequences.
#pragma once
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <cmath>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "../core/random.hpp"
#include "../core/tensor.hpp"
#include "../nn/module.hpp"
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
/// A line chart as SVG, written atomically: axes with ticks, one coloured line per series, a legend.
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
    std::function<void(double weight)> average_gradients;  ///< weight: this process's examples in the batch
    /// Sums a value over processes.
    std::function<double(double)> sum;
};

/// How train::fit trains: epochs, batches, clipping, early stopping, logs.
struct FitOptions {
    /// Passes over the training data.
    std::int64_t epochs = 10;
    /// Examples per mini-batch.
    std::int64_t batch_size = 32;
    /// Shuffle the order each epoch.
    bool shuffle = true;
    std::uint64_t seed = 0;  ///< shuffling order
    double clip_grad_norm = 0;  ///< 0: no clipping
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
};

/// What train::fit returns.
struct History {
    std::vector<Metrics> epochs;  ///< per epoch: epoch, train_loss, val_loss, ... as logged
    std::int64_t best_epoch = 0;  ///< 1-based; 0 without validation
    /// Best validation loss seen.
    double best_val_loss = INFINITY;
    /// Whether early stopping ended training.
    bool stopped_early = false;
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

/// Mean loss (and accuracy) of `model` over `data`, in eval mode and without recording.
Metrics evaluate(nn::Module& model, const ForwardFn& forward, const LossFn& loss, const Dataset& data,
                 std::int64_t batch_size, bool accuracy);

}  // namespace loom::train
