// checkpoint(): a fused layer that keeps only every k-th step's state and recomputes the rest in
// backward computes the same outputs and gradients as one that keeps every step.
#include <doctest/doctest.h>

#include <loom/loom.hpp>

#include "helpers.hpp"

using namespace loom;
using namespace testing;
using nn::State;

namespace {

struct Run {
    Tensor output, input_grad;
    State state;
    NamedTensorMap grads;
    std::vector<Tensor> grad_h;  // dL/dh_t (and dL/dc_t) per layer and direction, from state_gradient_hook
};

// A loss that reads every output and the final states, with weights that differ per element.
Tensor loss_of(const nn::RecurrentOutput& out)
{
    Tensor loss = (out.output * out.output).sum() + out.state[0].sum() * 0.5;
    return out.state.size() > 1 ? loss + out.state[1].pow(2).sum() * 0.25 : loss;
}

Run run(nn::CellKind kind, nn::RecurrentOptions options, const NamedTensorMap& weights, const Tensor& x,
        const Tensor& lengths)
{
    nn::RecurrentLayer layer(kind, options);
    layer.load_state_dict(weights);
    Run r;
    if (options.fused())  // the hook is the fused layer's
        layer.state_gradient_hook = [&](std::int64_t, std::int64_t, const State& g) {
            r.grad_h.insert(r.grad_h.end(), g.begin(), g.end());
        };
    const Tensor input = x.detach().requires_grad_();
    const auto out = layer(input, {}, lengths);
    loss_of(out).backward();
    r.output = out.output;
    r.state = out.state;
    r.input_grad = input.grad();
    for (const auto& [name, p] : layer.named_parameters()) r.grads[name] = p.grad();
    return r;
}

}  // namespace

TEST_CASE("checkpointed fused layers equal the unchecked ones to 1e-12 in float64, for every kind and k")
{
    const std::int64_t T = 23, B = 3, I = 4, H = 5;
    manual_seed(3);
    const Tensor x = randn({T, B, I}, kFloat64);
    const Tensor lengths = tensor({23, 17, 9}, kInt64);
    for (auto kind : {nn::CellKind::RNN, nn::CellKind::LSTM, nn::CellKind::GRU}) {
        const auto options = nn::RecurrentOptions(I, H).num_layers(2).bidirectional(true).dtype(kFloat64);
        const NamedTensorMap weights = nn::RecurrentLayer(kind, options).state_dict();
        const Run full = run(kind, options, weights, x, lengths);
        for (std::int64_t every : {0, 1, 4, 5, 22, 23, 40}) {  // 0: ceil(sqrt(23)) = 5
            CAPTURE(nn::cell_kind_name(kind));
            CAPTURE(every);
            const Run ck = run(kind, nn::RecurrentOptions(options).checkpoint(true).checkpoint_every(every), weights, x,
                               lengths);
            CHECK(close_tensors(ck.output, full.output, 1e-12));
            for (std::size_t k = 0; k < full.state.size(); ++k) CHECK(close_tensors(ck.state[k], full.state[k], 1e-12));
            CHECK(close_tensors(ck.input_grad, full.input_grad, 1e-12));
            for (const auto& [name, g] : full.grads) CHECK(close_tensors(ck.grads.at(name), g, 1e-12));
            REQUIRE(ck.grad_h.size() == full.grad_h.size());
            for (std::size_t k = 0; k < full.grad_h.size(); ++k) CHECK(close_tensors(ck.grad_h[k], full.grad_h[k], 1e-12));
        }
    }
}

TEST_CASE("gradcheck passes through a checkpointed LSTM")
{
    manual_seed(5);
    nn::RecurrentLayer lstm(nn::CellKind::LSTM,
                            nn::RecurrentOptions(3, 4).dtype(kFloat64).checkpoint(true).checkpoint_every(2));
    const Tensor x = randn({7, 2, 3}, kFloat64).requires_grad_();
    const auto result = gradcheck([&](const std::vector<Tensor>& in) { return lstm(in[0]).output; }, {x});
    CHECK_MESSAGE(result.ok, result.report());
    const auto params = gradcheck_parameters([&] { return lstm(x.detach()).output.pow(2).sum(); }, lstm.parameters());
    CHECK_MESSAGE(params.ok, params.report());
}

