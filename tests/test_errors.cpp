// Misuse throws loom::Error naming the op, the shapes or dtypes, and what was expected.
#include "helpers.hpp"

using namespace loom;
using testing::check_error;

TEST_CASE("loom::Error is a std::exception")
{
    try {
        (void)(ones({2}) + ones({3}));
        FAIL("no throw");
    } catch (const std::exception& e) {
        CHECK(std::string(e.what()).find("add") == 0);
    }
}

TEST_CASE("shapes that do not broadcast")
{
    check_error([] { (void)(ones({2, 3}) + ones({4})); }, {"add", "[2, 3]", "[4]", "do not broadcast"});
    check_error([] { (void)(ones({2}) * ones({3})); }, {"mul", "[2]", "[3]"});
    check_error([] { (void)where(ones({2}).to(kBool), ones({3}), ones({3})); }, {"where", "[2]", "[3]"});
    check_error([] { (void)ones({3}).expand({2, 4}); }, {"expand", "[3]", "[2, 4]"});
    check_error([] { (void)sum_to(ones({2, 3}), {4}); }, {"sum_to", "[4]", "[2, 3]", "do not broadcast"});
    check_error([] { (void)sum_to(ones({3}), {2, 3}); }, {"sum_to", "shape [2, 3] does not broadcast to the input's shape [3]"});
    check_error([] { (void)ones({3}).masked_fill(ones({2, 3}).to(kBool), 0); }, {"masked_fill", "[2, 3]", "[3]"});
    check_error([] { ones({2}).copy_(ones({3})); }, {"copy_", "[3]", "[2]"});
}

TEST_CASE("linear with mismatched shapes or dtypes")
{
    const Tensor x = ones({2, 3}), w = ones({4, 3});
    check_error([&] { (void)linear(x, ones({3})); }, {"linear", "weight [out_features, in_features]", "[3]"});
    check_error([&] { (void)linear(ones({2, 5}), w); }, {"linear", "input [..., 3]", "[2, 5]"});
    check_error([&] { (void)linear(x, w, ones({3})); }, {"linear", "bias [4]", "[3]"});
    check_error([&] { (void)linear(x, w, ones({4}, kFloat64)); }, {"linear", "float32", "float64"});
    check_error([&] { (void)linear(ones({2, 3}, kInt64), ones({4, 3}, kInt64)); }, {"linear", "int64"});
}

TEST_CASE("masked_softmax with a bad mask or dim")
{
    const Tensor x = ones({2, 3});
    check_error([&] { (void)masked_softmax(x, ones({2, 3}), 1); }, {"masked_softmax", "bool mask", "float32"});
    check_error([&] { (void)masked_softmax(x, gt(ones({3, 3}), zeros({1})), 1); },
                {"masked_softmax", "[3, 3]", "[2, 3]"});
    check_error([&] { (void)masked_softmax(x, gt(ones({3}), zeros({1})), 2); }, {"masked_softmax", "dim"});
    check_error([&] { (void)masked_softmax(ones({2}, kInt64), gt(ones({2}), zeros({1})), 0); }, {"masked_softmax"});
}

TEST_CASE("matmul inner sizes that differ")
{
    check_error([] { (void)matmul(ones({2, 3}), ones({4, 5})); }, {"matmul", "[2, 3]", "[4, 5]", "3 vs 4"});
    check_error([] { (void)matmul(ones({3}), ones({2})); }, {"matmul", "inner sizes"});
    check_error([] { (void)matmul(ones({2, 2, 3}), ones({3, 3, 2})); }, {"matmul", "do not broadcast"});
    check_error([] { (void)matmul(ones({2, 2}, kInt64), ones({2, 2}, kInt64)); }, {"matmul", "int64"});
    check_error([] { (void)matmul(scalar_tensor(1), ones({2})); }, {"matmul", "at least 1 dim"});
}

