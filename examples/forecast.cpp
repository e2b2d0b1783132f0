// forecast: daily US births 1969-1988, one day ahead. A SimpleRNN (LSTM or GRU by --cell) reads
// the last --window days and a Dense layer predicts the next. Trains on the years before the
// last, tests on the last year (1988), and compares with the seasonal-naive baseline: the same
// weekday one week earlier. Writes the test year's forecast against the truth as an SVG chart.
// --csv FILE takes any file with the same columns; --synthetic uses a noisy multi-frequency sine.
// Ends with "test_rmse <number>" and "baseline_rmse <number>" on lines of their own.
#include <loom/loom.hpp>

#include <CLI/CLI.hpp>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>

using namespace loom;

namespace {

// The births column of a CSV with header year,month,date_of_month,day_of_week,births.
std::vector<double> read_births(const std::string& path)
{
    std::ifstream in(path);
    if (!in) throw Error(fmt::format("forecast: cannot open {}", path));
    std::string line;
    std::getline(in, line);
    if (line.rfind("year,month,date_of_month,day_of_week,births", 0) != 0)
        throw Error(fmt::format("forecast: {} does not start with the header "
                                "year,month,date_of_month,day_of_week,births (got \"{}\")", path, line));
    std::vector<double> births;
    for (int n = 2; std::getline(in, line); ++n) {
        if (line.empty()) continue;
        std::stringstream fields(line);
        std::string field;
        std::vector<std::string> parts;
        while (std::getline(fields, field, ',')) parts.push_back(field);
        char* end = nullptr;
        const double value = parts.size() == 5 ? std::strtod(parts[4].c_str(), &end) : NAN;
        if (parts.size() != 5 || end == parts[4].c_str() || !std::isfinite(value))
            throw Error(fmt::format("forecast: {} line {} is not five comma-separated fields ending in a number: \"{}\"",
                                    path, n, line));
        births.push_back(value);
    }
    return births;
}

std::vector<double> synthetic_series(std::int64_t days, Generator& gen)
{
    std::vector<double> v;
    for (std::int64_t t = 0; t < days; ++t)
        v.push_back(10000 + 800 * std::sin(6.283 * t / 7) + 500 * std::sin(6.283 * t / 365.25) +
                    200 * std::sin(6.283 * t / 30.4) + 150 * gen.normal());
    return v;
}

}  // namespace