TEST_CASE("under NoGradGuard a checkpointed layer computes what any layer computes")
{
    manual_seed(6);
    const auto options = nn::RecurrentOptions(3, 4).dtype(kFloat64);
    nn::RecurrentLayer plain(nn::CellKind::GRU, options), ck(nn::CellKind::GRU, nn::RecurrentOptions(options).checkpoint(true));
    ck.load_state_dict(plain.state_dict());
    const Tensor x = randn({9, 2, 3}, kFloat64);
    NoGradGuard no_grad;
    CHECK(close_tensors(ck(x).output, plain(x).output, 0));
}

TEST_CASE("a bias changed in place between forward and backward is an error, not a wrong recomputation")
{
    nn::RecurrentLayer lstm(nn::CellKind::LSTM, nn::RecurrentOptions(2, 3).checkpoint(true).checkpoint_every(2));
    const Tensor loss = lstm(randn({6, 1, 2})).output.sum();
    {
        NoGradGuard no_grad;
        Tensor bias = lstm.weights(0, 0).b_ih;  // a handle on the same storage
        bias.add_(ones({12}));
    }
    check_error([&] { loss.backward(); }, {"LSTM", "modified in place"});
}

TEST_CASE("checkpoint where it cannot work is an error that says so")
{
    check_error([] { nn::RecurrentLayer(nn::CellKind::LSTM, nn::RecurrentOptions(2, 3).checkpoint_every(-1)); },
                {"checkpoint_every >= 0", "-1"});
    // A step run again in backward cannot be recorded a second time.
    nn::Recurrent<nn::GRUCell> cells(nn::RecurrentOptions(2, 3).dtype(kFloat64).checkpoint(true));
    const Tensor x = randn({4, 1, 2}, kFloat64).requires_grad_();
    const Tensor y = cells(x).output.pow(2).sum();
    check_error([&] { (void)grad({y}, {x}, {}, false, /*create_graph=*/true); },
                {"Recurrent<GRUCell>", "create_graph", "without checkpoint(true)"});
    // A step that reads a tensor computed outside it, which requires grad: its gradient would be
    // lost when the steps run again, so backward says so.
    const Tensor scale = randn({3}, kFloat64).requires_grad_();
    const Tensor outside = tanh(scale);
    nn::GRUCell cell(2, 3, true, kFloat64);
    const nn::StepFn reads_outside = [&](std::int64_t, std::int64_t, const Tensor& x_t, const State& s) {
        return State{cell(x_t, s)[0] * outside};
    };
    const nn::ParametersFn params = [&](std::int64_t, std::int64_t) { return cell.parameters(); };
    const auto out = nn::run_recurrent("mine", nn::RecurrentOptions(2, 3).dtype(kFloat64).checkpoint(true), 1,
                                       reads_outside, randn({4, 1, 2}, kFloat64), {}, {}, true, nullptr, params);
    check_error([&] { out.output.sum().backward(); }, {"'tanh'", "checkpointed layer", "compute that tensor inside"});
    // The initial state changed in place before backward would be recomputed from wrongly.
    nn::Recurrent<nn::GRUCell> with_h0(nn::RecurrentOptions(2, 3).dtype(kFloat64).checkpoint(true));
    Tensor h0 = zeros({1, 1, 3}, kFloat64);
    const Tensor y0 = with_h0(randn({4, 1, 2}, kFloat64), {h0}).output.sum();
    h0.fill_(1.0);
    check_error([&] { y0.backward(); }, {"checkpointed steps", "modified in place"});
    // run_recurrent's own callers must say what the step reads.
    const nn::StepFn step = [](std::int64_t, std::int64_t, const Tensor& x_t, const State&) { return State{x_t}; };
    check_error([&] { nn::run_recurrent("mine", nn::RecurrentOptions(2, 2).checkpoint(true), 1, step, randn({3, 1, 2}), {}, {}, true); },
                {"mine", "checkpoint(true) needs the parameters"});
}

