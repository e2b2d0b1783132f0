#include "gradcheck.hpp"

#include <cmath>

#include "../core/kernels.hpp"
#include "../core/random.hpp"
#include "ops.hpp"
#include "tape.hpp"

namespace loom {

namespace {

Shape unravel(std::int64_t flat, const Shape& shape)
{
    Shape index(shape.size());
    for (auto d = static_cast<std::int64_t>(shape.size()) - 1; d >= 0; --d) {
        index[d] = flat % shape[d];
        flat /= shape[d];
    }
    return index;
}

}  // namespace

std::string GradcheckResult::report() const
{
    return fmt::format("gradcheck {}: worst element is input {} at {}: analytic {:.10g}, numeric {:.10g}, error {:.3g}",
                       ok ? "passed" : "FAILED", input, index, analytic, numeric, error);
}

GradcheckResult gradcheck(const std::function<Tensor(const std::vector<Tensor>&)>& fn,
                          const std::vector<Tensor>& inputs, const GradcheckOptions& options)
{
    std::vector<Tensor> wrt;
    for (std::size_t i = 0; i < inputs.size(); ++i)
        if (inputs[i].requires_grad()) {
            LOOM_CHECK(inputs[i].dtype() == kFloat64, "gradcheck",
                       "input {} has dtype {}; finite differences need float64", i, inputs[i].dtype());
            wrt.push_back(inputs[i]);
        }
    LOOM_CHECK(!wrt.empty(), "gradcheck", "no input requires grad");

    const Tensor out = fn(inputs);
    LOOM_CHECK(out.dtype() == kFloat64, "gradcheck", "the function returned dtype {}; expected float64", out.dtype());
    Generator gen(options.seed);
    const Tensor projection = randn(out.sizes(), kFloat64, &gen);
    const auto objective = [&](const Tensor& y) { return sum(y * projection); };
    const std::vector<Tensor> analytic = grad({objective(out)}, wrt, {}, false, /*allow_unused=*/true);

    GradcheckResult result;
    result.error = -1;
    NoGradGuard no_grad;
    std::size_t k = 0;
    for (std::size_t i = 0; i < inputs.size(); ++i) {
        if (!inputs[i].requires_grad()) continue;
        const Tensor& x = inputs[i];
        const Tensor a = analytic[k].defined() ? kernels::contiguous(analytic[k]) : zeros(x.sizes(), kFloat64);
        ++k;
        // Perturb a private copy so the caller's tensor is never written.
        std::vector<Tensor> probe = inputs;
        Tensor work = kernels::clone(x);
        probe[i] = work;
        double* p = work.data_ptr<double>();
        for (std::int64_t j = 0; j < x.numel(); ++j) {
            const double original = p[j];
            p[j] = original + options.eps;
            const double plus = objective(fn(probe)).item<double>();
            p[j] = original - options.eps;
            const double minus = objective(fn(probe)).item<double>();
            p[j] = original;
            const double numeric = (plus - minus) / (2 * options.eps);
            const double analytic_j = a.data_ptr<double>()[j];
            const double error = std::abs(analytic_j - numeric);
            const bool pass = error <= options.atol + options.rtol * std::abs(numeric);
            const double excess = error - (options.atol + options.rtol * std::abs(numeric));
            const double worst_excess =
                result.error < 0 ? -INFINITY
                                 : result.error - (options.atol + options.rtol * std::abs(result.numeric));
            if (excess > worst_excess || (!std::isfinite(error))) {
                result.input = i;
                result.index = unravel(j, x.sizes());
                result.analytic = analytic_j;
                result.numeric = numeric;
                result.error = std::isfinite(error) ? error : INFINITY;
            }
            if (!pass) result.ok = false;
        }
    }
    return result;
}

}  // namespace loom
