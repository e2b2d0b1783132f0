#include "module.hpp"

#include <cxxabi.h>

#include <algorithm>
#include <cstdlib>
#include <set>
#include <typeinfo>

namespace loom::nn {

namespace detail {

template <class Hook> struct HookList {
    std::vector<std::pair<std::uint64_t, Hook>> items;
    bool empty() const { return items.empty(); }
};

struct ModuleHooks {
    Module* owner = nullptr;  // cleared when the module is destroyed: a pending backward then skips its hooks
    std::uint64_t next_id = 1;
    HookList<ForwardPreHook> pre;
    HookList<ForwardHook> forward;
    HookList<BackwardHook> backward;
    bool empty() const { return pre.empty() && forward.empty() && backward.empty(); }
    void remove(std::uint64_t id)
    {
        const auto drop = [id](auto& list) {
            std::erase_if(list.items, [id](const auto& item) { return item.first == id; });
        };
        drop(pre);
        drop(forward);
        drop(backward);
    }
};

}  // namespace detail

void RemovableHandle::remove()
{
    if (auto hooks = hooks_.lock()) hooks->remove(id_);
    hooks_.reset();
}

Module::~Module()
{
    if (hooks_) hooks_->owner = nullptr;
}

namespace {

template <class Hook>
RemovableHandle add_hook(std::shared_ptr<detail::ModuleHooks>& hooks, Module* owner,
                         detail::HookList<Hook> detail::ModuleHooks::*list, Hook hook, const char* op)
{
    LOOM_CHECK(hook != nullptr, op, "the hook is empty");
    if (!hooks) {
        hooks = std::make_shared<detail::ModuleHooks>();
        hooks->owner = owner;
    }
    const std::uint64_t id = hooks->next_id++;
    ((*hooks).*list).items.emplace_back(id, std::move(hook));
    return RemovableHandle(hooks, id);
}

// What the two identity entries around a hooked call share.
struct BackwardHookCall {
    std::shared_ptr<detail::ModuleHooks> hooks;
    std::string module;                  // for errors
    Tensors grad_outputs;
    std::vector<std::size_t> positions;  // which inputs pass through the input entry
    std::size_t input_count = 0;
    std::vector<std::pair<Shape, DType>> input_types;

