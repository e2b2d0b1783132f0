// W7 of the benchmark, the ADBench LSTM objective: loom's tensor-op version computes what the
// plain C++ loops compute, and its gradient matches central finite differences of those loops.
#include <doctest/doctest.h>

#include "../bench/adbench_lstm.hpp"

using namespace loom;

TEST_CASE("the tensor-op objective equals the plain loops to float64 rounding")
{
    const adbench::LstmInput input = adbench::make_lstm_input(2, 200, 14);
    const adbench::LstmTensors x = adbench::to_tensors(input);
    const double plain = adbench::lstm_objective_plain(input);
    const double loom_value = adbench::lstm_objective(x.main, x.extra, x.state, x.sequence).item<double>();
    CHECK(plain > 0.5);  // a real log-likelihood, not a cancellation near zero
    CHECK(std::abs(loom_value - plain) <= 1e-12 * std::abs(plain));
}

TEST_CASE("the gradient matches finite differences of the plain objective in every parameter")
{
    adbench::LstmInput input = adbench::make_lstm_input(2, 12, 14);
    adbench::LstmTensors x = adbench::to_tensors(input);
    x.main.requires_grad_();
    x.extra.requires_grad_();
    adbench::lstm_objective(x.main, x.extra, x.state, x.sequence).backward();
    const auto check = [&](std::vector<double>& values, const Tensor& grad) {
        const Tensor flat = grad.reshape({-1});
        REQUIRE(flat.numel() == std::int64_t(values.size()));
        double largest = 0;
        for (std::size_t i = 0; i < values.size(); ++i) {
            const double h = 1e-6, saved = values[i];
            values[i] = saved + h;
            const double up = adbench::lstm_objective_plain(input);
            values[i] = saved - h;
            const double down = adbench::lstm_objective_plain(input);
            values[i] = saved;
            const double numeric = (up - down) / (2 * h), analytic = flat.select(0, std::int64_t(i)).item<double>();
            CHECK(std::abs(numeric - analytic) <= 1e-8 + 1e-6 * std::abs(numeric));
            largest = std::max(largest, std::abs(analytic));
        }
        CHECK(largest > 1e-3);  // the check compared real gradients, not zeros
    };
    check(input.main, x.main.grad());
    check(input.extra, x.extra.grad());
}

TEST_CASE("the objective written with scan gives the same value and gradient")
{
    const adbench::LstmInput input = adbench::make_lstm_input(2, 40, 14);
    adbench::LstmTensors x = adbench::to_tensors(input);
    x.main.requires_grad_();
    x.extra.requires_grad_();
    const Tensor ops = adbench::lstm_objective(x.main, x.extra, x.state, x.sequence);
    const std::vector<Tensor> g_ops = grad({ops}, {x.main, x.extra});
    const Tensor scanned = adbench::lstm_objective_scan(x.main, x.extra, x.state, x.sequence);
    const std::vector<Tensor> g_scan = grad({scanned}, {x.main, x.extra});
    CHECK(std::abs(scanned.item<double>() - ops.item<double>()) <= 1e-12 * std::abs(ops.item<double>()));
    for (std::size_t k = 0; k < 2; ++k) {
        const double difference = (g_scan[k] - g_ops[k]).abs().max().item<double>();
        CHECK(difference <= 1e-12);
    }
}
