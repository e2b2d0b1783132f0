// The tape's private parts, shared by the files that implement it: tape.cpp (recording and
// reclaiming entries), sweep.cpp (backward, grad and the gradients they leave), anomaly.cpp
// (anomaly mode and scopes) and custom_ops.cpp (the checks on users' ops). Not installed.
#pragma once
#include <algorithm>
#include <array>
#include <atomic>
#include <cstddef>
#include <new>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tape.hpp"

namespace loom::autograd::engine {

#ifdef __GLIBCXX__  // the members' sizes are libstdc++'s (libc++'s std::function is 48 bytes)
static_assert(sizeof(Entry) == 128, "a long tape's recording and sweep stream through its entries, and wait on "
                                    "memory for each line of them (README, Speed: \"Fewer bytes per op\")");
#endif

inline std::atomic<std::uint64_t> next_tape_id{1};
// The scope of what was recorded outside any Scope.
inline const std::shared_ptr<const std::string> no_scope;
// Whether any leaf ever had a post-accumulate hook: until then a sweep does not look for the
// last reader of each leaf.
inline std::atomic<bool> post_accumulate_hooks_exist{false};

// Fetches entry e's lines ahead of their use; `ForWrite`: to be destroyed; `WithCold`: its cold
// part too. The sweep and the reset both walk a long tape whose entries were written long before.
template <bool ForWrite, bool WithCold = true> [[gnu::always_inline]] inline void prefetch_entry(const Entry& e)
{
    const auto* bytes = reinterpret_cast<const char*>(&e);
    for (std::size_t at = 0; at < sizeof(Entry); at += 64) __builtin_prefetch(bytes + at, ForWrite);
    if constexpr (WithCold) __builtin_prefetch(&e.cold(), ForWrite);
}
// Fetches the first `lines` cache lines of the block of each tensor e saved: reading an entry's
// saved list is itself a load, so e must have been fetched some entries before.
template <bool ForWrite> [[gnu::always_inline]] inline void prefetch_saved_blocks(const Entry& e, std::size_t lines)
{
    for (const Saved& s : e.saved())
        if (const auto* block = reinterpret_cast<const char*>(s.value.impl_ptr().get()))
            for (std::size_t line = 0; line < lines; ++line) __builtin_prefetch(block + 64 * line, ForWrite);
}

// A tape's entries, in chunks that never move: an entry stays where it is while later ones are
// appended (by a backward function that records, or a hook), so a sweep holds a reference to the
// entry it runs; and a long tape grows without copying what it holds. Cleared chunks are kept.
class EntryStore {
public:
    EntryStore() = default;
    ~EntryStore() { clear(); }
    EntryStore(const EntryStore&) = delete;
    EntryStore& operator=(const EntryStore&) = delete;

