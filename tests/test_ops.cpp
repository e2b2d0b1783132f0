// Forward values of the ops: broadcasting, reductions along each axis, joins, indexing, matmul.
#include "helpers.hpp"

#include <loom/core/kernels.hpp>
#include <loom/core/math.hpp>

#include <bit>
#include <climits>
#include <limits>

using namespace loom;
using testing::close;
using testing::values;

TEST_CASE("elementwise ops broadcast like NumPy")
{
    const Tensor a = tensor({1, 2, 3}, {3, 1}, kFloat64);
    const Tensor b = tensor({10, 20}, {2}, kFloat64);
    CHECK((a + b).sizes() == Shape{3, 2});
    CHECK(close(a + b, {11, 21, 12, 22, 13, 23}));
    CHECK(close(a - b, {-9, -19, -8, -18, -7, -17}));
    CHECK(close(a * b, {10, 20, 20, 40, 30, 60}));
    CHECK(close(b / a, {10, 20, 5, 10, 10.0 / 3, 20.0 / 3}));
    CHECK(close(a * 2.0, {2, 4, 6}));
    CHECK(close(2.0 - a, {1, 0, -1}));
    CHECK(close(1.0 / a, {1, 0.5, 1.0 / 3}));
    CHECK(close(-a, {-1, -2, -3}));
    CHECK(close(pow(a, 2.0), {1, 4, 9}));
    CHECK(close(pow(a, tensor({3}, kFloat64)), {1, 8, 27}));
    CHECK(close(tensor({1, 2}, kInt64) + tensor({3, 4}, kInt64), {4, 6}));
    // a strided (transposed) operand
    const Tensor m = arange(6, kFloat64).reshape({2, 3});
    CHECK(close(m.t() + ones({3, 2}, kFloat64), {1, 4, 2, 5, 3, 6}));
}

TEST_CASE("unary math matches the C library")
{
    const Tensor x = tensor({-2, -0.5, 0.5, 2}, kFloat64);
    const auto v = values(x);
    for (auto [name, t, f] : std::vector<std::tuple<const char*, Tensor, double (*)(double)>>{
             {"exp", exp(x), [](double u) { return std::exp(u); }},
             {"tanh", tanh(x), [](double u) { return std::tanh(u); }},
             {"sigmoid", sigmoid(x), [](double u) { return 1 / (1 + std::exp(-u)); }},
             {"softplus", softplus(x), [](double u) { return std::log(1 + std::exp(u)); }},
             {"relu", relu(x), [](double u) { return u > 0 ? u : 0; }},
             {"abs", abs(x), [](double u) { return std::abs(u); }},
             {"sqrt", sqrt(abs(x)), [](double u) { return std::sqrt(std::abs(u)); }},
             {"log", log(abs(x)), [](double u) { return std::log(std::abs(u)); }},
         }) {
        std::vector<double> expected;
        for (double u : v) expected.push_back(f(u));
        CHECK_MESSAGE(close(t, expected, 1e-12), name);
    }
    // softplus where the naive formula overflows or loses the small term.
    CHECK(close(softplus(tensor({800, -800, -40}, kFloat64)), {800, 0, std::exp(-40.0)}, 1e-12));
    CHECK(close(clamp(x, -1.0, 1.0), {-1, -0.5, 0.5, 1}));
    CHECK(close(clamp(x, std::nullopt, 0.0), {-2, -0.5, 0, 0}));
    CHECK(close(maximum(x, zeros({1}, kFloat64)), {0, 0, 0.5, 2}));
    CHECK(close(minimum(x, zeros({1}, kFloat64)), {-2, -0.5, 0, 0}));
    CHECK(close(sigmoid(tensor({-1000, 1000})), {0, 1}));  // no overflow to NaN
}

