// scan: a replayed step gives the eager loop's values and gradients to 1e-12 in float64, for
// every op it replays, with lengths and in reverse; what it cannot replay runs eagerly and says why.
#include "helpers.hpp"
#include <thread>

using namespace loom;
using testing::check_error;
using testing::random;
using V = std::vector<Tensor>;

namespace {

Tensor leaf(Shape shape, std::uint64_t seed, double low = -1, double high = 1)
{
    return random(std::move(shape), seed, low, high).requires_grad_();
}

double max_difference(const Tensor& a, const Tensor& b)
{
    REQUIRE(a.sizes() == b.sizes());
    const auto u = testing::values(a), v = testing::values(b);
    double d = 0;
    for (std::size_t i = 0; i < u.size(); ++i) d = std::max(d, std::abs(u[i] - v[i]));
    return d;
}

// A loss that weighs every output element differently, so that each gradient element is checked.
Tensor weighted_loss(const ScanOutput& r)
{
    Tensor loss = scalar_tensor(0.0, kFloat64);
    std::uint64_t seed = 900;
    for (const Tensor& c : r.carry) loss = loss + (c * random(c.sizes(), ++seed)).sum();
    for (const Tensor& y : r.ys) loss = loss + (y * random(y.sizes(), ++seed)).sum();
    return loss;
}

// Runs the step replayed and eagerly; values and the gradients of every input agree to 1e-12.
void check_replay(const std::string& name, const ScanStep& step, const V& init, const V& xs, const V& params,
                  ScanOptions options = {})
{
    CAPTURE(name);
    options.replay = true;
    const ScanOutput replayed = scan(step, init, xs, params, options);
    CHECK_MESSAGE(replayed.eager_reason.empty(), replayed.eager_reason);
    options.replay = false;
    options.checkpoint = false, options.checkpoint_every = 0;
    const ScanOutput eager = scan(step, init, xs, params, options);
    REQUIRE(replayed.carry.size() == eager.carry.size());
    REQUIRE(replayed.ys.size() == eager.ys.size());
    for (std::size_t k = 0; k < eager.carry.size(); ++k) CHECK(max_difference(replayed.carry[k], eager.carry[k]) < 1e-12);
    for (std::size_t k = 0; k < eager.ys.size(); ++k) CHECK(max_difference(replayed.ys[k], eager.ys[k]) < 1e-12);
    V wrt;
    for (const V* list : {&init, &xs, &params})
        for (const Tensor& t : *list)
            if (t.requires_grad()) wrt.push_back(t);
    const V g_replayed = grad({weighted_loss(replayed)}, wrt, {}, std::nullopt, false, true);
    const V g_eager = grad({weighted_loss(eager)}, wrt, {}, std::nullopt, false, true);
    for (std::size_t k = 0; k < wrt.size(); ++k) {
        CAPTURE(k);
        REQUIRE(g_eager[k].defined() == g_replayed[k].defined());
        if (g_eager[k].defined()) CHECK(max_difference(g_replayed[k], g_eager[k]) < 1e-12);
    }
}

// Each replayed op in a step that mixes the carry h [3, 4], x_t [3, 4] and a parameter.
struct OpRow {
    const char* name;
    std::function<Tensor(const Tensor& h, const Tensor& x, const Tensor& p)> f;
};

}  // namespace

