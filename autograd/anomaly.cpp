// Anomaly mode and scopes: thread-local like the tape.
#include "tape_internal.hpp"
#include "profiler.hpp"

#include <cmath>

#include "../core/kernels.hpp"

namespace loom::autograd {

constinit thread_local int detail::anomaly_guards [[gnu::tls_model("initial-exec")]] = 0;
// While a backward function or a custom op's forward runs, the ops it calls are not checked on
// their own: what the op returns is checked, naming the op rather than a helper inside it.
constinit thread_local int detail::inner_ops_depth [[gnu::tls_model("initial-exec")]] = 0;

namespace {
using detail::anomaly_guards;
thread_local std::vector<std::pair<std::uint64_t, std::string>> scope_parts;  // (the Scope's id, its name)
thread_local std::uint64_t next_scope_id = 1;
thread_local std::shared_ptr<const std::string> scope_path_now;  // null outside any Scope
}  // namespace

namespace engine {

constinit thread_local const std::shared_ptr<const std::string>* scope_path_set [[gnu::tls_model("initial-exec")]] =
    nullptr;

std::string scope_phrase(const std::shared_ptr<const std::string>& scope)
{
    return scope ? fmt::format(", in scope '{}'", *scope) : std::string();
}

// Index and value of the first NaN or Inf in t, if any.
std::optional<std::pair<std::int64_t, double>> first_non_finite(const Tensor& t)
{
    if (!t.defined() || !is_floating(t.dtype())) return std::nullopt;
    const Tensor c = kernels::contiguous(t);
    std::optional<std::pair<std::int64_t, double>> found;
    dispatch_floating("anomaly", c.dtype(), [&]<class T>() {
        const T* p = c.data_ptr<T>();
        for (std::int64_t i = 0; i < c.numel(); ++i)
            if (!std::isfinite(p[i])) {
                found = std::pair{i, static_cast<double>(p[i])};
                return;
            }
    });
    return found;
}

// Throws in anomaly mode when a gradient that entry `seq` produced holds a NaN or Inf.
void check_backward_anomaly(const char* name, std::uint64_t seq, const std::shared_ptr<const std::string>& scope,
                            std::size_t input, const Tensor& g)
{
    const auto bad = first_non_finite(g);
    if (!bad) return;
    fail("anomaly", "backward of '{}' (tape entry #{}{}) produced {} in the gradient of its input {} (shape {}, at flat "
         "index {})",
         name, seq, scope_phrase(scope), bad->second, input, g.sizes(), bad->first);
}

}  // namespace engine

void check_forward_anomaly(const char* op, const Tensor& output, std::uint64_t seq)
{
    const auto bad = engine::first_non_finite(output);
    if (!bad) return;
    fail("anomaly", "forward of '{}' ({}{}) produced {} at flat index {} of its output of shape {}", op,
         seq ? fmt::format("tape entry #{}", seq) : std::string("not recorded: no input requires grad"),
         engine::scope_phrase(scope_path_now), bad->second, bad->first, output.sizes());
}


DetectAnomalyGuard::DetectAnomalyGuard() { ++anomaly_guards; }
DetectAnomalyGuard::~DetectAnomalyGuard() { --anomaly_guards; }

namespace {
void rebuild_scope_path()
{
    if (scope_parts.empty()) {
        engine::scope_path_set = nullptr;
        scope_path_now.reset();
        return;
    }
    std::string path = scope_parts[0].second;
    for (std::size_t i = 1; i < scope_parts.size(); ++i) path += "/" + scope_parts[i].second;
    scope_path_now = std::make_shared<const std::string>(std::move(path));
    engine::scope_path_set = &scope_path_now;
}
}  // namespace

Scope::Scope(std::string name) : id_(next_scope_id++)
{
    scope_parts.emplace_back(id_, std::move(name));
    rebuild_scope_path();
    profile_event_ = detail::begin_scope_event(scope_parts.back().second);
}
Scope::~Scope()
{
    detail::end_scope_event(profile_event_);
    // Its own part, wherever it is: a Scope may be destroyed out of order (held in a container).
    std::erase_if(scope_parts, [this](const auto& part) { return part.first == id_; });
    rebuild_scope_path();
}
std::string current_scope() { return scope_path_now ? *scope_path_now : std::string(); }

}  // namespace loom::autograd