    // Runs the backward hooks on grad_inputs (one per input of the call), checking what they leave.
    void fire(Tensors& grad_inputs) const
    {
        Module* owner = hooks->owner;
        if (!owner) return;
        const auto list = hooks->backward.items;  // a copy: a hook may remove itself
        for (const auto& [id, hook] : list) {
            hook(*owner, grad_inputs, grad_outputs);
            LOOM_CHECK(grad_inputs.size() == input_count, module,
                       "a backward hook left {} input gradients, expected {} (one per input of the call)",
                       grad_inputs.size(), input_count);
            for (std::size_t k = 0; k < input_count; ++k) {
                const auto at = std::find(positions.begin(), positions.end(), k);
                if (at == positions.end()) {
                    LOOM_CHECK(!grad_inputs[k].defined(), module,
                               "a backward hook set a gradient for input {}, which does not require grad", k);
                    continue;
                }
                const auto& [shape, dtype] = input_types[k];
                LOOM_CHECK(!grad_inputs[k].defined() || (grad_inputs[k].sizes() == shape && grad_inputs[k].dtype() == dtype),
                           module,
                           "a backward hook returned a gradient of shape {} and dtype {} for input {}, expected shape "
                           "{} and dtype {} like the input",
                           grad_inputs[k].sizes(), grad_inputs[k].dtype(), k, shape, dtype);
            }
        }
    }
};

// Puts `tensors` (those at `positions`) through one identity entry whose backward calls `on_grads`
// with their gradients and returns what it leaves.
void identity_entry(const char* name, Tensors& tensors, const std::vector<std::size_t>& positions,
                    std::function<void(Tensors&)> on_grads)
{
    Tensors inputs, outputs;
    for (std::size_t k : positions) {
        inputs.push_back(tensors[k]);
        outputs.push_back(tensors[k].detach());
    }
    autograd::push_entry(name, inputs, outputs, {}, autograd::detail::as_backward_fn([on_grads](const autograd::BackwardContext& c) {
        Tensors grads(c.grads.begin(), c.grads.end());
        on_grads(grads);
        return grads;
    }));
    for (std::size_t i = 0; i < positions.size(); ++i) tensors[positions[i]] = outputs[i];
}

}  // namespace

RemovableHandle Module::register_forward_pre_hook(ForwardPreHook hook)
{
    return add_hook(hooks_, this, &detail::ModuleHooks::pre, std::move(hook), "register_forward_pre_hook");
}
RemovableHandle Module::register_forward_hook(ForwardHook hook)
{
    return add_hook(hooks_, this, &detail::ModuleHooks::forward, std::move(hook), "register_forward_hook");
}
RemovableHandle Module::register_full_backward_hook(BackwardHook hook)
{
    return add_hook(hooks_, this, &detail::ModuleHooks::backward, std::move(hook), "register_full_backward_hook");
}

bool Module::has_hooks() const { return hooks_ && !hooks_->empty(); }

bool Module::tree_has_hooks() const
{
    return has_hooks() || std::any_of(children_.begin(), children_.end(), [](const auto& c) { return c.second->tree_has_hooks(); });
}

Tensors Module::call_with_hooks(Tensors inputs, const std::function<Tensors(const Tensors&)>& forward)
{
    if (!has_hooks()) return forward(inputs);
    const std::shared_ptr<detail::ModuleHooks> hooks = hooks_;  // a hook may remove hooks while we run
    const std::string name = type_name();
    for (const auto& [id, hook] : std::vector(hooks->pre.items)) {
        const std::size_t count = inputs.size();
        std::vector<bool> defined;
        for (const Tensor& t : inputs) defined.push_back(t.defined());
        hook(*this, inputs);
        LOOM_CHECK(inputs.size() == count, name, "a forward pre-hook changed the number of inputs from {} to {}", count,
                   inputs.size());
        for (std::size_t k = 0; k < count; ++k)
            LOOM_CHECK(inputs[k].defined() || !defined[k], name,
                       "a forward pre-hook left input {} an undefined tensor; a hook may replace an input, not remove "
                       "it",
                       k);
    }
    std::shared_ptr<BackwardHookCall> call;
    if (!hooks->backward.empty() && grad_enabled()) {
        call = std::make_shared<BackwardHookCall>();
        call->hooks = hooks;
        call->module = name;
        call->input_count = inputs.size();
        for (std::size_t k = 0; k < inputs.size(); ++k) {
            call->input_types.emplace_back(inputs[k].defined() ? inputs[k].sizes() : Shape{},
                                           inputs[k].defined() ? inputs[k].dtype() : kFloat32);
            if (inputs[k].defined() && inputs[k].requires_grad()) call->positions.push_back(k);
        }
        if (!call->positions.empty())
            identity_entry("backward hook (inputs)", inputs, call->positions, [call](Tensors& grads) {
                Tensors grad_inputs(call->input_count);
                for (std::size_t i = 0; i < call->positions.size(); ++i) grad_inputs[call->positions[i]] = grads[i];
                call->fire(grad_inputs);
                for (std::size_t i = 0; i < call->positions.size(); ++i) grads[i] = grad_inputs[call->positions[i]];
            });
    }
    Tensors outputs = forward(inputs);
    for (const auto& [id, hook] : std::vector(hooks->forward.items)) {
        const std::size_t count = outputs.size();
        std::vector<bool> defined;
        for (const Tensor& t : outputs) defined.push_back(t.defined());
        hook(*this, inputs, outputs);
        LOOM_CHECK(outputs.size() == count, name, "a forward hook changed the number of outputs from {} to {}", count,
                   outputs.size());
        for (std::size_t k = 0; k < count; ++k)
            LOOM_CHECK(outputs[k].defined() || !defined[k], name,
                       "a forward hook left output {} an undefined tensor; a hook may replace an output, not remove it",
                       k);
    }
    if (call) {
        std::vector<std::size_t> recorded;
        for (std::size_t k = 0; k < outputs.size(); ++k)
            if (outputs[k].defined() && outputs[k].requires_grad()) recorded.push_back(k);
        if (!recorded.empty())
            identity_entry("backward hook (outputs)", outputs, recorded, [call, recorded, n = outputs.size()](Tensors& grads) {
                call->grad_outputs.assign(n, Tensor());
                for (std::size_t i = 0; i < recorded.size(); ++i) call->grad_outputs[recorded[i]] = grads[i];
                if (call->positions.empty()) {  // no input entry will fire them
                    Tensors none(call->input_count);
                    call->fire(none);
                }
            });
    }
    return outputs;
}

void Module::check_name(const std::string& name) const
{
    LOOM_CHECK(!name.empty() && name.find('.') == std::string::npos, "register",
               "name \"{}\" must be non-empty and contain no '.'", name);
    const auto taken = [&](const auto& list) {
        for (const auto& [n, _] : list)
            if (n == name) return true;
        return false;
    };
    LOOM_CHECK(!taken(parameters_) && !taken(buffers_) && !taken(children_), "register",
               "name \"{}\" is already registered in this module", name);
}

Tensor Module::register_parameter(std::string name, Tensor value, bool requires_grad)
{
    check_name(name);
    LOOM_CHECK(value.defined() && is_floating(value.dtype()), "register_parameter",
               "parameter \"{}\" must be a float32 or float64 tensor", name);
    Tensor p = value.is_leaf() ? value : value.detach();
    if (requires_grad) p.requires_grad_();
    parameters_.emplace_back(std::move(name), p);
    return p;
}

Tensor Module::register_buffer(std::string name, Tensor value)
{
    check_name(name);
    LOOM_CHECK(value.defined(), "register_buffer", "buffer \"{}\" is undefined", name);
    buffers_.emplace_back(std::move(name), value);
    return value;
}

void Module::collect(const std::string& prefix, bool parameters, bool recurse, NamedTensors& out) const
{
    for (const auto& [name, t] : parameters ? parameters_ : buffers_) out.emplace_back(prefix + name, t);
    if (recurse)
        for (const auto& [name, child] : children_) child->collect(prefix + name + ".", parameters, true, out);
}

NamedTensors Module::named(bool parameters, bool recurse, bool remove_duplicate) const
{
    NamedTensors all;
    collect("", parameters, recurse, all);
    if (!remove_duplicate) return all;
    NamedTensors once;
    std::set<const TensorImpl*> seen;
    for (auto& entry : all)
        if (seen.insert(&entry.second.impl()).second) once.push_back(std::move(entry));
    return once;
}

NamedTensors Module::named_parameters(bool recurse, bool remove_duplicate) const
{
    return named(true, recurse, remove_duplicate);
}

NamedTensors Module::named_buffers(bool recurse, bool remove_duplicate) const
{
    return named(false, recurse, remove_duplicate);
}

std::vector<Tensor> Module::parameters(bool recurse) const
{
    std::vector<Tensor> out;
    for (auto& [_, p] : named_parameters(recurse)) out.push_back(p);
    return out;
}

std::int64_t Module::parameter_count() const
{
    std::int64_t n = 0;
    for (const auto& p : parameters()) n += p.numel();
    return n;
}

void Module::train(bool on)
{
    training_ = on;
    for (auto& [_, child] : children_) child->train(on);
}

void Module::zero_grad()
{
    for (auto& p : parameters()) p.zero_grad();
}

namespace {

// Replaces what `dst` holds with `src`'s data, keeping the handle (and so every copy of it).
void replace_data(const Tensor& dst, const Tensor& src)
{
    TensorImpl& d = dst.impl();
    const TensorImpl& s = src.impl();
    // The new bytes count as a write: a tape entry that saved dst before sees it changed and
    // refuses to sweep with them, whatever version it was saved at.
    const std::uint64_t written = dst.version() + 1;
    loom::detail::share_storage(dst, src);
    d.storage->version = written;
    d.set_layout(s.shape, s.strides());
    d.data = s.data;  // dst shares src's storage now
    d.dtype = s.dtype;
    if (d.node) {
        d.node->dtype = s.dtype;
        d.node->grad = Tensor();
    }
}

}  // namespace

void Module::to(DType dtype)
{
    LOOM_CHECK(is_floating(dtype), "Module::to", "expects float32 or float64, got {}", dtype);
    NoGradGuard no_grad;
    for (auto& [_, p] : named_parameters()) replace_data(p, p.to(dtype).contiguous().clone());
    for (auto& [_, b] : named_buffers())
        if (is_floating(b.dtype())) replace_data(b, b.to(dtype).contiguous().clone());
}

NamedTensorMap Module::state_dict() const
{
    NamedTensorMap dict;
    for (auto& [name, p] : named_parameters(true, false)) dict.emplace(name, p.detach());
    for (auto& [name, b] : named_buffers(true, false)) dict.emplace(name, b);
    return dict;
}

void Module::load_state_dict(const NamedTensorMap& dict, bool strict)
{
    NamedTensors own = named_parameters(true, false);  // every name of a tied tensor: state_dict() has each
    for (auto& b : named_buffers(true, false)) own.push_back(b);
    std::vector<std::string> missing, unexpected, mismatched;
    std::set<std::string> known;
    for (const auto& [name, t] : own) {
        known.insert(name);
        const auto it = dict.find(name);
        if (it == dict.end()) {
            missing.push_back(name);
        } else if (!it->second.defined()) {
            mismatched.push_back(fmt::format("{} (an undefined tensor)", name));
        } else if (it->second.sizes() != t.sizes()) {
            mismatched.push_back(fmt::format("{} (file {}, module {})", name, it->second.sizes(), t.sizes()));
        } else if (!is_floating(it->second.dtype()) && is_floating(t.dtype())) {
            mismatched.push_back(fmt::format("{} (file dtype {}, module {})", name, it->second.dtype(), t.dtype()));
        }
    }
    for (const auto& [name, _] : dict)
        if (!known.count(name)) unexpected.push_back(name);
    std::string problems;
    if (strict && !missing.empty()) problems += fmt::format("\n  missing keys: {}", fmt::join(missing, ", "));
    if (strict && !unexpected.empty()) problems += fmt::format("\n  unexpected keys: {}", fmt::join(unexpected, ", "));
    if (!mismatched.empty()) problems += fmt::format("\n  shape or dtype mismatches: {}", fmt::join(mismatched, ", "));
    LOOM_CHECK(problems.empty(), "load_state_dict", "the state dict does not match the {}:{}", type_name(), problems);
    NoGradGuard no_grad;
    for (auto& [name, t] : own) {
        const auto it = dict.find(name);
        if (it != dict.end()) Tensor(t).copy_(it->second);  // converts dtype to the module's
    }
}

std::string Module::type_name() const
{
    int status = 0;
    char* demangled = abi::__cxa_demangle(typeid(*this).name(), nullptr, nullptr, &status);
    std::string name = status == 0 ? demangled : typeid(*this).name();
    std::free(demangled);
    const auto colon = name.rfind("::");
    return colon == std::string::npos ? name : name.substr(colon + 2);
}

std::vector<std::string> Module::call_state() const
{
    std::vector<std::string> lines;
    const auto visit = [&](const auto& self, const Module& m, const std::string& path) -> void {
        std::string hooks;
        const auto ids = [&](const auto& list) {
            for (const auto& item : list.items) hooks += fmt::format(" {}", item.first);
        };
        if (m.hooks_) {
            ids(m.hooks_->pre);
            ids(m.hooks_->forward);
            ids(m.hooks_->backward);
        }
        lines.push_back(fmt::format("{} ({}): {}, hooks{}", path.empty() ? "the module" : path, m.type_name(),
                                    m.training_ ? "training" : "eval", hooks.empty() ? " none" : hooks));
        for (const auto& [name, child] : m.children_) self(self, *child, path.empty() ? name : path + "." + name);
    };
    visit(visit, *this, "");
    return lines;
}

std::string Module::summary() const
{
    struct Row {
        std::string module, name, shape, count;
    };
    std::vector<Row> rows;
    std::map<const TensorImpl*, std::string> first_name;  // a tied tensor is counted where first met
    std::size_t tensors = 0;
    const auto visit = [&](const auto& self, const Module& m, const std::string& path) -> void {
        for (const auto& [name, p] : m.parameters_) {
            const std::string full = path.empty() ? name : path + "." + name;
            const auto [it, first] = first_name.emplace(&p.impl(), full);
            tensors += first;
            rows.push_back({path.empty() ? m.type_name() : fmt::format("{} ({})", path, m.type_name()), name,
                            fmt::format("{}", p.sizes()),
                            first ? fmt::format("{}", p.numel()) : fmt::format("tied to {}", it->second)});
        }
        for (const auto& [name, child] : m.children_) self(self, *child, path.empty() ? name : path + "." + name);
    };
    visit(visit, *this, "");
    std::size_t w[3] = {6, 9, 5};
    for (const auto& r : rows) {
        w[0] = std::max(w[0], r.module.size());
        w[1] = std::max(w[1], r.name.size());
        w[2] = std::max(w[2], r.shape.size());
    }
    std::string out = fmt::format("{:<{}}  {:<{}}  {:<{}}  {:>10}\n", "module", w[0], "parameter", w[1], "shape",
                                  w[2], "count");
    out += std::string(w[0] + w[1] + w[2] + 16, '-') + "\n";
    for (const auto& r : rows)
        out += fmt::format("{:<{}}  {:<{}}  {:<{}}  {:>10}\n", r.module, w[0], r.name, w[1], r.shape, w[2], r.count);
    out += std::string(w[0] + w[1] + w[2] + 16, '-') + "\n";
    out += fmt::format("total: {} parameters in {} tensors\n", parameter_count(), tensors);
    return out;
}

}  // namespace loom::nn
