// linear_recurrence: h_t = a_t * h_{t-1} + b_t as one op, held to a plain loop of ops and to
// finite differences, at first and second order.
#include "helpers.hpp"

using namespace loom;
using testing::random;
using testing::check_error;
using testing::close_tensors;

namespace {

// The same recurrence as a loop of ops, one step at a time.
Tensor loop_of_ops(const Tensor& a, const Tensor& b, const Tensor& h0, bool reverse)
{
    const std::int64_t T = b.size(0);
    const Tensor a_full = a.expand(b.sizes());
    std::vector<Tensor> hs(static_cast<std::size_t>(T));
    Tensor h = h0;
    for (std::int64_t s = 0; s < T; ++s) {
        const std::int64_t t = reverse ? T - 1 - s : s;
        h = h.defined() ? a_full.select(0, t) * h + b.select(0, t) : b.select(0, t);
        hs[static_cast<std::size_t>(t)] = h;
    }
    return stack(hs, 0);
}

void check_ok(const GradcheckResult& r, const std::string& what) { CHECK_MESSAGE(r.ok, what << ": " << r.report()); }

using Recurrence = Tensor (*)(const Tensor&, const Tensor&, const Tensor&, bool);

// gradcheck and gradgradcheck of a recurrence in both directions: in the coefficients, the
// inputs and the initial state, and with a gate [T, 1, ...] shared over the batch and no initial state.
void check_derivatives(Recurrence op, const Tensor& a, const Tensor& b, const Tensor& h0, const Tensor& gate)
{
    for (bool reverse : {false, true}) {
        CAPTURE(reverse);
        const auto fn = [op, reverse](const std::vector<Tensor>& in) { return op(in[0], in[1], in[2], reverse); };
        check_ok(gradcheck(fn, {a, b, h0}), "a, b, h0");
        check_ok(gradgradcheck(fn, {a, b, h0}), "second order");
        const auto shared = [op, reverse](const std::vector<Tensor>& in) { return tanh(op(in[0], in[1], {}, reverse)); };
        check_ok(gradcheck(shared, {gate, b}), "a gate shared over the batch");
        check_ok(gradgradcheck(shared, {gate, b}), "a gate shared over the batch, second order");
    }
}

}  // namespace

TEST_CASE("linear_recurrence equals a loop of ops to 1e-12, values and gradients, both directions, with and without h0")
{
    for (bool reverse : {false, true})
        for (bool with_h0 : {false, true})
            for (bool shared_gate : {false, true}) {
                CAPTURE(reverse);
                CAPTURE(with_h0);
                CAPTURE(shared_gate);
                const Tensor a = random(shared_gate ? Shape{6, 1, 4} : Shape{6, 3, 4}, 1, 0.2, 1.1).requires_grad_();
                const Tensor b = random({6, 3, 4}, 2).requires_grad_();
                const Tensor h0 = with_h0 ? random({3, 4}, 3).requires_grad_() : Tensor();
                const Tensor w = random({6, 3, 4}, 4);  // a loss that weighs every step differently
                const Tensor fused = linear_recurrence(a, b, h0, reverse);
                const Tensor plain = loop_of_ops(a, b, h0, reverse);
                CHECK(close_tensors(fused, plain, 1e-12));
                std::vector<Tensor> wrt{a, b};
                if (with_h0) wrt.push_back(h0);
                const auto g_fused = grad({(fused * w).sum()}, wrt);
                const auto g_plain = grad({(plain * w).sum()}, wrt);
                for (std::size_t k = 0; k < wrt.size(); ++k) CHECK(close_tensors(g_fused[k], g_plain[k], 1e-12));
            }
}

TEST_CASE("linear_recurrence passes gradcheck and gradgradcheck")
{
    const Tensor a = random({5, 2, 3}, 5, 0.3, 1.2).requires_grad_();
    const Tensor b = random({5, 2, 3}, 6).requires_grad_();
    const Tensor h0 = random({2, 3}, 7).requires_grad_();
    const Tensor gate = random({5, 1, 3}, 8, 0.3, 1.2).requires_grad_();
    check_derivatives(linear_recurrence, a, b, h0, gate);
    const auto one_step = [](const std::vector<Tensor>& in) { return linear_recurrence(in[0], in[1], in[2]); };
    check_ok(gradgradcheck(one_step, {a.narrow(0, 0, 1).detach().requires_grad_(),
                                      b.narrow(0, 0, 1).detach().requires_grad_(), h0}),
             "one step");
}

TEST_CASE("linear_recurrence runs in float32 and refuses what does not fit, naming it")
{
    const Tensor a = full({4, 2}, 0.5), b = ones({4, 2});
    CHECK(testing::close(linear_recurrence(a, b), {1, 1, 1.5, 1.5, 1.75, 1.75, 1.875, 1.875}, 1e-7));
    check_error([&] { linear_recurrence(ones({4, 3}), b); }, {"linear_recurrence", "broadcasts", "[4, 3]"});
    check_error([&] { linear_recurrence(ones({3, 2}), b); }, {"linear_recurrence", "broadcasts"});
    check_error([&] { linear_recurrence(a, b, ones({3})); }, {"linear_recurrence", "h0", "[2]"});
    check_error([&] { linear_recurrence(a.to(kFloat64), b); }, {"linear_recurrence", "float64", "float32"});
    check_error([&] { linear_recurrence(ones({0, 2}), ones({0, 2})); }, {"linear_recurrence", "at least one step"});
    check_error([&] { linear_recurrence(ones({4, 2}, kInt64), ones({4, 2}, kInt64)); }, {"linear_recurrence", "float"});
}

