// Recurrent cells, the RNN/LSTM/GRU layers, Recurrent<Cell> for any cell, lengths, TBPTT.
#include "helpers.hpp"

#include "../examples/minimal_gated_unit.hpp"  // the cell users see in the examples

using namespace loom;
using testing::check_error;
using testing::close;
using testing::close_tensors;
using testing::values;

namespace {

const nn::CellKind kinds[] = {nn::CellKind::RNN, nn::CellKind::LSTM, nn::CellKind::GRU};

void check_ok(const GradcheckResult& r, const std::string& what)
{
    const std::string message = what + ": " + r.report();
    CHECK_MESSAGE(r.ok, message);
}

// The same layer run cell by cell, with the layer's weights copied into the cells.
template <class CellT>
nn::RecurrentOutput run_cells(const nn::RecurrentLayer& layer, const Tensor& x, const nn::State& h0, const Tensor& lengths)
{
    nn::Recurrent<CellT> runner(layer.options, [&](std::int64_t i, std::int64_t h) {
        if constexpr (std::is_same_v<CellT, nn::RNNCell>)
            return std::make_shared<CellT>(i, h, layer.options.bias(), layer.options.nonlinearity(), kFloat64);
        else
            return std::make_shared<CellT>(i, h, layer.options.bias(), kFloat64);
    });
    for (std::int64_t l = 0; l < layer.options.num_layers(); ++l)
        for (std::int64_t d = 0; d < (layer.options.bidirectional() ? 2 : 1); ++d) {
            NoGradGuard no_grad;
            auto& cell = runner.cell(l, d);
            const nn::LayerWeights& w = layer.weights(l, d);
            cell.weight_ih.copy_(w.w_ih);
            cell.weight_hh.copy_(w.w_hh);
            if (w.b_ih.defined()) {
                cell.bias_ih.copy_(w.b_ih);
                cell.bias_hh.copy_(w.b_hh);
            }
        }
    return runner(x, h0, lengths);
}

nn::RecurrentOutput run_cells_of(const nn::RecurrentLayer& layer, const Tensor& x, const nn::State& h0, const Tensor& lengths)
{
    switch (layer.kind) {
    case nn::CellKind::LSTM: return run_cells<nn::LSTMCell>(layer, x, h0, lengths);
    case nn::CellKind::GRU: return run_cells<nn::GRUCell>(layer, x, h0, lengths);
    default: return run_cells<nn::RNNCell>(layer, x, h0, lengths);
    }
}

}  // namespace

TEST_CASE("cells gradcheck through inputs, state and parameters")
{
    Generator gen(1);
    const Tensor x = randn({3, 4}, kFloat64, &gen), h = randn({3, 5}, kFloat64, &gen), c = randn({3, 5}, kFloat64, &gen);
    nn::RNNCell rnn(4, 5, true, nn::Nonlinearity::Tanh, kFloat64);
    nn::RNNCell rnn_relu(4, 5, true, nn::Nonlinearity::ReLU, kFloat64);
    nn::LSTMCell lstm(4, 5, true, kFloat64);
    nn::GRUCell gru(4, 5, true, kFloat64);
    nn::GRUCell gru_no_bias(4, 5, false, kFloat64);
    check_ok(gradcheck_parameters([&] { return rnn(x, {h})[0]; }, rnn.parameters()), "RNNCell");
    check_ok(gradcheck_parameters([&] { return rnn_relu(x, {h})[0]; }, rnn_relu.parameters()), "RNNCell relu");
    check_ok(gradcheck_parameters([&] { return stack(lstm(x, {h, c}), 0); }, lstm.parameters()), "LSTMCell");
    check_ok(gradcheck_parameters([&] { return gru(x, {h})[0]; }, gru.parameters()), "GRUCell");
    check_ok(gradcheck_parameters([&] { return gru_no_bias(x, {h})[0]; }, gru_no_bias.parameters()), "GRUCell no bias");
    check_ok(gradcheck([&](const std::vector<Tensor>& v) { return stack(lstm(v[0], {v[1], v[2]}), 0); },
                       {x.clone().requires_grad_(), h.clone().requires_grad_(), c.clone().requires_grad_()}),
             "LSTMCell inputs");
    CHECK(gru.named_parameters()[0].first == "weight_ih");
    CHECK(lstm.weight_ih.sizes() == Shape{20, 4});
    CHECK(gru.weight_hh.sizes() == Shape{15, 5});
}

