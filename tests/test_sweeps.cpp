// The backward sweep under stress: create_graph sweeps that grow the tape while they run,
// sweeps started inside a running one, and custom ops' mistakes reported as the user's.
#include "helpers.hpp"

#include <thread>

#include "../examples/minimal_gated_unit.hpp"

using namespace loom;
using testing::random;
using testing::check_error;
using testing::close;
using testing::values;

namespace {

void check_ok(const GradcheckResult& r, const char* what) { CHECK_MESSAGE(r.ok, what << ": " << r.report()); }

// x^3, whose backward differentiates its own forward again with grad() while the sweep runs.
struct Cube : autograd::Function<Cube> {
    static constexpr const char* name = "cube_by_inner_grad";
    static Tensor forward(autograd::AutogradContext* ctx, const Tensor& x)
    {
        ctx->save_for_backward({x});
        return x * x * x;
    }
    static std::vector<Tensor> backward(autograd::AutogradContext* ctx, const std::vector<Tensor>& g)
    {
        const Tensor x = ctx->get_saved_variables()[0].detach().requires_grad_();
        GradModeGuard on(true);
        const Tensor d = grad({(x * x * x).sum()}, {x})[0];
        return {g[0] * d.detach()};
    }
};

// Takes its tensors in a vector, which apply() refuses at compile time.
struct SumOfAll : autograd::Function<SumOfAll> {
    static constexpr const char* name = "sum_of_all";
    static Tensor forward(autograd::AutogradContext*, const std::vector<Tensor>& xs) { return xs.at(0) + xs.at(1); }
    static std::vector<Tensor> backward(autograd::AutogradContext*, const std::vector<Tensor>& g) { return {g[0]}; }
};

// Returns one tensor twice.
struct Twice : autograd::Function<Twice> {
    static constexpr const char* name = "twice";
    static std::vector<Tensor> forward(autograd::AutogradContext*, const Tensor& x)
    {
        const Tensor y = x * 2.0;
        return {y, y};
    }
    static std::vector<Tensor> backward(autograd::AutogradContext*, const std::vector<Tensor>& g)
    {
        return {(g[0] + g[1]) * 2.0};
    }
};

// x^3 with a backward computed from a detached copy of x: right at first order only.
struct OffTapeCube : autograd::Function<OffTapeCube> {
    static constexpr const char* name = "off_tape_cube";
    static Tensor forward(autograd::AutogradContext* ctx, const Tensor& x)
    {
        ctx->save_for_backward({x});
        return x * x * x;
    }
    static std::vector<Tensor> backward(autograd::AutogradContext* ctx, const std::vector<Tensor>& g)
    {
        const Tensor x = ctx->get_saved_variables()[0].detach();
        return {g[0] * 3.0 * x * x};
    }
};

}  // namespace

TEST_CASE("a create_graph sweep that grows the tape reads nothing freed: the HVP repeated stays exact")
{
    // f = sum(x^3) + sum(x^2): H = diag(6x + 2), so Hv = (6x + 2) v. Each repetition records the
    // backward pass on the tape while sweeping it, which moves the tape's entries many times.
    const Tensor x = from_vector<double>({0.5, -2.0, 2.0}, {3}).requires_grad_();
    const Tensor v = ones({3}, kFloat64);
    std::vector<Tensor> keep;  // holding results keeps their entries on the tape, so it keeps growing
    for (int rep = 0; rep < 300; ++rep) {
        const Tensor f = pow(x, 3.0).sum() + pow(x, 2.0).sum();
        const Tensor g = grad({f}, {x}, {}, false, /*create_graph=*/true)[0];
        const Tensor hv = grad({(g * v).sum()}, {x})[0];
        REQUIRE_MESSAGE(close(hv, {5, -10, 14}, 1e-12), "repetition " << rep << ": " << fmt::format("{}", hv));
        keep.push_back(g);
    }
}

TEST_CASE("create_graph through a long graph with region ops and shared inputs stays exact")
{
    // A loop of linear() over select()ed steps: every step's backward records region sums.
    const Tensor W = random({4, 4}, 1, -0.5, 0.5).requires_grad_();
    const Tensor xs = random({40, 2, 4}, 2).requires_grad_();
    const auto fn = [](const std::vector<Tensor>& in) {
        Tensor h = zeros({2, 4}, kFloat64);
        for (std::int64_t t = 0; t < in[1].size(0); ++t) h = tanh(linear(in[1].select(0, t) + h, in[0]));
        return h.sum();
    };
    check_ok(gradgradcheck(fn, {W, xs}), "linear loop");
}

TEST_CASE("second derivatives of a cell of one's own through Recurrent<Cell>, and of a fused(false) LSTM")
{
    manual_seed(3);
    nn::Recurrent<MinimalGatedUnit> mgu(nn::RecurrentOptions(3, 4).dtype(kFloat64));
    const Tensor x = random({6, 2, 3}, 4).requires_grad_();
    check_ok(gradgradcheck([&](const std::vector<Tensor>& in) { return mgu(in[0]).output.pow(2).sum(); }, {x}),
             "Recurrent<MinimalGatedUnit>");
    nn::LSTM lstm(nn::RecurrentOptions(3, 4).num_layers(2).fused(false).dtype(kFloat64));
    for (int rep = 0; rep < 20; ++rep) {
        const Tensor loss = lstm(x).output.pow(2).sum();
        const auto params = lstm.parameters();
        const std::vector<Tensor> g = grad({loss}, params, {}, false, true);
        Tensor norm = zeros({}, kFloat64);
        for (const Tensor& gi : g) norm = norm + gi.pow(2).sum();
        const std::vector<Tensor> h = grad({norm}, params);
        CHECK(h.size() == params.size());
        for (const Tensor& hi : h) CHECK(std::isfinite(hi.abs().sum().item<double>()));
    }
}

