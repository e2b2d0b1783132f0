// Defect class 8: views refuse nonsense: negative sizes, in-place writes into elements that share
// memory, and ranges whose arithmetic would overflow.
#include "helpers.hpp"

using namespace loom;
using testing::check_error;
using testing::values;

TEST_CASE("expand refuses negative sizes at once")
{
    check_error([] { (void)ones({1}).expand({-5}); }, {"expand", "-5", "negative"});
    check_error([] { (void)ones({2}).expand({-1, 2}); }, {"expand", "-1"});  // -1 only keeps an existing size
    CHECK(ones({1, 3}).expand({2, -1}).sizes() == Shape{2, 3});
}

TEST_CASE("in-place writes into an expanded view are refused; other views are written")
{
    Tensor base = zeros({1, 3});
    Tensor wide = base.expand({4, 3});
    check_error([&] { wide.fill_(1); }, {"fill_", "share memory", "clone()"});
    check_error([&] { wide.add_(ones({4, 3})); }, {"add_", "share memory"});
    check_error([&] { wide.copy_(ones({4, 3})); }, {"copy_", "share memory"});
    check_error([&] { wide.mul_(2.0); }, {"mul_", "share memory"});
    CHECK(values(base) == std::vector<double>{0, 0, 0});  // nothing was written
    Tensor m = zeros({3, 4});
    m.t().narrow(0, 1, 2).fill_(1);  // transposed and narrowed: no element shared
    m.select(0, 2).slice(0, 0, 4, 2).fill_(5);
    CHECK(values(m) == std::vector<double>{0, 1, 1, 0, 0, 1, 1, 0, 5, 1, 5, 0});
    Tensor col = zeros({4, 1});
    col.expand({4, 1}).fill_(2);  // expanding to the same size shares nothing
    CHECK(values(col) == std::vector<double>{2, 2, 2, 2});
}

TEST_CASE("ranges near INT64_MAX and INT64_MIN compute without overflow")
{
    const Tensor x = arange(4);
    check_error([&] { (void)x.narrow(0, 2, INT64_MAX); }, {"narrow"});
    check_error([&] { (void)x.narrow(0, INT64_MIN, 1); }, {"narrow"});
    CHECK(values(x.slice(0, 1, INT64_MAX, INT64_MAX)) == std::vector<double>{1});
    CHECK(values(x.slice(0, INT64_MIN, INT64_MAX, 3)) == std::vector<double>{0, 3});
    CHECK(x.slice(0, INT64_MAX, INT64_MAX).numel() == 0);
    Generator gen(1);
    const Tensor r = randint(INT64_MIN, INT64_MAX, {1000}, &gen);
    bool negative = false, positive = false;
    for (double v : values(r.to(kFloat64))) (v < 0 ? negative : positive) = true;
    CHECK(negative);
    CHECK(positive);  // the whole range is reached, not a wrapped one
    CHECK(values(randint(INT64_MAX - 1, INT64_MAX, {3}, &gen)) == std::vector<double>(3, double(INT64_MAX - 1)));
}
