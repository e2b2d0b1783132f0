// Every differentiable op against central finite differences in float64, from one table.
#include "helpers.hpp"

using namespace loom;

namespace {

using Fn = std::function<Tensor(const std::vector<Tensor>&)>;

struct Case {
    const char* name;
    std::vector<Shape> shapes;  // one float64 input requiring grad per shape
    Fn fn;
    double low = -2, high = 2;  // input range: keeps log/sqrt/pow on their domain
};

Tensor idx(std::vector<std::int64_t> v, Shape shape) { return from_vector<std::int64_t>(v, shape); }

std::vector<Case> cases()
{
    using V = const std::vector<Tensor>&;
    return {
        // elementwise, including broadcasting in every direction
        {"add", {{2, 3}, {2, 3}}, [](V x) { return x[0] + x[1]; }},
        {"add broadcast row", {{2, 3}, {3}}, [](V x) { return x[0] + x[1]; }},
        {"add broadcast both", {{3, 1}, {1, 4}}, [](V x) { return x[0] + x[1]; }},
        {"sub broadcast", {{2, 1, 3}, {4, 1}}, [](V x) { return x[0] - x[1]; }},
        {"mul broadcast", {{2, 3}, {2, 1}}, [](V x) { return x[0] * x[1]; }},
        {"div", {{2, 3}, {2, 3}}, [](V x) { return x[0] / x[1]; }, 0.5, 2},
        {"div broadcast", {{3}, {2, 1}}, [](V x) { return x[0] / x[1]; }, 0.5, 2},
        {"scalar ops", {{4}}, [](V x) { return (2.0 - x[0]) * 3.0 / 2.0 + 1.0 - 1.0 / (x[0] + 3.0); }},
        {"neg", {{3}}, [](V x) { return -x[0]; }},
        {"pow scalar", {{3}}, [](V x) { return pow(x[0], 3.0); }},
        {"pow fractional", {{3}}, [](V x) { return pow(x[0], 1.5); }, 0.5, 2},
        {"pow tensor", {{2, 3}, {3}}, [](V x) { return pow(x[0], x[1]); }, 0.5, 2},
        {"exp", {{2, 2}}, [](V x) { return exp(x[0]); }},
        {"log", {{2, 2}}, [](V x) { return log(x[0]); }, 0.5, 3},
        {"sqrt", {{2, 2}}, [](V x) { return sqrt(x[0]); }, 0.5, 3},
        {"abs", {{5}}, [](V x) { return abs(x[0]); }, 0.2, 2},
        {"abs negative", {{5}}, [](V x) { return abs(x[0]); }, -2, -0.2},
        {"tanh", {{2, 3}}, [](V x) { return tanh(x[0]); }},
        {"sigmoid", {{2, 3}}, [](V x) { return sigmoid(x[0]); }},
        {"softplus", {{2, 3}}, [](V x) { return softplus(x[0] * 3.0); }},
        {"relu", {{6}}, [](V x) { return relu(x[0] - 0.05); }},
        {"clamp", {{8}}, [](V x) { return clamp(x[0], -0.95, 1.05); }},
        {"clamp min only", {{8}}, [](V x) { return clamp(x[0], -0.95, std::nullopt); }},
        {"maximum", {{6}, {6}}, [](V x) { return maximum(x[0], x[1]); }},
        {"minimum broadcast", {{2, 3}, {3}}, [](V x) { return minimum(x[0], x[1]); }},
        {"where", {{2, 3}, {3}}, [](V x) { return where(gt(x[0], zeros({1}, kFloat64)), x[0], x[1]); }},
        {"masked_fill", {{2, 3}}, [](V x) { return masked_fill(x[0], gt(x[0], zeros({1}, kFloat64)), 0.5); }},
        // reductions along every axis, with and without keepdim
        {"sum all", {{2, 3, 4}}, [](V x) { return x[0].sum(); }},
        {"sum axis 0", {{2, 3, 4}}, [](V x) { return x[0].sum({0}); }},
        {"sum axis 1 keepdim", {{2, 3, 4}}, [](V x) { return x[0].sum({1}, true); }},
        {"sum axis -1", {{2, 3, 4}}, [](V x) { return x[0].sum({-1}); }},
        {"sum axes 0,2", {{2, 3, 4}}, [](V x) { return x[0].sum({0, 2}); }},
        {"mean all", {{2, 3}}, [](V x) { return x[0].mean(); }},
        {"mean axis 0", {{2, 3}}, [](V x) { return x[0].mean({0}); }},
        {"mean axis 1 keepdim", {{2, 3}}, [](V x) { return x[0].mean({1}, true); }},
        {"max all", {{2, 3}}, [](V x) { return x[0].max(); }},
        {"max axis 0", {{3, 4}}, [](V x) { return x[0].max(0); }},
        {"max axis 1 keepdim", {{3, 4}}, [](V x) { return x[0].max(1, true); }},
        {"min axis 0", {{3, 4}}, [](V x) { return x[0].min(0); }},
        {"min axis 1", {{3, 4}}, [](V x) { return x[0].min(1); }},
        {"var all", {{2, 3}}, [](V x) { return x[0].var(); }},
        {"var axis 0", {{3, 4}}, [](V x) { return x[0].var({0}); }},
        {"var axis 1 biased", {{3, 4}}, [](V x) { return x[0].var({1}, false, true); }},
        {"norm 2", {{2, 3}}, [](V x) { return x[0].norm(); }},
        {"norm 2 axis 1", {{2, 3}}, [](V x) { return x[0].norm(2, {1}); }},
        {"norm 1 axis 0", {{2, 3}}, [](V x) { return x[0].norm(1, {0}); }, 0.2, 2},
        {"norm 3", {{4}}, [](V x) { return x[0].norm(3); }, 0.2, 2},
        {"norm inf", {{4}}, [](V x) { return x[0].norm(INFINITY); }},
        {"softmax axis 0", {{3, 4}}, [](V x) { return x[0].softmax(0); }},
        {"softmax axis 1", {{3, 4}}, [](V x) { return x[0].softmax(1); }},
        {"softmax axis -1 of 3-D", {{2, 3, 4}}, [](V x) { return x[0].softmax(-1); }},
        // masked_softmax: padding left out, a row with everything left out, a broadcast mask
        {"masked_softmax last dim", {{3, 4}},
         [](V x) { return masked_softmax(x[0], gt(idx({0, 0, 1, 1, 0, 1, 0, 1, 1, 1, 1, 1}, {3, 4}), idx({0}, {1})), 1); }},
        {"masked_softmax dim 0, broadcast mask", {{3, 2, 4}},
         [](V x) { return masked_softmax(x[0], gt(idx({0, 1, 0}, {3, 1, 1}), idx({0}, {1})), 0) * x[0]; }},
        {"log_softmax axis 0", {{3, 4}}, [](V x) { return x[0].log_softmax(0); }},
        {"log_softmax axis 1", {{3, 4}}, [](V x) { return x[0].log_softmax(1); }},
        // views and copies
        {"reshape", {{2, 6}}, [](V x) { return x[0].reshape({3, 4}) * 1.0; }},
        {"view", {{2, 6}}, [](V x) { return x[0].view({4, -1}); }},
        {"reshape of a transposed view", {{3, 4}}, [](V x) { return x[0].t().reshape({-1}); }},
        {"permute", {{2, 3, 4}}, [](V x) { return x[0].permute({2, 0, 1}); }},
        {"transpose", {{3, 4}}, [](V x) { return x[0].transpose(0, 1); }},
        {"squeeze unsqueeze", {{3, 1, 2}}, [](V x) { return x[0].squeeze(1).unsqueeze(0).unsqueeze(-1); }},
        {"expand", {{3, 1}}, [](V x) { return x[0].expand({2, 3, 4}); }},
        {"broadcast_to", {{4}}, [](V x) { return broadcast_to(x[0], {3, 4}); }},
        {"sum_to", {{2, 3, 4}}, [](V x) { return sum_to(x[0] * x[0], {3, 1}); }},
        {"narrow", {{4, 5}}, [](V x) { return x[0].narrow(1, 1, 3); }},
        {"slice with step", {{6, 3}}, [](V x) { return x[0].slice(0, 1, 6, 2); }},
        {"select", {{3, 4}}, [](V x) { return x[0].select(1, 2); }},
        {"select negative", {{3, 4}}, [](V x) { return x[0].select(0, -1); }},
        {"contiguous of transposed", {{3, 4}}, [](V x) { return x[0].t().contiguous(); }},
        {"clone", {{3}}, [](V x) { return x[0].clone(); }},
        {"overlapping views", {{5}}, [](V x) { return x[0].narrow(0, 0, 3) * x[0].narrow(0, 2, 3); }},
        // joins and indexing
        {"concat axis 0", {{2, 3}, {1, 3}}, [](V x) { return concat({x[0], x[1]}, 0); }},
        {"concat axis 1", {{2, 3}, {2, 2}}, [](V x) { return concat({x[0], x[1], x[0]}, 1); }},
        {"stack", {{2, 3}, {2, 3}}, [](V x) { return stack({x[0], x[1]}, 1); }},
        {"split", {{5, 2}}, [](V x) { auto p = x[0].split(2); return p[0].sum() * p[1].sum() + p[2].sum(); }},
        {"chunk", {{2, 6}}, [](V x) { auto p = x[0].chunk(3, 1); return p[0] * p[2]; }},
        {"gather axis 1", {{2, 3}}, [](V x) { return x[0].gather(1, idx({2, 0, 0, 1, 1, 1}, {2, 3})); }},
        {"gather axis 0", {{3, 2}}, [](V x) { return x[0].gather(0, idx({2, 0, 2, 2}, {2, 2})); }},
        {"index_select repeated", {{4, 3}}, [](V x) { return x[0].index_select(0, idx({3, 1, 3}, {3})); }},
        {"index_select axis 1", {{2, 4}}, [](V x) { return x[0].index_select(1, idx({0, 2}, {2})); }},
        // matmul in every form
        {"matmul 2-D", {{3, 4}, {4, 2}}, [](V x) { return matmul(x[0], x[1]); }},
        {"matmul transposed views", {{4, 3}, {2, 4}}, [](V x) { return matmul(x[0].t(), x[1].t()); }},
        {"matmul vector-vector", {{4}, {4}}, [](V x) { return matmul(x[0], x[1]); }},
        {"matmul vector-matrix", {{3}, {3, 2}}, [](V x) { return matmul(x[0], x[1]); }},
        {"matmul matrix-vector", {{2, 3}, {3}}, [](V x) { return matmul(x[0], x[1]); }},
        {"matmul batched", {{2, 3, 4}, {2, 4, 2}}, [](V x) { return matmul(x[0], x[1]); }},
        {"matmul batch broadcast", {{2, 1, 2, 3}, {3, 3, 2}}, [](V x) { return matmul(x[0], x[1]); }},
        {"matmul 3-D by 2-D", {{4, 2, 3}, {3, 5}}, [](V x) { return matmul(x[0], x[1]); }},
        // linear: bias or none, inputs of 1 to 3 dims, a transposed weight view, a weight used at every step
        {"linear", {{3, 4}, {2, 4}, {2}}, [](V x) { return linear(x[0], x[1], x[2]); }},
        {"linear without bias, 3-D input", {{2, 3, 4}, {5, 4}}, [](V x) { return linear(x[0], x[1]); }},
        {"linear 1-D input", {{4}, {3, 4}, {3}}, [](V x) { return linear(x[0], x[1], x[2]); }},
        {"linear transposed weight", {{3, 4}, {4, 2}, {2}}, [](V x) { return linear(x[0], x[1].t(), x[2]) * x[2]; }},
        {"linear weight shared over 4 steps", {{4, 2, 3}, {5, 3}, {5}, {5, 5}},
         [](V x) {
             Tensor h = zeros({2, 5}, kFloat64);
             for (int t = 0; t < 4; ++t) h = tanh(linear(x[0].select(0, t), x[1], x[2]) + linear(h, x[3]));
             return h * x[2].sum() + x[3].sum();
         }},
        // compositions
        {"tanh RNN unrolled over 5 steps", {{5, 2, 3}, {4, 3}, {4, 4}, {4}, {2, 4}},
         [](V x) {
             Tensor h = x[4];
             std::vector<Tensor> outputs;
             for (int t = 0; t < 5; ++t) {
                 h = tanh(matmul(x[0].select(0, t), x[1].t()) + matmul(h, x[2].t()) + x[3]);
                 outputs.push_back(h);
             }
             return stack(outputs, 0);
         }},
        {"cross-entropy by hand", {{4, 5}},
         [](V x) { return -(x[0].log_softmax(1).gather(1, idx({1, 0, 4, 2}, {4, 1}))).mean(); }},
    };
}

}  // namespace