TEST_CASE("float32 tanh stays within a few ulps of the exact value")
{
    // float32 tanh is a rational approximation (core/math.hpp); float64 is std::tanh.
    const Tensor x = arange(-12, 12, 1e-3, kFloat32);
    const auto got = values(tanh(x)), at = values(x);
    double worst = 0;
    for (std::size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::abs(got[i] - std::tanh(at[i])));
    CHECK(worst < 4e-7);  // about 3 float32 epsilons
    CHECK(tanh(tensor({0.0001})).item<float>() == doctest::Approx(0.0001));
    CHECK(close(tanh(tensor({-30, 30})), {-1, 1}));
}

namespace {
// Floats between a and b, counted on the number line (0 for equal, NaN with NaN).
std::int64_t ulps_apart(float a, float b)
{
    if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b) ? 0 : INT64_MAX;
    if (a == b) return 0;  // also infinities of one sign
    const auto ordered = [](float f) {
        const std::int32_t bits = std::bit_cast<std::int32_t>(f);
        return bits < 0 ? std::int64_t(INT32_MIN) - bits : std::int64_t(bits);
    };
    return std::abs(ordered(a) - ordered(b));
}
}  // namespace

TEST_CASE("float32 exp_float, log_float and log1p_float stay within 2 ulps of libm, special values included")
{
    // Two million points from -106 to 89 for exp (subnormal results included); for log every 1021st bit pattern of a positive
    // float, subnormals included; for log1p a geometric sweep of [1e-30, 1e6]; against glibc.
    std::int64_t worst_exp = 0, worst_log = 0, worst_log1p = 0;
    for (int k = 0; k < 2000000; ++k) {
        const float x = -106.0f + 195.0f * float(k) / 2e6f;
        worst_exp = std::max(worst_exp, ulps_apart(exp_float(x), std::exp(x)));
    }
    for (std::int32_t bits = 1; bits < 0x7f800000 - 1021; bits += 1021) {
        const float x = std::bit_cast<float>(bits);
        worst_log = std::max(worst_log, ulps_apart(log_float(x), std::log(x)));
    }
    for (float u = 1e-30f; u < 1e6f; u *= 1.0001f) worst_log1p = std::max(worst_log1p, ulps_apart(log1p_float(u), std::log1p(u)));
    CHECK(worst_exp <= 2);
    CHECK(worst_log <= 2);
    CHECK(worst_log1p <= 2);
    const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
    CHECK(exp_float(0.0f) == 1.0f);
    CHECK(exp_float(-inf) == 0.0f);
    CHECK(exp_float(inf) == inf);
    CHECK(exp_float(100.0f) == inf);
    CHECK(std::isnan(exp_float(nan)));
    CHECK(log_float(1.0f) == 0.0f);
    CHECK(log_float(0.0f) == -inf);
    CHECK(log_float(inf) == inf);
    CHECK(std::isnan(log_float(-1.0f)));
    CHECK(std::isnan(log_float(nan)));
    CHECK(log1p_float(1e-30f) == 1e-30f);
    // exp, log and softplus in float32 use them; float64 keeps libm.
    CHECK(close(exp(tensor({-1.0f, 0.5f, 80.0f})), {std::exp(-1.0), std::exp(0.5), std::exp(80.0)}, 3e-7));
    CHECK(close(log(tensor({1e-30f, 0.5f, 3e30f})), {std::log(1e-30), std::log(0.5), std::log(3e30)}, 3e-7));
    const Tensor x = arange(-30, 30, 0.01, kFloat32);
    const auto got = values(softplus(x)), at = values(x);
    double worst = 0;
    for (std::size_t i = 0; i < got.size(); ++i)
        worst = std::max(worst, std::abs(got[i] - std::log1p(std::exp(at[i]))) / std::max(1.0, std::log1p(std::exp(at[i]))));
    CHECK(worst < 3e-7);
}