namespace {
// log(exp(u) + exp(v)) as ops, one step at a time: the log-space recurrence written plainly.
Tensor log_loop_of_ops(const Tensor& la, const Tensor& lb, const Tensor& lh0, bool reverse)
{
    const std::int64_t T = lb.size(0);
    const Tensor la_full = la.expand(lb.sizes());
    std::vector<Tensor> ls(static_cast<std::size_t>(T));
    Tensor l = lh0;
    for (std::int64_t s = 0; s < T; ++s) {
        const std::int64_t t = reverse ? T - 1 - s : s;
        l = l.defined() ? log(exp(la_full.select(0, t) + l) + exp(lb.select(0, t))) : lb.select(0, t);
        ls[static_cast<std::size_t>(t)] = l;
    }
    return stack(ls, 0);
}
}  // namespace

TEST_CASE("log_linear_recurrence equals a loop of ops and the log of linear_recurrence, values and gradients")
{
    for (bool reverse : {false, true})
        for (bool with_h0 : {false, true})
            for (bool shared_gate : {false, true}) {
                CAPTURE(reverse);
                CAPTURE(with_h0);
                CAPTURE(shared_gate);
                const Tensor la = random(shared_gate ? Shape{6, 1, 4} : Shape{6, 3, 4}, 11, -2, 0.1).requires_grad_();
                const Tensor lb = random({6, 3, 4}, 12, -1, 1).requires_grad_();
                const Tensor lh0 = with_h0 ? random({3, 4}, 13, -1, 1).requires_grad_() : Tensor();
                const Tensor w = random({6, 3, 4}, 14);
                const Tensor fused = log_linear_recurrence(la, lb, lh0, reverse);
                const Tensor plain = log_loop_of_ops(la, lb, lh0, reverse);
                CHECK(close_tensors(fused, plain, 1e-12));
                CHECK(close_tensors(fused, log(linear_recurrence(exp(la), exp(lb), with_h0 ? exp(lh0) : Tensor(), reverse)), 1e-12));
                std::vector<Tensor> wrt{la, lb};
                if (with_h0) wrt.push_back(lh0);
                const auto g_fused = grad({(fused * w).sum()}, wrt);
                const auto g_plain = grad({(plain * w).sum()}, wrt);
                for (std::size_t k = 0; k < wrt.size(); ++k) CHECK(close_tensors(g_fused[k], g_plain[k], 1e-12));
            }
}

TEST_CASE("log_linear_recurrence passes gradcheck and gradgradcheck")
{
    const Tensor la = random({5, 2, 3}, 15, -1.5, 0.2).requires_grad_();
    const Tensor lb = random({5, 2, 3}, 16, -1, 1).requires_grad_();
    const Tensor lh0 = random({2, 3}, 17, -1, 1).requires_grad_();
    const Tensor gate = random({5, 1, 3}, 18, -1.5, 0.2).requires_grad_();
    check_derivatives(log_linear_recurrence, la, lb, lh0, gate);
}

TEST_CASE("log_linear_recurrence stays finite where the linear form underflows")
{
    // 3000 steps of a = 0.5 from h0 = exp(-700) with b = exp(-1000) each step: the true h_t is
    // about exp(-700) 0.5^t + 2 exp(-1000), below double's smallest number after a few hundred
    // steps, which the linear form rounds to 0 (log: -inf) and the log form keeps.
    const std::int64_t T = 3000;
    const Tensor la = full({T, 1}, std::log(0.5), kFloat64), lb = full({T, 1}, -1000.0, kFloat64);
    const Tensor lh0 = full({1}, -700.0, kFloat64);
    const Tensor l = log_linear_recurrence(la, lb, lh0);
    const Tensor linear = log(linear_recurrence(exp(la), exp(lb), exp(lh0)));
    CHECK(std::isinf(linear.select(0, T - 1).item<double>()));
    const double last = l.select(0, T - 1).item<double>();
    // exp(-700) 0.5^3000 is exp(-2779.4): the sum of the inputs, 2 exp(-1000), is what is left.
    CHECK(last == doctest::Approx(-1000 + std::log(2.0)).epsilon(1e-12));
    CHECK(l.select(0, 0).item<double>() == doctest::Approx(std::log(0.5) - 700).epsilon(1e-12));
    check_error([&] { log_linear_recurrence(ones({4, 3}), ones({4, 2})); }, {"log_linear_recurrence", "log_a", "broadcasts"});
    check_error([&] { log_linear_recurrence(ones({4, 2}), ones({4, 2}), ones({3})); }, {"log_linear_recurrence", "log_h0", "[2]"});
}