TEST_CASE("every replayed op gives the eager loop's values and gradients")
{
    const Tensor p = leaf({4}, 1);
    const Tensor w = leaf({4, 4}, 2, -0.5, 0.5);
    const std::vector<OpRow> rows{
        {"add", [](auto& h, auto& x, auto& q) { return h + x + q; }},
        {"sub", [](auto& h, auto& x, auto& q) { return h - x - q; }},
        {"mul", [](auto& h, auto& x, auto& q) { return h * x * q; }},
        {"div", [](auto& h, auto& x, auto& q) { return h / (x * x + 1.0) + q / (h * h + 2.0); }},
        {"scalars", [](auto& h, auto& x, auto&) { return 1.0 - h * 0.5 + x / 3.0; }},
        {"neg", [](auto& h, auto& x, auto&) { return -h + x; }},
        {"exp", [](auto& h, auto& x, auto&) { return exp(h * 0.3) - x; }},
        {"log", [](auto& h, auto& x, auto&) { return log(h * h + 1.0) + x; }},
        {"tanh", [](auto& h, auto& x, auto& q) { return tanh(h + x * q); }},
        {"sigmoid", [](auto& h, auto& x, auto&) { return sigmoid(h - x); }},
        {"relu", [](auto& h, auto& x, auto&) { return relu(h + x); }},
        {"linear", [&w](auto& h, auto& x, auto& q) { return tanh(linear(h, w, q) + x); }},
        {"linear without bias", [&w](auto& h, auto& x, auto&) { return tanh(linear(h, w) + linear(x, w)); }},
        {"matmul", [&w](auto& h, auto& x, auto&) { return tanh(matmul(h, w) + matmul(x, w.transpose(0, 1))); }},
        {"matmul of two steps' values", [](auto& h, auto& x, auto&) { return matmul(tanh(matmul(h, x.transpose(0, 1))), x) * 0.5; }},
        {"broadcast", [](auto& h, auto& x, auto& q) { return h * q.unsqueeze(0) + x.narrow(1, 0, 1); }},
        {"chunk and concat", [](auto& h, auto& x, auto&) {
             const V parts = concat({h, x}, 1).chunk(4, 1);
             return concat({parts[3] * parts[0], parts[1] + parts[2]}, 1);
         }},
        {"select, unsqueeze, expand", [](auto& h, auto& x, auto&) {
             return h * x.select(0, 1).unsqueeze(0).expand({3, 4}) + x.transpose(0, 1).reshape({3, 4});
         }},
        {"permute and view", [](auto& h, auto& x, auto&) { return (h.permute({1, 0}) * 2.0).contiguous().view({3, 4}) + x; }},
        {"squeeze", [](auto& h, auto& x, auto&) { return h.unsqueeze(1).squeeze(1) + x.clone(); }},
    };
    for (const auto& row : rows) {
        const auto step = [&](const V& c, const V& x) -> ScanStepResult {
            const Tensor h = row.f(c[0], x[0], p);
            return {{h}, {h * 2.0}};
        };
        check_replay(row.name, step, {leaf({3, 4}, 3)}, {leaf({5, 3, 4}, 4)}, {p});
    }
}

TEST_CASE("carries swapped or passed through, outputs that are inputs or parameters, two xs")
{
    const Tensor w = leaf({4, 4}, 80, -0.5, 0.5), p = leaf({4}, 81);
    const V init{leaf({3, 4}, 82), leaf({3, 4}, 83)};
    const V xs{leaf({5, 3, 4}, 84), leaf({5, 3, 4}, 85)};
    const auto step = [&](const V& c, const V& x) -> ScanStepResult {
        const Tensor wt = w.t() * 0.5;  // computed once per call: it reads no step's value
        const Tensor next = tanh(matmul(c[0], wt) + x[0] * x[1]) + c[1] * p;
        return {{c[1] + x[1], next}, {x[0], (p * 2.0).expand({3, 4}), next, c[0]}};
    };
    check_replay("swapped", step, init, xs, {w, p});
    ScanOptions o;
    o.reverse = true;
    o.lengths = from_vector<std::int64_t>({5, 1, 3}, {3});
    check_replay("swapped, reverse, lengths", step, init, xs, {w, p}, o);
    const auto passing = [&](const V& c, const V& x) -> ScanStepResult { return {{c[0], sigmoid(c[1] + x[0])}, {c[1]}}; };
    check_replay("passed through", passing, init, {xs[0]}, {});
}