TEST_CASE("comparisons give bool masks; where and masked_fill select")
{
    const Tensor a = tensor({1, 2, 3}, kFloat64), b = tensor({3, 2, 1}, kFloat64);
    CHECK(lt(a, b).dtype() == kBool);
    CHECK(close(lt(a, b), {1, 0, 0}));
    CHECK(close(le(a, b), {1, 1, 0}));
    CHECK(close(gt(a, b), {0, 0, 1}));
    CHECK(close(ge(a, b), {0, 1, 1}));
    CHECK(close(eq(a, b), {0, 1, 0}));
    CHECK(close(ne(a, b), {1, 0, 1}));
    CHECK(close(logical_not(eq(a, b)), {1, 0, 1}));
    CHECK(close(logical_and(le(a, b), ge(a, b)), {0, 1, 0}));
    CHECK(close(logical_or(lt(a, b), gt(a, b)), {1, 0, 1}));
    CHECK(close(where(lt(a, b), a, b), {1, 2, 1}));
    CHECK(close(where(tensor({1, 0}).to(kBool).reshape({2, 1}), a, scalar_tensor(0, kFloat64)), {1, 2, 3, 0, 0, 0}));
    CHECK(close(masked_fill(a, gt(a, b), -1), {1, 2, -1}));
    CHECK(close(lt(a, b).sum(), {1}));
}

TEST_CASE("reductions over all dims and each axis, with keepdim")
{
    const Tensor x = arange(24, kFloat64).reshape({2, 3, 4});
    CHECK(x.sum().item<double>() == 276);
    CHECK(x.sum().dim() == 0);
    CHECK(close(x.sum({0}), values(x.select(0, 0) + x.select(0, 1))));
    CHECK(x.sum({1}).sizes() == Shape{2, 4});
    CHECK(x.sum({1}, true).sizes() == Shape{2, 1, 4});
    CHECK(close(x.sum({-1}), {6, 22, 38, 54, 70, 86}));
    CHECK(close(x.sum({0, 2}), {60, 92, 124}));
    CHECK(close(x.mean({2}), {1.5, 5.5, 9.5, 13.5, 17.5, 21.5}));
    CHECK(close(x.max({1}), {8, 9, 10, 11, 20, 21, 22, 23}));
    CHECK(close(x.min(0), values(x.select(0, 0))));
    CHECK(x.max().item<double>() == 23);
    CHECK(close(x.argmax(2), {3, 3, 3, 3, 3, 3}));
    CHECK(x.argmax().item<std::int64_t>() == 23);
    CHECK(x.argmin(1, true).sizes() == Shape{2, 1, 4});
    CHECK(close(tensor({3, 1, 3}).argmax(), {0}));  // the first of equal maxima
    CHECK(close(tensor({1, 2, 3, 4}, kFloat64).var(), {5.0 / 3}));
    CHECK(close(tensor({1, 2, 3, 4}, kFloat64).var({}, false), {1.25}));
    CHECK(close(x.var({2}), std::vector<double>(6, 5.0 / 3)));
    CHECK(close(tensor({3, 4}, kFloat64).norm(), {5}));
    CHECK(close(tensor({3, -4}, kFloat64).norm(1), {7}));
    CHECK(close(tensor({3, -4}, kFloat64).norm(INFINITY), {4}));
    CHECK(close(tensor({1, 2, 3, 4}, {2, 2}, kFloat64).norm(3, {1}), {std::cbrt(9.0), std::cbrt(91.0)}));
    CHECK(close(tensor({1, 2}, kInt64).sum(), {3}));
    CHECK(tensor({1, 2}, kInt64).sum().dtype() == kInt64);
}

TEST_CASE("softmax and log_softmax are stable for large inputs")
{
    const Tensor x = tensor({1000, 1001, 1002, -1000, 0, 1000}, {2, 3}, kFloat64);
    const Tensor s = x.softmax(1);
    const double z = 1 + std::exp(1.0) + std::exp(2.0);
    CHECK(close(s.select(0, 0), {1 / z, std::exp(1.0) / z, std::exp(2.0) / z}, 1e-12));
    CHECK(close(s.select(1, 2), {std::exp(2.0) / z, 1}, 1e-12));
    CHECK(close(x.log_softmax(1).select(0, 0), {-std::log(z), 1 - std::log(z), 2 - std::log(z)}, 1e-12));
    CHECK(close(x.softmax(0).sum({0}), {1, 1, 1}, 1e-12));
    CHECK(close(tensor({-1e30, 0}).log_softmax(0), {-1e30, 0}));
}

