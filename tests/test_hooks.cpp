// Module hooks: forward pre-hooks, forward hooks and full backward hooks, removable by handle.
#include "helpers.hpp"

using namespace loom;
using testing::check_error;
using testing::close_tensors;

TEST_CASE("forward pre-hooks and forward hooks fire in order, may replace inputs and outputs, and are removable")
{
    nn::Dense a(3, 2, true, kFloat64), b(2, 2, true, kFloat64);
    auto seq = std::make_shared<nn::Sequential>();
    auto first = std::make_shared<nn::Dense>(3, 2, true, kFloat64);
    auto second = std::make_shared<nn::Tanh>();
    seq->push_back(first);
    seq->push_back(second);
    std::vector<std::string> calls;
    auto h1 = seq->register_forward_pre_hook([&](nn::Module& m, nn::Tensors& in) {
        calls.push_back("pre " + m.type_name());
        CHECK(in.size() == 1);
    });
    auto h2 = first->register_forward_pre_hook([&](nn::Module&, nn::Tensors&) { calls.push_back("pre Dense"); });
    auto h3 = first->register_forward_hook([&](nn::Module&, const nn::Tensors& in, nn::Tensors& out) {
        calls.push_back("forward Dense");
        CHECK(out[0].sizes() == Shape{4, 2});
        CHECK(in[0].sizes() == Shape{4, 3});
    });
    auto h4 = seq->register_forward_hook([&](nn::Module&, const nn::Tensors&, nn::Tensors&) { calls.push_back("forward Sequential"); });
    const Tensor x = uniform({4, 3}, -1, 1, kFloat64);
    const Tensor y = (*seq)(x);
    CHECK(calls == std::vector<std::string>{"pre Sequential", "pre Dense", "forward Dense", "forward Sequential"});
    CHECK(close_tensors(y, tanh(matmul(x, first->weight.t()) + first->bias), 1e-12));

    // Replacing: the pre-hook doubles the input, the forward hook negates the output.
    auto scale = first->register_forward_pre_hook([](nn::Module&, nn::Tensors& in) { in[0] = in[0] * 2.0; });
    auto negate = first->register_forward_hook([](nn::Module&, const nn::Tensors&, nn::Tensors& out) { out[0] = -out[0]; });
    CHECK(close_tensors((*first)(x), -(matmul(x * 2.0, first->weight.t()) + first->bias), 1e-12));
    scale.remove();
    negate.remove();
    negate.remove();  // again: nothing
    CHECK(close_tensors((*first)(x), matmul(x, first->weight.t()) + first->bias, 1e-12));

    for (auto* h : {&h1, &h2, &h3, &h4}) h->remove();
    calls.clear();
    (*seq)(x);
    CHECK(calls.empty());

    auto bad = first->register_forward_hook([](nn::Module&, const nn::Tensors&, nn::Tensors& out) { out.push_back(out[0]); });
    CHECK_THROWS_WITH_AS((*first)(x), doctest::Contains("Dense: a forward hook changed the number of outputs from 1 to 2"),
                         Error);
    bad.remove();

    nn::RemovableHandle outlives;
    {
        nn::Dense gone(3, 2);
        outlives = gone.register_forward_hook([](nn::Module&, const nn::Tensors&, nn::Tensors&) {});
    }
    outlives.remove();  // the module is gone: nothing to do, nothing to crash
}

