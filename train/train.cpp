// fit and its built-in callbacks, evaluation, the gradient report, padding and batching.
#include "train.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "../autograd/ops.hpp"
#include "../autograd/tape.hpp"
#include "../nn/safetensors.hpp"
#include "../optim/clip.hpp"

namespace loom::train {

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

namespace {

// The built-in callbacks the options ask for, then the user's.
std::vector<std::shared_ptr<Callback>> callbacks_for(const FitOptions& o)
{
    std::vector<std::shared_ptr<Callback>> all;
    if (o.verbose) all.push_back(std::make_shared<ProgressLine>());
    if (!o.log.empty()) all.push_back(std::make_shared<MetricsLogger>(o.log));
    if (o.gradient_report_every > 0)
        all.push_back(std::make_shared<GradientReportLogger>(o.gradient_report_every, o.gradient_log));
    if (!o.best_checkpoint.empty() || o.restore_best)
        all.push_back(std::make_shared<BestModel>(o.best_checkpoint, o.restore_best));
    if (o.early_stopping > 0) all.push_back(std::make_shared<EarlyStopping>(o.early_stopping, o.verbose));
    for (const auto& c : o.callbacks) {
        LOOM_CHECK(c != nullptr, "fit", "FitOptions::callbacks holds a null callback");
        all.push_back(c);
    }
    return all;
}

void check_options(const Dataset& train_data, const Dataset& validation, const FitOptions& o, optim::Schedule* schedule)
{
    LOOM_CHECK(train_data.size > 0 && train_data.get, "fit", "the training set is empty");
    LOOM_CHECK(o.epochs > 0 && o.batch_size > 0, "fit", "expects epochs > 0 and batch_size > 0, got {} and {}",
               o.epochs, o.batch_size);
    LOOM_CHECK(o.accumulate >= 1, "fit", "expects accumulate >= 1 (mini-batches per optimizer step), got {}",
               o.accumulate);
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
    LOOM_CHECK(par.world_size <= 1 || (par.shard && par.average_gradients && par.sum), "fit",
               "FitOptions::parallel says {} processes but lacks its functions; fill it with dist::data_parallel()",
               par.world_size);
}

// This process's mini-batches of the epoch: its shard of the epoch's order across processes.
std::vector<std::vector<std::int64_t>> epoch_batches(const Dataset& data, const FitOptions& o, std::int64_t epoch,
                                                     Generator& gen)
{
    const Parallel& par = o.parallel;
    if (par.world_size <= 1) return minibatches(data.size, o.batch_size, o.shuffle ? &gen : nullptr);
    std::vector<std::vector<std::int64_t>> batches;
    const auto mine = par.shard(data.size, o.shuffle, o.seed, epoch);
    for (std::size_t at = 0; at < mine.size(); at += static_cast<std::size_t>(o.batch_size))
        batches.emplace_back(mine.begin() + std::ptrdiff_t(at),
                             mine.begin() + std::ptrdiff_t(std::min(mine.size(), at + std::size_t(o.batch_size))));
    return batches;
}

struct Loop {
    const ForwardFn& forward;
    const LossFn& loss;
    const FitOptions& o;
    std::vector<std::shared_ptr<Callback>> callbacks;
    FitState& state;

    template <class Event> void notify(Event event)
    {
        for (const auto& c : callbacks) ((*c).*event)(state);
    }