TEST_CASE("a layer large enough for BLAS's per-step products agrees with the composed path, with and without checkpoints")
{
    // B x 4H x H = 2 x 400 x 100 = 80,000: above the size below which per-step products skip BLAS;
    // the other tests' small layers take that path.
    const std::int64_t T = 6, B = 2, I = 3, H = 100;
    manual_seed(8);
    const Tensor x = randn({T, B, I}, kFloat64);
    const Tensor lengths = tensor({6, 4}, kInt64);
    for (auto kind : {nn::CellKind::LSTM, nn::CellKind::GRU}) {
        CAPTURE(nn::cell_kind_name(kind));
        const auto options = nn::RecurrentOptions(I, H).dtype(kFloat64);
        const NamedTensorMap weights = nn::RecurrentLayer(kind, options).state_dict();
        const Run composed = run(kind, nn::RecurrentOptions(options).fused(false), weights, x, lengths);
        for (bool checkpoint : {false, true}) {
            CAPTURE(checkpoint);
            const Run fused = run(kind, nn::RecurrentOptions(options).checkpoint(checkpoint).checkpoint_every(checkpoint ? 4 : 0),
                                  weights, x, lengths);
            CHECK(close_tensors(fused.output, composed.output, 1e-12));
            CHECK(close_tensors(fused.input_grad, composed.input_grad, 1e-12));
            for (const auto& [name, g] : composed.grads) CHECK(close_tensors(fused.grads.at(name), g, 1e-12));
        }
    }
}

namespace {

// A cell of one's own that draws from the default generator inside its step (dropout on the
// candidate), uses a frozen parameter, and returns its state unchanged for a zero input row.
class NoisyCell : public nn::Cell {
public:
    NoisyCell(std::int64_t input, std::int64_t hidden) : nn::Cell(input, hidden, 2)
    {
        gate = register_module("gate", std::make_shared<nn::Dense>(input + hidden, hidden, true, kFloat64));
        frozen = register_parameter("frozen", randn({hidden}, kFloat64) * 0.1, /*requires_grad=*/false);
    }
    State forward(const Tensor& x, const State& state) override
    {
        const Tensor f = sigmoid((*gate)(concat({x, state[0]}, 1)) + frozen);
        const Tensor candidate = nn::Dropout(0.3)(tanh(state[1] + f));
        return {f * state[0] + (1.0 - f) * candidate, state[1] * 0.9 + candidate * 0.1};
    }
    std::shared_ptr<nn::Dense> gate;
    Tensor frozen;
};

struct CellRun {
    Tensor output, input_grad, h0_grad;
    State state;
    std::vector<Tensor> grads;
};

template <class CellT>
CellRun run_cells(nn::RecurrentOptions options, const NamedTensorMap& weights, const Tensor& x, const Tensor& lengths,
                  std::size_t state_size)
{
    nn::Recurrent<CellT> rnn(options);
    rnn.load_state_dict(weights);
    const std::int64_t LD = options.num_layers() * (options.bidirectional() ? 2 : 1);
    CellRun r;
    const Tensor input = x.detach().requires_grad_();
    manual_seed(99);  // the same initial states, and the cell's dropout draws the same masks, in either run
    State h0;
    for (std::size_t k = 0; k < state_size; ++k)
        h0.push_back((randn({LD, x.size(1), options.hidden_size()}, kFloat64) * 0.5).requires_grad_());
    const auto out = rnn(input, h0, lengths);
    loss_of(out).backward();
    r.output = out.output;
    r.state = out.state;
    r.input_grad = input.grad();
    r.h0_grad = h0[0].grad();
    for (const auto& p : rnn.parameters()) r.grads.push_back(p.grad());
    return r;
}

void check_same(const CellRun& a, const CellRun& b)
{
    CHECK(close_tensors(a.output, b.output, 1e-12));
    for (std::size_t k = 0; k < a.state.size(); ++k) CHECK(close_tensors(a.state[k], b.state[k], 1e-12));
    CHECK(close_tensors(a.input_grad, b.input_grad, 1e-12));
    CHECK(close_tensors(a.h0_grad, b.h0_grad, 1e-12));
    REQUIRE(a.grads.size() == b.grads.size());
    for (std::size_t i = 0; i < a.grads.size(); ++i) {
        CHECK(a.grads[i].defined() == b.grads[i].defined());
        if (a.grads[i].defined()) CHECK(close_tensors(a.grads[i], b.grads[i], 1e-12));
    }
}

}  // namespace

