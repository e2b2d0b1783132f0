// Training helpers: padding and batching, the metrics log, charts, the progress line.
#include "helpers.hpp"

#include <unistd.h>

#include <filesystem>
#include <fstream>

using namespace loom;
using testing::check_error;
using testing::close;
using testing::bytes_of;
using testing::TempDir;
namespace fs = std::filesystem;


TEST_CASE("pad_sequences pads time-major and gives lengths the recurrent layers take")
{
    const auto [tokens, lengths] = train::pad_sequences({{1, 2, 3}, {4}, {5, 6}}, 0);
    CHECK(tokens.sizes() == Shape{3, 3});
    CHECK(close(tokens, {1, 4, 5, 2, 0, 6, 3, 0, 0}));
    CHECK(close(lengths, {3, 1, 2}));
    const auto [feats, lens] = train::pad_sequences({ones({2, 4}), ones({1, 4}) * 2.0});
    CHECK(feats.sizes() == Shape{2, 2, 4});
    CHECK(close(feats.select(1, 1).sum({1}), {8, 0}));
    nn::GRU gru(nn::GRUOptions(4, 3).bidirectional(true));
    CHECK(gru(feats, {}, lens).output.sizes() == Shape{2, 2, 6});
    check_error([] { (void)train::pad_sequences(std::vector<std::vector<std::int64_t>>{{1}, {}}); },
                {"pad_sequences", "sequence 1 is empty"});
    check_error([] { (void)train::pad_sequences({ones({2, 4}), ones({2, 3})}); }, {"pad_sequences", "[2, 3]"});
}

TEST_CASE("minibatches cover every index once, shuffled reproducibly")
{
    Generator g1(3), g2(3);
    const auto a = train::minibatches(10, 4, &g1), b = train::minibatches(10, 4, &g2);
    CHECK(a == b);
    REQUIRE(a.size() == 3);
    CHECK(a[2].size() == 2);
    std::vector<std::int64_t> all;
    for (auto& batch : a) all.insert(all.end(), batch.begin(), batch.end());
    std::sort(all.begin(), all.end());
    CHECK(all == std::vector<std::int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9});
    CHECK(train::minibatches(5, 2)[0] == std::vector<std::int64_t>{0, 1});  // unshuffled
}

TEST_CASE("metrics logs round-trip as JSON Lines and write CSV with a header")
{
    TempDir dir;
    {
        train::MetricsLog log((dir.path / "m.jsonl").string());
        log.write({{"epoch", 1}, {"loss", 2.5}});
        log.write({{"epoch", 2}, {"loss", 1.25}});
    }
    train::MetricsLog more((dir.path / "m.jsonl").string(), /*append=*/true);
    more.write({{"epoch", 3}, {"loss", 1}});
    const auto rows = train::read_metrics((dir.path / "m.jsonl").string());
    REQUIRE(rows.size() == 3);
    CHECK(rows[1].at("loss") == 1.25);
    CHECK(rows[2].at("epoch") == 3);
    train::MetricsLog csv((dir.path / "m.csv").string());
    csv.write({{"epoch", 1}, {"loss", 0.5}});
    csv.write({{"epoch", 2}, {"loss", 0.25}});
    CHECK(bytes_of(dir.path / "m.csv") == "epoch,loss\n1,0.5\n2,0.25\n");
    std::ofstream(dir.path / "bad.jsonl") << "{\"a\": 1}\nnot json\n";
    check_error([&] { (void)train::read_metrics((dir.path / "bad.jsonl").string()); }, {"read_metrics", "line 2"});
}

TEST_CASE("plot_svg draws every series with a legend")
{
    TempDir dir;
    const auto path = dir.path / "loss.svg";
    train::plot_svg(path.string(), "loss <&>", "epoch", "loss", {{"train", {1, 2, 3}, {3, 2, 1.5}}, {"val", {1, 2, 3}, {3.5, 2.5, 2}}});
    const std::string svg = bytes_of(path);
    CHECK(svg.rfind("<svg", 0) == 0);
    CHECK(svg.find("loss &lt;&amp;&gt;") != std::string::npos);
    CHECK(std::count(svg.begin(), svg.end(), '\n') > 10);
    CHECK(svg.find("<polyline") != svg.rfind("<polyline"));  // two lines
    check_error([&] { train::plot_svg(path.string(), "t", "x", "y", {{"a", {1, 2}, {1}}}); }, {"plot_svg", "2 x values"});
}