TEST_CASE("masked_softmax leaves masked entries out, even NaN ones, and a fully masked row is zeros")
{
    Tensor x = tensor({1000, 1001, NAN, 3, 2, 1}, {2, 3}, kFloat64);
    x.requires_grad_();
    const Tensor mask = tensor({0, 0, 1, 1, 1, 1}, {2, 3}, kFloat64).gt(zeros({1}, kFloat64));
    const Tensor s = masked_softmax(x, mask, 1);
    const double z = 1 + std::exp(1.0);
    CHECK(close(s, {1 / z, std::exp(1.0) / z, 0, 0, 0, 0}, 1e-12));
    (s * tensor({1, 2, 3, 4, 5, 6}, {2, 3}, kFloat64)).sum().backward();
    const std::vector<double> g = values(x.grad());
    CHECK(g[2] == 0);  // no gradient to a left-out entry, NaN or not
    CHECK(g[3] == 0);
    CHECK(std::abs(g[0] + g[1]) < 1e-12);  // softmax's gradient sums to zero over the row
    // Nothing left out: the same as softmax.
    const Tensor y = tensor({0.5, -1, 2, 0, 1, 3}, {3, 2}, kFloat64);
    CHECK(testing::close_tensors(masked_softmax(y, zeros({1}, kFloat64).gt(ones({1}, kFloat64)), 0), y.softmax(0), 1e-15));
}

TEST_CASE("concat, stack, split, chunk")
{
    const Tensor a = arange(4, kFloat64).reshape({2, 2}), b = arange(4, 6, 1, kFloat64).reshape({1, 2});
    CHECK(close(concat({a, b}, 0), {0, 1, 2, 3, 4, 5}));
    CHECK(close(concat({a, a}, 1), {0, 1, 0, 1, 2, 3, 2, 3}));
    const Tensor s = stack({a, a * 10.0}, 1);
    CHECK(s.sizes() == Shape{2, 2, 2});
    CHECK(close(s, {0, 1, 0, 10, 2, 3, 20, 30}));
    const auto parts = arange(7).split(3);
    REQUIRE(parts.size() == 3);
    CHECK(close(parts[2], {6}));
    const auto chunks = arange(6).reshape({2, 3}).chunk(3, 1);
    REQUIRE(chunks.size() == 3);
    CHECK(close(chunks[1], {1, 4}));
}

TEST_CASE("gather, index_select, one_hot")
{
    const Tensor x = arange(6, kFloat64).reshape({2, 3});
    const Tensor idx = from_vector<std::int64_t>({2, 0, 1, 1}, {2, 2});
    CHECK(close(x.gather(1, idx), {2, 0, 4, 4}));
    CHECK(close(x.gather(0, from_vector<std::int64_t>({1, 0, 1}, {1, 3})), {3, 1, 5}));
    CHECK(close(x.index_select(1, from_vector<std::int64_t>({2, 2, 0}, {3})), {2, 2, 0, 5, 5, 3}));
    CHECK(close(x.index_select(0, from_vector<std::int64_t>({-1}, {1})), {3, 4, 5}));
    const Tensor oh = one_hot(from_vector<std::int64_t>({0, 2}, {2}), 3);
    CHECK(oh.dtype() == kInt64);
    CHECK(close(oh, {1, 0, 0, 0, 0, 1}));
    CHECK(one_hot(from_vector<std::int64_t>({1}, {1}), 2, kFloat32).dtype() == kFloat32);
}

namespace {
// Reference matmul on [n, k] x [k, m] values.
std::vector<double> naive_mm(const Tensor& a, const Tensor& b)
{
    const auto va = values(a), vb = values(b);
    const std::int64_t n = a.size(0), k = a.size(1), m = b.size(1);
    std::vector<double> out(n * m, 0);
    for (std::int64_t i = 0; i < n; ++i)
        for (std::int64_t j = 0; j < m; ++j)
            for (std::int64_t p = 0; p < k; ++p) out[i * m + j] += va[i * k + p] * vb[p * m + j];
    return out;
}
}  // namespace