namespace {

// An LSTM cell written from public ops, as a user would: carry {h, c}, input x_t.
struct UserLSTM {
    Tensor w_ih, w_hh, b_ih, b_hh;
    UserLSTM(std::int64_t I, std::int64_t H, std::uint64_t seed)
        : w_ih(leaf({4 * H, I}, seed, -0.4, 0.4)), w_hh(leaf({4 * H, H}, seed + 1, -0.4, 0.4)),
          b_ih(leaf({4 * H}, seed + 2, -0.4, 0.4)), b_hh(leaf({4 * H}, seed + 3, -0.4, 0.4))
    {
    }
    explicit UserLSTM(const V& p) : w_ih(p[0]), w_hh(p[1]), b_ih(p[2]), b_hh(p[3]) {}
    ScanStepResult operator()(const V& c, const V& x) const
    {
        const V g = (linear(x[0], w_ih, b_ih) + linear(c[0], w_hh, b_hh)).chunk(4, 1);
        const Tensor cell = sigmoid(g[1]) * c[1] + sigmoid(g[0]) * tanh(g[2]);
        const Tensor h = sigmoid(g[3]) * tanh(cell);
        return {{h, cell}, {h}};
    }
    V params() const { return {w_ih, w_hh, b_ih, b_hh}; }
};

}  // namespace

TEST_CASE("an input no output with a gradient depends on gets none, as in the eager loop, over as many steps as "
          "there are")
{
    // y reads h and carry a; a is b one step late; b is b * s. So s reaches y two steps later,
    // q never does, and a loss of y alone gives q and the second carry's start no gradient.
    const Tensor w = leaf({4}, 90), q = leaf({4}, 91), s = leaf({4}, 92);
    const auto step = [&](const V& c, const V& x) -> ScanStepResult {
        const Tensor h = tanh(c[0] * w + x[0]);
        return {{h, c[1] * q, c[3], c[3] * s}, {h + c[2]}};
    };
    for (const std::int64_t T : {2, 3, 5}) {
        CAPTURE(T);
        const V init{leaf({3, 4}, 93), leaf({3, 4}, 94), leaf({3, 4}, 95), leaf({3, 4}, 96)};
        const V xs{leaf({T, 3, 4}, 97)};
        V wrt = init;
        wrt.insert(wrt.end(), {xs[0], w, q, s});
        ScanOptions o;
        V g[2];
        for (const bool replay : {true, false}) {
            o.replay = replay;
            const ScanOutput r = scan(step, init, xs, {w, q, s}, o);
            if (replay) CHECK_MESSAGE(r.eager_reason.empty(), r.eager_reason);
            g[replay] = grad({(r.ys[0] * random(r.ys[0].sizes(), 98)).sum()}, wrt, {}, std::nullopt, false, true);
        }
        const bool s_reaches = T >= 3;  // s at step 0 -> b at 1 -> a at 2 -> y at 2
        for (std::size_t k = 0; k < wrt.size(); ++k) {
            CAPTURE(k);
            REQUIRE(g[0][k].defined() == g[1][k].defined());
            if (g[0][k].defined()) CHECK(max_difference(g[1][k], g[0][k]) < 1e-12);
        }
        CHECK(g[0][0].defined());   // h's start
        CHECK_FALSE(g[0][1].defined());  // the second carry's start: only q's chain reads it
        CHECK(g[0][2].defined());   // a's start: y reads it at step 0
        CHECK(g[0][3].defined());  // b's start: a at step 1
        CHECK_FALSE(g[0][6].defined());  // q
        CHECK(g[0][7].defined() == s_reaches);  // s
    }
}

