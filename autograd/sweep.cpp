// The sweep: backward() and grad() run the tape's entries in reverse, sum the gradients that
// reach each tensor, and leave the leaves' in .grad(); also the Tensor methods that read and
// write those gradients.
#include "tape_internal.hpp"

#include <algorithm>
#include <cassert>
#include <mutex>
#include <unordered_map>

#include "../core/allocator.hpp"
#include "../core/kernels.hpp"
#include "ops.hpp"
#include "pointwise.hpp"
#include "profiler.hpp"

namespace loom {

// What a BackwardContext knows of the sweep running it (Sweep, below): a base with nothing in it.
struct autograd::GradientSums {};

namespace {

using autograd::History;

using autograd::engine::this_tape;
using autograd::engine::anomaly_guarded;

// Guards every leaf's .grad(): threads may backpropagate into shared parameters at once.
std::mutex leaf_grad_mutex;

// A new buffer laid out as contiguous g (element type T): detail::new_contiguous_like, which
// neither counts g's elements twice nor switches on its dtype, in a call of its own. Inlined
// into the formula functions that use it, it cost more than the call it saved.
template <class T> [[gnu::noinline]] Tensor new_buffer_like(const Tensor& g)
{
    return detail::new_contiguous_like<T>(g, g.numel());
}

Tensor add_values(const Tensor& a, const Tensor& b)
{
    return kernels::zip_floating("accumulate gradient", a, b, [](auto x, auto y) { return x + y; });
}

// Whether t is the only handle on its bytes and covers them whole: .grad() may then take t as
// it is, where otherwise it gets a copy (the user, a hook or another leaf may hold t, or a view
// of t, or t may be a view of a tensor still alive).
bool sole_whole_tensor(const Tensor& t)
{
    return t.impl_ptr().use_count() == 1 && (detail::bytes_in_own_block(t) || detail::holds_bytes_alone(t)) &&
           t.storage_offset() == 0 &&
           t.is_contiguous() && t.impl().storage->nbytes == static_cast<std::size_t>(t.numel()) * dtype_size(t.dtype());
}
// sole_whole_tensor(t) for a t the sweep owns (PendingGrad::owned): made, or taken whole, for one
// slot alone, so it covers its bytes whole; only the handles on it and on its bytes (a view's)
// need counting. Inline, where sole_whole_tensor is a call of about a hundred instructions.
inline bool sole_owned_tensor(const Tensor& t)
{
    return t.impl_ptr().use_count() == 1 && (detail::bytes_in_own_block(t) || t.impl().storage.use_count() == 1);
}

// Makes the undefined handle `slot` the tensor make() returns, built where the handle lies.
// Assigned instead, the returned handle, which the callee stores as two words, is read back as one
// 16-byte load that the store buffer cannot forward: perf showed that stall on every fresh
// gradient buffer, a quarter of making one.
template <class Make> void make_in_place(Tensor& slot, Make make)
{
    slot.~Tensor();
    try {
        ::new (&slot) Tensor(make());
    } catch (...) {
        ::new (&slot) Tensor();
        throw;
    }
}

// node.grad += g, as a new tensor: .grad() may be held by the user, so it is never written in
// place. When backward is recorded the sum is too, so .grad() can be differentiated again. A
// first gradient that no one else holds becomes .grad() without a copy.
void accumulate_grad(autograd::Node& node, Tensor g, bool recorded)
{
    if (recorded) node.grad = node.grad.defined() ? loom::add(node.grad, g) : loom::clone(g);
    else if (node.grad.defined()) node.grad = add_values(node.grad, g);
    else node.grad = sole_whole_tensor(g) ? std::move(g) : kernels::clone(g);
}


// A gradient of `dtype` reached `leaf`, whose dtype differs: the only way a leaf's dtype changes
// is Module::to(), so the graph was recorded before the conversion.
[[noreturn, gnu::noinline, gnu::cold]] void fail_leaf_converted(const autograd::Node& leaf, DType dtype)
{
    fail("backward",
         "a gradient of dtype {} reached a leaf tensor of shape {} (a parameter, or a tensor you called "
         "requires_grad_() on) that is {} now: it was converted, by Module::to(), after the graph that computed the "
         "gradient was recorded; call backward() before to(), or run the forward again after it",
         dtype, leaf.shape, leaf.dtype);
}

[[noreturn, gnu::noinline, gnu::cold]] void fail_gradient(const char* op, const Shape& shape, DType dtype,
                                                         const Tensor& g, const char* what)
{
    fail(op, "{} has shape {} and dtype {}, expected shape {} and dtype {}", what, g.sizes(), g.dtype(), shape, dtype);
}
// Inline, its failure out of line: it runs for every gradient a sweep sums. The names are C
// strings, measured only when the check fails.
[[gnu::always_inline]] inline void check_gradient(const char* op, const Shape& shape, DType dtype, const Tensor& g,
                                                  const char* what)
{
    if (!(g.sizes() == shape && g.dtype() == dtype)) [[unlikely]]
        fail_gradient(op, shape, dtype, g, what);
}
// A leaf's shape and dtype are read from its node when the sweep runs: a leaf that Module::to()
// converted since the entry was recorded is named as such, not as an internal error.
[[noreturn, gnu::noinline, gnu::cold]] void fail_input_gradient(const char* op, const autograd::BackwardContext& c,
                                                               std::size_t k, const Tensor& g)
{
    if (autograd::engine::converted_leaf(c.inputs[k], g.sizes(), g.dtype()))
        fail_leaf_converted(*c.inputs[k].node(), g.dtype());
    fail_gradient(op, c.input_shape(k), c.input_dtype(k), g, "internal: the gradient backward returned");
}
// Checks the gradient loom's own op returned for its input k.
[[gnu::always_inline]] inline void check_input_gradient(const char* op, const autograd::BackwardContext& c,
                                                        std::size_t k, const Tensor& g)
{
    if (!(g.sizes() == c.input_shape(k) && g.dtype() == c.input_dtype(k))) [[unlikely]]
        fail_input_gradient(op, c, k, g);
}
void check_gradient(const char* op, const autograd::Node& node, const Tensor& g, const char* what)
{
    check_gradient(op, node.shape, node.dtype, g, what);
}

// What a gradient hook was registered on, for errors: "a leaf of shape [3]" or "the output of
// 'tanh' (tape entry #5)".
std::string hooked_tensor(const autograd::Node& node);

// Runs node's gradient hooks on g. The ops a hook calls are its own business: anomaly mode
// checks what the hook returns, naming the hook, not the ops inside it.
Tensor apply_hooks(const autograd::Node& node, Tensor g)
{
    if (!node.has_gradient_hooks()) return g;
    for (const auto& hook : node.hooks->gradient) {
        Tensor replaced;
        {
            const autograd::detail::InnerOps in_hook;
            replaced = hook(g);
        }
        if (!replaced.defined()) continue;
        check_gradient("hook", node, replaced, "the gradient a hook returned");
        if (anomaly_guarded())
            if (const auto bad = autograd::engine::first_non_finite(replaced))
                fail("anomaly", "a gradient hook registered on {} returned {} at flat index {} of its gradient of shape {}",
                     hooked_tensor(node), bad->second, bad->first, replaced.sizes());
        g = replaced;
    }
    return g;
}


// Throws unless the saved tensor is as it was when saved.
void check_version(const autograd::Entry& e, const autograd::Saved& s)
{
    LOOM_CHECK(s.unchanged(), e.name(),
               "a tensor of shape {} saved for backward was modified in place afterwards (version {}, "
               "saved at version {}), by an in-place op or by Module::to(); clone() it before modifying it, "
               "or call backward() before to()",
               s.value.sizes(), s.value.version(), std::uint64_t(s.version));
}

std::string hooked_tensor(const autograd::Node& node)
{
    if (node.history.seq == 0) return fmt::format("a leaf of shape {}", node.shape);
    return fmt::format("the output of '{}' (tape entry #{}, shape {})", node.history.op, node.history.seq, node.shape);
}

// Shows an entry's saved tensors to its backward function where the entry keeps them, once every
// version is checked: a failed check leaves the entry as it was, so the backward can be run
// again. Nothing is written into the entry (a long tape's entries lie where forward left them,
// and a line written is a line written back).
void show_saved(const autograd::Entry& e, autograd::BackwardContext& ctx)
{
    const std::span<const autograd::Saved> saved = e.saved();
    for (const auto& s : saved)
        if (s.value.defined()) check_version(e, s);
    ctx.saved = std::views::transform(saved, &autograd::Saved::value);
}

// One reverse sweep. Gradients gather in PendingGrads: a non-leaf's own (its thread is this
// one), a leaf's in this sweep (a leaf may be shared by threads sweeping at once). The
// destructor clears them, so an error part-way leaves no stale state behind; entries are
// released only once the whole sweep has succeeded, so a failed backward can be retried.
// With create_graph every sum and every backward function is recorded on the tape (grad mode
// on), so the gradients it returns are differentiable; nothing is then added in place.
//
// A sweep started while another runs on this thread (grad() or backward() inside a backward
// function or a hook) reaches only the entries recorded since that one began (`floor`): the
// running sweep's sums sit in the nodes below it. A gradient that would flow below the floor
// is an error, not a silent loss; grad()'s inputs below it are captured in this sweep alone.
struct Sweep final : autograd::GradientSums {
    enum class Kind { plain, nested, checkpoint_segment };
    autograd::engine::Tape& tape = this_tape();
    // The sums of the non-leaves this sweep may reach, one per slot from base_slot on: the
    // outputs of the entries numbered `floor` and above.
    std::vector<autograd::PendingGrad> slots;
    // The indices of the entries run, released at the end (the first `ran` of them): sized to
    // the walk before it starts, so that recording one is a store.
    autograd::engine::SweptList swept;
    std::uint64_t base_slot;
    // One past the last slot this sweep may reach (`slots` may hold more: see ~Sweep).
    std::uint64_t end_slot;
    // Slots holding a gradient that no entry has taken yet: when none is left, nothing below can
    // be reached, and the sweep stops instead of walking the rest of the tape.
    std::size_t outstanding = 0;
    // Sums kept apart from the slots: the leaves', in the order first reached (`touched`), and
    // those of the non-leaves below `floor` that grad() captures, by slot.
    std::unordered_map<const autograd::Node*, autograd::PendingGrad> held;
    std::vector<autograd::Node*> touched;
    std::unordered_map<std::uint64_t, autograd::PendingGrad> held_below;
    // Leaves with post-accumulate hooks, each with the index of the last entry (lowest on the
    // tape) that reads it, highest index first: once the sweep is below that index, the leaf's
    // gradient is final and is added into .grad() at once (backward() only).
    std::vector<std::pair<std::size_t, autograd::Node*>> last_readers;
    std::size_t next_last_reader = 0;
    bool create_graph = false;
    // Some sums are captured (capture()): they stay in their slots after the sweep.
    bool captures = false;
    Kind kind;
    std::uint64_t floor;        // the first entry this sweep may reach
    std::uint64_t outer_floor;  // tape.sweep_floor before this sweep began, restored after