TEST_CASE("matmul: 1-D, 2-D, batched, broadcast, and strided views")
{
    Generator gen(5);
    for (DType dt : {kFloat32, kFloat64}) {
        const double tol = dt == kFloat32 ? 1e-5 : 1e-12;
        const Tensor a = randn({3, 4}, dt, &gen), b = randn({4, 5}, dt, &gen);
        CHECK(close(matmul(a, b), naive_mm(a, b), tol));
        // transposed views go to BLAS as they are, and give the same values
        const Tensor at = randn({4, 3}, dt, &gen).t(), bt = randn({5, 4}, dt, &gen).t();
        CHECK(close(matmul(at, bt), naive_mm(at.contiguous(), bt.contiguous()), tol));
        // a view that BLAS cannot read (step 2 in both dims) is copied
        const Tensor strided = randn({6, 8}, dt, &gen).slice(0, 0, 6, 2).slice(1, 0, 8, 2);
        CHECK(close(matmul(strided, b), naive_mm(strided.contiguous(), b), tol));
    }
    const Tensor v = tensor({1, 2}, kFloat64), w = tensor({3, 4}, kFloat64);
    CHECK(matmul(v, w).dim() == 0);
    CHECK(close(matmul(v, w), {11}));
    const Tensor m = arange(4, kFloat64).reshape({2, 2});
    CHECK(close(matmul(v, m), {4, 7}));
    CHECK(close(matmul(m, v), {2, 8}));
    // batched with broadcasting batch dims: [2, 1, 2, 3] @ [3, 3, 2] -> [2, 3, 2, 2]
    const Tensor x = randn({2, 1, 2, 3}, kFloat64), y = randn({3, 3, 2}, kFloat64);
    const Tensor z = matmul(x, y);
    CHECK(z.sizes() == Shape{2, 3, 2, 2});
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 3; ++j)
            CHECK(close(z.select(0, i).select(0, j), naive_mm(x.select(0, i).select(0, 0), y.select(0, j)), 1e-12));
    // [T, B, I] @ [I, H] folds into one GEMM
    const Tensor seq = randn({4, 3, 2}, kFloat64), W = randn({2, 5}, kFloat64);
    const Tensor out = matmul(seq, W);
    CHECK(out.sizes() == Shape{4, 3, 5});
    CHECK(close(out.select(0, 2), naive_mm(seq.select(0, 2), W), 1e-12));
    CHECK(matmul(zeros({2, 0}), zeros({0, 3})).sizes() == Shape{2, 3});
    CHECK(close(matmul(zeros({2, 0}), zeros({0, 3})), std::vector<double>(6, 0)));
}

TEST_CASE("small products run in loom's own loops, large ones in BLAS, with the same values")
{
    // At most 2^16 multiply-adds a product runs in small_gemm (B as it is: blocks of 32, 16 and 8
    // columns, then one at a time; K = 1 an outer product) or small_gemm_nt (B transposed, a
    // linear's weight: 8 partial sums at a time); K below, at and above 8 and not a multiple of
    // it, one row and many; the largest goes to BLAS.
    Generator gen(9);
    for (DType dt : {kFloat32, kFloat64}) {
        const double tol = dt == kFloat32 ? 1e-4 : 1e-12;
        for (const auto& [n, k, m] : std::vector<std::array<std::int64_t, 3>>{
                 {1, 3, 5}, {1, 8, 128}, {4, 13, 7}, {3, 32, 33}, {5, 17, 1}, {2, 9, 24}, {3, 5, 57}, {6, 1, 40},
                 {64, 64, 64}}) {
            CAPTURE(n);
            CAPTURE(k);
            CAPTURE(m);
            const Tensor a = randn({n, k}, dt, &gen), b = randn({k, m}, dt, &gen), w = randn({m, k}, dt, &gen);
            CHECK(close(matmul(a, b), naive_mm(a, b), tol));
            CHECK(close(matmul(a, w.t()), naive_mm(a, w.t().contiguous()), tol));
            const Tensor bias = randn({m}, dt, &gen);
            std::vector<double> expected = naive_mm(a, w.t().contiguous());
            const auto vb = values(bias);
            for (std::size_t i = 0; i < expected.size(); ++i) expected[i] += vb[i % std::size_t(m)];
            CHECK(close(linear(a, w, bias), expected, tol));
        }
    }
}

