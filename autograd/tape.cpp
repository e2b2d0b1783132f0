#include "tape.hpp"

#include <algorithm>
#include <atomic>
#include <mutex>
#include <unordered_map>

#include "../core/allocator.hpp"
#include "../core/kernels.hpp"

namespace loom {

namespace {

// initial-exec: libloom is linked, not dlopen()ed, and the general model costs a call (__tls_get_addr)
// on every op.
[[gnu::tls_model("initial-exec")]] thread_local bool grad_mode = true;

std::atomic<std::uint64_t> next_tape_id{1};

struct Tape {
    std::vector<autograd::Entry> entries;  // in recording order: seq increases
    std::uint64_t next_seq = 1;
    std::size_t compact_at = 1024;
    std::uint64_t id = next_tape_id++;
};
[[gnu::tls_model("initial-exec")]] thread_local Tape tape;

// Guards every leaf's .grad(): threads may backpropagate into shared parameters at once.
std::mutex leaf_grad_mutex;

Tensor add_values(const Tensor& a, const Tensor& b)
{
    return kernels::zip_floating("accumulate gradient", a, b, [](auto x, auto y) { return x + y; });
}

// node.grad += g, as a new tensor: .grad() may be held by the user, so it is never written in place.
void accumulate_grad(autograd::Node& node, const Tensor& g)
{
    node.grad = node.grad.defined() ? add_values(node.grad, g) : kernels::clone(g);
}

void release(autograd::Entry& e)
{
    e.released = true;
    e.inputs = autograd::InputNodes();
    e.saved = {};
    e.backward = nullptr;
}

// Drops entries none of whose outputs is still alive: no gradient can reach them again.
// Walking backwards lets one pass reclaim whole dead chains.
void compact()
{
    std::vector<bool> dead(tape.entries.size(), false);
    for (std::size_t i = tape.entries.size(); i-- > 0;) {
        auto& e = tape.entries[i];
        dead[i] = std::all_of(e.outputs.begin(), e.outputs.end(), [](const auto& w) { return w.expired(); });
        if (dead[i]) release(e);
    }
    std::size_t kept = 0;
    for (std::size_t i = 0; i < tape.entries.size(); ++i)
        if (!dead[i]) {
            if (kept != i) tape.entries[kept] = std::move(tape.entries[i]);
            ++kept;
        }
    tape.entries.resize(kept);
}

void check_gradient(std::string_view op, const autograd::Node& node, const Tensor& g, std::string_view what)
{
    LOOM_CHECK(g.sizes() == node.shape && g.dtype() == node.dtype, op,
               "{} has shape {} and dtype {}, expected shape {} and dtype {}", what, g.sizes(), g.dtype(), node.shape,
               node.dtype);
}

Tensor apply_hooks(const autograd::Node& node, Tensor g)
{
    for (const auto& hook : node.hooks) {
        Tensor replaced = hook(g);
        if (replaced.defined()) {
            check_gradient("hook", node, replaced, "the gradient a hook returned");
            g = replaced;
        }
    }
    return g;
}

// One reverse sweep. Gradients gather in PendingGrads: a non-leaf's own (its thread is this
// one), a leaf's in this sweep (a leaf may be shared by threads sweeping at once). The
// destructor clears them, so an error part-way leaves no stale state behind; entries are
// released only once the whole sweep has succeeded, so a failed backward can be retried.
struct Sweep {
    std::vector<std::shared_ptr<autograd::Node>> touched;
    std::unordered_map<const autograd::Node*, autograd::PendingGrad> leaves;

    ~Sweep()
    {
        for (auto& n : touched)
            if (n->seq != 0) n->pending = autograd::PendingGrad();  // a leaf's lives in `leaves`
    }

    autograd::PendingGrad& pending(const std::shared_ptr<autograd::Node>& node)
    {
        if (node->seq == 0) {
            auto [it, fresh] = leaves.try_emplace(node.get());
            if (fresh) touched.push_back(node);
            return it->second;
        }
        if (!node->pending.sum.defined() && !node->pending.captured) touched.push_back(node);
        return node->pending;
    }

    // Makes p.sum a buffer of its own, so it can be added into in place.
    static void own(autograd::PendingGrad& p)
    {
        if (!p.owned) {
            p.sum = kernels::clone(p.sum);
            p.owned = true;
        }
    }