    // One epoch over this process's mini-batches; returns the row's training entries.
    Metrics train_epoch(const std::vector<std::vector<std::int64_t>>& batches, const Dataset& data)
    {
        const Parallel& par = o.parallel;
        double loss_sum = 0, correct = 0;
        std::int64_t seen = 0, group_examples = 0;
        for (std::size_t k = 0; k < batches.size(); ++k) {
            const std::size_t group_start = k - k % static_cast<std::size_t>(o.accumulate);
            const std::size_t group_size = std::min<std::size_t>(static_cast<std::size_t>(o.accumulate), batches.size() - group_start);
            const bool group_ends = k + 1 == group_start + group_size;
            const Batch b = data.get(batches[k]);
            state.batch = static_cast<std::int64_t>(k);
            state.data = &b;
            state.output = Tensor();
            state.loss = Tensor();
            notify(&Callback::on_batch_begin);
            if (k == group_start) {
                state.optimizer.zero_grad();
                group_examples = 0;
            }
            const Tensor out = forward(b);
            const Tensor l = loss(out, b);
            group_examples += static_cast<std::int64_t>(batches[k].size());
            if (group_ends && par.world_size > 1 && par.before_backward) par.before_backward(double(group_examples));
            (group_size == 1 ? l : l / double(group_size)).backward();
            state.output = out;
            state.loss = l;
            if (group_ends) {
                if (par.world_size > 1) par.average_gradients(double(group_examples));
                notify(&Callback::after_backward);
                if (o.clip_grad_norm > 0) nn::utils::clip_grad_norm(state.optimizer.parameters(), o.clip_grad_norm);
                state.optimizer.step();
                ++state.step;
            }
            loss_sum += l.item<double>() * double(batches[k].size());
            if (o.accuracy) {
                NoGradGuard no_grad;
                correct += correct_predictions(out, b.target);
            }
            seen += static_cast<std::int64_t>(batches[k].size());
            state.running_loss = loss_sum / double(seen);
            notify(&Callback::on_batch_end);
            state.data = nullptr;
            if (state.stop_training) break;
        }
        if (par.world_size > 1) {
            loss_sum = par.sum(loss_sum);
            correct = par.sum(correct);
            seen = static_cast<std::int64_t>(par.sum(double(seen)));
        }
        const double ln2 = std::log(2.0);
        Metrics row = {{"train_loss", loss_sum / double(seen)}};
        if (o.accuracy) row.emplace_back("train_accuracy", correct / double(seen));
        if (o.bits_per_character) row.emplace_back("train_bpc", loss_sum / double(seen) / ln2);
        return row;
    }

