// Defect class 4: Recurrent<Cell> checks every state a cell returns, at every step, and
// honours RecurrentOptions::dtype.
#include "helpers.hpp"

#include "../examples/minimal_gated_unit.hpp"

using namespace loom;
using testing::check_error;

namespace {
// A cell that returns whatever state shape it is told to, from step `from` on.
class BadCell : public nn::Cell {
public:
    BadCell(std::int64_t input, std::int64_t hidden) : nn::Cell(input, hidden)
    {
        proj = register_module("proj", std::make_shared<nn::Dense>(input, hidden));
    }
    nn::State forward(const Tensor& x, const nn::State& s) override
    {
        const Tensor h = tanh((*proj)(x) + s[0]);
        if (++steps <= from) return {h};
        if (mode == "batch 1") return {h.narrow(0, 0, 1)};
        if (mode == "wider") return {concat({h, h.narrow(1, 0, 1)}, 1)};
        if (mode == "float64") return {h.to(kFloat64)};
        if (mode == "two") return {h, h};
        return {h};
    }
    // Its step changes from call to call, which a traced and replayed step cannot: it says so.
    bool replayable() const override { return false; }
    std::shared_ptr<nn::Dense> proj;
    std::string mode;
    int from = 0, steps = 0;
};
}  // namespace

TEST_CASE("a cell that changes the batch, the width, the dtype or the state count is named at that step")
{
    const Tensor x = randn({4, 3, 2});
    const Tensor lengths = from_vector<std::int64_t>({4, 2, 3}, {3});
    for (const std::string mode : {"batch 1", "wider", "float64", "two"}) {
        CAPTURE(mode);
        nn::Recurrent<BadCell> rnn(nn::RecurrentOptions(2, 5).num_layers(2));
        rnn.cell(1).mode = mode;
        rnn.cell(1).from = 2;  // layer 1 goes wrong at its third step
        const std::vector<std::string> expected =
            mode == "two" ? std::vector<std::string>{"Recurrent<BadCell>", "layer 1", "returned 2 state tensor(s)", "step 2"}
                          : std::vector<std::string>{"Recurrent<BadCell>", "layer 1 direction 0", "step 2", "[B, H] = [3, 5]"};
        check_error([&] { (void)rnn(x); }, expected);
        rnn.cell(1).steps = 0;
        check_error([&] { (void)rnn(x, {}, lengths); }, expected);  // with lengths nothing broadcasts it away
    }
}

TEST_CASE("RecurrentOptions::dtype is honoured by Recurrent<Cell>")
{
    nn::Recurrent<MinimalGatedUnit> rnn(nn::RecurrentOptions(2, 3).dtype(kFloat64).bidirectional(true));
    for (const auto& p : rnn.parameters()) CHECK(p.dtype() == kFloat64);
    CHECK(rnn(randn({4, 2, 2}, kFloat64)).output.dtype() == kFloat64);
    check_error([] {
        nn::Recurrent<MinimalGatedUnit> mismatch(nn::RecurrentOptions(2, 3), [](std::int64_t i, std::int64_t h) {
            return std::make_shared<MinimalGatedUnit>(i, h, kFloat64);
        });
    }, {"Recurrent", "float64 parameter", "dtype float32"});
    check_error([] { nn::Recurrent<MinimalGatedUnit>(nn::RecurrentOptions(2, 3).dtype(kInt64)); }, {"Recurrent", "dtype"});
}