    void add(const std::shared_ptr<autograd::Node>& node, const Tensor& g)
    {
        autograd::PendingGrad& p = pending(node);
        if (!p.sum.defined()) {
            p.sum = g;  // adopted as is: it may be shared, so not owned
            p.owned = false;
            return;
        }
        own(p);
        kernels::add_into(p.sum, g);
    }

    // Adds g into region(node's gradient), creating that gradient as zeros if need be.
    void add_region(const std::shared_ptr<autograd::Node>& node, const autograd::RegionFn& region, const Tensor& g)
    {
        autograd::PendingGrad& p = pending(node);
        if (!p.sum.defined()) {
            p.sum = zeros(node->shape, node->dtype);
            p.owned = true;
            kernels::copy_into(region(p.sum), g);
            return;
        }
        own(p);
        kernels::add_into(region(p.sum), g);
    }

    void run(std::uint64_t start_seq, bool retain_graph, bool accumulate)
    {
        NoGradGuard no_grad;
        auto& entries = tape.entries;
        auto it = std::lower_bound(entries.begin(), entries.end(), start_seq,
                                   [](const autograd::Entry& e, std::uint64_t s) { return e.seq < s; });
        LOOM_CHECK(start_seq == 0 || (it != entries.end() && it->seq == start_seq), "backward",
                   "the tensor's history is not on this thread's tape (was it computed on another thread?)");
        const std::size_t start = start_seq == 0 ? 0 : static_cast<std::size_t>(it - entries.begin()) + 1;
        std::vector<std::size_t> swept;
        for (std::size_t i = start; i-- > 0;) {
            autograd::Entry& e = entries[i];
            autograd::BackwardContext ctx;
            ctx.grads.resize(e.outputs.size());
            bool reached = false;
            for (std::size_t k = 0; k < e.outputs.size(); ++k) {
                auto node = e.outputs[k].lock();
                if (!node || !node->pending.sum.defined()) continue;
                autograd::PendingGrad& p = node->pending;
                p.sum = apply_hooks(*node, p.sum);
                if (accumulate && node->retains_grad)
                    accumulate_grad(*node, p.sum);
                ctx.grads[k] = p.sum;
                if (!p.captured) p = autograd::PendingGrad();
                reached = true;
            }
            if (!reached) continue;
            LOOM_CHECK(!e.released, e.name,
                       "backward through a graph that an earlier backward() already released; pass "
                       "retain_graph=true to the earlier call to sweep the graph more than once");
            for (const auto& s : e.saved) {
                if (!s.value.defined()) {
                    ctx.saved.push_back(s.value);
                    continue;
                }
                LOOM_CHECK(s.value.version() == s.version, e.name,
                           "a tensor of shape {} saved for backward was modified in place afterwards (version {}, "
                           "saved at version {}); clone() it before modifying it",
                           s.value.sizes(), s.value.version(), s.version);
                ctx.saved.push_back(s.value);
            }
            ctx.inputs = &e.inputs;
            ctx.needs.resize(e.inputs.size());
            for (std::size_t k = 0; k < e.inputs.size(); ++k) ctx.needs[k] = e.inputs[k] != nullptr;
            const std::vector<Tensor> input_grads = e.backward(ctx);
            LOOM_CHECK(input_grads.size() == e.inputs.size(), e.name,
                       "internal: backward returned {} gradients for {} inputs", input_grads.size(), e.inputs.size());
            for (std::size_t k = 0; k < e.inputs.size(); ++k) {
                if (!e.inputs[k] || !input_grads[k].defined()) continue;
                if (e.region) {
                    add_region(e.inputs[k], e.region, input_grads[k]);
                    continue;
                }
                check_gradient(e.name, *e.inputs[k], input_grads[k], "internal: the gradient backward returned");
                add(e.inputs[k], input_grads[k]);
            }
            swept.push_back(i);
        }
        if (!retain_graph)
            for (std::size_t i : swept) release(entries[i]);
    }

    // Applies hooks to the leaves reached, once their gradient is complete.
    void finish_leaves()
    {
        for (auto& [node, p] : leaves)
            if (p.sum.defined()) p.sum = apply_hooks(*node, p.sum);
    }

