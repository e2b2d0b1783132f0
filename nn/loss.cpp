#include "loss.hpp"

#include "../autograd/profiler.hpp"

namespace loom::nn {

namespace {

Tensor reduce(const Tensor& losses, Reduction reduction)
{
    switch (reduction) {
    case Reduction::None: return losses;
    case Reduction::Sum: return losses.sum();
    case Reduction::Mean: return losses.mean();
    }
    return losses;
}

// Checks [N, C] scores against [N] targets (or [C] against []) and returns them as [N, C] and [N].
std::pair<Tensor, Tensor> class_batch(std::string_view op, const Tensor& scores, const Tensor& target,
                                      std::int64_t ignore_index)
{
    LOOM_CHECK(scores.dim() == 1 || scores.dim() == 2, op, "expects scores [N, C] or [C], got shape {}",
               scores.sizes());
    LOOM_CHECK(target.dtype() == kInt64, op, "expects int64 class targets, got {}", target.dtype());
    const bool batched = scores.dim() == 2;
    LOOM_CHECK(batched ? target.sizes() == Shape{scores.size(0)} : target.dim() == 0, op,
               "targets of shape {} do not match scores of shape {} (expected {})", target.sizes(), scores.sizes(),
               batched ? fmt::format("[{}]", scores.size(0)) : std::string("[]"));
    const std::int64_t classes = scores.size(-1);
    const Tensor flat = target.reshape({-1}).contiguous();
    const std::int64_t* t = flat.data_ptr<std::int64_t>();
    for (std::int64_t i = 0; i < flat.numel(); ++i)
        LOOM_CHECK((t[i] >= 0 && t[i] < classes) || t[i] == ignore_index, op,
                   "target {} at position {} is outside [0, {}) and is not ignore_index ({})", t[i], i, classes,
                   ignore_index);
    return {batched ? scores : scores.unsqueeze(0), flat};
}

// -log_probs[i, target[i]] for each row, 0 where ignored; and the mask of rows counted.
std::pair<Tensor, Tensor> picked_nll(const Tensor& log_probs, const Tensor& target, std::int64_t ignore_index)
{
    const Tensor counted = target.ne(scalar_tensor(double(ignore_index), kInt64));
    const Tensor safe = where(counted, target, zeros({1}, kInt64));  // any valid class where ignored
    const Tensor nll = -log_probs.gather(1, safe.unsqueeze(1)).squeeze(1);
    return {where(counted, nll, zeros({1}, nll.dtype())), counted};
}

Tensor reduce_counted(const Tensor& losses, const Tensor& counted, Reduction reduction, bool batched)
{
    if (reduction == Reduction::Mean) return losses.sum() / counted.sum().to(losses.dtype());
    const Tensor r = reduce(losses, reduction);
    return reduction == Reduction::None && !batched ? r.squeeze(0) : r;
}

}  // namespace

Tensor mse_loss(const Tensor& input, const Tensor& target, Reduction reduction)
{
    const autograd::detail::ProfiledOp profiled("mse_loss");
    LOOM_CHECK(input.sizes() == target.sizes(), "mse_loss", "input shape {} and target shape {} differ",
               input.sizes(), target.sizes());
    const Tensor d = input - target;
    return reduce(d * d, reduction);
}

Tensor nll_loss(const Tensor& log_probs, const Tensor& target, std::int64_t ignore_index, Reduction reduction)
{
    const autograd::detail::ProfiledOp profiled("nll_loss");
    const auto [lp, t] = class_batch("nll_loss", log_probs, target, ignore_index);
    const auto [losses, counted] = picked_nll(lp, t, ignore_index);
    return reduce_counted(losses, counted, reduction, log_probs.dim() == 2);
}

Tensor cross_entropy(const Tensor& logits, const Tensor& target, const CrossEntropyOptions& o)
{
    const autograd::detail::ProfiledOp profiled("cross_entropy");
    LOOM_CHECK(o.label_smoothing >= 0 && o.label_smoothing <= 1, "cross_entropy",
               "label_smoothing must be in [0, 1], got {}", o.label_smoothing);
    const auto [x, t] = class_batch("cross_entropy", logits, target, o.ignore_index);
    const Tensor log_probs = x.log_softmax(1);
    auto [losses, counted] = picked_nll(log_probs, t, o.ignore_index);
    if (o.label_smoothing > 0) {
        // (1 - e) * nll + e * mean over classes of -log p, on the rows counted.
        const Tensor uniform = where(counted, -log_probs.mean({1}), zeros({1}, log_probs.dtype()));
        losses = losses * (1 - o.label_smoothing) + uniform * o.label_smoothing;
    }
    return reduce_counted(losses, counted, o.reduction, logits.dim() == 2);
}

Tensor binary_cross_entropy_with_logits(const Tensor& logits, const Tensor& target, Reduction reduction)
{
    const autograd::detail::ProfiledOp profiled("binary_cross_entropy_with_logits");
    LOOM_CHECK(logits.sizes() == target.sizes(), "binary_cross_entropy_with_logits",
               "logits shape {} and target shape {} differ", logits.sizes(), target.sizes());
    return reduce(relu(logits) - logits * target + log(1.0 + exp(-abs(logits))), reduction);
}

}  // namespace loom::nn