TEST_CASE("a grad() inside a custom op's backward touches only what it recorded itself")
{
    // backward differentiates its own forward again, from a detached copy: the outer sweep's
    // pending gradients are left alone and the outer gradient comes out whole.
    const Tensor x = from_vector<double>({1.0, 2.0}, {2}).requires_grad_();
    const Tensor y = x * 2.0;
    const Tensor loss = (Cube::apply(y) + y).sum() + (x * 3.0).sum();
    loss.backward();
    // d/dx [ (2x)^3 + 2x + 3x ] = 24 x^2 + 5
    CHECK(close(x.grad(), {29, 101}, 1e-12));
}

TEST_CASE("a grad() inside a running sweep that reaches the outer graph is a clear error, and the outer sweep can "
          "be retried")
{
    const Tensor x = from_vector<double>({1.0, 2.0}, {2}).requires_grad_();
    const Tensor hidden = x * x;
    Tensor y = hidden * 3.0;
    bool nested = true;
    y.register_hook([&](const Tensor& g) {
        if (nested) {
            GradModeGuard on(true);
            grad({hidden.sum()}, {x});  // reaches `hidden`, recorded before this sweep began
        }
        return g;
    });
    const Tensor loss = y.sum();
    check_error([&] { loss.backward(); }, {"while another backward pass runs", "'mul'"});
    CHECK_FALSE(x.grad().defined());
    nested = false;
    loss.backward();
    CHECK(close(x.grad(), {6, 12}, 1e-12));
}

TEST_CASE("a custom op's mistakes in record() are reported as the user's, not as internal")
{
    const Tensor x = from_vector<double>({1.0, 2.0}, {2}).requires_grad_();
    const auto two_grads = [&] {
        const Tensor out = autograd::record("two_grads", {x}, x.detach() * 2.0, {}, [](const autograd::BackwardContext& c) {
            return std::vector<Tensor>{c.grad(), c.grad()};
        });
        out.sum().backward();
    };
    check_error(two_grads, {"two_grads", "backward returned 2 gradients, expected 1"});
    const auto bad_shape = [&] {
        const Tensor out = autograd::record("bad_shape", {x}, x.detach() * 2.0, {}, [](const autograd::BackwardContext&) {
            return std::vector<Tensor>{ones({3}, kFloat64)};
        });
        out.sum().backward();
    };
    check_error(bad_shape, {"bad_shape", "shape [3]", "expected shape [2]"});
    for (const auto& [what, make] : std::vector<std::pair<std::string, std::function<Tensor()>>>{
             {"an output computed with grad mode on", [&] { return x * 2.0; }},
             {"an output that is the input", [&] { return x; }}}) {
        CAPTURE(what);
        const Tensor out = autograd::record("doubled", {x}, make(), {}, [](const autograd::BackwardContext& c) {
            return std::vector<Tensor>{c.grad() * 2.0};
        });
        CHECK(std::string(autograd::to_text(out)).find("doubled") != std::string::npos);
        const Tensor g = grad({out.sum()}, {x})[0];
        CHECK(close(g, {2, 2}, 1e-12));
    }
}

TEST_CASE("a Function returning one tensor twice gives two outputs, each with its own gradient")
{
    const Tensor x = from_vector<double>({1.0, 2.0}, {2}).requires_grad_();
    const std::vector<Tensor> out = Twice::apply(x);
    (out[0].sum() + 3.0 * out[1].sum()).backward();
    CHECK(close(x.grad(), {8, 8}, 1e-12));
}

TEST_CASE("a custom op whose backward is off the tape is named under create_graph even when its incoming gradient is "
          "a constant")
{
    const Tensor x = from_vector<double>({1.0, 2.0}, {2}).requires_grad_();
    // Its output feeds sum() directly: the incoming gradient is a constant of ones.
    check_error([&] { grad({OffTapeCube::apply(x).sum()}, {x}, {}, false, true); },
                {"off_tape_cube", "cannot be differentiated twice", "saved requires grad"});
    // The same with record().
    const auto recorded = [&] {
        Tensor out;
        {
            NoGradGuard no_grad;
            out = x * x * x;
        }
        out = autograd::record("recorded_cube", {x}, out, {x}, [](const autograd::BackwardContext& c) {
            const Tensor s = c.saved[0].detach();
            return std::vector<Tensor>{c.grad() * 3.0 * s * s};
        });
        grad({out.sum()}, {x}, {}, false, true);
    };
    check_error(recorded, {"recorded_cube", "cannot be differentiated twice"});
    // First order is unaffected.
    CHECK(close(grad({OffTapeCube::apply(x).sum()}, {x})[0], {3, 12}, 1e-12));
}

// Tensors inside a std::vector argument of a custom op do not compile, as they would get no
// gradient; a Tensor argument does.
template <class Op, class Argument> concept Applicable = requires(Argument a) { Op::apply(a); };
static_assert(!Applicable<SumOfAll, std::vector<Tensor>>);
static_assert(Applicable<Twice, Tensor>);

// Each runs on a thread of its own, whose tape starts empty.
template <class F> void on_fresh_tape(F body)
{
    std::thread(body).join();
}

