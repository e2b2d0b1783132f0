/// \file
/// Your own differentiable op, in the spirit of libtorch's torch::autograd::Function: forward
/// and backward written side by side in one struct, recorded on the tape like a built-in op.
///
///   struct LogCosh : autograd::Function<LogCosh> {
///       static constexpr const char* name = "log_cosh";
///       static Tensor forward(autograd::AutogradContext* ctx, const Tensor& x) {
///           ctx->save_for_backward({x});
///           return abs(x) + log(1.0 + exp(-2.0 * abs(x))) - std::log(2.0);
///       }
///       static std::vector<Tensor> backward(autograd::AutogradContext* ctx, const std::vector<Tensor>& grad_outputs) {
///           return {grad_outputs[0] * tanh(ctx->get_saved_variables()[0])};
///       }
///   };
///   Tensor y = LogCosh::apply(x);
///
/// forward runs without recording (its ops are not on the tape) and returns a Tensor or a
/// std::vector<Tensor> of float32/float64 results. backward gets one gradient per output
/// (zeros where none arrived) and returns one per Tensor argument of forward, in order, each of
/// that argument's shape and dtype, or an undefined Tensor for none (or for a gradient that is
/// zero). Tensors saved with
/// save_for_backward are checked for in-place changes like a built-in op's. A backward written
/// with loom's ops supports create_graph; one that is not is named in an error if asked.
#pragma once
#include <any>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "profiler.hpp"
#include "tape.hpp"

namespace loom::autograd {

/// What a Function's forward and backward share, as libtorch's torch::autograd::AutogradContext: tensors saved for backward and any other values.
class AutogradContext {
public:
    /// In forward: the tensors backward will read (inputs or outputs).
    void save_for_backward(std::vector<Tensor> tensors) { to_save_ = std::move(tensors); }
    /// In backward: the saved tensors, in the order given.
    const std::vector<Tensor>& get_saved_variables() const { return saved_; }
    /// In backward: whether Tensor argument k of forward wants a gradient.
    bool needs_input_grad(std::size_t k) const { return k < needs_.size() && needs_[k]; }
    /// In backward: whether backward is being recorded (create_graph).
    bool create_graph() const { return create_graph_; }
    /// Anything else forward wants to hand to backward (sizes, flags), by name.
    std::map<std::string, std::any> saved_data;

private:
    template <class Op> friend struct Function;
    std::vector<Tensor> to_save_, saved_;
    std::vector<bool> needs_;
    bool create_graph_ = false;
};

namespace detail {

template <class A> void collect_tensor(std::vector<Tensor>& out, const A& arg)
{
    if constexpr (std::is_same_v<std::decay_t<A>, Tensor>) out.push_back(arg);
}

inline std::vector<Tensor> as_outputs(const Tensor& t) { return {t}; }
inline std::vector<Tensor> as_outputs(const std::vector<Tensor>& ts) { return ts; }

/// Tensor arguments are what the tape tracks; tensors inside a container would be read by
/// forward but never receive a gradient, so they are refused at compile time.
template <class A> constexpr bool is_tensor_container_v = false;
template <class A> constexpr bool is_tensor_container_v<std::vector<A>> = std::is_same_v<std::decay_t<A>, Tensor>;
template <class A> concept TensorNotInsideAVector = !is_tensor_container_v<std::decay_t<A>>;

}  // namespace detail

/// A custom op defined by a class with static forward and backward, as libtorch's torch::autograd::Function; call it as Op::apply(args...).
template <class Op> struct Function {
    /// Tensors go to forward as Tensor arguments, one each: a std::vector<Tensor> argument does
    /// not compile, as its tensors would get no gradient.
    template <detail::TensorNotInsideAVector... Args> static auto apply(Args&&... args)
    {
        const detail::ProfiledOp profiled(Op::name);
        std::vector<Tensor> inputs;
        (detail::collect_tensor(inputs, args), ...);
        auto ctx = std::make_shared<AutogradContext>();
        using Result = std::decay_t<decltype(Op::forward(ctx.get(), std::forward<Args>(args)...))>;
        static_assert(std::is_same_v<Result, Tensor> || std::is_same_v<Result, std::vector<Tensor>>,
                      "forward must return a Tensor or a std::vector<Tensor>");
        Result result;
        {
            NoGradGuard no_grad;
            const detail::InnerOps inner;
            result = Op::forward(ctx.get(), std::forward<Args>(args)...);
        }
        std::vector<Tensor> outputs = detail::as_outputs(result);
        detail::prepare_custom_outputs(Op::name, outputs);
        const std::vector<Tensor> saved = std::move(ctx->to_save_);
        ctx->to_save_.clear();  // the entry holds them now; the context must not keep an output alive
        if (should_record(inputs)) {
            std::vector<std::pair<Shape, DType>> output_types;
            for (const Tensor& o : outputs) output_types.emplace_back(o.sizes(), o.dtype());
            push_entry(Op::name, inputs, outputs, saved, detail::as_backward_fn([ctx, output_types](const BackwardContext& c) {
                std::vector<Tensor> grad_outputs;
                for (std::size_t k = 0; k < c.grads.size(); ++k)
                    grad_outputs.push_back(c.grads[k].defined() ? c.grads[k]
                                                                : zeros(output_types[k].first, output_types[k].second));
                ctx->saved_.assign(c.saved.begin(), c.saved.end());
                ctx->needs_.resize(c.needs.size());
                for (std::size_t k = 0; k < c.needs.size(); ++k) ctx->needs_[k] = c.needs[k];
                ctx->create_graph_ = c.create_graph;
                std::vector<Tensor> grads = Op::backward(ctx.get(), grad_outputs);
                ctx->saved_.clear();
                return grads;
            }), /*custom=*/true);
        } else if (anomaly_mode_enabled()) {
            for (const Tensor& o : outputs) check_forward_anomaly(Op::name, o, 0);
        }
        if constexpr (std::is_same_v<Result, Tensor>) return outputs[0];
        else return outputs;
    }
};

}  // namespace loom::autograd