TEST_CASE("off a terminal, progress prints one line at the end")
{
    std::FILE* f = std::tmpfile();
    REQUIRE(f);
    train::Progress progress("epoch 1/2", 10, f);
    for (int i = 1; i <= 10; ++i) progress.update(i, {{"loss", 1.0 / i}});
    progress.finish({{"loss", 0.1}, {"val_bpc", 2.5}});
    std::rewind(f);
    char buffer[256] = {};
    const std::size_t n = std::fread(buffer, 1, sizeof buffer - 1, f);
    std::fclose(f);
    const std::string out(buffer, n);
    CHECK(std::count(out.begin(), out.end(), '\n') == 1);
    CHECK(out.rfind("epoch 1/2 10/10 loss 0.1 val_bpc 2.5 |", 0) == 0);
}

TEST_CASE("fit trains, keeps and restores the best model, stops early and logs every epoch")
{
    TempDir dir;
    manual_seed(3);
    // y = 2x + 1 with a little noise, 200 examples.
    Generator gen(4);
    const Tensor x = randn({200, 1}, kFloat64, &gen), y = x * 2.0 + 1.0 + randn({200, 1}, kFloat64, &gen) * 0.01;
    const train::Dataset data{200, [&](const std::vector<std::int64_t>& idx) {
                                  const Tensor i = from_vector<std::int64_t>(idx, {std::int64_t(idx.size())});
                                  return train::Batch{x.index_select(0, i), y.index_select(0, i), {}};
                              }};
    auto [train_set, val_set] = train::split(data, 0.25, gen);
    CHECK(train_set.size == 150);
    CHECK(val_set.size == 50);
    nn::Dense model(1, 1, true, kFloat64);
    optim::SGD opt(model.parameters(), optim::SGDOptions(0.1));
    train::FitOptions o;
    o.epochs = 30;
    o.batch_size = 16;
    o.verbose = false;
    o.early_stopping = 3;
    o.best_checkpoint = dir.file("best.safetensors");
    o.log = dir.file("log.jsonl");
    const auto forward = [&](const train::Batch& b) { return model(b.input); };
    const auto loss = [](const Tensor& out, const train::Batch& b) { return nn::mse_loss(out, b.target); };
    const auto history = train::fit(model, opt, forward, loss, train_set, val_set, o);
    CHECK(history.epochs.front().at("train_loss") > 100 * history.best_val_loss);  // first epoch vs best
    CHECK(history.best_val_loss < 1e-3);             // learned y = 2x + 1
    CHECK(model.weight.item<double>() == doctest::Approx(2).epsilon(0.01));
    CHECK(history.stopped_early);                    // the noise floor stops improvement before 30 epochs
    CHECK(history.epochs.size() == std::size_t(history.best_epoch + 3));
    CHECK(train::read_metrics(o.log).size() == history.epochs.size());
    // The model ends as the best epoch left it, and that is what the checkpoint holds.
    const auto best = load(o.best_checkpoint);
    CHECK(best.at("weight").item<double>() == model.weight.item<double>());
    const auto v = train::evaluate(model, forward, loss, val_set, 64, false);
    CHECK(v.at("loss") == doctest::Approx(history.best_val_loss));
    check_error([&] {
        train::FitOptions bad = o;
        (void)train::fit(model, opt, forward, loss, train_set, {}, bad);
    }, {"fit", "need validation data"});
}