TEST_CASE("a backward that releases every entry empties the tape; what it released stays an error to reach")
{
    on_fresh_tape([] {
        Tensor x = tensor({0.5, -1.0, 2.0}, kFloat64).requires_grad_();
        Tensor h = x.tanh();
        Tensor y = (h * 3.0).sum();
        CHECK(autograd::tape_size() >= 3);
        y.backward();
        CHECK(autograd::tape_size() == 0);
        CHECK(close(x.grad(), values((1.0 - x.tanh() * x.tanh()) * 3.0), 1e-12));
        // The entries are gone; each tensor still names the op that made it.
        check_error([&] { y.backward(); }, {"sum", "released", "retain_graph"});
        check_error([&] { (h * 2.0).sum().backward(); }, {"tanh", "released", "retain_graph"});
        check_error([&] { (void)autograd::to_dot(y); }, {"sum", "released by an earlier backward"});
        {
            // Read after the reset, then dropped: the new entry must keep y's node itself.
            Tensor z = (y * 2.0).sum();
            y = Tensor();
            for (int i = 0; i < 3000; ++i) (void)(x * 2.0);  // compaction runs meanwhile
            check_error([&] { z.backward(); }, {"sum", "released", "retain_graph"});
        }
        h.retain_grad();  // nothing can reach h again: allowed, and it changes nothing
        // A new graph on the emptied tape differentiates as before.
        x.zero_grad();
        (x * x).sum().backward();
        CHECK(close(x.grad(), values(x * 2.0), 1e-12));
    });
}

TEST_CASE("compaction keeps what a live entry reads, and the hooks of results already dropped")
{
    on_fresh_tape([] {
        Tensor x = tensor({0.5, -1.0}, kFloat64).requires_grad_();
        Tensor seen;
        Tensor y;
        {
            Tensor h = x * 3.0;
            h.register_hook([&](const Tensor& g) {
                seen = g.clone();
                return Tensor();
            });
            y = h.tanh();
        }  // h is dropped: only y's entry reads it
        for (int i = 0; i < 5000; ++i) (void)(x * 2.0);  // dead entries, reclaimed by compaction
        CHECK(autograd::tape_size() < 3000);
        y = y * y;
        y.sum().backward();
        const Tensor t = (x * 3.0).tanh();
        REQUIRE(seen.defined());
        CHECK(close(seen, values(t * 2.0 * (1.0 - t * t)), 1e-12));
        CHECK(close(x.grad(), values(t * 6.0 * (1.0 - t * t)), 1e-12));
    });
}

TEST_CASE("an entry with more inputs and saved tensors than it keeps in place keeps them when compaction moves it")
{
    on_fresh_tape([] {
        // Five of each: the entry's lists lie on the heap (PackedList), and the entry is moved
        // down the tape by the compaction that drops the dead entries recorded before it.
        std::vector<Tensor> xs;
        for (int k = 0; k < 5; ++k) xs.push_back(tensor({0.5 + k, -1.0 - 0.25 * k}, kFloat64).requires_grad_());
        for (int i = 0; i < 500; ++i) (void)(xs[0] * 2.0);  // dead, before the product
        Tensor product = xs[0].detach();
        for (int k = 1; k < 5; ++k) product = product * xs[k].detach();
        Tensor y = autograd::record("product_of_five", xs, product, xs, [](const autograd::BackwardContext& c) {
            autograd::GradList grads;
            for (std::size_t k = 0; k < 5; ++k) {
                Tensor others = c.grad();
                for (std::size_t j = 0; j < 5; ++j)
                    if (j != k) others = others * c.saved[j];
                grads.push_back(others);
            }
            return grads;
        });
        for (int i = 0; i < 5000; ++i) (void)(xs[0] * 2.0);  // dead, reclaimed by compaction
        CHECK(autograd::tape_size() < 3000);
        (y * y).sum().backward();
        for (std::size_t k = 0; k < 5; ++k) {
            Tensor others = y.detach() * 2.0;
            for (std::size_t j = 0; j < 5; ++j)
                if (j != k) others = others * xs[j].detach();
            CHECK(close(xs[k].grad(), values(others), 1e-12));
        }
    });
}

TEST_CASE("compaction drops every entry once no output on the tape is alive, watched ones with their hooks")
{
    on_fresh_tape([] {
        Tensor x = tensor({0.5, -1.0}, kFloat64).requires_grad_();
        int hook_runs = 0;
        {
            Tensor h = x * 3.0;
            h.register_hook([&](const Tensor& g) {
                ++hook_runs;
                return g;
            });
            Tensor y = h.tanh();
        }  // nothing of the graph is held any more, the hooked h included
        for (int i = 0; i < 5000; ++i) (void)(x + x);  // their results dropped at once
        CHECK(autograd::tape_size() < 1100);
        // A graph recorded after differentiates as before, and the dropped hook never runs.
        Tensor t = (x * 3.0).tanh();
        (t * t).sum().backward();
        CHECK(autograd::tape_size() == 0);
        CHECK(hook_runs == 0);
        const Tensor u = t.detach();
        CHECK(close(x.grad(), values(u * 6.0 * (1.0 - u * u)), 1e-12));
    });
}

TEST_CASE("compaction finds a live output past the first chunk of slots, and keeps its entry")
{
    on_fresh_tape([] {
        Tensor x = tensor({0.5, -1.0}, kFloat64).requires_grad_();
        Tensor last;
        {
            std::vector<Tensor> kept;
            for (int i = 0; i < 1100; ++i) kept.push_back(x * 2.0);  // more slots than one chunk holds
            last = kept.back();
        }  // all dead but the last, whose slot lies in the second chunk
        for (int i = 0; i < 1000; ++i) (void)(x + x);  // dead too, until compaction is due
        CHECK(autograd::tape_size() < 1100);
        CHECK(autograd::tape_size() >= 1);
        last.sum().backward();
        CHECK(close(x.grad(), values(full_like(x, 2.0)), 1e-12));
    });
}

