// gradient_flow: the picture the classic papers on vanishing and exploding gradients are about
// (Bengio, Simard & Frasconi 1994; Hochreiter & Schmidhuber 1997; Pascanu, Mikolov & Bengio 2013),
// measured from loom's fused layers with state_gradient_hook, on the adding problem (T = 100).
//   1. |dL/dh_t| at every step t for a tanh RNN, an LSTM and a GRU, at initialisation and after
//      training: a table at t = T, T-10, ..., 1 and one SVG on a log scale.
//   2. Exploding gradients: a ReLU RNN with large recurrent weights, trained with and without
//      clip_grad_norm: gradient norm and loss per step, as two SVGs.
//   3. A deep stack of 4 tanh RNN layers with and without residual connections between layers:
//      |dL/dh_t| reaching each layer, as a table and an SVG.
// Every chart also goes into one page, gradient_flow.html, with the curves of parts 1 and 3 as
// heatmaps (a row per model or layer, a column per time step).
#include <loom/loom.hpp>

#include <CLI/CLI.hpp>

#include <cmath>
#include <cstdio>

#include "adding_data.hpp"

using namespace loom;

namespace {

std::vector<double> as_doubles(const Tensor& t)
{
    const Tensor c = t.to(kFloat64).contiguous();
    return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

// log10 of each value, for a chart on a log scale; -inf (a zero) becomes NaN, which plot_svg skips.
train::Series log_series(std::string name, const std::vector<double>& values)
{
    train::Series s{std::move(name), {}, {}};
    for (std::size_t t = 0; t < values.size(); ++t) {
        s.x.push_back(double(t + 1));
        s.y.push_back(values[t] > 0 ? std::log10(values[t]) : NAN);
    }
    return s;
}

// A recurrent layer over the adding problem's input and a linear head on its last output.
struct Model : nn::Module {
    Model(nn::CellKind kind, std::int64_t hidden, nn::Nonlinearity nl = nn::Nonlinearity::Tanh)
    {
        rnn = std::make_shared<nn::RecurrentLayer>(kind, nn::RecurrentOptions(2, hidden).nonlinearity(nl));
        if (kind == nn::CellKind::LSTM) nn::lstm_forget_bias_(*rnn);
        head = std::make_shared<nn::Dense>(hidden, 1);
        register_child("rnn", rnn);
        register_child("head", head);
    }
    Tensor operator()(const Tensor& x) { return (*head)((*rnn)(x).output.select(0, x.size(0) - 1)); }
    std::shared_ptr<nn::RecurrentLayer> rnn;
    std::shared_ptr<nn::Dense> head;
};

// |dL/dh_t| for t = 1..T on one batch: the hook hands over dL/dh_t [T, B, H]; step_norms makes the curve.
std::vector<double> gradient_curve(Model& model, const Tensor& x, const Tensor& y)
{
    std::vector<double> curve;
    model.rnn->state_gradient_hook = [&](std::int64_t, std::int64_t, const nn::State& grads) {
        curve = as_doubles(nn::step_norms(grads[0]));
    };
    model.zero_grad();
    nn::mse_loss(model(x), y).backward();
    model.rnn->state_gradient_hook = nullptr;
    model.zero_grad();
    return curve;
}

double train_model(Model& model, std::int64_t T, std::int64_t steps, double lr, Generator& gen)
{
    optim::Adam opt(model.parameters(), optim::AdamOptions(lr));
    double loss = 0;
    for (std::int64_t step = 0; step < steps; ++step) {
        const auto [x, y] = adding_batch(T, 64, gen);
        opt.zero_grad();
        const Tensor l = nn::mse_loss(model(x), y);
        l.backward();
        nn::utils::clip_grad_norm(model.parameters(), 1.0);
        opt.step();
        loss = l.item<double>();
    }
    return loss;
}

double test_mse(Model& model, const Tensor& x, const Tensor& y)
{
    NoGradGuard no_grad;
    return nn::mse_loss(model(x), y).item<double>();
}

// The rows t = T, T-10, ..., 1 (1-based) of the first table.
std::vector<std::int64_t> table_steps(std::int64_t T)
{
    std::vector<std::int64_t> rows;
    for (std::int64_t t = T; t >= 1; t -= 10) rows.push_back(t);
    if (rows.back() != 1) rows.push_back(1);
    return rows;
}

}  // namespace

int main(int argc, char** argv)
{
    CLI::App app{"gradient flow through time in RNN, LSTM and GRU layers"};
    std::int64_t T = 100, hidden = 64, steps = 1200, seed = 1, explode_T = 30, explode_steps = 60;
    double lr = 5e-3, explode_scale = 1.05, explode_lr = 0.003;
    std::string out = ".";
    app.add_option("--length", T, "sequence length T")->check(CLI::Range(20, 10000));
    app.add_option("--hidden", hidden, "hidden size")->check(CLI::PositiveNumber);
    app.add_option("--steps", steps, "training steps per model in parts 1 and 3")->check(CLI::NonNegativeNumber);
    app.add_option("--lr", lr, "Adam learning rate in part 1")->check(CLI::PositiveNumber);
    app.add_option("--seed", seed, "random seed");
    app.add_option("--explode-scale", explode_scale, "part 2: W_hh = scale * I")->check(CLI::PositiveNumber);
    app.add_option("--explode-length", explode_T, "part 2: sequence length")->check(CLI::Range(2, 10000));
    app.add_option("--explode-lr", explode_lr, "part 2: SGD learning rate")->check(CLI::PositiveNumber);
    app.add_option("--out", out, "folder for the SVG charts and the HTML report")->check(CLI::ExistingDirectory);
    CLI11_PARSE(app, argc, argv);
    manual_seed(std::uint64_t(seed));
    Generator data_gen(std::uint64_t(seed) + 1), probe_gen(std::uint64_t(seed) + 2);
    const auto [x_probe, y_probe] = adding_batch(T, 256, probe_gen);  // one fixed batch to measure on
    train::HtmlReport report(out + "/gradient_flow.html");
    report.set_title("Gradient flow through time: the adding problem, T = " + std::to_string(T));

    // ---- 1. vanishing gradients: RNN vs LSTM vs GRU, before and after training ----
    std::printf("1. |dL/dh_t| on the adding problem, T = %lld, hidden %lld, %lld Adam steps of 64 sequences\n",
                (long long)T, (long long)hidden, (long long)steps);
    std::vector<std::pair<std::string, std::vector<double>>> curves;
    std::vector<train::Series> chart;
    std::vector<std::pair<std::string, double>> mses;
    for (const auto kind : {nn::CellKind::RNN, nn::CellKind::LSTM, nn::CellKind::GRU}) {
        Model model(kind, hidden);
        const std::string name = nn::cell_kind_name(kind);
        const auto before = gradient_curve(model, x_probe, y_probe);
        train_model(model, T, steps, lr, data_gen);
        const auto after = gradient_curve(model, x_probe, y_probe);
        mses.emplace_back(name, test_mse(model, x_probe, y_probe));
        curves.emplace_back(name + " init", before);
        curves.emplace_back(name + " trained", after);
        chart.push_back(log_series(name + " at init", before));
        chart.push_back(log_series(name + " trained", after));
    }
    std::printf("%6s", "t");
    for (const auto& [name, _] : curves) std::printf("  %13s", name.c_str());
    std::printf("\n");
    for (std::int64_t t : table_steps(T)) {
        std::printf("%6lld", (long long)t);
        for (const auto& [_, c] : curves) std::printf("  %13.3e", c[std::size_t(t - 1)]);
        std::printf("\n");
    }
    std::printf("|dL/dh_1| / |dL/dh_T|:");
    for (const auto& [name, c] : curves) std::printf("  %s %.1e", name.c_str(), c.front() / c.back());
    std::printf("\nmse after training (predicting 1 scores about 0.167):");
    for (const auto& [name, m] : mses) std::printf("  %s %.4f", name.c_str(), m);
    std::printf("\n");
    train::plot_svg(out + "/gradient_flow.svg", "|dL/dh_t| through time, adding problem T = " + std::to_string(T),
                    "time step t", "log10 |dL/dh_t|", chart);
    report.add_chart("1. |dL/dh_t| through time, RNN, LSTM and GRU", "time step t", "log10 |dL/dh_t|", chart);
    std::vector<std::string> names;
    std::vector<std::vector<double>> rows;
    for (const auto& [name, c] : curves) names.push_back(name), rows.push_back(c);
    report.add_heatmap("1. |dL/dh_t| as a heatmap: a row per model", "time step t", "model", names, rows);

    // ---- 2. exploding gradients: a ReLU RNN with large recurrent weights, clipped or not ----
    std::printf("\n2. exploding gradients: ReLU RNN with W_hh = %.2f I, T = %lld, SGD lr %.3g\n", explode_scale,
                (long long)explode_T, explode_lr);
    std::vector<train::Series> norm_chart, loss_chart;
    for (const bool clip : {false, true}) {
        manual_seed(std::uint64_t(seed) + 10);
        Model model(nn::CellKind::RNN, hidden, nn::Nonlinearity::ReLU);
        {
            NoGradGuard no_grad;
            // W_hh = a I with a > 1: every unit that stays positive grows by a per step, and so
            // does its gradient (the identity-initialised ReLU RNN of Le et al. 2015, pushed past 1).
            Tensor(model.rnn->weights(0, 0).w_hh).copy_(eye(hidden) * explode_scale);
        }
        optim::SGD opt(model.parameters(), optim::SGDOptions(explode_lr));
        Generator gen(std::uint64_t(seed) + 11);
        train::Series norms{clip ? "clipped at 1" : "not clipped", {}, {}}, losses = norms;
        for (std::int64_t step = 1; step <= explode_steps; ++step) {
            const auto [x, y] = adding_batch(explode_T, 64, gen);
            opt.zero_grad();
            const Tensor l = nn::mse_loss(model(x), y);
            l.backward();
            // The norm before clipping; a non-finite one is recorded, not an error, as this is what we show.
            const double norm = nn::utils::clip_grad_norm(model.parameters(), clip ? 1.0 : INFINITY, 2, false);
            norms.x.push_back(double(step));
            norms.y.push_back(std::log10(norm));
            losses.x.push_back(double(step));
            losses.y.push_back(std::log10(l.item<double>()));
            if (!std::isfinite(norm)) break;  // diverged: every later step is NaN
            opt.step();
        }
        std::printf("%-12s gradient norm | loss at steps", norms.name.c_str());
        for (std::size_t step : {1, 2, 3, 5, 10, 20, 40, 60})
            if (step <= norms.y.size())
                std::printf("  %zu: %.3g | %.3g", step, std::pow(10.0, norms.y[step - 1]), std::pow(10.0, losses.y[step - 1]));
        if (!std::isfinite(norms.y.back())) std::printf("  -> diverged at step %zu", norms.y.size());
        std::printf("\n");
        norm_chart.push_back(norms);
        loss_chart.push_back(losses);
    }
    train::plot_svg(out + "/exploding_gradient_norm.svg", "gradient norm per step, ReLU RNN with large W_hh",
                    "training step", "log10 gradient norm (before clipping)", norm_chart);
    train::plot_svg(out + "/exploding_loss.svg", "loss per step, ReLU RNN with large W_hh", "training step",
                    "log10 training loss", loss_chart);
    report.add_chart("2. Gradient norm per step, ReLU RNN with large W_hh", "training step",
                     "log10 gradient norm (before clipping)", norm_chart);
    report.add_chart("2. Loss per step, ReLU RNN with large W_hh", "training step", "log10 training loss", loss_chart);

    // ---- 3. a deep stack: 4 tanh RNN layers, with and without residual connections ----
    const std::int64_t depth = 4;
    std::printf("\n3. %lld stacked tanh RNN layers (hidden %lld), |dL/dh_t| reaching each layer at initialisation\n",
                (long long)depth, (long long)hidden);
    std::vector<train::Series> deep_chart;
    std::vector<std::string> deep_names;
    std::vector<std::vector<double>> deep_rows;
    std::printf("%-12s %6s %12s %12s %12s\n", "stack", "layer", "|dL/dh_T|", "|dL/dh_T/2|", "|dL/dh_1|");
    for (const bool residual : {false, true}) {
        manual_seed(std::uint64_t(seed) + 20);
        nn::Dense in(2, hidden), head(hidden, 1);
        std::vector<std::shared_ptr<nn::RNN>> layers;
        for (std::int64_t l = 0; l < depth; ++l) layers.push_back(std::make_shared<nn::RNN>(nn::RNNOptions(hidden, hidden)));
        std::vector<std::vector<double>> per_layer(static_cast<std::size_t>(depth));
        for (std::int64_t l = 0; l < depth; ++l)
            layers[std::size_t(l)]->state_gradient_hook = [&, l](std::int64_t, std::int64_t, const nn::State& g) {
                per_layer[std::size_t(l)] = as_doubles(nn::step_norms(g[0]));
            };
        Tensor h = in(x_probe);
        for (auto& layer : layers) {
            const Tensor y = (*layer)(h).output;
            h = residual ? h + y : y;
        }
        nn::mse_loss(head(h.select(0, T - 1)), y_probe).backward();
        const char* name = residual ? "residual" : "plain";
        for (std::int64_t l = 0; l < depth; ++l) {
            const auto& c = per_layer[std::size_t(l)];
            std::printf("%-12s %6lld %12.3e %12.3e %12.3e\n", name, (long long)(l + 1), c.back(), c[std::size_t(T / 2 - 1)],
                        c.front());
        }
        for (std::int64_t l = 0; l < depth; ++l) {
            deep_names.push_back(fmt::format("{} {}", name, l + 1));
            deep_rows.push_back(per_layer[std::size_t(l)]);
        }
        deep_chart.push_back(log_series(std::string(name) + ", layer 1", per_layer.front()));
        deep_chart.push_back(log_series(std::string(name) + ", layer 4", per_layer.back()));
    }
    train::plot_svg(out + "/deep_stack.svg", "|dL/dh_t| in a 4-layer tanh RNN, with and without residual connections",
                    "time step t", "log10 |dL/dh_t|", deep_chart);
    report.add_chart("3. |dL/dh_t| in a 4-layer tanh RNN, with and without residual connections", "time step t",
                     "log10 |dL/dh_t|", deep_chart);
    report.add_heatmap("3. |dL/dh_t| reaching each layer of the stack", "time step t", "stack, layer", deep_names,
                       deep_rows);
    report.write();
    std::printf("\ncharts: %s/gradient_flow.svg, %s/exploding_gradient_norm.svg, %s/exploding_loss.svg, %s/deep_stack.svg\n"
                "report: %s\n",
                out.c_str(), out.c_str(), out.c_str(), out.c_str(), report.path().c_str());
    return 0;
}
