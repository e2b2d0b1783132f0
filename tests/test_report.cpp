// train::HtmlReport: the page is self-contained, and the numbers behind its charts and heatmaps
// (embedded as JSON) are those the run produced, recorded here independently by a hook and a
// callback of the test's own. tests/browser_test.sh renders a report in headless Chromium.
#include "helpers.hpp"

#include <fstream>
#include <map>
#include <sstream>

using namespace loom;
using testing::check_error;
using testing::TempDir;

namespace {

std::string read(const std::string& path)
{
    std::ifstream in(path);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
}

// The JSON inside <script type="application/json" id="ID">.
nlohmann::json embedded(const std::string& page, const std::string& id)
{
    const std::string open = "<script type=\"application/json\" id=\"" + id + "\">";
    const std::size_t start = page.find(open);
    REQUIRE(start != std::string::npos);
    const std::size_t end = page.find("</script>", start);
    std::string text = page.substr(start + open.size(), end - start - open.size());
    for (std::size_t at; (at = text.find("<\\/")) != std::string::npos;) text.erase(at + 1, 1);
    return nlohmann::json::parse(text);
}

const nlohmann::json& chart(const nlohmann::json& charts, const std::string& title)
{
    for (const auto& c : charts)
        if (c.at("title") == title) return c;
    FAIL("no chart titled " << title);
    throw 0;
}

// Examples along dimension `dim` of x, with the targets y.
train::Dataset dataset(const Tensor& x, const Tensor& y, std::int64_t dim)
{
    return {y.size(0), [x, y, dim](const std::vector<std::int64_t>& idx) {
                const Tensor i = from_vector<std::int64_t>(idx, {std::int64_t(idx.size())});
                return train::Batch{x.index_select(dim, i), y.index_select(0, i), {}};
            }};
}

// A GRU over 5 steps of 2 features and a linear head on its last output.
struct Model : nn::Module {
    Model()
    {
        rnn = std::make_shared<nn::GRU>(nn::GRUOptions(2, 4));
        head = std::make_shared<nn::Dense>(4, 1);
        register_child("rnn", rnn);
        register_child("head", head);
    }
    std::shared_ptr<nn::GRU> rnn;
    std::shared_ptr<nn::Dense> head;
};

// What the test records on its own: each batch's loss, and at each step the gradient norms.
struct Witness : train::Callback {
    std::int64_t step = 0;  // the step about to be taken
    std::vector<double> losses;
    std::map<std::int64_t, std::vector<double>> grad_norms;
    void on_batch_begin(train::FitState& s) override { step = s.step + 1; }
    void after_backward(train::FitState& s) override
    {
        for (const auto& row : train::gradient_report(s.model.named_parameters()).rows) grad_norms[step].push_back(row.grad_norm);
    }
    void on_batch_end(train::FitState& s) override { losses.push_back(s.loss.item<double>()); }
};

}  // namespace

