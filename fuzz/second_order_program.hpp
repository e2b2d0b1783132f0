// Runs bytes as a program of smooth differentiable ops on a float64 input x [2, 3] (element-wise
// ops, broadcasting, reductions, matmul and linear, views and regions, joins, gathers, softmax,
// losses), then checks second derivatives against finite differences: the Hessian-vector product
// from grad(create_graph) and a second grad() must equal the central difference of the first
// gradient along v, in float64. Every op is smooth where it is used (divisors and logarithms
// see positive values, masks come from constants), so a mismatch is a wrong second derivative.
// fuzz_second_order.cpp runs it under libFuzzer; tests/test_fuzz_corpus.cpp replays its corpus.
#pragma once
#include <loom/loom.hpp>

#include <cmath>
#include <cstdint>
#include <optional>
#include <span>
#include <string>

namespace loom_fuzz {

using namespace loom;

class SecondOrderProgram {
public:
    explicit SecondOrderProgram(std::span<const std::uint8_t> bytes) : bytes_(bytes) {}

    // A description of the first mismatch, or nothing when every check passed (or the program
    // computes nothing that can be checked: values too large, or no dependence on x).
    std::optional<std::string> run()
    {
        Generator gen(7);
        const Tensor x0 = uniform({2, 3}, -1, 1, kFloat64, &gen);
        const Tensor v = uniform({2, 3}, -1, 1, kFloat64, &gen);
        constants_ = {uniform({2, 3}, -1, 1, kFloat64, &gen), uniform({3}, 0.5, 1.5, kFloat64, &gen),
                      uniform({3, 4}, -1, 1, kFloat64, &gen), uniform({2, 1}, -1, 1, kFloat64, &gen)};

        const Tensor x = x0.clone().requires_grad_();
        const Tensor f = build(x);
        if (!f.defined() || !f.requires_grad() || !std::isfinite(f.item<double>()) || std::abs(f.item<double>()) > 1e6)
            return std::nullopt;
        const Tensor g = first_gradient(f, x, true);
        const Tensor gv = (g * v).sum();
        if (!gv.requires_grad()) return std::nullopt;  // f is linear in x: its Hessian is zero, nothing to compare
        const Tensor hv = grad({gv}, {x}, {}, false, false, /*allow_unused=*/true)[0];
        const Tensor hv_values = hv.defined() ? hv.detach() : zeros({2, 3}, kFloat64);

        // Central differences of the first gradient along v.
        const double h = 1e-5;
        const auto gradient_at = [&](double step) {
            const Tensor xs = (x0 + v * step).requires_grad_();
            return first_gradient(build(xs), xs, false).detach();
        };
        const Tensor numeric = (gradient_at(h) - gradient_at(-h)) / (2 * h);
        const Tensor a = hv_values.contiguous(), n = numeric.contiguous();
        for (std::int64_t i = 0; i < 6; ++i) {
            const double av = a.data_ptr<double>()[i], nv = n.data_ptr<double>()[i];
            if (!std::isfinite(av) || !std::isfinite(nv) || std::abs(nv) > 1e4) return std::nullopt;
            if (std::abs(av - nv) > 1e-4 * (1 + std::abs(nv)))
                return "Hessian-vector product element " + std::to_string(i) + ": analytic " + std::to_string(av) +
                       ", numeric " + std::to_string(nv) + "\nprogram:" + trace_;
        }
        return std::nullopt;
    }

private:
    std::span<const std::uint8_t> bytes_;
    std::size_t at_ = 0;
    std::vector<Tensor> constants_;
    std::vector<Tensor> pool_;
    std::string trace_;  // the ops of the last build, for a report

    std::uint8_t next() { return at_ < bytes_.size() ? bytes_[at_++] : 0; }

    static Tensor first_gradient(const Tensor& f, const Tensor& x, bool create_graph)
    {
        const Tensor g = grad({f}, {x}, {}, false, create_graph, /*allow_unused=*/true)[0];
        return g.defined() ? g : zeros(x.sizes(), kFloat64);
    }

