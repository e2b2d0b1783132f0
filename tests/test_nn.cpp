// Modules, feed-forward layers, initialisers and losses.
#include "helpers.hpp"

using namespace loom;
using testing::check_error;
using testing::close;
using testing::values;

namespace {

struct Model : nn::Module {
    std::shared_ptr<nn::Embedding> embed;
    std::shared_ptr<nn::LSTM> rnn;
    std::shared_ptr<nn::Dense> head;
    Model()
    {
        embed = register_module("embed", std::make_shared<nn::Embedding>(10, 4));
        rnn = register_module("rnn", std::make_shared<nn::LSTM>(nn::LSTMOptions(4, 3).num_layers(2)));
        head = register_module("head", std::make_shared<nn::Dense>(3, 10));
    }
};

void check_params(const char* what, const std::function<Tensor()>& fn, const std::vector<Tensor>& params)
{
    const GradcheckResult r = gradcheck_parameters(fn, params);
    const std::string message = std::string(what) + ": " + r.report();
    CHECK_MESSAGE(r.ok, message);
}

}  // namespace

TEST_CASE("modules name their parameters through their children")
{
    Model m;
    std::vector<std::string> names;
    for (auto& [name, _] : m.named_parameters()) names.push_back(name);
    CHECK(names == std::vector<std::string>{"embed.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0",
                                            "rnn.bias_hh_l0", "rnn.weight_ih_l1", "rnn.weight_hh_l1",
                                            "rnn.bias_ih_l1", "rnn.bias_hh_l1", "head.weight", "head.bias"});
    CHECK(m.parameter_count() == 40 + (48 + 36 + 24) + (36 + 36 + 24) + 30 + 10);
    for (auto& p : m.parameters()) CHECK(p.requires_grad());
    const std::string table = m.summary();
    CHECK(table.find("rnn (LSTM)") != std::string::npos);
    CHECK(table.find("weight_ih_l1") != std::string::npos);
    CHECK(table.find("[12, 4]") != std::string::npos);
    CHECK(table.find(fmt::format("total: {} parameters", m.parameter_count())) != std::string::npos);
    CHECK(m.type_name() == "Model");
}

TEST_CASE("train/eval, zero_grad and to(dtype) reach every child")
{
    Model m;
    m.eval();
    CHECK(!m.rnn->is_training());
    m.train();
    CHECK(m.head->is_training());
    const Tensor tokens = from_vector<std::int64_t>({1, 2, 3}, {3, 1});
    m.head->forward(m.rnn->forward(m.embed->forward(tokens)).output).sum().backward();
    CHECK(m.head->weight.grad().defined());
    m.zero_grad();
    CHECK(!m.head->weight.grad().defined());
    Tensor held = m.head->weight;  // a handle taken before the conversion
    m.to(kFloat64);
    CHECK(held.dtype() == kFloat64);
    CHECK(m.rnn->weights(1, 0).w_ih.dtype() == kFloat64);
    CHECK(held.requires_grad());
    CHECK(m.head->forward(ones({2, 3}, kFloat64)).dtype() == kFloat64);
    CHECK(m.rnn->forward(ones({2, 1, 4}, kFloat64)).output.dtype() == kFloat64);
}

TEST_CASE("to(dtype) between a forward and its backward makes the backward refuse, at any version")
{
    for (const bool stepped : {false, true}) {
        nn::Dense d(3, 2);
        if (stepped) {  // the weight saved at version 1, as after an optimizer's step
            NoGradGuard no_grad;
            d.weight.mul_(1.0);
        }
        const Tensor loss = d(ones({2, 3})).sum();
        d.to(kFloat64);
        check_error([&] { loss.backward(); }, {"saved for backward", "Module::to()", "backward() before to()"});
        CHECK(!d.weight.grad().defined());
        d(ones({2, 3}, kFloat64)).sum().backward();  // a forward after to() sweeps as usual
        CHECK(d.weight.grad().dtype() == kFloat64);
    }
}

