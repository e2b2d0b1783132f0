/// \file
/// Losses, composed from differentiable ops and numerically stable. Functions and modules.
#pragma once
#include "module.hpp"

namespace loom::nn {

/// How a loss reduces its per-element values: not at all, their mean, or their sum.
enum class Reduction { None, Mean, Sum };

/// mean((input - target)^2), shapes broadcast.
Tensor mse_loss(const Tensor& input, const Tensor& target, Reduction reduction = Reduction::Mean);

/// cross_entropy's options, as torch::nn::CrossEntropyLossOptions.
struct CrossEntropyOptions {
    std::int64_t ignore_index = -100;  ///< targets equal to it add nothing and are not counted
    double label_smoothing = 0;  ///< in [0, 1]: mixes the target with the uniform distribution
    /// How the per-example losses combine.
    Reduction reduction = Reduction::Mean;
};

/// logits [N, C] (or [C]) and int64 class targets [N] (or []) in [0, C); PyTorch's semantics,
/// including ignore_index and label_smoothing. Mean divides by the number of targets not ignored.
Tensor cross_entropy(const Tensor& logits, const Tensor& target, const CrossEntropyOptions& options = {});
/// log_probs [N, C] (or [C]), targets as for cross_entropy.
Tensor nll_loss(const Tensor& log_probs, const Tensor& target, std::int64_t ignore_index = -100,
                Reduction reduction = Reduction::Mean);
/// Stable sigmoid + binary cross-entropy: max(x, 0) - x t + log(1 + exp(-|x|)).
Tensor binary_cross_entropy_with_logits(const Tensor& logits, const Tensor& target,
                                        Reduction reduction = Reduction::Mean);

/// Mean squared error as a module.
class MSELoss : public Module {
public:
    /// A loss with `reduction`.
    explicit MSELoss(Reduction reduction = Reduction::Mean) : reduction(reduction) {}
    /// The loss of `input` against `target`.
    Tensor operator()(const Tensor& input, const Tensor& target) const { return mse_loss(input, target, reduction); }
    /// How the per-element losses combine.
    Reduction reduction;
};

/// Cross entropy as a module.
class CrossEntropyLoss : public Module {
public:
    /// A loss with `options`.
    explicit CrossEntropyLoss(CrossEntropyOptions options = {}) : options(options) {}
    /// The loss of `logits` against int64 class `target`.
    Tensor operator()(const Tensor& logits, const Tensor& target) const { return cross_entropy(logits, target, options); }
    /// Its options.
    CrossEntropyOptions options;
};

/// Negative log-likelihood as a module.
class NLLLoss : public Module {
public:
    /// A loss ignoring targets equal to `ignore_index`.
    explicit NLLLoss(std::int64_t ignore_index = -100, Reduction reduction = Reduction::Mean)
        : ignore_index(ignore_index), reduction(reduction) {}
    /// The loss of `log_probs` against int64 class `target`.
    Tensor operator()(const Tensor& log_probs, const Tensor& target) const
    {
        return nll_loss(log_probs, target, ignore_index, reduction);
    }
    /// Targets with this class count for nothing.
    std::int64_t ignore_index;
    /// How the per-example losses combine.
    Reduction reduction;
};

/// Binary cross entropy on logits as a module.
class BCEWithLogitsLoss : public Module {
public:
    /// A loss with `reduction`.
    explicit BCEWithLogitsLoss(Reduction reduction = Reduction::Mean) : reduction(reduction) {}
    /// The loss of `logits` against `target` probabilities.
    Tensor operator()(const Tensor& logits, const Tensor& target) const
    {
        return binary_cross_entropy_with_logits(logits, target, reduction);
    }
    /// How the per-element losses combine.
    Reduction reduction;
};

}  // namespace loom::nn