    std::size_t size() const { return size_; }
    bool empty() const { return size_ == 0; }
    Entry& operator[](std::size_t i) { return (*chunks_[i / kChunk])[i % kChunk]; }
    const Entry& operator[](std::size_t i) const { return (*chunks_[i / kChunk])[i % kChunk]; }
    Entry& back() { return (*this)[size_ - 1]; }
    // Entry i - n, for e = entry i: found from e's address where both lie in one chunk, which
    // spares the walks that fetch entries ahead an index computation (two dependent loads) each.
    Entry& before(Entry& e, std::size_t i, std::size_t n)
    {
        return i % kChunk >= n ? *(&e - n) : (*this)[i - n];
    }
    // Entry i + n, for e = entry i (i + n < size()), as before().
    Entry& after(Entry& e, std::size_t i, std::size_t n)
    {
        return i % kChunk + n < kChunk ? *(&e + n) : (*this)[i + n];
    }
    [[gnu::always_inline]] Entry& emplace_back()
    {
        if (next_ == chunk_end_) [[unlikely]]
            find_next();
        Entry* e = new (next_) Entry();
        ++next_;
        ++size_;
        return *e;
    }
    void pop_back()
    {
        (*this)[--size_].~Entry();
        next_ = chunk_end_ = nullptr;  // found again by the next emplace_back
    }
    // Keeps the first n entries: drops the others, oldest first, each shown to `before_drop`
    // (which must not throw) just before. A walk along each chunk, not a pop per entry, which
    // found the entry from its index and forgot where the next one goes: a loop that records ops
    // and drops their results has its tape compacted every 1,024 entries (bench_tape's recorded
    // add, 601 -> 577 instructions per op, compact_since's own loop folded in).
    template <class BeforeDrop> void drop_from(std::size_t n, BeforeDrop&& before_drop)
    {
        if (n >= size_) return;
        for (std::size_t i = n; i < size_;) {
            const std::size_t end = std::min(size_, (i / kChunk + 1) * kChunk);
            Entry* e = &(*this)[i];
            for (Entry* const stop = e + (end - i); e != stop; ++e) {
                before_drop(*e);
                e->~Entry();
            }
            i = end;
        }
        size_ = n;
        next_ = chunk_end_ = nullptr;  // found again by the next emplace_back
    }
    void shrink_to(std::size_t n)
    {
        drop_from(n, [](const Entry&) noexcept {});
    }
    // Drops every entry, oldest first: a sweep ends at the oldest, so those are the ones still in
    // the cache. Each entry, and the reference counts of the tensors it saved, were last touched
    // long ago on a long tape, so they are fetched ahead: the entries 16 ahead and the headers 8
    // (reading an entry's saved list is itself a load, so its entry must have been fetched
    // first). At 8 and 4 perf put half of the reset's samples on those loads; 16 and 8 took
    // 3-4% off W7's backward at 1,024 characters in one process switching the two (too little
    // for separate runs to show), and 32 and 16 no more.
    // The lines a header spans: it starts on a 16-byte boundary, at most 48 bytes into a line.
    static constexpr std::size_t kHeaderLines = (48 + sizeof(TensorImpl) + 63) / 64;
    void clear()
    {
        const bool long_tape = size_ >= kPrefetchFrom;  // a short one is still in the cache
        Entry* next = nullptr;
        for (std::size_t i = 0; i < size_; ++i) {
            // Entry i is the one after entry i - 1 in its chunk; only a chunk's first is looked up
            // (cheaper here than after(), which would test for entry i - 1 first).
            Entry& e = *(i % kChunk == 0 ? &(*this)[i] : next);
            next = &e + 1;
            // The cold part is not fetched: only an entry with a Rare part reads it here.
            if (long_tape && i + kClearAhead < size_) prefetch_entry<true, false>(after(e, i, kClearAhead));
            // A saved tensor's reference counts open its header; its destruction reads the
            // header alone (a small tensor's storage record has nothing to free).
            if (long_tape && i + kClearAhead / 2 < size_)
                prefetch_saved_blocks<true>(after(e, i, kClearAhead / 2), kHeaderLines);
            e.~Entry();
        }
        size_ = 0;
        next_ = chunk_end_ = nullptr;
    }
    // The index of the first entry numbered seq or above (size() if none).
    std::size_t lower_bound(std::uint64_t seq) const
    {
        std::size_t lo = 0, hi = size_;
        while (lo < hi) {
            const std::size_t mid = lo + (hi - lo) / 2;
            if ((*this)[mid].seq < seq) lo = mid + 1;
            else hi = mid;
        }
        return lo;
    }

private:
    static constexpr std::size_t kChunk = Entry::kPerChunk;
    static constexpr std::size_t kClearAhead = 16;
    static constexpr std::size_t kPrefetchFrom = 4096;
    // Raw storage: an entry is constructed when appended and destroyed when dropped; its cold
    // part (Entry::Cold) lies in the same chunk, after all the entries, where Entry::cold()
    // finds it from the entry's address.
    struct alignas(Entry::kChunkAlign) Chunk {
        std::byte bytes[kChunk * sizeof(Entry)];
        std::byte cold[kChunk * sizeof(Entry::Cold)];
        Entry& operator[](std::size_t i) { return *std::launder(reinterpret_cast<Entry*>(bytes) + i); }
        const Entry& operator[](std::size_t i) const { return *std::launder(reinterpret_cast<const Entry*>(bytes) + i); }
    };
    static_assert(offsetof(Chunk, cold) == kChunk * sizeof(Entry) &&
                      offsetof(Chunk, cold) + sizeof(Chunk::cold) <= Entry::kChunkAlign,
                  "Entry::cold() finds an entry's chunk by rounding its address down to kChunkAlign");
    // Sets next_ and chunk_end_ for entry size_, adding a chunk if need be.
    [[gnu::noinline]] void find_next()
    {
        if (size_ == chunks_.size() * kChunk) chunks_.push_back(std::unique_ptr<Chunk>(new Chunk));  // not zeroed
        Chunk& chunk = *chunks_[size_ / kChunk];
        next_ = &chunk[size_ % kChunk];
        chunk_end_ = &chunk[0] + kChunk;
    }
    std::vector<std::unique_ptr<Chunk>> chunks_;
    std::size_t size_ = 0;
    // Where entry size_ goes, while it lies in the chunk that ends at chunk_end_: appending
    // writes there and steps on, instead of finding the chunk from the index. Both null when
    // unknown (after a pop or a clear).
    Entry* next_ = nullptr;
    Entry* chunk_end_ = nullptr;
};

// What entries keep beside them: the backward closures too large to keep inline, and the
// shapes of inputs that the first output's gradient does not tell (KeptInputMeta). Laid down
// one after another in chunks that never move while the tape holds entries, and reused from one
// recording to the next: recording such an op bumps an offset instead of allocating, and what
// successive entries keep lies side by side, in the order the sweep and a reset read it.
class ByteStream {
public:
    // `size` bytes aligned to `align` (a power of two, at most 16).
    void* allocate(std::size_t size, std::size_t align)
    {
        const std::size_t at = (used_ + align - 1) & ~(align - 1);
        if (current_ < chunks_.size() && at + size <= chunks_[current_].size) [[likely]] {
            used_ = at + size;
            return chunks_[current_].bytes.get() + at;
        }
        return allocate_in_next_chunk(size);
    }
    // Makes every byte free again (what they held destroyed already); the chunks are kept.
    void clear()
    {
        current_ = 0;
        used_ = 0;
    }
    // Bytes handed out since the last clear (for the tests).
    std::size_t bytes_used() const
    {
        std::size_t n = used_;
        for (std::size_t i = 0; i < current_ && i < chunks_.size(); ++i) n += chunks_[i].size;
        return n;
    }

private:
    static constexpr std::size_t kChunkBytes = std::size_t(64) << 10;
    struct Chunk {
        std::unique_ptr<std::byte[]> bytes;  // operator new[]'s alignment: 16
        std::size_t size;
    };
    [[gnu::noinline]] void* allocate_in_next_chunk(std::size_t size)
    {
        const std::size_t next = chunks_.empty() ? 0 : current_ + 1;
        // A chunk kept from an earlier recording is reused if the closure fits it.
        if (next >= chunks_.size() || chunks_[next].size < size) {
            const std::size_t bytes = std::max(kChunkBytes, size);
            chunks_.insert(chunks_.begin() + static_cast<std::ptrdiff_t>(std::min(next, chunks_.size())),
                           Chunk{std::make_unique_for_overwrite<std::byte[]>(bytes), bytes});
        }
        current_ = next;
        used_ = size;
        return chunks_[current_].bytes.get();
    }
    std::vector<Chunk> chunks_;
    std::size_t current_ = 0;
    std::size_t used_ = 0;
};

// The indices of the entries a sweep ran, to release them at its end: a buffer of a
// capacity, written from its start, never value-initialised (a sweep that stops early touches
// only the pages it wrote).
class SweptList {
public:
    // Makes room for n, dropping what it held.
    std::size_t* room_for(std::size_t n)
    {
        if (capacity_ < n) {
            indices_ = std::make_unique_for_overwrite<std::size_t[]>(n);
            capacity_ = n;
        }
        return indices_.get();
    }
    void swap(SweptList& other) noexcept
    {
        indices_.swap(other.indices_);
        std::swap(capacity_, other.capacity_);
    }

private:
    std::unique_ptr<std::size_t[]> indices_;
    std::size_t capacity_ = 0;
};

// One thread's tape.
struct Tape {
    // Declared before the entries, so that it outlives what they keep in it.
    ByteStream stream;
    EntryStore entries;  // in recording order: seq increases
    std::uint64_t next_seq = 1;
    std::uint64_t next_slot = 1;  // the slot the next entry's first output gets (Entry::first_slot)
    std::size_t compact_at = 1024;
    // Entries a sweep has released; when every entry on the tape is released, the tape is
    // emptied at once (keeping its capacity) instead of walked again by compaction.
    std::size_t released_entries = 0;
    // Entries numbered below this were reclaimed by such a reset: all of them had been released.
    std::uint64_t reset_floor = 0;
    std::uint64_t id = next_tape_id++;
    int running_sweeps = 0;  // sweeps hold indices into the tape, which compaction would move
    // Entries swept from their op's formula instead of its backward function, ever: what tests
    // read to see which route an entry took (detail::entries_swept_by_formula).
    std::uint64_t entries_swept_by_formula = 0;
    // The first entry a sweep started now may reach: the tape's length when the innermost running
    // sweep began (0 when none runs). A grad() or backward() inside a backward function or a hook
    // sees only what was recorded since, never the running sweep's gradients.
    std::uint64_t sweep_floor = 0;
    // The outermost sweep's buffers, kept between sweeps (empty, capacity kept): a sweep over a
    // long tape would otherwise allocate and fault in megabytes of fresh memory every time.
    std::vector<PendingGrad> spare_slots;
    SweptList spare_swept;
    // The leaves' nodes the entries read, each held here once, so that an entry reading a
    // parameter points at its node instead of copying a shared_ptr (two atomic reference counts
    // per op). Dropped when the tape is empty and no sweep runs, and pruned to those the remaining
    // entries read at each full compaction.
    std::vector<std::shared_ptr<Node>> held_inputs;
    // The nodes of the outputs a hook or retain_grad() watches, by slot: kept while their entry
    // may still be swept, so a hook runs even once its tensor is gone.
    std::unordered_map<std::uint64_t, std::shared_ptr<Node>> watched_nodes;
    // The producers of non-leaf inputs that a reset had already reclaimed when an entry read them,
    // by slot: what a gradient reaching one names in its error. Cleared at each reset, with the
    // entries that read them.
    std::unordered_map<std::uint64_t, History> reclaimed_inputs;
    // The slot records of the entries on the tape, by chunk: slot_chunks[i] holds the slots from
    // (first_chunk + i) * kSlots on. A chunk no entry on the tape has an output in any more is
    // retired: freed once none of its tensors is alive.
    std::deque<std::unique_ptr<SlotChunk>> slot_chunks;
    std::uint64_t first_chunk = 0;
    std::vector<std::unique_ptr<SlotChunk>> retired_chunks;
    // A retired chunk none of whose tensors is alive, kept to hold the next slots: a short tape
    // swept again and again then allocates none.
    std::unique_ptr<SlotChunk> spare_chunk;
    Tape() = default;
    Tape(const Tape&) = delete;
    Tape& operator=(const Tape&) = delete;
    ~Tape();
    // The chunk holding `slot`, made if need be (slot must not lie below the chunks kept).
    SlotChunk& chunk_for(std::uint64_t slot)
    {
        if (newest_chunk && slot - newest_chunk->first_slot < SlotChunk::kSlots) [[likely]]
            return *newest_chunk;
        SlotChunk& made = chunk_made_for(slot);
        newest_chunk = slot_chunks.back().get();
        return made;
    }
    // The newest chunk (null when none): the one the next slots fall in.
    SlotChunk* newest_chunk = nullptr;
    // chunk_for's slow path.
    [[gnu::noinline]] SlotChunk& chunk_made_for(std::uint64_t slot)
    {
        const std::uint64_t index = slot / SlotChunk::kSlots;
        if (slot_chunks.empty()) first_chunk = index;
        while (first_chunk + slot_chunks.size() <= index) {
            const std::uint64_t first = (first_chunk + slot_chunks.size()) * SlotChunk::kSlots;
            if (spare_chunk) {
                spare_chunk->first_slot = first;
                spare_chunk->used = SlotChunk::kSlots;
            }
            slot_chunks.push_back(spare_chunk ? std::move(spare_chunk) : std::make_unique<SlotChunk>(first, id));
        }
        return *slot_chunks[chunk_index(slot)];
    }
    // Where in slot_chunks the chunk holding `slot` lies (once it is made).
    std::size_t chunk_index(std::uint64_t slot) const
    {
        return static_cast<std::size_t>(slot / SlotChunk::kSlots - first_chunk);
    }
    // The chunk holding `slot`, an output's of an entry on the tape.
    const SlotChunk& chunk_holding(std::uint64_t slot) const { return *slot_chunks[chunk_index(slot)]; }
    // Whether the tensor of an output of an entry on the tape is alive.
    bool slot_alive(std::uint64_t slot) const
    {
        const SlotChunk& c = chunk_holding(slot);
        return c.alive[slot - c.first_slot].load(std::memory_order_acquire);
    }
    // Whether the tensor of any output in slots [from, to) is alive: each chunk found once, its
    // flags then read in a row.
    bool any_slot_alive(std::uint64_t from, std::uint64_t to) const
    {
        for (std::uint64_t slot = from; slot < to;) {
            const SlotChunk& c = chunk_holding(slot);
            const std::uint64_t end = std::min<std::uint64_t>(to, c.first_slot + SlotChunk::kSlots);
            for (; slot < end; ++slot)
                if (c.alive[slot - c.first_slot].load(std::memory_order_acquire)) return true;
        }
        return false;
    }
    // Retires every chunk (the tape is empty), and frees the retired chunks none of whose tensors
    // is alive any more. `keep_current`: the chunk the next slots fall in stays, to go on handing
    // them out; retired, it would be scanned for live tensors, and a short tape swept again and
    // again, whose root outlives the sweep, would make a new one every time (a tenth of
    // bench_tape's recorded and swept add).
    void retire_all_chunks(bool keep_current = true);
    // Keeps `chunk` as the spare, frees it, or keeps it among the retired while a tensor of it lives.
    void retire(std::unique_ptr<SlotChunk> chunk)
    {
        chunk->used = std::min<std::uint64_t>(SlotChunk::kSlots, next_slot - chunk->first_slot);
        if (chunk->any_alive()) retired_chunks.push_back(std::move(chunk));
        else if (!spare_chunk) spare_chunk = std::move(chunk);
    }
    // Drops the chunks wholly below `slot`: no entry left on the tape has an output there.
    void drop_chunks_below(std::uint64_t slot)
    {
        while (!slot_chunks.empty() && (first_chunk + 1) * SlotChunk::kSlots <= slot) {
            if (slot_chunks.size() == 1) newest_chunk = nullptr;
            retire(std::move(slot_chunks.front()));
            slot_chunks.pop_front();
            ++first_chunk;
        }
    }
    // Which nodes held_inputs surely holds, by a hash of their address; cleared whenever
    // held_inputs drops any (an address may then be reused by another node).
    static constexpr std::size_t kRecentlyHeld = 256;
    std::array<const Node*, kRecentlyHeld> recently_held{};
    // Holds `node` for the entries that read it. The test inline, the hold out of line: as one
    // call, recording an add of two leaves spent more on the calls than on the tests.
    [[gnu::always_inline]] void hold_input(const std::shared_ptr<Node>& node)
    {
        const std::size_t h = recently_held_index(node.get());
        if (recently_held[h] != node.get()) [[unlikely]]
            hold_new_input(node, h);
    }
    static std::size_t recently_held_index(const Node* node)
    {
        return (reinterpret_cast<std::uintptr_t>(node) >> 4) % kRecentlyHeld;
    }
    // Drops every hold (the tape holds no entry that reads them). Each node recently_held names
    // is one of held_inputs, so where those are few their places alone are cleared, not all 256:
    // a backward through a few ops cleared 2 KiB each time (bench_tape's swept chain, 5 a op).
    void release_held_inputs()
    {
        if (held_inputs.size() > kRecentlyHeld / 8) recently_held.fill(nullptr);
        else
            for (const auto& node : held_inputs) recently_held[recently_held_index(node.get())] = nullptr;
        held_inputs.clear();
    }
    [[gnu::noinline]] void hold_new_input(const std::shared_ptr<Node>& node, std::size_t h)
    {
        held_inputs.push_back(node);
        recently_held[h] = node.get();
    }
};

// This thread's tape is reached through a plain pointer: a thread_local Tape itself, having a
// constructor and a destructor, would cost a call to its TLS init function on every access
// from another file. initial-exec: libloom is linked, not dlopen()ed, and the general model
// costs a call (__tls_get_addr) too.
extern constinit thread_local Tape* current_tape [[gnu::tls_model("initial-exec")]];
// Makes this thread's tape on its first use.
Tape& create_tape();
inline Tape& this_tape()
{
    Tape* t = current_tape;
    return t ? *t : create_tape();
}

// Drops an entry's inputs, saved tensors and backward: no sweep can run it again.
void release(Entry& e);
// Empties the tape (its memory kept for the next recording): every entry on it has been released,
// or was swept by the one plain sweep running, which reaches none of them again.
void reset(Tape& tape);
// Drops the tape's holds on the nodes its entries read (Tape::held_inputs) once it is empty and
// no sweep runs: a sweep still reaches the leaves it touched after the tape is reset.
void release_held_inputs_if_idle(Tape& tape);
// After the outermost sweep: when every entry on the tape has been released, empties it (its
// memory kept for the next recording), so the next forward starts on a clean tape.
void reset_if_all_released(Tape& tape);
// Drops the dead entries numbered first_seq and above: those no tensor holds an output of and no
// live entry reads (no gradient can reach them again); compaction is compact_since(0). Nothing
// while a sweep runs.
void compact_since(std::uint64_t first_seq);
// Throws the error, naming the op, for a gradient reaching the output of an entry an earlier
// backward() released and a reset reclaimed (it was produced on this tape below reset_floor).
[[noreturn]] void fail_released(const History& history);
// The producer of the non-leaf of slot `slot` that an entry on the tape reads: its entry, or the
// record kept for one a reset reclaimed. Throws (internal) if there is neither.
History producer_of_slot(const Tape& tape, std::uint64_t slot);
// Drops the nodes the tape keeps for a watched entry's outputs: no sweep can reach them again.
void forget_watched(Tape& tape, const Entry& e);

// scan's tracer (scan.cpp): while a step is being traced, every entry recorded on this thread is
// shown to it before it is pushed.
struct Tracer {
    virtual void on_entry(const char* name, std::span<const Tensor> inputs, std::span<const Tensor> outputs) = 0;

protected:
    ~Tracer() = default;
};
extern constinit thread_local Tracer* current_tracer [[gnu::tls_model("initial-exec")]];

// ---- custom_ops.cpp and sweep.cpp ----
// Whether a gradient of `shape` and `dtype` for input `in`, which is not of that input's shape
// and dtype, is one for a leaf that Module::to() converted after the entry was recorded: of the
// leaf's shape but not its dtype (only to() changes a leaf's dtype). The errors then name to().
inline bool converted_leaf(const InputRef& in, const Shape& shape, DType dtype)
{
    const Node* leaf = in.node();
    return leaf && dtype != leaf->dtype && shape == leaf->shape;
}

// ---- anomaly.cpp ----
// Whether a DetectAnomalyGuard is alive on this thread (inner ops or not).
inline bool anomaly_guarded() { return detail::anomaly_guards > 0; }
// The current Scope path while a Scope is alive, else null: a plain pointer, initial-exec as the
// other hot thread-locals (libloom is linked, not dlopen()ed), where reading the shared_ptr itself
// cost a call to __tls_get_addr for its destructor's guard.
extern constinit thread_local const std::shared_ptr<const std::string>* scope_path_set
    [[gnu::tls_model("initial-exec")]];
// The current Scope path, null outside any Scope; kept by entries. Inline: every recorded op
// reads it, and a call each was 2% of recording's instructions.
inline const std::shared_ptr<const std::string>& scope_path() { return scope_path_set ? *scope_path_set : no_scope; }
// ", in scope 'decoder/step 3'", or "" for none.
std::string scope_phrase(const std::shared_ptr<const std::string>& scope);
// Index and value of the first NaN or Inf in t, if any.
std::optional<std::pair<std::int64_t, double>> first_non_finite(const Tensor& t);
// Throws when a gradient that entry `seq` produced holds a NaN or Inf.
void check_backward_anomaly(const char* name, std::uint64_t seq, const std::shared_ptr<const std::string>& scope,
                            std::size_t input, const Tensor& g);

}  // namespace loom::autograd::engine
