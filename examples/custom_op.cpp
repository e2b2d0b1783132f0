// Your own differentiable op through autograd::Function: forward and backward in one struct.
// Two ops whose backward you can only get by hand:
//   log_cosh  log(cosh(x)) computed without overflow (the naive formula is inf past |x| ~ 710),
//             a robust regression loss; its backward is written with loom's ops, so it also
//             has second derivatives (create_graph).
//   binarize  sign(x) with a straight-through gradient (Bengio et al. 2013): the true
//             derivative is 0 almost everywhere, so backward passes the gradient through where
//             |x| <= 1 instead. It trains weights that are exactly +1 or -1.
// Exits non-zero unless both ops pass their checks and both fits work.
#include <loom/loom.hpp>

#include <cmath>
#include <cstdio>

using namespace loom;

struct LogCosh : autograd::Function<LogCosh> {
    static constexpr const char* name = "log_cosh";
    static Tensor forward(autograd::AutogradContext* ctx, const Tensor& x)
    {
        ctx->save_for_backward({x});
        const Tensor a = abs(x);  // log cosh x = |x| + log(1 + e^{-2|x|}) - log 2
        return a + log(1.0 + exp(-2.0 * a)) - std::log(2.0);
    }
    static std::vector<Tensor> backward(autograd::AutogradContext* ctx, const std::vector<Tensor>& grad_outputs)
    {
        return {grad_outputs[0] * tanh(ctx->get_saved_variables()[0])};
    }
};

struct Binarize : autograd::Function<Binarize> {
    static constexpr const char* name = "binarize";
    static Tensor forward(autograd::AutogradContext* ctx, const Tensor& x)
    {
        ctx->save_for_backward({x});
        return where(ge(x, zeros({}, x.dtype())), ones({}, x.dtype()), -ones({}, x.dtype()));
    }
    static std::vector<Tensor> backward(autograd::AutogradContext* ctx, const std::vector<Tensor>& grad_outputs)
    {
        const Tensor& x = ctx->get_saved_variables()[0];
        return {masked_fill(grad_outputs[0], gt(abs(x), ones({}, x.dtype())), 0.0)};
    }
};

int main()
{
    manual_seed(0);
    bool ok = true;

    // 1. log_cosh: first and second derivatives against finite differences, and its range.
    const Tensor x = randn({5}, kFloat64).requires_grad_();
    const auto f = [](const std::vector<Tensor>& v) { return LogCosh::apply(v[0]); };
    const GradcheckResult first = gradcheck(f, {x}), second = gradgradcheck(f, {x});
    std::printf("log_cosh first order:  %s\nlog_cosh second order: %s\n", first.report().c_str(),
                second.report().c_str());
    const Tensor big = from_vector<double>({-800.0, 3.0, 800.0}, {3});
    const Tensor naive = log((exp(big) + exp(-big)) / 2.0), stable = LogCosh::apply(big);
    std::printf("at x = -800, 3, 800: naive %s, log_cosh %s\n", fmt::format("{}", naive.data_ptr<double>()[0]).c_str(),
                fmt::format("{:.4f} {:.4f} {:.4f}", stable.data_ptr<double>()[0], stable.data_ptr<double>()[1],
                            stable.data_ptr<double>()[2])
                    .c_str());
    ok = ok && first.ok && second.ok && std::isfinite(stable.data_ptr<double>()[0]);

    // 2. A line y = 2x + 1 with 10% gross outliers, fitted with MSE and with log-cosh.
    const Tensor xs = uniform({200, 1}, -2, 2);
    Tensor ys = xs * 2.0 + 1.0 + randn({200, 1}) * 0.1;
    {
        NoGradGuard no_grad;
        ys.narrow(0, 0, 20).add_(ones({20, 1}) * 30.0);  // every tenth point far off the line
    }
    const auto fit = [&](bool robust) {
        nn::Dense line(1, 1);
        optim::Adam opt(line.parameters(), optim::AdamOptions(0.05));
        for (int step = 0; step < 600; ++step) {
            opt.zero_grad();
            const Tensor residual = line(xs) - ys;
            const Tensor loss = robust ? LogCosh::apply(residual).mean() : (residual * residual).mean();
            loss.backward();
            opt.step();
        }
        return std::pair{line.weight.item<float>(), line.bias.item<float>()};
    };
    const auto [w_mse, b_mse] = fit(false);
    const auto [w_lc, b_lc] = fit(true);
    std::printf("y = 2x + 1 with 10%% outliers: MSE fits %.3fx + %.3f, log_cosh fits %.3fx + %.3f\n", w_mse, b_mse,
                w_lc, b_lc);
    ok = ok && std::abs(w_lc - 2) < 0.2 && std::abs(b_lc - 1) < 0.3 && std::abs(b_mse - 1) > 1;

    // 3. Binary weights with the straight-through estimator: y = X sign(w), w in {-1, +1}^16.
    const Tensor truth = where(gt(randn({16, 1}), zeros({})), ones({}), -ones({}));
    const Tensor inputs = randn({256, 16}), targets = matmul(inputs, truth);
    const Tensor latent = (randn({16, 1}) * 0.1).requires_grad_();
    optim::Adam opt({latent}, optim::AdamOptions(0.01));
    double loss_first = 0, loss_last = 0;
    for (int step = 0; step < 300; ++step) {
        opt.zero_grad();
        const Tensor residual = matmul(inputs, Binarize::apply(latent)) - targets;
        const Tensor loss = (residual * residual).mean();
        loss.backward();
        opt.step();
        (step == 0 ? loss_first : loss_last) = loss.item<double>();
    }
    const std::int64_t wrong = ne(Binarize::apply(latent.detach()), truth).to(kInt64).sum().item<std::int64_t>();
    std::printf("binarize: mse %.3f -> %.3f in 300 steps; %lld of 16 signs wrong\n", loss_first, loss_last,
                static_cast<long long>(wrong));
    ok = ok && wrong == 0;

    std::printf("%s\n", ok ? "custom_op: both ops check out and both fits work" : "custom_op: FAILED");
    return ok ? 0 : 1;
}
