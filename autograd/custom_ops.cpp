// The checks on users' ops (autograd::record, Function): their outputs as forward returned
// them, and the gradients their backward returned, with errors addressed to their author.
#include "tape_internal.hpp"

#include <algorithm>

namespace loom::autograd::detail {

void prepare_custom_outputs(const char* op, std::vector<Tensor>& outputs)
{
    LOOM_CHECK(!outputs.empty(), op, "forward returned no outputs");
    for (std::size_t k = 0; k < outputs.size(); ++k) {
        Tensor& o = outputs[k];
        LOOM_CHECK(o.defined(), op, "forward returned an undefined tensor as output {}", k);
        LOOM_CHECK(is_floating(o.dtype()), op,
                   "forward returned output {} of dtype {}; a differentiable op's outputs are float32 or float64",
                   k, o.dtype());
        // An input returned as is, a result computed with grad mode on, or one returned twice:
        // the output is a new tensor of the same values, which this op's entry can own.
        const bool repeated = std::any_of(outputs.begin(), outputs.begin() + std::ptrdiff_t(k),
                                          [&](const Tensor& earlier) { return earlier.is_same(o); });
        if (o.requires_grad() || repeated) o = o.detach();
    }
}

void check_custom_grads(const char* op, const GradList& grads, const BackwardContext& c)
{
    LOOM_CHECK(grads.size() == c.needs.size(), op,
               "backward returned {} gradients, expected {}: one per Tensor argument of forward (undefined for none)",
               grads.size(), c.needs.size());
    for (std::size_t k = 0; k < grads.size(); ++k) {
        if (!grads[k].defined() || !c.needs[k]) continue;
        if (grads[k].sizes() == c.input_shape(k) && grads[k].dtype() == c.input_dtype(k)) continue;
        const bool leaf_converted = engine::converted_leaf(c.inputs[k], grads[k].sizes(), grads[k].dtype());
        fail(op,
             "backward returned a gradient of shape {} and dtype {} for input {}, expected shape {} and dtype {} like "
             "the input{}",
             grads[k].sizes(), grads[k].dtype(), k, c.input_shape(k), c.input_dtype(k),
             leaf_converted ? "; or the input is a leaf that Module::to() converted after the graph was recorded: then "
                              "call backward() before to(), or run the forward again after it"
                            : "");
    }
}

}  // namespace loom::autograd::detail