TEST_CASE("the GRU applies its reset gate after the hidden matmul, as PyTorch does")
{
    nn::GRUCell gru(1, 1, true, kFloat64);
    {
        NoGradGuard no_grad;
        gru.weight_ih.copy_(tensor({0.1, 0.2, 0.3}, {3, 1}, kFloat64));
        gru.weight_hh.copy_(tensor({0.4, 0.5, 0.6}, {3, 1}, kFloat64));
        gru.bias_ih.copy_(tensor({0.01, 0.02, 0.03}, kFloat64));
        gru.bias_hh.copy_(tensor({0.04, 0.05, 0.06}, kFloat64));
    }
    const double x = 0.7, h = -0.3;
    const auto s = [](double v) { return 1 / (1 + std::exp(-v)); };
    const double r = s(0.1 * x + 0.01 + 0.4 * h + 0.04), z = s(0.2 * x + 0.02 + 0.5 * h + 0.05);
    const double n = std::tanh(0.3 * x + 0.03 + r * (0.6 * h + 0.06));
    CHECK(close(gru(tensor({x}, {1, 1}, kFloat64), {tensor({h}, {1, 1}, kFloat64)})[0], {(1 - z) * n + z * h}, 1e-14));
}

TEST_CASE("layers agree with the same cells run step by step, to float64 rounding")
{
    Generator gen(2);
    const std::int64_t T = 5, B = 3, I = 4, H = 3;
    const Tensor x = randn({T, B, I}, kFloat64, &gen);
    const Tensor lengths = from_vector<std::int64_t>({5, 2, 4}, {3});
    for (auto kind : kinds)
        for (bool bidirectional : {false, true})
            for (bool with_lengths : {false, true}) {
                nn::RecurrentLayer layer(kind, nn::RecurrentOptions(I, H).num_layers(2).bidirectional(bidirectional).dtype(kFloat64));
                const std::int64_t D = bidirectional ? 2 : 1;
                nn::State h0 = {randn({2 * D, B, H}, kFloat64, &gen)};
                if (kind == nn::CellKind::LSTM) h0.push_back(randn({2 * D, B, H}, kFloat64, &gen));
                const Tensor lens = with_lengths ? lengths : Tensor();
                const auto a = layer(x, h0, lens), b = run_cells_of(layer, x, h0, lens);
                const std::string what = fmt::format("{} bidirectional={} lengths={}", nn::cell_kind_name(kind), bidirectional, with_lengths);
                CHECK_MESSAGE((a.output.sizes() == Shape{T, B, D * H}), what);
                CHECK_MESSAGE(close_tensors(a.output, b.output, 1e-12), what);
                for (std::size_t k = 0; k < a.state.size(); ++k) {
                    CHECK_MESSAGE((a.state[k].sizes() == Shape{2 * D, B, H}), what);
                    CHECK_MESSAGE(close_tensors(a.state[k], b.state[k], 1e-12), what);
                }
            }
}

TEST_CASE("fused layers agree with the composed path: values and every gradient")
{
    Generator gen(8);
    const std::int64_t T = 6, B = 3, I = 2, H = 3;
    const Tensor lengths = from_vector<std::int64_t>({6, 2, 5}, {3});
    for (auto kind : kinds)
        for (bool bidirectional : {false, true})
            for (bool with_lengths : {false, true}) {
                const auto options = nn::RecurrentOptions(I, H).num_layers(2).bidirectional(bidirectional).dtype(kFloat64);
                nn::RecurrentLayer fused(kind, options), composed(kind, nn::RecurrentOptions(options).fused(false));
                composed.load_state_dict(fused.state_dict());
                const std::int64_t D = bidirectional ? 2 : 1;
                const Tensor x = randn({T, B, I}, kFloat64, &gen);
                nn::State h0 = {randn({2 * D, B, H}, kFloat64, &gen)};
                if (kind == nn::CellKind::LSTM) h0.push_back(randn({2 * D, B, H}, kFloat64, &gen));
                const Tensor g = randn({T, B, D * H}, kFloat64, &gen), gh = randn({2 * D, B, H}, kFloat64, &gen);
                const std::string what = fmt::format("{} bidirectional={} lengths={}", nn::cell_kind_name(kind), bidirectional, with_lengths);
                std::vector<std::vector<Tensor>> grads;
                std::vector<nn::RecurrentOutput> outs;
                for (nn::RecurrentLayer* layer : {&fused, &composed}) {
                    const Tensor xi = x.clone().requires_grad_();
                    nn::State s;
                    for (auto& t : h0) s.push_back(t.clone().requires_grad_());
                    const auto out = (*layer)(xi, s, with_lengths ? lengths : Tensor());
                    Tensor loss = (out.output * g).sum() + (out.h_n() * gh).sum();
                    if (kind == nn::CellKind::LSTM) loss = loss + (out.c_n() * gh).sum();
                    std::vector<Tensor> wrt = {xi};
                    for (auto& t : s) wrt.push_back(t);
                    for (auto& p : layer->parameters()) wrt.push_back(p);
                    grads.push_back(grad({loss}, wrt));
                    outs.push_back(out);
                }
                CHECK_MESSAGE(close_tensors(outs[0].output, outs[1].output, 1e-12), what);
                for (std::size_t k = 0; k < outs[0].state.size(); ++k)
                    CHECK_MESSAGE(close_tensors(outs[0].state[k], outs[1].state[k], 1e-12), what);
                for (std::size_t k = 0; k < grads[0].size(); ++k)
                    CHECK_MESSAGE(close_tensors(grads[0][k], grads[1][k], 1e-12), what << " gradient " << k);
            }
}

