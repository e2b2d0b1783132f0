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