TEST_CASE("Recurrent<Cell> with checkpoints equals it without, to 1e-12: layers, directions, lengths, every k")
{
    const std::int64_t T = 7, B = 3, I = 2, H = 4;
    manual_seed(5);
    const Tensor x = randn({T, B, I}, kFloat64);
    const Tensor lengths = tensor({7, 3, 5}, kInt64);
    const auto options = nn::RecurrentOptions(I, H).dtype(kFloat64).num_layers(2).bidirectional(true);
    {
        const NamedTensorMap weights = nn::Recurrent<nn::LSTMCell>(options).state_dict();
        const CellRun plain = run_cells<nn::LSTMCell>(options, weights, x, lengths, 2);
        for (std::int64_t every : {0, 1, 2, 3, 7, 20}) {
            CAPTURE(every);
            check_same(run_cells<nn::LSTMCell>(nn::RecurrentOptions(options).checkpoint(true).checkpoint_every(every),
                                               weights, x, lengths, 2),
                       plain);
        }
    }
    {  // randomness inside the cell, a frozen parameter, no lengths
        const auto train = nn::RecurrentOptions(options).num_layers(1);
        const NamedTensorMap weights = nn::Recurrent<NoisyCell>(train).state_dict();
        const CellRun plain = run_cells<NoisyCell>(train, weights, x, {}, 2);
        check_same(run_cells<NoisyCell>(nn::RecurrentOptions(train).checkpoint(true).checkpoint_every(3), weights, x, {}, 2),
                   plain);
    }
}

TEST_CASE("a composed built-in layer with checkpoints equals the fused one")
{
    const std::int64_t T = 9, B = 2, I = 3, H = 5;
    manual_seed(6);
    const Tensor x = randn({T, B, I}, kFloat64);
    const Tensor lengths = tensor({9, 6}, kInt64);
    for (auto kind : {nn::CellKind::RNN, nn::CellKind::LSTM, nn::CellKind::GRU}) {
        CAPTURE(nn::cell_kind_name(kind));
        const auto options = nn::RecurrentOptions(I, H).dtype(kFloat64).bidirectional(true);
        const NamedTensorMap weights = nn::RecurrentLayer(kind, options).state_dict();
        const Run fused = run(kind, options, weights, x, lengths);
        const Run composed = run(kind, nn::RecurrentOptions(options).fused(false).checkpoint(true), weights, x, lengths);
        CHECK(close_tensors(composed.output, fused.output, 1e-12));
        CHECK(close_tensors(composed.input_grad, fused.input_grad, 1e-12));
        for (const auto& [name, g] : fused.grads) CHECK(close_tensors(composed.grads.at(name), g, 1e-12));
    }
}