TEST_CASE("a fused layer records one tape entry per layer and direction, whatever T")
{
    nn::LSTM lstm(nn::LSTMOptions(2, 3).num_layers(2).bidirectional(true));
    const auto entries_for = [&](std::int64_t T) {
        const Tensor x = randn({T, 2, 2});
        const std::size_t before = autograd::tape_size();
        const auto out = lstm(x);
        return autograd::tape_size() - before;
    };
    const std::size_t short_run = entries_for(3), long_run = entries_for(60);
    CHECK(short_run == long_run);
    CHECK(short_run < 20);  // 4 fused entries plus the concat and the stacking of final states
    nn::LSTM composed(nn::LSTMOptions(2, 3).num_layers(2).bidirectional(true).fused(false));
    const std::size_t before = autograd::tape_size();
    const auto out = composed(randn({60, 2, 2}));
    CHECK(autograd::tape_size() - before > 1000);
}

TEST_CASE("the fused LSTM hands over dL/dh_t and dL/dc_t of every step and layer, as the cell-by-cell path has them")
{
    Generator gen(9);
    const std::int64_t T = 5, B = 2, I = 3, H = 4;
    nn::LSTM lstm(nn::LSTMOptions(I, H).num_layers(2).dtype(kFloat64));
    std::vector<nn::State> seen(2);
    lstm.state_gradient_hook = [&](std::int64_t layer, std::int64_t direction, const nn::State& g) {
        CHECK(direction == 0);
        seen.at(layer) = g;
    };
    const Tensor x = randn({T, B, I}, kFloat64, &gen), g = randn({T, B, H}, kFloat64, &gen);
    const auto out = lstm(x);
    (out.output * g).sum().backward();
    for (const auto& grads : seen) {
        REQUIRE(grads.size() == 2);
        CHECK(grads[0].sizes() == Shape{T, B, H});
        CHECK(grads[1].sizes() == Shape{T, B, H});
    }

    // The same gradients by hand: two cells unrolled step by step, each h_t and c_t retaining its gradient.
    std::vector<std::shared_ptr<nn::LSTMCell>> cells;
    for (std::int64_t l = 0; l < 2; ++l) {
        const auto& w = lstm.weights(l, 0);
        cells.push_back(std::make_shared<nn::LSTMCell>(l == 0 ? I : H, H, true, kFloat64));
        cells[l]->load_state_dict({{"weight_ih", w.w_ih}, {"weight_hh", w.w_hh}, {"bias_ih", w.b_ih}, {"bias_hh", w.b_hh}});
    }
    std::vector<std::vector<Tensor>> hs(2), cs(2);
    std::vector<nn::State> s = {cells[0]->initial_state(B, kFloat64), cells[1]->initial_state(B, kFloat64)};
    for (std::int64_t t = 0; t < T; ++t) {
        Tensor input = x.select(0, t);
        for (std::size_t l = 0; l < 2; ++l) {
            s[l] = (*cells[l])(input, s[l]);
            s[l][0].retain_grad();
            s[l][1].retain_grad();
            hs[l].push_back(s[l][0]);
            cs[l].push_back(s[l][1]);
            input = s[l][0];
        }
    }
    (stack(hs[1], 0) * g).sum().backward();
    for (std::size_t l = 0; l < 2; ++l)
        for (std::int64_t t = 0; t < T; ++t) {
            CHECK(close_tensors(seen[l][0].select(0, t), hs[l][t].grad(), 1e-12));
            CHECK(close_tensors(seen[l][1].select(0, t), cs[l][t].grad(), 1e-12));
        }
    // One line for the curve: the norm of dL/dh_t at every step.
    const Tensor curve = nn::step_norms(seen[0][0]);
    CHECK(curve.sizes() == Shape{T});
    for (std::int64_t t = 0; t < T; ++t) CHECK(std::abs(curve.select(0, t).item<double>() - hs[0][t].grad().norm().item<double>()) < 1e-12);

    nn::GRU gru(nn::GRUOptions(I, H).dtype(kFloat64));
    std::size_t gru_grads = 0;
    gru.state_gradient_hook = [&](std::int64_t, std::int64_t, const nn::State& grads) { gru_grads = grads.size(); };
    gru(x).output.sum().backward();
    CHECK(gru_grads == 1);  // h alone

    nn::LSTM composed(nn::LSTMOptions(I, H).fused(false));
    composed.state_gradient_hook = [](std::int64_t, std::int64_t, const nn::State&) {};
    check_error([&] { (void)composed(randn({T, B, I})); }, {"LSTM", "state_gradient_hook", "fused"});
    CHECK(nn::step_norms(randn({T, B, H})).sizes() == Shape{T});
    check_error([&] { (void)nn::step_norms(Tensor()); }, {"step_norms", "undefined"});
}