TEST_CASE("fit steps every kind of schedule once per epoch, a metric-driven one with the validation loss")
{
    Generator gen(5);
    const Tensor x = randn({40, 1}, kFloat64, &gen), y = x * 3.0;
    const train::Dataset data{40, [&](const std::vector<std::int64_t>& idx) {
                                  const Tensor i = from_vector<std::int64_t>(idx, {std::int64_t(idx.size())});
                                  return train::Batch{x.index_select(0, i), y.index_select(0, i), {}};
                              }};
    auto [train_set, val_set] = train::split(data, 0.25, gen);
    using Make = std::function<std::unique_ptr<optim::Schedule>(optim::Optimizer&)>;
    const std::vector<std::pair<std::string, Make>> schedules = {
        {"StepLR", [](optim::Optimizer& o) { return std::make_unique<optim::StepLR>(o, 2, 0.5); }},
        {"ExponentialLR", [](optim::Optimizer& o) { return std::make_unique<optim::ExponentialLR>(o, 0.8); }},
        {"CosineAnnealingLR", [](optim::Optimizer& o) { return std::make_unique<optim::CosineAnnealingLR>(o, 4); }},
        {"LinearLR", [](optim::Optimizer& o) { return std::make_unique<optim::LinearLR>(o, 0.5, 1.0, 3); }},
        {"ReduceLROnPlateau", [](optim::Optimizer& o) {
             return std::make_unique<optim::ReduceLROnPlateau>(o, optim::ReduceLROnPlateau::Mode::Min, 0.5, 0);
         }}};
    for (const auto& [name, make] : schedules) {
        CAPTURE(name);
        nn::Dense model(1, 1, false, kFloat64);
        optim::SGD opt(model.parameters(), optim::SGDOptions(0.05));
        const auto schedule = make(opt);
        train::FitOptions o;
        o.epochs = 5;
        o.batch_size = 8;
        o.verbose = false;
        o.restore_best = false;
        const auto forward = [&](const train::Batch& b) { return model(b.input); };
        const auto loss = [](const Tensor& out, const train::Batch& b) { return nn::mse_loss(out, b.target); };
        const auto history = train::fit(model, opt, forward, loss, train_set, val_set, o, schedule.get());
        REQUIRE(history.epochs.size() == 5);
        // The same schedule stepped by hand with the losses fit logged gives every rate fit logged.
        nn::Dense twin_model(1, 1, false, kFloat64);
        optim::SGD twin(twin_model.parameters(), optim::SGDOptions(0.05));
        const auto by_hand = make(twin);
        for (const auto& row : history.epochs) {
            CHECK(row.at("lr") == doctest::Approx(twin.lr()).epsilon(1e-15));
            by_hand->epoch_end(row.at("val_loss"));
        }
        CHECK(opt.lr() == doctest::Approx(twin.lr()).epsilon(1e-15));
        CHECK(schedule->last_epoch() == 5);
        if (name != "ReduceLROnPlateau") CHECK(opt.lr() != 0.05);  // it did change the rate
    }
    // A metric-driven schedule without validation data is refused before training starts.
    nn::Dense model(1, 1, false, kFloat64);
    optim::SGD opt(model.parameters(), optim::SGDOptions(0.05));
    optim::ReduceLROnPlateau plateau(opt);
    const auto forward = [&](const train::Batch& b) { return model(b.input); };
    const auto loss = [](const Tensor& out, const train::Batch& b) { return nn::mse_loss(out, b.target); };
    train::FitOptions o;
    o.verbose = false;
    const Tensor before = model.weight.clone();
    check_error([&] { (void)train::fit(model, opt, forward, loss, train_set, {}, o, &plateau); },
                {"fit", "ReduceLROnPlateau", "validation loss", "no validation data"});
    CHECK(model.weight.item<double>() == before.item<double>());
    // One that waits for its metric to rise cannot be fed a loss.
    optim::ReduceLROnPlateau rising(opt, optim::ReduceLROnPlateau::Mode::Max);
    check_error([&] { (void)train::fit(model, opt, forward, loss, train_set, train_set, o, &rising); },
                {"fit", "ReduceLROnPlateau", "Mode::Max", "validation loss"});
    CHECK(model.weight.item<double>() == before.item<double>());
}