    // `first`: a checkpointed layer's segment, which may reach nothing recorded before it.
    Sweep(bool create_graph_, std::uint64_t first = 0)
        : create_graph(create_graph_),
          kind(first > 0 ? Kind::checkpoint_segment : tape.running_sweeps > 0 ? Kind::nested : Kind::plain),
          floor(std::max(first, tape.sweep_floor)), outer_floor(tape.sweep_floor)
    {
        // Slots increase with sequence numbers: the first entry at or above the floor has the
        // lowest slot this sweep can reach.
        const std::size_t lowest = tape.entries.lower_bound(floor);
        base_slot = lowest == tape.entries.size() ? tape.next_slot : tape.entries[lowest].first_slot;
        if (kind == Kind::plain) {
            slots.swap(tape.spare_slots);
            swept.swap(tape.spare_swept);
        }
        // The slots an earlier sweep left (all empty: see ~Sweep) serve as they are; only those
        // beyond them are made.
        const auto needed = static_cast<std::size_t>(tape.next_slot - base_slot);
        if (slots.size() < needed) slots.resize(needed);
        end_slot = tape.next_slot;
        ++tape.running_sweeps;
        tape.sweep_floor = tape.next_seq;
    }
    ~Sweep()
    {
        if (kind == Kind::plain) {
            // A sweep that ran to its end leaves every slot empty: `outstanding` counts the slots
            // holding a sum, and only grad()'s captured ones keep theirs after. The next sweep then
            // takes them as they are, instead of this one destroying every slot and that one
            // making them all again (W7: 46,000 of each, 0.55M instructions, every objective).
            // A slot's flags need no reset: whatever gives an empty slot a sum sets them. Any
            // other end (an error part-way) destroys them.
            if (outstanding != 0 || captures) slots.clear();
#ifndef NDEBUG
            for (const autograd::PendingGrad& p : slots) assert(!p.sum.defined());
#endif
            tape.spare_slots.swap(slots);
            tape.spare_swept.swap(swept);
        }
        --tape.running_sweeps;
        tape.sweep_floor = outer_floor;
        // What the sweep left unreleased may be dead: a result nothing used, such as a layer's
        // final state when the loss read only its output. Dropped now, the tape can be emptied
        // at once instead of growing, step after step, until compaction.
        if (kind == Kind::plain && tape.running_sweeps == 0 && tape.released_entries < tape.entries.size()) {
            try {
                autograd::engine::compact_since(0);
            } catch (...) {  // out of memory: they wait for the next compaction, as before
            }
        }
        autograd::engine::reset_if_all_released(tape);
        autograd::engine::release_held_inputs_if_idle(tape);
    }
    Sweep(const Sweep&) = delete;
    Sweep& operator=(const Sweep&) = delete;

    autograd::PendingGrad& slot(std::uint64_t s)
    {
        LOOM_CHECK(s >= base_slot && s < end_slot, "backward",
                   "internal: gradient slot {} is outside this sweep's {} slots from {}", s, end_slot - base_slot,
                   base_slot);
        return walked_slot(s);
    }

