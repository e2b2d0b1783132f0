// linear_recurrence: h_t = a_t * h_{t-1} + b_t as one op, held to a plain loop of ops and to
// finite differences, at first and second order.
#include "helpers.hpp"

using namespace loom;
using testing::random;
using testing::check_error;
using testing::close_tensors;

namespace {

// A recurrence as a loop of ops, one step at a time: state = step(a_t, state, b_t) from h0 (or
// b_t alone at the first step without one).
template <class Step> Tensor loop_of_ops(const Tensor& a, const Tensor& b, const Tensor& h0, bool reverse, Step step)
{
    const std::int64_t T = b.size(0);
    const Tensor a_full = a.expand(b.sizes());
    std::vector<Tensor> hs(static_cast<std::size_t>(T));
    Tensor h = h0;
    for (std::int64_t s = 0; s < T; ++s) {
        const std::int64_t t = reverse ? T - 1 - s : s;
        h = h.defined() ? step(a_full.select(0, t), h, b.select(0, t)) : b.select(0, t);
        hs[static_cast<std::size_t>(t)] = h;
    }
    return stack(hs, 0);
}

// h_t = a_t h + b_t.
Tensor loop_of_ops(const Tensor& a, const Tensor& b, const Tensor& h0, bool reverse)
{
    return loop_of_ops(a, b, h0, reverse, [](const Tensor& at, const Tensor& h, const Tensor& bt) { return at * h + bt; });
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
// log(exp(la_t + l) + exp(lb_t)) as ops: the log-space recurrence written plainly.
Tensor log_loop_of_ops(const Tensor& la, const Tensor& lb, const Tensor& lh0, bool reverse)
{
    return loop_of_ops(la, lb, lh0, reverse,
                       [](const Tensor& at, const Tensor& l, const Tensor& bt) { return log(exp(at + l) + exp(bt)); });
}
}  // namespace

TEST_CASE("linear_recurrence on several threads, by lanes or by chunks of steps, equals one thread to 1e-12")
{
    // Narrow and long ([20000, 2, 3]: the two-pass chunked scan over steps) and wide ([300, 4, 64]:
    // lanes split across threads), in both directions, with and without h0, values and every
    // gradient; and log_linear_recurrence, whose lanes split across threads.
    const int threads_before = get_num_threads();
    for (const Shape& shape : {Shape{20000, 2, 3}, Shape{300, 4, 64}})
        for (bool reverse : {false, true})
            for (bool with_h0 : {false, true}) {
                CAPTURE(shape);
                CAPTURE(reverse);
                CAPTURE(with_h0);
                const Shape step_shape(shape.begin() + 1, shape.end());
                const Tensor a = random(shape, 11, 0.5, 0.99).requires_grad_(), b = random(shape, 12).requires_grad_();
                const Tensor h0 = with_h0 ? random(step_shape, 13).requires_grad_() : Tensor();
                const Tensor w = random(shape, 14);
                std::vector<Tensor> wrt{a, b};
                if (with_h0) wrt.push_back(h0);
                for (auto op : {linear_recurrence, log_linear_recurrence}) {
                    const auto run = [&](int threads) {
                        set_num_threads(threads);
                        const Tensor h = op == linear_recurrence ? op(a, b, h0, reverse)
                                                                 : op(log(a), b, with_h0 ? h0 * 0.1 : Tensor(), reverse);
                        std::vector<Tensor> out{h.detach()};
                        for (const Tensor& g : grad({(h * w).sum()}, wrt)) out.push_back(g);
                        return out;
                    };
                    const auto one = run(1), three = run(3);
                    for (std::size_t k = 0; k < one.size(); ++k) CHECK(close_tensors(three[k], one[k], 1e-12));
                }
            }
    set_num_threads(threads_before);
    CHECK(get_num_threads() == threads_before);
}

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

// ---- the selective scan ----

namespace {
// Mamba's scan written step by step with ops: h = exp(delta_t A) h + delta_t B_t u_t, y_t = C_t . h.
std::pair<Tensor, Tensor> scan_of_ops(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                                      const Tensor& C, const Tensor& h0)
{
    Tensor h = h0.defined() ? h0 : zeros({u.size(1), u.size(2), A.size(1)}, u.dtype());
    std::vector<Tensor> ys;
    for (std::int64_t t = 0; t < u.size(0); ++t) {
        const Tensor d = delta.select(0, t).unsqueeze(2);
        h = exp(d * A) * h + d * u.select(0, t).unsqueeze(2) * B.select(0, t).unsqueeze(1);
        ys.push_back((h * C.select(0, t).unsqueeze(1)).sum({2}));
    }
    return {stack(ys, 0), h};
}

struct ScanInputs {
    Tensor u, delta, A, B, C, h0;
    std::vector<Tensor> all() const { return {u, delta, A, B, C, h0}; }
};
ScanInputs scan_inputs(std::int64_t T, std::int64_t Bt, std::int64_t E, std::int64_t N, std::uint64_t seed)
{
    return {random({T, Bt, E}, seed).requires_grad_(), random({T, Bt, E}, seed + 1, 0.05, 0.8).requires_grad_(),
            random({E, N}, seed + 2, -2, -0.2).requires_grad_(), random({T, Bt, N}, seed + 3).requires_grad_(),
            random({T, Bt, N}, seed + 4).requires_grad_(), random({Bt, E, N}, seed + 5).requires_grad_()};
}
}  // namespace

TEST_CASE("selective_scan equals the scan written with ops to 1e-12, values and gradients, with and without h0")
{
    for (bool with_h0 : {false, true})
        for (int seeded : {0, 1, 2}) {  // a loss of y and h_last, of y alone, of h_last alone
            CAPTURE(with_h0);
            CAPTURE(seeded);
            ScanInputs in = scan_inputs(5, 3, 4, 2, 10);
            if (!with_h0) in.h0 = Tensor();
            const Tensor wy = random({5, 3, 4}, 20), wh = random({3, 4, 2}, 21);
            const auto loss = [&](const std::pair<Tensor, Tensor>& out) {
                return seeded == 1 ? (out.first * wy).sum() : seeded == 2 ? (out.second * wh).sum()
                                                                          : (out.first * wy).sum() + (out.second * wh).sum();
            };
            const auto fused = selective_scan(in.u, in.delta, in.A, in.B, in.C, in.h0);
            const auto plain = scan_of_ops(in.u, in.delta, in.A, in.B, in.C, in.h0);
            CHECK(close_tensors(fused.first, plain.first, 1e-12));
            CHECK(close_tensors(fused.second, plain.second, 1e-12));
            std::vector<Tensor> wrt{in.u, in.delta, in.A, in.B, in.C};
            if (with_h0) wrt.push_back(in.h0);
            const auto g_fused = grad({loss(fused)}, wrt, {}, std::nullopt, false, true);
            const auto g_plain = grad({loss(plain)}, wrt, {}, std::nullopt, false, true);
            for (std::size_t k = 0; k < wrt.size(); ++k) {
                CAPTURE(k);
                REQUIRE(g_fused[k].defined() == g_plain[k].defined());
                if (g_plain[k].defined()) CHECK(close_tensors(g_fused[k], g_plain[k], 1e-12));
            }
        }
}

TEST_CASE("selective_scan passes gradcheck and gradgradcheck, and splits sequences across threads exactly")
{
    const ScanInputs in = scan_inputs(4, 2, 3, 2, 30);
    const auto both = [](const std::vector<Tensor>& x) {
        auto [y, h] = selective_scan(x[0], x[1], x[2], x[3], x[4], x[5]);
        return y.sum({2}).unsqueeze(2) * h.sum({1, 2}).unsqueeze(1) + y;  // y and h_last, mixed
    };
    check_ok(gradcheck(both, in.all()), "y and the last state");
    check_ok(gradgradcheck(both, in.all()), "y and the last state, second order");
    const auto state_only = [](const std::vector<Tensor>& x) {
        return tanh(selective_scan(x[0], x[1], x[2], x[3], x[4]).second);
    };
    check_ok(gradgradcheck(state_only, {in.u, in.delta, in.A, in.B, in.C}), "the last state alone, no h0, second order");

    // 64 x 4 x 32 x 8 states: enough work to split the 4 sequences over two threads.
    const ScanInputs big = scan_inputs(64, 4, 32, 8, 40);
    const Tensor w = random({64, 4, 32}, 41);
    const auto run = [&](int threads) {
        set_num_threads(threads);
        const auto out = selective_scan(big.u, big.delta, big.A, big.B, big.C, big.h0);
        auto grads = grad({(out.first * w).sum() + out.second.sum()}, big.all());
        grads.push_back(out.first);
        grads.push_back(out.second);
        return grads;
    };
    const int before = get_num_threads();
    const auto one = run(1), two = run(2);
    set_num_threads(before);
    for (std::size_t k = 0; k < one.size(); ++k) {
        CAPTURE(k);
        CHECK(close_tensors(one[k], two[k], 1e-12));
    }
}

TEST_CASE("selective_scan runs in float32 and refuses what does not fit, naming it")
{
    const ScanInputs in = scan_inputs(6, 2, 3, 4, 50);
    const auto to32 = [](const Tensor& t) { return t.detach().to(kFloat32); };
    const auto fused = selective_scan(to32(in.u), to32(in.delta), to32(in.A), to32(in.B), to32(in.C), to32(in.h0));
    const auto plain = scan_of_ops(in.u, in.delta, in.A, in.B, in.C, in.h0);
    CHECK(close_tensors(fused.first.to(kFloat64), plain.first, 1e-5));
    CHECK(close_tensors(fused.second.to(kFloat64), plain.second, 1e-5));
    // Gradients in float32 over a longer sequence (threads split it), against float64 ops.
    const ScanInputs big = scan_inputs(96, 4, 24, 8, 60);
    std::vector<Tensor> singles;
    for (const Tensor& t : big.all()) singles.push_back(to32(t).requires_grad_());
    const Tensor w = random({96, 4, 24}, 61);
    const auto out32 = selective_scan(singles[0], singles[1], singles[2], singles[3], singles[4], singles[5]);
    const auto g32 = grad({(out32.first * w.to(kFloat32)).sum() + out32.second.sum()}, singles);
    const auto out64 = scan_of_ops(big.u, big.delta, big.A, big.B, big.C, big.h0);
    const auto g64 = grad({(out64.first * w).sum() + out64.second.sum()}, big.all());
    for (std::size_t k = 0; k < g64.size(); ++k) {
        CAPTURE(k);
        const double scale = g64[k].abs().max().item<double>();
        CHECK((g32[k].to(kFloat64) - g64[k]).abs().max().item<double>() <= 1e-5 * scale + 1e-6);
    }
    const Tensor u = in.u.detach(), d = in.delta.detach(), A = in.A.detach(), B = in.B.detach(), C = in.C.detach();
    check_error([&] { selective_scan(u.select(0, 0), d, A, B, C); }, {"selective_scan", "u [T, B, E]"});
    check_error([&] { selective_scan(u, d, A.narrow(0, 0, 2), B, C); }, {"selective_scan", "A [E, N]", "E = 3"});
    check_error([&] { selective_scan(u, d, A, B.narrow(2, 0, 3), C); }, {"selective_scan", "B of shape [6, 2, 4]"});
    check_error([&] { selective_scan(u, d, A, B, C, zeros({2, 3, 3}, kFloat64)); }, {"selective_scan", "h0", "[2, 3, 4]"});
    check_error([&] { selective_scan(u, d.to(kFloat32), A, B, C); }, {"selective_scan", "delta", "float64"});
    check_error([&] { selective_scan(u, Tensor(), A, B, C); }, {"selective_scan", "undefined"});
}

TEST_CASE("selective_scan in anomaly mode: an overflow is caught, recorded or not, naming the op")
{
    const ScanInputs in = scan_inputs(6, 2, 3, 4, 50);
    const auto to32 = [](const Tensor& t) { return t.detach().to(kFloat32); };
    // u near float32's largest value, with B and C positive and above one, overflows h, and so y.
    const Tensor u = full(in.u.sizes(), 3e38, kFloat32), d = to32(in.delta), A = to32(in.A),
                 B = to32(in.B).abs() * 10 + 1, C = to32(in.C).abs() + 1;
    REQUIRE(std::isfinite(u.abs().max().item<double>()));
    autograd::DetectAnomalyGuard anomaly;
    check_error([&] { selective_scan(u, d, A, B, C); },
                {"anomaly", "forward of 'selective_scan'", "not recorded: no input requires grad"});
    const Tensor leaf = u.detach().requires_grad_();
    check_error([&] { selective_scan(leaf, d, A, B, C); }, {"anomaly", "forward of 'selective_scan'", "tape entry #"});
    // Finite inputs with finite results pass.
    const auto fine = selective_scan(to32(in.u), d, A, to32(in.B), C);
    CHECK(std::isfinite(fine.first.abs().max().item<double>()));
}

// ---- minGRU and minLSTM ----

namespace {

nn::MinRecurrentOptions min_options(bool log_space) { return nn::MinRecurrentOptions(3, 4).log_space(log_space).dtype(kFloat64); }

// An initial state the form accepts: positive in log space.
Tensor initial_state(bool log_space, std::uint64_t seed)
{
    return log_space ? random({1, 2, 4}, seed, 0.1, 1.5) : random({1, 2, 4}, seed, -1, 1);
}

template <class Layer> void check_steps_match_forward(bool log_space)
{
    CAPTURE(log_space);
    manual_seed(21);
    Layer layer(min_options(log_space));
    const Tensor x = random({7, 2, 3}, 22, -2, 2);
    for (const Tensor& h0 : {Tensor(), initial_state(log_space, 23)}) {
        const auto out = layer(x, h0);
        CHECK(out.output.sizes() == Shape{7, 2, 4});
        Tensor h = h0.defined() ? h0.select(0, 0) : zeros({2, 4}, kFloat64);
        for (std::int64_t t = 0; t < 7; ++t) {
            h = layer.step(x.select(0, t), h);
            CHECK(close_tensors(h, out.output.select(0, t), 1e-12));
        }
        CHECK(close_tensors(out.h_n(), h.unsqueeze(0), 1e-12));
    }
}

template <class Layer> void check_layer_derivatives(bool log_space)
{
    CAPTURE(log_space);
    manual_seed(31);
    Layer layer(min_options(log_space));
    const Tensor x = random({5, 2, 3}, 32, -2, 2).requires_grad_();
    const Tensor h0 = initial_state(log_space, 33).requires_grad_();
    const auto fn = [&](const std::vector<Tensor>& in) { return layer(in[0], in[1]).output; };
    check_ok(gradcheck(fn, {x, h0}), "input and h0");
    check_ok(gradgradcheck(fn, {x, h0}), "input and h0, second order");
    check_ok(gradcheck_parameters([&] { return layer(x, h0).output; }, layer.parameters()), "parameters");
}

}  // namespace

TEST_CASE("MinGRU and MinLSTM: step() gives forward()'s states to 1e-12, in both forms")
{
    for (bool log_space : {true, false}) {
        check_steps_match_forward<nn::MinGRU>(log_space);
        check_steps_match_forward<nn::MinLSTM>(log_space);
    }
}

template <class Layer> void check_lengths(bool log_space)
{
    CAPTURE(log_space);
    manual_seed(71);
    Layer layer(min_options(log_space));
    const Tensor x = random({6, 3, 3}, 72, -2, 2);
    const Tensor h0 = log_space ? random({1, 3, 4}, 73, 0.1, 1.5) : random({1, 3, 4}, 73, -1, 1);
    const Tensor lengths = from_vector<std::int64_t>({6, 2, 4}, {3});
    const nn::RecurrentOutput out = layer(x, h0, lengths);
    // Each sequence run alone, cut to its length.
    for (std::int64_t b = 0; b < 3; ++b) {
        const std::int64_t n = lengths.data_ptr<std::int64_t>()[b];
        const nn::RecurrentOutput alone = layer(x.narrow(1, b, 1).narrow(0, 0, n), h0.narrow(1, b, 1));
        CHECK(close_tensors(out.output.narrow(1, b, 1).narrow(0, 0, n), alone.output, 1e-12));
        CHECK(close_tensors(out.h_n().narrow(1, b, 1), alone.h_n(), 1e-12));
        if (n < 6) CHECK(amax(abs(out.output.narrow(1, b, 1).narrow(0, n, 6 - n))).item<double>() == 0);
    }
    const Tensor xg = x.clone().requires_grad_(), hg = h0.clone().requires_grad_();
    const auto fn = [&](const std::vector<Tensor>& in) {
        const nn::RecurrentOutput o = layer(in[0], in[1], lengths);
        return concat({o.output.reshape({-1}), o.h_n().reshape({-1})}, 0);
    };
    check_ok(gradcheck(fn, {xg, hg}), "with lengths");
    check_ok(gradgradcheck(fn, {xg, hg}), "with lengths, second order");
}

TEST_CASE("MinGRU and MinLSTM with lengths: each sequence as if run alone, zeros past its end")
{
    for (bool log_space : {true, false}) {
        check_lengths<nn::MinGRU>(log_space);
        check_lengths<nn::MinLSTM>(log_space);
    }
    nn::MinGRU gru(min_options(true));
    const Tensor x = random({6, 2, 3}, 74, -1, 1);
    check_error([&] { gru(x, {}, from_vector<std::int64_t>({6, 7}, {2})); }, {"MinGRU", "[1, T] = [1, 6]", "6 to 7"});
    check_error([&] { gru(x, {}, from_vector<std::int64_t>({6, 0}, {2})); }, {"MinGRU", "[1, T]"});
    check_error([&] { gru(x, {}, ones({2}, kFloat64)); }, {"MinGRU", "int64 [B] = [2]"});
}

namespace {
// The log-space coefficients from ops, as the layers computed them before one fused op did:
// log a = -softplus(d), log b = d - softplus(d) + log g(pre).
std::pair<Tensor, Tensor> log_coefficients_from_ops(const Tensor& d, const Tensor& pre)
{
    const Tensor s = softplus(d);
    return {-s, d - s + nn::min_rnn_log_g(pre)};
}

Tensor log_form_from_ops(nn::MinGRU& gru, const Tensor& x, const Tensor& h0)
{
    const auto [log_a, log_b] = log_coefficients_from_ops((*gru.linear_z)(x), (*gru.linear_h)(x));
    return exp(log_linear_recurrence(log_a, log_b, h0.defined() ? log(h0.select(0, 0)) : Tensor()));
}

Tensor log_form_from_ops(nn::MinLSTM& lstm, const Tensor& x, const Tensor& h0)
{
    const Tensor kf = (*lstm.linear_f)(x), ki = (*lstm.linear_i)(x);
    const auto [log_a, log_b] = log_coefficients_from_ops((softplus(kf) - kf) - (softplus(ki) - ki), (*lstm.linear_h)(x));
    return exp(log_linear_recurrence(log_a, log_b, h0.defined() ? log(h0.select(0, 0)) : Tensor()));
}

// The layer's output and the gradients of a weighted sum of it in x, h0 and every parameter.
std::vector<Tensor> output_and_grads(nn::Module& layer, const Tensor& x, const Tensor& h0, const Tensor& weights,
                                     const std::function<Tensor()>& forward)
{
    std::vector<Tensor> wrt{x};
    if (h0.defined()) wrt.push_back(h0);
    for (const Tensor& p : layer.parameters()) wrt.push_back(p);
    const Tensor out = forward();
    std::vector<Tensor> result = grad({(out * weights).sum()}, wrt);
    result.insert(result.begin(), out.detach());
    return result;
}

template <class Layer> void check_fused_log_coefficients(DType dtype, double tol)
{
    CAPTURE(dtype);
    manual_seed(41);
    Layer layer(nn::MinRecurrentOptions(3, 4).log_space(true).dtype(dtype));
    for (std::int64_t T : {1, 6, 6000}) {  // 6000 x 3 x 4 coefficients: split across threads
        CAPTURE(T);
        // Wide enough that pre-activations fall on both sides of 0 (both branches of log g).
        const Tensor x = random({T, 3, 3}, 42, -3, 3).to(dtype).requires_grad_();
        const Tensor weights = random({T, 3, 4}, 43, -1, 1).to(dtype);
        for (const Tensor& h0 : {Tensor(), random({1, 3, 4}, 44, 0.1, 1.5).to(dtype).requires_grad_()}) {
            const auto fused = output_and_grads(layer, x, h0, weights, [&] { return layer(x, h0).output; });
            const auto from_ops = output_and_grads(layer, x, h0, weights, [&] { return log_form_from_ops(layer, x, h0); });
            REQUIRE(fused.size() == from_ops.size());
            for (std::size_t k = 0; k < fused.size(); ++k) {
                CAPTURE(k);
                CHECK(close_tensors(fused[k], from_ops[k], tol));
            }
        }
    }
}
}  // namespace

TEST_CASE("MinGRU and MinLSTM in log space: the fused coefficients equal the ops they replace, values and gradients")
{
    check_fused_log_coefficients<nn::MinGRU>(kFloat64, 1e-12);
    check_fused_log_coefficients<nn::MinLSTM>(kFloat64, 1e-12);
    check_fused_log_coefficients<nn::MinGRU>(kFloat32, 1e-5);
    check_fused_log_coefficients<nn::MinLSTM>(kFloat32, 1e-5);
}

TEST_CASE("MinGRU and MinLSTM pass gradcheck and gradgradcheck in both forms")
{
    for (bool log_space : {true, false}) {
        check_layer_derivatives<nn::MinGRU>(log_space);
        check_layer_derivatives<nn::MinLSTM>(log_space);
    }
}

TEST_CASE("MinGRU and MinLSTM: parameter names, batch_first, the log form over long sequences, errors")
{
    nn::MinGRU gru(min_options(true));
    nn::MinLSTM lstm(min_options(true));
    std::vector<std::string> names;
    for (const auto& [name, _] : lstm.named_parameters()) names.push_back(name);
    CHECK(names == std::vector<std::string>{"linear_f.weight", "linear_f.bias", "linear_i.weight", "linear_i.bias",
                                            "linear_h.weight", "linear_h.bias"});
    CHECK(gru.named_parameters().front().first == "linear_z.weight");
    const Tensor x = random({6, 2, 3}, 41, -1, 1);
    nn::MinGRU batch_first(min_options(true).batch_first(true));
    batch_first.load_state_dict(gru.state_dict());
    CHECK(close_tensors(batch_first(x.transpose(0, 1)).output.transpose(0, 1), gru(x).output, 1e-14));
    // 5000 steps whose gates forget almost everything: every state stays positive and finite.
    const Tensor long_x = random({5000, 1, 3}, 42, -3, 3);
    const Tensor h = lstm(long_x).output;
    CHECK(amin(h).item<double>() > 0);
    CHECK(std::isfinite(amax(h).item<double>()));
    check_error([&] { gru(ones({6, 2, 5}, kFloat64)); }, {"MinGRU", "I = 3", "[6, 2, 5]"});
    check_error([&] { gru(ones({6, 2, 3})); }, {"MinGRU", "dtype", "float64"});
    check_error([&] { gru(x, ones({2, 4}, kFloat64)); }, {"MinGRU", "h0", "[1, B, H] = [1, 2, 4]"});
    check_error([&] { gru(x, zeros({1, 2, 4}, kFloat64)); }, {"MinGRU", "positive", "log_space(false)"});
    check_error([&] { lstm.step(ones({2, 3}, kFloat64), ones({3, 4}, kFloat64)); }, {"MinLSTM::step", "[2, 4]"});
    check_error([] { nn::MinGRU(nn::MinRecurrentOptions(0, 4)); }, {"MinGRU", "positive sizes"});
}

// ---- the selective state-space block ----

TEST_CASE("SelectiveSSM: step() gives forward()'s outputs and states to 1e-12, from zeros and from a state")
{
    manual_seed(51);
    nn::SelectiveSSM ssm(nn::SelectiveSSMOptions(4).d_state(3).d_conv(3).dtype(kFloat64));
    CHECK(ssm.inner == 8);
    CHECK(ssm.options.dt_rank() == 1);
    CHECK(ssm.A_log.sizes() == Shape{8, 3});
    const Tensor x = random({7, 2, 4}, 52, -1, 1);
    for (const bool from_state : {false, true}) {
        CAPTURE(from_state);
        nn::SelectiveSSMState initial;
        if (from_state) initial = {random({2, 2, 8}, 53, -1, 1), random({2, 8, 3}, 54, -1, 1)};
        const auto whole = ssm(x, initial);
        CHECK(whole.output.sizes() == Shape{7, 2, 4});
        nn::SelectiveSSMState state = initial;
        for (std::int64_t t = 0; t < 7; ++t) {
            const auto one = ssm.step(x.select(0, t), state);
            CHECK(close_tensors(one.output, whole.output.select(0, t), 1e-12));
            state = one.state;
        }
        CHECK(close_tensors(state.conv, whole.state.conv, 0));
        CHECK(close_tensors(state.ssm, whole.state.ssm, 1e-12));
        // Two halves carried by the state make the whole.
        const auto first = ssm(x.narrow(0, 0, 3), initial), second = ssm(x.narrow(0, 3, 4), first.state);
        CHECK(close_tensors(concat({first.output, second.output}, 0), whole.output, 1e-12));
    }
}

TEST_CASE("SelectiveSSM with lengths: each sequence as if run alone, zeros past its end, its own last state")
{
    manual_seed(56);
    nn::SelectiveSSM ssm(nn::SelectiveSSMOptions(4).d_state(3).d_conv(3).dtype(kFloat64));
    const Tensor x = random({6, 3, 4}, 57, -1, 1);
    const Tensor lengths = from_vector<std::int64_t>({6, 1, 4}, {3});
    for (const bool from_state : {false, true}) {
        CAPTURE(from_state);
        nn::SelectiveSSMState initial;
        if (from_state) initial = {random({2, 3, 8}, 58, -1, 1), random({3, 8, 3}, 59, -1, 1)};
        const auto padded = ssm(x, initial, lengths);
        for (std::int64_t b = 0; b < 3; ++b) {
            CAPTURE(b);
            const std::int64_t n = lengths.select(0, b).item<std::int64_t>();
            nn::SelectiveSSMState own;
            if (from_state) own = {initial.conv.narrow(1, b, 1), initial.ssm.narrow(0, b, 1)};
            const auto alone = ssm(x.narrow(0, 0, n).narrow(1, b, 1), own);
            CHECK(close_tensors(padded.output.narrow(0, 0, n).narrow(1, b, 1), alone.output, 1e-12));
            if (n < 6) CHECK(amax(abs(padded.output.narrow(0, n, 6 - n).narrow(1, b, 1))).item<double>() == 0);
            CHECK(close_tensors(padded.state.conv.narrow(1, b, 1), alone.state.conv, 0));
            CHECK(close_tensors(padded.state.ssm.narrow(0, b, 1), alone.state.ssm, 1e-12));
        }
    }
    // Full lengths give the unpadded numbers; derivatives through the masks are right.
    CHECK(close_tensors(ssm(x, {}, from_vector<std::int64_t>({6, 6, 6}, {3})).output, ssm(x).output, 0));
    nn::SelectiveSSM small(nn::SelectiveSSMOptions(2).d_state(2).d_conv(2).expand(1).dtype(kFloat64));
    const Tensor xg = random({4, 2, 2}, 60, -1, 1).requires_grad_();
    const Tensor short_lengths = from_vector<std::int64_t>({4, 2}, {2});
    const auto fn = [&](const std::vector<Tensor>& in) {
        const auto out = small(in[0], {}, short_lengths);
        return concat({out.output.reshape({-1}), out.state.conv.reshape({-1}), out.state.ssm.reshape({-1})}, 0);
    };
    check_ok(gradcheck(fn, {xg}), "with lengths");
    check_ok(gradgradcheck(fn, {xg}), "with lengths, second order");
    check_error([&] { ssm(x, {}, from_vector<std::int64_t>({6, 7, 1}, {3})); }, {"SelectiveSSM", "[1, T] = [1, 6]"});
    check_error([&] { ssm(x, {}, ones({3}, kFloat64)); }, {"SelectiveSSM", "int64 [B] = [3]"});
}

TEST_CASE("SelectiveSSM passes gradcheck and gradgradcheck, in the input, the state and the parameters")
{
    manual_seed(61);
    nn::SelectiveSSM ssm(nn::SelectiveSSMOptions(2).d_state(2).d_conv(2).expand(1).dtype(kFloat64));
    const Tensor x = random({4, 2, 2}, 62, -1, 1).requires_grad_();
    const Tensor conv = random({1, 2, 2}, 63, -1, 1).requires_grad_(), h = random({2, 2, 2}, 64, -1, 1).requires_grad_();
    const auto fn = [&](const std::vector<Tensor>& in) {
        const auto out = ssm(in[0], {in[1], in[2]});
        return concat({out.output.reshape({-1}), out.state.ssm.reshape({-1})}, 0);
    };
    check_ok(gradcheck(fn, {x, conv, h}), "input and state");
    check_ok(gradgradcheck(fn, {x, conv, h}), "input and state, second order");
    check_ok(gradcheck_parameters([&] { return ssm(x, {conv, h}).output; }, ssm.parameters()), "parameters");
}

TEST_CASE("SelectiveSSM: Mamba's names and initialisation, and clear errors")
{
    nn::SelectiveSSM ssm(nn::SelectiveSSMOptions(32).dtype(kFloat64));
    std::vector<std::string> names;
    for (const auto& [name, _] : ssm.named_parameters()) names.push_back(name);
    CHECK(names == std::vector<std::string>{"A_log", "D", "in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight",
                                            "dt_proj.weight", "dt_proj.bias", "out_proj.weight"});
    CHECK(ssm.conv1d->weight.sizes() == Shape{64, 1, 4});
    CHECK(ssm.x_proj->weight.sizes() == Shape{2 + 32, 64});  // dt_rank = ceil(32 / 16) = 2, N = 16
    CHECK(close_tensors(ssm.A_log.select(0, 5), log(arange(16, kFloat64) + 1.0), 1e-15));
    // softplus(dt_proj.bias) is the initial step size, within [0.001, 0.1].
    const Tensor step = softplus(ssm.dt_proj->bias);
    CHECK(amin(step).item<double>() >= 0.001 - 1e-12);
    CHECK(amax(step).item<double>() <= 0.1 + 1e-12);
    const Tensor x = zeros({5, 2, 32}, kFloat64);
    check_error([&] { ssm(zeros({5, 2, 16}, kFloat64)); }, {"SelectiveSSM", "d_model = 32", "[5, 2, 16]"});
    check_error([&] { ssm(zeros({5, 2, 32})); }, {"SelectiveSSM", "dtype", "float64"});
    check_error([&] { ssm(x, {zeros({2, 2, 64}, kFloat64), {}}); }, {"SelectiveSSM", "state.conv", "[3, 2, 64]"});
    check_error([&] { ssm(x, {{}, zeros({2, 64, 8}, kFloat64)}); }, {"SelectiveSSM", "state.ssm", "[2, 64, 16]"});
    check_error([&] { ssm.step(zeros({2, 16}, kFloat64), {}); }, {"SelectiveSSM::step", "[B, d_model]"});
    check_error([] { nn::SelectiveSSM(nn::SelectiveSSMOptions(4).d_state(0)); }, {"SelectiveSSM", "positive"});
}
