/// \file
/// train::HtmlReport: a training run as one self-contained HTML file (no network, no external
/// scripts) to open in any browser: the loss and metric curves, the learning rate, each
/// parameter's gradient norm over steps, a heatmap of |dL/dh_t| over time for each recurrent
/// layer, and the model's summary.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "train.hpp"

namespace loom::train {

/// A report written as one .html file. As a fit() callback it records, every step, the loss and
/// the learning rate; every `every` optimizer steps, each parameter's gradient norm and, for
/// each fused recurrent layer of the model (nn::RecurrentLayer), the norm of dL/dh_t at every
/// time step t (from state_gradient_hook, which it chains to a hook already set and restores
/// when training ends); at each epoch's end, the epoch's metrics. It rewrites the file at the end
/// of each epoch and of training, so a long run can be watched by reloading the page.
///
/// Sections of your own (add_chart, add_heatmap, add_text) follow the training's; a report
/// built from them alone, without fit(), is written with write().
///
/// The numbers behind each chart and heatmap are in the page as JSON (the script elements with
/// ids chart-data and heatmap-data), for reading back with any JSON parser.
///
/// Long runs stay small: per-step curves keep at most 2000 points (neighbouring points are
/// averaged as more arrive), and the sampled steps at most 200 (every other one is dropped and
/// the sampling interval doubles).
class HtmlReport : public Callback {
public:
    /// A report written to `path` (.html); `every` (> 0): optimizer steps between samples of the
    /// gradient norms and of dL/dh_t.
    explicit HtmlReport(std::string path, std::int64_t every = 10);
    ~HtmlReport() override;
    HtmlReport(const HtmlReport&) = delete;
    HtmlReport& operator=(const HtmlReport&) = delete;

    /// The page's title (default: the file's name).
    void set_title(std::string title);
    /// A section of preformatted text (a table, a model summary).
    void add_text(std::string heading, std::string text);
    /// A section with a line chart of `series`.
    void add_chart(std::string title, std::string x_label, std::string y_label, std::vector<Series> series);
    /// A section with a heatmap: one row per label, `rows[r][c]` the value of row r at column c
    /// (rows may differ in length; NaN, and with `log_scale` zero, are left blank). Colours span
    /// the finite values, on a log10 scale when `log_scale`.
    void add_heatmap(std::string title, std::string x_label, std::string y_label, std::vector<std::string> row_labels,
                     std::vector<std::vector<double>> rows, bool log_scale = true);
    /// Writes the file (atomically: a reader never sees half a page).
    void write() const;
    /// Where it writes.
    const std::string& path() const { return path_; }

    /// Notes the model's summary and hooks its recurrent layers.
    void on_train_begin(FitState& state) override;
    /// Arms the layers' hooks when the coming step is sampled.
    void on_batch_begin(FitState& state) override;
    /// Samples the gradient norms and the dL/dh_t curves of a sampled step.
    void after_backward(FitState& state) override;
    /// Records the step's loss and learning rate.
    void on_batch_end(FitState& state) override;
    /// Records the epoch's metrics and rewrites the file.
    void on_epoch_end(FitState& state) override;
    /// Restores the layers' hooks and writes the file.
    void on_train_end(FitState& state) override;

private:
    struct Data;
    std::string path_;
    std::int64_t every_;
    std::unique_ptr<Data> data_;
};

}  // namespace loom::train