    // slot(s) unchecked (asserted), for s known to be in range: an output of an entry the walk
    // reached (the walk reaches only entries at or above the floor recorded before the sweep
    // began, whose slots all lie in base_slot .. end_slot - 1), or a slot tested just before.
    autograd::PendingGrad& walked_slot(std::uint64_t s)
    {
        assert(s >= base_slot && s < end_slot);
        return slots[static_cast<std::size_t>(s - base_slot)];
    }

    // A leaf's sum.
    autograd::PendingGrad& pending(autograd::Node* leaf)
    {
        auto [it, fresh] = held.try_emplace(leaf);
        if (fresh) touched.push_back(leaf);
        return it->second;
    }

    // A non-leaf's sum: its slot, or kept apart below the floor.
    autograd::PendingGrad& pending(const History& h)
    {
        if (h.seq < floor) return held_below[h.slot];
        if (h.seq < tape.reset_floor) autograd::engine::fail_released(h);
        return slot(h.slot);
    }

    // Keeps t's sum in its place when its entry runs, for grad() to return.
    void capture(const Tensor& t)
    {
        pending_of(t).captured = true;
        captures = true;
    }

    // A tensor's sum.
    autograd::PendingGrad& pending_of(const Tensor& t)
    {
        const TensorImpl& impl = t.impl();
        return impl.slots ? pending(impl.history()) : pending(impl.node.get());
    }

    // The dtype of g, which is defined (every gradient the sweep sums is), read unchecked: the
    // check's throw path, out of line as it is, changed GCC's code for the whole sweep
    // (Sweep::run took 0.4M more instructions of W7's gradient).
    static DType defined_dtype(const Tensor& g)
    {
        assert(g.defined());
        return g.impl_ptr().get()->dtype;
    }

    // The sum a gradient of `dtype` arriving at a leaf goes into. A leaf's dtype changes only
    // when Module::to() converts it: a gradient of another dtype comes from a graph recorded
    // before the conversion, and would be summed or converted into the leaf's gradient silently
    // (a graph that saved the leaf is refused by its version; one that only read it is not).
    autograd::PendingGrad& receiving(autograd::Node* leaf, DType dtype)
    {
        if (dtype != leaf->dtype) [[unlikely]]
            fail_leaf_converted(*leaf, dtype);
        return pending(leaf);
    }

    // The sum a gradient arriving at a non-leaf goes into; an error below the floor, where the
    // gradient could flow no further. (A non-leaf's dtype never changes.)
    autograd::PendingGrad& receiving(const History& h, DType)
    {
        autograd::PendingGrad& p = pending(h);
        if (h.seq >= floor) {
            if (!p.sum.defined()) ++outstanding;  // every caller gives it a sum
            return p;
        }
        if (p.captured) return p;
        if (kind == Kind::checkpoint_segment)
            fail("backward",
                 "a gradient reached tape entry #{} ('{}'), recorded before the steps a checkpointed layer ran again: "
                 "its cell read a tensor that requires grad but is neither its input, its state nor one of its "
                 "parameters; compute that tensor inside the cell, or build the layer without checkpoint(true)",
                 h.seq, h.op);
        fail("backward",
             "a grad() or backward() called while another backward pass runs (inside a backward function or a "
             "hook) reached tape entry #{} ('{}'), recorded before that pass began, whose gradients it must not "
             "touch; differentiate only what you computed inside it, from detach()ed tensors",
             h.seq, h.op);
    }

    // The sum a gradient arriving at an entry's input goes into: a slot of this sweep's, found
    // without reaching the input, or as above. Inline for a slot of this sweep's, the rest out of
    // line: as one function, its rare paths made every call save and restore registers, about a
    // third of its cost.
    [[gnu::always_inline]] autograd::PendingGrad& receiving(const autograd::InputRef& in, DType dtype)
    {
        // A leaf's slot() is 0, below every sweep's base_slot: slots are numbered from 1.
        const std::uint64_t s = in.slot();
        if (s >= base_slot && s < end_slot) [[likely]] {
            autograd::PendingGrad& p = walked_slot(s);  // in range: tested just above
            if (!p.sum.defined()) ++outstanding;  // every caller gives it a sum
            return p;
        }
        return receiving_elsewhere(in, dtype);
    }
    [[gnu::noinline]] autograd::PendingGrad& receiving_elsewhere(const autograd::InputRef& in, DType dtype)
    {
        if (autograd::Node* leaf = in.node()) return receiving(leaf, dtype);
        // Below the floor: the producer names the entry in errors, and keys a capture.
        const std::uint64_t s = in.slot();
        if (s < base_slot) return receiving(autograd::engine::producer_of_slot(tape, s), dtype);
        return slot(s);  // past this sweep's slots (those below end_slot were found inline): slot() fails
    }

    // Adds g to the sum of tensor t's gradient.
    void add_to(const Tensor& t, Tensor g)
    {
        const TensorImpl& impl = t.impl();
        if (impl.slots) add(impl.history(), std::move(g));
        else add(impl.node.get(), std::move(g));
    }

    // Makes p.sum a buffer of its own, so it can be added into in place.
    static void own(autograd::PendingGrad& p)
    {
        if (!p.owned) {
            p.sum = kernels::clone_keeping_layout(p.sum);
            p.owned = true;
        }
    }

    // Adds g to the sum of what `to` receives (a node, or an entry's input): the first gradient
    // to arrive is adopted, inline; a sum is made out of line (add's formula passes its gradient
    // on as it is, and the call cost more than the adoption: bench_tape's swept chain).
    // g by reference: a handle passed by value is stored as two words and read back as one, a
    // stalled load in every gradient summed (perf on the same chain).
    template <class To> [[gnu::always_inline]] void add(const To& to, Tensor&& g)
    {
        autograd::PendingGrad& p = receiving(to, defined_dtype(g));
        if (!p.sum.defined()) {
            p.sum = std::move(g);  // adopted as is: it may be shared, so not owned
            p.owned = false;
            return;
        }
        add_to_sum(p, std::move(g));
    }
    [[gnu::noinline]] void add_to_sum(autograd::PendingGrad& p, Tensor&& g)
    {
        if (create_graph) {
            p.sum = loom::add(p.sum, g);
            return;
        }
        // A sum adopted as it came may be held elsewhere. Both contiguous, the two are added in
        // one pass, into g if no one else holds it, else into a new buffer (a copy, then an add,
        // took two); otherwise the copy keeps the sum's layout (a transposed weight's gradient),
        // which g may share.
        if (!p.owned && p.sum.is_contiguous() && g.is_contiguous()) {
            if (sole_whole_tensor(g)) {
                kernels::add_into(g, p.sum);
                p.sum = std::move(g);
            } else {
                p.sum = add_values(p.sum, g);
            }
            p.owned = true;
            return;
        }
        own(p);
        kernels::add_into(p.sum, g);
    }

    // A buffer holding the gradient of `input` (of `shape` and `dtype`) summed so far, to add
    // into in place.
    Tensor accumulator(const autograd::InputRef& input, const Shape& shape, DType dtype)
    {
        autograd::PendingGrad& p = receiving(input, dtype);
        if (!p.sum.defined()) {
            make_in_place(p.sum, [&] { return zeros(shape, dtype); });
            p.owned = true;
        }
        own(p);
        if (!p.sum.is_contiguous()) p.sum = kernels::clone(p.sum);
        return p.sum;
    }

