// Extending loom from outside the library: a new differentiable op and a new optimizer, each
// checked the way loom checks its own. The README's "Extending loom" section quotes this file.
// Exits non-zero unless the op passes gradcheck and the optimizer learns.
#include <loom/loom.hpp>

#include <cmath>
#include <cstdio>

using namespace loom;

// ---- a new op: softsign(x) = x / (1 + |x|), with its backward written by hand ----
// The forward computes without recording; record() puts one entry on the tape when an input
// requires grad, saving x for backward (with the same in-place check as built-in ops).
Tensor softsign(const Tensor& x)
{
    Tensor out;
    {
        NoGradGuard no_grad;
        out = x / (abs(x) + 1.0);
    }
    return autograd::record("softsign", {x}, out, {x}, [](const autograd::BackwardContext& c) {
        const Tensor& saved_x = c.saved[0];
        const Tensor d = 1.0 / (abs(saved_x) + 1.0);  // d softsign / dx = 1 / (1 + |x|)^2
        return std::vector<Tensor>{c.grad() * d * d};
    });
}

// ---- a new optimizer: Adamax (Kingma & Ba 2015, section 7.1), as torch.optim.Adamax ----
class AdamaxOptions {
    LOOM_OPTION(double, lr, 2e-3)
    LOOM_OPTION(double, beta1, 0.9)
    LOOM_OPTION(double, beta2, 0.999)
    LOOM_OPTION(double, eps, 1e-8)
public:
    AdamaxOptions() = default;
    explicit AdamaxOptions(double lr) : lr_(lr) {}
};

// Found by OptimizerWith's constructor, which validates every group's options.
void validate_options(const AdamaxOptions& o)
{
    LOOM_CHECK(o.lr() >= 0 && o.eps() >= 0 && o.beta1() >= 0 && o.beta1() < 1 && o.beta2() >= 0 && o.beta2() < 1,
               "Adamax", "invalid options: lr {}, betas ({}, {}), eps {}", o.lr(), o.beta1(), o.beta2(), o.eps());
}

// The state, listed once: the update, state_keys() and checkpoints all go through fields().
struct AdamaxState {
    Tensor exp_avg, exp_inf;
    static auto fields()
    {
        return std::array{optim::StateField<AdamaxState>{"exp_avg", &AdamaxState::exp_avg},
                          optim::StateField<AdamaxState>{"exp_inf", &AdamaxState::exp_inf}};
    }
};

class Adamax : public optim::OptimizerWith<AdamaxOptions, AdamaxState> {
public:
    Adamax(std::vector<Tensor> params, AdamaxOptions options = {})
        : OptimizerWith(std::vector<optim::ParamGroup<AdamaxOptions>>{{std::move(params), options}}) {}
    std::string name() const override { return "Adamax"; }

private:
    // One parameter; the base class has already checked the gradient and the state, runs this
    // under NoGradGuard, and counts `step`.
    void update(const Tensor& p, const Tensor& grad, AdamaxState& s, const AdamaxOptions& o, double lr,
                std::int64_t step) override
    {
        Tensor& m = optim::state_tensor(s.exp_avg, p);
        Tensor& u = optim::state_tensor(s.exp_inf, p);
        m.mul_(o.beta1()).add_(grad, 1 - o.beta1());
        u.copy_(maximum(u * o.beta2(), abs(grad) + o.eps()));
        Tensor(p).add_(m / u, -lr / (1 - std::pow(o.beta1(), double(step))));
    }
};

int main()
{
    manual_seed(0);

    // 1. The op's gradient against finite differences, in float64, at points away from 0.
    const Tensor x = randn({3, 4}, kFloat64).requires_grad_();
    const GradcheckResult check = gradcheck([](const std::vector<Tensor>& v) { return softsign(v[0]); }, {x});
    std::printf("softsign %s\n", check.report().c_str());

    // 2. The optimizer fits y = tanh(2x - 1) with a softsign network.
    const Tensor inputs = randn({256, 1}), targets = tanh(inputs * 2.0 - 1.0);
    nn::Dense hidden(1, 16), out(16, 1);
    std::vector<Tensor> params = hidden.parameters();
    for (const Tensor& p : out.parameters()) params.push_back(p);
    Adamax opt(params, AdamaxOptions(0.02));
    double first = 0, last = 0;
    for (int step = 0; step < 300; ++step) {
        opt.zero_grad();
        const Tensor loss = nn::mse_loss(out(softsign(hidden(inputs))), targets);
        loss.backward();
        opt.step();
        (step == 0 ? first : last) = loss.item<double>();
    }
    std::printf("Adamax: mse %.4f -> %.5f in 300 steps; state kinds:", first, last);
    for (const auto& k : opt.state_keys()) std::printf(" %s", k.c_str());
    std::printf("\n");
    const bool learned = last < first / 10;
    std::printf("%s\n", check.ok && learned ? "extending: op and optimizer work" : "extending: FAILED");
    return check.ok && learned ? 0 : 1;
}