TEST_CASE("gradcheck every differentiable op")
{
    for (const Case& c : cases()) {
        Generator gen(42);
        std::vector<Tensor> inputs;
        for (const Shape& s : c.shapes) inputs.push_back(uniform(s, c.low, c.high, kFloat64, &gen).requires_grad_());
        const GradcheckResult r = gradcheck(c.fn, inputs);
        CHECK_MESSAGE(r.ok, std::string(c.name) << ": " << r.report());
    }
}

TEST_CASE("second derivatives of every differentiable op (create_graph) against finite differences")
{
    for (const Case& c : cases()) {
        Generator gen(7);
        std::vector<Tensor> inputs;
        for (const Shape& s : c.shapes) inputs.push_back(uniform(s, c.low, c.high, kFloat64, &gen).requires_grad_());
        const GradcheckResult r = gradgradcheck(c.fn, inputs);
        CHECK_MESSAGE(r.ok, std::string(c.name) << ": " << r.report());
    }
}

TEST_CASE("gradcheck finds a wrong backward and reports the worst element")
{
    // An op whose recorded backward is off by a factor 2 in its second element.
    const auto broken_square = [](const std::vector<Tensor>& x) {
        Tensor out = x[0].detach() * x[0].detach();
        return autograd::record("broken_square", {x[0]}, out, {x[0]}, [](const autograd::BackwardContext& c) {
            Tensor g = c.grad() * c.saved[0] * 2.0;
            g = g * tensor({1, 2, 1}, kFloat64);
            return std::vector<Tensor>{g};
        });
    };
    const Tensor x = tensor({0.5, 1.5, -1}, kFloat64).requires_grad_();
    const GradcheckResult r = gradcheck(broken_square, {x});
    CHECK(!r.ok);
    CHECK(r.index == Shape{1});
    CHECK(r.analytic == doctest::Approx(2 * r.numeric));
    CHECK(r.report().find("FAILED") != std::string::npos);
}

TEST_CASE("gradcheck refuses float32 inputs")
{
    const Tensor x = tensor({1, 2}).requires_grad_();
    testing::check_error([&] { gradcheck([](const std::vector<Tensor>& v) { return v[0] * 2.0; }, {x}); },
                         {"gradcheck", "float32", "float64"});
}

TEST_CASE("to() sends gradients back in the input's dtype")
{
    Tensor x = tensor({1, 2}, kFloat64).requires_grad_();
    (x.to(kFloat32) * 3.0).sum().backward();
    CHECK(x.grad().dtype() == kFloat64);
    CHECK(testing::close(x.grad(), {3, 3}));
}