TEST_CASE("fused runs of elementwise ops, tile by tile over values larger than a tile")
{
    // The loop's elementwise ops over values of one size run as one pass, a tile (512 doubles)
    // at a time: 3 x 300 = 900 elements are two tiles, the second partial. The run mixes scalar
    // operands with and without gradients (q[0] is a parameter's element, 0.5 a constant), a
    // square (x * x, one operand read twice), a weight read elementwise, and a product that splits
    // the run in two; lengths hold some rows.
    const Tensor q = leaf({1}, 30), v = leaf({300}, 31), w = leaf({300, 300}, 32, -0.05, 0.05);
    const auto step = [&](const V& c, const V& x) -> ScanStepResult {
        const Tensor& h = c[0];
        const Tensor a = sigmoid(h * q + x[0]) * tanh(x[0] * x[0] - h * 0.5);
        const Tensor b = exp(-relu(a * v)) / (a * a + 1.0) + log(h * h + 1.0);
        const Tensor m = tanh(linear(b, w) - q);  // a product, then the run goes on
        const Tensor next = m * sigmoid(b) + (1.0 - sigmoid(b)) * h;
        return {{next}, {next * q, a}};
    };
    const V init{leaf({3, 300}, 33)}, xs{leaf({6, 3, 300}, 34)};
    check_replay("forward", step, init, xs, {q, v, w});
    ScanOptions options;
    options.lengths = from_vector<std::int64_t>({6, 2, 4}, {3});
    options.reverse = true;
    check_replay("lengths in reverse", step, init, xs, {q, v, w}, options);
    options.checkpoint = true;
    check_replay("checkpointed", step, init, xs, {q, v, w}, options);
}

TEST_CASE("an LSTM cell of one's own, with lengths and in reverse")
{
    const UserLSTM cell(3, 5, 10);
    const auto step = [&](const V& c, const V& x) { return cell(c, x); };
    const V init{leaf({4, 5}, 20), leaf({4, 5}, 21)};
    const V xs{leaf({7, 4, 3}, 22)};
    check_replay("forward", step, init, xs, cell.params());
    ScanOptions reverse;
    reverse.reverse = true;
    check_replay("reverse", step, init, xs, cell.params(), reverse);
    ScanOptions lengths;
    lengths.lengths = from_vector<std::int64_t>({7, 2, 0, 5}, {4});
    check_replay("lengths", step, init, xs, cell.params(), lengths);
    lengths.reverse = true;
    check_replay("lengths in reverse", step, init, xs, cell.params(), lengths);

    // The traces' entries leave the tape with the trace: a backward through the replayed scan
    // releases all that is left, and the tape is empty again.
    std::thread([&] {
        const ScanOutput r = scan(step, init, xs, cell.params());
        REQUIRE(r.eager_reason.empty());
        CHECK(autograd::tape_size() == 1);
        weighted_loss(r).backward();
        CHECK(autograd::tape_size() == 0);
    }).join();

    // The replayed scan is one tape entry; without grad it records none and gives the same values.
    const ScanOutput with_grad = scan(step, init, xs, cell.params());
    NoGradGuard no_grad;
    const ScanOutput without = scan(step, init, xs, cell.params());
    CHECK_FALSE(without.ys[0].requires_grad());
    CHECK(max_difference(without.ys[0], with_grad.ys[0]) == 0);
    CHECK(with_grad.ys[0].requires_grad());
}

TEST_CASE("a checkpointed replay computes each segment's values again in backward, and equals the eager loop")
{
    const UserLSTM cell(3, 5, 10);
    const auto step = [&](const V& c, const V& x) { return cell(c, x); };
    const V init{leaf({4, 5}, 20), leaf({4, 5}, 21)};
    const V xs{leaf({7, 4, 3}, 22)};
    for (const std::int64_t every : {0, 1, 3, 7, 10}) {  // 0: ceil(sqrt(7)) = 3
        CAPTURE(every);
        ScanOptions o;
        o.checkpoint = true;
        o.checkpoint_every = every;
        check_replay("forward", step, init, xs, cell.params(), o);
        o.lengths = from_vector<std::int64_t>({7, 2, 0, 5}, {4});
        o.reverse = true;
        check_replay("lengths in reverse", step, init, xs, cell.params(), o);
    }
    // Swept twice (retain_graph): the second sweep computes the segments again as well.
    ScanOptions o;
    o.checkpoint = true;
    o.checkpoint_every = 3;
    const ScanOutput r = scan(step, init, xs, cell.params(), o);
    REQUIRE(r.eager_reason.empty());
    const Tensor loss = weighted_loss(r);
    V wrt = cell.params();
    wrt.push_back(xs[0]);
    const V first = grad({loss}, wrt, {}, true);
    const V second = grad({loss}, wrt);
    for (std::size_t k = 0; k < wrt.size(); ++k) CHECK(max_difference(first[k], second[k]) == 0);

    ScanOptions bad;
    bad.checkpoint_every = 2;
    check_error([&] { scan(step, init, xs, cell.params(), bad); }, {"scan", "checkpoint_every(2)", "checkpoint is off"});
    bad.checkpoint = true;
    bad.checkpoint_every = -1;
    check_error([&] { scan(step, init, xs, cell.params(), bad); }, {"scan", "checkpoint_every >= 0", "-1"});
    bad.checkpoint_every = 0;
    bad.replay = false;
    check_error([&] { scan(step, init, xs, cell.params(), bad); }, {"scan", "replayed step", "replay is off"});
}

