#include "tensorboard.hpp"

#include <unistd.h>

#include <array>
#include <atomic>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>

#include "../autograd/ops.hpp"
#include "../autograd/tape.hpp"
#include "../core/kernels.hpp"

namespace loom::train {

namespace {

// ---- the few protocol buffer encodings an Event needs ----

void varint(std::string& out, std::uint64_t v)
{
    while (v >= 0x80) {
        out.push_back(static_cast<char>((v & 0x7f) | 0x80));
        v >>= 7;
    }
    out.push_back(static_cast<char>(v));
}
void key(std::string& out, int field, int wire_type) { varint(out, (std::uint64_t(field) << 3) | std::uint64_t(wire_type)); }
template <class T> void little_endian(std::string& out, T value)
{
    const auto bits = std::bit_cast<std::conditional_t<sizeof(T) == 8, std::uint64_t, std::uint32_t>>(value);
    for (std::size_t i = 0; i < sizeof(T); ++i) out.push_back(static_cast<char>((bits >> (8 * i)) & 0xff));
}
void double_field(std::string& out, int field, double v) { key(out, field, 1), little_endian(out, v); }
void float_field(std::string& out, int field, float v) { key(out, field, 5), little_endian(out, v); }
void varint_field(std::string& out, int field, std::uint64_t v) { key(out, field, 0), varint(out, v); }
void bytes_field(std::string& out, int field, const std::string& bytes)
{
    key(out, field, 2);
    varint(out, bytes.size());
    out += bytes;
}
void packed_doubles(std::string& out, int field, const std::vector<double>& values)
{
    std::string packed;
    for (double v : values) little_endian(packed, v);
    bytes_field(out, field, packed);
}

double wall_time()
{
    return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Event { wall_time = 1; step = 2; file_version = 3 | summary = 5 }
std::string event(std::int64_t step, const std::string* file_version, const std::string* summary)
{
    std::string e;
    double_field(e, 1, wall_time());
    if (step != 0) varint_field(e, 2, static_cast<std::uint64_t>(step));
    if (file_version) bytes_field(e, 3, *file_version);
    if (summary) bytes_field(e, 5, *summary);
    return e;
}

// Summary { repeated Value value = 1; }, here with one Value { tag = 1; ... }.
std::string summary_of(const std::string& value) { std::string s; bytes_field(s, 1, value); return s; }

void check_tag(std::string_view op, const std::string& tag)
{
    LOOM_CHECK(!tag.empty(), op, "expects a non-empty tag");
}

std::atomic<int> files_made{0};

}  // namespace

std::uint32_t crc32c(const void* data, std::size_t size)
{
    static const auto table = [] {
        std::array<std::uint32_t, 256> t{};
        for (std::uint32_t i = 0; i < 256; ++i) {
            std::uint32_t c = i;
            for (int k = 0; k < 8; ++k) c = c & 1 ? 0x82f63b78u ^ (c >> 1) : c >> 1;
            t[i] = c;
        }
        return t;
    }();
    std::uint32_t crc = 0xffffffffu;
    const auto* p = static_cast<const unsigned char*>(data);
    for (std::size_t i = 0; i < size; ++i) crc = table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
    return crc ^ 0xffffffffu;
}

SummaryWriter::SummaryWriter(std::string log_dir) : log_dir_(std::move(log_dir))
{
    LOOM_CHECK(!log_dir_.empty(), "SummaryWriter", "expects a folder to write the event file in");
    std::error_code ec;
    std::filesystem::create_directories(log_dir_, ec);
    LOOM_CHECK(!ec && std::filesystem::is_directory(log_dir_), "SummaryWriter", "cannot create the folder '{}': {}",
               log_dir_, ec ? ec.message() : "a file of that name is in the way");
    char host[256] = "localhost";
    gethostname(host, sizeof host - 1);
    path_ = fmt::format("{}/events.out.tfevents.{:010d}.{}.{}.{}", log_dir_, static_cast<long long>(wall_time()), host,
                        static_cast<long long>(getpid()), files_made++);
    file_ = std::fopen(path_.c_str(), "wb");
    LOOM_CHECK(file_ != nullptr, "SummaryWriter", "cannot open '{}' for writing: {}", path_, std::strerror(errno));
    const std::string version = "brain.Event:2";
    write_event(event(0, &version, nullptr));
    flush();
}

SummaryWriter::~SummaryWriter()
{
    if (file_) std::fclose(file_);
}

void SummaryWriter::write_event(const std::string& e)
{
    // TFRecord: length (uint64), masked CRC of the length, the data, masked CRC of the data.
    const auto masked = [](std::uint32_t crc) { return ((crc >> 15) | (crc << 17)) + 0xa282ead8u; };
    std::string frame;
    little_endian(frame, static_cast<std::uint64_t>(e.size()));
    little_endian(frame, masked(crc32c(frame.data(), 8)));
    frame += e;
    little_endian(frame, masked(crc32c(e.data(), e.size())));
    LOOM_CHECK(std::fwrite(frame.data(), 1, frame.size(), file_) == frame.size(), "SummaryWriter",
               "writing to '{}' failed: {}", path_, std::strerror(errno));
}

void SummaryWriter::flush()
{
    LOOM_CHECK(std::fflush(file_) == 0, "SummaryWriter", "writing to '{}' failed: {}", path_, std::strerror(errno));
    for (auto& [name, c] : children_) c->flush();
}

void SummaryWriter::add_scalar(const std::string& tag, double scalar_value, std::int64_t global_step)
{
    check_tag("add_scalar", tag);
    std::string value;
    bytes_field(value, 1, tag);
    float_field(value, 2, static_cast<float>(scalar_value));  // simple_value
    const std::string s = summary_of(value);
    write_event(event(global_step, nullptr, &s));
}

SummaryWriter& SummaryWriter::child(const std::string& folder)
{
    auto& c = children_[folder];
    if (!c) c = std::make_unique<SummaryWriter>(log_dir_ + "/" + folder);
    return *c;
}

void SummaryWriter::add_scalars(const std::string& main_tag, const std::map<std::string, double>& tag_scalar_dict,
                                std::int64_t global_step)
{
    check_tag("add_scalars", main_tag);
    for (const auto& [tag, v] : tag_scalar_dict) {
        check_tag("add_scalars", tag);
        std::string folder = main_tag + "_" + tag;
        std::replace(folder.begin(), folder.end(), '/', '_');
        child(folder).add_scalar(main_tag, v, global_step);
    }
}

void SummaryWriter::add_histogram(const std::string& tag, const Tensor& values, std::int64_t global_step,
                                  std::int64_t bins)
{
    check_tag("add_histogram", tag);
    LOOM_CHECK(bins > 0, "add_histogram", "expects bins > 0, got {}", bins);
    LOOM_CHECK(values.defined() && values.numel() > 0, "add_histogram", "'{}': expects a tensor with elements", tag);
    const Tensor v = kernels::contiguous(kernels::to(values.detach(), kFloat64));
    const double* p = v.data_ptr<double>();
    const std::int64_t n = v.numel();
    double lo = INFINITY, hi = -INFINITY, sum = 0, sum_squares = 0;
    for (std::int64_t i = 0; i < n; ++i) {
        LOOM_CHECK(std::isfinite(p[i]), "add_histogram", "'{}' holds {} at flat index {}; a histogram needs finite values",
                   tag, p[i], i);
        lo = std::min(lo, p[i]), hi = std::max(hi, p[i]);
        sum += p[i], sum_squares += p[i] * p[i];
    }
    // Equal-width buckets over [lo, hi]; bucket_limit holds each one's upper edge.
    const std::int64_t k = hi > lo ? bins : 1;
    std::vector<double> limits(static_cast<std::size_t>(k)), counts(static_cast<std::size_t>(k), 0.0);
    for (std::int64_t b = 0; b < k; ++b) limits[std::size_t(b)] = b + 1 == k ? hi : lo + (hi - lo) * double(b + 1) / double(k);
    for (std::int64_t i = 0; i < n; ++i) {
        const auto b = k == 1 ? 0 : std::min<std::int64_t>(k - 1, static_cast<std::int64_t>((p[i] - lo) / (hi - lo) * double(k)));
        counts[std::size_t(b)] += 1;
    }
    // HistogramProto { min = 1; max = 2; num = 3; sum = 4; sum_squares = 5; bucket_limit = 6; bucket = 7; }
    std::string histo;
    double_field(histo, 1, lo);
    double_field(histo, 2, hi);
    double_field(histo, 3, double(n));
    double_field(histo, 4, sum);
    double_field(histo, 5, sum_squares);
    packed_doubles(histo, 6, limits);
    packed_doubles(histo, 7, counts);
    std::string value;
    bytes_field(value, 1, tag);
    bytes_field(value, 5, histo);
    const std::string s = summary_of(value);
    write_event(event(global_step, nullptr, &s));
}

void SummaryWriter::add_text(const std::string& tag, const std::string& text_string, std::int64_t global_step)
{
    check_tag("add_text", tag);
    // The text plugin reads a string tensor: Value { tag = 1; metadata = 9 { plugin_data = 1 {
    // plugin_name = 1 } }; tensor = 8 { dtype = 1 (DT_STRING = 7); tensor_shape = 2 { dim = 2 {
    // size = 1 } }; string_val = 8 } }
    std::string plugin, metadata, dim, shape, tensor, value;
    bytes_field(plugin, 1, "text");
    bytes_field(metadata, 1, plugin);
    varint_field(dim, 1, 1);
    bytes_field(shape, 2, dim);
    varint_field(tensor, 1, 7);
    bytes_field(tensor, 2, shape);
    bytes_field(tensor, 8, text_string);
    bytes_field(value, 1, tag);
    bytes_field(value, 8, tensor);
    bytes_field(value, 9, metadata);
    const std::string s = summary_of(value);
    write_event(event(global_step, nullptr, &s));
}

// ---- the callback ----

TensorBoardLogger::TensorBoardLogger(const std::string& log_dir, std::int64_t histograms_every)
    : histograms_every_(histograms_every), log_dir_(log_dir)
{
    LOOM_CHECK(!log_dir.empty(), "TensorBoardLogger", "expects a folder for the event files");
    LOOM_CHECK(histograms_every >= 0, "TensorBoardLogger", "expects histograms_every >= 0, got {}", histograms_every);
}

TensorBoardLogger::TensorBoardLogger(std::shared_ptr<SummaryWriter> writer, std::int64_t histograms_every)
    : writer_(std::move(writer)), histograms_every_(histograms_every)
{
    LOOM_CHECK(writer_ != nullptr, "TensorBoardLogger", "expects a writer, got a null pointer");
    LOOM_CHECK(histograms_every >= 0, "TensorBoardLogger", "expects histograms_every >= 0, got {}", histograms_every);
}

void TensorBoardLogger::on_train_begin(FitState& state)
{
    if (!state.main_process) return;
    if (!writer_) writer_ = std::make_shared<SummaryWriter>(log_dir_);
    // Four spaces make Markdown keep the summary's columns.
    std::string text;
    std::size_t at = 0;
    const std::string summary = state.model.summary();
    while (at < summary.size()) {
        const std::size_t end = std::min(summary.find('\n', at), summary.size());
        text += "    " + summary.substr(at, end - at) + "\n";
        at = end + 1;
    }
    writer_->add_text("model", text, 0);
}

void TensorBoardLogger::after_backward(FitState& state)
{
    const std::int64_t step = state.step + 1;  // the step about to be taken
    if (!state.main_process || histograms_every_ == 0 || step % histograms_every_ != 0) return;
    const nn::NamedTensors parameters = state.model.named_parameters();
    const GradientReport norms = gradient_report(parameters);  // rows in the parameters' order
    for (std::size_t k = 0; k < parameters.size(); ++k) {
        const auto& [name, p] = parameters[k];
        writer_->add_histogram("weights/" + name, p, step);
        writer_->add_scalar("weight_norm/" + name, norms.rows[k].weight_norm, step);
        const Tensor g = p.grad();
        if (!g.defined()) continue;
        writer_->add_histogram("gradients/" + name, g, step);
        writer_->add_scalar("grad_norm/" + name, norms.rows[k].grad_norm, step);
    }
}

void TensorBoardLogger::on_batch_end(FitState& state)
{
    if (!state.main_process || !state.loss.defined()) return;
    writer_->add_scalar("batch/loss", state.loss.item<double>(), state.step);
    writer_->add_scalar("batch/lr", state.optimizer.lr(), state.step);
}

void TensorBoardLogger::on_epoch_end(FitState& state)
{
    if (!state.main_process) return;
    for (const auto& [name, value] : state.epoch_metrics)
        if (name != "epoch") writer_->add_scalar("epoch/" + name, value, state.epoch);
    writer_->flush();
}

void TensorBoardLogger::on_train_end(FitState& state)
{
    if (state.main_process) writer_->flush();
}

}  // namespace loom::train
