// Tensors: creation, dtypes, views sharing storage, copies, printing, random numbers.
#include "helpers.hpp"

#include <array>
#include <span>
#include <sstream>

using namespace loom;
using testing::close;
using testing::values;

TEST_CASE("creation functions fill shapes and dtypes")
{
    CHECK(zeros({2, 3}).sizes() == Shape{2, 3});
    CHECK(zeros({2, 3}).dtype() == kFloat32);
    CHECK(close(zeros({2, 2}, kFloat64), {0, 0, 0, 0}));
    CHECK(close(ones({3}, kInt64), {1, 1, 1}));
    CHECK(close(full({2}, 2.5), {2.5, 2.5}));
    CHECK(close(arange(4), {0, 1, 2, 3}));
    CHECK(close(arange(1, 2, 0.25, kFloat64), {1, 1.25, 1.5, 1.75}));
    CHECK(close(eye(2), {1, 0, 0, 1}));
    CHECK(close(tensor({1, 2, 3, 4}, {2, 2}, kFloat64), {1, 2, 3, 4}));
    CHECK(from_vector<std::int64_t>({1, 2}, {2}).dtype() == kInt64);
    CHECK(scalar_tensor(3).dim() == 0);
    CHECK(scalar_tensor(3).item<double>() == 3);
    CHECK(zeros({0, 3}).numel() == 0);
}

TEST_CASE("a shape computed at run time is taken from a std::vector, std::array or std::span, as libtorch takes it")
{
    const std::vector<std::int64_t> v{2, 3};
    const std::array<std::int64_t, 2> a{3, 2};
    const std::vector<int> narrow_ints{6};
    CHECK(randn(v).sizes() == Shape{2, 3});
    CHECK(zeros(a, kFloat64).sizes() == Shape{3, 2});
    CHECK(ones(std::span<const std::int64_t>(v)).sizes() == Shape{2, 3});
    CHECK(randn(v).reshape(narrow_ints).sizes() == Shape{6});
    CHECK(randn(v).permute(std::vector<std::int64_t>{1, 0}).sizes() == Shape{3, 2});
    CHECK(randn(v).sum(std::vector<std::int64_t>{1}).sizes() == Shape{2});
    CHECK(full(Shape(v), 1.5).sizes() == Shape{2, 3});
}

TEST_CASE("seeded random numbers are reproducible and have the right moments")
{
    manual_seed(7);
    const auto a = values(randn({1000}, kFloat64));
    manual_seed(7);
    const auto b = values(randn({1000}, kFloat64));
    CHECK(a == b);
    Generator g1(3), g2(3);
    CHECK(values(rand({5}, kFloat32, &g1)) == values(rand({5}, kFloat32, &g2)));

    Generator gen(11);
    const Tensor n = randn({20000}, kFloat64, &gen);
    CHECK(std::abs(n.mean().item<double>()) < 0.03);
    CHECK(std::abs(n.var().item<double>() - 1) < 0.05);
    const Tensor u = uniform({20000}, -2, 4, kFloat64, &gen);
    CHECK(u.min().item<double>() >= -2);
    CHECK(u.max().item<double>() < 4);
    CHECK(std::abs(u.mean().item<double>() - 1) < 0.05);
    const Tensor r = randint(0, 5, {1000}, &gen);
    CHECK(r.dtype() == kInt64);
    CHECK(r.min().item<std::int64_t>() == 0);
    CHECK(r.max().item<std::int64_t>() == 4);
}

TEST_CASE("views share storage with their base")
{
    Tensor base = arange(12, kFloat64).reshape({3, 4});
    Tensor row = base.select(0, 1);
    Tensor col = base.select(1, 2);
    Tensor tr = base.t();
    CHECK(row.shares_storage(base));
    CHECK(close(row, {4, 5, 6, 7}));
    CHECK(close(col, {2, 6, 10}));
    CHECK(tr.sizes() == Shape{4, 3});
    CHECK(!tr.is_contiguous());
    CHECK(close(tr, {0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11}));

    row.fill_(-1);  // a write through a view shows in the base
    CHECK(close(base.select(0, 1), {-1, -1, -1, -1}));

    CHECK(close(base.narrow(1, 1, 2), {1, 2, -1, -1, 9, 10}));
    CHECK(close(base.slice(1, 0, 4, 2), {0, 2, -1, -1, 8, 10}));
    CHECK(close(base.slice(0, -1, 3), {8, 9, 10, 11}));
    CHECK(base.unsqueeze(0).sizes() == Shape{1, 3, 4});
    CHECK(base.unsqueeze(-1).sizes() == Shape{3, 4, 1});
    CHECK(ones({1, 3, 1}).squeeze().sizes() == Shape{3});
    CHECK(ones({1, 3, 1}).squeeze(0).sizes() == Shape{3, 1});
    CHECK(ones({3, 1, 2}).permute({2, 0, 1}).sizes() == Shape{2, 3, 1});
    CHECK(arange(3).reshape({3, 1}).expand({3, 2}).strides()[1] == 0);
    CHECK(close(arange(3).expand({2, 3}), {0, 1, 2, 0, 1, 2}));
    CHECK(arange(6).view({2, -1}).sizes() == Shape{2, 3});
    CHECK(arange(6).reshape({-1}).sizes() == Shape{6});
}

