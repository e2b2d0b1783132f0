// HtmlReport: what a training run records, laid out as one HTML page. Line charts are SVG
// written here (svg_chart); heatmaps are drawn on a canvas by a short inline script from data
// embedded in the page, so a heatmap of thousands of cells stays small.
#include "report.hpp"

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "../core/files_internal.hpp"
#include "../nn/recurrent.hpp"

namespace loom::train {

namespace {

constexpr std::size_t kCurvePoints = 2000;  // per-step curves keep at most this many points
constexpr std::size_t kSampledSteps = 200;  // and the sampled steps at most this many

// A curve of at most kCurvePoints points: when full, neighbouring points are averaged in pairs
// and each later point averages twice as many raw ones, so the whole run stays evenly covered.
class ThinnedCurve {
public:
    void add(double x, double y)
    {
        sum_x_ += x, sum_y_ += y;
        if (++pending_ < stride_) return;
        x_.push_back(sum_x_ / double(stride_));
        y_.push_back(sum_y_ / double(stride_));
        sum_x_ = sum_y_ = 0;
        pending_ = 0;
        if (x_.size() < kCurvePoints) return;
        for (std::size_t i = 0; i < x_.size() / 2; ++i) {
            x_[i] = (x_[2 * i] + x_[2 * i + 1]) / 2;
            y_[i] = (y_[2 * i] + y_[2 * i + 1]) / 2;
        }
        x_.resize(x_.size() / 2);
        y_.resize(y_.size() / 2);
        stride_ *= 2;
    }
    bool empty() const { return x_.empty() && pending_ == 0; }
    // The curve, with the points not yet averaged as one more.
    Series series(std::string name) const
    {
        Series s{std::move(name), x_, y_};
        if (pending_ > 0) {
            s.x.push_back(sum_x_ / double(pending_));
            s.y.push_back(sum_y_ / double(pending_));
        }
        return s;
    }

private:
    std::vector<double> x_, y_;
    double sum_x_ = 0, sum_y_ = 0;
    std::int64_t stride_ = 1, pending_ = 0;
};

std::string escape_html(const std::string& s)
{
    std::string out;
    for (char c : s) {
        switch (c) {
        case '<': out += "&lt;"; break;
        case '>': out += "&gt;"; break;
        case '&': out += "&amp;"; break;
        case '"': out += "&quot;"; break;
        default: out += c;
        }
    }
    return out;
}

// JSON inside <script>: "</" would end the script element early.
std::string script_json(const nlohmann::json& j)
{
    std::string text = j.dump();
    std::string out;
    for (std::size_t i = 0; i < text.size(); ++i) {
        out += text[i];
        if (text[i] == '<' && i + 1 < text.size() && text[i + 1] == '/') out += "\\";
    }
    return out;
}

// log10 of each value, NaN where it is not positive: for charts of norms.
std::vector<double> log10_of(const std::vector<double>& values)
{
    std::vector<double> out;
    for (double v : values) out.push_back(v > 0 ? std::log10(v) : NAN);
    return out;
}

bool has_finite_point(const std::vector<Series>& series)
{
    for (const auto& s : series)
        for (std::size_t i = 0; i < s.x.size() && i < s.y.size(); ++i)
            if (std::isfinite(s.x[i]) && std::isfinite(s.y[i])) return true;
    return false;
}

// The script that draws every heatmap: a viridis-like scale over the finite values, labels,
// a colour bar, and the value under the pointer.
constexpr const char* kHeatmapScript = R"JS(
"use strict";
(function () {
  const maps = JSON.parse(document.getElementById("heatmap-data").textContent);
  const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  function colour(f) {
    f = Math.min(1, Math.max(0, f));
    const p = f * (stops.length - 1), i = Math.min(Math.floor(p), stops.length - 2), u = p - i;
    const c = stops[i].map((a, k) => Math.round(a + (stops[i + 1][k] - a) * u));
    return "rgb(" + c.join(",") + ")";
  }
  maps.forEach(function (m, k) {
    const canvas = document.getElementById("heatmap-" + k);
    const readout = document.getElementById("readout-" + k);
    const ctx = canvas.getContext("2d");
    const shown = v => (v === null || !isFinite(v) || (m.log && v <= 0)) ? null : (m.log ? Math.log10(v) : v);
    const rows = m.rows.map(r => r.map(shown));
    let lo = Infinity, hi = -Infinity, cols = 0;
    rows.forEach(function (r) {
      cols = Math.max(cols, r.length);
      r.forEach(function (v) { if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); } });
    });
    if (!isFinite(lo)) { lo = 0; hi = 1; }
    if (hi === lo) hi = lo + 1;
    ctx.font = "12px sans-serif";
    const widest = m.labels.reduce((w, label) => Math.max(w, ctx.measureText(label).width), 0);
    const W = canvas.width, H = canvas.height, left = Math.max(60, widest + 36), right = 110, top = 10, bottom = 42;
    const cw = (W - left - right) / Math.max(cols, 1), ch = (H - top - bottom) / Math.max(rows.length, 1);
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, W, H);
    rows.forEach(function (r, i) {
      r.forEach(function (v, j) {
        if (v === null) return;
        ctx.fillStyle = colour((v - lo) / (hi - lo));
        ctx.fillRect(left + j * cw, top + i * ch, Math.ceil(cw), Math.ceil(ch));
      });
    });
    ctx.strokeStyle = "#444";
    ctx.strokeRect(left, top, W - left - right, H - top - bottom);
    ctx.fillStyle = "#000";
    ctx.font = "12px sans-serif";
    ctx.textAlign = "right";
    const every = Math.max(1, Math.ceil(14 / ch));
    m.labels.forEach(function (label, i) {
      if (i % every === 0) ctx.fillText(label, left - 6, top + (i + 0.5) * ch + 4);
    });
    ctx.textAlign = "center";
    const tick = Math.max(1, Math.ceil(cols / 10));
    for (let j = 0; j < cols; j += tick) ctx.fillText(String(j + 1), left + (j + 0.5) * cw, H - bottom + 14);
    ctx.fillText(m.x_label, left + (W - left - right) / 2, H - 8);
    ctx.save();
    ctx.translate(14, top + (H - top - bottom) / 2);
    ctx.rotate(-Math.PI / 2);
    ctx.fillText(m.y_label, 0, 0);
    ctx.restore();
    const bar = W - right + 20, barHeight = H - top - bottom;
    for (let y = 0; y < barHeight; ++y) {
      ctx.fillStyle = colour(1 - y / barHeight);
      ctx.fillRect(bar, top + y, 14, 1);
    }
    ctx.fillStyle = "#000";
    ctx.textAlign = "left";
    const label = v => m.log ? Math.pow(10, v).toExponential(2) : v.toPrecision(3);
    ctx.fillText(label(hi), bar + 18, top + 10);
    ctx.fillText(label(lo), bar + 18, top + barHeight);
    canvas.addEventListener("mousemove", function (e) {
      const box = canvas.getBoundingClientRect();
      const j = Math.floor((e.clientX - box.left - left) / cw), i = Math.floor((e.clientY - box.top - top) / ch);
      const inside = i >= 0 && i < m.rows.length && j >= 0 && j < m.rows[i].length;
      readout.textContent = inside ? m.y_label + " " + m.labels[i] + ", " + m.x_label + " " + (j + 1) + ": " +
        (m.rows[i][j] === null ? "none" : m.rows[i][j].toPrecision(4)) : "\u00a0";
    });
  });
  document.body.setAttribute("data-heatmaps-drawn", String(maps.length));
})();
)JS";