TEST_CASE("all_states: every step's h and c of every layer and direction, fused as cell by cell")
{
    Generator gen(10);
    const std::int64_t T = 6, B = 3, I = 2, H = 4;
    const Tensor x = randn({T, B, I}, kFloat64, &gen);
    const Tensor lengths = from_vector<std::int64_t>({6, 3, 5}, {3});
    for (const auto kind : {nn::CellKind::LSTM, nn::CellKind::GRU, nn::CellKind::RNN}) {
        const auto options = nn::RecurrentOptions(I, H).num_layers(2).bidirectional(true).dtype(kFloat64).all_states(true);
        nn::RecurrentLayer fused(kind, options);
        nn::RecurrentLayer composed(kind, nn::RecurrentOptions(options).fused(false));
        composed.load_state_dict(fused.state_dict());
        const auto a = fused(x, {}, lengths), b = composed(x, {}, lengths);
        CAPTURE(nn::cell_kind_name(kind));
        REQUIRE(a.all_states.size() == b.all_states.size());
        CHECK(a.all_h().sizes() == Shape{4, T, B, H});
        for (std::size_t k = 0; k < a.all_states.size(); ++k) CHECK(close_tensors(a.all_states[k], b.all_states[k], 1e-12));
        CHECK_FALSE(a.all_h().requires_grad());
        // The last step of each sequence is its final state (forward direction, last layer: index 2).
        for (std::int64_t bi = 0; bi < B; ++bi) {
            const std::int64_t last = lengths.data_ptr<std::int64_t>()[bi] - 1;
            CHECK(close_tensors(a.all_h().select(0, 2).select(0, last).select(0, bi), a.h_n().select(0, 2).select(0, bi), 1e-12));
        }
        if (kind == nn::CellKind::LSTM) {
            CHECK(a.all_c().sizes() == Shape{4, T, B, H});
        } else {
            check_error([&] { (void)a.all_c(); }, {"all_c", "only an LSTM has a cell state"});
        }
    }
    nn::LSTM plain(nn::LSTMOptions(I, H).dtype(kFloat64));
    const auto r = plain(x);
    CHECK(r.all_states.empty());
    check_error([&] { (void)r.all_h(); }, {"all_h", "all_states(true)"});
}