    // The sum of `input`'s gradient to write or add into, if the sweep can offer it without a
    // copy; see GradientBuffer. `incoming`, when given, is a gradient the backward will read no
    // more after this: where nothing has arrived at `input` yet and no one else holds it, it
    // becomes the sum, moved out of *incoming, instead of a new buffer.
    autograd::GradientBuffer gradient_buffer(const autograd::InputRef& input, const Shape& shape, DType dtype,
                                             Tensor* incoming)
    {
        autograd::PendingGrad& p = receiving(input, dtype);
        if (!p.sum.defined()) {
            // The incoming gradient's buffer, where no one else holds it, instead of a new one:
            // an allocation here and a release after the backward saved.
            const bool hand_over = incoming && incoming->defined() && incoming->dtype() == dtype &&
                                   incoming->sizes() == shape && sole_whole_tensor(*incoming);
            if (hand_over) p.sum = std::move(*incoming);
            else make_in_place(p.sum, [&] { return empty(shape, dtype); });
            p.owned = true;
            return {&p.sum, true, hand_over};
        }
        // A sum adopted as it came may be held elsewhere; the sweep's add makes it its own.
        if (!p.owned || !p.sum.is_contiguous()) return {};
        return {&p.sum, false};
    }

    // Adds g into region(the input's gradient), creating that gradient as zeros of `shape` and
    // `dtype` if need be.
    void add_region(const autograd::InputRef& input, const Shape& shape, DType dtype, const autograd::RegionFn& region,
                    const Tensor& g)
    {
        autograd::PendingGrad& p = receiving(input, defined_dtype(g));
        if (create_graph) {
            const Tensor whole = autograd::embed_region(g, shape, region);
            p.sum = p.sum.defined() ? loom::add(p.sum, whole) : whole;
            return;
        }
        if (!p.sum.defined()) {
            make_in_place(p.sum, [&] { return zeros(shape, dtype); });
            p.owned = true;
            kernels::copy_into(region(p.sum), g);
            return;
        }
        own(p);
        kernels::add_into(region(p.sum), g);
    }

    // ---- loom's element-wise ops, swept from their formulas ----
    // An entry of add, mul, tanh and the like names its formula (BackwardOps::pointwise). Where
    // nothing asks for the general route, the sweep computes each input's gradient from
    // pointwise.hpp's formula straight into the sum it keeps for that input: no BackwardContext,
    // no gradient list, no call of the backward function. That function stays the op's definition
    // wherever the formula alone will not do: create_graph, anomaly mode, hooks and retain_grad
    // (a watched entry), grad() capturing the output, the profiler, and operands that are
    // broadcast or not contiguous where the formula reads them (add and sub read none, and sum
    // a broadcast operand's gradient to its shape).

    // Runs entry e's formula on its output's gradient, p.sum, and takes that gradient from its
    // slot; false, with nothing done, where the general route must run the entry.
    // swept_binary and swept_unary stay calls of their own: inlined into this one switch, they
    // cost W7's gradient 2% more instructions.
    bool swept_by_formula(const autograd::Entry& e, autograd::PendingGrad& p)
    {
        const auto kind = static_cast<pointwise::Kind>(e.backward.ops()->pointwise);
        return pointwise::with_formula(kind, [&]<class F>() {
            if constexpr (pointwise::is_binary<F>) return swept_binary<F>(e, p);
            else return swept_unary<F>(e, p);
        });
    }

    // The saved values a formula reads (a, b, y for a binary op; x, y for a unary one, as
    // Reads flags them), which the op saved in that order: into `values`, where each pairs
    // with g element for element; false where one does not (a broadcast operand). g has the
    // output's shape and dtype (a slot's sum always has), and so has a value the entry knows to
    // be like its output: the output itself, or an input it compared with the output when it
    // was recorded (InputRef::like_output). Of those only the layout is checked here; a saved
    // tensor re-laid since (Module::to) changed its version, which take_incoming checks before
    // anything is read.
    template <bool... Reads>
    [[gnu::always_inline]] static bool formula_values(const autograd::Entry& e, const autograd::InputNodes inputs,
                                                      const Tensor& g, const Tensor* values[])
    {
        constexpr std::size_t count = sizeof...(Reads), reads = (std::size_t(Reads) + ...);
        const std::span<const autograd::Saved> saved = e.saved();
        LOOM_CHECK(saved.size() == reads, e.name(), "internal: saved {} tensors for a formula that reads {}",
                   saved.size(), reads);
        static constexpr bool read[] = {Reads...};
        // Value K's check, unrolled at compile time: as a loop over `read`, GCC kept the flags
        // in memory and tested each one at run time (0.87M more of W7's gradient, 70.68M).
        const auto take = [&]<std::size_t K>() {
            if constexpr (!read[K]) {
                values[K] = nullptr;
                return true;
            } else {
                constexpr std::size_t index = std::count(read, read + K, true);  // its place among the saved
                const autograd::Saved& s = saved[index];
                values[K] = &s.value;
                // The last value a formula reads is its output; the others are its inputs, in order.
                const bool like_output = K == count - 1 ? bool(s.is_output) : inputs[K] && inputs[K].like_output();
                return like_output ? s.value.is_contiguous() : pointwise::pairs_with(s.value, g);
            }
        };
        return [&]<std::size_t... K>(std::index_sequence<K...>) {
            return (take.template operator()<K>() && ...);
        }(std::make_index_sequence<count>{});
    }

    // Takes the incoming gradient of a formula's entry from its slot, once the entry may run
    // (its saved values unchanged). A released entry has no backward token: it never gets here.
    Tensor take_incoming(const autograd::Entry& e, autograd::PendingGrad& p)
    {
        for (const auto& s : e.saved()) check_version(e, s);
        --outstanding;
        Tensor g = std::move(p.sum);
        p.owned = p.accumulated = false;
        return g;
    }

    // Sums input `in`'s gradient fn(g_i, i) into its sum: written into a fresh one (g's own
    // buffer where `last_read` and no one else holds g), added into one the sweep owns, or made
    // aside and added as any gradient is.
    // `g_owned`: the slot g came from owned it (PendingGrad::owned; see sole_owned_tensor).
    template <class T, class Fn>
    void sum_formula(const autograd::InputRef& in, Tensor& g, bool g_owned, bool spread, bool last_read, Fn fn)
    {
        autograd::PendingGrad& q = receiving(in, dtype_of<T>());
        const T* gp = g.unsafe_data<T>();  // read before g may be handed over; g is of dtype T
        // A buffer of g's shape: laid out as g is where g is contiguous (no shape to check).
        const auto buffer = [&] {
            return spread ? empty(g.sizes(), g.dtype()) : new_buffer_like<T>(g);
        };
        if (!q.sum.defined()) {
            const bool hand_over = last_read && !spread && (g_owned ? sole_owned_tensor(g) : sole_whole_tensor(g));
            if (hand_over) q.sum = std::move(g);
            else make_in_place(q.sum, buffer);
            q.owned = true;
            return autograd::GradientBuffer{&q.sum, true, hand_over}.write_from<T>(gp, spread, fn);
        }
        if (q.owned && q.sum.is_contiguous())
            return autograd::GradientBuffer{&q.sum, false}.write_from<T>(gp, spread, fn);
        Tensor part = buffer();
        autograd::GradientBuffer{&part, true}.write_from<T>(gp, spread, fn);
        add(in, std::move(part));
    }

