#include "clip.hpp"

#include <cmath>
#include <set>

#include "../autograd/ops.hpp"
#include "../autograd/tape.hpp"

namespace loom::nn::utils {

double clip_grad_norm(const std::vector<Tensor>& parameters, double max_norm, double norm_type, bool error_if_nonfinite)
{
    LOOM_CHECK(max_norm >= 0 && norm_type > 0, "clip_grad_norm", "expects max_norm >= 0 and norm_type > 0, got {} and {}",
               max_norm, norm_type);
    NoGradGuard no_grad;
    std::vector<Tensor> norms, grads;
    std::set<const TensorImpl*> seen;  // a tensor listed twice (tied weights) is one gradient: counted and scaled once
    for (const Tensor& p : parameters)
        if (p.grad().defined() && seen.insert(&p.impl()).second) {
            grads.push_back(p.grad());
            norms.push_back(norm(p.grad().to(kFloat64), norm_type));
        }
    if (grads.empty()) return 0;
    const double total = norm(stack(norms), norm_type).item<double>();
    LOOM_CHECK(std::isfinite(total) || !error_if_nonfinite, "clip_grad_norm",
               "the total norm of the gradients is {}; nothing was clipped. Look for a diverging loss, or pass "
               "error_if_nonfinite=false to clip anyway",
               total);
    const double coef = std::min(max_norm / (total + 1e-6), 1.0);
    for (Tensor g : grads) g.mul_(coef);
    return total;
}

void clip_grad_value(const std::vector<Tensor>& parameters, double clip_value)
{
    LOOM_CHECK(clip_value >= 0, "clip_grad_value", "expects clip_value >= 0, got {}", clip_value);
    NoGradGuard no_grad;
    for (const Tensor& p : parameters)
        if (p.grad().defined()) Tensor(p.grad()).copy_(clamp(p.grad(), -clip_value, clip_value));  // idempotent
}

}  // namespace loom::nn::utils
