// Tape semantics: backward, accumulation, retain_graph, grad(), detach, no-grad, views, versions, hooks.
#include "helpers.hpp"

using namespace loom;
using testing::check_error;
using testing::close;
using testing::values;

TEST_CASE("backward of a scalar fills leaf gradients")
{
    Tensor x = tensor({1, 2, 3}, kFloat64).requires_grad_();
    Tensor y = (x * x).sum();  // dy/dx = 2x
    y.backward();
    CHECK(close(x.grad(), {2, 4, 6}));
    CHECK(x.is_leaf());
    CHECK(!y.is_leaf());
}

TEST_CASE("leaf gradients accumulate until reset")
{
    Tensor x = tensor({1, 2}, kFloat64).requires_grad_();
    (x * 3.0).sum().backward();
    (x * 3.0).sum().backward();
    CHECK(close(x.grad(), {6, 6}));
    x.zero_grad();
    CHECK(!x.grad().defined());
    (x * 3.0).sum().backward();
    CHECK(close(x.grad(), {3, 3}));
    x.set_grad(tensor({1, 1}, kFloat64));
    (x * 3.0).sum().backward();
    CHECK(close(x.grad(), {4, 4}));
    check_error([&] { x.set_grad(ones({3}, kFloat64)); }, {"set_grad", "[3]", "[2]"});
}

TEST_CASE("a value used more than once sums its gradients")
{
    Tensor x = tensor({2}, kFloat64).requires_grad_();
    Tensor y = x * x * x + x;  // 3x^2 + 1 = 13
    y.sum().backward();
    CHECK(close(x.grad(), {13}));
}

TEST_CASE("gradients flow through views, slices and broadcasting")
{
    Tensor x = arange(6, kFloat64).reshape({2, 3}).requires_grad_();
    Tensor b = tensor({1, 2, 3}, kFloat64).requires_grad_();
    Tensor y = (x.t().select(0, 1) * 2.0).sum() + (x.narrow(1, 2, 1) * 5.0).sum() + (x + b).sum();
    y.backward();
    CHECK(close(x.grad(), {1, 3, 6, 1, 3, 6}));
    CHECK(close(b.grad(), {2, 2, 2}));  // broadcast over 2 rows: summed back to b's shape
}

TEST_CASE("explicit upstream gradient for a non-scalar output")
{
    Tensor x = tensor({1, 2}, kFloat64).requires_grad_();
    Tensor y = x * 3.0;
    y.backward(tensor({1, 10}, kFloat64));
    CHECK(close(x.grad(), {3, 30}));
}

TEST_CASE("retain_graph allows a second sweep; without it the graph is released")
{
    Tensor x = tensor({1, 2}, kFloat64).requires_grad_();
    Tensor y = (x.exp()).sum();
    y.backward({}, /*retain_graph=*/true);
    y.backward();
    CHECK(close(x.grad(), values(x.exp() * 2.0), 1e-12));
    check_error([&] { y.backward(); }, {"sum", "retain_graph"});
}

TEST_CASE("grad() returns gradients without touching .grad()")
{
    Tensor x = tensor({1, 2}, kFloat64).requires_grad_();
    Tensor w = tensor({3, 4}, kFloat64).requires_grad_();
    Tensor h = x * w;
    Tensor y = h.sum();
    const auto g = grad({y}, {x, h}, {}, /*retain_graph=*/true);
    CHECK(close(g[0], {3, 4}));
    CHECK(close(g[1], {1, 1}));  // a non-leaf input
    CHECK(!x.grad().defined());
    CHECK(!w.grad().defined());
    Tensor unused = tensor({1}, kFloat64).requires_grad_();
    check_error([&] { grad({y}, {unused}, {}, true); }, {"grad", "input 0", "allow_unused"});
    const auto g2 = grad({y}, {unused, w}, {}, false, false, /*allow_unused=*/true);
    CHECK(!g2[0].defined());
    CHECK(close(g2[1], {1, 2}));
}

TEST_CASE("grad() of several outputs with upstream gradients")
{
    Tensor x = tensor({1, 2}, kFloat64).requires_grad_();
    Tensor a = x * 2.0, b = x * x;
    const auto g = grad({a, b}, {x}, {tensor({1, 1}, kFloat64), tensor({10, 10}, kFloat64)});
    CHECK(close(g[0], {22, 42}));
}

TEST_CASE("detach cuts the tape and NoGradGuard stops recording")
{
    Tensor x = tensor({3}, kFloat64).requires_grad_();
    Tensor d = (x * 2.0).detach();
    CHECK(!d.requires_grad());
    CHECK(d.shares_storage(x * 1.0) == false);
    Tensor y = (d * x).sum();  // only the direct use of x carries gradient
    y.backward();
    CHECK(close(x.grad(), {6}));
    {
        NoGradGuard no_grad;
        CHECK(!grad_enabled());
        CHECK(!(x * 2.0).requires_grad());
    }
    CHECK(grad_enabled());
    CHECK((x * 2.0).requires_grad());
}