TEST_CASE("to(dtype) between a forward and its backward: graphs that saved nothing of the weight refuse too")
{
    // Each graph reads the weight without saving it, so no version check sees the conversion:
    // the gradient reaching the converted weight is what tells. One route each: the formula
    // route (add, neg), the general route (sum), a view's region, grad(), a user's op, and a
    // closure writing the gradient in place.
    const auto sum_of_all = [](const Tensor& w) {
        return autograd::record("sum_of_all", {w}, w.detach().sum(), {}, [](const autograd::BackwardContext& c) {
            return autograd::GradList{c.grad().expand(c.input_shape(0)).contiguous()};
        });
    };
    const std::vector<std::string> sweep_error{"backward",    "dtype float32", "shape [2, 3]",
                                               "float64 now", "Module::to()",  "backward() before to()"};
    // A user's op has its returned gradients checked first: that error speaks to the op's author.
    const std::vector<std::string> user_op_error{"sum_of_all", "dtype float32", "dtype float64", "Module::to()",
                                                 "backward() before to()"};
    struct Route {
        const char* name;
        std::function<Tensor(const Tensor&)> graph;
        const std::vector<std::string>& error;
    };
    const std::vector<Route> routes{
        {"add", [](const Tensor& w) { return (w + w).sum(); }, sweep_error},
        {"neg", [](const Tensor& w) { return (-w).sum(); }, sweep_error},
        {"sum", [](const Tensor& w) { return w.sum(); }, sweep_error},
        {"a view", [](const Tensor& w) { const Tensor row = w.select(0, 1); return (row * row).sum(); }, sweep_error},
        {"a user's op", sum_of_all, user_op_error},
        // A hook on exp's result has the sweep run exp's closure, which writes into the sum in place.
        {"exp's closure",
         [](const Tensor& w) {
             Tensor e = exp(w);
             e.register_hook([](const Tensor& g) { return g; });
             return e.sum();
         },
         sweep_error},
    };
    for (const Route& route : routes)
        for (const bool through_grad : {false, true}) {
            CAPTURE(route.name);
            CAPTURE(through_grad);
            nn::Dense d(3, 2);
            const Tensor loss = route.graph(d.weight);
            d.to(kFloat64);
            check_error(
                [&] {
                    if (through_grad) (void)loom::grad({loss}, {d.weight});
                    else loss.backward();
                },
                route.error);
            CHECK(!d.weight.grad().defined());
            d(ones({2, 3}, kFloat64)).sum().backward();  // a forward after to() sweeps as usual
            CHECK(d.weight.grad().dtype() == kFloat64);
        }
}

TEST_CASE("a view of a parameter taken before to(dtype) keeps the values it had")
{
    // Small (its bytes in its header's block) and large parameters hold their bytes differently.
    for (const std::int64_t in : {3, 40}) {
        CAPTURE(in);
        nn::Dense d(in, 2);
        Tensor row;
        {
            NoGradGuard no_grad;
            row = d.weight.select(0, 1);
        }
        const std::vector<double> before = values(row);
        d.to(kFloat64);
        {
            NoGradGuard no_grad;
            d.weight.mul_(2.0);  // the parameter's new bytes: the old view does not see them
        }
        CHECK(row.dtype() == kFloat32);
        CHECK(values(row) == before);
        std::vector<double> doubled = before;
        for (double& v : doubled) v *= 2;
        CHECK(values(d.weight.select(0, 1)) == doubled);  // float32 values are exact in float64, and so twice them
    }
}

