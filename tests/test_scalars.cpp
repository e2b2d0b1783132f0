// Defect class 3: a scalar an integer (or bool) tensor cannot hold is refused naming the op;
// loom never truncates it.
#include "helpers.hpp"

using namespace loom;
using testing::check_error;
using testing::values;

TEST_CASE("fractional scalars with int64 tensors are refused, whole ones work")
{
    const Tensor i = arange(5, kInt64);
    check_error([&] { (void)(i * 0.5); }, {"mul", "0.5", "int64", ".to(kFloat32)"});
    check_error([&] { (void)(i + 0.9); }, {"add", "0.9"});
    check_error([&] { (void)(i - 0.1); }, {"sub", "0.1"});
    check_error([&] { (void)(2.5 * i); }, {"mul", "2.5"});
    check_error([&] { (void)(i / 2.0); }, {"div", "int64"});  // division is real-valued: floats only
    check_error([&] { (void)(i + 1e19); }, {"add", "1e+19"});
    check_error([&] { (void)(i * NAN); }, {"mul", "nan"});
    check_error([&] { (void)clamp(i, 0.5, 3); }, {"clamp", "0.5"});
    check_error([&] { (void)i.masked_fill(gt(i, scalar_tensor(2, kInt64)), 0.25); }, {"masked_fill", "0.25"});
    check_error([&] { (void)full({2}, 0.5, kInt64); }, {"full", "0.5"});
    check_error([&] { (void)full({2}, 2, kBool); }, {"full", "0 or 1"});
    check_error([&] { Tensor t = zeros({2}, kInt64); t.fill_(1.5); }, {"fill_", "1.5"});
    check_error([&] { Tensor t = zeros({2}, kInt64); t.mul_(0.5); }, {"mul_", "0.5"});
    check_error([&] { Tensor t = zeros({2}, kInt64); t.uniform_(0, 1); }, {"uniform_", "int64"});
    check_error([&] { (void)rand({2}, kInt64); }, {"uniform_", "int64"});
    CHECK(values(i * 2) == std::vector<double>{0, 2, 4, 6, 8});
    CHECK(values(i + 3.0) == std::vector<double>{3, 4, 5, 6, 7});
    CHECK(values(i.to(kFloat32) * 0.5) == std::vector<double>{0, 0.5, 1, 1.5, 2});
}