TEST_CASE("a backward hook gets the gradients w.r.t. the outputs and the inputs, and may replace the inputs'")
{
    nn::Dense dense(3, 2, true, kFloat64);
    const Tensor x = uniform({4, 3}, -1, 1, kFloat64).requires_grad_();
    const Tensor target_grad = uniform({4, 2}, -1, 1, kFloat64);
    nn::Tensors seen_in, seen_out;
    int fired = 0;
    auto handle = dense.register_full_backward_hook([&](nn::Module& m, nn::Tensors& grad_in, const nn::Tensors& grad_out) {
        CHECK(&m == &dense);
        ++fired;
        seen_in = grad_in;
        seen_out = grad_out;
    });
    dense(x).backward(target_grad);
    REQUIRE(fired == 1);
    CHECK(close_tensors(seen_out.at(0), target_grad, 1e-12));
    CHECK(close_tensors(seen_in.at(0), matmul(target_grad, dense.weight.detach()), 1e-12));
    CHECK(close_tensors(x.grad(), seen_in[0], 1e-12));
    handle.remove();

    // Replacing dL/dx: the hook scales it, and x.grad() receives the scaled one; weights unchanged.
    x.zero_grad();
    dense.zero_grad();
    auto scaling = dense.register_full_backward_hook([](nn::Module&, nn::Tensors& grad_in, const nn::Tensors&) {
        grad_in[0] = grad_in[0] * 3.0;
    });
    dense(x).backward(target_grad);
    CHECK(close_tensors(x.grad(), matmul(target_grad, dense.weight.detach()) * 3.0, 1e-12));
    CHECK(close_tensors(dense.weight.grad(), matmul(target_grad.t(), x.detach()), 1e-12));
    scaling.remove();

    // With no input requiring grad, the hook still gets the output gradients.
    fired = 0;
    auto only_out = dense.register_full_backward_hook([&](nn::Module&, nn::Tensors& grad_in, const nn::Tensors& grad_out) {
        ++fired;
        CHECK_FALSE(grad_in.at(0).defined());
        CHECK(grad_out.at(0).defined());
    });
    dense(x.detach()).sum().backward();
    CHECK(fired == 1);
    only_out.remove();

    auto wrong = dense.register_full_backward_hook([](nn::Module&, nn::Tensors& grad_in, const nn::Tensors&) {
        grad_in[0] = grad_in[0].sum({0});
    });
    CHECK_THROWS_WITH_AS(dense(x).sum().backward(),
                         doctest::Contains("Dense: a backward hook returned a gradient of shape [3] and dtype float64 for "
                                           "input 0, expected shape [4, 3]"),
                         Error);
    wrong.remove();
    auto wrong_dtype = dense.register_full_backward_hook([](nn::Module&, nn::Tensors& grad_in, const nn::Tensors&) {
        grad_in[0] = grad_in[0].to(kFloat32);
    });
    CHECK_THROWS_WITH_AS(dense(x).sum().backward(), doctest::Contains("dtype float32 for input 0"), Error);
    wrong_dtype.remove();
}

TEST_CASE("hooks on recurrent layers and cells see flat lists of tensors")
{
    nn::LSTM lstm(nn::LSTMOptions(3, 4).dtype(kFloat64));
    const Tensor x = uniform({5, 2, 3}, -1, 1, kFloat64).requires_grad_();
    std::size_t inputs = 0, outputs = 0;
    nn::Tensors grads_out, grads_in;
    lstm.register_forward_hook([&](nn::Module&, const nn::Tensors& in, nn::Tensors& out) {
        inputs = in.size();
        outputs = out.size();
        CHECK_FALSE(in[1].defined());  // no lengths given
    });
    lstm.register_full_backward_hook([&](nn::Module&, nn::Tensors& gi, const nn::Tensors& go) {
        grads_in = gi;
        grads_out = go;
    });
    const nn::RecurrentOutput r = lstm(x);
    CHECK(inputs == 2);   // input, lengths; no initial state
    CHECK(outputs == 3);  // output, h_n, c_n
    r.output.sum().backward();
    CHECK(grads_out.size() == 3);
    CHECK(grads_out[0].defined());
    CHECK_FALSE(grads_out[1].defined());  // h_n was not used
    CHECK(close_tensors(grads_in.at(0), x.grad(), 1e-12));

    nn::GRUCell cell(3, 4, true, kFloat64);
    int fired = 0;
    cell.register_forward_pre_hook([&](nn::Module&, nn::Tensors& in) {
        ++fired;
        CHECK(in.size() == 2);  // x, h
    });
    cell(x.select(0, 0), cell.initial_state(2, kFloat64));
    CHECK(fired == 1);
}

TEST_CASE("any hook on a recurrent layer keeps all_states")
{
    manual_seed(2);
    const Tensor x = randn({4, 2, 3}, kFloat64);
    nn::LSTM lstm(nn::RecurrentOptions(3, 5).all_states(true).dtype(kFloat64));
    nn::Recurrent<nn::GRUCell> gru(nn::RecurrentOptions(3, 5).all_states(true).dtype(kFloat64));
    const auto plain_lstm = lstm(x);
    const auto plain_gru = gru(x);
    lstm.register_forward_hook([](nn::Module&, const nn::Tensors&, nn::Tensors&) {});
    gru.register_forward_pre_hook([](nn::Module&, nn::Tensors&) {});
    const auto hooked_lstm = lstm(x);
    const auto hooked_gru = gru(x);
    REQUIRE(hooked_lstm.all_states.size() == 2);
    CHECK(testing::close_tensors(hooked_lstm.all_h(), plain_lstm.all_h(), 0));
    CHECK(testing::close_tensors(hooked_lstm.all_c(), plain_lstm.all_c(), 0));
    CHECK(testing::close_tensors(hooked_gru.all_h(), plain_gru.all_h(), 0));
}