TEST_CASE("Dense computes x W^T + b and gradchecks")
{
    nn::Dense d(3, 2, true, kFloat64);
    const Tensor x = tensor({1, 2, 3, -1, 0, 1}, {2, 3}, kFloat64);
    const auto w = values(d.weight), b = values(d.bias);
    CHECK(close(d(x).select(0, 0), {w[0] + 2 * w[1] + 3 * w[2] + b[0], w[3] + 2 * w[4] + 3 * w[5] + b[1]}, 1e-12));
    CHECK(d(randn({4, 5, 3}, kFloat64)).sizes() == Shape{4, 5, 2});
    CHECK(values(d.weight.abs().max())[0] <= 1 / std::sqrt(3.0));
    check_params("Dense", [&] { return d(x); }, d.parameters());
    check_error([&] { (void)d(ones({2, 4}, kFloat64)); }, {"Dense", "[..., 3]", "[2, 4]"});
    nn::Dense no_bias(3, 2, false);
    CHECK(no_bias.parameters().size() == 1);
}

TEST_CASE("Embedding looks rows up; the padding row gets no gradient")
{
    nn::Embedding e(5, 3, 0, kFloat64);
    CHECK(close(e.weight.select(0, 0), {0, 0, 0}));
    const Tensor idx = from_vector<std::int64_t>({0, 2, 2, 4}, {2, 2});
    const Tensor out = e(idx);
    CHECK(out.sizes() == Shape{2, 2, 3});
    CHECK(close(out.select(0, 1).select(0, 1), values(e.weight.select(0, 4))));
    (out * out.detach()).sum().backward();  // dL/drow = row value
    CHECK(close(e.weight.grad().select(0, 0), {0, 0, 0}));
    CHECK(close(e.weight.grad().select(0, 2), values(e.weight.select(0, 2) * 2.0), 1e-12));
    // The padding row is excluded on purpose: finite differences would see it, the tape must not.
    const Tensor used = from_vector<std::int64_t>({1, 2, 2, 4}, {2, 2});
    check_params("Embedding", [&] { return e(used); }, e.parameters());
    check_error([&] { (void)e(from_vector<std::int64_t>({5}, {1})); }, {"Embedding", "index 5", "[0, 5)"});
    check_error([&] { (void)e(ones({2})); }, {"Embedding", "int64", "float32"});
}

TEST_CASE("Dropout zeroes and rescales in training, is the identity in eval, and is seeded")
{
    Generator g1(5), g2(5);
    nn::Dropout d1(0.25, &g1), d2(0.25, &g2);
    const Tensor x = ones({20000}, kFloat64);
    const Tensor y = d1(x);
    const auto v = values(y);
    const double zero_fraction = double(std::count(v.begin(), v.end(), 0.0)) / double(v.size());
    CHECK(zero_fraction == doctest::Approx(0.25).epsilon(0.1));
    CHECK(y.max().item<double>() == doctest::Approx(1 / 0.75));
    CHECK(values(d2(x)) == v);  // same seed, same mask
    d1.eval();
    CHECK(d1(x).is_same(x));
    check_error([] { nn::Dropout(1.0); }, {"Dropout", "0 <= p < 1"});
}

TEST_CASE("LayerNorm normalises the trailing dims and gradchecks")
{
    nn::LayerNorm ln({4}, 1e-5, true, kFloat64);
    const Tensor x = randn({3, 4}, kFloat64) * 3.0 + 1.0;
    const Tensor y = ln(x);
    CHECK(close(y.mean({1}), {0, 0, 0}, 1e-9));
    CHECK(close(y.var({1}, false), {1, 1, 1}, 1e-4));
    {
        NoGradGuard no_grad;
        ln.weight.copy_(tensor({1, 2, 3, 4}, kFloat64));
    }
    check_params("LayerNorm", [&] { return ln(x); }, ln.parameters());
    CHECK(gradcheck([&](const std::vector<Tensor>& v) { return ln(v[0]); }, {x.clone().requires_grad_()}).ok);
    check_error([&] { (void)ln(ones({3, 5}, kFloat64)); }, {"LayerNorm", "[..., 4]", "[3, 5]"});
}

