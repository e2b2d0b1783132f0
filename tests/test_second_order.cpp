// Second derivatives: backward(create_graph) and grad(create_graph) record the backward pass, so
// gradients can be differentiated again. The op table's second-order check is in test_gradcheck.
#include "helpers.hpp"

using namespace loom;
using testing::random;
using testing::close;
using testing::values;

namespace {

void check_ok(const GradcheckResult& r, const char* what) { CHECK_MESSAGE(r.ok, what << ": " << r.report()); }

}  // namespace

TEST_CASE("a Hessian-vector product equals the analytic one")
{
    // f(x) = sum(x^3) + x0 x1: H = diag(6x) + the coupling of x0 and x1.
    const Tensor x = from_vector<double>({0.5, -1.5, 2.0}, {3}).requires_grad_();
    const Tensor v = from_vector<double>({1.0, 2.0, -1.0}, {3});
    const Tensor f = pow(x, 3.0).sum() + x.select(0, 0) * x.select(0, 1);
    const Tensor g = grad({f}, {x}, {}, false, /*create_graph=*/true)[0];
    CHECK(g.requires_grad());
    CHECK(close(g, {3 * 0.25 - 1.5, 3 * 2.25 + 0.5, 12.0}, 1e-12));
    const Tensor hv = grad({(g * v).sum()}, {x})[0];
    CHECK(close(hv, {6 * 0.5 * 1 + 2.0, 6 * -1.5 * 2 + 1.0, 6 * 2.0 * -1}, 1e-12));
}

TEST_CASE("backward(create_graph) leaves a .grad() that can be differentiated: a gradient penalty")
{
    // L = sum(tanh(w x)); penalty = |dL/dw|^2; d penalty / dw checked against finite differences.
    const Tensor x = random({4}, 1);
    const Tensor w = random({3, 4}, 2).requires_grad_();
    const auto penalty = [&](const std::vector<Tensor>& in) {
        GradModeGuard on(true);  // gradcheck's finite differences run under NoGradGuard; this needs the tape
        const Tensor wi = in[0].requires_grad() ? in[0] : in[0].detach().requires_grad_();
        const Tensor dw = grad({tanh(matmul(wi, x)).sum()}, {wi}, {}, false, true)[0];
        return (dw * dw).sum();
    };
    check_ok(gradcheck(penalty, {w}), "gradient penalty");

    const Tensor loss = tanh(matmul(w, x)).sum();
    loss.backward({}, false, /*create_graph=*/true);
    const Tensor dw = w.grad();
    REQUIRE(dw.requires_grad());
    const Tensor expected = grad({penalty({w})}, {w})[0];
    w.zero_grad();
    const Tensor got = grad({(dw * dw).sum()}, {w})[0];
    CHECK(testing::close_tensors(got, expected, 1e-12));
}

TEST_CASE("second derivatives through the cells and the losses")
{
    using V = const std::vector<Tensor>&;
    nn::LSTMCell lstm(3, 4);
    nn::GRUCell gru(3, 4);
    nn::RNNCell rnn(3, 4), rnn_relu(3, 4, true, nn::Nonlinearity::ReLU);
    for (nn::Module* m : std::initializer_list<nn::Module*>{&lstm, &gru, &rnn, &rnn_relu}) m->to(kFloat64);
    const Tensor x = random({2, 3}, 3).requires_grad_(), h = random({2, 4}, 4).requires_grad_(),
                 c = random({2, 4}, 5).requires_grad_();
    check_ok(gradgradcheck([&](V in) { return stack(lstm(in[0], {in[1], in[2]}), 0); }, {x, h, c}), "LSTMCell");
    check_ok(gradgradcheck([&](V in) { return gru(in[0], {in[1]})[0]; }, {x, h}), "GRUCell");
    check_ok(gradgradcheck([&](V in) { return rnn(in[0], {in[1]})[0]; }, {x, h}), "RNNCell");
    check_ok(gradgradcheck([&](V in) { return rnn_relu(in[0], {in[1]})[0]; }, {x, h}), "RNNCell relu");

    const Tensor logits = random({4, 5}, 6).requires_grad_(), target = random({4, 5}, 7);
    const Tensor labels = from_vector<std::int64_t>({1, 0, 4, 2}, {4});
    check_ok(gradgradcheck([&](V in) { return nn::mse_loss(in[0], target); }, {logits}), "mse_loss");
    check_ok(gradgradcheck([&](V in) { return nn::cross_entropy(in[0], labels); }, {logits}), "cross_entropy");
    nn::CrossEntropyOptions smoothed;
    smoothed.label_smoothing = 0.1;
    check_ok(gradgradcheck([&](V in) { return nn::cross_entropy(in[0], labels, smoothed); }, {logits}),
             "cross_entropy with label smoothing");
    check_ok(gradgradcheck([&](V in) { return nn::nll_loss(in[0].log_softmax(1), labels); }, {logits}), "nll_loss");
    const Tensor bits = gt(target, zeros({1}, kFloat64)).to(kFloat64);
    check_ok(gradgradcheck([&](V in) { return nn::binary_cross_entropy_with_logits(in[0], bits); }, {logits}),
             "binary_cross_entropy_with_logits");
}