int main(int argc, char** argv)
{
    CLI::App app{"forecast: one-day-ahead forecasts of daily births with a recurrent network"};
    std::string csv = std::string(LOOM_EXAMPLE_DATA) + "/us_births_1969_1988.csv", cell = "rnn", chart = "forecast.svg";
    std::int64_t window = 28, hidden = 32, epochs = 12, test_days = 366, seed = 0;
    double lr = 5e-3;
    bool synthetic = false;
    app.add_option("--csv", csv, "CSV with columns year,month,date_of_month,day_of_week,births");
    app.add_flag("--synthetic", synthetic, "a noisy multi-frequency sine series instead");
    app.add_option("--cell", cell, "rnn, lstm or gru")->check(CLI::IsMember({"rnn", "lstm", "gru"}));
    app.add_option("--window", window, "days the network reads")->check(CLI::Range(7, 10000));
    app.add_option("--hidden", hidden, "hidden size")->check(CLI::Range(1, 4096));
    app.add_option("--epochs", epochs, "training epochs")->check(CLI::Range(1, 100000));
    app.add_option("--test-days", test_days, "days at the end held out (1988 has 366)")->check(CLI::Range(7, 100000));
    app.add_option("--lr", lr, "Adam learning rate")->check(CLI::PositiveNumber);
    app.add_option("--seed", seed, "random seed");
    app.add_option("--chart", chart, "SVG chart of the test period");
    CLI11_PARSE(app, argc, argv);
    manual_seed(static_cast<std::uint64_t>(seed));

    Generator gen(static_cast<std::uint64_t>(seed));
    std::vector<double> series;
    try {
        series = synthetic ? synthetic_series(7305, gen) : read_births(csv);
    } catch (const Error& e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 1;
    }
    const auto N = static_cast<std::int64_t>(series.size());
    if (N < window + test_days + 8 * 7) {
        std::fprintf(stderr, "forecast: %lld days are too few for --window %lld and --test-days %lld\n", (long long)N,
                     (long long)window, (long long)test_days);
        return 1;
    }
    const std::int64_t test_start = N - test_days;
    // Normalise with the training part's statistics only.
    double mean = 0, var = 0;
    for (std::int64_t t = 0; t < test_start; ++t) mean += series[t];
    mean /= double(test_start);
    for (std::int64_t t = 0; t < test_start; ++t) var += (series[t] - mean) * (series[t] - mean);
    const double scale = std::sqrt(var / double(test_start));
    std::vector<double> z;
    for (double v : series) z.push_back((v - mean) / scale);

    // Example i predicts day i + window from days [i, i + window).
    const auto windows = [&](const std::vector<std::int64_t>& starts) {
        std::vector<double> x, y;
        const auto B = static_cast<std::int64_t>(starts.size());
        x.resize(std::size_t(window * B));
        for (std::int64_t b = 0; b < B; ++b) {
            for (std::int64_t t = 0; t < window; ++t) x[std::size_t(t * B + b)] = z[std::size_t(starts[b] + t)];
            y.push_back(z[std::size_t(starts[b] + window)]);
        }
        return train::Batch{tensor(x, {window, B, 1}), tensor(y, {B, 1}), {}};
    };
    const train::Dataset all_train{test_start - window, windows};
    auto [train_set, val_set] = train::split(all_train, 0.1, gen);

    struct Net : nn::Module {
        std::shared_ptr<nn::RecurrentLayer> rnn;
        std::shared_ptr<nn::Dense> head;
        Net(nn::CellKind kind, std::int64_t H)
        {
            rnn = register_module("rnn", std::make_shared<nn::RecurrentLayer>(kind, nn::RecurrentOptions(1, H)));
            head = register_module("head", std::make_shared<nn::Dense>(H, 1));
        }
        Tensor forward(const Tensor& x) { return head->forward(rnn->forward(x).output.select(0, -1)); }
    } net(nn::cell_kind_from_name(cell), hidden);
    optim::Adam opt(net.parameters(), optim::AdamOptions(lr));
    optim::CosineAnnealingLR schedule(opt, epochs, lr / 10);
    train::FitOptions options;
    options.epochs = epochs;
    options.batch_size = 64;
    options.seed = static_cast<std::uint64_t>(seed);
    options.clip_grad_norm = 1.0;
    options.log = "forecast_metrics.jsonl";
    const auto forward = [&](const train::Batch& b) { return net.forward(b.input); };
    const auto loss = [](const Tensor& out, const train::Batch& b) { return nn::mse_loss(out, b.target); };
    const auto history = train::fit(net, opt, forward, loss, train_set, val_set, options, &schedule);

    // One-day-ahead forecasts of every test day, each from the true days before it.
    std::vector<std::int64_t> starts;
    for (std::int64_t d = test_start; d < N; ++d) starts.push_back(d - window);
    std::vector<double> predicted;
    {
        NoGradGuard no_grad;
        net.eval();
        const Tensor p = net.forward(windows(starts).input);
        for (std::int64_t i = 0; i < p.size(0); ++i) predicted.push_back(p.select(0, i).item<double>() * scale + mean);
    }
    double se = 0, ape = 0, se_naive = 0, ape_naive = 0;
    std::vector<double> days, truth, naive;
    for (std::int64_t i = 0; i < test_days; ++i) {
        const std::int64_t d = test_start + i;
        const double actual = series[d], seasonal = series[d - 7];
        se += (predicted[i] - actual) * (predicted[i] - actual);
        ape += std::abs(predicted[i] - actual) / actual;
        se_naive += (seasonal - actual) * (seasonal - actual);
        ape_naive += std::abs(seasonal - actual) / actual;
        days.push_back(double(i + 1)), truth.push_back(actual), naive.push_back(seasonal);
    }
    const double n = double(test_days);
    const double rmse = std::sqrt(se / n), rmse_naive = std::sqrt(se_naive / n);
    std::printf("\ntest period: the last %lld days (%s)\n", (long long)test_days, synthetic ? "synthetic series" : csv.c_str());
    std::printf("%-28s %10s %8s\n", "model", "RMSE", "MAPE");
    std::printf("%-28s %10.1f %7.2f%%\n", fmt::format("{} (hidden {}, window {})", cell, hidden, window).c_str(), rmse,
                100 * ape / n);
    std::printf("%-28s %10.1f %7.2f%%\n", "seasonal naive (a week ago)", rmse_naive, 100 * ape_naive / n);
    std::printf("%s\n", rmse < rmse_naive ? "the network beats the seasonal-naive baseline"
                                          : "the network does not beat the seasonal-naive baseline");
    train::plot_svg(chart, "one-day-ahead forecast, test period", "day", synthetic ? "value" : "births",
                    {{"truth", days, truth}, {cell, days, predicted}, {"seasonal naive", days, naive}});
    std::printf("chart: %s, metrics: %s, best epoch %lld\n", chart.c_str(), options.log.c_str(),
                (long long)history.best_epoch);
    std::printf("train_loss_first %.5f\ntrain_loss_last %.5f\n", history.epochs.front().at("train_loss"),
                history.epochs.back().at("train_loss"));
    std::printf("test_rmse %.2f\nbaseline_rmse %.2f\n", rmse, rmse_naive);
    return 0;
}