    template <class Op> [[gnu::noinline]] bool swept_binary(const autograd::Entry& e, autograd::PendingGrad& p)
    {
        const autograd::InputNodes inputs = e.inputs();
        const autograd::InputRef in0 = inputs[0], in1 = inputs[1];
        // add, and sub's first input: the gradient passes as it is, summed as any returned one.
        constexpr bool passes_a = std::is_same_v<Op, pointwise::Add> || std::is_same_v<Op, pointwise::Sub>;
        constexpr bool passes_b = std::is_same_v<Op, pointwise::Add>;
        if ((in0 && !in0.like_output()) || (in1 && !in1.like_output())) {
            if constexpr (passes_a) return swept_broadcast_sum<Op>(e, inputs, p);
            else return false;
        }
        if constexpr (passes_a && passes_b) {
            Tensor g = take_incoming(e, p);
            if (in0) add(in0, in1 ? Tensor(g) : std::move(g));
            if (in1) add(in1, std::move(g));
            return true;
        }
        bool spread = false;
        const Tensor* v[3];
        if (!pointwise::readable_in_place(p.sum, &spread) ||
            !formula_values<Op::reads.a, Op::reads.b, Op::reads.y>(e, inputs, p.sum, v))
            return false;
        const bool g_owned = p.owned;  // read before take_incoming clears it
        Tensor g = take_incoming(e, p);
        dispatch_floating("backward", g.dtype(), [&]<class T>() {
            // A value the formula does not read is never asked for: its pointer stays null.
            // Each value is of g's dtype, T: formula_values checked it or the entry did.
            const T* a = Op::reads.a ? v[0]->unsafe_data<T>() : nullptr;
            const T* b = Op::reads.b ? v[1]->unsafe_data<T>() : nullptr;
            const T* y = Op::reads.y ? v[2]->unsafe_data<T>() : nullptr;
            // Captured by value here and below: each reference is one more load per element
            // batch in the kernel the write runs (GradientBuffer::write).
            const auto values_at = [a, b, y](std::int64_t i) {
                return std::array<T, 3>{Op::reads.a ? a[i] : T(0), Op::reads.b ? b[i] : T(0),
                                        Op::reads.y ? y[i] : T(0)};
            };
            if (in0) {
                if constexpr (passes_a) add(in0, in1 ? Tensor(g) : std::move(g));
                else
                    sum_formula<T>(in0, g, g_owned, spread, !in1, [values_at](T gi, std::int64_t i) {
                        const auto [ai, bi, yi] = values_at(i);
                        return Op::grad_a(gi, ai, bi, yi);
                    });
            }
            if (in1)
                sum_formula<T>(in1, g, g_owned, spread, true, [values_at](T gi, std::int64_t i) {
                    const auto [ai, bi, yi] = values_at(i);
                    return Op::grad_b(gi, ai, bi, yi);
                });
        });
        return true;
    }

    // add or sub with an operand broadcast to the output's shape (x + bias, y - mean): that
    // operand's gradient is the incoming one summed to its shape, by the kernel the backward
    // function's reduce_to sums it with (the shapes were checked to broadcast when recording),
    // the other's the incoming one as it is; sub's second is negated after the sum, which gives
    // the values negating before it gives (negation is exact), in place where the sum is new.
    template <class Op>
    [[gnu::noinline]] bool swept_broadcast_sum(const autograd::Entry& e, const autograd::InputNodes inputs,
                                               autograd::PendingGrad& p)
    {
        const autograd::InputRef in0 = inputs[0], in1 = inputs[1];
        const autograd::KeptInputMeta& meta = e.input_meta;
        // A broadcast input's shape: a leaf's node keeps it, the entry a non-leaf's.
        const auto shape_of = [&](const autograd::InputRef& in, std::size_t k) -> const Shape& {
            return in.node() ? in.node()->shape : meta.get()[k].shape;
        };
        Tensor g = take_incoming(e, p);
        Tensor g1;
        if (in1 && in1.like_output()) {
            g1 = std::is_same_v<Op, pointwise::Sub> ? loom::neg(g) : g;
        } else if (in1) {
            g1 = kernels::sum_to(g, shape_of(in1, 1));  // a new tensor, contiguous: shapes differ
            if constexpr (std::is_same_v<Op, pointwise::Sub>)
                dispatch_floating("backward", g1.dtype(), [&]<class T>() {
                    T* v = g1.data_ptr<T>();
                    for (std::int64_t i = 0, n = g1.numel(); i < n; ++i) v[i] = -v[i];
                });
        }
        if (in0) add(in0, in0.like_output() ? std::move(g) : kernels::sum_to(g, shape_of(in0, 0)));
        if (in1) add(in1, std::move(g1));
        return true;
    }

    template <class Op> [[gnu::noinline]] bool swept_unary(const autograd::Entry& e, autograd::PendingGrad& p)
    {
        const autograd::InputNodes inputs = e.inputs();
        const autograd::InputRef in = inputs[0];
        bool spread = false;
        const Tensor* v[3];
        if (!in.like_output() || !pointwise::readable_in_place(p.sum, &spread) ||
            !formula_values<Op::reads.x, Op::reads.y>(e, inputs, p.sum, v))
            return false;
        const bool g_owned = p.owned;  // read before take_incoming clears it
        Tensor g = take_incoming(e, p);
        dispatch_floating("backward", g.dtype(), [&]<class T>() {
            const T* x = Op::reads.x ? v[0]->unsafe_data<T>() : nullptr;  // as in swept_binary
            const T* y = Op::reads.y ? v[1]->unsafe_data<T>() : nullptr;
            sum_formula<T>(in, g, g_owned, spread, true, [x, y](T gi, std::int64_t i) {
                return Op::grad(gi, Op::reads.x ? x[i] : T(0), Op::reads.y ? y[i] : T(0));
            });
        });
        return true;
    }

    // On a long tape the walk waits on memory: the tensors each entry saved were made long ago,
    // wherever forward allocated them, and the version check, the shapes and the backward
    // function read every part of a small tensor's block (its header, storage record and bytes).
    // So while an entry runs, the whole blocks of the tensors saved kBlocksAhead entries below
    // are fetched. Fetching only the headers (two entries ahead) and the storage records (one
    // ahead) left the other lines to miss, and gained nothing; fetching the whole block took a
    // fifth to a quarter off W7's backward at 1,024 characters (README, Speed). A shorter tape is
    // still in the caches, where the fetches only cost instructions (2-6% of W7's backward at
    // 384 down to 32 characters), so they are made only from kPrefetchBlocksFrom entries on.
    static constexpr std::size_t kBlocksAhead = 8;
    static constexpr std::size_t kPrefetchBlocksFrom = 20000;
    // A small tensor's block: its header, storage record and up to 112 bytes (14 doubles). It
    // starts on a 16-byte boundary, so it may reach into one line more than its length fills.
    static constexpr std::size_t kBlockLines = (sizeof(TensorImpl) + sizeof(Storage) + 112 + 63) / 64 + 1;
    // Reading an entry's saved list to fetch its blocks is itself a load: perf put half of the
    // walk's own samples on it. So the entry is fetched first, kEntriesAhead below, as the reset
    // does (EntryStore::clear).
    static constexpr std::size_t kEntriesAhead = 2 * kBlocksAhead;

