// autograd::Function: a user's op with its own backward, recorded like a built-in op.
#include "helpers.hpp"

using namespace loom;

namespace {

// log(cosh(x)) without overflow; its derivative tanh(x) is written with loom's ops, so it
// differentiates again.
struct LogCosh : autograd::Function<LogCosh> {
    static constexpr const char* name = "log_cosh";
    static Tensor forward(autograd::AutogradContext* ctx, const Tensor& x)
    {
        ctx->save_for_backward({x});
        const Tensor a = abs(x);
        return a + log(1.0 + exp(-2.0 * a)) - std::log(2.0);
    }
    static std::vector<Tensor> backward(autograd::AutogradContext* ctx, const std::vector<Tensor>& grad_outputs)
    {
        return {grad_outputs[0] * tanh(ctx->get_saved_variables()[0])};
    }
};

// Two inputs, two outputs and a non-tensor argument: (a * b * scale, a - b).
struct ScaledProductAndDifference : autograd::Function<ScaledProductAndDifference> {
    static constexpr const char* name = "scaled_product_and_difference";
    static std::vector<Tensor> forward(autograd::AutogradContext* ctx, const Tensor& a, double scale, const Tensor& b)
    {
        ctx->save_for_backward({a, b});
        ctx->saved_data["scale"] = scale;
        return {a * b * scale, a - b};
    }
    static std::vector<Tensor> backward(autograd::AutogradContext* ctx, const std::vector<Tensor>& g)
    {
        const auto& s = ctx->get_saved_variables();
        const double scale = std::any_cast<double>(ctx->saved_data.at("scale"));
        return {ctx->needs_input_grad(0) ? g[0] * s[1] * scale + g[1] : Tensor(),
                ctx->needs_input_grad(1) ? g[0] * s[0] * scale - g[1] : Tensor()};
    }
};

// Deliberately wrong backwards, for the errors.
struct TooManyGrads : autograd::Function<TooManyGrads> {
    static constexpr const char* name = "too_many_grads";
    static Tensor forward(autograd::AutogradContext*, const Tensor& x) { return x * 2.0; }
    static std::vector<Tensor> backward(autograd::AutogradContext*, const std::vector<Tensor>& g) { return {g[0], g[0]}; }
};
struct WrongShapeGrad : autograd::Function<WrongShapeGrad> {
    static constexpr const char* name = "wrong_shape_grad";
    static Tensor forward(autograd::AutogradContext*, const Tensor& x) { return x * 2.0; }
    static std::vector<Tensor> backward(autograd::AutogradContext*, const std::vector<Tensor>& g)
    {
        return {g[0].sum()};
    }
};
// Returns its input untouched: the output must still be a tensor of its own on the tape.
struct Identity : autograd::Function<Identity> {
    static constexpr const char* name = "identity";
    static Tensor forward(autograd::AutogradContext*, const Tensor& x) { return x; }
    static std::vector<Tensor> backward(autograd::AutogradContext*, const std::vector<Tensor>& g) { return {g[0]}; }
};

Tensor random(Shape shape, std::uint64_t seed)
{
    Generator gen(seed);
    return uniform(shape, -3, 3, kFloat64, &gen);
}

}  // namespace

TEST_CASE("a custom op passes gradcheck and gradgradcheck, and stays finite where the naive formula overflows")
{
    const Tensor x = random({6}, 1).requires_grad_();
    const auto f = [](const std::vector<Tensor>& in) { return LogCosh::apply(in[0]); };
    CHECK_MESSAGE(gradcheck(f, {x}).ok, gradcheck(f, {x}).report());
    CHECK_MESSAGE(gradgradcheck(f, {x}).ok, gradgradcheck(f, {x}).report());

    const Tensor big = from_vector<double>({800.0, -800.0, 0.0}, {3});
    CHECK(std::isinf(testing::values(log((exp(big) + exp(-big)) / 2.0))[0]));
    CHECK(testing::close(LogCosh::apply(big), {800 - std::log(2.0), 800 - std::log(2.0), 0.0}, 1e-12));

    const Tensor a = random({2, 3}, 2).requires_grad_(), b = random({3}, 3).requires_grad_();
    const auto g = [](const std::vector<Tensor>& in) {
        auto outs = ScaledProductAndDifference::apply(in[0], 1.5, in[1].expand({2, 3}));
        return concat({outs[0], outs[1] * outs[1]}, 0);
    };
    CHECK_MESSAGE(gradcheck(g, {a, b}).ok, gradcheck(g, {a, b}).report());
    CHECK_MESSAGE(gradgradcheck(g, {a, b}).ok, gradgradcheck(g, {a, b}).report());
}

