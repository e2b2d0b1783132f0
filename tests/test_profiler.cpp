// autograd::Profiler: what it times (ops, backward functions, sweeps, scopes, optimizer steps),
// how nested events share time, bytes, its tables and its Trace Event file. Counts and nesting
// are asserted, never durations beyond their signs.
#include "helpers.hpp"

#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>

using namespace loom;
using autograd::Profiler;
using autograd::ProfileRow;
using Kind = Profiler::Event::Kind;
using testing::TempDir;

namespace {

const ProfileRow* row(const std::vector<ProfileRow>& rows, const std::string& name)
{
    for (const auto& r : rows)
        if (r.name == name) return &r;
    return nullptr;
}

std::size_t count(const Profiler& p, Kind kind, const std::string& name)
{
    std::size_t n = 0;
    for (const auto& e : p.events()) n += e.kind == kind && e.name == name;
    return n;
}

// An op of one's own whose forward calls two of loom's ops.
struct Doubled : autograd::Function<Doubled> {
    static constexpr const char* name = "doubled";
    static Tensor forward(autograd::AutogradContext*, const Tensor& x) { return (x + x) * 1.0; }
    static std::vector<Tensor> backward(autograd::AutogradContext*, const std::vector<Tensor>& g) { return {g[0] * 2.0}; }
};

}  // namespace

TEST_CASE("each op's forward and backward are counted once, by name")
{
    const Tensor w = randn({4, 4}, kFloat64).requires_grad_();
    const Tensor x = randn({3, 4}, kFloat64);
    Profiler profiler;
    const Tensor loss = tanh(matmul(x, w) * 2.0).sum();
    loss.backward();
    profiler.stop();
    const auto ops = profiler.by_op();
    for (const char* name : {"matmul", "mul", "tanh", "sum"}) {
        CAPTURE(name);
        const ProfileRow* r = row(ops, name);
        REQUIRE(r != nullptr);
        // mul's and tanh's backward functions call mul and matmul themselves: those are part of
        // the backward's time, not forward calls.
        CHECK(r->calls == 1);
        CHECK(r->backward_calls == 1);
        CHECK(r->forward_ms >= r->self_ms);
        CHECK(r->self_ms >= 0);
        CHECK(r->backward_ms >= 0);
    }
    CHECK(count(profiler, Kind::Sweep, "backward()") == 1);
    // Every backward ran inside the sweep.
    for (const auto& e : profiler.events()) {
        CHECK(e.end_ns >= e.start_ns);
        if (e.kind == Kind::Backward) {
            REQUIRE(e.parent >= 0);
            CHECK(profiler.events()[std::size_t(e.parent)].kind == Kind::Sweep);
        }
    }
    // Sorted by total time, largest first.
    for (std::size_t i = 1; i < ops.size(); ++i) CHECK(ops[i - 1].total_ms() >= ops[i].total_ms());
}

TEST_CASE("an op called inside another is subtracted from the caller's self time")
{
    const Tensor x = randn({5}, kFloat64).requires_grad_();
    Profiler profiler;
    const Tensor y = Doubled::apply(x);
    profiler.stop();
    const auto& events = profiler.events();
    std::int64_t outer = -1;
    for (std::size_t i = 0; i < events.size(); ++i)
        if (events[i].name == "doubled") outer = std::int64_t(i);
    REQUIRE(outer >= 0);
    std::int64_t nested_ns = 0, children = 0;
    for (const auto& e : events)
        if (e.parent == outer) ++children, nested_ns += e.end_ns - e.start_ns;
    CHECK(children == 2);  // add, mul
    const auto ops = profiler.by_op();
    const ProfileRow* r = row(ops, "doubled");
    REQUIRE(r != nullptr);
    const auto& d = events[std::size_t(outer)];
    CHECK(r->forward_ms == doctest::Approx(double(d.end_ns - d.start_ns) * 1e-6));
    CHECK(r->self_ms == doctest::Approx(double(d.end_ns - d.start_ns - nested_ns) * 1e-6));
}

TEST_CASE("bytes allocated are those of the op's own outputs and buffers")
{
    const Tensor a = randn({1000}, kFloat64), b = randn({1000}, kFloat64);
    Profiler profiler;
    const Tensor c = a + b;
    profiler.stop();
    const auto ops = profiler.by_op();
    const ProfileRow* r = row(ops, "add");
    REQUIRE(r != nullptr);
    CHECK(r->bytes >= 8000);
    CHECK(r->bytes < 16000);
}