TEST_CASE("fit's report: loss, epochs, learning rate, gradient norms and dL/dh_t, all as recorded")
{
    manual_seed(3);
    Model model;
    const Tensor x = randn({5, 32, 2}), y = randn({32, 1});
    const train::Dataset data = dataset(x, y, 1);
    // The test's own hook, which the report must chain to and give back.
    auto witness = std::make_shared<Witness>();
    std::map<std::int64_t, std::vector<double>> curves;  // by step, from the test's hook
    std::int64_t hook_calls = 0;
    const auto own_hook = [&](std::int64_t, std::int64_t, const nn::State& g) {
        ++hook_calls;
        const Tensor n = nn::step_norms(g[0]).to(kFloat64).contiguous();
        curves[witness->step] = std::vector<double>(n.data_ptr<double>(), n.data_ptr<double>() + n.numel());
    };
    model.rnn->state_gradient_hook = own_hook;
    TempDir dir;
    auto report = std::make_shared<train::HtmlReport>(dir.file("run.html"), 3);
    report->set_title("GRU <test> run");
    train::FitOptions o;
    o.epochs = 2;
    o.batch_size = 8;
    o.shuffle = false;
    o.verbose = false;
    o.callbacks = {witness, report};
    optim::Adam adam(model.parameters(), optim::AdamOptions(0.01));
    const auto forward = [&](const train::Batch& b) { return (*model.head)((*model.rnn)(b.input).output.select(0, 4)); };
    const auto loss = [](const Tensor& out, const train::Batch& b) { return nn::mse_loss(out, b.target); };
    train::fit(model, adam, forward, loss, data, train::Dataset{}, o);

    // The hook is the test's own again, and it saw every backward.
    CHECK(hook_calls == 8);
    CHECK(model.rnn->state_gradient_hook.target<decltype(own_hook)>() != nullptr);

    const std::string page = read(report->path());
    // Nothing is fetched: no source, link, import or url(); the one address is SVG's namespace name.
    for (const char* outside : {"src=", "href=", "<link", "@import", "url("}) CHECK(page.find(outside) == std::string::npos);
    std::string rest = page;
    for (std::size_t at; (at = rest.find("xmlns=\"http://www.w3.org/2000/svg\"")) != std::string::npos;) rest.erase(at, 34);
    CHECK(rest.find("http") == std::string::npos);
    CHECK(page.find("<title>GRU &lt;test&gt; run</title>") != std::string::npos);
    CHECK(page.find("<h2>Model</h2>") != std::string::npos);
    CHECK(page.find("weight_hh_l0") != std::string::npos);  // the summary

    const nlohmann::json charts = embedded(page, "chart-data");
    const auto& batch_loss = chart(charts, "Training loss per mini-batch").at("series").at(0);
    REQUIRE(batch_loss.at("y").size() == witness->losses.size());
    for (std::size_t i = 0; i < witness->losses.size(); ++i) {
        CHECK(batch_loss.at("x")[i].get<double>() == double(i + 1));
        CHECK(batch_loss.at("y")[i].get<double>() == doctest::Approx(witness->losses[i]).epsilon(1e-12));
    }
    const auto& lr = chart(charts, "Learning rate").at("series").at(0);
    CHECK(lr.at("y").size() == 8);
    CHECK(lr.at("y")[0].get<double>() == doctest::Approx(0.01));
    CHECK(chart(charts, "Loss per epoch").at("series").at(0).at("name") == "train_loss");

    // Sampled steps: the first, then every third.
    const std::vector<std::int64_t> sampled{1, 3, 6};
    const auto& norms = chart(charts, "Gradient norm per parameter").at("series");
    const auto names = model.named_parameters();
    REQUIRE(norms.size() == names.size());
    for (std::size_t k = 0; k < names.size(); ++k) {
        CHECK(norms[k].at("name") == names[k].first);
        REQUIRE(norms[k].at("x").size() == sampled.size());
        for (std::size_t s = 0; s < sampled.size(); ++s) {
            CHECK(norms[k].at("x")[s].get<double>() == double(sampled[s]));
            CHECK(norms[k].at("y")[s].get<double>() ==
                  doctest::Approx(std::log10(witness->grad_norms.at(sampled[s])[k])).epsilon(1e-12));
        }
    }

    const nlohmann::json maps = embedded(page, "heatmap-data");
    REQUIRE(maps.size() == 1);  // one layer, one direction
    CHECK(maps[0].at("labels") == std::vector<std::string>{"1", "3", "6"});
    for (std::size_t s = 0; s < sampled.size(); ++s) {
        const auto& row = maps[0].at("rows")[s];
        const auto& own = curves.at(sampled[s]);
        REQUIRE(row.size() == 5);
        for (std::size_t t = 0; t < 5; ++t) CHECK(row[t].get<double>() == doctest::Approx(own[t]).epsilon(1e-12));
    }
    CHECK(page.find("|dL/dh_t| in rnn, layer 0") != std::string::npos);
}

