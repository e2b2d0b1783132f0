#include "train.hpp"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <numeric>

#include "../autograd/ops.hpp"
#include "../autograd/tape.hpp"
#include "../nn/safetensors.hpp"
#include "../optim/clip.hpp"

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

void plot_svg(const std::string& path, const std::string& title, const std::string& x_label, const std::string& y_label,
              const std::vector<Series>& series)
{
    double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
    for (const auto& s : series) {
        LOOM_CHECK(s.x.size() == s.y.size(), "plot_svg", "series \"{}\" has {} x values and {} y values", s.name,
                   s.x.size(), s.y.size());
        for (std::size_t i = 0; i < s.x.size(); ++i) {
            if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) continue;
            x0 = std::min(x0, s.x[i]), x1 = std::max(x1, s.x[i]), y0 = std::min(y0, s.y[i]), y1 = std::max(y1, s.y[i]);
        }
    }
    LOOM_CHECK(std::isfinite(x0), "plot_svg", "nothing to plot in {}", path);
    if (x1 == x0) x1 = x0 + 1;
    if (y1 == y0) y1 = y0 + 1;
    const double pad = (y1 - y0) * 0.05;
    y0 -= pad, y1 += pad;
    const double W = 720, H = 420, left = 70, right = 20, top = 40, bottom = 50;
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
    svg += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", (left + W - right) / 2, H - 12,
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
        svg += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"14\" height=\"3\" fill=\"{}\"/>"
                           "<text x=\"{}\" y=\"{}\">{}</text>\n",
                           W - right - 150, top + 12 + 16 * double(k), colour, W - right - 130, top + 16 + 16 * double(k),
                           escape(s.name));
    }
    svg += "</svg>\n";
    const std::string temp = path + ".tmp";
    {
        std::ofstream out(temp, std::ios::trunc);
        out << svg;
        LOOM_CHECK(out.good(), "plot_svg", "cannot write {}", temp);
    }
    std::filesystem::rename(temp, path);
}

// ---- sequences ----

std::pair<Tensor, Tensor> pad_sequences(const std::vector<std::vector<std::int64_t>>& sequences, std::int64_t pad)
{
    LOOM_CHECK(!sequences.empty(), "pad_sequences", "expects at least one sequence");
    std::size_t T = 0;
    for (std::size_t b = 0; b < sequences.size(); ++b) {
        LOOM_CHECK(!sequences[b].empty(), "pad_sequences", "sequence {} is empty", b);
        T = std::max(T, sequences[b].size());
    }
    const auto B = static_cast<std::int64_t>(sequences.size());
    Tensor padded = full({static_cast<std::int64_t>(T), B}, double(pad), kInt64), lengths = empty({B}, kInt64);
    std::int64_t *p = padded.data_ptr<std::int64_t>(), *l = lengths.data_ptr<std::int64_t>();
    for (std::int64_t b = 0; b < B; ++b) {
        l[b] = static_cast<std::int64_t>(sequences[b].size());
        for (std::size_t t = 0; t < sequences[b].size(); ++t) p[std::int64_t(t) * B + b] = sequences[b][t];
    }
    return {padded, lengths};
}

std::pair<Tensor, Tensor> pad_sequences(const std::vector<Tensor>& sequences)
{
    LOOM_CHECK(!sequences.empty(), "pad_sequences", "expects at least one sequence");
    std::int64_t T = 0;
    const Tensor& first = sequences[0];
    for (std::size_t b = 0; b < sequences.size(); ++b) {
        const Tensor& s = sequences[b];
        LOOM_CHECK(s.dim() == 2 && s.size(0) > 0 && s.size(1) == first.size(1) && s.dtype() == first.dtype(),
                   "pad_sequences", "sequence {} has shape {} and dtype {}; expected [len > 0, {}] and {}", b, s.sizes(),
                   s.dtype(), first.size(1), first.dtype());
        T = std::max(T, s.size(0));
    }
    const auto B = static_cast<std::int64_t>(sequences.size());
    Tensor padded = zeros({T, B, first.size(1)}, first.dtype()), lengths = empty({B}, kInt64);
    NoGradGuard no_grad;
    for (std::int64_t b = 0; b < B; ++b) {
        lengths.data_ptr<std::int64_t>()[b] = sequences[b].size(0);
        padded.select(1, b).narrow(0, 0, sequences[b].size(0)).copy_(sequences[b]);
    }
    return {padded, lengths};
}

