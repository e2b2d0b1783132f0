// Looking inside: anomaly mode with scopes, and the tape exported as text and as Graphviz DOT.
#include "helpers.hpp"

#include <cstdio>
#include <sstream>
#include <thread>

using namespace loom;

namespace {

// Runs a shell command and returns what it printed.
std::string run(const std::string& command)
{
    std::string out;
    FILE* pipe = popen(command.c_str(), "r");
    REQUIRE(pipe);
    char buffer[4096];
    while (std::size_t n = fread(buffer, 1, sizeof buffer, pipe)) out.append(buffer, n);
    REQUIRE(pclose(pipe) == 0);
    return out;
}

int count_lines_starting(const std::string& text, const std::string& prefix)
{
    int n = 0;
    std::size_t at = 0;
    while (at < text.size()) {
        const std::size_t end = text.find('\n', at);
        if (text.compare(at, prefix.size(), prefix) == 0) ++n;
        if (end == std::string::npos) break;
        at = end + 1;
    }
    return n;
}

}  // namespace

TEST_CASE("anomaly mode names the op that made the first NaN in forward, with its scope")
{
    const Tensor x = from_vector<double>({1.0, -1.0}, {2}).requires_grad_();
    {
        autograd::DetectAnomalyGuard anomaly;
        autograd::Scope decoder("decoder");
        autograd::Scope step("step 17");
        CHECK(autograd::current_scope() == "decoder/step 17");
        const Tensor y = x * 2.0;
        CHECK_THROWS_WITH_AS(log(y), doctest::Contains("forward of 'log'"), Error);
        CHECK_THROWS_WITH_AS(log(y), doctest::Contains("scope 'decoder/step 17'"), Error);
        CHECK_THROWS_WITH_AS(log(y), doctest::Contains("tape entry #"), Error);
        CHECK_THROWS_WITH_AS(log(y), doctest::Contains("nan at flat index 1"), Error);
        // An op no gradient flows through is checked too.
        CHECK_THROWS_WITH_AS(log(y.detach()), doctest::Contains("not recorded"), Error);
    }
    CHECK(autograd::current_scope().empty());
    // Off again: the NaN passes, as without the guard.
    CHECK(std::isnan(testing::values(log(x))[1]));
}

TEST_CASE("anomaly mode names the op whose backward made the first non-finite gradient")
{
    const Tensor x = from_vector<double>({0.0, 4.0}, {2}).requires_grad_();
    Tensor loss;
    {
        autograd::Scope scope("encoder");
        loss = sqrt(x * 1.0).sum();  // d sqrt(u)/du at u = 0 is inf
    }
    {
        autograd::DetectAnomalyGuard anomaly;
        CHECK_THROWS_WITH_AS(loss.backward({}, true), doctest::Contains("backward of 'sqrt'"), Error);
        CHECK_THROWS_WITH_AS(loss.backward({}, true), doctest::Contains("scope 'encoder'"), Error);
        CHECK_THROWS_WITH_AS(loss.backward({}, true), doctest::Contains("gradient of its input 0"), Error);
    }
    CHECK_FALSE(x.grad().defined());  // a failed backward leaves .grad() untouched
    loss.backward();                  // without the guard it runs, as PyTorch's does
    CHECK(std::isinf(testing::values(x.grad())[0]));
}