    // Sweeps back from entry start_seq through the entries numbered `floor` and above.
    void run(std::uint64_t start_seq, bool retain_graph, bool accumulate)
    {
        GradModeGuard mode(create_graph);
        auto& entries = tape.entries;
        const std::size_t root = start_seq == 0 ? 0 : entries.lower_bound(start_seq);
        LOOM_CHECK(start_seq == 0 || (root < entries.size() && entries[root].seq == start_seq), "backward",
                   "the tensor's history is not on this thread's tape (was it computed on another thread?)");
        const std::size_t start = start_seq == 0 ? 0 : root + 1;
        const bool anomaly = anomaly_guarded();
        if (accumulate && autograd::engine::post_accumulate_hooks_exist.load(std::memory_order_relaxed))
            find_last_readers(start);
        // The first output's shape of the entry being swept, which the entry keeps in fewer bytes.
        Shape output_shape;
        // Entries never move (EntryStore) and none is reclaimed while a sweep runs, so `e` stays
        // valid while hooks, backward functions and recorded sums append to the tape.
        const bool long_tape = start >= kPrefetchBlocksFrom;
        // Whether entries of loom's element-wise ops may be swept from their formulas (per entry,
        // also not when its output is watched or captured). Not while a profiler runs, so that it
        // sees each entry's backward; a profiler that a hook starts during the sweep sees only
        // the entries after it that take the general route.
        const bool by_formula =
            !create_graph && !anomaly && autograd::detail::profilers_alive.load(std::memory_order_relaxed) == 0;
        // Leaves whose gradient may become final during the sweep (post-accumulate hooks).
        const bool leaves_to_finish = !last_readers.empty();
        autograd::Entry* above = nullptr;  // entry i + 1 of the walk, once it has one
        // Each entry from the floor up to start runs at most once (those recorded meanwhile lie
        // above it); a nested sweep or a checkpointed segment walks only the few above its floor.
        const std::size_t lowest = entries.lower_bound(floor);
        std::size_t* const ran_at = swept.room_for(start > lowest ? start - lowest : 0);
        std::size_t ran = 0, ran_by_formula = 0;
        for (std::size_t i = start; outstanding > 0 && i-- > 0;) {
            autograd::Entry& e = above ? entries.before(*above, i + 1, 1) : entries[i];
            if (e.seq < floor) break;
            above = &e;
            if (long_tape && i >= kEntriesAhead)
                autograd::engine::prefetch_entry<false>(entries.before(e, i, kEntriesAhead));
            if (long_tape && i >= kBlocksAhead)
                autograd::engine::prefetch_saved_blocks<false>(entries.before(e, i, kBlocksAhead), kBlockLines);
            if (leaves_to_finish) accumulate_leaves_read_above(i);
            const autograd::BackwardOps* ops = e.backward.ops();
            if (by_formula && ops && ops->pointwise != 0 && !e.watched) {
                autograd::PendingGrad& p = walked_slot(e.first_slot);
                if (!p.sum.defined()) continue;
                if (!p.captured && swept_by_formula(e, p)) {
                    ran_at[ran++] = i;
                    ++ran_by_formula;
                    continue;
                }
            }
            autograd::BackwardContext ctx;
            ctx.create_graph = create_graph;
            // Anomaly mode checks each gradient an entry returns, so nothing is summed in place then.
            if (!create_graph && !anomaly) ctx.sums = this;
            // One by one: resize() value-initialises them with a call to memset.
            for (std::size_t k = 0; k < e.num_outputs; ++k) ctx.grads.emplace_back();
            bool reached = false, grads_recorded = false;
            for (std::size_t k = 0; k < e.num_outputs; ++k) {
                autograd::PendingGrad& p = walked_slot(e.first_slot + k);
                if (!p.sum.defined()) continue;
                --outstanding;
                reached = true;
                if (!p.captured && !e.watched) {
                    // Moved from its slot straight into the context: a handle moved through a
                    // local is stored as two words and read back as one, a stalled load.
                    ctx.grads[k] = std::move(p.sum);
                    p.owned = p.accumulated = false;
                    grads_recorded = grads_recorded || ctx.grads[k].requires_grad();
                    continue;
                }
                // Taken from its slot (no reference count to bump) unless grad() wants it kept there.
                Tensor g = p.captured ? p.sum : std::move(p.sum);
                // Only a watched entry's outputs have hooks to run or a gradient to retain.
                if (e.watched)
                    if (const auto it = tape.watched_nodes.find(e.first_slot + k); it != tape.watched_nodes.end()) {
                        autograd::Node& node = *it->second;
                        g = apply_hooks(node, g);
                        if (accumulate && node.retains_grad) accumulate_grad(node, g, create_graph);
                    }
                grads_recorded = grads_recorded || g.requires_grad();
                if (p.captured) p.sum = g;
                else p = autograd::PendingGrad();
                ctx.grads[k] = std::move(g);
            }
            if (!reached) continue;
            const char* name = e.name();
            const bool custom = e.custom;
            LOOM_CHECK(!e.released(), name,
                       "backward through a graph that an earlier backward() already released; pass "
                       "retain_graph=true to the earlier call to sweep the graph more than once");
            show_saved(e, ctx);
            // Only a user's op under create_graph is held to its saved tensors (below).
            bool saved_recorded = false;
            if (create_graph && custom)
                for (const Tensor& s : ctx.saved) saved_recorded = saved_recorded || s.requires_grad();
            const autograd::InputNodes inputs = e.inputs();
            ctx.needs = autograd::InputNeeds(inputs);
            ctx.inputs = inputs;
            ctx.output_shape = &e.first_output_shape(output_shape);
            ctx.output_dtype = e.output_dtype;
            ctx.input_meta = e.input_meta.get();
            // Made where it is returned: assigned, its inline gradients would be moved one by one.
            autograd::GradList input_grads = [&] {
                const autograd::detail::InnerOps in_backward;
                // The scope read inline (Entry::scope() is a call, for every entry swept).
                const autograd::detail::ProfiledRegion timed(autograd::Profiler::Event::Kind::Backward, name,
                                                             e.rare() ? &e.rare()->scope : &autograd::engine::no_scope);
                return e.backward(ctx);
            }();
            if (custom) autograd::detail::check_custom_grads(name, input_grads, ctx);
            LOOM_CHECK(input_grads.size() == inputs.size(), name,
                       "internal: backward returned {} gradients for {} inputs", input_grads.size(), inputs.size());
            for (std::size_t k = 0; k < inputs.size(); ++k) {
                if (!inputs[k] || !input_grads[k].defined()) continue;
                // Every gradient is linear in the incoming one: if that is recorded and this is
                // not, backward computed it off the tape and a second derivative would be lost.
                LOOM_CHECK(!grads_recorded || input_grads[k].requires_grad(), name,
                           "cannot be differentiated twice: its backward computed gradient {} off the tape, so "
                           "create_graph would lose its second derivative (write backward with loom's ops, and "
                           "return an undefined tensor for a gradient that is zero)",
                           k);
                // The incoming gradient may be a constant (the op feeds sum() directly); then a
                // saved tensor that requires grad is what the gradient must depend on.
                LOOM_CHECK(!create_graph || !custom || !saved_recorded || input_grads[k].requires_grad(), name,
                           "cannot be differentiated twice: under create_graph its backward returned gradient {} "
                           "computed off the tape, although a tensor it saved requires grad, so the second "
                           "derivative through that tensor would be lost; compute the gradient with loom's ops from "
                           "the saved tensors as backward receives them, not from detach()ed copies or raw data",
                           k);
                if (anomaly) autograd::engine::check_backward_anomaly(name, e.seq, e.scope(), k, input_grads[k]);
                if (const autograd::RegionFn* region = e.region()) {
                    add_region(inputs[k], ctx.input_shape(k), ctx.input_dtype(k), *region, input_grads[k]);
                    continue;
                }
                // A custom op's gradients were checked above, with messages for its author.
                if (!custom)
                    check_input_gradient(name, ctx, k, input_grads[k]);
                add(inputs[k], std::move(input_grads[k]));
            }
            ran_at[ran++] = i;
        }
        tape.entries_swept_by_formula += ran_by_formula;
        if (!retain_graph && !create_graph) {
            tape.released_entries += ran;  // each was unreleased: checked before it ran
            // When this sweep ran every entry on the tape, the tape is emptied now: each entry is
            // destroyed once, where releasing it first would walk the whole tape twice.
            if (kind == Kind::plain && tape.released_entries == entries.size()) autograd::engine::reset(tape);
            else
                for (std::size_t k = 0; k < ran; ++k) autograd::engine::release(entries[ran_at[k]]);
        }
    }