std::vector<std::vector<std::int64_t>> minibatches(std::int64_t n, std::int64_t batch, Generator* gen)
{
    LOOM_CHECK(n > 0 && batch > 0, "minibatches", "expects n > 0 and batch > 0, got {} and {}", n, batch);
    std::vector<std::int64_t> order(static_cast<std::size_t>(n));
    std::iota(order.begin(), order.end(), 0);
    if (gen)  // Fisher-Yates with our generator, so the order is the same on every platform
        for (std::int64_t i = n - 1; i > 0; --i) std::swap(order[i], order[gen->randint(0, i + 1)]);
    std::vector<std::vector<std::int64_t>> out;
    for (std::int64_t at = 0; at < n; at += batch)
        out.emplace_back(order.begin() + at, order.begin() + std::min(n, at + batch));
    return out;
}

// ---- fit ----

std::pair<Dataset, Dataset> split(const Dataset& data, double fraction, Generator& gen)
{
    LOOM_CHECK(fraction > 0 && fraction < 1, "split", "expects a fraction in (0, 1), got {}", fraction);
    const auto order = std::make_shared<std::vector<std::int64_t>>(minibatches(data.size, data.size, &gen).at(0));
    const auto n_val = std::max<std::int64_t>(1, std::int64_t(std::round(double(data.size) * fraction)));
    LOOM_CHECK(n_val < data.size, "split", "a validation fraction of {} leaves no training data out of {}", fraction,
               data.size);
    const auto view = [order, get = data.get](std::int64_t offset, std::int64_t size) {
        return Dataset{size, [order, get, offset](const std::vector<std::int64_t>& idx) {
                           std::vector<std::int64_t> mapped;
                           for (auto i : idx) mapped.push_back((*order)[offset + i]);
                           return get(mapped);
                       }};
    };
    return {view(0, data.size - n_val), view(data.size - n_val, n_val)};
}

namespace {
double correct_predictions(const Tensor& output, const Tensor& target)
{
    return eq(output.argmax(-1), target).sum().item<double>();
}
}  // namespace

Metrics evaluate(nn::Module& model, const ForwardFn& forward, const LossFn& loss, const Dataset& data,
                 std::int64_t batch_size, bool accuracy)
{
    NoGradGuard no_grad;
    const bool was_training = model.is_training();
    model.eval();
    double loss_sum = 0, correct = 0;
    std::int64_t seen = 0;
    for (const auto& idx : minibatches(data.size, batch_size)) {
        const Batch b = data.get(idx);
        const Tensor out = forward(b);
        loss_sum += loss(out, b).item<double>() * double(idx.size());
        if (accuracy) correct += correct_predictions(out, b.target);
        seen += static_cast<std::int64_t>(idx.size());
    }
    model.train(was_training);
    Metrics m = {{"loss", loss_sum / double(seen)}};
    if (accuracy) m.emplace_back("accuracy", correct / double(seen));
    return m;
}

NamedTensorMap snapshot(const nn::NamedTensors& parameters)
{
    NoGradGuard no_grad;
    NamedTensorMap copies;
    for (const auto& [name, p] : parameters) copies[name] = p.detach().clone();
    return copies;
}

GradientReport gradient_report(const nn::NamedTensors& parameters, const NamedTensorMap& before_step)
{
    NoGradGuard no_grad;
    const auto norm_of = [](const Tensor& t) { return t.to(kFloat64).norm().item<double>(); };
    GradientReport report;
    for (const auto& [name, p] : parameters) {
        ParameterReport row;
        row.name = name;
        row.weight_norm = norm_of(p);
        const Tensor g = p.grad();
        if (g.defined()) row.grad_norm = norm_of(g);
        if (!before_step.empty()) {
            const auto it = before_step.find(name);
            LOOM_CHECK(it != before_step.end(), "gradient_report",
                       "before_step has no weights named \"{}\"; take it with snapshot() of the same parameters", name);
            LOOM_CHECK(it->second.sizes() == p.sizes(), "gradient_report",
                       "before_step holds \"{}\" of shape {}, but the parameter has shape {}", name, it->second.sizes(),
                       p.sizes());
            const Tensor before = it->second.to(kFloat64);
            row.update_ratio = norm_of(p.to(kFloat64) - before) / norm_of(before);
        }
        report.rows.push_back(std::move(row));
    }
    return report;
}