TEST_CASE("a hook that leaves an undefined tensor is named where it runs")
{
    nn::Dense dense(3, 2);
    const Tensor x = randn({1, 3});
    {
        nn::RemovableHandle h = dense.register_forward_pre_hook([](nn::Module&, nn::Tensors& in) { in[0] = Tensor(); });
        check_error([&] { dense(x); }, {"Dense", "forward pre-hook left input 0 an undefined tensor"});
        h.remove();
    }
    {
        nn::RemovableHandle h =
            dense.register_forward_hook([](nn::Module&, const nn::Tensors&, nn::Tensors& out) { out[0] = Tensor(); });
        check_error([&] { dense(x); }, {"Dense", "forward hook left output 0 an undefined tensor"});
        h.remove();
    }
    // An input that was not given (a recurrent layer's lengths) may stay undefined.
    nn::GRU gru(nn::RecurrentOptions(3, 2));
    gru.register_forward_pre_hook([](nn::Module&, nn::Tensors&) {});
    CHECK(gru(randn({2, 1, 3})).output.sizes() == Shape{2, 1, 2});
}

TEST_CASE("anomaly mode names a leaf's gradient hook that makes a NaN, not an op inside it")
{
    const Tensor w = from_vector<double>({1.0, 2.0}, {2}).requires_grad_();
    w.register_hook([](const Tensor& g) { return g * std::numeric_limits<double>::quiet_NaN(); });
    const Tensor loss = (w * 3.0).sum();
    autograd::DetectAnomalyGuard anomaly;
    check_error([&] { loss.backward(); }, {"gradient hook registered on a leaf of shape [2]", "nan"});
}

TEST_CASE("a post-accumulate-grad hook runs once per backward, as soon as its leaf's gradient is final and added")
{
    const Tensor x = uniform({3}, -1, 1, kFloat64);
    const Tensor w1 = uniform({3}, -1, 1, kFloat64).requires_grad_(), w2 = uniform({3}, -1, 1, kFloat64).requires_grad_();
    const Tensor unused = uniform({3}, -1, 1, kFloat64).requires_grad_();
    // w1 is read at the start and again in the middle; w2 only at the end, so its gradient is
    // final while w1's readers have yet to run.
    const auto loss = [&] { return (tanh(tanh(x * w1) * w1) * w2).sum(); };
    const std::vector<Tensor> expected = grad({loss()}, {w1, w2});
    std::vector<std::string> calls;
    double backwards = 1;  // how many backward()s have added into .grad()
    Tensor w1_grad_when_w2_final;
    w2.register_post_accumulate_grad_hook([&](const Tensor& p) {
        calls.push_back("w2");
        CHECK(p.is_same(w2));
        CHECK(close_tensors(p.grad(), backwards * expected[1], 1e-12));  // already added
        w1_grad_when_w2_final = w1.grad();
    });
    w1.register_post_accumulate_grad_hook([&](const Tensor& p) {
        calls.push_back("w1");
        CHECK(!grad_enabled());
        CHECK(close_tensors(p.grad(), backwards * 2.0 * expected[0], 1e-12));  // the leaf hook below doubled it
    });
    w1.register_hook([](const Tensor& g) { return g * 2.0; });
    unused.register_post_accumulate_grad_hook([&](const Tensor&) { calls.push_back("unused"); });
    loss().backward();
    CHECK(calls == std::vector<std::string>{"w2", "w1"});
    CHECK(!w1_grad_when_w2_final.defined());  // w2's hook ran before w1's gradient was whole
    CHECK(close_tensors(w1.grad(), 2.0 * expected[0], 1e-12));

    // A second backward adds to .grad() and runs each hook once more; grad() runs none.
    backwards = 2;
    loss().backward();
    CHECK(calls == std::vector<std::string>{"w2", "w1", "w2", "w1"});
    CHECK(close_tensors(w2.grad(), 2.0 * expected[1], 1e-12));
    (void)grad({loss()}, {w1, w2});
    CHECK(calls.size() == 4);

    check_error([&] { (x * w1).register_post_accumulate_grad_hook([](const Tensor&) {}); },
                {"register_post_accumulate_grad_hook", "expects a leaf"});
    check_error([&] { x.register_post_accumulate_grad_hook([](const Tensor&) {}); },
                {"register_post_accumulate_grad_hook", "does not require grad"});
}
