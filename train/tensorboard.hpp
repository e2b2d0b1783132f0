/// \file
/// TensorBoard event files without TensorFlow: SummaryWriter as PyTorch's
/// torch.utils.tensorboard.SummaryWriter, and a fit() callback that logs training to one.
#pragma once
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <string>

#include "train.hpp"

namespace loom::train {

/// Writes scalars, histograms and text to a TensorBoard event file in `log_dir`
/// (events.out.tfevents.TIME.HOST.PID.N, TFRecord framing with masked CRC32C, the Event protocol
/// buffer written directly). `tensorboard --logdir` on that folder shows them. Records go to the
/// file as they are added; flush() or the destructor pushes them to the disk.
class SummaryWriter {
public:
    /// Creates `log_dir` if needed and a new event file in it.
    explicit SummaryWriter(std::string log_dir);
    ~SummaryWriter();
    SummaryWriter(const SummaryWriter&) = delete;
    SummaryWriter& operator=(const SummaryWriter&) = delete;

    /// One value of the curve `tag` at `global_step`.
    void add_scalar(const std::string& tag, double scalar_value, std::int64_t global_step);
    /// Several curves in one chart, as PyTorch's: each value goes to its own event file in
    /// log_dir/MAINTAG_KEY under the tag `main_tag`.
    void add_scalars(const std::string& main_tag, const std::map<std::string, double>& tag_scalar_dict,
                     std::int64_t global_step);
    /// The distribution of a tensor's values at `global_step`, in `bins` equal-width buckets
    /// between its smallest and largest value (PyTorch's default is TensorFlow's exponential
    /// buckets instead; TensorBoard draws either). NaN and Inf are an error.
    void add_histogram(const std::string& tag, const Tensor& values, std::int64_t global_step, std::int64_t bins = 64);
    /// Text (Markdown) shown under `tag` at `global_step`.
    void add_text(const std::string& tag, const std::string& text_string, std::int64_t global_step);
    /// Pushes what was written to the disk.
    void flush();
    /// The folder given.
    const std::string& log_dir() const { return log_dir_; }
    /// The event file's path.
    const std::string& path() const { return path_; }

private:
    void write_event(const std::string& event);
    SummaryWriter& child(const std::string& folder);
    std::string log_dir_, path_;
    std::FILE* file_ = nullptr;
    std::map<std::string, std::unique_ptr<SummaryWriter>> children_;
};

/// The CRC-32C (Castagnoli) of `size` bytes, as TFRecord frames use it (before masking).
std::uint32_t crc32c(const void* data, std::size_t size);

/// A fit() callback that logs to TensorBoard: each step's loss and learning rate ("batch/loss",
/// "batch/lr" against the optimizer step), each epoch's metrics ("epoch/train_loss",
/// "epoch/val_loss", ... against the epoch), the model's summary as text, and, every
/// `histograms_every` steps (0: never), each parameter's weights and gradient as histograms
/// ("weights/NAME", "gradients/NAME") with their norms ("weight_norm/NAME", "grad_norm/NAME").
class TensorBoardLogger : public Callback {
public:
    /// Logs to a writer of its own in `log_dir`.
    explicit TensorBoardLogger(const std::string& log_dir, std::int64_t histograms_every = 0);
    /// Logs to `writer`, which may be shared with your own logging.
    explicit TensorBoardLogger(std::shared_ptr<SummaryWriter> writer, std::int64_t histograms_every = 0);
    /// Writes the model's summary.
    void on_train_begin(FitState& state) override;
    /// Writes the weights' and gradients' histograms and norms on the steps asked for.
    void after_backward(FitState& state) override;
    /// Writes the step's loss and learning rate.
    void on_batch_end(FitState& state) override;
    /// Writes the epoch's metrics.
    void on_epoch_end(FitState& state) override;
    /// Flushes the file.
    void on_train_end(FitState& state) override;
    /// The writer it logs to.
    SummaryWriter& writer() { return *writer_; }

private:
    std::shared_ptr<SummaryWriter> writer_;
    std::int64_t histograms_every_;
    std::string log_dir_;
};

}  // namespace loom::train
