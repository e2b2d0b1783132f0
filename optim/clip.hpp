/// \file
/// Gradient clipping, as torch.nn.utils.clip_grad_norm_ and clip_grad_value_.
#pragma once
#include <vector>

#include "../core/tensor.hpp"

/// In loom::nn::utils, not loom::optim, to keep PyTorch's name (torch.nn.utils); the file sits
/// in optim/ because clipping happens between backward and the optimizer step.
namespace loom::nn::utils {

/// Scales every gradient by max_norm / (total_norm + 1e-6) when that is below 1, where total_norm
/// is the norm (p = norm_type, or infinity) of all gradients together. Returns total_norm as it
/// was before clipping. A non-finite total norm throws and leaves the gradients untouched, unless
/// error_if_nonfinite is false, in which case it is returned and the gradients are scaled anyway,
/// as PyTorch does.
double clip_grad_norm(const std::vector<Tensor>& parameters, double max_norm, double norm_type = 2,
                      bool error_if_nonfinite = true);
/// Clamps every gradient element to [-clip_value, clip_value].
void clip_grad_value(const std::vector<Tensor>& parameters, double clip_value);

/// libtorch's spellings, with libtorch's defaults: clip_grad_norm_ scales a non-finite total norm
/// without an error unless asked (loom's clip_grad_norm refuses it by default).
inline double clip_grad_norm_(const std::vector<Tensor>& parameters, double max_norm, double norm_type = 2,
                              bool error_if_nonfinite = false)
{
    return clip_grad_norm(parameters, max_norm, norm_type, error_if_nonfinite);
}
/// Clamps every gradient element to [-clip_value, clip_value] in place, as torch::nn::utils::clip_grad_value_.
inline void clip_grad_value_(const std::vector<Tensor>& parameters, double clip_value)
{
    clip_grad_value(parameters, clip_value);
}

}  // namespace loom::nn::utils