TEST_CASE("the gradient report: gradient and weight norms, update ratios, a table, metrics rows, and from fit")
{
    TempDir dir;
    nn::Dense model(3, 2, true, kFloat64);
    optim::SGD opt(model.parameters(), optim::SGDOptions(0.1));
    const Tensor x = randn({8, 3}, kFloat64), y = randn({8, 2}, kFloat64);
    nn::mse_loss(model(x), y).backward();
    const auto names = model.named_parameters();
    const auto before = train::snapshot(names);
    const Tensor w0 = model.weight.detach().clone(), g = model.weight.grad();
    const train::GradientReport r0 = train::gradient_report(names);
    REQUIRE(r0.rows.size() == 2);
    CHECK(r0.rows[0].name == "weight");
    CHECK(r0.rows[0].grad_norm == doctest::Approx(g.norm().item<double>()).epsilon(1e-12));
    CHECK(r0.rows[0].weight_norm == doctest::Approx(w0.norm().item<double>()).epsilon(1e-12));
    CHECK(std::isnan(r0.rows[0].update_ratio));
    opt.step();
    const train::GradientReport r1 = train::gradient_report(names, before);
    // SGD moves w by lr * g: the ratio is 0.1 |g| / |w0|.
    CHECK(r1.rows[0].update_ratio == doctest::Approx(0.1 * g.norm().item<double>() / w0.norm().item<double>()).epsilon(1e-9));
    const std::string table = r1.table();
    CHECK(table.find("update/weight") != std::string::npos);
    CHECK(table.find("bias") != std::string::npos);
    const train::Metrics m = r1.metrics();
    CHECK(m.at("grad_norm/weight") == r1.rows[0].grad_norm);
    CHECK(m.at("update_ratio/bias") == r1.rows[1].update_ratio);
    CHECK_FALSE(r0.metrics().contains("update_ratio/weight"));
    check_error([&] { (void)train::gradient_report(names, {{"weight", before.at("weight")}}); },
                {"gradient_report", "no weights named \"bias\""});

    // fit writes a report every 3 steps: 10 batches per epoch, 2 epochs -> steps 3, 6, ..., 18.
    const Tensor xs = randn({80, 3}, kFloat64), ys = randn({80, 2}, kFloat64);
    const train::Dataset data{80, [&](const std::vector<std::int64_t>& idx) {
                                  const Tensor i = from_vector<std::int64_t>(idx, {std::int64_t(idx.size())});
                                  return train::Batch{xs.index_select(0, i), ys.index_select(0, i), {}};
                              }};
    train::FitOptions o;
    o.epochs = 2;
    o.batch_size = 8;
    o.verbose = false;
    o.gradient_report_every = 3;
    o.gradient_log = dir.file("gradients.jsonl");
    const auto forward = [&](const train::Batch& b) { return model(b.input); };
    const auto loss = [](const Tensor& out, const train::Batch& b) { return nn::mse_loss(out, b.target); };
    train::fit(model, opt, forward, loss, data, {}, o);
    const auto rows = train::read_metrics(o.gradient_log);
    REQUIRE(rows.size() == 6);
    CHECK(rows[0].at("step") == 3);
    CHECK(rows[5].at("step") == 18);
    CHECK(rows[5].at("epoch") == 2);
    CHECK(rows[2].at("update_ratio/weight") > 0);
    CHECK(rows[2].at("grad_norm/bias") > 0);
    o.gradient_log.clear();
    check_error([&] { train::fit(model, opt, forward, loss, data, {}, o); }, {"fit", "gradient_log is empty"});
}

