// nn::Module: named parameters, buffers and child modules, as in PyTorch.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "../autograd/ops.hpp"
#include "../autograd/tape.hpp"

namespace loom::nn {

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

class Module {
public:
    virtual ~Module() = default;
    Module() = default;
    Module(const Module&) = delete;
    Module& operator=(const Module&) = delete;

    // Parameters in registration order, named through children: "encoder.rnn.weight_ih_l0".
    NamedTensors named_parameters() const;
    std::vector<Tensor> parameters() const;
    NamedTensors named_buffers() const;
    std::vector<std::pair<std::string, std::shared_ptr<Module>>> named_children() const { return children_; }
    std::int64_t parameter_count() const;

    void train(bool on = true);
    void eval() { train(false); }
    bool is_training() const { return training_; }
    void zero_grad();
    // Converts every parameter and floating buffer in place: handles held elsewhere see the change.
    void to(DType dtype);

    // Parameters and buffers by dotted name, sharing storage with the module.
    NamedTensorMap state_dict() const;
    // Copies values in. Every missing key, unexpected key and shape mismatch is reported in one
    // error, and nothing is copied unless everything matches. strict=false ignores missing and
    // unexpected keys (shapes must still match).
    void load_state_dict(const NamedTensorMap& dict, bool strict = true);

    // Adds a child from outside, for modules assembled by code rather than by a constructor.
    void register_child(std::string name, std::shared_ptr<Module> child) { register_module(std::move(name), std::move(child)); }

    // A table of the parameters: module path and type, name, shape, count, and the total.
    std::string summary() const;
    // The type shown by summary(): the class name without its namespace.
    virtual std::string type_name() const;

protected:
    Tensor register_parameter(std::string name, Tensor value, bool requires_grad = true);
    Tensor register_buffer(std::string name, Tensor value);
    template <class M> std::shared_ptr<M> register_module(std::string name, std::shared_ptr<M> module)
    {
        check_name(name);
        children_.emplace_back(std::move(name), module);
        return module;
    }

private:
    void check_name(const std::string& name) const;
    void collect(const std::string& prefix, bool parameters, NamedTensors& out) const;

    NamedTensors parameters_, buffers_;
    std::vector<std::pair<std::string, std::shared_ptr<Module>>> children_;
    bool training_ = true;
};

// A module that maps one tensor to one tensor; what Sequential chains.
class Layer : public Module {
public:
    virtual Tensor forward(const Tensor& x) = 0;
    Tensor operator()(const Tensor& x) { return forward(x); }
};

}  // namespace loom::nn