TEST_CASE("gradcheck and gradgradcheck through a replayed scan, checkpointed or not")
{
    const UserLSTM cell(2, 3, 30);
    for (const bool checkpoint : {false, true}) {
        CAPTURE(checkpoint);
        // gradcheck hands over copies of its inputs: the cell reads its parameters from them when given.
        const auto run = [&](const V& in) {
            const UserLSTM used = in.size() > 3 ? UserLSTM(V(in.begin() + 3, in.end())) : cell;
            ScanOptions o;
            o.lengths = from_vector<std::int64_t>({4, 2}, {2});
            o.checkpoint = checkpoint;  // segments of 2 steps: the first recomputed in backward
            const ScanOutput r = scan([used](const V& c, const V& x) { return used(c, x); }, {in[0], in[1]},
                                      {in[2]}, used.params(), o);
            REQUIRE(r.eager_reason.empty());
            return (r.ys[0] * r.ys[0]).sum() + r.carry[1].sum();
        };
        const V in{leaf({2, 3}, 31), leaf({2, 3}, 32), leaf({4, 2, 2}, 33)};
        const GradcheckResult first = gradcheck(run, in);
        CHECK_MESSAGE(first.ok, first.report());
        // create_graph: the backward runs the eager loop again and differentiates it.
        const GradcheckResult second = gradgradcheck(run, in);
        CHECK_MESSAGE(second.ok, second.report());
        V all = in;
        for (const Tensor& p : cell.params()) all.push_back(p);
        const GradcheckResult params = gradcheck(run, all);
        CHECK_MESSAGE(params.ok, params.report());
        const GradcheckResult params_second = gradgradcheck(run, all);
        CHECK_MESSAGE(params_second.ok, params_second.report());
    }
}

TEST_CASE("what scan cannot replay runs eagerly, says why, and gives the eager values")
{
    const Tensor h0 = leaf({2, 3}, 40);
    const V xs{leaf({4, 2, 3}, 41)};
    const auto same_as_eager = [&](const ScanStep& step, const std::string& why) {
        manual_seed(7);
        const ScanOutput r = scan(step, {h0}, xs);
        CHECK_MESSAGE(r.eager_reason.find(why) != std::string::npos, r.eager_reason);
        manual_seed(7);
        ScanOptions eager;
        eager.replay = false;
        const ScanOutput e = scan(step, {h0}, xs, {}, eager);
        CHECK(max_difference(r.carry[0], e.carry[0]) == 0);
        CHECK(max_difference(r.ys[0], e.ys[0]) == 0);
    };
    same_as_eager([](const V& c, const V& x) -> ScanStepResult { return {{softplus(c[0] + x[0])}, {c[0]}}; },
                  "op 'softplus'");
    // Random numbers: the default generator is put back after tracing, so eager draws the same.
    same_as_eager([](const V& c, const V& x) -> ScanStepResult {
        return {{c[0] * 0.5 + x[0] + randn({2, 3}, kFloat64)}, {c[0]}};
    }, "differed between two traces");
    // A mask computed from the carry without gradient depends on the data.
    same_as_eager([](const V& c, const V& x) -> ScanStepResult {
        return {{c[0] * gt(c[0], scalar_tensor(0.0, kFloat64)).to(kFloat64) + x[0]}, {c[0]}};
    }, "differed between two traces");
    same_as_eager([](const V& c, const V& x) -> ScanStepResult { return {{tanh(c[0] + x[0].detach())}, {c[0]}}; },
                  "");  // detach of the input: a constant per trace that differs, or replayed; either way equal

    // One step only: nothing to replay.
    const ScanOutput one = scan([](const V& c, const V& x) -> ScanStepResult { return {{c[0] + x[0]}, {}}; }, {h0},
                                {leaf({1, 2, 3}, 42)});
    CHECK(one.eager_reason.find("fewer than 2 steps") != std::string::npos);
}