std::string GradientReport::table() const
{
    std::size_t width = 9;
    for (const auto& r : rows) width = std::max(width, r.name.size());
    std::string out = fmt::format("{:<{}}  {:>10}  {:>10}  {:>12}\n", "parameter", width, "|grad|", "|weight|",
                                  "update/weight");
    for (const auto& r : rows)
        out += fmt::format("{:<{}}  {:>10.4g}  {:>10.4g}  {:>12}\n", r.name, width, r.grad_norm, r.weight_norm,
                           std::isnan(r.update_ratio) ? std::string("-") : fmt::format("{:.3g}", r.update_ratio));
    return out;
}

Metrics GradientReport::metrics() const
{
    Metrics m;
    for (const auto& r : rows) {
        m.emplace_back("grad_norm/" + r.name, r.grad_norm);
        m.emplace_back("weight_norm/" + r.name, r.weight_norm);
        if (!std::isnan(r.update_ratio)) m.emplace_back("update_ratio/" + r.name, r.update_ratio);
    }
    return m;
}

History fit(nn::Module& model, optim::Optimizer& optimizer, const ForwardFn& forward, const LossFn& loss,
            const Dataset& train_data, const Dataset& validation, const FitOptions& o, optim::Schedule* schedule)
{
    LOOM_CHECK(train_data.size > 0 && train_data.get, "fit", "the training set is empty");
    LOOM_CHECK(o.epochs > 0 && o.batch_size > 0, "fit", "expects epochs > 0 and batch_size > 0, got {} and {}",
               o.epochs, o.batch_size);
    const bool validating = validation.size > 0;
    LOOM_CHECK(validating || (o.early_stopping == 0 && o.best_checkpoint.empty()), "fit",
               "early stopping and a best-model checkpoint need validation data");
    LOOM_CHECK(validating || !schedule || !schedule->needs_metric(), "fit",
               "the schedule {} is stepped with the validation loss, but there is no validation data",
               schedule ? schedule->name() : "");
    const auto* metric_schedule = dynamic_cast<const optim::MetricScheduler*>(schedule);
    LOOM_CHECK(!metric_schedule || metric_schedule->lower_is_better(), "fit",
               "the schedule {} waits for its metric to rise (Mode::Max), but fit steps it with the validation loss, "
               "which should fall; build it with Mode::Min",
               schedule ? schedule->name() : "");
    LOOM_CHECK(o.gradient_report_every >= 0, "fit", "expects gradient_report_every >= 0, got {}", o.gradient_report_every);
    LOOM_CHECK(o.gradient_report_every == 0 || !o.gradient_log.empty(), "fit",
               "gradient_report_every is {} but gradient_log is empty; name a .jsonl or .csv file for the reports",
               o.gradient_report_every);
    const Parallel& par = o.parallel;
    const bool parallel = par.world_size > 1, main_process = par.rank == 0, verbose = o.verbose && main_process;
    LOOM_CHECK(!parallel || (par.shard && par.average_gradients && par.sum), "fit",
               "FitOptions::parallel says {} processes but lacks its functions; fill it with dist::data_parallel()",
               par.world_size);
    Generator gen(o.seed);
    std::unique_ptr<MetricsLog> log = o.log.empty() || !main_process ? nullptr : std::make_unique<MetricsLog>(o.log);
    std::unique_ptr<MetricsLog> gradient_log =
        o.gradient_report_every > 0 && main_process ? std::make_unique<MetricsLog>(o.gradient_log) : nullptr;
    std::int64_t steps = 0;
    History history;
    NamedTensorMap best_state;
    std::int64_t since_best = 0;
    const double ln2 = std::log(2.0);
    for (std::int64_t epoch = 1; epoch <= o.epochs; ++epoch) {
        model.train();
        std::vector<std::vector<std::int64_t>> batches;
        if (parallel) {  // this process's shard of the epoch's order, in batches of batch_size
            const auto mine = par.shard(train_data.size, o.shuffle, o.seed, epoch);
            for (std::size_t at = 0; at < mine.size(); at += static_cast<std::size_t>(o.batch_size))
                batches.emplace_back(mine.begin() + std::ptrdiff_t(at),
                                     mine.begin() + std::ptrdiff_t(std::min(mine.size(), at + std::size_t(o.batch_size))));
        } else {
            batches = minibatches(train_data.size, o.batch_size, o.shuffle ? &gen : nullptr);
        }
        Progress progress(fmt::format("epoch {}/{}", epoch, o.epochs), static_cast<std::int64_t>(batches.size()));
        double loss_sum = 0, correct = 0;
        std::int64_t seen = 0;
        for (std::size_t k = 0; k < batches.size(); ++k) {
            const Batch b = train_data.get(batches[k]);
            const Tensor out = forward(b);
            const Tensor l = loss(out, b);
            optimizer.zero_grad();
            l.backward();
            if (parallel) par.average_gradients(double(batches[k].size()));
            if (o.clip_grad_norm > 0) nn::utils::clip_grad_norm(optimizer.parameters(), o.clip_grad_norm);
            ++steps;
            const bool report = gradient_log && steps % o.gradient_report_every == 0;
            const NamedTensorMap before = report ? snapshot(model.named_parameters()) : NamedTensorMap();
            optimizer.step();
            if (report) {
                Metrics row = {{"step", double(steps)}, {"epoch", double(epoch)}};
                for (const auto& entry : gradient_report(model.named_parameters(), before).metrics())
                    row.emplace_back(entry.first, entry.second);
                gradient_log->write(row);
            }
            loss_sum += l.item<double>() * double(batches[k].size());
            if (o.accuracy) {
                NoGradGuard no_grad;
                correct += correct_predictions(out, b.target);
            }
            seen += static_cast<std::int64_t>(batches[k].size());
            if (verbose) progress.update(static_cast<std::int64_t>(k + 1), {{"loss", loss_sum / double(seen)}});
        }
        if (parallel) {
            loss_sum = par.sum(loss_sum);
            correct = par.sum(correct);
            seen = static_cast<std::int64_t>(par.sum(double(seen)));
        }
        Metrics row = {{"epoch", double(epoch)}, {"train_loss", loss_sum / double(seen)}};
        if (o.accuracy) row.emplace_back("train_accuracy", correct / double(seen));
        if (o.bits_per_character) row.emplace_back("train_bpc", loss_sum / double(seen) / ln2);
        if (validating) {
            const Metrics v = evaluate(model, forward, loss, validation, o.batch_size, o.accuracy);
            const double val_loss = v.at("loss");
            row.emplace_back("val_loss", val_loss);
            if (o.accuracy) row.emplace_back("val_accuracy", v.at("accuracy"));
            if (o.bits_per_character) row.emplace_back("val_bpc", val_loss / ln2);
            if (val_loss < history.best_val_loss) {
                history.best_val_loss = val_loss;
                history.best_epoch = epoch;
                since_best = 0;
                best_state.clear();
                for (const auto& [name, t] : model.state_dict()) best_state[name] = t.clone();
                if (!o.best_checkpoint.empty() && main_process) save(o.best_checkpoint, best_state, {{"epoch", std::to_string(epoch)}});
            } else {
                ++since_best;
            }
        }
        row.emplace_back("lr", optimizer.lr());
        row.emplace_back("seconds", progress.seconds());
        if (verbose) progress.finish(Metrics(row.begin() + 1, row.end() - 1));
        if (log) log->write(row);
        history.epochs.push_back(row);
        if (schedule) schedule->epoch_end(validating ? std::optional<double>(row.at("val_loss")) : std::nullopt);
        if (o.early_stopping > 0 && since_best >= o.early_stopping) {
            history.stopped_early = true;
            if (verbose) std::printf("early stop: no better validation loss for %lld epochs\n", (long long)since_best);
            break;
        }
    }
    if (validating && o.restore_best && !best_state.empty()) model.load_state_dict(best_state);
    return history;
}

}  // namespace loom::train
