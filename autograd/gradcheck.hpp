/// \file
/// Finite-difference checking of tape gradients, in float64.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "../core/tensor.hpp"

/// In namespace loom beside the ops it checks (libtorch has torch::autograd::gradcheck in Python only).
namespace loom {

/// gradcheck's tolerances and seed.
struct GradcheckOptions {
    double eps = 1e-6;  ///< central-difference step
    double atol = 1e-5;  ///< an element passes when |analytic - numeric| <= atol + rtol * |numeric|
    /// Relative tolerance.
    double rtol = 1e-3;
    std::uint64_t seed = 0;  ///< for the random projection of a non-scalar output
};

/// What gradcheck found.
struct GradcheckResult {
    /// Whether every element passed.
    bool ok = true;
    /// The worst element over all inputs: which input, where, and both derivatives.
    std::size_t input = 0;
    /// Where, in that input.
    Shape index;
    double analytic = 0;  ///< the gradient backward computed there
    double numeric = 0;   ///< the central difference there
    double error = 0;     ///< |analytic - numeric|
    /// The result in words, for a failed check's message.
    std::string report() const;
};

/// Compares the tape's gradients of fn with central finite differences. Every input that
/// requires grad must be float64. A non-scalar output y is checked through sum(y * r) for a
/// fixed random r, which tests the whole vector-Jacobian product in one backward pass.
GradcheckResult gradcheck(const std::function<Tensor(const std::vector<Tensor>&)>& fn,
                          const std::vector<Tensor>& inputs, const GradcheckOptions& options = {});

/// Second derivatives: the gradient of the first-order gradients, taken with create_graph, is
/// compared with central differences of first-order gradients. Each gradient g_k is projected
/// on a fixed random v_k, so one check covers the whole Hessian-vector product.
GradcheckResult gradgradcheck(const std::function<Tensor(const std::vector<Tensor>&)>& fn,
                              const std::vector<Tensor>& inputs, const GradcheckOptions& options = {});

/// The same check for tensors that fn reads by itself, such as a module's parameters
/// (module.parameters() after module.to(kFloat64)): each is perturbed in place and restored.
GradcheckResult gradcheck_parameters(const std::function<Tensor()>& fn, const std::vector<Tensor>& parameters,
                                     const GradcheckOptions& options = {});

}  // namespace loom