TEST_CASE("layers gradcheck, stacked, bidirectional and with lengths")
{
    Generator gen(3);
    const Tensor x = randn({4, 2, 2}, kFloat64, &gen);
    const Tensor lengths = from_vector<std::int64_t>({2, 4}, {2});
    for (auto kind : kinds)
        for (bool fused : {true, false}) {
            const auto options = nn::RecurrentOptions(2, 2).num_layers(2).bidirectional(true).dtype(kFloat64).fused(fused);
            nn::RecurrentLayer layer(kind, options);
            const auto fn = [&] {
                const auto out = layer(x, {}, lengths);
                std::vector<Tensor> parts = {out.output.reshape({-1})};
                for (auto& s : out.state) parts.push_back(s.reshape({-1}));
                return concat(parts, 0);
            };
            const std::string what = std::string(nn::cell_kind_name(kind)) + (fused ? " fused" : " composed");
            check_ok(gradcheck_parameters(fn, layer.parameters()), what);
            check_ok(gradcheck([&](const std::vector<Tensor>& v) { return layer(v[0], {}, lengths).output; },
                               {x.clone().requires_grad_()}),
                     what + " input");
            std::vector<Tensor> h0 = {randn({4, 2, 2}, kFloat64, &gen).requires_grad_()};
            if (kind == nn::CellKind::LSTM) h0.push_back(randn({4, 2, 2}, kFloat64, &gen).requires_grad_());
            check_ok(gradcheck([&](const std::vector<Tensor>& v) { return layer(x, v, lengths).h_n(); }, h0),
                     what + " initial state");
        }
    nn::RNN relu_rnn(nn::RNNOptions(2, 3).nonlinearity(nn::Nonlinearity::ReLU).dtype(kFloat64));
    check_ok(gradcheck_parameters([&] { return relu_rnn(x).output; }, relu_rnn.parameters()), "RNN relu");
}

TEST_CASE("with lengths, each sequence gives what it gives alone")
{
    Generator gen(4);
    const std::int64_t T = 6, B = 3, I = 2, H = 3;
    const Tensor x = randn({T, B, I}, kFloat64, &gen);
    const std::vector<std::int64_t> lens = {3, 6, 1};  // any order
    for (auto kind : kinds) {
        nn::RecurrentLayer layer(kind, nn::RecurrentOptions(I, H).bidirectional(true).dtype(kFloat64));
        const auto batch = layer(x, {}, from_vector<std::int64_t>(lens, {B}));
        for (std::int64_t b = 0; b < B; ++b) {
            const Tensor alone_in = x.narrow(0, 0, lens[b]).narrow(1, b, 1);
            const auto alone = layer(alone_in);
            const Tensor got = batch.output.narrow(1, b, 1);
            CHECK(close_tensors(got.narrow(0, 0, lens[b]), alone.output, 1e-12));
            if (lens[b] < T) CHECK(close(got.narrow(0, lens[b], T - lens[b]).abs().sum(), {0}));
            for (std::size_t k = 0; k < batch.state.size(); ++k)
                CHECK(close_tensors(batch.state[k].narrow(1, b, 1), alone.state[k], 1e-12));
        }
    }
}

TEST_CASE("batch_first transposes input and output only")
{
    Generator gen(5);
    nn::GRU tm(nn::GRUOptions(2, 3).dtype(kFloat64));
    nn::GRU bf(nn::GRUOptions(2, 3).batch_first(true).dtype(kFloat64));
    bf.load_state_dict(tm.state_dict());
    const Tensor x = randn({4, 2, 2}, kFloat64, &gen);
    const auto a = tm(x), b = bf(x.transpose(0, 1));
    CHECK((b.output.sizes() == Shape{2, 4, 3}));
    CHECK(close_tensors(a.output, b.output.transpose(0, 1), 1e-14));
    CHECK(close_tensors(a.h_n(), b.h_n(), 1e-14));
}

TEST_CASE("dropout between layers acts in training only")
{
    nn::LSTM lstm(nn::LSTMOptions(2, 4).num_layers(2).dropout(0.5).dtype(kFloat64));
    const Tensor x = randn({3, 2, 2}, kFloat64);
    manual_seed(1);
    const auto a = lstm(x);
    manual_seed(2);
    const auto b = lstm(x);
    CHECK(!close_tensors(a.output, b.output, 1e-6));
    lstm.eval();
    CHECK(close_tensors(lstm(x).output, lstm(x).output, 0));
}