TEST_CASE("long runs stay small: per-batch curves are averaged in pairs, sampled steps thinned")
{
    nn::Dense model(1, 1, true, kFloat64);
    const Tensor x = randn({2100, 1}, kFloat64), y = x * 3.0;
    const train::Dataset data = dataset(x, y, 0);
    auto witness = std::make_shared<Witness>();
    TempDir dir;
    auto report = std::make_shared<train::HtmlReport>(dir.file("long.html"), 1);
    train::FitOptions o;
    o.epochs = 1;
    o.batch_size = 1;
    o.shuffle = false;
    o.verbose = false;
    o.callbacks = {witness, report};
    optim::SGD sgd(model.parameters(), optim::SGDOptions(1e-3));
    train::fit(model, sgd, [&](const train::Batch& b) { return model(b.input); },
               [](const Tensor& out, const train::Batch& b) { return nn::mse_loss(out, b.target); }, data,
               train::Dataset{}, o);
    const std::string page = read(report->path());
    const nlohmann::json charts = embedded(page, "chart-data");
    const auto& loss = chart(charts, "Training loss per mini-batch").at("series").at(0);
    // 2000 points became 1000 averages of two; the last 100 batches made 50 more.
    REQUIRE(loss.at("y").size() == 1050);
    const auto& w = witness->losses;
    CHECK(loss.at("x")[0].get<double>() == 1.5);
    CHECK(loss.at("y")[0].get<double>() == doctest::Approx((w[0] + w[1]) / 2).epsilon(1e-12));
    CHECK(loss.at("y")[1049].get<double>() == doctest::Approx((w[2098] + w[2099]) / 2).epsilon(1e-12));
    // Every step sampled until 200 were kept, then every second, every fourth, ...
    const auto& xs = chart(charts, "Gradient norm per parameter").at("series").at(0).at("x");
    CHECK(xs.size() <= 200);
    CHECK(xs.size() >= 100);
    CHECK(xs[0].get<double>() == 1);
    const double stride = xs[2].get<double>() - xs[1].get<double>();
    CHECK(stride >= 8);
    for (std::size_t i = 2; i < xs.size(); ++i) CHECK(xs[i].get<double>() - xs[i - 1].get<double>() == stride);
}

TEST_CASE("a report built by hand: charts, heatmaps and text, with clear errors")
{
    TempDir dir;
    train::HtmlReport report(dir.file("hand.html"));
    report.add_chart("a line", "x", "y", {{"ramp", {1, 2, 3}, {1, 4, NAN}}});
    report.add_heatmap("rows of different lengths", "t", "layer", {"1", "2"}, {{1, 10, 100}, {0.5, 0}});
    report.add_text("notes", "a < b & c");
    check_error([&] { report.add_heatmap("h", "t", "l", {"1"}, {{1}, {2}}); }, {"add_heatmap", "1 row labels for 2 rows"});
    check_error([&] { report.add_heatmap("h", "t", "l", {}, {}); }, {"add_heatmap", "no rows"});
    check_error([&] { report.add_chart("empty", "x", "y", {{"nan", {1}, {NAN}}}); }, {"svg_chart", "no series has a finite point"});
    report.write();
    const std::string page = read(report.path());
    CHECK(page.find("<title>hand.html</title>") != std::string::npos);
    CHECK(page.find("a &lt; b &amp; c") != std::string::npos);
    CHECK(page.find("<h2>empty</h2>") == std::string::npos);  // the failed chart added nothing
    const nlohmann::json charts = embedded(page, "chart-data");
    REQUIRE(charts.size() == 1);
    CHECK(charts[0].at("series")[0].at("y")[2].is_null());
    const nlohmann::json maps = embedded(page, "heatmap-data");
    REQUIRE(maps.size() == 1);
    CHECK(maps[0].at("rows")[1].size() == 2);
    CHECK(page.find("id=\"heatmap-0\"") != std::string::npos);
    // A title that would close the script element is escaped in the data.
    report.add_heatmap("</script><b>", "t", "l", {"</script>"}, {{1}});
    report.write();
    CHECK(embedded(read(report.path()), "heatmap-data")[1].at("labels")[0] == "</script>");
    check_error([] { train::HtmlReport("x.html", 0); }, {"HtmlReport", "every > 0"});
    check_error([] { train::HtmlReport(""); }, {"HtmlReport", "path"});
    check_error([&] { train::HtmlReport(dir.file("no/such/folder/r.html")).write(); }, {"HtmlReport", "cannot write"});
}