TEST_CASE("gradcheck passes through a checkpointed Recurrent<Cell>, and its forward keeps one entry per direction")
{
    manual_seed(7);
    nn::Recurrent<nn::GRUCell> rnn(nn::RecurrentOptions(2, 3).dtype(kFloat64).bidirectional(true).checkpoint(true).checkpoint_every(2));
    const Tensor x = randn({5, 2, 2}, kFloat64).requires_grad_();
    std::vector<Tensor> inputs = rnn.parameters();
    inputs.push_back(x);
    const GradcheckResult r = gradcheck_parameters([&] { return rnn(x).output; }, inputs);
    CHECK_MESSAGE(r.ok, r.report());
    // Nothing per step is on the tape: the unchecked layer records the cell's ops at each of the
    // 5 steps; the checkpointed one a fixed few entries however long the sequence.
    const auto entries_of = [&](bool checkpoint, std::int64_t T) {
        nn::Recurrent<nn::GRUCell> layer(nn::RecurrentOptions(2, 3).dtype(kFloat64).checkpoint(checkpoint));
        const Tensor input = randn({T, 2, 2}, kFloat64).requires_grad_();
        const std::size_t before = autograd::tape_size();
        const Tensor y = layer(input).output;
        return autograd::tape_size() - before;
    };
    CHECK(entries_of(true, 50) == entries_of(true, 5));
    CHECK(entries_of(false, 50) > 40 * 5);
}

namespace {

// A cell whose step depends on what a checkpointed re-run must find unchanged: its training
// flag, a buffer, and (optionally) a tensor or a submodule it never registered, or a generator of
// its own.
class TouchyCell : public nn::Cell {
public:
    TouchyCell(std::int64_t input, std::int64_t hidden) : nn::Cell(input, hidden)
    {
        weight = register_parameter("weight", randn({hidden, input + hidden}, kFloat64) * 0.3);
        scale = register_buffer("scale", full({hidden}, 0.5, kFloat64));
    }
    State forward(const Tensor& x, const State& state) override
    {
        Tensor h = tanh(linear(concat({x, state[0]}, 1), weight)) * scale;
        if (!is_training()) h = h * 2.0;
        if (outside.defined()) h = h * outside;
        if (unregistered) h = h + (*unregistered)(h);
        if (own_generator) h = h + randn(h.sizes(), kFloat64, own_generator.get()) * 0.01;
        return {h};
    }
    // Off: these checks are of the step-by-step path, which calls the cell again in backward. A
    // replayed cell runs the program it traced again, which cannot differ from forward's.
    bool replayable() const override { return replay; }
    bool replay = false;
    Tensor weight, scale;
    Tensor outside;                                // read, but not registered
    std::shared_ptr<nn::Dense> unregistered;       // called, but not registered
    std::shared_ptr<Generator> own_generator;
};

nn::RecurrentOptions touchy_options() { return nn::RecurrentOptions(2, 3).dtype(kFloat64).checkpoint(true).checkpoint_every(2); }

}  // namespace