TEST_CASE("the tape as text and as DOT, rendered by Graphviz with the right node and edge counts")
{
    nn::LSTMCell cell(3, 4, true, kFloat64);
    const Tensor x = uniform({2, 3}, -1, 1, kFloat64).requires_grad_();
    const nn::State s0 = cell.initial_state(2, kFloat64);
    nn::State s1;
    {
        autograd::Scope scope("step 0");
        s1 = cell(x, s0);
    }
    const Tensor loss = s1[0].sum();
    const auto names = cell.named_parameters();

    const std::string text = autograd::to_text(loss, names);
    CHECK(text.find("weight_hh: leaf [16, 4] float64") != std::string::npos);
    CHECK(text.find("leaf 0") != std::string::npos);  // x, unnamed
    CHECK(text.find(" sum -> [] float64 <- #") != std::string::npos);
    CHECK(text.find("(step 0)") != std::string::npos);

    // Count entries and edges straight from the listing: one line per entry, one edge per input.
    int entries = 0, edges = 0, leaves = 0;
    std::istringstream lines(text);
    for (std::string line; std::getline(lines, line);) {
        if (line.rfind("#", 0) == 0) {
            ++entries;
            const std::string inputs = line.substr(line.find(" <- ") + 4);
            edges += 1 + static_cast<int>(std::count(inputs.begin(), inputs.end(), ','));
        } else {
            ++leaves;
        }
    }
    CHECK(leaves == 5);  // x and the four parameters; the zero state needs no gradient
    CHECK(entries > 5);

    const testing::TempDir dir;
    const std::string dot_path = dir.file("lstm_step.dot");
    std::ofstream(dot_path) << autograd::to_dot(loss, names);
    const std::string plain = run("dot -Tplain " + dot_path);
    CHECK(count_lines_starting(plain, "node ") == entries + leaves);
    CHECK(count_lines_starting(plain, "edge ") == edges);
    run("dot -Tsvg -o " + dir.file("lstm_step.svg") + " " + dot_path);
    CHECK(std::filesystem::file_size(dir.file("lstm_step.svg")) > 1000);

    // A fused layer is one node.
    nn::LSTM lstm(nn::LSTMOptions(3, 4).dtype(kFloat64));
    const Tensor out = lstm(uniform({5, 2, 3}, -1, 1, kFloat64)).output.sum();
    const std::string fused = autograd::to_text(out, lstm.named_parameters());
    CHECK(count_lines_starting(fused, "#") == 2);
    CHECK(fused.find(" LSTM -> [5, 2, 4] float64, [2, 4] float64, [2, 4] float64 <- weight_ih_l0, weight_hh_l0") !=
          std::string::npos);

    loss.backward();
    CHECK_THROWS_WITH_AS(autograd::to_dot(loss), doctest::Contains("released by an earlier backward"), Error);
    CHECK_THROWS_WITH_AS(autograd::to_text(x.detach()), doctest::Contains("does not require grad"), Error);

    // A tensor whose history is on another thread's tape is refused, not drawn from this thread's
    // entry of the same number.
    const Tensor w = ones({2}).requires_grad_();
    Tensor elsewhere;
    std::thread([&] { elsewhere = (w * 2.0).exp(); }).join();  // entries #1 and #2 of that thread's tape
    std::string drawn, refused;
    std::thread([&] {
        const Tensor here = (w + 1.0).tanh();  // entries #1 and #2 of this one's
        drawn = autograd::to_text(here);
        try {
            autograd::to_text(elsewhere);
        } catch (const Error& e) {
            refused = e.what();
        }
    }).join();
    CHECK(drawn.find("tanh") != std::string::npos);
    CHECK(refused.find("not on this thread's tape") != std::string::npos);
}

TEST_CASE("names with control characters or of any length give DOT that Graphviz takes and one text line per entry")
{
    const Tensor w = uniform({3}, -1, 1, kFloat64).requires_grad_();
    const Tensor v = uniform({3}, -1, 1, kFloat64).requires_grad_();
    Tensor y;
    {
        autograd::Scope scope(std::string("a\nscope with a NUL \0 here", 26));
        y = (w * v).sum();
    }
    const std::vector<std::pair<std::string, Tensor>> names{{std::string("line one\nline two\0", 19), w},
                                                            {std::string(20000, 'x'), v}};
    const std::string text = autograd::to_text(y, names);
    CHECK(text.find('\0') == std::string::npos);
    CHECK(text.find("line one\\x0aline two\\x00") != std::string::npos);
    CHECK(text.find("more bytes") != std::string::npos);
    CHECK(std::count(text.begin(), text.end(), '\n') == 4);  // two leaves, two entries
    const std::string dot = autograd::to_dot(y, names);
    CHECK(dot.find('\0') == std::string::npos);
    const testing::TempDir dir;
    std::ofstream(dir.file("names.dot")) << dot;
    const std::string plain = run("dot -Tplain " + dir.file("names.dot"));
    CHECK(count_lines_starting(plain, "node ") == 4);
}

TEST_CASE("a part-of-input op recorded in a Scope keeps both its region and its scope")
{
    const Tensor x = from_vector<double>({1.0, 2.0, 3.0, 4.0}, {4}).requires_grad_();
    Tensor loss;
    {
        autograd::Scope scope("gather");
        loss = (x.select(0, 1) * 2.0 + x.narrow(0, 2, 2).sum()).sum();
    }
    const std::string text = autograd::to_text(loss);
    CHECK(text.find(" select -> [] float64") != std::string::npos);
    CHECK(text.find("(gather)") != std::string::npos);
    loss.backward();
    CHECK(testing::values(x.grad()) == std::vector<double>{0.0, 2.0, 1.0, 1.0});
}

TEST_CASE("a Scope destroyed out of order takes its own name with it")
{
    auto outer = std::make_unique<autograd::Scope>("outer");
    auto inner = std::make_unique<autograd::Scope>("inner");
    CHECK(autograd::current_scope() == "outer/inner");
    outer.reset();
    CHECK(autograd::current_scope() == "inner");
    const Tensor x = uniform({2}, -1, 1, kFloat64).requires_grad_();
    const Tensor y = (x * 2.0).sum();
    CHECK(autograd::to_text(y).find("(inner)") != std::string::npos);
    CHECK(autograd::to_text(y).find("outer") == std::string::npos);
    inner.reset();
    CHECK(autograd::current_scope().empty());
}