TEST_CASE("linear equals x W^T + b, and its in-place gradient sums equal the composed ones")
{
    Generator gen(7);
    const Tensor x = randn({6, 2, 3}, kFloat64, &gen), w = randn({4, 3}, kFloat64, &gen),
                 u = randn({4, 4}, kFloat64, &gen), b = randn({4}, kFloat64, &gen);
    CHECK(testing::close_tensors(linear(x, w, b), matmul(x, w.t()) + b, 1e-14));
    CHECK(testing::close_tensors(linear(x, w), matmul(x, w.t()), 1e-14));
    // The weights get gradients from other ops too, before and after linear's in the sweep, and
    // a hook on u doubles its gradient: the sums must equal those of the composed formula.
    const auto gradients = [&](bool use_linear) {
        Tensor W = w.clone().requires_grad_(), U = u.clone().requires_grad_(), B = b.clone().requires_grad_();
        U.register_hook([](const Tensor& g) { return g * 2.0; });
        const auto dense = [&](const Tensor& in, const Tensor& weight, const Tensor& bias) {
            if (use_linear) return linear(in, weight, bias);
            const Tensor y = matmul(in, weight.t());
            return bias.defined() ? y + bias : y;
        };
        Tensor h = zeros({2, 4}, kFloat64), loss = (W * W).sum();
        for (std::int64_t t = 0; t < 6; ++t) h = tanh(dense(x.select(0, t), W, B) + dense(h, U, {}));
        loss = loss + h.pow(2).sum() + W.sum() + B.sum() * 3.0 + U.sum();
        loss.backward();
        return std::vector<Tensor>{W.grad(), U.grad(), B.grad()};
    };
    const auto fast = gradients(true), composed = gradients(false);
    // The sweep may sum a transposed weight's gradients in their transposed layout; .grad() is contiguous.
    for (const Tensor& g : composed) CHECK(g.is_contiguous());
    for (std::size_t i = 0; i < fast.size(); ++i) CHECK(testing::close_tensors(fast[i], composed[i], 1e-12));
    {  // anomaly mode checks every returned gradient, so nothing is summed in place: same numbers
        autograd::DetectAnomalyGuard anomaly;
        const auto checked = gradients(true);
        for (std::size_t i = 0; i < fast.size(); ++i) CHECK(testing::close_tensors(checked[i], composed[i], 1e-12));
    }
}

TEST_CASE("a square is x * x exactly, and a bias's gradient over a batch is the batch sum")
{
    Generator gen(3);
    for (DType dtype : {kFloat32, kFloat64}) {
        const Tensor x = randn({5, 7}, dtype, &gen) * 100.0;
        CHECK(testing::values(x.pow(2.0)) == testing::values(x * x));
    }
    const Tensor g = randn({4, 3, 6}, kFloat32, &gen);
    Tensor b = zeros({6}).requires_grad_();
    (zeros({4, 3, 6}) + b).backward(g);  // summed over the two leading dims in the sweep
    CHECK(testing::values(b.grad()) == testing::values(g.sum({0, 1})));
}