TEST_CASE("a custom cell gets stacking, bidirectionality and lengths from Recurrent")
{
    Generator gen(6);
    nn::Recurrent<MinimalGatedUnit> rnn(nn::RecurrentOptions(2, 3).num_layers(2).bidirectional(true).dtype(kFloat64));
    CHECK(rnn.named_parameters()[0].first == "cell_l0.gate.weight");
    CHECK(rnn.named_parameters().back().first == "cell_l1_reverse.candidate.bias");
    const Tensor x = randn({4, 2, 2}, kFloat64, &gen);
    const Tensor lengths = from_vector<std::int64_t>({4, 2}, {2});
    const auto out = rnn(x, {}, lengths);
    CHECK(out.output.sizes() == Shape{4, 2, 6});
    CHECK(out.h_n().sizes() == Shape{4, 2, 3});
    CHECK(close(out.output.narrow(0, 2, 2).narrow(1, 1, 1).abs().sum(), {0}));
    check_ok(gradcheck_parameters([&] { return rnn(x, {}, lengths).output; }, rnn.parameters()), "custom cell");
}

TEST_CASE("truncated BPTT: the carried state is detached between batches")
{
    Generator gen(7);
    nn::LSTM lstm(nn::LSTMOptions(2, 3).dtype(kFloat64));
    nn::State state;
    for (int batch = 0; batch < 3; ++batch) {
        const Tensor x = randn({5, 2, 2}, kFloat64, &gen);
        const auto out = lstm(x, state);
        lstm.zero_grad();
        out.output.sum().backward();
        // The gradient is this batch's alone: the same as starting from the carried state as a constant.
        nn::LSTM copy(nn::LSTMOptions(2, 3).dtype(kFloat64));
        copy.load_state_dict(lstm.state_dict());
        copy(x, state).output.sum().backward();
        CHECK(close_tensors(lstm.weights(0, 0).w_hh.grad(), copy.weights(0, 0).w_hh.grad(), 1e-12));
        state = {out.state[0].detach(), out.state[1].detach()};
        CHECK(!state[0].requires_grad());
    }
}

TEST_CASE("recurrent misuse gives clear errors")
{
    nn::LSTM lstm(nn::LSTMOptions(4, 3).num_layers(2));
    check_error([&] { (void)lstm(ones({5, 4})); }, {"LSTM", "[T, B, I]", "[5, 4]"});
    check_error([&] { (void)lstm(ones({5, 2, 3})); }, {"LSTM", "I = 4", "[5, 2, 3]", "dim 2 is 3"});
    check_error([&] { (void)lstm(ones({5, 2, 4}), {zeros({2, 2, 3})}); }, {"LSTM", "2 initial state", "h0, c0"});
    check_error([&] { (void)lstm(ones({5, 2, 4}), {zeros({1, 2, 3}), zeros({2, 2, 3})}); },
                {"LSTM", "[1, 2, 3]", "[L*D, B, H] = [2, 2, 3]"});
    check_error([&] { (void)lstm(ones({5, 2, 4}), {}, from_vector<std::int64_t>({6, 1}, {2})); },
                {"LSTM", "length 6", "[1, T] = [1, 5]"});
    check_error([&] { (void)lstm(ones({5, 2, 4}), {}, from_vector<std::int64_t>({0, 1}, {2})); },
                {"LSTM", "length 0"});
    check_error([&] { (void)lstm(ones({5, 2, 4}), {}, from_vector<std::int64_t>({1, 1, 1}, {3})); },
                {"LSTM", "lengths", "[2]", "[3]"});
    check_error([&] { (void)lstm(ones({5, 2, 4}, kFloat64)); }, {"LSTM", "float64", "float32"});
    check_error([] { nn::GRU(nn::GRUOptions(2, 3).nonlinearity(nn::Nonlinearity::ReLU)); }, {"GRU", "nonlinearity"});
    check_error([] { nn::RNN(nn::RNNOptions(2, 3).num_layers(0)); }, {"RNN", "num_layers"});
    check_error([] { nn::LSTM(nn::LSTMOptions(2, 3).dropout(1)); }, {"LSTM", "dropout"});
    nn::LSTMCell cell(4, 3);
    check_error([&] { (void)cell(ones({2, 4}), {zeros({2, 3})}); }, {"LSTMCell", "2 tensor(s)", "got 1"});
    check_error([&] { (void)cell(ones({2, 4}), {zeros({2, 3}), zeros({3, 3})}); }, {"LSTMCell", "[3, 3]", "[2, 3]"});
    nn::LSTM batch_first(nn::LSTMOptions(4, 3).batch_first(true));
    check_error([&] { (void)batch_first(ones({2, 4})); }, {"LSTM", "[B, T, I]"});
}