TEST_CASE("second derivatives through a layer of cells (fused(false)); the fused layer says to use it")
{
    nn::LSTM lstm(nn::LSTMOptions(3, 4).num_layers(2).fused(false).dtype(kFloat64));
    const Tensor x = random({5, 2, 3}, 8).requires_grad_();
    check_ok(gradgradcheck([&](const std::vector<Tensor>& in) { return lstm(in[0]).output; }, {x}), "LSTM fused(false)");

    nn::GRU fused(nn::GRUOptions(3, 4).dtype(kFloat64));
    const Tensor out = fused(x).output.sum();
    CHECK_THROWS_WITH_AS(grad({out}, {x}, {}, false, true), doctest::Contains("fused(false)"), Error);
}

TEST_CASE("gradgradcheck finds a wrong second derivative, and an op whose backward is off the tape is named")
{
    // cube(x) = x^3 with a backward whose value is right but half detached: d2/dx2 comes out 3x, not 6x.
    const auto half_detached_cube = [](const Tensor& x) {
        Tensor out;
        {
            NoGradGuard no_grad;
            out = pow(x, 3.0);
        }
        return autograd::record("half_detached_cube", {x}, out, {x}, [](const autograd::BackwardContext& c) {
            return std::vector<Tensor>{c.grad() * 3.0 * c.saved[0] * c.saved[0].detach()};
        });
    };
    const Tensor x = random({3}, 9, 0.5, 1.5).requires_grad_();
    const auto f = [&](const std::vector<Tensor>& in) { return half_detached_cube(in[0]); };
    check_ok(gradcheck(f, {x}), "first order is right");
    CHECK_FALSE(gradgradcheck(f, {x}).ok);

    const auto off_tape = [](const Tensor& x) {
        Tensor out = x.detach().clone();
        return autograd::record("copied_by_kernel", {x}, out, {}, [](const autograd::BackwardContext& c) {
            return std::vector<Tensor>{c.grad().detach() * 1.0};
        });
    };
    const Tensor y = off_tape(x * x);
    const Tensor seed = ones({3}, kFloat64).requires_grad_();
    CHECK_THROWS_WITH_AS(grad({y}, {x}, {seed}, false, true), doctest::Contains("copied_by_kernel"), Error);
}

TEST_CASE("grad and backward take libtorch's arguments in libtorch's order")
{
    // torch::autograd::grad(outputs, inputs, grad_outputs, retain_graph, create_graph, allow_unused)
    const Tensor x = from_vector<double>({1.0, 2.0}, {2}).requires_grad_();
    const Tensor y = pow(x, 3.0).sum();
    const Tensor g = grad({y}, {x}, {}, true, true)[0];  // create_graph: differentiable again
    CHECK(g.requires_grad());
    CHECK(close(grad({g.sum()}, {x})[0], {6, 12}, 1e-12));
    const Tensor unused = zeros({1}, kFloat64).requires_grad_();
    const auto parts = grad({y}, {x, unused}, {}, std::nullopt, false, true);  // allow_unused
    CHECK_FALSE(parts[1].defined());
    // backward(gradient, retain_graph = create_graph, create_graph): .grad() differentiable again
    const Tensor z = pow(x, 3.0).sum();
    z.backward({}, std::nullopt, true);
    CHECK(x.grad().requires_grad());
    CHECK(close(grad({x.grad().sum()}, {x})[0], {6, 12}, 1e-12));
}
