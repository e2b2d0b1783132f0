/// \file
/// nn::Module: named parameters, buffers and child modules, as in PyTorch.
#pragma once
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "../autograd/ops.hpp"
#include "../autograd/tape.hpp"

namespace loom::nn {

/// Named tensors, in order.
using NamedTensors = std::vector<std::pair<std::string, Tensor>>;
/// Tensors, in order.
using Tensors = std::vector<Tensor>;

class Module;

/// Hooks see a module's call as flat lists of tensors: a Layer's (x) -> (y), a Cell's
/// (x, state...) -> (state...), a recurrent layer's (input, lengths, initial...) ->
/// (output, final state...); an argument not given is an undefined tensor.
/// A pre-hook may replace inputs, a forward hook outputs (same count, any shape); a backward
/// hook gets the gradients w.r.t. the outputs (undefined where none arrived) and may replace
/// those w.r.t. the inputs that require grad (undefined where an input does not), each with
/// the input's shape and dtype.
using ForwardPreHook = std::function<void(Module& module, Tensors& inputs)>;
/// Called after forward with the module, its inputs and its outputs (which it may replace).
using ForwardHook = std::function<void(Module& module, const Tensors& inputs, Tensors& outputs)>;
/// Called in backward with the gradients of the module's inputs (which it may replace) and of its outputs.
using BackwardHook = std::function<void(Module& module, Tensors& grad_inputs, const Tensors& grad_outputs)>;

namespace detail {
struct ModuleHooks;
}

/// Returned by register_*_hook; remove() takes the hook off (again is a no-op; safe after the
/// module is gone).
class RemovableHandle {
public:
    RemovableHandle() = default;
    /// A handle on hook `id`.
    RemovableHandle(std::weak_ptr<detail::ModuleHooks> hooks, std::uint64_t id) : hooks_(std::move(hooks)), id_(id) {}
    /// Removes the hook; removing twice does nothing.
    void remove();

private:
    std::weak_ptr<detail::ModuleHooks> hooks_;
    std::uint64_t id_ = 0;
};

/// The base of every layer and model, as torch::nn::Module: parameters, buffers and submodules by name, training mode, hooks, state dicts.
class Module {
public:
    virtual ~Module();
    Module() = default;
    Module(const Module&) = delete;
    Module& operator=(const Module&) = delete;

    /// Parameters in registration order, named through children: "encoder.rnn.weight_ih_l0";
    /// with recurse=false this module's own only. A tensor registered in two places (tied
    /// weights) is one parameter, listed once under its first name, unless remove_duplicate is
    /// false (PyTorch's named_parameters(remove_duplicate=False)).
    NamedTensors named_parameters(bool recurse = true, bool remove_duplicate = true) const;
    /// Every parameter, a shared one once.
    std::vector<Tensor> parameters(bool recurse = true) const;
    /// Buffers with their dotted names.
    NamedTensors named_buffers(bool recurse = true, bool remove_duplicate = true) const;
    /// The direct submodules with their names.
    std::vector<std::pair<std::string, std::shared_ptr<Module>>> named_children() const { return children_; }
    /// Number of elements of all parameters, a shared one counted once.
    std::int64_t parameter_count() const;

    /// Training mode on (or off) for this module and every submodule.
    void train(bool on = true);
    /// Evaluation mode: train(false).
    void eval() { train(false); }
    /// Whether in training mode.
    bool is_training() const { return training_; }
    /// Forgets every parameter's gradient.
    void zero_grad();
    /// Converts every parameter and floating buffer in place: handles held elsewhere see the change.
    /// Each counts as written (its version goes up), so a backward of a graph recorded before
    /// refuses rather than sweep with the new values.
    void to(DType dtype);

    /// Parameters and buffers by dotted name, sharing storage with the module; a tied tensor
    /// appears under each of its names, as in PyTorch.
    NamedTensorMap state_dict() const;
    /// Copies values in. Every missing key, unexpected key and shape mismatch is reported in one
    /// error, and nothing is copied unless everything matches. strict=false ignores missing and
    /// unexpected keys (shapes must still match).
    void load_state_dict(const NamedTensorMap& dict, bool strict = true);

    /// Adds a child from outside, for modules assembled by code rather than by a constructor.
    void register_child(std::string name, std::shared_ptr<Module> child) { register_module(std::move(name), std::move(child)); }

    /// What this module's call runs besides its tensors, one line per module of its tree in
    /// registration order: "cell_l0.gate (Dense): training, hooks 1 2", so that a forward run
    /// again (a checkpointed layer's) can check that it runs the same code.
    std::vector<std::string> call_state() const;

    /// A table of the parameters: module path and type, name, shape, count, and the total.
    std::string summary() const;
    /// The type shown by summary(): the class name without its namespace.
    virtual std::string type_name() const;

    /// Hooks run by the module's call operator (not by calling forward() directly), in
    /// registration order; as PyTorch's register_forward_pre_hook, register_forward_hook and
    /// register_full_backward_hook.
    RemovableHandle register_forward_pre_hook(ForwardPreHook hook);
    /// Calls `hook` after each forward; returns a handle that removes it.
    RemovableHandle register_forward_hook(ForwardHook hook);
    /// Calls `hook` in backward with the gradients of the module's inputs and outputs; returns a handle that removes it.
    RemovableHandle register_full_backward_hook(BackwardHook hook);

    /// Runs `forward` on `inputs` through this module's hooks; straight through when it has none.
    /// For a module's call operator (and helpers that build one).
    Tensors call_with_hooks(Tensors inputs, const std::function<Tensors(const Tensors&)>& forward);
    /// Whether any forward or backward hook is registered.
    bool has_hooks() const;
    /// Whether this module or any module below it has a hook.
    bool tree_has_hooks() const;

protected:

    /// Registers a parameter (requiring grad unless told otherwise) and returns it.
    Tensor register_parameter(std::string name, Tensor value, bool requires_grad = true);
    /// Registers a buffer (state that is not trained, such as running statistics) and returns it.
    Tensor register_buffer(std::string name, Tensor value);
    /// Registers a submodule and returns it.
    template <class M> std::shared_ptr<M> register_module(std::string name, std::shared_ptr<M> module)
    {
        check_name(name);
        children_.emplace_back(std::move(name), module);
        return module;
    }

private:
    void check_name(const std::string& name) const;
    void collect(const std::string& prefix, bool parameters, bool recurse, NamedTensors& out) const;
    NamedTensors named(bool parameters, bool recurse, bool remove_duplicate) const;

    NamedTensors parameters_, buffers_;
    std::vector<std::pair<std::string, std::shared_ptr<Module>>> children_;
    bool training_ = true;
    std::shared_ptr<detail::ModuleHooks> hooks_;  ///< null until a hook is registered
};

/// A module that maps one tensor to one tensor; what Sequential chains.
class Layer : public Module {
public:
    /// The module's computation.
    virtual Tensor forward(const Tensor& x) = 0;
    /// forward(), with the module's hooks.
    Tensor operator()(const Tensor& x)
    {
        if (!has_hooks()) return forward(x);
        return call_with_hooks({x}, [this](const Tensors& in) { return Tensors{forward(in[0])}; })[0];
    }
};

}  // namespace loom::nn