namespace {
// Row-major without gaps, by definition: the k-th element in row-major order lies k elements
// after the first. Walks every index, independently of how the header keeps the answer.
bool laid_out_in_order(const Tensor& t)
{
    const Shape& size = t.sizes();
    const Shape& stride = t.strides();
    if (t.numel() == 0) return true;
    Shape index(size.size(), 0);
    for (std::int64_t k = 0; k < t.numel(); ++k) {
        std::int64_t offset = 0;
        for (std::size_t d = 0; d < size.size(); ++d) offset += index[d] * stride[d];
        if (offset != k) return false;
        for (std::size_t d = size.size(); d-- > 0;)
            if (++index[d] < size[d]) break;
            else index[d] = 0;
    }
    return true;
}
}  // namespace

TEST_CASE("is_contiguous, kept in the header, agrees with the layout after every kind of view")
{
    const Tensor base = arange(24, kFloat64).reshape({2, 3, 4});
    const std::vector<std::pair<std::string, Tensor>> views = {
        {"base", base},
        {"select 0", base.select(0, 1)},
        {"select 2", base.select(2, 1)},
        {"narrow 0", base.narrow(0, 1, 1)},
        {"narrow 2", base.narrow(2, 1, 2)},
        {"slice step", base.slice(1, 0, 3, 2)},
        {"permute", base.permute({2, 0, 1})},
        {"permute back", base.permute({2, 0, 1}).permute({1, 2, 0})},
        {"transpose", base.transpose(0, 1)},
        {"t", base.select(0, 0).t()},
        {"unsqueeze", base.unsqueeze(1)},
        {"squeeze", base.narrow(0, 0, 1).squeeze()},
        {"expand", arange(3, kFloat64).reshape({3, 1}).expand({3, 2})},
        {"expand size 1", arange(3, kFloat64).reshape({1, 3}).expand({1, 3})},
        {"view", base.view({6, 4})},
        {"reshape of transpose", base.transpose(1, 2).reshape({8, 3})},
        {"size-1 dim any stride", base.select(2, 0).unsqueeze(0).transpose(0, 1)},
        {"empty", zeros({0, 3}).t()},
        {"scalar", base.select(0, 1).select(0, 2).select(0, 3)},
        {"detach", base.transpose(0, 2).detach()},
        {"contiguous", base.transpose(0, 2).contiguous()},
    };
    for (const auto& [name, v] : views) {
        CAPTURE(name);
        CHECK(v.is_contiguous() == laid_out_in_order(v));
    }
    CHECK_FALSE(base.transpose(0, 1).is_contiguous());  // the reference itself tells the two apart
    CHECK(base.select(0, 1).is_contiguous());
}

TEST_CASE("a view's strides read as PyTorch gives them, and a header stores them only where they are not row-major")
{
    const Tensor base = arange(24, kFloat64).reshape({2, 3, 4});
    // Row-major without gaps, though its size-1 dim's stride is not the row-major one.
    const Tensor odd_stride = arange(4, kFloat64).reshape({1, 4}).t();
    struct Case {
        std::string name;
        Tensor view;
        Shape strides;
    };
    const std::vector<Case> cases = {
        {"base", base, {12, 4, 1}},
        {"select 0", base.select(0, 1), {4, 1}},
        {"select 2", base.select(2, 1), {12, 4}},
        {"narrow 2", base.narrow(2, 1, 2), {12, 4, 1}},
        {"slice step", base.slice(1, 0, 3, 2), {12, 8, 1}},
        {"transpose", base.transpose(0, 1), {4, 12, 1}},
        {"permute", base.permute({2, 0, 1}), {1, 12, 4}},
        {"unsqueeze", base.unsqueeze(1), {12, 12, 4, 1}},
        {"expand", arange(3, kFloat64).reshape({3, 1}).expand({3, 2}), {1, 0}},
        {"size-1 dim any stride", base.select(2, 0).unsqueeze(0).transpose(0, 1), {12, 24, 4}},
        {"contiguous with an odd stride", odd_stride, {1, 4}},
        {"view", base.view({6, 4}), {4, 1}},
        {"scalar", base.select(0, 1).select(0, 2).select(0, 3), {}},
        {"empty", zeros({0, 3}), {3, 1}},
    };
    for (const auto& [name, v, strides] : cases) {
        CAPTURE(name);
        CHECK(v.strides() == strides);
        for (std::int64_t d = 0; d < v.dim(); ++d) {
            CHECK(v.stride(d) == strides[static_cast<std::size_t>(d)]);
            CHECK(v.stride(d - v.dim()) == strides[static_cast<std::size_t>(d)]);
        }
        CHECK((v.impl().stored_strides == nullptr) == (strides == contiguous_strides(v.sizes())));
    }
    CHECK(odd_stride.is_contiguous());  // read as PyTorch reads it
    CHECK_THROWS_AS(base.stride(3), Error);

    // Laid out again as row-major, a header drops the strides it stored.
    Tensor t = zeros({2, 3});
    t.impl().set_layout({3, 2}, {1, 3});
    CHECK(t.strides() == Shape{1, 3});
    CHECK_FALSE(t.is_contiguous());
    t.impl().set_layout({2, 3}, {3, 1});
    CHECK(t.impl().stored_strides == nullptr);
    CHECK(t.is_contiguous());
    CHECK(t.strides() == Shape{3, 1});
}