    // The leaves with post-accumulate hooks that entries start-1 down to the floor read, each
    // with the lowest index of those entries.
    void find_last_readers(std::size_t start)
    {
        const auto& entries = tape.entries;
        std::unordered_map<const autograd::Node*, std::size_t> found;
        for (std::size_t i = start; i-- > 0 && entries[i].seq >= floor;)
            for (const auto& input : entries[i].inputs())
                if (autograd::Node* in = input.node(); in && in->has_post_accumulate_hooks()) {
                    auto [it, fresh] = found.try_emplace(in, i);
                    if (fresh) last_readers.emplace_back(i, in);
                    else it->second = i;
                }
        for (auto& [index, node] : last_readers) index = found.at(node);
        std::sort(last_readers.begin(), last_readers.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    }

    // Every entry above index i has run: the leaves no entry at or below i reads are final.
    void accumulate_leaves_read_above(std::size_t i)
    {
        while (next_last_reader < last_readers.size() && last_readers[next_last_reader].first > i) {
            autograd::Node* node = last_readers[next_last_reader++].second;
            const auto it = held.find(node);
            if (it == held.end() || !it->second.sum.defined()) continue;
            autograd::PendingGrad& p = it->second;
            GradModeGuard mode(create_graph);
            p.sum = apply_hooks(*node, p.sum);
            {
                std::lock_guard<std::mutex> lock(leaf_grad_mutex);
                accumulate_grad(*node, std::move(p.sum), create_graph);
            }
            p.accumulated = true;
            run_post_accumulate_hooks(*node);
        }
    }

    void run_post_accumulate_hooks(const autograd::Node& node)
    {
        GradModeGuard mode(create_graph);
        if (!node.has_post_accumulate_hooks()) return;
        for (const auto& hook : node.hooks->post_accumulate) hook();
    }

    // Applies hooks to the leaves reached, once their gradient is complete.
    void finish_leaves()
    {
        GradModeGuard mode(create_graph);
        for (auto& [node, p] : held)
            if (p.sum.defined() && !p.accumulated) p.sum = apply_hooks(*node, p.sum);
    }

    // Adds each leaf's gradient into its .grad(), under the lock that makes shared leaves safe,
    // then runs their post-accumulate hooks.
    void accumulate_leaves()
    {
        GradModeGuard mode(create_graph);
        std::vector<const autograd::Node*> added;
        {
            std::lock_guard<std::mutex> lock(leaf_grad_mutex);
            for (auto& n : touched) {
                autograd::PendingGrad& p = held.at(n);
                if (!p.sum.defined() || p.accumulated) continue;
                accumulate_grad(*n, std::move(p.sum), create_graph);  // p.sum is this sweep's only use of it
                p.accumulated = true;
                if (n->has_post_accumulate_hooks()) added.push_back(n);
            }
        }
        for (const autograd::Node* n : added) run_post_accumulate_hooks(*n);
    }

    // A checkpointed segment: a leaf that got a gradient but is not among grad()'s inputs is a
    // tensor the cell read without naming it; its gradient would be lost.
    void check_no_stray_leaves() const
    {
        for (const auto& [node, p] : held)
            LOOM_CHECK(!p.sum.defined() || p.captured, "backward",
                       "a checkpointed layer ran its cell again, and the cell read a tensor of shape {} that requires "
                       "grad but is neither its input, its state nor one of its parameters: its gradient would be "
                       "lost; register it in the cell (register_parameter, or register_module for a submodule), or "
                       "build the layer without checkpoint(true)",
                       node->shape);
    }
};

void check_requires_grad(std::string_view op, const Tensor& t, std::string_view what)
{
    LOOM_CHECK(t.requires_grad(), op,
               "{} does not require grad: none of the tensors it was computed from had requires_grad_() set, or "
               "it was computed under NoGradGuard",
               what);
}

// Backward runs on the tape that recorded the history: a non-leaf from another thread is refused.
void check_this_thread(std::string_view op, const Tensor& t)
{
    const TensorImpl& impl = t.impl();
    LOOM_CHECK(!impl.slots || impl.slots->tape == this_tape().id, op,
               "the tensor's history was recorded on another thread; each thread has its own tape, so run "
               "backward on the thread that ran forward");
}

// The tensor's node, made for a non-leaf on first use (a hook, retain_grad(), set_grad()).
autograd::Node& node_made(const Tensor& t)
{
    auto& node = t.impl().node;
    if (!node) {
        node = std::allocate_shared<autograd::Node>(PoolAllocator<autograd::Node>());
        node->shape = t.sizes();
        node->dtype = t.dtype();
        node->history = t.impl().history();
    }
    return *node;
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

Tensor autograd::BackwardContext::accumulator(std::size_t k) const
{
    if (!sums || k >= needs.size() || !needs[k]) return Tensor();
    return static_cast<Sweep*>(sums)->accumulator(inputs[k], input_shape(k), input_dtype(k));
}

autograd::GradientBuffer autograd::BackwardContext::gradient_buffer(std::size_t k, bool last_read_of_grad) const
{
    if (!sums || k >= needs.size() || !needs[k]) return {};
    return static_cast<Sweep*>(sums)->gradient_buffer(inputs[k], input_shape(k), input_dtype(k),
                                                      last_read_of_grad ? &grads[0] : nullptr);
}

// ---- Tensor's autograd methods ----

Tensor& Tensor::requires_grad_(bool on)
{
    if (on) {
        LOOM_CHECK(is_floating(dtype()), "requires_grad_", "only float32 and float64 tensors can require grad, got {}",
                   dtype());
        if (!requires_grad()) node_made(*this);
    } else if (requires_grad()) {
        LOOM_CHECK(!impl().slots, "requires_grad_",
                   "cannot turn off requires_grad on a non-leaf tensor; use detach() instead");
        impl().node.reset();
    }
    return *this;
}

bool Tensor::is_leaf() const { return !requires_grad() || !impl().slots; }

Tensor Tensor::grad() const
{
    if (!defined() || !impl().node) return Tensor();
    std::lock_guard<std::mutex> lock(leaf_grad_mutex);
    return impl().node->grad;
}

void Tensor::set_grad(const Tensor& g) const
{
    check_requires_grad("set_grad", *this, "the tensor");
    autograd::Node& node = node_made(*this);
    if (g.defined()) check_gradient("set_grad", node, g, "the gradient");
    std::lock_guard<std::mutex> lock(leaf_grad_mutex);
    node.grad = g;
}

void Tensor::zero_grad() const
{
    if (!defined() || !impl().node) return;
    std::lock_guard<std::mutex> lock(leaf_grad_mutex);
    impl().node->grad = Tensor();
}

namespace {
// A non-leaf's hooks and retain_grad() are run by the sweep only for the outputs of entries
// marked watched, from the nodes the tape keeps for them; this marks the entry that produced `t`
// and keeps its node. Returns that node, made if need be.
autograd::Node& watch(std::string_view op, const Tensor& t)
{
    check_requires_grad(op, t, "the tensor");
    if (!t.impl().slots) return *t.impl().node;
    check_this_thread(op, t);
    const History h = t.impl().history();
    autograd::Node& node = node_made(t);
    auto& tape = this_tape();
    if (h.seq < tape.reset_floor) return node;  // released: no gradient can reach it again
    const autograd::Entry* e = autograd::find_entry(h.seq);
    LOOM_CHECK(e, op, "internal: the tensor's tape entry #{} is not on this thread's tape", h.seq);
    tape.watched_nodes.emplace(h.slot, t.impl().node);
    const_cast<autograd::Entry*>(e)->watched = true;
    return node;
}
}  // namespace

void Tensor::retain_grad() const { watch("retain_grad", *this).retains_grad = true; }

void Tensor::register_post_accumulate_grad_hook(std::function<void(const Tensor&)> hook) const
{
    check_requires_grad("register_post_accumulate_grad_hook", *this, "the tensor");
    const auto& node = impl().node;
    LOOM_CHECK(!impl().slots, "register_post_accumulate_grad_hook",
               "expects a leaf (a tensor that requires grad and was not computed by a recorded op); a non-leaf's "
               "gradient is not accumulated into grad(): use register_hook");
    LOOM_CHECK(hook, "register_post_accumulate_grad_hook", "expects a callable hook, got an empty std::function");
    // The hook is kept in the node, which the tensor owns: it holds the tensor weakly.
    node->hooks_made().post_accumulate.push_back([tensor = detail::WeakTensor(*this), hook = std::move(hook)] {
        if (const Tensor t = tensor.lock(); t.defined()) hook(t);
    });
    autograd::engine::post_accumulate_hooks_exist.store(true, std::memory_order_relaxed);
}

void Tensor::register_hook(std::function<Tensor(const Tensor&)> hook) const
{
    watch("register_hook", *this).hooks_made().gradient.push_back(std::move(hook));
}

Tensor Tensor::detach() const { return kernels::alias(*this); }

void Tensor::backward(const Tensor& gradient, std::optional<bool> retain_graph, bool create_graph) const
{
    const autograd::detail::ProfiledRegion timed(autograd::Profiler::Event::Kind::Sweep, "backward()");
    check_requires_grad("backward", *this, "the tensor");
    check_this_thread("backward", *this);
    Tensor seed = seed_for("backward", *this, gradient);
    Sweep sweep(create_graph);
    sweep.add_to(*this, seed);
    sweep.run(impl().history().seq, retain_graph.value_or(create_graph), /*accumulate=*/true);
    sweep.finish_leaves();
    sweep.accumulate_leaves();
}

namespace {

std::vector<Tensor> grad_through(const std::vector<Tensor>& outputs, const std::vector<Tensor>& inputs,
                                 const std::vector<Tensor>& grad_outputs, bool retain_graph, bool allow_unused,
                                 bool create_graph, std::uint64_t first)
{
    const autograd::detail::ProfiledRegion timed(autograd::Profiler::Event::Kind::Sweep, "grad()");
    LOOM_CHECK(!outputs.empty(), "grad", "expects at least one output");
    LOOM_CHECK(grad_outputs.empty() || grad_outputs.size() == outputs.size(), "grad",
               "got {} grad_outputs for {} outputs", grad_outputs.size(), outputs.size());
    Sweep sweep(create_graph, first);
    for (std::size_t i = 0; i < inputs.size(); ++i) {
        check_requires_grad("grad", inputs[i], fmt::format("input {}", i));
        check_this_thread("grad", inputs[i]);
        sweep.capture(inputs[i]);
    }
    std::uint64_t start = 0;
    for (std::size_t i = 0; i < outputs.size(); ++i) {
        check_requires_grad("grad", outputs[i], fmt::format("output {}", i));
        check_this_thread("grad", outputs[i]);
        sweep.add_to(outputs[i], seed_for("grad", outputs[i], grad_outputs.empty() ? Tensor() : grad_outputs[i]));
        start = std::max(start, outputs[i].impl().history().seq);
    }
    sweep.run(start, retain_graph, /*accumulate=*/false);
    // A checkpointed segment hands its leaves' gradients to the sweep that runs it; leaf hooks
    // run there, once the gradient is whole.
    if (first > 0) sweep.check_no_stray_leaves();
    else sweep.finish_leaves();
    std::vector<Tensor> result;
    for (std::size_t i = 0; i < inputs.size(); ++i) {
        const Tensor g = sweep.pending_of(inputs[i]).sum;
        LOOM_CHECK(g.defined() || allow_unused, "grad",
                   "input {} (shape {}) was not used to compute the outputs; pass allow_unused=true to get an "
                   "undefined gradient for it",
                   i, inputs[i].sizes());
        result.push_back(g);
    }
    return result;
}

}  // namespace

std::vector<Tensor> grad(const std::vector<Tensor>& outputs, const std::vector<Tensor>& inputs,
                         const std::vector<Tensor>& grad_outputs, std::optional<bool> retain_graph, bool create_graph,
                         bool allow_unused)
{
    return grad_through(outputs, inputs, grad_outputs, retain_graph.value_or(create_graph), allow_unused, create_graph,
                        0);
}

std::vector<Tensor> autograd::detail::grad_since(std::uint64_t first, const std::vector<Tensor>& outputs,
                                                 const std::vector<Tensor>& inputs,
                                                 const std::vector<Tensor>& grad_outputs)
{
    LOOM_CHECK(first > 0, "grad_since", "expects the sequence number of an entry (from next_sequence()), got 0");
    return grad_through(outputs, inputs, grad_outputs, false, true, false, first);
}

}  // namespace loom