TEST_CASE("scan's errors name what was wrong")
{
    const Tensor h0 = leaf({2, 3}, 50);
    const auto add = [](const V& c, const V& x) -> ScanStepResult { return {{c[0] + x[0]}, {c[0]}}; };
    check_error([&] { scan(add, {h0}, {}); }, {"scan", "at least one tensor in xs"});
    check_error([&] { scan(add, {h0}, {leaf({0, 2, 3}, 57)}); }, {"scan", "at least one step", "[0, 2, 3]"});
    check_error([&] { scan(add, {h0}, {leaf({4, 2, 3}, 51), leaf({5, 2, 3}, 52)}); }, {"scan", "xs 1 has 5 steps"});
    ScanOptions bad;
    bad.lengths = from_vector<std::int64_t>({9, 1}, {2});
    check_error([&] { scan(add, {h0}, {leaf({4, 2, 3}, 53)}, {}, bad); }, {"scan", "length 9 of row 0", "[0, 4]"});
    check_error([&] {
        scan([](const V& c, const V& x) -> ScanStepResult { return {{concat({c[0], x[0]}, 1)}, {}}; }, {h0},
             {leaf({4, 2, 3}, 54)});
    }, {"scan", "carry 0", "must keep its shape [2, 3]"});

    // A parameter changed in place before backward: the saved version catches it.
    Tensor w = leaf({3, 3}, 55);
    const ScanOutput r = scan([&](const V& c, const V& x) -> ScanStepResult { return {{tanh(matmul(c[0], w) + x[0])}, {}}; },
                              {h0}, {leaf({4, 2, 3}, 56)}, {w});
    REQUIRE(r.eager_reason.empty());
    {
        NoGradGuard no_grad;
        w.mul_(2.0);
    }
    check_error([&] { r.carry[0].sum().backward(); }, {"scan", "modified"});
}

#include "../examples/minimal_gated_unit.hpp"