TEST_CASE("what entries keep beside them outlives compaction, is destroyed once, and is reclaimed")
{
    on_fresh_tape([] {
        // A closure that captures nothing is kept in its entry.
        Tensor x = random({2, 1, 3, 1, 2, 1}, 5).requires_grad_();
        (void)(x * x);
        CHECK(autograd::detail::tape_stream_bytes() == 0);
        // One that holds tensors and a count is kept in the tape's stream, and destroyed with its
        // entry, once.
        auto count = std::make_shared<int>(0);
        const auto tripled = [&] {
            return autograd::record("tripled", {x}, x.detach() * 3.0, {},
                                    [count, three = full({1}, 3.0, kFloat64)](const autograd::BackwardContext& c) {
                                        return std::vector<Tensor>{c.grad() * three};
                                    });
        };
        // sum keeps its input's shape, of six dimensions (an allocation of its own), in the stream.
        Tensor z = tripled().sum({0, 2}, true);
        CHECK(autograd::detail::tape_stream_bytes() > 0);
        // Dead entries, reclaimed by compaction along with what they kept.
        for (int i = 0; i < 20000; ++i) (void)tripled();
        CHECK(autograd::tape_size() < 3000);
        CHECK(count.use_count() - 1 <= static_cast<long>(autograd::tape_size()));
        CHECK(autograd::detail::tape_stream_bytes() < 20000 * sizeof(Tensor) * 2 / 4);
        // The kept entries, moved to the new stream by each compaction, differentiate as before.
        (z * z).sum().backward();
        CHECK(close(x.grad(), values(zeros({2, 1, 3, 1, 2, 1}, kFloat64) + z.detach() * 6.0), 1e-12));
        // The sweep released every entry: each closure was destroyed, and the stream is empty.
        CHECK(autograd::tape_size() == 0);
        CHECK(count.use_count() == 1);
        CHECK(autograd::detail::tape_stream_bytes() == 0);
    });
}

TEST_CASE("a compaction that finds every entry alive leaves the tape as it was; a later one reclaims what died since")
{
    on_fresh_tape([] {
        Tensor x = random({3}, 6).requires_grad_();
        auto count = std::make_shared<int>(0);
        const auto tripled = [&] {  // its closure holds a count and lies in the stream
            return autograd::record("tripled", {x}, x.detach() * 3.0, {},
                                    [count](const autograd::BackwardContext& c) {
                                        return std::vector<Tensor>{c.grad() * 3.0};
                                    });
        };
        // 3,000 results held: the compactions due at 1,024 and 2,048 entries find nothing dead.
        std::vector<Tensor> held;
        for (int i = 0; i < 3000; ++i) held.push_back(tripled());
        CHECK(autograd::tape_size() == 3000);
        CHECK(count.use_count() == 3001);
        const std::size_t stream = autograd::detail::tape_stream_bytes();
        CHECK(stream > 0);
        // Dropped, all but one: the next compaction reclaims them and their bytes, once each.
        Tensor kept = held[1234];
        held.clear();
        for (int i = 0; i < 4000; ++i) (void)tripled();
        CHECK(autograd::tape_size() < 3000);
        CHECK(count.use_count() - 1 == static_cast<long>(autograd::tape_size()));
        CHECK(autograd::detail::tape_stream_bytes() < stream);
        kept.sum().backward();
        CHECK(close(x.grad(), values(full_like(x, 3.0)), 1e-12));
        CHECK(autograd::tape_size() == 0);
        CHECK(count.use_count() == 1);
    });
}

TEST_CASE("an entry keeps a first output of five dims, or of a dim past 2^32, aside: exports, compaction and sweeps "
          "see it whole")
{
    on_fresh_tape([] {
        // Five dims: exp's entry keeps its output's shape aside, and mul's inputs, like its
        // output, are told their shape from there.
        Tensor x = random({2, 1, 3, 1, 2}, 7).requires_grad_();
        const Tensor y = x.exp();
        const Tensor z = y * y;
        // A dim of 2^32 + 3 (and no elements): too large for the compact form too.
        const std::int64_t huge = (std::int64_t(1) << 32) + 3;
        Tensor w = zeros({huge, 0}, kFloat64).requires_grad_();
        const Tensor v = (w * 2.0).exp();
        CHECK(autograd::to_text(z).find(" exp -> [2, 1, 3, 1, 2] float64") != std::string::npos);
        CHECK(autograd::to_text(v).find(" exp -> [4294967299, 0] float64") != std::string::npos);
        CHECK(autograd::to_text(v).find(" mul -> [4294967299, 0] float64") != std::string::npos);
        // Dead entries around them, reclaimed by compaction, which moves the kept ones.
        for (int i = 0; i < 5000; ++i) (void)(x * 2.0);
        CHECK(autograd::tape_size() < 2000);
        (z.sum() + v.sum()).backward();
        std::vector<double> expected;
        for (double xv : values(x)) expected.push_back(2 * std::exp(2 * xv));
        CHECK(close(x.grad(), expected, 1e-12));
        CHECK(w.grad().sizes() == Shape{huge, 0});
    });
}

TEST_CASE("compaction reclaims dead chains whose entries saved their inputs")
{
    on_fresh_tape([] {
        Tensor w = tensor({0.5, -1.0}, kFloat64).requires_grad_();
        // An evaluation loop with grad on that never calls backward: each mul saves both of its
        // inputs, the outputs of the sigmoid and tanh before it, and x * x saves one tensor twice.
        for (int i = 0; i < 3000; ++i) {
            Tensor h = w;
            for (int k = 0; k < 4; ++k) h = h.sigmoid() * h.tanh();
            (void)(h * h);
        }
        CHECK(autograd::tape_size() < 3000);
        // A saved input still held elsewhere keeps its producer: the held chain can be swept.
        Tensor s = w.sigmoid();
        Tensor y = (s * s).sum();
        for (int i = 0; i < 3000; ++i) (void)(w.tanh() * w.sigmoid());
        CHECK(autograd::tape_size() < 3000);
        y.backward();
        const Tensor v = w.sigmoid();
        CHECK(close(w.grad(), values(v * 2.0 * v * (1.0 - v)), 1e-12));
    });
}