TEST_CASE("Sequential chains layers named 0, 1, ...")
{
    nn::Sequential net{std::make_shared<nn::Dense>(3, 4, true, kFloat64), std::make_shared<nn::Tanh>(),
                       std::make_shared<nn::Dense>(4, 1, true, kFloat64), std::make_shared<nn::Sigmoid>()};
    CHECK(net.named_parameters()[2].first == "2.weight");
    const Tensor x = randn({5, 3}, kFloat64);
    CHECK(net(x).sizes() == Shape{5, 1});
    check_params("Sequential", [&] { return net(x); }, net.parameters());
    nn::ReLU relu_layer;
    CHECK(close(relu_layer(tensor({-1, 2})), {0, 2}));
}

TEST_CASE("initialisers follow PyTorch's formulas")
{
    using namespace nn::init;
    CHECK(calculate_gain("tanh") == doctest::Approx(5.0 / 3));
    CHECK(calculate_gain("relu") == doctest::Approx(std::sqrt(2.0)));
    check_error([] { (void)calculate_gain("swish"); }, {"calculate_gain", "swish"});
    Generator gen(1);
    Tensor w = empty({200, 300}, kFloat64);
    xavier_uniform_(w, 1, &gen);
    const double a = std::sqrt(6.0 / 500);
    CHECK(w.abs().max().item<double>() <= a);
    CHECK(w.var().item<double>() == doctest::Approx(a * a / 3).epsilon(0.05));
    xavier_normal_(w, 1, &gen);
    CHECK(w.var().item<double>() == doctest::Approx(2.0 / 500).epsilon(0.05));
    kaiming_normal_(w, 0, FanMode::FanIn, "relu", &gen);
    CHECK(w.var().item<double>() == doctest::Approx(2.0 / 300).epsilon(0.05));
    kaiming_uniform_(w, std::sqrt(5.0), FanMode::FanIn, "leaky_relu", &gen);  // PyTorch's Linear default
    CHECK(w.abs().max().item<double>() <= 1 / std::sqrt(300.0));
    for (Shape shape : {Shape{8, 8}, Shape{6, 10}, Shape{10, 6}}) {
        Tensor q = empty(shape, kFloat64);
        orthogonal_(q, 1, &gen);
        const bool wide = shape[0] < shape[1];
        const Tensor gram = wide ? matmul(q, q.t()) : matmul(q.t(), q);
        CHECK(testing::close_tensors(gram, eye(std::min(shape[0], shape[1]), kFloat64), 1e-12));
    }
    Tensor c = empty({3});
    constant_(c, 0.5);
    CHECK(close(c, {0.5, 0.5, 0.5}));
    check_error([] { Tensor v = empty({3}); xavier_uniform_(v); }, {"init", "2 dims", "[3]"});

    nn::LSTM lstm(nn::LSTMOptions(2, 3));
    nn::lstm_forget_bias_(lstm);
    const auto ws = lstm.weights(0, 0);
    CHECK(close(ws.b_ih.narrow(0, 3, 3), {1, 1, 1}));
    CHECK(close(ws.b_hh.narrow(0, 3, 3), {0, 0, 0}));
}

