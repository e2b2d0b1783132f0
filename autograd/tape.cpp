// Recording: grad mode, appending entries, reclaiming dead ones, region ops.
#include "tape_internal.hpp"

#include <algorithm>
#include <mutex>
#include <unordered_map>
#include <unordered_set>

#include "../core/allocator.hpp"
#include "../core/kernels.hpp"
#include "ops.hpp"
#include "pointwise.hpp"

namespace loom {

namespace autograd::engine {
constinit thread_local Tape* current_tape [[gnu::tls_model("initial-exec")]] = nullptr;
constinit thread_local Tracer* current_tracer [[gnu::tls_model("initial-exec")]] = nullptr;

Tape& create_tape()
{
    thread_local Tape owned;  // destroyed when the thread ends
    current_tape = &owned;
    return owned;
}

namespace {
// Retired chunks whose tapes' threads have ended while some of their tensors lived on: freed by
// the next tape that retires chunks, once none of their tensors is alive. Never destroyed, so
// that a tensor dying after main() still finds its chunk.
std::mutex orphan_mutex;
auto* orphan_chunks = new std::vector<std::unique_ptr<SlotChunk>>();
std::atomic<bool> orphans_exist{false};

// Frees the chunks none of whose tensors is alive; the first becomes `spare` if it is empty.
void free_dead(std::vector<std::unique_ptr<SlotChunk>>& chunks, std::unique_ptr<SlotChunk>* spare)
{
    std::erase_if(chunks, [&](std::unique_ptr<SlotChunk>& c) {
        if (c->any_alive()) return false;
        if (spare && !*spare) *spare = std::move(c);
        return true;
    });
}
}  // namespace

void Tape::retire_all_chunks(bool keep_current)
{
    std::unique_ptr<SlotChunk> current;
    if (keep_current && newest_chunk && next_slot - newest_chunk->first_slot < SlotChunk::kSlots) {
        current = std::move(slot_chunks.back());
        slot_chunks.pop_back();
    }
    for (auto& c : slot_chunks) retire(std::move(c));
    slot_chunks.clear();
    newest_chunk = nullptr;
    if (current) {
        first_chunk = current->first_slot / SlotChunk::kSlots;
        newest_chunk = current.get();
        slot_chunks.push_back(std::move(current));
    }
    free_dead(retired_chunks, &spare_chunk);
    if (orphans_exist.load(std::memory_order_relaxed)) {
        std::lock_guard<std::mutex> lock(orphan_mutex);
        free_dead(*orphan_chunks, nullptr);
        orphans_exist.store(!orphan_chunks->empty(), std::memory_order_relaxed);
    }
}

Tape::~Tape()
{
    entries.clear();  // the saved tensors it holds die first
    spare_slots.clear();
    retire_all_chunks(false);
    spare_chunk.reset();
    if (retired_chunks.empty()) return;
    std::lock_guard<std::mutex> lock(orphan_mutex);
    for (auto& c : retired_chunks) orphan_chunks->push_back(std::move(c));
    orphans_exist.store(true, std::memory_order_relaxed);
}

void release(Entry& e)
{
    forget_watched(this_tape(), e);
    e.clear_lists();
    e.input_meta.reset();
    e.backward.reset();
}

void reset(Tape& tape)
{
    const bool long_tape = tape.entries.size() >= kOrderedListLength;
    tape.entries.clear();
    tape.stream.clear();
    tape.retire_all_chunks();
    tape.watched_nodes.clear();
    tape.reclaimed_inputs.clear();
    if (long_tape) order_small_objects();  // what the next forward makes, it makes in sequence
    tape.released_entries = 0;
    tape.reset_floor = tape.next_seq;
}

void release_held_inputs_if_idle(Tape& tape)
{
    if (tape.running_sweeps > 0 || !tape.entries.empty() || tape.held_inputs.empty()) return;
    tape.release_held_inputs();
}

void reset_if_all_released(Tape& tape)
{
    if (tape.running_sweeps > 0 || tape.entries.empty() || tape.released_entries < tape.entries.size()) return;
    reset(tape);
}

// Keeps in held_inputs only the nodes that entries still on the tape read, each once, and in
// reclaimed_inputs only the producers they read.
static void drop_unread_held_inputs(Tape& tape)
{
    if (!tape.reclaimed_inputs.empty()) {
        std::unordered_set<std::uint64_t> read_slots;
        for (std::size_t i = 0; i < tape.entries.size(); ++i)
            for (const InputRef& in : tape.entries[i].inputs())
                if (in.slot() != 0) read_slots.insert(in.slot());
        std::erase_if(tape.reclaimed_inputs, [&](const auto& kv) { return !read_slots.count(kv.first); });
    }
    if (tape.held_inputs.empty()) return;
    std::unordered_set<const Node*> read;
    for (std::size_t i = 0; i < tape.entries.size(); ++i)
        for (const InputRef& in : tape.entries[i].inputs())
            if (in.node()) read.insert(in.node());
    std::vector<std::shared_ptr<Node>> kept;
    kept.reserve(tape.held_inputs.size());  // before any hold is moved: nothing below may throw
    for (auto& node : tape.held_inputs)
        if (read.erase(node.get()) > 0) kept.push_back(std::move(node));
    tape.recently_held.fill(nullptr);
    tape.held_inputs = std::move(kept);
}

// Moves what the entries keep in the stream into a new one, which holds only theirs: the dead
// entries' bytes are reclaimed, so a tape that is compacted but never emptied (forward after
// forward with grad on, and no backward) does not grow. If the new stream cannot be had,
// everything stays where it is.
static void move_to_new_stream(Tape& tape)
{
    ByteStream fresh;
    std::vector<std::pair<void*, void*>> places;  // per entry: its closure's, its input metadata's
    try {
        places.reserve(tape.entries.size());
        for (std::size_t i = 0; i < tape.entries.size(); ++i) {
            const Entry& e = tape.entries[i];
            const BackwardOps* ops = e.backward.ops();
            void* closure = ops && !ops->kept_inline ? fresh.allocate(ops->size, ops->align) : nullptr;
            void* meta = e.input_meta ? fresh.allocate(KeptInputMeta::bytes_for(e.input_meta.size()),
                                                       KeptInputMeta::bytes_align)
                                      : nullptr;
            places.emplace_back(closure, meta);
        }
    } catch (const std::bad_alloc&) {
        return;
    }
    for (std::size_t i = 0; i < tape.entries.size(); ++i) {
        if (places[i].first) tape.entries[i].backward.relocate(places[i].first);
        if (places[i].second) tape.entries[i].input_meta.relocate(places[i].second);
    }
    tape.stream = std::move(fresh);
}

// Drops the dead entries: those no tensor holds an output of and no live entry reads (no
// gradient can reach them again). Walking backwards, every reader of an entry's outputs is
// judged before the entry itself, so one pass reclaims whole dead chains. A dead entry that
// saved an input (mul saves both) still holds that input's tensor until it is destroyed: such
// holds are counted as the walk goes and do not keep the producer alive. Nor do an entry's saves
// of its own output (tanh saves its result): a tensor the entry alone holds, with dead entries,
// is no user's.
void compact_since(std::uint64_t first_seq)
{
    auto& tape = this_tape();
    if (tape.running_sweeps > 0) return;  // a sweep holds indices into the tape
    const std::size_t first = tape.entries.lower_bound(first_seq);
    if (first == tape.entries.size()) return;
    const std::uint64_t base = tape.entries[first].first_slot;
    const auto slots = static_cast<std::size_t>(tape.next_slot - base);
    // With no output from `base` on alive, no entry from `first` on can be reached: all are
    // dead, and a scan of the slots' flags tells it without the walk below, or its lists (a loop
    // that records ops and drops their results without sweeping: bench_tape's recorded add,
    // 979 -> 908 instructions per op; the flags read chunk by chunk and no list of the dead
    // entries made, 813 -> 785).
    const bool any_alive = tape.any_slot_alive(base, tape.next_slot);
    const std::size_t walked_slots = any_alive ? slots : 0;
    // Bytes, not std::vector<bool>: its bit arithmetic was a third of the walk's instructions.
    std::vector<std::uint8_t> read(walked_slots, 0);  // by a live entry, per slot
    // Per slot whose tensor dead entries saved: how many such saves hold it, and how many holds
    // it has in all. Made at the first dead entry that saved one: a walk that finds every entry
    // alive (a long forward's, while it grows) fills no table.
    struct Holds {
        long by_dead = 0;
        long all = 0;
    };
    std::vector<Holds> holds;
    const auto drop_saves = [&](const Entry& e) {
        for (const Saved& s : e.saved()) {
            if (s.is_output || !s.value.defined()) continue;
            const TensorImpl& impl = s.value.impl();
            if (!impl.slots || impl.slots->tape != tape.id || impl.slot() < base || impl.slot() - base >= slots) continue;
            if (holds.empty()) holds.resize(walked_slots);
            Holds& h = holds[static_cast<std::size_t>(impl.slot() - base)];
            ++h.by_dead;
            h.all = s.value.impl_ptr().use_count();
        }
    };
    // Whether anything but the entry's own saves and dead entries' holds output k's tensor.
    const auto held_by_user = [&](const Entry& e, std::size_t k) {
        const std::uint64_t slot = e.first_slot + k;
        if (!tape.slot_alive(slot)) return false;
        Holds h = holds.empty() ? Holds{} : holds[static_cast<std::size_t>(slot - base)];
        for (const Saved& s : e.saved())
            if (s.is_output && s.output == k) {
                ++h.by_dead;  // the entry's own: it holds the tensor, dead or alive
                h.all = s.value.impl_ptr().use_count();
            }
        return h.by_dead == 0 || h.all > h.by_dead;
    };
    std::vector<std::uint8_t> dead(any_alive ? tape.entries.size() : 0, 0);  // read from `first` on, when walked
    std::size_t dead_count = 0;
    for (std::size_t i = tape.entries.size(); any_alive && i-- > first;) {
        const auto& e = tape.entries[i];
        bool live = false;
        for (std::size_t k = 0; k < e.num_outputs && !live; ++k)
            live = read[static_cast<std::size_t>(e.first_slot + k - base)] || held_by_user(e, k);
        dead[i] = !live;
        if (!live) {
            ++dead_count;
            drop_saves(e);
            continue;
        }
        for (const auto& in : e.inputs())
            if (in.slot() >= base) read[static_cast<std::size_t>(in.slot() - base)] = 1;
    }
    // Nothing dead: the entries, their stream and their held inputs stay as they are. (The walks
    // of a long forward, growing, moved every entry's stream bytes and hashed every leaf read
    // for nothing: 11M of the 90M instructions of W7's first gradient.)
    if (any_alive && dead_count == 0) return;
    const auto forget = [&tape](const Entry& e) noexcept {
        tape.released_entries -= e.released();
        forget_watched(tape, e);
    };
    if (!any_alive) {
        tape.entries.drop_from(first, forget);  // one walk: no entry is kept
    } else {
        std::size_t kept = first;
        for (std::size_t i = first; i < tape.entries.size(); ++i)
            if (dead[i]) {
                forget(tape.entries[i]);
            } else {
                if (kept != i) tape.entries[kept] = std::move(tape.entries[i]);
                ++kept;
            }
        tape.entries.shrink_to(kept);
    }
    if (tape.entries.empty()) {
        tape.stream.clear();
        tape.retire_all_chunks();
    } else if (first == 0) {
        tape.drop_chunks_below(tape.entries[0].first_slot);
        move_to_new_stream(tape);
    }
    if (first == 0) drop_unread_held_inputs(tape);
}

void fail_released(const History& history)
{
    fail(history.op,
         "backward through a graph that an earlier backward() already released (tape entry #{}); pass "
         "retain_graph=true to the earlier call to sweep the graph more than once",
         history.seq);
}

History producer_of_slot(const Tape& tape, std::uint64_t slot)
{
    if (const auto it = tape.reclaimed_inputs.find(slot); it != tape.reclaimed_inputs.end()) return it->second;
    // The last entry whose first slot is at or below `slot`; entries without outputs have none.
    std::size_t lo = 0, hi = tape.entries.size();
    while (lo < hi) {
        const std::size_t mid = lo + (hi - lo) / 2;
        if (tape.entries[mid].first_slot <= slot) lo = mid + 1;
        else hi = mid;
    }
    const Entry* e = lo > 0 ? &tape.entries[lo - 1] : nullptr;
    LOOM_CHECK(e && slot < e->first_slot + e->num_outputs, "backward",
               "internal: no entry on the tape produced gradient slot {}", slot);
    return History{e->name(), e->seq, slot, tape.id};
}

void forget_watched(Tape& tape, const Entry& e)
{
    if (!e.watched) return;
    for (std::size_t k = 0; k < e.num_outputs; ++k) tape.watched_nodes.erase(e.first_slot + k);
}
}  // namespace autograd::engine

namespace {

using autograd::engine::this_tape;
using detail::grad_mode;

}  // namespace

constinit thread_local bool detail::grad_mode [[gnu::tls_model("initial-exec")]] = true;

void set_grad_enabled(bool enabled) { grad_mode = enabled; }

namespace autograd {

std::size_t tape_size() { return this_tape().entries.size(); }

const std::shared_ptr<const std::string>& Entry::scope() const
{
    const auto& r = rare();
    return r ? r->scope : engine::no_scope;
}

const Entry* find_entry(std::uint64_t seq)
{
    const auto& tape = this_tape();
    const std::size_t i = tape.entries.lower_bound(seq);
    return i < tape.entries.size() && tape.entries[i].seq == seq ? &tape.entries[i] : nullptr;
}

bool should_record(std::span<const Tensor> inputs)
{
    if (!grad_mode) return false;
    return std::any_of(inputs.begin(), inputs.end(), [](const Tensor& t) { return t.requires_grad(); });
}

namespace {
SmallVector<const Tensor*, 3> pointers_to(std::span<const Tensor> tensors)
{
    SmallVector<const Tensor*, 3> pointers;
    pointers.reserve(tensors.size());
    for (const Tensor& t : tensors) pointers.push_back(&t);
    return pointers;
}
}  // namespace

void push_entry(const char* name, std::span<const Tensor> inputs, std::span<const Tensor> outputs,
                std::span<const Tensor> saved, BackwardFn backward, bool custom)
{
    detail::push_entry_stored(name, inputs, outputs, saved, backward_ops_of<BackwardFn>, &backward, custom);
}

Entry& Entry::operator=(Entry&& other) noexcept
{
    if (this == &other) return *this;
    clear_lists();
    seq = other.seq;
    first_slot = other.first_slot;
    num_outputs = other.num_outputs;
    output_dtype = other.output_dtype;
    output_ndim = other.output_ndim;
    watched = other.watched;
    custom = other.custom;
    has_rare = other.has_rare;
    inputs_code_ = inputs_.take(other.inputs_, std::exchange(other.inputs_code_, 0));
    saved_code_ = saved_.take(other.saved_, std::exchange(other.saved_code_, 0));
    input_meta = std::move(other.input_meta);
    backward = std::move(other.backward);
    cold() = std::move(other.cold());
    return *this;
}

void Entry::keep_first_output_shape_aside(const Shape& shape)
{
    rare_made().output_shape = shape;  // may throw: output_ndim is set after
    output_ndim = kShapeAside;
}

void detail::push_entry_stored(const char* name, std::span<const Tensor> inputs, std::span<const Tensor> outputs,
                               std::span<const Tensor> saved, const BackwardOps& ops, void* closure, bool custom)
{
    const auto in = pointers_to(inputs), kept = pointers_to(saved);
    push_entry_stored(name, std::span<const Tensor* const>(in.data(), in.size()), outputs,
                      std::span<const Tensor* const>(kept.data(), kept.size()), ops, closure, custom);
}

namespace {
// An input or saved tensor as the general route (a pointer) or push_op_entry (a TensorRef) names it.
const Tensor& tensor_of(const Tensor* t) { return *t; }
const Tensor& tensor_of(internal::TensorRef r) { return *r.tensor; }

// push_entry_stored's rare paths, out of line: inline, they made every entry recorded save and
// restore more registers.
template <class Refs>
[[gnu::noinline, gnu::cold]] void show_tracer(const char* name, Refs inputs, std::span<const Tensor> outputs)
{
    SmallVector<Tensor, 3> in;
    for (const auto& t : inputs) in.push_back(tensor_of(t));
    autograd::engine::current_tracer->on_entry(name, std::span<const Tensor>(in.data(), in.size()), outputs);
}
[[gnu::noinline]] void compact_before_entry(engine::Tape& tape)
{
    autograd::engine::compact_since(0);
    tape.compact_at = std::max<std::size_t>(1024, 2 * tape.entries.size());
}
}  // namespace

namespace {
// The parts of recording an entry that the general route (push_entry_stored) and loom's own
// single-output ops (push_op_entry) share, inline in each.

// The entry's reference to input t; `first`: its first output, if any. A leaf's node only the
// tensors own: the tape holds it (once, for all entries that read it) and the entry points at
// it. A non-leaf is its slot; where neither its node nor the first output's gradient will tell
// its shape and dtype (or `many_outputs` leave that unsure), *keep_meta is set.
[[gnu::always_inline]] inline InputRef input_ref(engine::Tape& tape, const char* name, const Tensor& t,
                                                 const TensorImpl* first, bool many_outputs, bool* keep_meta)
{
    if (!t.requires_grad()) return InputRef();
    const TensorImpl& impl = t.impl();
    const bool like_output = first && impl.shape == first->shape && impl.dtype == first->dtype;
    if (!impl.slots) {
        tape.hold_input(impl.node);
        return InputRef::leaf(impl.node.get(), like_output);
    }
    LOOM_CHECK(impl.slots->tape == tape.id, name,
               "an input was computed on another thread, whose tape this thread cannot sweep; "
               "detach() it, or compute it on this thread");
    if (impl.slots->seq[impl.slot_index] < tape.reset_floor) tape.reclaimed_inputs.emplace(impl.slot(), impl.history());
    *keep_meta = *keep_meta || !like_output || many_outputs;
    return InputRef::non_leaf(impl.slot(), like_output);
}

// Keeps the shapes and dtypes of e's non-leaf inputs in the tape's stream (InputMeta).
template <class Refs> void keep_input_meta(engine::Tape& tape, Entry& e, Refs inputs)
{
    const InputNodes refs = e.inputs();  // a span made once: each call tests where the list lies
    bool large = false;
    for (std::size_t k = 0; k < inputs.size(); ++k)
        large = large || (refs[k].slot() != 0 && tensor_of(inputs[k]).dim() > 4);
    InputMeta* meta = e.input_meta.emplace(
        tape.stream.allocate(KeptInputMeta::bytes_for(inputs.size()), KeptInputMeta::bytes_align), inputs.size(), large);
    for (std::size_t k = 0; k < inputs.size(); ++k)
        if (refs[k].slot() != 0) {
            // Into the list's new, empty shapes: copied whole where inline, not through a call.
            meta[k].shape.assign_to_new(tensor_of(inputs[k]).sizes());
            meta[k].dtype = tensor_of(inputs[k]).dtype();
        }
}

// What an entry keeps of s for its backward; `output`: s's index among the entry's outputs, or
// kNotOutput. A saved output is kept as it is, marked so that compaction can tell it from a
// user's hold (see compact_since).
constexpr std::size_t kNotOutput = SIZE_MAX;
[[gnu::always_inline]] inline Saved saved_of(const Tensor& s, std::size_t output)
{
    if (!s.defined()) return Saved(Tensor(), 0, false, 0);
    if (output == kNotOutput) return Saved(s, s.version(), false, 0);
    return Saved(s, s.version(), true, output);
}

// Gives `out` the history of its entry's output in `slot`, whose record `chunk` holds.
[[gnu::always_inline]] inline void give_history(SlotChunk& chunk, std::uint64_t slot, const char* name,
                                                std::uint64_t seq, const Tensor& out)
{
    const auto i = static_cast<std::uint16_t>(slot - chunk.first_slot);
    chunk.op[i] = name;
    chunk.seq[i] = seq;
    chunk.alive[i].store(true, std::memory_order_relaxed);
    TensorImpl& impl = out.impl();
    impl.slots = &chunk;
    impl.slot_index = i;
}

// The checks every recorded output passes.
[[gnu::always_inline]] inline void check_output(const char* name, const Tensor& out)
{
    LOOM_CHECK(!out.requires_grad(), name, "internal: an output is already on the tape");
    LOOM_CHECK(is_floating(out.dtype()), name, "internal: output of dtype {} cannot require grad", out.dtype());
}

// Starts an entry: the tracer shown it, the tape compacted if due.
template <class Refs>
[[gnu::always_inline]] inline engine::Tape& tape_for_entry(const char* name, Refs inputs, std::span<const Tensor> outputs)
{
    if (autograd::engine::current_tracer) [[unlikely]]
        show_tracer(name, inputs, outputs);
    auto& tape = this_tape();
    if (tape.entries.size() >= tape.compact_at) [[unlikely]]
        compact_before_entry(tape);
    return tape;
}
}  // namespace

void detail::push_entry_stored(const char* name, std::span<const Tensor* const> inputs,
                               std::span<const Tensor> outputs, std::span<const Tensor* const> saved,
                               const BackwardOps& ops, void* closure, bool custom)
{
    auto& tape = tape_for_entry(name, inputs, outputs);
    // The outputs' slot chunks are made before the entry, so that making one cannot fail after.
    SlotChunk* first_chunk = nullptr;
    for (std::size_t k = 0; k < outputs.size(); ++k) {
        check_output(name, outputs[k]);
        SlotChunk& chunk = tape.chunk_for(tape.next_slot + k);
        if (k == 0) first_chunk = &chunk;
    }
    // Built in place: an entry is too large to build aside and move in. A check below that fails
    // takes it off again; what it did to the tape before (a leaf's node held, a reclaimed
    // producer named) is harmless there.
    Entry& e = tape.entries.emplace_back();
    try {
        e.seq = tape.next_seq;
        e.cold().name = name;
        // Read before any output gets its history: an output may be an input that needs no gradient.
        e.reserve_inputs(inputs.size());
        bool keep_meta = false;
        for (const Tensor* t : inputs)
            e.add_input(
                input_ref(tape, name, *t, outputs.empty() ? nullptr : &outputs[0].impl(), outputs.size() > 1, &keep_meta));
        if (keep_meta) keep_input_meta(tape, e, inputs);
        e.first_slot = tape.next_slot;
        e.num_outputs = static_cast<std::uint32_t>(outputs.size());
        if (!outputs.empty()) {
            e.keep_first_output_shape(outputs[0].sizes());
            e.output_dtype = outputs[0].dtype();
        }
        if (outputs.size() > 1) {
            auto& more = e.rare_made().more_outputs;
            more.reserve(outputs.size() - 1);
            for (const Tensor& out : outputs.subspan(1)) more.push_back(Entry::Output{out.sizes(), out.dtype()});
        }
        e.reserve_saved(saved.size());
        for (const Tensor* s : saved) {
            std::size_t index = 0;  // among the outputs
            while (index < outputs.size() && !outputs[index].is_same(*s)) ++index;
            LOOM_CHECK(index == outputs.size() || index < Saved::kMaxOutputs, name,
                       "saves its output {}, but only the first {} outputs of an op can be saved for backward", index,
                       Saved::kMaxOutputs);
            e.add_saved(saved_of(*s, index == outputs.size() ? kNotOutput : index));
        }
        if (const auto& scope = engine::scope_path()) e.rare_made().scope = scope;
        e.backward.emplace(ops, closure, ops.kept_inline ? nullptr : tape.stream.allocate(ops.size, ops.align));
    } catch (...) {
        tape.entries.pop_back();
        throw;
    }
    // Nothing below throws: the outputs get their history once the entry stands.
    for (std::size_t k = 0; k < outputs.size(); ++k) {
        const std::uint64_t slot = tape.next_slot + k;
        give_history(k == 0 ? *first_chunk : tape.chunk_for(slot), slot, name, tape.next_seq, outputs[k]);
    }
    e.custom = custom;
    ++tape.next_seq;
    tape.next_slot += outputs.size();
    if (anomaly_mode_enabled())
        for (const Tensor& out : outputs) check_forward_anomaly(name, out, e.seq);
}

namespace {
// The contract that the sweep's formulas trust (Sweep::formula_values): an op swept by its
// formula saves the inputs and output the formula reads, in that order. Checked where
// assertions are on (the sanitized suite's build), off the release build's path.
template <class Refs>
[[maybe_unused]] void check_formula_saves(const char* name, std::uint8_t kind, Refs inputs, const Tensor& output,
                                          Refs saved)
{
    pointwise::with_formula(static_cast<pointwise::Kind>(kind), [&]<class F>() {
        SmallVector<const Tensor*, 3> read;
        if constexpr (pointwise::is_binary<F>) {
            if (F::reads.a) read.push_back(inputs[0].tensor);
            if (F::reads.b) read.push_back(inputs[1].tensor);
        } else if (F::reads.x) {
            read.push_back(inputs[0].tensor);
        }
        if (F::reads.y) read.push_back(&output);
        bool same = read.size() == saved.size();
        for (std::size_t k = 0; same && k < read.size(); ++k) same = read[k]->is_same(*saved[k].tensor);
        LOOM_CHECK(same, name, "internal: saved {} tensors that are not the {} inputs and output its formula reads",
                   saved.size(), read.size());
    });
}
}  // namespace

namespace {
// An entry's input references, built before the entry: as many as the op's inputs.
template <std::size_t N> struct InputRefList : std::array<InputRef, N> {
    explicit InputRefList(std::size_t) {}
};
template <> struct InputRefList<std::dynamic_extent> : SmallVector<InputRef, 3> {
    explicit InputRefList(std::size_t n) : SmallVector<InputRef, 3>(n) {}
};
}  // namespace

template <std::size_t Inputs, std::size_t Saves>
void detail::push_op_entry(const char* name, std::span<const internal::TensorRef, Inputs> inputs, const Tensor& output,
                           std::span<const internal::TensorRef, Saves> saved, const BackwardOps& ops, void* closure)
{
    auto& tape = tape_for_entry(name, inputs, std::span<const Tensor>(&output, 1));
#ifndef NDEBUG
    // internal::record's contract (a fresh, floating output), checked off the release build's
    // path as the formula's saves are: 9 instructions of every entry loom's own ops record.
    check_output(name, output);
    if (ops.pointwise != 0)
        check_formula_saves(name, ops.pointwise, std::span<const internal::TensorRef>(inputs), output,
                            std::span<const internal::TensorRef>(saved));
#endif
    // What the entry keeps of its inputs and output is read before the entry is written: its
    // one-byte fields may alias anything, so a read after one of them is written is made again
    // (as push_entry_stored, a check below that fails leaves the tape as harmless as there).
    TensorImpl& out = output.impl();
    bool keep_meta = false;
    InputRefList<Inputs> refs(inputs.size());
    for (std::size_t k = 0; k < inputs.size(); ++k)
        refs[k] = input_ref(tape, name, *inputs[k].tensor, &out, false, &keep_meta);
    SlotChunk& chunk = tape.chunk_for(tape.next_slot);
    const std::uint64_t seq = tape.next_seq, slot = tape.next_slot;
    const std::shared_ptr<const std::string>* scope = engine::scope_path_set;  // scope_path(), without its null
    Entry& e = tape.entries.emplace_back();  // as in push_entry_stored
    try {
        e.seq = seq;
        e.cold().name = name;
        e.set_inputs(refs);
        if (keep_meta) keep_input_meta(tape, e, inputs);
        e.first_slot = slot;
        e.num_outputs = 1;
        e.keep_first_output_shape(out.shape);
        e.output_dtype = out.dtype;
        e.set_saved(saved.size(), [&](std::size_t k) {
            const Tensor& s = *saved[k].tensor;
            return saved_of(s, s.impl_ptr().get() == &out ? 0 : kNotOutput);  // out: read once, above
        });
        if (scope && *scope) e.rare_made().scope = *scope;
        e.backward.emplace(ops, closure, ops.kept_inline ? nullptr : tape.stream.allocate(ops.size, ops.align));
    } catch (...) {
        tape.entries.pop_back();
        throw;
    }
    give_history(chunk, slot, name, seq, output);
    tape.next_seq = seq + 1;
    tape.next_slot = slot + 1;
    if (anomaly_mode_enabled()) check_forward_anomaly(name, output, seq);
}
#define LOOM_PUSH_OP_ENTRY(INPUTS, SAVES)                                                                            \
    template void detail::push_op_entry<INPUTS, SAVES>(const char*, std::span<const internal::TensorRef, INPUTS>,  \
                                                       const Tensor&, std::span<const internal::TensorRef, SAVES>, \
                                                       const BackwardOps&, void*);
LOOM_PUSH_OP_ENTRY(1, 0)
LOOM_PUSH_OP_ENTRY(1, 1)
LOOM_PUSH_OP_ENTRY(2, 0)
LOOM_PUSH_OP_ENTRY(2, 1)
LOOM_PUSH_OP_ENTRY(2, 2)
LOOM_PUSH_OP_ENTRY(std::dynamic_extent, std::dynamic_extent)
#undef LOOM_PUSH_OP_ENTRY

Tensor embed_region(const Tensor& part, const Shape& shape, const RegionFn& region)
{
    Tensor whole = zeros(shape, part.dtype());
    kernels::copy_into(region(whole), part);
    return record("embed", {part}, std::move(whole), {}, [region](const BackwardContext& c) {
        return GradList{record_region("slice", c.grad(), region(c.grad()), region)};
    });
}

Tensor record_region(const char* name, const Tensor& input, Tensor output, RegionFn region)
{
    const Tensor inputs[] = {input};
    if (!should_record(inputs)) return output;
    // Made first: once the entry stands, nothing may fail and leave it without its region.
    auto rare = std::make_unique<Entry::Rare>();
    rare->region = std::move(region);
    detail::push_entry_with(name, std::span<const Tensor>(inputs), std::span<const Tensor>(&output, 1),
                            std::span<const Tensor>(), [](const BackwardContext& c) { return GradList{c.take_grad()}; },
                            false);
    Entry& e = this_tape().entries.back();
    Entry::Rare* made = rare.get();
    if (Entry::Rare& kept = e.adopt_rare(rare); &kept != made)
        kept.region = std::move(made->region);  // the entry made its own for a Scope
    return output;
}
std::uint64_t detail::next_sequence() { return this_tape().next_seq; }
std::size_t detail::tape_stream_bytes() { return this_tape().stream.bytes_used(); }
std::uint64_t detail::entries_swept_by_formula() { return this_tape().entries_swept_by_formula; }

}  // namespace autograd

}  // namespace loom