TEST_CASE("an entry that saved its own output is reclaimed once no one else holds that output")
{
    on_fresh_tape([] {
        Tensor w = tensor({0.5, -1.0}, kFloat64).requires_grad_();
        // tanh and exp save their outputs for backward; the loop drops them at once.
        for (int i = 0; i < 3000; ++i) (void)w.tanh().exp();
        CHECK(autograd::tape_size() < 3000);
        // An output the user holds keeps its entry through compaction, and a backward through it
        // still reads what was saved.
        Tensor kept = w.tanh().exp();
        for (int i = 0; i < 3000; ++i) (void)w.exp();
        CHECK(autograd::tape_size() < 3000);
        kept.sum().backward();
        const NoGradGuard no_grad;
        const Tensor t = w.tanh();
        CHECK(close(w.grad(), values(t.exp() * (1.0 - t * t)), 1e-12));
    });
}

TEST_CASE("a backward drops the dead entries it did not reach, so a training step's tape empties")
{
    on_fresh_tape([] {
        Tensor w = tensor({0.5, -1.0}, kFloat64).requires_grad_();
        for (int i = 0; i < 3; ++i) {
            w.zero_grad();
            Tensor h = w.tanh();
            (void)(h * 3.0).unsqueeze(0);  // a result nothing uses, as a layer's final state
            Tensor loss = (h * h).sum();
            CHECK(autograd::tape_size() == 5);
            loss.backward();
            CHECK(autograd::tape_size() == 0);
            const NoGradGuard no_grad;
            const Tensor t = w.tanh();
            CHECK(close(w.grad(), values(t * 2.0 * (1.0 - t * t)), 1e-12));
        }
    });
}

TEST_CASE("gradients summed where a result fans out never write into a gradient someone else holds")
{
    // The sweep runs y's readers t2, t1, s in turn: t2 and t1 hand on as it is a gradient their
    // hooks also hold, so the first is adopted and the second summed with it into a new buffer,
    // then tanh's is added into that. z's readers u (held by its hook) and w: w's gradient, held
    // by no one else, is summed into in place.
    Tensor x = tensor({0.3, -1.2, 2.0}, kFloat64).requires_grad_();
    Tensor y = x * 1.5, z = x * 2.5;
    Tensor s = y.tanh(), t1 = y + 0.0, t2 = y + 0.0;
    Tensor w = z.tanh(), u = z + 0.0;
    std::vector<Tensor> held(3);
    const auto hold = [&](Tensor& t, std::size_t k) {
        t.register_hook([&held, k](const Tensor& g) {
            held[k] = g;
            return Tensor();
        });
    };
    hold(t1, 0);
    hold(t2, 1);
    hold(u, 2);
    (s + t1 * 2.0 + t2 * 3.0 + w + u * 4.0).sum().backward();
    for (std::size_t k = 0; k < 3; ++k) CHECK(close(held[k], values(full({3}, 2.0 + double(k), kFloat64)), 0));
    const NoGradGuard no_grad;
    CHECK(close(x.grad(), values((6.0 - s * s) * 1.5 + (5.0 - w * w) * 2.5), 1e-12));
}

TEST_CASE("elementwise gradients written into the sweep's sums equal those returned, and spare what others hold")
{
    // mul, sigmoid, tanh, exp, pow, log and a sum to one value compute their inputs' gradients
    // straight into the sweep's sums; anomaly mode takes the route where each backward returns
    // its gradients and the sweep adds them. The two agree to the last bit: the same products
    // are added in the same order.
    for (const DType dtype : {kFloat32, kFloat64}) {
        const Tensor x0 = random({2, 5}, 11).to(dtype), w = random({2, 5}, 12).to(dtype);
        const auto gradients = [&] {
            Tensor x = x0.clone().requires_grad_();
            Tensor h = x * w;  // h's first gradient is written fresh (by the mul reading h last),
            Tensor y = h.sigmoid() * h + h.tanh() * w + (h * h).exp() + h * h;  // the rest added in
            y = y + h.pow(2) + h.pow(3.0) + (h * h + 1.0).log();
            return grad({y.sum() + y.sum() * 0.5}, {x})[0];  // y's sum written, then added into
        };
        const Tensor in_place = gradients();
        Tensor returned;
        {
            const autograd::DetectAnomalyGuard anomaly;
            returned = gradients();
        }
        CHECK(testing::close_tensors(in_place, returned, 0));
    }
    // a + 0.0 hands h its gradient as it is, which a's hook holds: the mul reading h before it
    // must not add into that tensor.
    Tensor x = tensor({0.3, -1.2, 2.0}, kFloat64).requires_grad_();
    Tensor h = x * 1.5;
    Tensor squared = h * h;
    Tensor a = h + 0.0;
    Tensor held;
    a.register_hook([&](const Tensor& g) {
        held = g;
        return Tensor();
    });
    ((squared + a * 4.0) * 1.0).sum().backward();  // * 1.0: the mul's gradient is contiguous
    CHECK(close(held, {4, 4, 4}, 0));
    CHECK(close(x.grad(), values((x * 1.5 * 2.0 + 4.0) * 1.5), 1e-12));
}