TEST_CASE("losses: values by hand")
{
    const Tensor logits = tensor({1, 2, 3, 1, 1, 1}, {2, 3}, kFloat64);
    const Tensor target = from_vector<std::int64_t>({2, 0}, {2});
    const double l0 = -3 + std::log(std::exp(1.0) + std::exp(2.0) + std::exp(3.0)), l1 = std::log(3.0);
    CHECK(close(nn::cross_entropy(logits, target), {(l0 + l1) / 2}, 1e-12));
    nn::CrossEntropyOptions sum_opts;
    sum_opts.reduction = nn::Reduction::Sum;
    CHECK(close(nn::cross_entropy(logits, target, sum_opts), {l0 + l1}, 1e-12));
    nn::CrossEntropyOptions none;
    none.reduction = nn::Reduction::None;
    CHECK(close(nn::cross_entropy(logits, target, none), {l0, l1}, 1e-12));
    nn::CrossEntropyOptions ignore;
    ignore.ignore_index = 0;  // the second target is ignored: the mean is over one row
    CHECK(close(nn::cross_entropy(logits, target, ignore), {l0}, 1e-12));
    nn::CrossEntropyOptions smooth;
    smooth.label_smoothing = 0.1;
    const double lse = std::log(std::exp(1.0) + std::exp(2.0) + std::exp(3.0));
    const double u0 = lse - 2;  // mean over classes of -log p for row 0
    CHECK(close(nn::cross_entropy(logits, target, smooth), {(0.9 * l0 + 0.1 * u0 + l1) / 2}, 1e-12));
    CHECK(close(nn::cross_entropy(tensor({1, 2, 3}, kFloat64), scalar_tensor(2, kInt64)), {l0}, 1e-12));
    CHECK(close(nn::nll_loss(logits.log_softmax(1), target), {(l0 + l1) / 2}, 1e-12));
    CHECK(close(nn::mse_loss(tensor({1, 2}, kFloat64), tensor({0, 4}, kFloat64)), {2.5}));
    const double x = 0.3, t = 1;
    CHECK(close(nn::binary_cross_entropy_with_logits(tensor({x, -1000}, kFloat64), tensor({t, 0}, kFloat64)),
                {(-std::log(1 / (1 + std::exp(-x))) + 0) / 2}, 1e-12));
    CHECK(std::isfinite(nn::binary_cross_entropy_with_logits(tensor({1000}), tensor({0})).item<double>()));
    nn::CrossEntropyLoss module;
    CHECK(close(module(logits, target), {(l0 + l1) / 2}, 1e-12));
}

TEST_CASE("losses gradcheck")
{
    const Tensor target = from_vector<std::int64_t>({2, 0, -100, 1}, {4});
    for (double smoothing : {0.0, 0.2})
        for (auto reduction : {nn::Reduction::Mean, nn::Reduction::Sum, nn::Reduction::None}) {
            nn::CrossEntropyOptions o;
            o.label_smoothing = smoothing;
            o.reduction = reduction;
            const auto r = gradcheck([&](const std::vector<Tensor>& v) { return nn::cross_entropy(v[0], target, o); },
                                     {randn({4, 3}, kFloat64).requires_grad_()});
            CHECK_MESSAGE(r.ok, "cross_entropy: " << r.report());
        }
    CHECK(gradcheck([&](const std::vector<Tensor>& v) { return nn::nll_loss(v[0], target); },
                    {randn({4, 3}, kFloat64).requires_grad_()}).ok);
    CHECK(gradcheck([](const std::vector<Tensor>& v) { return nn::mse_loss(v[0], v[1]); },
                    {randn({3, 2}, kFloat64).requires_grad_(), randn({3, 2}, kFloat64).requires_grad_()}).ok);
    CHECK(gradcheck([](const std::vector<Tensor>& v) { return nn::binary_cross_entropy_with_logits(v[0], v[1]); },
                    {randn({5}, kFloat64).requires_grad_(), rand({5}, kFloat64).requires_grad_()}).ok);
}

TEST_CASE("loss errors name the problem")
{
    const Tensor logits = ones({2, 3});
    check_error([&] { (void)nn::cross_entropy(logits, from_vector<std::int64_t>({0, 3}, {2})); },
                {"cross_entropy", "target 3", "[0, 3)", "ignore_index"});
    check_error([&] { (void)nn::cross_entropy(logits, from_vector<std::int64_t>({0}, {1})); },
                {"cross_entropy", "[1]", "[2, 3]"});
    check_error([&] { (void)nn::cross_entropy(logits, ones({2})); }, {"cross_entropy", "int64"});
    check_error([&] { (void)nn::cross_entropy(ones({2, 3, 4}), ones({2}, kInt64)); }, {"cross_entropy", "[N, C]"});
    check_error([&] { (void)nn::mse_loss(ones({2}), ones({3})); }, {"mse_loss", "[2]", "[3]"});
    nn::CrossEntropyOptions bad;
    bad.label_smoothing = 1.5;
    check_error([&] { (void)nn::cross_entropy(logits, ones({2}, kInt64), bad); }, {"label_smoothing"});
}