TEST_CASE("a custom op records like a built-in one: hooks, graph export, anomaly mode, no recording without grad")
{
    const Tensor x = random({4}, 4).requires_grad_();
    const Tensor y = LogCosh::apply(x * 1.0);
    bool hooked = false;
    y.register_hook([&](const Tensor& g) {
        hooked = true;
        return g * 2.0;
    });
    CHECK(autograd::to_text(y.sum()).find(" log_cosh -> [4] float64 <- #") != std::string::npos);
    y.sum().backward();
    CHECK(hooked);
    CHECK(testing::close_tensors(x.grad(), tanh(x.detach()) * 2.0, 1e-12));

    {
        NoGradGuard no_grad;
        const std::size_t before = autograd::tape_size();
        CHECK_FALSE(LogCosh::apply(x).requires_grad());
        CHECK(autograd::tape_size() == before);
    }
    const Tensor id = Identity::apply(x);
    CHECK_FALSE(id.is_same(x));
    CHECK_FALSE(id.is_leaf());

    autograd::DetectAnomalyGuard anomaly;
    const Tensor nan_input = from_vector<double>({NAN}, {1}).requires_grad_();
    CHECK_THROWS_WITH_AS(LogCosh::apply(nan_input), doctest::Contains("forward of 'log_cosh'"), Error);
}

TEST_CASE("a custom op's backward with the wrong number or shape of gradients, and a saved tensor changed in place")
{
    const Tensor x = random({3}, 5).requires_grad_();
    CHECK_THROWS_WITH_AS(TooManyGrads::apply(x).sum().backward(),
                         doctest::Contains("too_many_grads: backward returned 2 gradients, expected 1"), Error);
    CHECK_THROWS_WITH_AS(WrongShapeGrad::apply(x).sum().backward(),
                         doctest::Contains("wrong_shape_grad: backward returned a gradient of shape [] and dtype "
                                           "float64 for input 0, expected shape [3]"),
                         Error);
    Tensor v = random({3}, 6);
    const Tensor w = v.requires_grad_() * 1.0;  // a non-leaf to modify
    Tensor held = w.detach();
    const Tensor y = LogCosh::apply(w);
    {
        NoGradGuard no_grad;
        held.add_(ones({3}, kFloat64));
    }
    CHECK_THROWS_WITH_AS(y.sum().backward(), doctest::Contains("log_cosh: a tensor of shape [3] saved for backward was modified"),
                         Error);
}

TEST_CASE("a backward may take its incoming gradient: it is passed on as it is, and the input's shape is still known")
{
    const Tensor x = testing::random({2, 3}, 7).requires_grad_();
    const Tensor y = x * 1.0;  // a non-leaf of the output's shape: input_shape() answers from the gradient
    bool checked = false;
    const Tensor out =
        autograd::record("pass_on", {y}, y.detach() * 1.0, {}, [&checked](const autograd::BackwardContext& c) {
            Tensor g = c.take_grad();
            CHECK(g.defined());
            CHECK_FALSE(c.grad().defined());  // handed over
            CHECK(c.input_shape(0) == Shape{2, 3});
            CHECK(c.input_dtype(0) == kFloat64);
            checked = true;
            return std::vector<Tensor>{std::move(g)};
        });
    const Tensor seed = testing::random({2, 3}, 8);
    const std::vector<Tensor> g = grad({out}, {y, x}, {seed});
    CHECK(checked);
    CHECK(testing::close_tensors(g[0], seed, 0));
    CHECK(testing::close_tensors(g[1], seed, 0));
    // add and sub take theirs: each input still gets the whole gradient, broadcast or not.
    const Tensor a = testing::random({2, 3}, 9).requires_grad_(), b = testing::random({3}, 10).requires_grad_();
    const std::vector<Tensor> sums = grad({(a + b).sum(), (a - b).sum() * 2.0}, {a, b});
    CHECK(testing::close_tensors(sums[0], full({2, 3}, 3.0, kFloat64), 0));
    CHECK(testing::close_tensors(sums[1], full({3}, 2.0 - 4.0, kFloat64), 0));
}

TEST_CASE("push_entry: an output that is also an input needing no gradient is not read as its own output")
{
    const Tensor w = tensor({2.0}, kFloat64).requires_grad_();
    const Tensor x = tensor({3.0}, kFloat64);  // needs no gradient; the entry makes it its output
    const Tensor inputs[] = {x, w};
    bool ran = false;
    autograd::push_entry("scale_into", inputs, std::span<const Tensor>(&x, 1), {},
                         [&ran](const autograd::BackwardContext& c) {
                             ran = true;
                             CHECK_FALSE(c.needs[0]);
                             CHECK(c.needs[1]);
                             return autograd::GradList{Tensor(), c.grad() * 3.0};
                         });
    REQUIRE(x.requires_grad());
    x.sum().backward();
    CHECK(ran);
    CHECK(testing::close(w.grad(), {3.0}, 1e-15));
}
