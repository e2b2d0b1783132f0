#include "init.hpp"

#include <cmath>

#include "../autograd/ops.hpp"
#include "../autograd/tape.hpp"

namespace loom::nn::init {

double calculate_gain(std::string_view nonlinearity, double param)
{
    if (nonlinearity == "linear" || nonlinearity == "sigmoid") return 1;
    if (nonlinearity == "tanh") return 5.0 / 3;
    if (nonlinearity == "relu") return std::sqrt(2.0);
    if (nonlinearity == "leaky_relu") return std::sqrt(2.0 / (1 + param * param));
    fail("calculate_gain", "unknown nonlinearity \"{}\" (expected linear, sigmoid, tanh, relu or leaky_relu)",
         nonlinearity);
}

std::pair<std::int64_t, std::int64_t> fans(const Tensor& t)
{
    LOOM_CHECK(t.dim() >= 2, "init", "fan in and fan out need a tensor of at least 2 dims, got shape {}", t.sizes());
    const std::int64_t receptive = t.numel() / (t.size(0) * t.size(1));
    return {t.size(1) * receptive, t.size(0) * receptive};
}

void uniform_(Tensor& t, double low, double high, Generator* gen)
{
    NoGradGuard no_grad;
    t.uniform_(low, high, gen);
}

void normal_(Tensor& t, double mean, double std, Generator* gen)
{
    NoGradGuard no_grad;
    t.normal_(mean, std, gen);
}

void constant_(Tensor& t, double value)
{
    NoGradGuard no_grad;
    t.fill_(value);
}

void zeros_(Tensor& t) { constant_(t, 0); }
void ones_(Tensor& t) { constant_(t, 1); }

void xavier_uniform_(Tensor& t, double gain, Generator* gen)
{
    const auto [in, out] = fans(t);
    const double a = gain * std::sqrt(6.0 / double(in + out));
    uniform_(t, -a, a, gen);
}

void xavier_normal_(Tensor& t, double gain, Generator* gen)
{
    const auto [in, out] = fans(t);
    normal_(t, 0, gain * std::sqrt(2.0 / double(in + out)), gen);
}

namespace {
double kaiming_std(const Tensor& t, double a, FanMode mode, std::string_view nonlinearity)
{
    const auto [in, out] = fans(t);
    return calculate_gain(nonlinearity, a) / std::sqrt(double(mode == FanMode::FanIn ? in : out));
}
}  // namespace

void kaiming_uniform_(Tensor& t, double a, FanMode mode, std::string_view nonlinearity, Generator* gen)
{
    const double bound = std::sqrt(3.0) * kaiming_std(t, a, mode, nonlinearity);
    uniform_(t, -bound, bound, gen);
}

void kaiming_normal_(Tensor& t, double a, FanMode mode, std::string_view nonlinearity, Generator* gen)
{
    normal_(t, 0, kaiming_std(t, a, mode, nonlinearity), gen);
}

void orthogonal_(Tensor& t, double gain, Generator* gen)
{
    LOOM_CHECK(t.dim() >= 2, "orthogonal_", "needs a tensor of at least 2 dims, got shape {}", t.sizes());
    const std::int64_t rows = t.size(0), cols = t.numel() / rows;
    // Orthonormalise the columns of a tall normal matrix (modified Gram-Schmidt, in float64),
    // then transpose back if the tensor is wide.
    const bool wide = rows < cols;
    const std::int64_t n = wide ? cols : rows, m = wide ? rows : cols;  // n >= m
    std::vector<double> q(static_cast<std::size_t>(n * m));
    Generator& g = gen ? *gen : default_generator();
    for (auto& v : q) v = g.normal();
    for (std::int64_t j = 0; j < m; ++j) {
        for (std::int64_t k = 0; k < j; ++k) {
            double dot = 0;
            for (std::int64_t i = 0; i < n; ++i) dot += q[i * m + j] * q[i * m + k];
            for (std::int64_t i = 0; i < n; ++i) q[i * m + j] -= dot * q[i * m + k];
        }
        double norm = 0;
        for (std::int64_t i = 0; i < n; ++i) norm += q[i * m + j] * q[i * m + j];
        norm = std::sqrt(norm);
        for (std::int64_t i = 0; i < n; ++i) q[i * m + j] /= norm;
    }
    Tensor result = from_vector<double>(q, {n, m});
    if (wide) result = result.t();
    NoGradGuard no_grad;
    t.copy_((result * gain).reshape(t.sizes()));
}

}  // namespace loom::nn::init