// A section of the page: a heading and its body, or for a heatmap the data its canvas is drawn from.
struct Section {
    std::string heading, html;
    nlohmann::json heatmap;  // null unless a heatmap
    nlohmann::json chart;    // a chart's series, null for other sections
};

Section chart_section(const std::string& title, const std::string& x_label, const std::string& y_label,
                      const std::vector<Series>& series)
{
    nlohmann::json data = nlohmann::json::array();
    for (const auto& s : series) {
        nlohmann::json y = nlohmann::json::array();
        for (double v : s.y) y.push_back(std::isfinite(v) ? nlohmann::json(v) : nlohmann::json());
        data.push_back({{"name", s.name}, {"x", s.x}, {"y", std::move(y)}});
    }
    // The section's heading names the chart: the SVG goes without a title of its own.
    return {title, svg_chart("", x_label, y_label, series), nullptr, {{"title", title}, {"series", std::move(data)}}};
}

Section text_section(const std::string& heading, const std::string& text)
{
    return {heading, "<pre>" + escape_html(text) + "</pre>", nullptr, nullptr};
}

Section heatmap_section(const std::string& title, const std::string& x_label, const std::string& y_label,
                        const std::vector<std::string>& row_labels, const std::vector<std::vector<double>>& rows,
                        bool log_scale)
{
    LOOM_CHECK(row_labels.size() == rows.size(), "HtmlReport::add_heatmap", "got {} row labels for {} rows",
               row_labels.size(), rows.size());
    LOOM_CHECK(!rows.empty(), "HtmlReport::add_heatmap", "\"{}\" has no rows", title);
    nlohmann::json values = nlohmann::json::array();
    for (const auto& row : rows) {
        nlohmann::json r = nlohmann::json::array();
        for (double v : row) r.push_back(std::isfinite(v) ? nlohmann::json(v) : nlohmann::json());
        values.push_back(std::move(r));
    }
    return {title, {}, {{"x_label", x_label}, {"y_label", y_label}, {"labels", row_labels}, {"rows", std::move(values)},
                        {"log", log_scale}},
            nullptr};
}