TEST_CASE("truncated backpropagation through time with a detached carried state")
{
    Generator gen(3);
    Tensor W = (randn({4, 4}, kFloat64, &gen) * 0.3).requires_grad_();
    Tensor h = zeros({2, 4}, kFloat64);
    for (int chunk = 0; chunk < 3; ++chunk) {
        const Tensor x = randn({5, 2, 4}, kFloat64, &gen), start = h;
        for (int t = 0; t < 5; ++t) h = tanh(x.select(0, t) + matmul(h, W));
        W.set_grad({});
        h.sum().backward();
        // The gradient is the one of this chunk alone: recompute it from the same start state
        // with a fresh copy of W and a fresh tape, and compare.
        Tensor W2 = W.detach().clone().requires_grad_();
        Tensor h2 = start;
        for (int t = 0; t < 5; ++t) h2 = tanh(x.select(0, t) + matmul(h2, W2));
        h2.sum().backward();
        CHECK(testing::close_tensors(W.grad(), W2.grad(), 1e-14));
        CHECK(testing::values(W.grad()) != std::vector<double>(16, 0.0));
        h = h.detach();
        CHECK(!h.requires_grad());
    }
    // After detach, backward from a new chunk never reaches released entries of older chunks.
    Tensor y = tanh(matmul(h, W)).sum();
    y.backward();
    CHECK(W.grad().defined());
}

TEST_CASE("modifying a saved tensor in place makes backward throw, naming the op")
{
    Tensor x = tensor({1, 2}, kFloat64).requires_grad_();
    Tensor e = x.exp();  // exp saves its output
    Tensor y = e.sum();
    {
        NoGradGuard no_grad;
        e.mul_(2.0);
    }
    check_error([&] { y.backward(); }, {"exp", "modified in place", "clone"});
    // An unsaved tensor may be modified: sum saves nothing.
    Tensor z = x * 1.0;
    Tensor s = z.sum();
    {
        NoGradGuard no_grad;
        z.zero_();
    }
    s.backward();
    CHECK(close(x.grad(), {1, 1}));
}

TEST_CASE("in-place writes are refused on tensors that require grad while recording")
{
    Tensor x = tensor({1, 2}, kFloat64).requires_grad_();
    check_error([&] { x.add_(ones({2}, kFloat64)); }, {"add_", "NoGradGuard"});
    NoGradGuard no_grad;
    x.add_(ones({2}, kFloat64));
    CHECK(close(x, {2, 3}));
}

TEST_CASE("hooks see and may replace gradients; retain_grad keeps a non-leaf's gradient")
{
    Tensor x = tensor({1, 2}, kFloat64).requires_grad_();
    Tensor h = x * 3.0;
    std::vector<double> seen;
    h.register_hook([&](const Tensor& g) {
        seen = values(g);
        return g * 2.0;  // doubles what flows on
    });
    h.retain_grad();
    int leaf_calls = 0;
    x.register_hook([&](const Tensor&) {
        ++leaf_calls;
        return Tensor();  // leaves the gradient as it is
    });
    (h * h).sum().backward();
    CHECK(seen == std::vector<double>{6, 12});
    CHECK(close(h.grad(), {12, 24}));
    CHECK(close(x.grad(), {36, 72}));
    CHECK(leaf_calls == 1);
}

TEST_CASE("thousands of steps: backward is a loop, not recursion")
{
    Tensor x = tensor({0.5}, kFloat64).requires_grad_();
    Tensor h = x;
    for (int i = 0; i < 20000; ++i) h = h * 1.0 + 0.0;
    h.sum().backward();
    CHECK(close(x.grad(), {1}));
}

TEST_CASE("the tape reclaims entries whose results nobody holds")
{
    Tensor w = tensor({1, 2}, kFloat64).requires_grad_();
    for (int i = 0; i < 50000; ++i) {
        Tensor y = (w * 2.0).sum();  // an evaluation loop that never calls backward
        (void)y;
    }
    CHECK(autograd::tape_size() < 10000);
    // Parts that are still held survive reclamation and can be swept.
    Tensor kept = (w * w).sum();
    for (int i = 0; i < 5000; ++i) (void)(w * 3.0);
    kept.backward();
    CHECK(close(w.grad(), {2, 4}));
}

TEST_CASE("entries that do not lead to the loss cost nothing and are not swept")
{
    Tensor x = tensor({1}, kFloat64).requires_grad_();
    Tensor side = x.exp();  // recorded, but not part of the loss
    Tensor loss = (x * 2.0).sum();
    loss.backward();
    CHECK(close(x.grad(), {2}));
    side.sum().backward();  // still sweepable: the first backward never reached it
    CHECK(close(x.grad(), {2 + std::exp(1.0)}, 1e-12));
}

TEST_CASE("an unrolled tanh RNN gets its gradients from the tape")
{
    // dL/dh0 by hand for one step: L = sum(tanh(h0 W)), dL/dh0 = (1 - tanh^2) W^T
    Tensor W = tensor({0.5, -0.3, 0.2, 0.8}, {2, 2}, kFloat64).requires_grad_();
    Tensor h0 = tensor({0.1, -0.4}, {1, 2}, kFloat64).requires_grad_();
    Tensor h1 = tanh(matmul(h0, W));
    h1.sum().backward();
    const auto a = values(matmul(h0, W).detach());
    const std::vector<double> d = {1 - std::tanh(a[0]) * std::tanh(a[0]), 1 - std::tanh(a[1]) * std::tanh(a[1])};
    CHECK(close(h0.grad(), {d[0] * 0.5 + d[1] * -0.3, d[0] * 0.2 + d[1] * 0.8}, 1e-12));
}

TEST_CASE("float32 gradients are float32")
{
    Tensor x = tensor({1, 2}).requires_grad_();
    (x * x).sum().backward();
    CHECK(x.grad().dtype() == kFloat32);
    CHECK(close(x.grad(), {2, 4}));
}
