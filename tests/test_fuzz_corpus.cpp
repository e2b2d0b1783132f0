// Replays the tensor-API fuzz corpus (fuzz/corpus/tensor, grown by fuzz/run.sh tensor) and every
// crash reproducer kept beside it: each program must run to its end with values or loom::Errors
// only, under the sanitizers in the sanitized build.
#include "helpers.hpp"

#include "../fuzz/second_order_program.hpp"
#include "../fuzz/tensor_program.hpp"

#include <filesystem>
#include <fstream>

TEST_CASE("every input of the tensor fuzz corpus runs clean")
{
    std::size_t programs = 0;
    for (const auto& entry : std::filesystem::directory_iterator(LOOM_FUZZ_CORPUS)) {
        const std::string bytes = testing::bytes_of(entry.path());
        CAPTURE(entry.path().filename().string());
        loom_fuzz::TensorProgram({reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size()}).run();
        ++programs;
    }
    CHECK(programs > 100);
}

TEST_CASE("every input of the second-order fuzz corpus gives Hessian-vector products equal to finite differences")
{
    std::size_t programs = 0;
    for (const auto& entry : std::filesystem::directory_iterator(LOOM_SECOND_ORDER_CORPUS)) {
        const std::string bytes = testing::bytes_of(entry.path());
        CAPTURE(entry.path().filename().string());
        const auto mismatch =
            loom_fuzz::SecondOrderProgram({reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size()}).run();
        CHECK_MESSAGE(!mismatch, mismatch.value_or(""));
        ++programs;
    }
    CHECK(programs > 100);
}

// What the first runs of the tensor fuzz target found, each fixed, written out as calls.
TEST_CASE("the tensor fuzz target's findings stay fixed")
{
    using namespace loom;
    using testing::check_error;
    using testing::values;
    // Indexing ops on a 0-d tensor read a dim it does not have.
    const Tensor s = scalar_tensor(1.0);
    check_error([&] { (void)s.narrow(0, 0, 1); }, {"narrow", "0-d"});
    check_error([&] { (void)s.select(0, 0); }, {"select", "0-d"});
    check_error([&] { (void)s.slice(-1, 0, 1); }, {"slice", "0-d"});
    check_error([&] { (void)s.split(1); }, {"split", "0-d"});
    check_error([&] { (void)s.size(0); }, {"size", "0-d"});
    CHECK(s.transpose(0, -1).dim() == 0);
    {
        Tensor x = scalar_tensor(2.0, kFloat64).requires_grad_();  // backward of a 0-d sum over dim 0
        x.sum({0}).backward();
        CHECK(x.grad().item<double>() == 1);
    }
    // Shapes with no elements but huge other sizes: strides, contiguity, printing, reductions,
    // slicing and unsqueeze computed products that overflow.
    const Tensor e = zeros({0}).reshape({0}).expand({0}).unsqueeze(1).expand({0, INT64_MAX});
    CHECK(e.numel() == 0);
    CHECK(e.is_contiguous());
    CHECK(e.to_string() == "tensor([], shape=[0, 9223372036854775807], dtype=float32)");
    CHECK(e.unsqueeze(1).unsqueeze(0).numel() == 0);
    CHECK(e.slice(1, 5, INT64_MAX, 2).numel() == 0);
    check_error([&] { (void)zeros({0, 1LL << 62, 4}).sum({0}); }, {"sum", "2^63 - 1 elements"});
    CHECK(zeros({0, 1LL << 62, 4}).sum({1, 2}).sizes() == Shape{0});
    CHECK(empty({0, 1LL << 62, 16}).contiguous().numel() == 0);
    {
        Tensor z = zeros({0, 3});
        z.expand({0, 3}).fill_(1);  // nothing to write, no overlap to compute
    }
    // Printing a tensor of few elements but one huge dim listed every index of that dim.
    CHECK(zeros({0, 1LL << 62}).to_string().find("tensor([]") == 0);
    // float -> int64 of inf, NaN or values beyond int64 was undefined behaviour.
    check_error([] { (void)tensor({INFINITY}).to(kInt64); }, {"convert", "inf", "integer"});
    check_error([] { (void)tensor({1e19}, kFloat64).to(kInt64); }, {"convert", "1e+19"});
    check_error([] { (void)tensor({NAN}).item<std::int64_t>(); }, {"item", "nan"});
    CHECK(values(tensor({-2.7, 3.9}, kFloat64).to(kInt64)) == std::vector<double>{-2, 3});
    CHECK(std::isinf(tensor({1e300}, kFloat64).to(kFloat32).item<float>()));
    // int64 arithmetic wraps on overflow (as PyTorch's) instead of being undefined.
    const Tensor big = from_vector<std::int64_t>({INT64_MAX, INT64_MAX}, {2});
    CHECK((big + 1).select(0, 0).item<std::int64_t>() == INT64_MIN);
    CHECK(big.sum().item<std::int64_t>() == -2);
    CHECK((-from_vector<std::int64_t>({INT64_MIN}, {1})).item<std::int64_t>() == INT64_MIN);
    CHECK((big * 2).select(0, 1).item<std::int64_t>() == -2);
    // chunk and split computed a part size or a position past INT64_MAX.
    CHECK(arange(5).chunk(INT64_MAX).size() == 5);
    CHECK(arange(5).split(INT64_MAX).size() == 1);
}