namespace {

// Holds a tensor it is given as its own parameter: tied to wherever else it is registered.
struct Holder : nn::Module {
    explicit Holder(const Tensor& shared) { weight = register_parameter("weight", shared); }
    Tensor weight;
};

// An embedding and an output layer sharing one weight (Press & Wolf 2017), plus a bias of its own.
struct TiedModel : nn::Module {
    TiedModel()
    {
        embed = register_module("embed", std::make_shared<nn::Embedding>(5, 3, std::nullopt, kFloat64));
        out = register_module("out", std::make_shared<Holder>(embed->weight));
        bias = register_parameter("bias", zeros({5}, kFloat64));
    }
    Tensor forward(const Tensor& tokens) const { return linear(embed->forward(tokens), out->weight, bias); }
    std::shared_ptr<nn::Embedding> embed;
    std::shared_ptr<Holder> out;
    Tensor bias;
};

}  // namespace

TEST_CASE("a tensor registered in two modules is one parameter: listed, counted, clipped and optimised once")
{
    manual_seed(4);
    TiedModel model;
    CHECK(model.named_parameters().size() == 2);
    CHECK(model.named_parameters()[0].first == "bias");  // own parameters first, then the children's, as in PyTorch
    CHECK(model.named_parameters()[1].first == "embed.weight");  // the first name a tied tensor was met under
    CHECK(model.named_parameters(true, /*remove_duplicate=*/false).size() == 3);
    CHECK(model.named_parameters(/*recurse=*/false).size() == 1);
    CHECK(model.parameters().size() == 2);
    CHECK(model.parameter_count() == 15 + 5);
    const std::string summary = model.summary();
    CHECK_MESSAGE(summary.find("tied to embed.weight") != std::string::npos, summary);
    CHECK_MESSAGE(summary.find("total: 20 parameters in 2 tensors") != std::string::npos, summary);

    // clip_grad_norm counts the shared gradient once, whether listed once or twice.
    const Tensor tokens = tensor({0, 3, 4, 3}, kInt64);
    const auto gradients = [&] {
        model.zero_grad();
        model.forward(tokens).pow(2).sum().backward();
        return std::pair{model.embed->weight.grad().clone(), model.bias.grad().clone()};
    };
    const auto [gw, gb] = gradients();
    const double norm = std::sqrt(gw.pow(2).sum().item<double>() + gb.pow(2).sum().item<double>());
    for (bool listed_twice : {false, true}) {
        CAPTURE(listed_twice);
        gradients();
        std::vector<Tensor> params = model.parameters();
        if (listed_twice) params.push_back(model.out->weight);
        const double total = nn::utils::clip_grad_norm(params, norm / 2);
        CHECK(total == doctest::Approx(norm).epsilon(1e-12));
        const double after = std::sqrt(model.embed->weight.grad().pow(2).sum().item<double>() +
                                       model.bias.grad().pow(2).sum().item<double>());
        CHECK(after == doctest::Approx(norm / 2).epsilon(1e-5));
    }

    // state_dict has both names; loading restores values into the one tensor, still shared.
    const NamedTensorMap dict = model.state_dict();
    CHECK(dict.count("embed.weight") == 1);
    CHECK(dict.count("out.weight") == 1);
    TiedModel other;
    other.load_state_dict(dict);
    CHECK(other.embed->weight.is_same(other.out->weight));
    CHECK(testing::close_tensors(other.out->weight, model.embed->weight, 0));

    // Adam takes model.parameters() and steps the shared tensor once.
    optim::Adam adam(model.parameters(), optim::AdamOptions(0.1));
    gradients();
    const Tensor before = model.embed->weight.clone();
    adam.step();
    CHECK(adam.step_count(0) == 1);
    CHECK(model.embed->weight.is_same(model.out->weight));
    CHECK_FALSE(testing::close_tensors(model.embed->weight, before, 1e-6));
}