TEST_CASE("out-of-range axes and indices")
{
    check_error([] { (void)ones({2, 3}).sum({2}); }, {"sum", "dim 2", "2 dims"});
    check_error([] { (void)ones({2, 3}).softmax(-3); }, {"dim -3"});
    check_error([] { (void)ones({2, 3}).select(1, 3); }, {"select", "index 3", "size 3"});
    check_error([] { (void)ones({2, 3}).narrow(0, 1, 2); }, {"narrow", "start 1 and length 2", "size 2"});
    check_error([] { (void)ones({2, 3}).transpose(0, 2); }, {"transpose", "dim 2"});
    check_error([] { (void)ones({2, 3}).permute({0, 0}); }, {"permute", "repeats"});
    check_error([] { (void)ones({2, 3}).index_select(0, from_vector<std::int64_t>({5}, {1})); },
                {"index_select", "index 5", "size 2"});
    check_error([] { (void)ones({2, 3}).gather(1, from_vector<std::int64_t>({0, 3}, {2, 1})); },
                {"gather", "index 3", "size 3"});
    check_error([] { (void)ones({2, 3}).gather(1, ones({2, 1})); }, {"gather", "int64", "float32"});
    check_error([] { (void)one_hot(from_vector<std::int64_t>({3}, {1}), 3); }, {"one_hot", "class 3", "[0, 3)"});
    check_error([] { (void)ones({2}).size(1); }, {"size", "dim 1"});
    check_error([] { (void)concat({ones({2, 3}), ones({2, 4})}, 0); }, {"concat", "[2, 4]", "[2, 3]"});
    check_error([] { (void)stack({ones({2}), ones({3})}); }, {"stack", "[3]", "[2]"});
    check_error([] { (void)ones({0}).max(); }, {"max", "empty"});
}

TEST_CASE("mixing dtypes without to()")
{
    check_error([] { (void)(ones({2}) + ones({2}, kFloat64)); }, {"add", "float32", "float64", ".to()"});
    check_error([] { (void)matmul(ones({2, 2}), ones({2, 2}, kFloat64)); }, {"matmul", "float32", "float64"});
    check_error([] { (void)concat({ones({2}), ones({2}, kInt64)}); }, {"concat", "int64", "float32"});
    check_error([] { (void)exp(ones({2}, kInt64)); }, {"exp", "int64", "float32 or float64"});
    check_error([] { (void)(ones({2}, kBool) + ones({2}, kBool)); }, {"add", "bool"});
    check_error([] { (void)where(ones({2}), ones({2}), ones({2})); }, {"where", "bool condition", "float32"});
    check_error([] { ones({2}, kInt64).requires_grad_(); }, {"requires_grad_", "int64"});
    check_error([] { (void)ones({2}).item<double>(); }, {"item", "[2]"});
}

TEST_CASE("backward misuse")
{
    Tensor x = ones({2, 3}, kFloat64).requires_grad_();
    check_error([&] { (x * 2.0).backward(); }, {"backward", "[2, 3]", "scalar"});
    check_error([&] { (x * 2.0).backward(ones({3}, kFloat64)); }, {"backward", "[3]", "[2, 3]"});
    check_error([] { ones({1}).backward(); }, {"backward", "does not require grad"});
    Tensor y = (x.tanh()).sum();
    y.backward();
    check_error([&] { y.backward(); }, {"released", "retain_graph"});
    check_error([&] { (void)grad({(x * 2.0).sum()}, {ones({1})}); }, {"grad", "input 0", "does not require grad"});
    check_error([&] { (x * 2.0).requires_grad_(false); }, {"requires_grad_", "non-leaf", "detach"});
}

TEST_CASE("reshape to a size that does not match")
{
    check_error([] { (void)ones({2, 3}).reshape({4, 2}); }, {"reshape", "6 elements", "[4, 2]", "8 elements"});
    check_error([] { (void)ones({2, 3}).reshape({-1, 4}); }, {"reshape", "-1", "[-1, 4]"});
    check_error([] { (void)ones({2, 3}).reshape({-1, -1}); }, {"reshape", "only one"});
    check_error([] { (void)ones({2, 3}).t().view({6}); }, {"view", "contiguous", "reshape()"});
    check_error([] { (void)tensor({1, 2, 3}, {2, 2}); }, {"tensor", "3 values", "[2, 2]"});
    check_error([] { (void)zeros({-1}); }, {"zeros", "negative"});
}

TEST_CASE("bad arguments to creation and math")
{
    check_error([] { (void)arange(0, 1, 0); }, {"arange", "step"});
    check_error([] { (void)randint(3, 3, {1}); }, {"randint", "low < high"});
    check_error([] { (void)clamp(ones({1}), 2.0, 1.0); }, {"clamp", "min <= max"});
    check_error([] { (void)ones({2}).split(0); }, {"split", "positive"});
    check_error([] { (void)ones({1}).var(); }, {"var", "at least 2"});
    check_error([] { (void)Tensor().sum(); }, {"undefined tensor"});
    check_error([] { set_num_threads(0); }, {"set_num_threads", "at least 1"});
}
