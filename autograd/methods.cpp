// Tensor's methods: thin forwards to the differentiable ops, and the in-place writers.
#include <algorithm>
#include <cmath>

#include "../core/kernels.hpp"
#include "../core/random.hpp"
#include "ops.hpp"
#include "tape.hpp"

namespace loom {

Tensor Tensor::reshape(const Shape& shape) const { return loom::reshape(*this, shape); }
Tensor Tensor::view(const Shape& shape) const { return loom::view(*this, shape); }
Tensor Tensor::permute(const Shape& dims) const { return loom::permute(*this, dims); }
Tensor Tensor::transpose(std::int64_t d0, std::int64_t d1) const { return loom::transpose(*this, d0, d1); }
Tensor Tensor::t() const
{
    LOOM_CHECK(dim() == 2, "t", "expects a 2-D tensor, got shape {}; use transpose(dim0, dim1)", sizes());
    return loom::transpose(*this, 0, 1);
}
Tensor Tensor::squeeze() const { return loom::squeeze(*this); }
Tensor Tensor::squeeze(std::int64_t d) const { return loom::squeeze(*this, d); }
Tensor Tensor::unsqueeze(std::int64_t d) const { return loom::unsqueeze(*this, d); }
Tensor Tensor::expand(const Shape& shape) const { return loom::expand(*this, shape); }
Tensor Tensor::narrow(std::int64_t d, std::int64_t start, std::int64_t length) const
{
    return loom::narrow(*this, d, start, length);
}
Tensor Tensor::slice(std::int64_t d, std::int64_t start, std::int64_t end, std::int64_t step) const
{
    return loom::slice(*this, d, start, end, step);
}
Tensor Tensor::select(std::int64_t d, std::int64_t index) const { return loom::select(*this, d, index); }
Tensor Tensor::index_select(std::int64_t d, const Tensor& index) const { return loom::index_select(*this, d, index); }
Tensor Tensor::gather(std::int64_t d, const Tensor& index) const { return loom::gather(*this, d, index); }
Tensor Tensor::contiguous() const { return loom::contiguous(*this); }
Tensor Tensor::clone() const { return loom::clone(*this); }
Tensor Tensor::to(DType d) const { return loom::to(*this, d); }
std::vector<Tensor> Tensor::split(std::int64_t size, std::int64_t d) const { return loom::split(*this, size, d); }
std::vector<Tensor> Tensor::chunk(std::int64_t chunks, std::int64_t d) const { return loom::chunk(*this, chunks, d); }

Tensor Tensor::exp() const { return loom::exp(*this); }
Tensor Tensor::log() const { return loom::log(*this); }
Tensor Tensor::sqrt() const { return loom::sqrt(*this); }
Tensor Tensor::abs() const { return loom::abs(*this); }
Tensor Tensor::tanh() const { return loom::tanh(*this); }
Tensor Tensor::sigmoid() const { return loom::sigmoid(*this); }
Tensor Tensor::relu() const { return loom::relu(*this); }
Tensor Tensor::neg() const { return loom::neg(*this); }
Tensor Tensor::pow(double e) const { return loom::pow(*this, e); }
Tensor Tensor::pow(const Tensor& e) const { return loom::pow(*this, e); }
Tensor Tensor::clamp(std::optional<double> lo, std::optional<double> hi) const { return loom::clamp(*this, lo, hi); }
Tensor Tensor::matmul(const Tensor& other) const { return loom::matmul(*this, other); }
Tensor Tensor::masked_fill(const Tensor& mask, double value) const { return loom::masked_fill(*this, mask, value); }

Tensor Tensor::sum() const { return loom::sum(*this); }
Tensor Tensor::sum(const Shape& dims, bool keepdim) const { return loom::sum(*this, dims, keepdim); }
Tensor Tensor::mean() const { return loom::mean(*this); }
Tensor Tensor::mean(const Shape& dims, bool keepdim) const { return loom::mean(*this, dims, keepdim); }
Tensor Tensor::max() const { return loom::amax(*this); }
Tensor Tensor::max(std::int64_t d, bool keepdim) const { return loom::amax(*this, {d}, keepdim); }
Tensor Tensor::min() const { return loom::amin(*this); }
Tensor Tensor::min(std::int64_t d, bool keepdim) const { return loom::amin(*this, {d}, keepdim); }
Tensor Tensor::argmax() const { return loom::argmax(*this); }
Tensor Tensor::argmax(std::int64_t d, bool keepdim) const { return loom::argmax(*this, d, keepdim); }
Tensor Tensor::argmin() const { return loom::argmin(*this); }
Tensor Tensor::argmin(std::int64_t d, bool keepdim) const { return loom::argmin(*this, d, keepdim); }
Tensor Tensor::var() const { return loom::var(*this); }
Tensor Tensor::var(const Shape& dims, bool unbiased, bool keepdim) const { return loom::var(*this, dims, unbiased, keepdim); }
Tensor Tensor::norm(double p) const { return loom::norm(*this, p); }
Tensor Tensor::norm(double p, const Shape& dims, bool keepdim) const { return loom::norm(*this, p, dims, keepdim); }
Tensor Tensor::softmax(std::int64_t d) const { return loom::softmax(*this, d); }
Tensor Tensor::log_softmax(std::int64_t d) const { return loom::log_softmax(*this, d); }

Tensor Tensor::eq(const Tensor& o) const { return loom::eq(*this, o); }
Tensor Tensor::ne(const Tensor& o) const { return loom::ne(*this, o); }
Tensor Tensor::lt(const Tensor& o) const { return loom::lt(*this, o); }
Tensor Tensor::le(const Tensor& o) const { return loom::le(*this, o); }
Tensor Tensor::gt(const Tensor& o) const { return loom::gt(*this, o); }
Tensor Tensor::ge(const Tensor& o) const { return loom::ge(*this, o); }

// ---- in place ----

namespace {

// Whether no two elements of t share memory, by a sufficient test: ordered by stride, each dim
// must step past everything the smaller dims can reach. Views made by slicing, transposing and
// selecting pass; an expanded dim (stride 0, size > 1) does not.
bool is_non_overlapping(const Tensor& t)
{
    if (t.numel() == 0) return true;  // nothing is written
    std::vector<std::pair<std::int64_t, std::int64_t>> dims;  // (stride, size) of dims with size > 1
    for (std::int64_t d = 0; d < t.dim(); ++d)
        if (t.sizes()[d] > 1) dims.emplace_back(t.impl().stride(d), t.sizes()[d]);
    std::sort(dims.begin(), dims.end());
    std::int64_t reach = 0;  // the largest offset the dims so far can add
    for (const auto& [stride, size] : dims) {
        std::int64_t span = 0;
        if (stride <= reach || __builtin_mul_overflow(stride, size - 1, &span) ||
            __builtin_add_overflow(reach, span, &reach))
            return false;
    }
    return true;
}

// In-place writes are not recorded, so they are refused where they would corrupt a gradient,
// and where several elements share memory (an expanded view): the result would depend on
// which write came last.
void begin_write(std::string_view op, const Tensor& t)
{
    LOOM_CHECK(!(t.requires_grad() && grad_enabled()), op,
               "cannot modify a tensor that requires grad (shape {}) in place while grad mode is on; wrap the "
               "update in NoGradGuard, or use the out-of-place op",
               t.sizes());
    LOOM_CHECK(is_non_overlapping(t), op,
               "cannot write in place to a view whose elements share memory (shape {}, strides {}, e.g. from "
               "expand); clone() it first",
               t.sizes(), t.strides());
}

Tensor& end_write(Tensor& t)
{
    ++t.impl().storage->version;
    return t;
}

}  // namespace

Tensor& Tensor::zero_() { return fill_(0); }

Tensor& Tensor::fill_(double value)
{
    begin_write("fill_", *this);
    check_scalar_fits("fill_", value, dtype());
    kernels::copy_into(*this, scalar_tensor(value, dtype()));
    return end_write(*this);
}

Tensor& Tensor::copy_(const Tensor& src)
{
    begin_write("copy_", *this);
    kernels::copy_into(*this, src);
    return end_write(*this);
}

Tensor& Tensor::add_(const Tensor& other, double alpha)
{
    begin_write("add_", *this);
    const Tensor sum = alpha == 1 ? loom::add(detach(), other.detach()) : loom::add(detach(), other.detach() * alpha);
    LOOM_CHECK(sum.sizes() == sizes(), "add_", "other of shape {} does not broadcast to {}", other.sizes(), sizes());
    kernels::copy_into(*this, sum);
    return end_write(*this);
}

Tensor& Tensor::mul_(double factor)
{
    check_scalar_fits("mul_", factor, dtype());
    return mul_(scalar_tensor(factor, dtype()));
}

Tensor& Tensor::mul_(const Tensor& other)
{
    begin_write("mul_", *this);
    const Tensor product = loom::mul(detach(), other.detach());
    LOOM_CHECK(product.sizes() == sizes(), "mul_", "other of shape {} does not broadcast to {}", other.sizes(), sizes());
    kernels::copy_into(*this, product);
    return end_write(*this);
}

Tensor& Tensor::masked_fill_(const Tensor& mask, double value)
{
    begin_write("masked_fill_", *this);
    kernels::copy_into(*this, loom::masked_fill(detach(), mask, value));
    return end_write(*this);
}

Tensor& Tensor::uniform_(double low, double high, Generator* gen)
{
    begin_write("uniform_", *this);
    check_floating("uniform_", dtype());
    LOOM_CHECK(low <= high && std::isfinite(low) && std::isfinite(high), "uniform_",
               "expects finite low <= high, got [{}, {})", low, high);
    Generator& g = gen ? *gen : default_generator();
    const Tensor values = empty(sizes(), kFloat64);
    double* p = values.data_ptr<double>();
    for (std::int64_t i = 0; i < numel(); ++i) p[i] = low + (high - low) * g.uniform01();
    kernels::copy_into(*this, values);
    return end_write(*this);
}

Tensor& Tensor::normal_(double mean, double std, Generator* gen)
{
    begin_write("normal_", *this);
    check_floating("normal_", dtype());
    LOOM_CHECK(std >= 0 && std::isfinite(mean) && std::isfinite(std), "normal_",
               "expects a finite mean and std >= 0, got mean={} std={}", mean, std);
    Generator& g = gen ? *gen : default_generator();
    const Tensor values = empty(sizes(), kFloat64);
    double* p = values.data_ptr<double>();
    for (std::int64_t i = 0; i < numel(); ++i) p[i] = mean + std * g.normal();
    kernels::copy_into(*this, values);
    return end_write(*this);
}

}  // namespace loom
