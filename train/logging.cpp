// The progress line, the metrics log and the SVG charts: what fit's callbacks print and write.
#include "train.hpp"

#include "../core/files_internal.hpp"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

namespace loom::train {

// ---- progress ----

Progress::Progress(std::string label, std::int64_t total, std::FILE* out)
    : label_(std::move(label)), total_(total), out_(out), terminal_(::isatty(::fileno(out)) != 0),
      start_(std::chrono::steady_clock::now()), last_draw_(start_)
{
}

double Progress::seconds() const
{
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

std::string Progress::line(std::int64_t done, const Metrics& metrics) const
{
    const double elapsed = seconds(), rate = done > 0 ? double(done) / elapsed : 0;
    constexpr int width = 24;
    const int filled = total_ > 0 ? int(width * double(done) / double(total_)) : width;
    std::string bar(std::size_t(filled), '=');
    if (filled < width) bar += '>' + std::string(std::size_t(width - filled - 1), ' ');
    std::string text = fmt::format("{} [{}] {}/{}", label_, bar, done, total_);
    for (const auto& [name, value] : metrics) text += fmt::format(" {} {:.4g}", name, value);
    const auto eta = rate > 0 ? std::int64_t(double(total_ - done) / rate) : 0;
    text += fmt::format(" | {:.1f} it/s | ETA {}:{:02}", rate, eta / 60, eta % 60);
    return text;
}

double Metrics::at(std::string_view name) const
{
    for (const auto& [n, v] : entries_)
        if (n == name) return v;
    std::string known;
    for (const auto& [n, v] : entries_) known += (known.empty() ? "" : ", ") + n;
    fail("Metrics", "no metric \"{}\" (there are: {})", name, known);
}

bool Metrics::contains(std::string_view name) const
{
    return std::any_of(entries_.begin(), entries_.end(), [&](const Entry& e) { return e.first == name; });
}

void Progress::update(std::int64_t done, const Metrics& metrics)
{
    const auto now = std::chrono::steady_clock::now();
    if (!terminal_ || now - last_draw_ < std::chrono::milliseconds(100)) return;
    last_draw_ = now;
    std::fprintf(out_, "\r%s\033[K", line(done, metrics).c_str());
    std::fflush(out_);
}

void Progress::finish(const Metrics& metrics)
{
    std::string text = fmt::format("{} {}/{}", label_, total_, total_);
    for (const auto& [name, value] : metrics) text += fmt::format(" {} {:.4g}", name, value);
    text += fmt::format(" | {:.1f}s", seconds());
    std::fprintf(out_, "%s%s\n", terminal_ ? "\r\033[K" : "", text.c_str());
    std::fflush(out_);
}

// ---- metrics log ----

MetricsLog::MetricsLog(const std::string& path, bool append)
    : path_(path), csv_(path.size() >= 4 && path.substr(path.size() - 4) == ".csv"),
      wrote_header_(append && std::filesystem::exists(path) && std::filesystem::file_size(path) > 0)
{
    out_.open(path, append ? std::ios::app : std::ios::trunc);
    LOOM_CHECK(out_.good(), "MetricsLog", "cannot open {} for writing", path);
}

void MetricsLog::write(const Metrics& row)
{
    if (csv_) {
        if (!wrote_header_) {
            std::string header;
            for (const auto& [name, value] : row) header += (header.empty() ? "" : ",") + name;
            out_ << header << '\n';
            wrote_header_ = true;
        }
        bool first = true;
        for (const auto& [name, value] : row) {
            out_ << (first ? "" : ",") << fmt::format("{}", value);
            first = false;
        }
        out_ << '\n';
    } else {
        nlohmann::ordered_json j;
        for (const auto& [name, value] : row) j[name] = value;
        out_ << j.dump() << '\n';
    }
    out_.flush();
    LOOM_CHECK(out_.good(), "MetricsLog", "writing {} failed", path_);
}

std::vector<std::map<std::string, double>> read_metrics(const std::string& path)
{
    std::ifstream in(path);
    LOOM_CHECK(in.good(), "read_metrics", "cannot open {}", path);
    std::vector<std::map<std::string, double>> rows;
    std::string text;
    for (int n = 1; std::getline(in, text); ++n) {
        if (text.empty()) continue;
        std::map<std::string, double> row;
        try {
            const nlohmann::json parsed = nlohmann::json::parse(text);  // must outlive the loop over its items
            LOOM_CHECK(parsed.is_object(), "read_metrics", "{} line {} is not a JSON object", path, n);
            for (const auto& [k, v] : parsed.items())
                if (v.is_number()) row[k] = v.get<double>();
        } catch (const nlohmann::json::exception& e) {
            fail("read_metrics", "{} line {} is not a JSON object ({})", path, n, e.what());
        }
        rows.push_back(std::move(row));
    }
    return rows;
}

// ---- charts ----

namespace {

// About five round tick values covering [lo, hi].
std::vector<double> ticks(double lo, double hi)
{
    const double span = hi - lo, raw = span / 5, magnitude = std::pow(10, std::floor(std::log10(raw)));
    const double step = raw / magnitude < 2 ? 2 * magnitude : raw / magnitude < 5 ? 5 * magnitude : 10 * magnitude;
    std::vector<double> out;
    for (double v = std::ceil(lo / step) * step; v <= hi + 1e-9 * span; v += step) out.push_back(v);
    return out;
}

std::string escape(const std::string& s)
{
    std::string out;
    for (char c : s) out += c == '<' ? "&lt;" : c == '>' ? "&gt;" : c == '&' ? "&amp;" : std::string(1, c);
    return out;
}

}  // namespace

namespace {

// svg_chart's and plot_svg's chart; errors name `op`, the function called.
std::string render_chart(const char* op, const std::string& title, const std::string& x_label,
                         const std::string& y_label, const std::vector<Series>& series)
{
    double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
    for (const auto& s : series) {
        LOOM_CHECK(s.x.size() == s.y.size(), op, "series \"{}\" has {} x values and {} y values", s.name,
                   s.x.size(), s.y.size());
        for (std::size_t i = 0; i < s.x.size(); ++i) {
            if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) continue;
            x0 = std::min(x0, s.x[i]), x1 = std::max(x1, s.x[i]), y0 = std::min(y0, s.y[i]), y1 = std::max(y1, s.y[i]);
        }
    }
    LOOM_CHECK(std::isfinite(x0), op, "nothing to plot in \"{}\": no series has a finite point", title);
    if (x1 == x0) x1 = x0 + 1;
    if (y1 == y0) y1 = y0 + 1;
    const double pad = (y1 - y0) * 0.05;
    y0 -= pad, y1 += pad;
    // Up to six series are named inside the plot, top right; more in three columns below it.
    const bool legend_below = series.size() > 6;
    const double legend_rows = legend_below ? std::ceil(double(series.size()) / 3) : 0;
    const double W = 720, plot_bottom = 420, H = plot_bottom + 16 * legend_rows, left = 70, right = 20, top = 40,
                 bottom = 50 + H - plot_bottom;
    const auto px = [&](double x) { return left + (x - x0) / (x1 - x0) * (W - left - right); };
    const auto py = [&](double y) { return H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom); };
    static const char* colours[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"};
    std::string svg = fmt::format(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" font-family=\"sans-serif\" "
        "font-size=\"12\">\n<rect width=\"{0}\" height=\"{1}\" fill=\"white\"/>\n"
        "<text x=\"{2}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">{3}</text>\n",
        W, H, W / 2, escape(title));
    for (double t : ticks(x0, x1))
        svg += fmt::format("<line x1=\"{0:.1f}\" y1=\"{1}\" x2=\"{0:.1f}\" y2=\"{2}\" stroke=\"#ddd\"/>"
                           "<text x=\"{0:.1f}\" y=\"{3}\" text-anchor=\"middle\">{4:g}</text>\n",
                           px(t), top, H - bottom, H - bottom + 16, t);
    for (double t : ticks(y0, y1))
        svg += fmt::format("<line x1=\"{0}\" y1=\"{1:.1f}\" x2=\"{2}\" y2=\"{1:.1f}\" stroke=\"#ddd\"/>"
                           "<text x=\"{3}\" y=\"{4:.1f}\" text-anchor=\"end\">{5:g}</text>\n",
                           left, py(t), W - right, left - 6, py(t) + 4, t);
    svg += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#444\"/>\n", left, top,
                       W - left - right, H - top - bottom);
    svg += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", (left + W - right) / 2, plot_bottom - 12,
                       escape(x_label));
    svg += fmt::format("<text transform=\"translate(16,{}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n",
                       (top + H - bottom) / 2, escape(y_label));
    for (std::size_t k = 0; k < series.size(); ++k) {
        const auto& s = series[k];
        std::string points;
        for (std::size_t i = 0; i < s.x.size(); ++i)
            if (std::isfinite(s.x[i]) && std::isfinite(s.y[i])) points += fmt::format("{:.1f},{:.1f} ", px(s.x[i]), py(s.y[i]));
        const char* colour = colours[k % 6];
        svg += fmt::format("<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.8\" points=\"{}\"/>\n", colour, points);
        const double legend_x = legend_below ? left + 210 * double(k % 3) : W - right - 150,
                     legend_y = legend_below ? plot_bottom + 16 * double(k / 3) : top + 12 + 16 * double(k);
        svg += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"14\" height=\"3\" fill=\"{}\"/>"
                           "<text x=\"{}\" y=\"{}\">{}</text>\n",
                           legend_x, legend_y, colour, legend_x + 20, legend_y + 4, escape(s.name));
    }
    svg += "</svg>\n";
    return svg;
}

}  // namespace

std::string svg_chart(const std::string& title, const std::string& x_label, const std::string& y_label,
                      const std::vector<Series>& series)
{
    return render_chart("svg_chart", title, x_label, y_label, series);
}

void plot_svg(const std::string& path, const std::string& title, const std::string& x_label, const std::string& y_label,
              const std::vector<Series>& series)
{
    detail::write_file_atomically(path, render_chart("plot_svg", title, x_label, y_label, series), "plot_svg");
}

}  // namespace loom::train