namespace {
// loom's element-wise ops that the sweep runs from their formulas (pointwise.hpp), for the two
// tests below: one shows that the routes agree, the other which route each entry took.
using BinaryOp = Tensor (*)(const Tensor&, const Tensor&);
using UnaryOp = Tensor (*)(const Tensor&);
const std::vector<std::pair<const char*, BinaryOp>> formula_binary_ops{
    {"add", [](const Tensor& a, const Tensor& b) { return a + b; }},
    {"sub", [](const Tensor& a, const Tensor& b) { return a - b; }},
    {"mul", [](const Tensor& a, const Tensor& b) { return a * b; }},
    {"div", [](const Tensor& a, const Tensor& b) { return a / b; }}};
// With the number of formula entries each makes.
struct FormulaUnaryOp {
    const char* name;
    UnaryOp op;
    std::uint64_t formula_entries;
};
const std::vector<FormulaUnaryOp> formula_unary_ops{
    {"neg", [](const Tensor& a) { return -a; }, 1},
    {"exp", [](const Tensor& a) { return a.exp(); }, 1},
    {"log", [](const Tensor& a) { return a.log(); }, 1},
    {"tanh", [](const Tensor& a) { return a.tanh(); }, 1},
    {"sigmoid", [](const Tensor& a) { return a.sigmoid(); }, 1},
    // a - 1.5 is x / 2 in the first test: about half the elements below zero, where relu's
    // gradient is zero. The sub is a formula entry too.
    {"relu", [](const Tensor& a) { return relu(a - 1.5); }, 2}};
}  // namespace

TEST_CASE("loom's element-wise ops are swept from their formulas, as their backward functions compute them")
{
    // The sweep runs add, sub, mul, div, neg, exp, log, tanh, sigmoid and relu from pointwise.hpp's
    // formulas (no backward function called). A running Profiler sends every entry through its
    // backward function with the sweep's sums offered, and anomaly mode through its backward
    // function returning each gradient: all three agree to the last bit, in every case a sum can
    // be in, and the formula's gradients agree with central differences.
    // Each loss reads a = 1.5 + x / 2 and b = 1 + x^2 (both positive, for log and div), then the op
    // in one situation. Each op is a statement of its own, so the tape's order is the one written.
    using Op = std::function<Tensor(const Tensor&, const Tensor&)>;
    using Loss = std::function<Tensor(const Tensor& a, const Tensor& b, const Op& op)>;
    const std::vector<std::pair<const char*, Loss>> situations{
        {"fresh sums, a contiguous gradient",
         [](const Tensor& a, const Tensor& b, const auto& op) { return (op(a, b) * 1.0).sum(); }},
        // Over 1,024 elements (x is then [2, 550]), a sum's gradient is one value spread, not a buffer.
        {"a gradient spread from a large sum",
         [](const Tensor& a, const Tensor& b, const auto& op) { return op(a, b).sum(); }},
        {"sums already written, added into",
         [](const Tensor& a, const Tensor& b, const auto& op) {
             const Tensor r = op(a, b);
             const Tensor later = a.sigmoid() * b;  // swept first: a's and b's sums are the sweep's own
             return (r * 1.0 + later).sum();
         }},
        {"a sum that is a gradient handed on as it is",
         [](const Tensor& a, const Tensor& b, const auto& op) {
             const Tensor r = op(a, b);
             const Tensor passed_a = a + 0.0, passed_b = b + 0.0;  // hand a and b their gradients as they are
             return (r * 1.0 + passed_a * 2.0 + passed_b * 3.0).sum();
         }},
        {"one tensor read twice",
         [](const Tensor& a, const Tensor&, const auto& op) { return (op(a, a) * 1.0).sum(); }},
        {"an operand that needs no gradient",
         [](const Tensor& a, const Tensor&, const auto& op) {
             const Tensor c = full_like(a, 1.25);
             const Tensor r0 = op(a, c);
             const Tensor r1 = op(c, a);
             return (r0 * 1.0 + r1 * 2.0).sum();
         }},
        // Where a formula would read a broadcast or non-contiguous operand, or an input is broadcast,
        // the entry takes its backward function's route.
        {"an operand broadcast",
         [](const Tensor& a, const Tensor& b, const auto& op) {
             const Tensor row = b.select(0, 1);
             return (op(a, row) * 1.0 + op(row, a) * 2.0).sum();
         }},
        // Over 1,024 elements, the gradient reaching a broadcast operand's add or sub is one value
        // spread: summed to the operand's shape from a tensor that is not contiguous.
        {"a gradient spread from a large sum to an operand broadcast",
         [](const Tensor& a, const Tensor& b, const auto& op) {
             const Tensor row = b.select(0, 1);
             return op(a, row).sum() + op(row, a).sum() * 2.0;
         }},
        {"operands not contiguous",
         [](const Tensor& a, const Tensor& b, const auto& op) { return (op(a.t(), b.t()) * 1.0).sum(); }}};
    const auto routes_agree = [](const std::string& what, const Tensor& x0,
                                 const std::function<Tensor(const Tensor&)>& loss) {
        INFO(what, " ", x0.dtype());
        const auto gradient = [&] {
            const Tensor x = x0.clone().requires_grad_();
            return grad({loss(x)}, {x})[0];
        };
        const Tensor by_formula = gradient();
        Tensor by_function_in_place, by_function_returned;
        {
            autograd::Profiler profiler;
            by_function_in_place = gradient();
        }
        {
            const autograd::DetectAnomalyGuard anomaly;
            by_function_returned = gradient();
        }
        CHECK(testing::close_tensors(by_formula, by_function_in_place, 0));
        CHECK(testing::close_tensors(by_formula, by_function_returned, 0));
        const auto fn = [&](const std::vector<Tensor>& in) { return loss(in[0]); };
        if (x0.dtype() == kFloat64) check_ok(gradcheck(fn, {x0.clone().requires_grad_()}), what.c_str());
    };
    for (const DType dtype : {kFloat32, kFloat64}) {
        for (const auto& [situation, loss] : situations) {
            const bool wide = std::string(situation).find("large") != std::string::npos;
            const Tensor x0 = random({2, wide ? 550 : 5}, 21).to(dtype);
            const auto inputs = [](const Tensor& x) { return std::pair{x * 0.5 + 1.5, x * x + 1.0}; };
            for (const auto& [name, op] : formula_binary_ops)
                routes_agree(std::string(name) + ", " + situation, x0, [&, op = op, loss = loss](const Tensor& x) {
                    const auto [a, b] = inputs(x);
                    return loss(a, b, [&](const Tensor& u, const Tensor& v) { return op(u, v); });
                });
            for (const auto& [name, op, formula_entries] : formula_unary_ops)
                routes_agree(std::string(name) + ", " + situation, x0, [&, op = op, loss = loss](const Tensor& x) {
                    const auto [a, b] = inputs(x);
                    // The unary op of one operand, then a mul to join the two (the situation's op).
                    return loss(a, b, [&](const Tensor& u, const Tensor& v) {
                        const Tensor r = op(u);
                        return r * v;
                    });
                });
        }
    }
}