    // The validation entries of the row; updates the history's best.
    Metrics validate(const Dataset& validation)
    {
        const Metrics v = evaluate(state.model, forward, loss, validation, o.batch_size, o.accuracy);
        const double val_loss = v.at("loss");
        Metrics row = {{"val_loss", val_loss}};
        if (o.accuracy) row.emplace_back("val_accuracy", v.at("accuracy"));
        if (o.bits_per_character) row.emplace_back("val_bpc", val_loss / std::log(2.0));
        if (val_loss < state.history.best_val_loss) {
            state.history.best_val_loss = val_loss;
            state.history.best_epoch = state.epoch;
        }
        return row;
    }
};

}  // namespace

History fit(nn::Module& model, optim::Optimizer& optimizer, const ForwardFn& forward, const LossFn& loss,
            const Dataset& train_data, const Dataset& validation, const FitOptions& o, optim::Schedule* schedule)
{
    check_options(train_data, validation, o, schedule);
    History history;
    FitState state(model, optimizer, o, history);
    state.main_process = o.parallel.rank == 0;
    Loop loop{forward, loss, o, callbacks_for(o), state};
    Generator gen(o.seed);
    loop.notify(&Callback::on_train_begin);
    for (std::int64_t epoch = 1; epoch <= o.epochs && !state.stop_training; ++epoch) {
        state.epoch = epoch;  // on_train_end still sees the last epoch run
        const auto start = std::chrono::steady_clock::now();
        model.train();
        state.epoch_metrics = Metrics();
        const auto batches = epoch_batches(train_data, o, state.epoch, gen);
        state.batches = static_cast<std::int64_t>(batches.size());
        loop.notify(&Callback::on_epoch_begin);
        Metrics row = {{"epoch", double(state.epoch)}};
        for (const auto& entry : loop.train_epoch(batches, train_data)) row.emplace_back(entry.first, entry.second);
        if (validation.size > 0)
            for (const auto& entry : loop.validate(validation)) row.emplace_back(entry.first, entry.second);
        row.emplace_back("lr", optimizer.lr());
        row.emplace_back("seconds", std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
        state.epoch_metrics = row;
        history.epochs.push_back(row);
        if (schedule) schedule->epoch_end(validation.size > 0 ? std::optional<double>(row.at("val_loss")) : std::nullopt);
        loop.notify(&Callback::on_epoch_end);
    }
    history.stopped_early = state.stop_training;
    loop.notify(&Callback::on_train_end);
    return history;
}

// ---- the built-in callbacks ----

EarlyStopping::EarlyStopping(std::int64_t patience, bool verbose) : patience_(patience), verbose_(verbose)
{
    LOOM_CHECK(patience > 0, "EarlyStopping", "expects patience > 0 epochs, got {}", patience);
}

void EarlyStopping::on_epoch_end(FitState& state)
{
    LOOM_CHECK(state.epoch_metrics.contains("val_loss"), "EarlyStopping", "needs validation data");
    const std::int64_t since_best = state.epoch - state.history.best_epoch;
    if (since_best < patience_) return;
    state.stop_training = true;
    if (verbose_ && state.main_process)
        std::printf("early stop: no better validation loss for %lld epochs\n", static_cast<long long>(since_best));
}

BestModel::BestModel(std::string path, bool restore) : path_(std::move(path)), restore_(restore) {}

void BestModel::on_epoch_end(FitState& state)
{
    if (state.history.best_epoch != state.epoch) return;
    best_.clear();
    for (const auto& [name, t] : state.model.state_dict()) best_[name] = t.clone();
    if (!path_.empty() && state.main_process) save(path_, best_, {{"epoch", std::to_string(state.epoch)}});
}

void BestModel::on_train_end(FitState& state)
{
    if (restore_ && !best_.empty()) state.model.load_state_dict(best_);
}

MetricsLogger::MetricsLogger(std::string path) : path_(std::move(path)) {}

void MetricsLogger::on_train_begin(FitState& state)
{
    if (state.main_process) log_ = std::make_unique<MetricsLog>(path_);
}

void MetricsLogger::on_epoch_end(FitState& state)
{
    if (log_) log_->write(state.epoch_metrics);
}

void ProgressLine::on_epoch_begin(FitState& state)
{
    if (!state.main_process) return;
    progress_ = std::make_unique<Progress>(fmt::format("epoch {}/{}", state.epoch, state.options.epochs), state.batches);
}

void ProgressLine::on_batch_end(FitState& state)
{
    if (!progress_) return;
    progress_->update(state.batch + 1, {{"loss", state.running_loss}});
}

void ProgressLine::on_epoch_end(FitState& state)
{
    if (!progress_) return;
    const Metrics& row = state.epoch_metrics;  // without "epoch" (in the label) and "seconds" (in the line)
    progress_->finish(Metrics(row.begin() + 1, row.end() - 1));
    progress_.reset();
}

GradientReportLogger::GradientReportLogger(std::int64_t every, std::string path) : every_(every), path_(std::move(path))
{
    LOOM_CHECK(every > 0, "GradientReportLogger", "expects a report every n > 0 steps, got {}", every);
    LOOM_CHECK(!path_.empty(), "GradientReportLogger", "expects a .jsonl or .csv path for the reports");
}

void GradientReportLogger::on_train_begin(FitState& state)
{
    if (state.main_process) log_ = std::make_unique<MetricsLog>(path_);
}

void GradientReportLogger::after_backward(FitState& state)
{
    if (!log_ || (state.step + 1) % every_ != 0) return;
    before_ = snapshot(state.model.named_parameters());
    pending_step_ = state.step + 1;
}

void GradientReportLogger::on_batch_end(FitState& state)
{
    if (!log_ || pending_step_ == 0 || state.step != pending_step_) return;
    Metrics row = {{"step", double(state.step)}, {"epoch", double(state.epoch)}};
    for (const auto& entry : gradient_report(state.model.named_parameters(), before_).metrics())
        row.emplace_back(entry.first, entry.second);
    log_->write(row);
    before_.clear();
    pending_step_ = 0;
}

}  // namespace loom::train
