#include "module.hpp"

#include <cxxabi.h>

#include <cstdlib>
#include <set>
#include <typeinfo>

namespace loom::nn {

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

void Module::collect(const std::string& prefix, bool parameters, NamedTensors& out) const
{
    for (const auto& [name, t] : parameters ? parameters_ : buffers_) out.emplace_back(prefix + name, t);
    for (const auto& [name, child] : children_) child->collect(prefix + name + ".", parameters, out);
}

NamedTensors Module::named_parameters() const
{
    NamedTensors out;
    collect("", true, out);
    return out;
}

NamedTensors Module::named_buffers() const
{
    NamedTensors out;
    collect("", false, out);
    return out;
}

std::vector<Tensor> Module::parameters() const
{
    std::vector<Tensor> out;
    for (auto& [_, p] : named_parameters()) out.push_back(p);
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
    d.storage = s.storage;
    d.shape = s.shape;
    d.strides = s.strides;
    d.offset = s.offset;
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
    for (auto& [name, p] : named_parameters()) dict.emplace(name, p.detach());
    for (auto& [name, b] : named_buffers()) dict.emplace(name, b);
    return dict;
}

void Module::load_state_dict(const NamedTensorMap& dict, bool strict)
{
    NamedTensors own = named_parameters();
    for (auto& b : named_buffers()) own.push_back(b);
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

std::string Module::summary() const
{
    struct Row {
        std::string module, name, shape, count;
    };
    std::vector<Row> rows;
    const auto visit = [&](const auto& self, const Module& m, const std::string& path) -> void {
        for (const auto& [name, p] : m.parameters_)
            rows.push_back({path.empty() ? m.type_name() : fmt::format("{} ({})", path, m.type_name()), name,
                            fmt::format("{}", p.sizes()), fmt::format("{}", p.numel())});
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
    out += fmt::format("total: {} parameters in {} tensors\n", parameter_count(), rows.size());
    return out;
}

}  // namespace loom::nn