TEST_CASE("add_into adds in place for contiguous and strided layouts, and refuses a mismatch")
{
    for (const DType dtype : {kFloat64, kFloat32}) {
        CAPTURE(dtype);
        // Contiguous, of one shape and dtype: the sweep's usual sum.
        const Tensor dst = arange(6, dtype).reshape({2, 3});
        kernels::add_into(dst, full({2, 3}, 0.5, dtype));
        CHECK(values(dst) == std::vector<double>{0.5, 1.5, 2.5, 3.5, 4.5, 5.5});
        // Both transposed alike, and one transposed against one contiguous.
        const Tensor dst_t = arange(6, dtype).reshape({3, 2}).t();
        kernels::add_into(dst_t, arange(6, dtype).reshape({3, 2}).t());
        CHECK(values(dst_t) == std::vector<double>{0, 4, 8, 2, 6, 10});
        kernels::add_into(dst_t, ones({2, 3}, dtype));
        CHECK(values(dst_t) == std::vector<double>{1, 5, 9, 3, 7, 11});
    }
    const Tensor dst = zeros({2, 3}, kFloat64);
    CHECK_THROWS_AS(kernels::add_into(dst, zeros({3, 2}, kFloat64)), Error);
    CHECK_THROWS_AS(kernels::add_into(dst, zeros({2, 3}, kFloat32)), Error);
    CHECK_THROWS_AS(kernels::add_into(zeros({2, 3}, kInt64), zeros({2, 3}, kInt64)), Error);
    CHECK(values(dst) == std::vector<double>(6, 0.0));  // a refused add writes nothing
}

TEST_CASE("large elementwise passes and sums split across threads give what one thread gives")
{
    // Past kThreadedElementwise, and not a multiple of any block: each thread's block must end
    // where the next begins.
    const std::int64_t n = kernels::kThreadedElementwise + 7;
    Generator gen(5);
    const Tensor x = randn({n}, kFloat32, &gen), w = randn({n}, kFloat32, &gen);
    const Tensor counts = randint(-1000, 1000, {n}, &gen);
    const std::int64_t rows = kernels::kThreadedElementwise / 256 + 5;
    const Tensor rows_x = randn({rows, 16}, kFloat32, &gen), rows_g = randn({rows, 256}, kFloat32, &gen);
    const Tensor rows_w = randn({256, 16}, kFloat32, &gen), rows_b = randn({256}, kFloat32, &gen);
    const int threads_before = get_num_threads();
    const auto run = [&](int threads) {
        set_num_threads(threads);
        Tensor leaf = x.detach().requires_grad_();
        (exp(leaf) * w).sum().backward();  // mul's gradient from a spread scalar; exp's written in place
        // A linear over enough rows: its bias copied into every row, its gradient summed by rows.
        Tensor weight = rows_w.detach().requires_grad_(), bias = rows_b.detach().requires_grad_();
        const Tensor y = linear(rows_x, weight, bias);
        (y * rows_g).sum().backward();
        std::vector<Tensor> out{exp(x),     x + w,       x * 3.0,     w * ones({1}).expand({n}), gt(x, w).to(kFloat32),
                                x.sum(),    counts.sum(), leaf.grad(), y,                         bias.grad()};
        return out;
    };
    const std::vector<Tensor> one = run(1), three = run(3);
    set_num_threads(threads_before);
    for (std::size_t k = 0; k < one.size(); ++k) {
        CAPTURE(k);
        if (k == 8)  // the GEMM's own threads may round differently
            CHECK(testing::close_tensors(three[k], one[k], 1e-4));
        else
            CHECK(values(three[k]) == values(one[k]));
    }
    // And what the elements say, one by one.
    const std::vector<double> vx = values(x), vw = values(w), e = values(one[0]), grad = values(one[7]);
    bool each = true;
    double total = 0;
    for (std::int64_t i = 0; i < n; ++i) {
        const auto at = std::size_t(i);
        each = each && e[at] == double(exp_of(float(vx[at])));
        each = each && grad[at] == double(float(vw[at]) * float(e[at]));
        total += vx[at];
    }
    CHECK(each);
    CHECK(values(one[1]) == [&] {
        std::vector<double> v(vx.size());
        for (std::size_t i = 0; i < v.size(); ++i) v[i] = double(float(vx[i]) + float(vw[i]));
        return v;
    }());
    CHECK(values(one[3]) == vw);
    CHECK(std::abs(one[5].item<float>() - total) <= 1e-6 * std::abs(total) + 1e-3);
    CHECK(testing::close_tensors(one[8], matmul(rows_x, rows_w.t()) + rows_b, 1e-5));
    CHECK(testing::close_tensors(one[9], rows_g.to(kFloat64).sum({0}).to(kFloat32), 1e-3));
}