namespace {
// y = 2x + 1 in float64, 64 examples in order.
struct Line {
    Tensor x, y;
    train::Dataset data;
    Line()
    {
        Generator gen(11);
        x = randn({64, 1}, kFloat64, &gen);
        y = x * 2.0 + 1.0;
        data = {64, [this](const std::vector<std::int64_t>& idx) {
                    const Tensor i = from_vector<std::int64_t>(idx, {std::int64_t(idx.size())});
                    return train::Batch{x.index_select(0, i), y.index_select(0, i), {}};
                }};
    }
};

// Records what fit shows it, and stops after `stop_at` optimizer steps.
struct Recorder : train::Callback {
    std::int64_t stop_at;
    std::vector<std::string> events;
    std::vector<double> grad_norms;
    std::vector<std::int64_t> steps_seen;
    explicit Recorder(std::int64_t stop) : stop_at(stop) {}
    void on_train_begin(train::FitState&) override { events.push_back("train_begin"); }
    void on_train_end(train::FitState& s) override { events.push_back(fmt::format("train_end {}", s.epoch)); }
    void on_epoch_begin(train::FitState& s) override { events.push_back(fmt::format("epoch_begin {}", s.epoch)); }
    void on_epoch_end(train::FitState& s) override
    {
        CHECK(s.epoch_metrics.contains("train_loss"));
        events.push_back(fmt::format("epoch_end {}", s.epoch));
    }
    void on_batch_begin(train::FitState& s) override
    {
        CHECK(s.data != nullptr);
        CHECK(!s.loss.defined());
    }
    void after_backward(train::FitState& s) override
    {
        double sum = 0;
        for (const Tensor& p : s.optimizer.parameters()) sum += p.grad().pow(2).sum().item<double>();
        grad_norms.push_back(std::sqrt(sum));
        steps_seen.push_back(s.step);
    }
    void on_batch_end(train::FitState& s) override
    {
        CHECK(s.loss.defined());
        if (s.step == stop_at) s.stop_training = true;
    }
};
}  // namespace

TEST_CASE("fit's callbacks: every event in order, gradients seen after backward, and a stop from a callback")
{
    Line line;
    nn::Dense model(1, 1, true, kFloat64);
    optim::SGD opt(model.parameters(), optim::SGDOptions(0.05));
    const auto forward = [&](const train::Batch& b) { return model(b.input); };
    const auto loss = [](const Tensor& out, const train::Batch& b) { return nn::mse_loss(out, b.target); };
    auto recorder = std::make_shared<Recorder>(11);
    train::FitOptions o;
    o.epochs = 5;
    o.batch_size = 8;  // 8 steps an epoch: the stop at step 11 falls in epoch 2
    o.shuffle = false;
    o.verbose = false;
    o.callbacks = {recorder};
    // The gradient norms after_backward sees are those of an SGD run by hand over the same batches.
    nn::Dense twin(1, 1, true, kFloat64);
    twin.load_state_dict(model.state_dict());
    const auto history = train::fit(model, opt, forward, loss, line.data, {}, o);
    CHECK(history.stopped_early);
    CHECK(history.epochs.size() == 2);
    CHECK(recorder->events == std::vector<std::string>{"train_begin", "epoch_begin 1", "epoch_end 1", "epoch_begin 2",
                                                        "epoch_end 2", "train_end 2"});
    REQUIRE(recorder->grad_norms.size() == 11);
    CHECK(recorder->steps_seen.front() == 0);  // before the step is counted
    CHECK(recorder->steps_seen.back() == 10);
    optim::SGD twin_opt(twin.parameters(), optim::SGDOptions(0.05));
    for (std::int64_t step = 0; step < 11; ++step) {
        std::vector<std::int64_t> idx;
        for (std::int64_t i = 0; i < 8; ++i) idx.push_back((step % 8) * 8 + i);
        const auto b = line.data.get(idx);
        twin_opt.zero_grad();
        nn::mse_loss(twin(b.input), b.target).backward();
        const double norm = std::sqrt((twin.weight.grad().pow(2).sum() + twin.bias.grad().pow(2).sum()).item<double>());
        CHECK(recorder->grad_norms[std::size_t(step)] == doctest::Approx(norm).epsilon(1e-12));
        twin_opt.step();
    }
    CHECK(model.weight.item<double>() == doctest::Approx(twin.weight.item<double>()).epsilon(1e-12));
    o.callbacks = {nullptr};
    check_error([&] { (void)train::fit(model, opt, forward, loss, line.data, {}, o); }, {"fit", "null callback"});
}

