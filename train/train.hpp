// Training helpers, a small layer and not a framework: a progress line, a metrics log,
// SVG charts, and padding and batching of variable-length sequences.
#pragma once
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "../core/random.hpp"
#include "../core/tensor.hpp"

namespace loom::train {

using Metrics = std::vector<std::pair<std::string, double>>;  // in the order they print

// On a terminal, a line rewritten in place: "epoch 2/5 [=====>    ] 120/200 loss 1.23 | 12.3 it/s | ETA 0:07".
// Elsewhere (CI logs, pipes) nothing until finish(), which always prints one line.
class Progress {
public:
    Progress(std::string label, std::int64_t total, std::FILE* out = stdout);
    void update(std::int64_t done, const Metrics& metrics);
    void finish(const Metrics& metrics);
    double seconds() const;

private:
    std::string line(std::int64_t done, const Metrics& metrics) const;
    std::string label_;
    std::int64_t total_;
    std::FILE* out_;
    bool terminal_;
    std::chrono::steady_clock::time_point start_, last_draw_;
};

// One row per call: JSON Lines for a path ending in .jsonl, CSV for .csv (header from the first row).
class MetricsLog {
public:
    explicit MetricsLog(const std::string& path, bool append = false);
    void write(const Metrics& row);
    const std::string& path() const { return path_; }

private:
    std::string path_;
    std::ofstream out_;
    bool csv_, wrote_header_;
};

// Reads a JSON Lines metrics log: one map per row.
std::vector<std::map<std::string, double>> read_metrics(const std::string& path);

struct Series {
    std::string name;
    std::vector<double> x, y;
};
// A line chart as SVG, written atomically: axes with ticks, one coloured line per series, a legend.
void plot_svg(const std::string& path, const std::string& title, const std::string& x_label,
              const std::string& y_label, const std::vector<Series>& series);

// Token sequences of any lengths -> time-major [T, B] int64 padded with `pad`, and lengths [B].
std::pair<Tensor, Tensor> pad_sequences(const std::vector<std::vector<std::int64_t>>& sequences, std::int64_t pad = 0);
// Feature sequences [len_b, F] -> [T, B, F] padded with zeros, and lengths [B].
std::pair<Tensor, Tensor> pad_sequences(const std::vector<Tensor>& sequences);
// Indices 0..n-1 in mini-batches of `batch` (the last may be smaller), shuffled when `gen` is given.
std::vector<std::vector<std::int64_t>> minibatches(std::int64_t n, std::int64_t batch, Generator* gen = nullptr);

}  // namespace loom::train