TEST_CASE("scopes: the ops and backward functions of each, and the scope's own event")
{
    const Tensor w = randn({3}, kFloat64).requires_grad_();
    Profiler profiler;
    Tensor h;
    {
        autograd::Scope encoder("encoder");
        h = w * 3.0;
        {
            autograd::Scope step("step 1");
            h = tanh(h);
        }
    }
    h.sum().backward();
    profiler.stop();
    const auto scopes = profiler.by_scope();
    const ProfileRow* encoder = row(scopes, "encoder");
    const ProfileRow* step = row(scopes, "encoder/step 1");
    const ProfileRow* none = row(scopes, "");
    REQUIRE(encoder != nullptr);
    REQUIRE(step != nullptr);
    REQUIRE(none != nullptr);
    CHECK(encoder->calls == 1);  // mul
    CHECK(encoder->backward_calls == 1);
    CHECK(step->calls == 1);  // tanh
    CHECK(step->backward_calls == 1);  // filed where it was recorded
    CHECK(none->calls == 1);  // sum
    CHECK(count(profiler, Kind::Scope, "encoder") == 1);
    CHECK(count(profiler, Kind::Scope, "step 1") == 1);
    const std::string table = profiler.table();
    CHECK(table.find("encoder/step 1") != std::string::npos);
    CHECK(table.find("(no scope)") != std::string::npos);
}

TEST_CASE("grad(), optimizer steps and the untimed rest")
{
    const Tensor w = randn({3}, kFloat64).requires_grad_();
    optim::SGD sgd({w}, optim::SGDOptions(0.1));
    Profiler profiler;
    const auto g = grad({(w * w).sum()}, {w});
    w.set_grad(g[0]);
    sgd.step();
    profiler.stop();
    CHECK(count(profiler, Kind::Sweep, "grad()") == 1);
    CHECK(count(profiler, Kind::Step, "optimizer step") == 1);
    CHECK(profiler.untimed_ms() >= 0);
    CHECK(profiler.untimed_ms() <= profiler.seconds() * 1e3);
    const std::string table = profiler.table(1);
    CHECK(table.find("more ops)") != std::string::npos);  // mul and sum, one shown
    CHECK(table.find("(sweep bookkeeping)") != std::string::npos);
    CHECK(table.find("(optimizer steps)") != std::string::npos);
    CHECK(table.find("total") != std::string::npos);
}

TEST_CASE("nothing is timed outside a Profiler's life, nor on other threads")
{
    const Tensor x = randn({3}, kFloat64);
    const Tensor before = x * 2.0;
    Profiler profiler;
    std::thread([&] { const Tensor y = exp(x); }).join();
    const Tensor inside = x * 3.0;
    profiler.stop();
    const Tensor after = x * 4.0;
    const auto ops = profiler.by_op();
    REQUIRE(ops.size() == 1);
    CHECK(ops[0].name == "mul");
    CHECK(ops[0].calls == 1);
    profiler.stop();  // again: nothing changes
    CHECK(profiler.by_op().size() == 1);
}

TEST_CASE("nested profilers: the outer one sees the inner one's events too")
{
    const Tensor x = randn({3}, kFloat64);
    Profiler outer;
    const Tensor a = x + x;
    {
        Profiler inner;
        const Tensor b = x * x;
        inner.stop();
        const auto ops = inner.by_op();
        REQUIRE(ops.size() == 1);
        CHECK(ops[0].name == "mul");
    }
    const Tensor c = exp(x);
    outer.stop();
    const auto ops = outer.by_op();
    CHECK(ops.size() == 3);
    CHECK(row(ops, "add") != nullptr);
    CHECK(row(ops, "mul") != nullptr);
    CHECK(row(ops, "exp") != nullptr);
}

TEST_CASE("results are read after stop(), on the thread that made the Profiler")
{
    Profiler profiler;
    testing::check_error([&] { (void)profiler.table(); }, {"Profiler", "after stop()"});
    std::thread([&] { testing::check_error([&] { profiler.stop(); }, {"Profiler", "another thread"}); }).join();
    const Tensor x = randn({3}, kFloat64);
    const Tensor y = exp(x);  // still timed: the failed stop() changed nothing
    profiler.stop();
    REQUIRE(profiler.by_op().size() == 1);
    CHECK(profiler.by_op()[0].calls == 1);
}

TEST_CASE("chrome_trace writes every event as a complete Trace Event")
{
    const Tensor w = randn({2, 2}, kFloat64).requires_grad_();
    Profiler profiler;
    {
        autograd::Scope scope("layer");
        matmul(w, w).sum().backward();
    }
    profiler.stop();
    TempDir dir;
    const std::string path = dir.file("trace.json");
    profiler.chrome_trace(path);
    std::ifstream in(path);
    const nlohmann::json trace = nlohmann::json::parse(in);
    const auto& events = trace.at("traceEvents");
    REQUIRE(events.size() == profiler.events().size());
    std::set<std::string> categories;
    for (std::size_t i = 0; i < events.size(); ++i) {
        const auto& e = events[i];
        CHECK(e.at("ph") == "X");
        CHECK(e.at("name") == profiler.events()[i].name);
        CHECK(e.at("ts").get<double>() >= 0);
        CHECK(e.at("dur").get<double>() >= 0);
        CHECK(e.at("pid") == 1);
        CHECK(e.at("args").contains("bytes"));
        categories.insert(e.at("cat").get<std::string>());
    }
    CHECK(categories == std::set<std::string>{"forward", "backward", "sweep", "scope"});
    testing::check_error([&] { profiler.chrome_trace(dir.file("no/such/folder/trace.json")); },
                         {"chrome_trace", "cannot write"});
}