TEST_CASE("Recurrent<Cell> replays its cell by default, and equals the step-by-step path")
{
    // A forward hook on a cell turns replay off: the same layer then runs step by step (with
    // checkpoint(true), segments of steps run again in backward by calling the cell).
    for (const bool checkpoint : {false, true})
    for (const bool bidirectional : {false, true}) {
        CAPTURE(checkpoint);
        CAPTURE(bidirectional);
        manual_seed(3);
        nn::Recurrent<MinimalGatedUnit> rnn(nn::RecurrentOptions(3, 4)
                                                .num_layers(2)
                                                .bidirectional(bidirectional)
                                                .dropout(0.3)
                                                .all_states(true)
                                                .checkpoint(checkpoint)
                                                .checkpoint_every(checkpoint ? 4 : 0)
                                                .dtype(kFloat64));
        CHECK(rnn.replayable());
        const Tensor x = leaf({6, 3, 3}, 60);
        const Tensor h0 = leaf({bidirectional ? 4 : 2, 3, 4}, 61);
        const Tensor lengths = from_vector<std::int64_t>({6, 2, 4}, {3});
        const auto run = [&] {
            manual_seed(11);  // the same dropout masks between layers
            const nn::RecurrentOutput r = rnn(x, {h0}, lengths);
            return std::vector<Tensor>{r.output, r.state[0], r.all_states[0]};
        };
        const std::vector<Tensor> replayed = run();
        V wrt{x, h0};
        for (const Tensor& p : rnn.parameters()) wrt.push_back(p);
        const V g_replayed = grad({(replayed[0] * random(replayed[0].sizes(), 62)).sum() + replayed[1].sum()}, wrt);

        auto handle = rnn.cell(0).register_forward_hook([](nn::Module&, const nn::Tensors&, nn::Tensors&) {});
        CHECK_FALSE(rnn.replayable());
        const std::vector<Tensor> eager = run();
        const V g_eager = grad({(eager[0] * random(eager[0].sizes(), 62)).sum() + eager[1].sum()}, wrt);
        for (std::size_t k = 0; k < eager.size(); ++k) CHECK(max_difference(replayed[k], eager[k]) < 1e-12);
        for (std::size_t k = 0; k < wrt.size(); ++k) CHECK(max_difference(g_replayed[k], g_eager[k]) < 1e-12);
        handle.remove();
        CHECK(rnn.replayable());
    }
    // all_states without lengths is a tensor of its own, not a view of the output.
    {
        nn::Recurrent<MinimalGatedUnit> rnn(nn::RecurrentOptions(3, 4).all_states(true).dtype(kFloat64));
        REQUIRE(rnn.replayable());
        const nn::RecurrentOutput r = rnn(leaf({5, 2, 3}, 63));
        const std::vector<double> before = testing::values(r.output);
        NoGradGuard no_grad;
        Tensor states = r.all_states[0];
        states.fill_(7.0);
        CHECK(testing::values(r.output) == before);
    }
    // Inference: the traces record on the tape (grad mode is on for them), and compaction
    // reclaims their entries, which save their inputs, call after call.
    {
        nn::Recurrent<MinimalGatedUnit> rnn(nn::RecurrentOptions(3, 4).dtype(kFloat64));
        REQUIRE(rnn.replayable());
        const Tensor x = leaf({5, 2, 3}, 64);
        std::thread([&] {
            NoGradGuard no_grad;
            for (int i = 0; i < 1500; ++i) (void)rnn(x);
            CHECK(autograd::tape_size() < 3000);
        }).join();
    }
    // The built-in cells are one fused op per step already: they are not replayed.
    CHECK_FALSE(nn::Recurrent<nn::LSTMCell>(nn::RecurrentOptions(2, 3)).replayable());
}

TEST_CASE("anomaly mode runs the step eagerly and names the op and the step of a NaN")
{
    const Tensor h0 = leaf({2, 3}, 70);
    Tensor xs = random({5, 2, 3}, 71, 0.5, 1.0);
    {
        NoGradGuard no_grad;
        xs.select(0, 3).select(0, 1).fill_(-1.0);  // log of a negative number at step 3
    }
    const auto step = [](const V& c, const V& x) -> ScanStepResult { return {{c[0] * 0.5 + log(x[0])}, {c[0]}}; };
    autograd::DetectAnomalyGuard anomaly;
    check_error([&] { scan(step, {h0}, {xs}); }, {"log", "step 3"});
    // A checkpointed scan in anomaly mode keeps every op's tensors, and says so.
    ScanOptions checkpointed;
    checkpointed.checkpoint = true;
    const ScanOutput kept = scan(step, {h0}, {xs.narrow(0, 0, 3)}, {}, checkpointed);
    CHECK(kept.eager_reason.find("anomaly mode") != std::string::npos);
    CHECK(kept.eager_reason.find("checkpoint does not apply") != std::string::npos);
    // And in Recurrent<Cell>, which replays its cells only outside anomaly mode.
    nn::Recurrent<MinimalGatedUnit> rnn(nn::RecurrentOptions(3, 2).dtype(kFloat64));
    Tensor x = random({4, 1, 3}, 72);
    {
        NoGradGuard no_grad;
        x.select(0, 2).fill_(std::nan(""));
    }
    check_error([&] { rnn(x); }, {"step 2"});
}
