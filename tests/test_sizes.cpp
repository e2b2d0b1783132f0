// Defect class 1: sizes whose element count or byte size overflows are refused by name,
// wherever a shape is made; nothing is allocated short or read past its end.
#include "helpers.hpp"

using namespace loom;
using testing::check_error;

TEST_CASE("creation refuses counts and byte sizes beyond int64")
{
    check_error([] { (void)zeros({1LL << 62}); }, {"zeros", "[4611686018427387904]", "bytes"});
    check_error([] { (void)zeros({1LL << 31, 1LL << 31}); }, {"zeros", "float32", "bytes"});
    check_error([] { (void)zeros({1LL << 32, 1LL << 32}); }, {"zeros", "more than 2^63 - 1 elements"});
    check_error([] { (void)ones({1LL << 40, 1LL << 40}, kFloat64); }, {"ones", "elements"});
    check_error([] { (void)empty({3, -2}); }, {"empty", "negative dimension -2"});
    check_error([] { (void)full({1LL << 61}, 1.0, kFloat64); }, {"full", "bytes"});
    check_error([] { (void)arange(0, 1e20); }, {"arange", "1e+20 elements"});
    CHECK(zeros({0, 1LL << 62}).numel() == 0);  // zero elements whatever the other sizes
}

TEST_CASE("views and joins check the shapes they make")
{
    const Tensor one = ones({1});
    check_error([&] { (void)one.expand({1LL << 32, 1LL << 32}); }, {"expand", "elements"});
    check_error([&] { (void)ones({2}).reshape({1LL << 62, 4, -1}); }, {"reshape"});
    check_error([&] { (void)ones({4}).view({1LL << 62, 1LL << 62}); }, {"view", "elements"});
    // A huge expanded view is fine as long as nothing copies it; copying it is refused.
    const Tensor huge = ones({1}, kFloat64).expand({1LL << 61});
    CHECK(huge.numel() == (1LL << 61));
    CHECK(huge.to_string().find("shape=[2305843009213693952]") != std::string::npos);  // prints without copying
    check_error([&] { (void)huge.contiguous(); }, {"bytes"});
    check_error([&] { (void)ones({1}).expand({1LL << 62}).sum(); }, {"bytes"});
    const Tensor big = ones({1}).expand({INT64_MAX});
    check_error([&] { (void)concat({big.unsqueeze(0), big.unsqueeze(0)}, 1); }, {"concat", "exceeds"});
}

TEST_CASE("matrix products too large for BLAS's int sizes are refused")
{
    const Tensor a = ones({1}).expand({1LL << 31, 1}), b = ones({1, 1});
    check_error([&] { (void)matmul(a, b); }, {"matmul"});
}

TEST_CASE("the fused layers refuse T x B beyond BLAS's int sizes before allocating")
{
    nn::LSTM lstm(nn::LSTMOptions(1, 2));
    const Tensor x = ones({1}).expand({1LL << 16, 1LL << 16, 1});  // 2^32 rows, never materialised
    check_error([&] { (void)lstm(x); }, {"LSTM", "T x B", "2^31 - 1"});
}