    // The same ops, in the same order, on any x: the bytes are read afresh each time.
    Tensor build(const Tensor& x)
    {
        at_ = 0;
        trace_.clear();
        pool_ = {x, x * 0.5, constants_[0]};
        for (int ops = 0; ops < 24 && at_ < bytes_.size(); ++ops) {
            const std::uint8_t op = next();
            try {
                step(op);
            } catch (const Error&) {
                trace_ += " (refused)";  // shapes that do not fit: the same for every x
            }
        }
        Tensor f = zeros({}, kFloat64);
        for (std::size_t k = 0; k < pool_.size(); ++k)
            if (pool_[k].requires_grad()) f = f + pool_[k].sum() * (1.0 / double(k + 1));
        return f;
    }

    Tensor& pick() { return pool_[next() % pool_.size()]; }
    void put(Tensor t)
    {
        if (t.numel() > 64 || t.dtype() != kFloat64) return;
        if (pool_.size() < 8) pool_.push_back(std::move(t));
        else pool_[next() % pool_.size()] = std::move(t);
    }
    // A positive value from any value, smooth: 1 + a^2.
    static Tensor positive(const Tensor& a) { return a * a + 1.0; }
    std::int64_t dim_of(const Tensor& a) { return a.dim() == 0 ? 0 : std::int64_t(next() % a.dim()); }

    void step(std::uint8_t op)
    {
        switch (op % 24) {
        case 0: trace_ += " add"; put(pick() + pick()); return;
        case 1: trace_ += " sub"; put(pick() - pick()); return;
        case 2: trace_ += " mul"; put(pick() * pick()); return;
        case 3: trace_ += " div"; put(pick() / positive(pick())); return;
        case 4: trace_ += " tanh"; put(tanh(pick())); return;
        case 5: trace_ += " sigmoid"; put(sigmoid(pick())); return;
        case 6: trace_ += " exp"; put(exp(tanh(pick()))); return;
        case 7: trace_ += " log"; put(log(positive(pick()))); return;
        case 8: trace_ += " sqrt"; put(sqrt(positive(pick()))); return;
        case 9: {
            const int e = 2 + next() % 3;
            trace_ += " pow" + std::to_string(e);
            put(pow(pick(), double(e)));
            return;
        }
        case 10: {
            const Tensor& a = pick();
            trace_ += " sum_dim";
            put(sum(a, {dim_of(a)}, next() % 2));
            return;
        }
        case 11: {
            const Tensor& a = pick();
            trace_ += " mean_dim";
            put(mean(a, {dim_of(a)}, next() % 2));
            return;
        }
        case 12: trace_ += " matmul"; put(matmul(pick(), constants_[2])); return;
        case 13: trace_ += " matmul2"; put(matmul(pick(), pick().t())); return;
        case 14: trace_ += " linear"; put(linear(pick(), pick(), constants_[1])); return;
        case 15: {
            const Tensor& a = pick();
            const std::int64_t d = dim_of(a);
            trace_ += " select";
            put(a.select(d, a.dim() ? next() % a.size(d) : 0));
            return;
        }
        case 16: {
            const Tensor& a = pick();
            const std::int64_t d = dim_of(a);
            trace_ += " narrow";
            put(a.narrow(d, 0, a.dim() ? 1 + next() % a.size(d) : 1));
            return;
        }
        case 17: trace_ += " transpose"; put(pick().t()); return;
        case 18: {
            const Tensor& a = pick();
            trace_ += " reshape";
            put(a.reshape({-1}));
            return;
        }
        case 19: {
            const Tensor &a = pick(), &b = pick();
            trace_ += " concat";
            put(next() % 2 ? concat({a, b}, 0) : stack({a, b}, 0));
            return;
        }
        case 20: {
            const Tensor& a = pick();
            trace_ += " softmax";
            put(next() % 2 ? softmax(a, dim_of(a)) : log_softmax(a, dim_of(a)));
            return;
        }
        case 21: {
            const Tensor& a = pick();
            const std::int64_t d = dim_of(a);
            trace_ += " index_select";
            const Tensor index = from_vector<std::int64_t>({0, 0}, {2});  // a repeated index sums gradients
            put(a.index_select(d, index));
            return;
        }
        case 22: {
            const Tensor &a = pick(), &b = pick();
            trace_ += " where";
            put(where(gt(constants_[0], zeros_like(constants_[0])), a, b));  // a mask from a constant: smooth in x
            return;
        }
        default: trace_ += " mse"; put(nn::mse_loss(pick(), pick())); return;
        }
    }
};

}  // namespace loom_fuzz
