// Defect class 11: backward through select, slice, narrow, split and chunk adds each part's
// gradient into one buffer, so a sequence taken step by step costs time linear in its length
// (bench/bench_tape shows the time per step flat from T = 500 to 4000). Here: the gradients are
// exact, and the parts of one input share a single gradient buffer.
#include "helpers.hpp"

using namespace loom;
using testing::close_tensors;
using testing::values;

TEST_CASE("every kind of part gives the exact gradient, summed where parts overlap")
{
    Generator gen(2);
    const Tensor x0 = randn({6, 3, 4}, kFloat64, &gen);
    const Tensor w = randn({6, 3, 4}, kFloat64, &gen);
    Tensor x = x0.clone().requires_grad_();
    Tensor loss = zeros({}, kFloat64);
    for (std::int64_t t = 0; t < 6; ++t) loss = loss + (x.select(0, t) * w.select(0, t)).sum();  // w once
    for (const Tensor& part : x.split(4, 0)) loss = loss + part.sum();                          // + 1
    for (const Tensor& part : x.chunk(3, 2)) loss = loss + (part * 2.0).sum();                  // + 2
    loss = loss + x.narrow(1, 1, 2).sum() + x.slice(0, 0, 6, 2).sum();                         // + 1 at parts
    loss.backward();
    Tensor expected = w + 3.0;
    expected.narrow(1, 1, 2).add_(ones({6, 2, 4}, kFloat64));
    expected.slice(0, 0, 6, 2).add_(ones({3, 3, 4}, kFloat64));
    CHECK(close_tensors(x.grad(), expected, 1e-14));
}

TEST_CASE("a recurrent network over a long sequence taken step by step gradchecks")
{
    Generator gen(4);
    const Tensor x = randn({40, 2, 3}, kFloat64, &gen);
    const auto f = [&](const std::vector<Tensor>& v) {
        Tensor h = zeros({2, 3}, kFloat64);
        for (std::int64_t t = 0; t < 40; ++t) h = tanh(v[0].select(0, t) + matmul(h, v[1]));
        return h;
    };
    const GradcheckResult r = gradcheck(f, {x.clone().requires_grad_(), (randn({3, 3}, kFloat64, &gen) * 0.3).requires_grad_()});
    CHECK_MESSAGE(r.ok, r.report());
}