    // Adds each leaf's gradient into its .grad(), under the lock that makes shared leaves safe.
    void accumulate_leaves()
    {
        std::lock_guard<std::mutex> lock(leaf_grad_mutex);
        for (auto& n : touched) {
            if (n->seq != 0) continue;
            const autograd::PendingGrad& p = leaves.at(n.get());
            if (!p.sum.defined()) continue;
            accumulate_grad(*n, p.sum);
        }
    }
};

const std::shared_ptr<autograd::Node>& node_of(std::string_view op, const Tensor& t, std::string_view what)
{
    LOOM_CHECK(t.requires_grad(), op,
               "{} does not require grad: none of the tensors it was computed from had requires_grad_() set, or "
               "it was computed under NoGradGuard",
               what);
    return t.impl().node;
}

// Backward runs on the tape that recorded the history: a non-leaf from another thread is refused.
void check_this_thread(std::string_view op, const autograd::Node& node)
{
    LOOM_CHECK(node.seq == 0 || node.tape == tape.id, op,
               "the tensor's history was recorded on another thread; each thread has its own tape, so run "
               "backward on the thread that ran forward");
}

Tensor seed_for(std::string_view op, const Tensor& output, const Tensor& gradient)
{
    if (!gradient.defined()) {
        LOOM_CHECK(output.numel() == 1, op,
                   "called on a tensor of shape {} without a gradient; reduce it to a scalar first (e.g. .sum()) "
                   "or pass a gradient of shape {}",
                   output.sizes(), output.sizes());
        return ones_like(output);
    }
    LOOM_CHECK(gradient.sizes() == output.sizes() && gradient.dtype() == output.dtype(), op,
               "the gradient has shape {} and dtype {}, expected shape {} and dtype {} like the output",
               gradient.sizes(), gradient.dtype(), output.sizes(), output.dtype());
    return gradient;
}

}  // namespace

bool grad_enabled() { return grad_mode; }
void set_grad_enabled(bool enabled) { grad_mode = enabled; }

namespace autograd {

std::size_t tape_size() { return tape.entries.size(); }

bool should_record(std::span<const Tensor> inputs)
{
    if (!grad_mode) return false;
    return std::any_of(inputs.begin(), inputs.end(), [](const Tensor& t) { return t.requires_grad(); });
}

void push_entry(const char* name, std::span<const Tensor> inputs, std::span<const Tensor> outputs,
                std::span<const Tensor> saved, BackwardFn backward)
{
    if (tape.entries.size() >= tape.compact_at) {
        compact();
        tape.compact_at = std::max<std::size_t>(1024, 2 * tape.entries.size());
    }
    Entry e;
    e.seq = tape.next_seq++;
    e.name = name;
    e.inputs.reserve(inputs.size());
    for (const Tensor& t : inputs) {
        const auto& node = t.defined() ? t.impl().node : nullptr;
        LOOM_CHECK(!node || node->seq == 0 || node->tape == tape.id, name,
                   "an input was computed on another thread, whose tape this thread cannot sweep; detach() it, or "
                   "compute it on this thread");
        e.inputs.push_back(node);
    }
    e.outputs.reserve(outputs.size());
    for (const Tensor& out : outputs) {
        LOOM_CHECK(!out.impl().node, name, "internal: an output is already on the tape");
        LOOM_CHECK(is_floating(out.dtype()), name, "internal: output of dtype {} cannot require grad", out.dtype());
        auto node = std::allocate_shared<Node>(PoolAllocator<Node>());
        node->shape = out.sizes();
        node->dtype = out.dtype();
        node->seq = e.seq;
        node->tape = tape.id;
        out.impl().node = node;
        e.outputs.push_back(node);
    }
    e.saved.reserve(saved.size());
    for (const Tensor& s : saved) {
        if (!s.defined()) {
            e.saved.push_back(Saved{Tensor(), 0});
            continue;
        }
        // A saved output is kept as an alias without its node: the entry holding the output's
        // node would otherwise keep the output alive, and the entry could never be reclaimed.
        // An input's node is held by the entry anyway, so the input itself is kept as is.
        const bool is_output = std::any_of(outputs.begin(), outputs.end(), [&](const Tensor& o) { return o.is_same(s); });
        e.saved.push_back(Saved{is_output ? kernels::alias(s) : s, s.version()});
    }
    e.backward = std::move(backward);
    tape.entries.push_back(std::move(e));
}

Tensor record_region(const char* name, const Tensor& input, Tensor output, RegionFn region)
{
    const Tensor inputs[] = {input};
    if (!should_record(inputs)) return output;
    push_entry(name, inputs, std::span<const Tensor>(&output, 1), {},
               [](const BackwardContext& c) { return std::vector<Tensor>{c.grad()}; });
    tape.entries.back().region = std::move(region);
    return output;
}

}  // namespace autograd

// ---- Tensor's autograd methods ----

Tensor& Tensor::requires_grad_(bool on)
{
    auto& node = impl().node;
    if (on) {
        LOOM_CHECK(is_floating(dtype()), "requires_grad_", "only float32 and float64 tensors can require grad, got {}",
                   dtype());
        if (!node) {
            node = std::allocate_shared<autograd::Node>(PoolAllocator<autograd::Node>());
            node->shape = sizes();
            node->dtype = dtype();
        }
    } else if (node) {
        LOOM_CHECK(node->seq == 0, "requires_grad_",
                   "cannot turn off requires_grad on a non-leaf tensor; use detach() instead");
        node.reset();
    }
    return *this;
}

bool Tensor::is_leaf() const { return !requires_grad() || impl().node->seq == 0; }

Tensor Tensor::grad() const
{
    if (!requires_grad()) return Tensor();
    std::lock_guard<std::mutex> lock(leaf_grad_mutex);
    return impl().node->grad;
}

void Tensor::set_grad(const Tensor& g) const
{
    const auto& node = node_of("set_grad", *this, "the tensor");
    if (g.defined()) check_gradient("set_grad", *node, g, "the gradient");
    std::lock_guard<std::mutex> lock(leaf_grad_mutex);
    node->grad = g;
}

void Tensor::zero_grad() const
{
    if (!requires_grad()) return;
    std::lock_guard<std::mutex> lock(leaf_grad_mutex);
    impl().node->grad = Tensor();
}

void Tensor::retain_grad() const { node_of("retain_grad", *this, "the tensor")->retains_grad = true; }

void Tensor::register_hook(std::function<Tensor(const Tensor&)> hook) const
{
    node_of("register_hook", *this, "the tensor")->hooks.push_back(std::move(hook));
}

Tensor Tensor::detach() const { return kernels::alias(*this); }

void Tensor::backward(const Tensor& gradient, bool retain_graph) const
{
    const auto& node = node_of("backward", *this, "the tensor");
    check_this_thread("backward", *node);
    Tensor seed = seed_for("backward", *this, gradient);
    Sweep sweep;
    sweep.add(node, seed);
    sweep.run(node->seq, retain_graph, /*accumulate=*/true);
    sweep.finish_leaves();
    sweep.accumulate_leaves();
}

std::vector<Tensor> grad(const std::vector<Tensor>& outputs, const std::vector<Tensor>& inputs,
                         const std::vector<Tensor>& grad_outputs, bool retain_graph, bool allow_unused)
{
    LOOM_CHECK(!outputs.empty(), "grad", "expects at least one output");
    LOOM_CHECK(grad_outputs.empty() || grad_outputs.size() == outputs.size(), "grad",
               "got {} grad_outputs for {} outputs", grad_outputs.size(), outputs.size());
    Sweep sweep;
    std::uint64_t start = 0;
    for (std::size_t i = 0; i < outputs.size(); ++i) {
        const auto& node = node_of("grad", outputs[i], fmt::format("output {}", i));
        check_this_thread("grad", *node);
        sweep.add(node, seed_for("grad", outputs[i], grad_outputs.empty() ? Tensor() : grad_outputs[i]));
        start = std::max(start, node->seq);
    }
    for (std::size_t i = 0; i < inputs.size(); ++i) {
        const auto& node = node_of("grad", inputs[i], fmt::format("input {}", i));
        check_this_thread("grad", *node);
        sweep.pending(node).captured = true;
    }
    sweep.run(start, retain_graph, /*accumulate=*/false);
    sweep.finish_leaves();
    std::vector<Tensor> result;
    for (std::size_t i = 0; i < inputs.size(); ++i) {
        const Tensor g = sweep.pending(inputs[i].impl().node).sum;
        LOOM_CHECK(g.defined() || allow_unused, "grad",
                   "input {} (shape {}) was not used to compute the outputs; pass allow_unused=true to get an "
                   "undefined gradient for it",
                   i, inputs[i].sizes());
        result.push_back(g);
    }
    return result;
}

}  // namespace loom