TEST_CASE("a checkpointed Recurrent<Cell> never recomputes something other than its forward ran")
{
    manual_seed(11);
    const Tensor x = randn({5, 2, 2}, kFloat64);
    SUBCASE("switched to eval() between forward and backward")
    {
        nn::Recurrent<TouchyCell> rnn(touchy_options());
        const Tensor loss = rnn(x).output.sum();
        rnn.eval();
        check_error([&] { loss.backward(); }, {"changed since forward", "training", "eval"});
        rnn.train();
        loss.backward();  // as at forward again: the re-run is the same, so it may proceed
        CHECK(rnn.parameters()[0].grad().defined());
    }
    SUBCASE("replayed, a segment runs the traced program again, whatever the cell would do now")
    {
        const auto gradient_of = [&](bool switch_to_eval) {
            manual_seed(12);
            nn::Recurrent<TouchyCell> rnn(touchy_options());
            rnn.cell(0).replay = true;
            REQUIRE(rnn.replayable());
            const Tensor loss = rnn(x).output.sum();
            if (switch_to_eval) rnn.eval();
            loss.backward();
            return rnn.parameters()[0].grad();
        };
        CHECK(testing::values(gradient_of(true)) == testing::values(gradient_of(false)));
        // Its parameters and buffers are saved tensors: an in-place change is still an error.
        manual_seed(12);
        nn::Recurrent<TouchyCell> rnn(touchy_options());
        rnn.cell(0).replay = true;
        const Tensor loss = rnn(x).output.sum();
        {
            NoGradGuard no_grad;
            rnn.cell(0).scale.mul_(2.0);
        }
        check_error([&] { loss.backward(); }, {"modified in place"});
    }
    SUBCASE("replayed, it can be differentiated twice, as the same layer without checkpoint")
    {
        // create_graph runs the cell step by step again and differentiates that: a
        // Hessian-vector product through the checkpointed replay equals the plain layer's.
        const auto hessian_vector = [&](bool checkpoint) {
            manual_seed(13);
            nn::Recurrent<TouchyCell> rnn(touchy_options().checkpoint(checkpoint).checkpoint_every(checkpoint ? 2 : 0));
            rnn.cell(0).replay = true;
            const Tensor w = rnn.parameters()[0];
            const Tensor loss = rnn(x).output.pow(2).sum();
            const Tensor g = grad({loss}, {w}, {}, std::nullopt, /*create_graph=*/true)[0];
            return grad({(g * g).sum()}, {w})[0];
        };
        CHECK(close_tensors(hessian_vector(true), hessian_vector(false), 1e-12));
    }
    SUBCASE("a forward hook removed between forward and backward")
    {
        nn::Recurrent<TouchyCell> rnn(touchy_options());
        nn::RemovableHandle handle = rnn.cell(0).register_forward_hook(
            [](nn::Module&, const nn::Tensors&, nn::Tensors& out) { out[0] = out[0] * 3.0; });
        const Tensor loss = rnn(x).output.sum();
        handle.remove();
        check_error([&] { loss.backward(); }, {"changed since forward", "hooks"});
    }
    SUBCASE("a buffer changed in place between forward and backward")
    {
        nn::Recurrent<TouchyCell> rnn(touchy_options());
        const Tensor loss = rnn(x).output.sum();
        {
            NoGradGuard no_grad;
            rnn.cell(0).scale.mul_(2.0);
        }
        check_error([&] { loss.backward(); }, {"modified in place"});
    }
    SUBCASE("a tensor that requires grad, read but not registered")
    {
        nn::Recurrent<TouchyCell> rnn(touchy_options());
        rnn.cell(0).outside = full({3}, 1.5, kFloat64).requires_grad_();
        const Tensor loss = rnn(x).output.sum();
        check_error([&] { loss.backward(); }, {"neither its input, its state nor one of its parameters", "[3]"});
        // Without checkpoints its gradient arrives.
        nn::Recurrent<TouchyCell> plain(nn::RecurrentOptions(2, 3).dtype(kFloat64));
        plain.cell(0).outside = rnn.cell(0).outside;
        plain(x).output.sum().backward();
        CHECK(rnn.cell(0).outside.grad().defined());
    }
    SUBCASE("a submodule called but not registered")
    {
        nn::Recurrent<TouchyCell> rnn(touchy_options());
        rnn.cell(0).unregistered = std::make_shared<nn::Dense>(3, 3, true, kFloat64);
        const Tensor loss = rnn(x).output.sum();
        check_error([&] { loss.backward(); }, {"neither its input, its state nor one of its parameters"});
    }
    SUBCASE("a Generator of the cell's own")
    {
        nn::Recurrent<TouchyCell> rnn(touchy_options());
        rnn.cell(0).own_generator = std::make_shared<Generator>(3);
        check_error([&] { rnn(x); }, {"Generator of its own", "checkpoint"});
        // Under no_grad nothing is recorded and nothing will run again: allowed.
        NoGradGuard no_grad;
        CHECK(rnn(x).output.sizes() == Shape{5, 2, 3});
    }
}

TEST_CASE("checkpoint_every without checkpoint(true) is an error, not silently ignored")
{
    check_error([] { nn::LSTM(nn::RecurrentOptions(2, 3).checkpoint_every(4)); }, {"checkpoint_every(4)", "checkpoint(true)"});
    check_error([] { nn::Recurrent<nn::GRUCell>(nn::RecurrentOptions(2, 3).checkpoint_every(4)); },
                {"checkpoint_every(4)"});
}