TEST_CASE("the sweep runs an element-wise op from its formula where it can, and from its backward function where not")
{
    // The test above shows that the routes agree; this one shows which route each entry took.
    // Each loss is (op(a, b) * 1.0).sum(): only the op's entries can be formula entries (the mul
    // by 1.0 reads a broadcast scalar, and a sum has no formula). `watch` puts a hook on the op's
    // result.
    using Op = std::function<Tensor(const Tensor&, const Tensor&)>;
    const auto formula_entries = [](const Op& op, bool watch = false) {
        const Tensor a = (random({2, 5}, 3) * 0.5 + 1.5).requires_grad_();
        const Tensor b = (random({2, 5}, 4) * 0.5 + 1.5).requires_grad_();
        const Tensor r = op(a, b);
        if (watch) r.register_hook([](const Tensor&) { return Tensor(); });
        const Tensor loss = (r * 1.0).sum();
        const std::uint64_t before = autograd::detail::entries_swept_by_formula();
        grad({loss}, {a, b}, {}, std::nullopt, false, /*allow_unused=*/true);
        return autograd::detail::entries_swept_by_formula() - before;
    };
    // Each op, with the number of formula entries its loss makes.
    std::vector<std::tuple<const char*, Op, std::uint64_t>> ops;
    for (const auto& [name, op] : formula_binary_ops) ops.emplace_back(name, op, 1);
    for (const auto& [name, op, entries] : formula_unary_ops)
        ops.emplace_back(name, [op = op](const Tensor& a, const Tensor&) { return op(a); }, entries);
    for (const auto& [name, op, expected] : ops) {
        INFO(name);
        CHECK(formula_entries(op) == expected);
        // A hook on the result watches its entry, which then runs its backward function.
        CHECK(formula_entries(op, true) == expected - 1);
        {
            const autograd::DetectAnomalyGuard anomaly;  // checks each gradient a function returns
            CHECK(formula_entries(op) == 0);
        }
        {
            autograd::Profiler profiler;  // times each backward function
            CHECK(formula_entries(op) == 0);
        }
    }
    // A broadcast operand the formula reads, or a saved operand it reads that is not contiguous:
    // the op's entry takes its backward function's route.
    CHECK(formula_entries([](const Tensor& a, const Tensor& b) { return a * b.select(0, 1); }) == 0);
    // add and sub read no operand: a broadcast one's gradient is summed to its shape, on either
    // side, for a leaf (its node keeps its shape) as for a non-leaf (its entry does).
    CHECK(formula_entries([](const Tensor& a, const Tensor& b) { return a + b.select(0, 1); }) == 1);
    CHECK(formula_entries([](const Tensor& a, const Tensor& b) { return b.select(0, 1) - a; }) == 1);
    const Tensor bias = tensor({0.5, -1.0, 2.0, 0.25, 1.5}, kFloat64).requires_grad_();
    CHECK(formula_entries([&](const Tensor& a, const Tensor&) { return a - bias; }) == 1);
    CHECK(formula_entries([&](const Tensor& a, const Tensor&) { return bias + a; }) == 1);
    // The leaf's gradient so summed is the backward function's, to the last bit (a running
    // Profiler sends every entry there), and agrees with central differences.
    const auto with_bias = [](const Tensor& a, const Tensor& b) { return ((a - b) * a + (b + a).sigmoid()).sum(); };
    const auto bias_gradient = [&] { return grad({with_bias(random({2, 5}, 3), bias)}, {bias})[0]; };
    const Tensor by_formula = bias_gradient();
    Tensor by_function;
    {
        autograd::Profiler profiler;
        by_function = bias_gradient();
    }
    CHECK(testing::close_tensors(by_formula, by_function, 0));
    check_ok(gradcheck([&](const std::vector<Tensor>& in) { return with_bias(in[0], in[1]); },
                       {random({2, 5}, 5).requires_grad_(), bias.detach().clone().requires_grad_()}),
             "a - bias, bias + a");
    CHECK(formula_entries([](const Tensor& a, const Tensor& b) { return a.t() * b.t(); }) == 0);
    CHECK(formula_entries([](const Tensor& a, const Tensor&) { return a.t().log(); }) == 0);
    // add's formula reads no saved value: a transposed operand does not matter to it.
    CHECK(formula_entries([](const Tensor& a, const Tensor& b) { return a.t() + b.t(); }) == 1);
}