constexpr const char* kStyle = R"CSS(
body { font-family: sans-serif; margin: 24px auto; max-width: 960px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 32px; border-bottom: 1px solid #ddd; }
pre { background: #f6f6f6; padding: 10px; overflow-x: auto; font-size: 12px; }
.readout { font-size: 12px; color: #555; min-height: 16px; }
.meta { color: #666; font-size: 13px; }
)CSS";

}  // namespace

// One recurrent layer's hook while a sampled step runs: the curves of the last backward.
struct LayerCapture {
    std::string name;  // the module's path in the model
    std::weak_ptr<nn::RecurrentLayer> layer;
    std::int64_t directions = 1, layers = 1;
    std::function<void(std::int64_t, std::int64_t, const nn::State&)> previous;  // the hook it chains to
    std::vector<std::vector<double>> curves;  // per layer * directions + direction, of the last backward
};

struct HtmlReport::Data {
    std::string title;
    std::vector<Section> own;  // added by hand
    // What fit() records.
    std::string summary;
    ThinnedCurve loss, lr;
    std::int64_t batches = 0, last_lr_step = -1;
    std::vector<Metrics> epochs;
    std::vector<std::string> parameter_names;
    struct Sample {
        std::int64_t step;
        std::vector<double> grad_norms;                  // per parameter
        std::vector<std::vector<std::vector<double>>> curves;  // per layer capture, per layer * direction
    };
    std::vector<Sample> samples;
    std::int64_t interval = 0;  // steps between samples; doubles as samples are thinned
    std::vector<std::shared_ptr<LayerCapture>> layers;
    bool hooked = false;

    void find_layers(nn::Module& module, const std::string& prefix)
    {
        for (const auto& [name, child] : module.named_children()) {
            const std::string path = prefix.empty() ? name : prefix + "." + name;
            if (auto layer = std::dynamic_pointer_cast<nn::RecurrentLayer>(child)) {
                auto capture = std::make_shared<LayerCapture>();
                capture->name = path;
                capture->layer = layer;
                capture->layers = layer->options.num_layers();
                capture->directions = layer->options.bidirectional() ? 2 : 1;
                layers.push_back(std::move(capture));
            }
            find_layers(*child, path);
        }
    }
    void hook_layers()
    {
        for (const auto& capture : layers) {
            auto layer = capture->layer.lock();
            if (!layer) continue;
            capture->curves.assign(std::size_t(capture->layers * capture->directions), {});
            capture->previous = layer->state_gradient_hook;
            layer->state_gradient_hook = [capture](std::int64_t l, std::int64_t d, const nn::State& grads) {
                if (capture->previous) capture->previous(l, d, grads);
                const Tensor norms = nn::step_norms(grads[0]).to(kFloat64).contiguous();
                capture->curves[std::size_t(l * capture->directions + d)] =
                    std::vector<double>(norms.data_ptr<double>(), norms.data_ptr<double>() + norms.numel());
            };
        }
        hooked = true;
    }
    void unhook_layers()
    {
        if (!hooked) return;
        for (const auto& capture : layers)
            if (auto layer = capture->layer.lock()) layer->state_gradient_hook = std::move(capture->previous);
        hooked = false;
    }
    bool sampled(std::int64_t step) const { return step == 1 || step % interval == 0; }
    // Keeps at most kSampledSteps samples: every other one goes and the interval doubles.
    void thin_samples()
    {
        if (samples.size() <= kSampledSteps) return;
        interval *= 2;
        std::erase_if(samples, [&](const Sample& s) { return !sampled(s.step); });
    }
};

HtmlReport::HtmlReport(std::string path, std::int64_t every) : path_(std::move(path)), every_(every), data_(std::make_unique<Data>())
{
    LOOM_CHECK(!path_.empty(), "HtmlReport", "expects a path for the .html file");
    LOOM_CHECK(every > 0, "HtmlReport", "expects every > 0 (optimizer steps between samples), got {}", every);
    data_->title = std::filesystem::path(path_).filename().string();
    data_->interval = every;
}

HtmlReport::~HtmlReport()
{
    try {
        data_->unhook_layers();
    } catch (...) {
    }
}

void HtmlReport::set_title(std::string title) { data_->title = std::move(title); }

void HtmlReport::add_text(std::string heading, std::string text)
{
    data_->own.push_back(text_section(heading, text));
}

void HtmlReport::add_chart(std::string title, std::string x_label, std::string y_label, std::vector<Series> series)
{
    data_->own.push_back(chart_section(title, x_label, y_label, series));  // nothing added when it throws
}

void HtmlReport::add_heatmap(std::string title, std::string x_label, std::string y_label,
                             std::vector<std::string> row_labels, std::vector<std::vector<double>> rows, bool log_scale)
{
    data_->own.push_back(heatmap_section(title, x_label, y_label, row_labels, rows, log_scale));
}

void HtmlReport::write() const
{
    const Data& d = *data_;
    // The curves first, then the gradients, then the settings and the tables.
    std::vector<Section> sections;
    const auto chart = [&](const std::string& title, const std::string& x_label, const std::string& y_label,
                           const std::vector<Series>& series) {
        if (has_finite_point(series)) sections.push_back(chart_section(title, x_label, y_label, series));
    };
    if (!d.loss.empty()) chart("Training loss per mini-batch", "mini-batch", "loss", {d.loss.series("loss")});
    if (!d.epochs.empty()) {
        std::vector<Series> losses, others;
        for (const auto& [name, _] : d.epochs.front()) {
            if (name == "epoch" || name == "seconds" || name == "lr") continue;
            Series s{name, {}, {}};
            for (const auto& row : d.epochs)
                if (row.contains(name)) s.x.push_back(row.at("epoch")), s.y.push_back(row.at(name));
            (name.ends_with("loss") ? losses : others).push_back(std::move(s));
        }
        chart("Loss per epoch", "epoch", "loss", losses);
        chart("Metrics per epoch", "epoch", "value", others);
    }
    if (!d.samples.empty()) {
        std::vector<Series> norms;
        for (std::size_t k = 0; k < d.parameter_names.size(); ++k) {
            Series s{d.parameter_names[k], {}, {}};
            for (const auto& sample : d.samples) {
                s.x.push_back(double(sample.step));
                s.y.push_back(sample.grad_norms[k]);
            }
            s.y = log10_of(s.y);
            norms.push_back(std::move(s));
        }
        chart("Gradient norm per parameter", "optimizer step", "log10 |dL/dw|", norms);
    }
    for (std::size_t c = 0; c < d.layers.size(); ++c) {
        const auto& capture = *d.layers[c];
        for (std::int64_t k = 0; k < capture.layers * capture.directions; ++k) {
            std::vector<std::string> labels;
            std::vector<std::vector<double>> rows;
            for (const auto& sample : d.samples) {
                const auto& curve = sample.curves[c][std::size_t(k)];
                if (curve.empty()) continue;
                labels.push_back(std::to_string(sample.step));
                rows.push_back(curve);
            }
            if (rows.empty()) continue;
            std::string title = fmt::format("|dL/dh_t| in {}, layer {}", capture.name, k / capture.directions);
            if (capture.directions == 2) title += k % 2 ? ", backward direction" : ", forward direction";
            sections.push_back(heatmap_section(title, "time step t", "optimizer step", labels, rows, true));
        }
    }
    if (!d.lr.empty()) chart("Learning rate", "optimizer step", "learning rate", {d.lr.series("lr")});
    if (!d.epochs.empty()) {
        std::string table;
        for (const auto& [name, _] : d.epochs.front()) table += fmt::format("{:>14}", name);
        table += "\n";
        for (const auto& row : d.epochs) {
            for (const auto& [_, value] : row) table += fmt::format("{:>14.6g}", value);
            table += "\n";
        }
        sections.push_back(text_section("Epochs", table));
    }
    if (!d.summary.empty()) sections.push_back(text_section("Model", d.summary));
    sections.insert(sections.end(), d.own.begin(), d.own.end());

    std::string body;
    nlohmann::json maps = nlohmann::json::array(), charts = nlohmann::json::array();
    for (const auto& s : sections) {
        if (!s.chart.is_null()) charts.push_back(s.chart);
        body += "<section>\n<h2>" + escape_html(s.heading) + "</h2>\n";
        if (!s.heatmap.is_null()) {
            const std::size_t k = maps.size();
            const std::size_t rows = s.heatmap.at("rows").size();
            const std::size_t height = std::clamp<std::size_t>(rows * 8, 160, 560) + 52;
            body += fmt::format("<canvas id=\"heatmap-{0}\" width=\"900\" height=\"{1}\"></canvas>\n"
                                "<div class=\"readout\" id=\"readout-{0}\">&nbsp;</div>\n",
                                k, height);
            maps.push_back(s.heatmap);
        } else {
            body += s.html;
        }
        body += "</section>\n";
    }
    const std::string page = fmt::format(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{0}</title>\n<style>{1}</style>\n"
        "</head>\n<body>\n<h1>{0}</h1>\n{2}<script type=\"application/json\" id=\"heatmap-data\">{3}</script>\n"
        "<script type=\"application/json\" id=\"chart-data\">{4}</script>\n<script>{5}</script>\n</body>\n</html>\n",
        escape_html(d.title), kStyle, body, script_json(maps), script_json(charts), kHeatmapScript);
    loom::detail::write_file_atomically(path_, page, "HtmlReport");
}

// ---- the callback ----

void HtmlReport::on_train_begin(FitState& state)
{
    if (!state.main_process) return;
    data_->summary = state.model.summary();
    data_->layers.clear();
    data_->find_layers(state.model, "");
    data_->parameter_names.clear();
    for (const auto& [name, _] : state.model.named_parameters()) data_->parameter_names.push_back(name);
}

void HtmlReport::on_batch_begin(FitState& state)
{
    if (state.main_process && !data_->hooked && data_->sampled(state.step + 1)) data_->hook_layers();
}

void HtmlReport::after_backward(FitState& state)
{
    if (!state.main_process) return;
    const std::int64_t step = state.step + 1;  // the step about to be taken
    if (!data_->sampled(step)) return;
    Data::Sample sample{step, {}, {}};
    for (const auto& row : gradient_report(state.model.named_parameters()).rows) sample.grad_norms.push_back(row.grad_norm);
    for (const auto& capture : data_->layers) sample.curves.push_back(capture->curves);
    data_->unhook_layers();
    data_->samples.push_back(std::move(sample));
    data_->thin_samples();
}

void HtmlReport::on_batch_end(FitState& state)
{
    if (!state.main_process || !state.loss.defined()) return;
    data_->loss.add(double(++data_->batches), state.loss.item<double>());
    if (state.step != data_->last_lr_step) {
        data_->lr.add(double(state.step), state.optimizer.lr());
        data_->last_lr_step = state.step;
    }
}

void HtmlReport::on_epoch_end(FitState& state)
{
    if (!state.main_process) return;
    data_->epochs.push_back(state.epoch_metrics);
    write();
}

void HtmlReport::on_train_end(FitState& state)
{
    if (!state.main_process) return;
    data_->unhook_layers();
    write();
}

}  // namespace loom::train