TEST_CASE("a small tensor's bytes, kept in its header's block, start 16-byte aligned for every size and dtype")
{
    for (const DType dtype : {kFloat32, kFloat64, kInt64, kBool})
        for (std::int64_t n = 0; n <= 80; ++n) {
            CAPTURE(dtype);
            CAPTURE(n);
            const Tensor t = full({n}, 1.0, dtype);
            CHECK(reinterpret_cast<std::uintptr_t>(t.impl().storage->data) % 16 == 0);
            CHECK(t.impl().storage->nbytes == static_cast<std::size_t>(n) * dtype_size(dtype));
            CHECK(t.sum().item<double>() == static_cast<double>(n));
        }
}

TEST_CASE("contiguous, clone and to copy only when they must")
{
    Tensor a = arange(6, kFloat64).reshape({2, 3});
    CHECK(a.contiguous().is_same(a));
    Tensor t = a.t();
    Tensor c = t.contiguous();
    CHECK(c.is_contiguous());
    CHECK(!c.shares_storage(a));
    CHECK(close(c, {0, 3, 1, 4, 2, 5}));
    CHECK(!a.clone().shares_storage(a));
    CHECK(a.to(kFloat64).is_same(a));
    CHECK(a.to(kFloat32).dtype() == kFloat32);
    CHECK(close(tensor({1.7, -1.7}).to(kInt64), {1, -1}));
    CHECK(close(tensor({0, 2}).to(kBool), {0, 1}));
    CHECK(t.reshape({6}).sizes() == Shape{6});  // reshape of a non-contiguous view copies
    CHECK(close(t.reshape({6}), {0, 3, 1, 4, 2, 5}));
}

TEST_CASE("in-place writes bump the version counter")
{
    Tensor a = zeros({3});
    const auto v0 = a.version();
    a.add_(ones({3}));
    a.mul_(2.0);
    CHECK(a.version() == v0 + 2);
    CHECK(close(a, {2, 2, 2}));
    a.add_(ones({3}), -0.5);
    CHECK(close(a, {1.5, 1.5, 1.5}));
    a.masked_fill_(tensor({1, 0, 1}).to(kBool), 9);
    CHECK(close(a, {9, 1.5, 9}));
    a.copy_(tensor({1, 2, 3}, kFloat64));  // converts dtype
    CHECK(close(a, {1, 2, 3}));
    a.zero_();
    CHECK(close(a, {0, 0, 0}));
}

TEST_CASE("item and data_ptr check the element type")
{
    Tensor a = tensor({2.5}, kFloat64);
    CHECK(a.item<double>() == 2.5);
    CHECK(a.item<float>() == 2.5f);
    CHECK(*a.data_ptr<double>() == 2.5);
    CHECK_THROWS_AS(a.data_ptr<float>(), Error);
}

TEST_CASE("printing looks like PyTorch's repr")
{
    CHECK(tensor({1, 2.5, -3}, {3}).to_string() == "tensor([ 1.0000,  2.5000, -3.0000], shape=[3], dtype=float32)");
    CHECK(tensor({1, 2, 3, 4}, {2, 2}, kInt64).to_string() == "tensor([[1, 2],\n        [3, 4]], shape=[2, 2], dtype=int64)");
    CHECK(fmt::format("{}", scalar_tensor(0.5, kFloat64)) == "tensor(0.5000, shape=[], dtype=float64)");
    CHECK(tensor({1e-6, 1}).to_string().find("e-06") != std::string::npos);
    CHECK(tensor({1, 0}).to(kBool).to_string() == "tensor([ True, False], shape=[2], dtype=bool)");
    const std::string big = arange(5000).reshape({50, 100}).to_string();
    CHECK(big.find("...") != std::string::npos);
    CHECK(big.size() < 2000);  // abridged
    CHECK(big.find("4999.0000") != std::string::npos);
    std::ostringstream stream;
    stream << tensor({1, 2}, kInt64);
    CHECK(stream.str() == "tensor([1, 2], shape=[2], dtype=int64)");
    CHECK(ones({2}).requires_grad_().to_string().find("requires_grad=true") != std::string::npos);
}