TEST_CASE("an incoming gradient no one else holds becomes its input's gradient, one that is held stays as it was")
{
    // y = x * 1.5 then n unary ops: each hands the gradient it received on to its input, written
    // over in place, so a longer chain asks for no more gradient bytes.
    const Tensor x = tensor({0.3, -1.2, 2.0, 0.7}, kFloat64).requires_grad_();
    const auto backward_bytes = [&](int n) {
        Tensor y = x * 1.5;
        for (int i = 0; i < n; ++i) y = i % 2 ? y.tanh() : y.sigmoid();
        const Tensor loss = (y * 1.0).sum();
        const std::uint64_t before = storage_bytes_requested();
        const Tensor dx = grad({loss}, {x})[0];
        return storage_bytes_requested() - before;
    };
    const std::uint64_t short_chain = backward_bytes(2);
    CHECK(backward_bytes(12) == short_chain);

    // The same values as the gradients returned one by one (anomaly mode takes that route).
    const auto gradient = [&] {
        Tensor h = x * 1.5;
        Tensor y = h.sigmoid().exp().tanh().log().pow(2.0) * h;
        return grad({y.sum()}, {x})[0];
    };
    const Tensor handed_over = gradient();
    Tensor returned;
    {
        const autograd::DetectAnomalyGuard anomaly;
        returned = gradient();
    }
    CHECK(testing::close_tensors(handed_over, returned, 0));

    // A gradient a hook holds, or one retained, is never written over by the op below it.
    Tensor h = x * 1.5;
    Tensor s = h.sigmoid();
    s.retain_grad();
    Tensor t = s.tanh();
    Tensor held;
    t.register_hook([&](const Tensor& g) {
        held = g;
        return Tensor();
    });
    const Tensor c = tensor({1.0, 2.0, 3.0, 4.0}, kFloat64);
    (t.exp() * c).sum().backward();
    const NoGradGuard no_grad;
    CHECK(close(held, values(t.exp() * c), 1e-15));
    CHECK(close(s.grad(), values(t.exp() * c * (1.0 - t * t)), 1e-15));
}

TEST_CASE("a backward refused for a saved tensor modified in place leaves the entry whole")
{
    on_fresh_tape([] {
        Tensor x = tensor({0.5, -1.0}, kFloat64).requires_grad_();
        Tensor h = x.tanh();
        Tensor y = (h * x.exp()).sum();  // mul saves both its inputs
        {
            NoGradGuard no_grad;
            h.mul_(2.0);
        }
        // Refused the same way twice: the first refusal lent nothing away.
        check_error([&] { y.backward(); }, {"mul", "modified in place"});
        check_error([&] { y.backward(); }, {"mul", "modified in place"});
    });
}

TEST_CASE("the tape is kept while an entry a backward did not reach is alive")
{
    on_fresh_tape([] {
        Tensor x = tensor({1.0, 2.0}, kFloat64).requires_grad_();
        Tensor side = x.exp();  // not part of the loss
        Tensor loss = (x * x).sum();
        loss.backward();
        CHECK(autograd::tape_size() >= 1);
        side.sum().backward();
        CHECK(autograd::tape_size() == 0);
        CHECK(close(x.grad(), values(x * 2.0 + x.exp()), 1e-12));
    });
}

TEST_CASE("an op refused while recording leaves the tape as it was")
{
    Tensor x = tensor({1.0, 2.0}, kFloat64).requires_grad_();
    Tensor other;
    std::thread([&] { other = x * 2.0; }).join();  // recorded on another thread's tape
    const std::size_t before = autograd::tape_size();
    check_error([&] { (void)(other + x); }, {"add", "another thread"});
    CHECK(autograd::tape_size() == before);
    Tensor fine = x * 3.0;
    fine.sum().backward();
    CHECK(close(x.grad(), {3.0, 3.0}, 1e-12));
}

TEST_CASE("the tape holds a leaf its entries read while one of them may still be swept, and not after")
{
    on_fresh_tape([] {
        // A leaf the user dropped before backward: the sweep still reaches it (its hook runs,
        // after the tape was emptied) through the tape's hold; ASan checks nothing freed is read.
        bool hooked = false;
        Tensor loss;
        std::weak_ptr<autograd::Node> dropped;
        {
            const Tensor leaf = tensor({1.0, 2.0, 3.0}, kFloat64).requires_grad_();
            leaf.register_hook([&hooked](const Tensor& g) {
                hooked = true;
                CHECK(close(g, {2, 2, 2}, 0));
                return Tensor();
            });
            dropped = leaf.impl().node;
            loss = (leaf * 2.0).sum();
        }
        CHECK_FALSE(dropped.expired());  // the tape holds it for the entry that reads it
        loss.backward();
        CHECK(hooked);
        CHECK(dropped.expired());  // the tape is empty: nothing holds it any more
        // So again and again, read by an op that saves nothing (the product above saved the leaf
        // itself): a new leaf's node often takes a freed one's address, which the tape must not
        // take for one it still holds.
        for (int round = 0; round < 20; ++round) {
            {
                const Tensor leaf = tensor({1.0, 2.0}, kFloat64).requires_grad_();
                dropped = leaf.impl().node;
                loss = (leaf + 1.0).sum();
            }
            REQUIRE_FALSE(dropped.expired());
            loss.backward();
            REQUIRE(dropped.expired());
        }
        // Read by entries no one can sweep any more (an evaluation loop that never calls
        // backward), a leaf is let go at the next compaction; one still read there is kept.
        const Tensor kept = tensor({0.5}, kFloat64).requires_grad_();
        const Tensor y = kept * 3.0;
        {
            const Tensor leaf = tensor({1.0}, kFloat64).requires_grad_();
            dropped = leaf.impl().node;
            for (int i = 0; i < 3000; ++i) (void)(leaf * 2.0);
        }
        const Tensor other = tensor({1.0}, kFloat64).requires_grad_();
        for (int i = 0; i < 3000; ++i) (void)(other * 2.0);
        CHECK(dropped.expired());
        CHECK(autograd::tape_size() < 3000);
        y.backward();
        CHECK(close(kept.grad(), {3}, 0));
    });
}
