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

namespace {

// Compares the tape's gradients of sum(y * r) at `wrt` (y = at_inputs()) with central differences
// of at_work(), which reads `work`: each element of `work` is perturbed in place and restored.
GradcheckResult compare(const std::function<Tensor()>& at_inputs, const std::function<Tensor()>& at_work,
                        const std::vector<Tensor>& wrt, const std::vector<Tensor>& work,
                        const std::vector<std::size_t>& positions, const GradcheckOptions& options)
{
    const Tensor out = at_inputs();
    LOOM_CHECK(out.dtype() == kFloat64, "gradcheck", "the function returned dtype {}; expected float64", out.dtype());
    Generator gen(options.seed);
    const Tensor projection = randn(out.sizes(), kFloat64, &gen);
    const auto objective = [&](const Tensor& y) { return sum(y * projection); };
    // An output off the tape does not depend on wrt at all: its gradient is zero.
    const std::vector<Tensor> analytic = out.requires_grad()
                                             ? grad({objective(out)}, wrt, {}, false, false, /*allow_unused=*/true)
                                             : std::vector<Tensor>(wrt.size());

    GradcheckResult result;
    double worst_excess = -INFINITY;
    NoGradGuard no_grad;
    for (std::size_t k = 0; k < work.size(); ++k) {
        const Tensor a = analytic[k].defined() ? kernels::contiguous(analytic[k]) : zeros(wrt[k].sizes(), kFloat64);
        double* p = work[k].data_ptr<double>();
        for (std::int64_t j = 0; j < work[k].numel(); ++j) {
            const double original = p[j];
            p[j] = original + options.eps;
            const double plus = objective(at_work()).item<double>();
            p[j] = original - options.eps;
            const double minus = objective(at_work()).item<double>();
            p[j] = original;
            const double numeric = (plus - minus) / (2 * options.eps);
            const double analytic_j = a.data_ptr<double>()[j];
            const double error = std::abs(analytic_j - numeric);
            const double allowed = options.atol + options.rtol * std::abs(numeric);
            const double excess = std::isfinite(error) ? error - allowed : INFINITY;
            if (!(error <= allowed)) result.ok = false;
            if (excess > worst_excess) {
                worst_excess = excess;
                result.input = positions[k];
                result.index = unravel(j, work[k].sizes());
                result.analytic = analytic_j;
                result.numeric = numeric;
                result.error = error;
            }
        }
    }
    return result;
}

void check_float64(const Tensor& t, std::size_t i, const char* what)
{
    LOOM_CHECK(t.dtype() == kFloat64, "gradcheck", "{} {} has dtype {}; finite differences need float64", what, i,
               t.dtype());
}

// The inputs that require grad (wrt), private copies of them to perturb (work), so the
// caller's tensors are never written, and where each sits among the inputs.
struct Checked {
    std::vector<Tensor> wrt, work;
    std::vector<std::size_t> positions;
};

Checked inputs_to_check(const char* op, const std::vector<Tensor>& inputs)
{
    Checked c;
    for (std::size_t i = 0; i < inputs.size(); ++i)
        if (inputs[i].requires_grad()) {
            check_float64(inputs[i], i, "input");
            c.wrt.push_back(inputs[i]);
            c.work.push_back(kernels::clone(inputs[i]));
            c.positions.push_back(i);
        }
    LOOM_CHECK(!c.wrt.empty(), op, "no input requires grad");
    return c;
}

}  // namespace

GradcheckResult gradcheck(const std::function<Tensor(const std::vector<Tensor>&)>& fn,
                          const std::vector<Tensor>& inputs, const GradcheckOptions& options)
{
    const Checked c = inputs_to_check("gradcheck", inputs);
    std::vector<Tensor> probe = inputs;
    for (std::size_t k = 0; k < c.work.size(); ++k) probe[c.positions[k]] = c.work[k];
    return compare([&] { return fn(inputs); }, [&] { return fn(probe); }, c.wrt, c.work, c.positions, options);
}

GradcheckResult gradgradcheck(const std::function<Tensor(const std::vector<Tensor>&)>& fn,
                              const std::vector<Tensor>& inputs, const GradcheckOptions& options)
{
    const Checked c = inputs_to_check("gradgradcheck", inputs);
    const std::vector<Tensor>& wrt = c.wrt;
    const std::vector<Tensor>& work = c.work;
    const std::vector<std::size_t>& positions = c.positions;
    // H(x) = sum_k <g_k(x), v_k> with g = d<fn(x), r>/dx: its gradient is the Hessian (or, for a
    // non-scalar fn, the second-order VJP) applied to the v_k, which create_graph must give.
    Generator gen(options.seed + 1);
    Tensor r;
    std::vector<Tensor> v;
    for (const Tensor& t : wrt) v.push_back(randn(t.sizes(), kFloat64, &gen));
    const auto first_order = [&](const std::vector<Tensor>& args, const std::vector<Tensor>& leaves, bool create_graph) {
        const Tensor out = fn(args);
        if (!r.defined()) r = randn(out.sizes(), kFloat64, &gen);
        if (!out.requires_grad()) return zeros({}, kFloat64);
        const std::vector<Tensor> g = grad({sum(out * r)}, leaves, {}, false, create_graph, /*allow_unused=*/true);
        Tensor h = zeros({}, kFloat64);
        for (std::size_t k = 0; k < g.size(); ++k)
            if (g[k].defined()) h = h + sum(g[k] * v[k]);
        return h;
    };
    const auto at_inputs = [&] { return first_order(inputs, wrt, true); };
    const auto at_work = [&] {
        GradModeGuard on(true);  // compare() perturbs under NoGradGuard; H needs a first-order sweep
        std::vector<Tensor> probe = inputs, leaves;
        for (std::size_t k = 0; k < work.size(); ++k) {
            leaves.push_back(kernels::clone(work[k]).requires_grad_());
            probe[positions[k]] = leaves.back();
        }
        return first_order(probe, leaves, false).detach();
    };
    return compare(at_inputs, at_work, wrt, work, positions, options);
}

GradcheckResult gradcheck_parameters(const std::function<Tensor()>& fn, const std::vector<Tensor>& parameters,
                                     const GradcheckOptions& options)
{
    LOOM_CHECK(!parameters.empty(), "gradcheck_parameters", "no parameters given");
    std::vector<std::size_t> positions;
    for (std::size_t i = 0; i < parameters.size(); ++i) {
        check_float64(parameters[i], i, "parameter");
        LOOM_CHECK(parameters[i].requires_grad() && parameters[i].is_contiguous(), "gradcheck_parameters",
                   "parameter {} must require grad and be contiguous", i);
        positions.push_back(i);
    }
    return compare(fn, fn, parameters, parameters, positions, options);
}

}  // namespace loom
