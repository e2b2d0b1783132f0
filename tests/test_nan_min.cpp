// Defect class 2: min, amin, min(dim) and argmin propagate NaN as max does, as PyTorch does,
// gradient included.
#include "helpers.hpp"

using namespace loom;
using testing::values;

TEST_CASE("NaN wins every reduction both ways, and argmin/argmax find the first NaN")
{
    const Tensor x = tensor({1, NAN, 3, NAN}, kFloat64);
    CHECK(std::isnan(x.min().item<double>()));
    CHECK(std::isnan(x.max().item<double>()));
    CHECK(std::isnan(amin(x).item<double>()));
    CHECK(x.argmin().item<std::int64_t>() == 1);
    CHECK(x.argmax().item<std::int64_t>() == 1);
    const Tensor m = tensor({5, 2, NAN, 7, 1, 4}, {2, 3}, kFloat32);
    const auto row_min = values(m.min(1));
    CHECK(std::isnan(row_min[0]));
    CHECK(row_min[1] == 1);
    CHECK(values(m.argmin(1)) == std::vector<double>{2, 1});
    CHECK(values(m.argmax(1)) == std::vector<double>{2, 0});
    CHECK(values(tensor({3, 1, 2}).min()) == std::vector<double>{1});  // no NaN: as before
}

TEST_CASE("the gradient of min and max goes to the NaN elements when the result is NaN")
{
    for (bool is_max : {false, true}) {
        Tensor x = tensor({1, NAN, 3, NAN}, kFloat64).requires_grad_();
        (is_max ? x.max() : x.min()).backward();
        CHECK(values(x.grad()) == std::vector<double>{0, 0.5, 0, 0.5});
    }
    Tensor y = tensor({4, 2, 2}, kFloat64).requires_grad_();
    y.min().backward();
    CHECK(values(y.grad()) == std::vector<double>{0, 0.5, 0.5});  // ties share, as before
}