TEST_CASE("fit's gradient accumulation: k batches of n take the step one batch of k*n takes")
{
    Line line;
    const auto run = [&](std::int64_t batch_size, std::int64_t accumulate) {
        manual_seed(5);
        nn::Dense model(1, 1, true, kFloat64);
        optim::SGD opt(model.parameters(), optim::SGDOptions(0.1).momentum(0.9));
        train::FitOptions o;
        o.epochs = 3;
        o.batch_size = batch_size;
        o.accumulate = accumulate;
        o.shuffle = false;
        o.verbose = false;
        std::int64_t steps = 0;
        struct Count : train::Callback {
            std::int64_t* steps;
            explicit Count(std::int64_t* s) : steps(s) {}
            void on_train_end(train::FitState& s) override { *steps = s.step; }
        };
        o.callbacks = {std::make_shared<Count>(&steps)};
        const auto history = train::fit(model, opt, [&](const train::Batch& b) { return model(b.input); },
                                        [](const Tensor& out, const train::Batch& b) { return nn::mse_loss(out, b.target); },
                                        line.data, {}, o);
        return std::tuple{model.weight.item<double>(), model.bias.item<double>(), steps, history.epochs[0].at("train_loss")};
    };
    const auto [w1, b1, steps1, loss1] = run(16, 1);
    const auto [w4, b4, steps4, loss4] = run(4, 4);
    CHECK(steps1 == 12);
    CHECK(steps4 == 12);
    CHECK(w4 == doctest::Approx(w1).epsilon(1e-12));
    CHECK(b4 == doctest::Approx(b1).epsilon(1e-12));
    // 64 examples in batches of 4 with accumulate = 3: five steps of 3 batches and one of 1 per epoch.
    const auto [w3, b3, steps3, loss3] = run(4, 3);
    CHECK(steps3 == 18);
    check_error([&] { (void)run(4, 0); }, {"fit", "accumulate >= 1", "got 0"});
}

TEST_CASE("lr_find sweeps the rate exponentially, stops where the loss diverges, and puts the model back")
{
    TempDir dir;
    Line line;
    nn::Dense model(1, 1, true, kFloat64);
    optim::SGD opt(model.parameters(), optim::SGDOptions(0.01).momentum(0.9));
    const Tensor weight_before = model.weight.clone(), bias_before = model.bias.clone();
    train::LrFindOptions o;
    o.start_lr = 1e-4;
    o.end_lr = 100;
    o.steps = 60;
    o.batch_size = 8;
    o.chart = dir.file("lr.svg");
    const auto result = train::lr_find(model, opt, [&](const train::Batch& b) { return model(b.input); },
                                       [](const Tensor& out, const train::Batch& b) { return nn::mse_loss(out, b.target); },
                                       line.data, o);
    // SGD on this quadratic diverges well before a rate of 100: the sweep stops early.
    REQUIRE(result.lrs.size() >= 10);
    CHECK(result.lrs.size() < 60);
    CHECK(result.lrs.front() == doctest::Approx(1e-4));
    for (std::size_t i = 1; i < result.lrs.size(); ++i)
        CHECK(result.lrs[i] / result.lrs[i - 1] == doctest::Approx(std::pow(1e6, 1.0 / 59)));
    CHECK(result.losses.back() > 4 * *std::min_element(result.losses.begin(), result.losses.end()));
    CHECK(result.suggested_lr > 1e-4);
    CHECK(result.suggested_lr < result.lrs.back());
    CHECK(testing::bytes_of(o.chart).rfind("<svg", 0) == 0);
    // Weights, the optimizer's rate and its momentum are as before.
    CHECK(model.weight.item<double>() == weight_before.item<double>());
    CHECK(model.bias.item<double>() == bias_before.item<double>());
    CHECK(opt.lr() == 0.01);
    CHECK(!opt.state(0).momentum_buffer.defined());
    o.end_lr = 1e-5;
    check_error([&] { (void)train::lr_find(model, opt, {}, {}, line.data, o); }, {"lr_find", "start_lr < end_lr"});
}
