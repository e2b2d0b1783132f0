/// \file
/// The tape: how loom records what was computed and differentiates it.
///
/// **Entries.** Each thread has one tape, a vector of Entry in recording order. A differentiable
/// op computes its value and, when grad mode is on and an input requires grad, appends one
/// entry: its name, the inputs it sends gradients to, its outputs, the tensors it
/// saved for backward (with their storage versions, so an in-place change is caught) and its
/// backward function: an op token and the closure, in the entry when small, else in the tape's
/// byte stream (StoredBackward). An op that records nothing costs no entry. An entry is two cache
/// lines: what a sweep of loom's element-wise ops reads; the rest (its name, its first output's
/// shape, what few entries have) lies aside in its chunk of the tape (Entry::Cold).
///
/// **Leaves, non-leaves and liveness.** A leaf that requires grad (a parameter) carries a Node:
/// its shape and dtype, its .grad() and its hooks; the tape holds each leaf's node once however
/// many entries read it. A non-leaf carries no object of its own: only a pointer into the chunk
/// of its tape's slot records (SlotChunk) that says which op and entry produced it and whether it
/// is alive (its header's destructor clears that flag), and its index there. The entry keeps its
/// outputs' shapes and dtypes. An entry is dead once none of its outputs is alive (or
/// only its own saves of them hold them, as tanh saves its result) and no live entry reads them:
/// no gradient can reach it then, and compaction reclaims it. A non-leaf gets a Node only when a
/// hook or retain_grad() asks for one; the tape keeps it by slot while the entry may be swept.
///
/// **Slots.** Each output of an entry has a slot number, increasing along the tape with the
/// entries' sequence numbers. A sweep sums the gradients reaching non-leaves in one dense array
/// indexed by slot (it never reaches a tensor or node, unless hooks or retain_grad() mark the
/// entry watched), counts the slots still waiting to be taken, and stops when none is left: an entry
/// no gradient reached is skipped, and the dead part of the tape below is never walked.
///
/// **Sequence numbers** increase along the tape, so entry `seq` is found by binary search and a
/// sweep from a tensor starts at the entry that produced it and walks back. A sweep started
/// inside another (grad() in a backward function or a hook) reaches only entries recorded
/// since that one began.
///
/// **Threads.** Tapes are thread-local: a non-leaf belongs to the thread that recorded it and is
/// differentiated there. Leaves (parameters) may be shared by threads: a sweep sums a leaf's
/// gradient on its own side and adds it into .grad() under a lock at the end.
///
/// **The slow path.** Most entries are swept by calling backward and adding what it returns
/// (in place where the sum is the sweep's own). Some take a longer route, checked per entry:
/// create_graph (backward recorded with differentiable ops; nothing summed in place), hooks and
/// retain_grad (run when a node's gradient is complete), anomaly mode (every result checked for
/// NaN and Inf), users' ops (autograd::record, Function: their results checked with errors for
/// their author), region ops (select, slice: the part's gradient added into a region of the
/// whole), and checkpointed layers (a segment recomputed and swept inside the running sweep).
///
/// The implementation: tape.cpp records, sweep.cpp sweeps, anomaly.cpp checks and names,
/// custom_ops.cpp checks users' ops; tape_internal.hpp is what they share.
#pragma once
#include <algorithm>
#include <array>
#include <cstring>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <new>
#include <optional>
#include <ranges>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/parallel.hpp"
#include "../core/tensor.hpp"

/// Grad mode, NoGradGuard and grad() are in namespace loom, as libtorch has torch::NoGradGuard
/// and torch::autograd::grad; the tape's types are in loom::autograd.
namespace loom {

// ---- grad mode ----
namespace detail {
/// This thread's grad mode, read inline by every op. initial-exec: libloom is linked, not dlopen()ed.
extern constinit thread_local bool grad_mode [[gnu::tls_model("initial-exec")]];
}  // namespace detail
/// Whether ops are recorded on this thread (on by default).
inline bool grad_enabled() { return detail::grad_mode; }
/// Turns recording on or off on this thread.
void set_grad_enabled(bool enabled);

/// Stops recording while alive (evaluation, optimizer updates).
class NoGradGuard {
public:
    NoGradGuard() : previous_(grad_enabled()) { set_grad_enabled(false); }
    ~NoGradGuard() { set_grad_enabled(previous_); }
    NoGradGuard(const NoGradGuard&) = delete;
    NoGradGuard& operator=(const NoGradGuard&) = delete;

private:
    bool previous_;
};

/// Gradients of `outputs` (scalars, or seeded by `grad_outputs`) with respect to `inputs`,
/// returned without touching any .grad(); libtorch's torch::autograd::grad, with its argument
/// order and defaults. retain_graph keeps the graph for another sweep (by default it is kept
/// exactly when create_graph is set). With `create_graph` the backward computation is itself
/// recorded, so the gradients can be differentiated again (Hessian-vector products, gradient
/// penalties). An input the outputs do not depend on is an error unless `allow_unused`, which
/// returns an undefined tensor for it.
std::vector<Tensor> grad(const std::vector<Tensor>& outputs, const std::vector<Tensor>& inputs,
                         const std::vector<Tensor>& grad_outputs = {}, std::optional<bool> retain_graph = std::nullopt,
                         bool create_graph = false, bool allow_unused = false);

/// Sets grad mode while alive, restoring the previous mode after.
class GradModeGuard {
public:
    /// Sets grad mode to `enabled`.
    explicit GradModeGuard(bool enabled) : previous_(grad_enabled()) { set_grad_enabled(enabled); }
    ~GradModeGuard() { set_grad_enabled(previous_); }
    GradModeGuard(const GradModeGuard&) = delete;
    GradModeGuard& operator=(const GradModeGuard&) = delete;

private:
    bool previous_;
};

namespace autograd {

/// A tensor hook: receives a gradient, returns a replacement or an undefined tensor to keep it.
using Hook = std::function<Tensor(const Tensor&)>;

/// A gradient being summed during one sweep: the sweep keeps one per slot (below), and one per
/// leaf it reaches.
struct PendingGrad {
    /// The sum so far.
    Tensor sum;
    bool owned = false;  ///< `sum` was allocated by the sweep for this tensor alone: safe to add into in place
    bool captured = false;  ///< grad() wants this tensor's gradient
    bool accumulated = false;  ///< a leaf's: already added into .grad() before the sweep ended (its last reader ran)
};

/// A tensor's gradient hooks: few tensors have any, so a node keeps them behind a pointer.
struct NodeHooks {
    /// Gradient hooks, in registration order.
    std::vector<Hook> gradient;
    /// Leaves only: called once a backward() has added this leaf's gradient into .grad()
    /// (register_post_accumulate_grad_hook), in registration order.
    std::vector<std::function<void()>> post_accumulate;
};

/// The lasting gradient bookkeeping of a tensor: every leaf that requires grad has one, shared
/// by threads; a non-leaf gets one only when a hook or retain_grad() needs it (a recorded op
/// makes none: a non-leaf's place on the tape is its slot record).
struct Node {
    /// User-provided, so that make_shared does not first zero the whole node.
    Node() noexcept {}
    /// The tensor's shape.
    Shape shape;
    Tensor grad;  ///< accumulated .grad() (leaves, or retain_grad())
    /// A non-leaf's producer (seq 0 for a leaf).
    History history;
    /// Its hooks; null until one is registered.
    std::unique_ptr<NodeHooks> hooks;
    /// The tensor's dtype.
    DType dtype;
    /// Keep the gradient in `grad` after backward (retain_grad()).
    bool retains_grad = false;
    /// Whether a gradient hook is registered.
    bool has_gradient_hooks() const { return hooks && !hooks->gradient.empty(); }
    /// Whether a post-accumulate hook is registered.
    bool has_post_accumulate_hooks() const { return hooks && !hooks->post_accumulate.empty(); }
    /// The hooks, made on first use.
    NodeHooks& hooks_made()
    {
        if (!hooks) hooks = std::make_unique<NodeHooks>();
        return *hooks;
    }
};

/// A tensor saved for backward, with the storage version it had when saved.
struct Saved {
    /// The low bits of a storage version that a saved tensor keeps: 2^48 in-place writes to one
    /// tensor between forward and backward would go unnoticed, and an entry stays 8 bytes smaller
    /// per saved tensor.
    static constexpr std::uint64_t kVersionMask = (std::uint64_t(1) << 48) - 1;
    /// How many outputs an entry may have for one of them to be saved.
    static constexpr std::size_t kMaxOutputs = std::size_t(1) << 15;
    /// `value_` saved at storage version `version_`; `output_` is its index among the entry's
    /// outputs when `is_output_`.
    Saved(Tensor value_, std::uint64_t version_, bool is_output_, std::size_t output_)
        : value(std::move(value_)), version(version_ & kVersionMask), output(output_), is_output(is_output_)
    {
    }
    /// The tensor. A saved output is the output itself (no copy of its header is made), which
    /// compaction knows from `is_output`: a save by its own entry does not keep the entry alive.
    Tensor value;
    /// The storage version when saved (its low 48 bits).
    std::uint64_t version : 48;
    /// A saved output's index among the entry's outputs.
    std::uint64_t output : 15;
    /// Whether the tensor is an output of the entry.
    std::uint64_t is_output : 1;
    /// Whether `value` is still at the version it was saved at.
    bool unchanged() const { return (value.version() & kVersionMask) == version; }
};

/// An entry's reference to one of its inputs, in one word. What the sweep needs of it is kept
/// here, so that it never reaches the input itself, which lies wherever forward allocated it.
class InputRef {
public:
    /// An input that does not require grad.
    InputRef() = default;
    /// A leaf's node. Not owned: the tape holds a leaf's once for all the entries that read it.
    static InputRef leaf(Node* node, bool like_output)
    {
        return InputRef(reinterpret_cast<std::uintptr_t>(node) | (like_output ? kLikeOutput : 0));
    }
    /// A non-leaf, by its gradient slot (its History's).
    static InputRef non_leaf(std::uint64_t slot, bool like_output)
    {
        return InputRef(slot << 2 | (like_output ? kLikeOutput : 0) | kNonLeaf);
    }
    /// The leaf's node; null for a non-leaf, or where the input does not require grad.
    Node* node() const
    {
        return word_ & kNonLeaf ? nullptr : reinterpret_cast<Node*>(word_ & ~std::uint64_t(kLikeOutput));
    }
    /// The non-leaf's gradient slot; 0 for a leaf.
    std::uint64_t slot() const { return word_ & kNonLeaf ? word_ >> 2 : 0; }
    /// The input has the shape and dtype of the entry's first output, and so of its gradient.
    bool like_output() const { return (word_ & kLikeOutput) != 0; }
    /// Whether the input requires grad.
    explicit operator bool() const { return word_ != 0; }

private:
    // A node's address has its low bits clear; a slot is shifted past the two flags.
    static constexpr std::uint64_t kNonLeaf = 1, kLikeOutput = 2;
    static_assert(alignof(Node) >= 4, "the two flags live in a node address's low bits");
    explicit InputRef(std::uint64_t word) : word_(word) {}
    std::uint64_t word_ = 0;
};

/// A list of up to N items of T kept in place, more on the heap, with no length or capacity of its
/// own: its owner keeps a one-byte code for it (0 to N: that many in place; kOnHeap: on the heap,
/// whose block starts with the length). An entry's inputs and saved tensors so cost the bytes of
/// their items and nothing more, which keeps an entry in two cache lines (Entry). Its owner calls
/// clear() before it goes.
template <class T, std::size_t N> class PackedList {
public:
    static_assert(N > 0 && N < 255, "a code of one byte names the lengths 0 to N and kOnHeap");
    /// The code of a list whose items are on the heap.
    static constexpr std::uint8_t kOnHeap = N + 1;
    PackedList() noexcept {}
    PackedList(const PackedList&) = delete;
    PackedList& operator=(const PackedList&) = delete;
    /// The items of the list with code `code`.
    std::span<T> items(std::uint8_t code) noexcept
    {
        if (code == kOnHeap) [[unlikely]]
            return {heap_->items(), heap_->size};
        return {in_place(), code};
    }
    /// See items().
    std::span<const T> items(std::uint8_t code) const noexcept { return const_cast<PackedList*>(this)->items(code); }
    /// Makes room for n items in an empty list (code 0) and returns its new code.
    std::uint8_t reserve(std::size_t n)
    {
        if (n <= N) return 0;
        void* block = ::operator new(Heap::bytes_for(n), std::align_val_t(alignof(Heap)));
        heap_ = ::new (block) Heap{0};
        return kOnHeap;
    }
    /// Appends an item made of `args` to the list with code `code` (which must have room for it)
    /// and returns the list's new code.
    template <class... Args> std::uint8_t emplace_back(std::uint8_t code, Args&&... args)
    {
        if (code == kOnHeap) [[unlikely]] {
            ::new (heap_->items() + heap_->size) T(std::forward<Args>(args)...);
            ++heap_->size;
            return code;
        }
        ::new (in_place() + code) T(std::forward<Args>(args)...);
        return static_cast<std::uint8_t>(code + 1);
    }
    /// Destroys the items of the list with code `code` and frees its heap block; its code is then 0.
    void clear(std::uint8_t code) noexcept
    {
        std::span<T> all = items(code);
        if constexpr (!std::is_trivially_destructible_v<T>)
            for (T& item : all) item.~T();
        if (code == kOnHeap) [[unlikely]]
            ::operator delete(heap_, std::align_val_t(alignof(Heap)));
    }
    /// Takes the items of `other` (code `other_code`, then 0) into this empty list; returns this
    /// list's new code.
    std::uint8_t take(PackedList& other, std::uint8_t other_code) noexcept
    {
        if (other_code == kOnHeap) {
            heap_ = other.heap_;
            return kOnHeap;
        }
        for (std::uint8_t k = 0; k < other_code; ++k) {
            ::new (in_place() + k) T(std::move(other.in_place()[k]));
            other.in_place()[k].~T();
        }
        return other_code;
    }

private:
    struct alignas(std::max(alignof(T), alignof(std::size_t))) Heap {
        std::size_t size;  // its room is what reserve() was asked for: the owner never adds more
        static std::size_t bytes_for(std::size_t n) { return sizeof(Heap) + n * sizeof(T); }
        T* items() { return std::launder(reinterpret_cast<T*>(this + 1)); }
    };
    T* in_place() noexcept { return std::launder(reinterpret_cast<T*>(bytes_)); }
    union {
        Heap* heap_;
        alignas(T) std::byte bytes_[N * sizeof(T)];
    };
};

/// An entry's inputs: three in place, as most ops have at most three.
using InputNodes = std::span<const InputRef>;

/// The shape and dtype of a non-leaf input that the entry's first output does not tell (a
/// reduction's or a broadcast's input): kept by the entry, since the input itself may be gone by
/// the time backward runs.
struct InputMeta {
    /// The input's shape.
    Shape shape;
    /// The input's dtype.
    DType dtype = kFloat32;
};

/// An entry's InputMeta list, one per input, kept in its tape's byte stream (laid down one
/// after another as the entries are, and reused from one recording to the next) instead of a
/// heap allocation per entry. Destroying it reads the list only when a shape had more than four
/// dimensions (its own allocation to free).
class KeptInputMeta {
public:
    KeptInputMeta() = default;
    ~KeptInputMeta() { reset(); }
    KeptInputMeta(const KeptInputMeta&) = delete;
    KeptInputMeta& operator=(const KeptInputMeta&) = delete;
    /// Takes over `other`'s list, where it lies.
    KeptInputMeta(KeptInputMeta&& other) noexcept : word_(std::exchange(other.word_, 0)) {}
    /// As the move constructor, after destroying its own list.
    KeptInputMeta& operator=(KeptInputMeta&& other) noexcept
    {
        if (this != &other) {
            reset();
            word_ = std::exchange(other.word_, 0);
        }
        return *this;
    }
    /// Bytes a list of n takes in the stream (its length first), aligned as bytes_align.
    static constexpr std::size_t bytes_for(std::size_t n) { return sizeof(std::uint64_t) + n * sizeof(InputMeta); }
    /// Alignment of a list.
    static constexpr std::size_t bytes_align = alignof(InputMeta);
    /// Makes n empty InputMetas at `place` (bytes_for(n) bytes from the stream) and returns them;
    /// `large`: a shape given to one will have more than four dimensions.
    InputMeta* emplace(void* place, std::size_t n, bool large) noexcept
    {
        reset();
        InputMeta* list = list_at(place, n);
        for (std::size_t k = 0; k < n; ++k) ::new (list + k) InputMeta();
        word_ = reinterpret_cast<std::uintptr_t>(place) | (large ? kLarge : 0);
        return list;
    }
    /// Moves the list to `place` (as many bytes from a new stream).
    void relocate(void* place) noexcept
    {
        if (!word_) return;
        InputMeta* from = get();
        InputMeta* to = list_at(place, size());
        for (std::size_t k = 0, n = size(); k < n; ++k) {
            ::new (to + k) InputMeta(std::move(from[k]));
            from[k].~InputMeta();
        }
        word_ = reinterpret_cast<std::uintptr_t>(place) | (word_ & kLarge);
    }
    /// Destroys the list (its bytes are reclaimed with the stream).
    void reset() noexcept
    {
        if (word_ & kLarge) {
            InputMeta* list = get();
            for (std::size_t k = 0, n = size(); k < n; ++k) list[k].~InputMeta();
        }
        word_ = 0;
    }
    /// The list; null when none is kept.
    InputMeta* get() const
    {
        return word_ ? reinterpret_cast<InputMeta*>(reinterpret_cast<std::byte*>(word_ & ~kLarge) + sizeof(std::uint64_t))
                     : nullptr;
    }
    /// Its length (0 when none is kept).
    std::size_t size() const { return word_ ? *reinterpret_cast<const std::uint64_t*>(word_ & ~kLarge) : 0; }
    /// Whether a list is kept.
    explicit operator bool() const { return word_ != 0; }

private:
    static constexpr std::uintptr_t kLarge = 1;
    // Writes the length n at `place` and returns where the n InputMetas after it go.
    static InputMeta* list_at(void* place, std::size_t n) noexcept
    {
        ::new (place) std::uint64_t(n);
        return reinterpret_cast<InputMeta*>(static_cast<std::byte*>(place) + sizeof(std::uint64_t));
    }
    std::uintptr_t word_ = 0;
};

/// The buffer a sweep sums an input's gradient in, offered to a backward function that computes
/// the gradient element by element into it (BackwardContext::gradient_buffer).
struct GradientBuffer {
    /// The sum: contiguous, of the input's shape and dtype, the sweep's alone. Null when none is offered.
    Tensor* sum = nullptr;
    /// Nothing has arrived yet: every element is to be written (the buffer holds no values).
    /// Otherwise the gradient is to be added into it.
    bool fresh = false;
    /// The buffer is the incoming gradient's own (handed over: see
    /// BackwardContext::gradient_buffer), so it holds that gradient's values: element i is read
    /// there and then written over. Fresh as well.
    bool holds_incoming = false;
    /// Whether one is offered.
    explicit operator bool() const { return sum != nullptr; }
    /// Writes value(i) into every element i of the sum (of element type T): set when the buffer
    /// is fresh, added when not. A large sum is split across threads (kernels::over_elements),
    /// so value may be called from several at once: it must only read. It is copied into the
    /// loop (keep what it captures small: pointers, or references), so it must be copyable.
    template <class T, class Fn> [[gnu::always_inline]] void write(Fn value) const
    {
        T* out = sum->data_ptr<T>();
        // Captured by value: by reference, each element batch would reach value's captures
        // through one more pointer, and out and fresh would be stored to reach them by.
        kernels::over_elements(sum->numel(), [out, fresh = fresh, value](std::int64_t i0, std::int64_t i1) {
            if (fresh)
                for (std::int64_t i = i0; i < i1; ++i) out[i] = value(i);
            else
                for (std::int64_t i = i0; i < i1; ++i) out[i] += value(i);
        });
    }
    /// write() of fn(g_i, i), with g_i element i of the incoming gradient at `g`, or g[0] where
    /// it is one value `spread` over the sum's shape. Each element of g is read before the sum's
    /// is written: the sum may be g's own buffer (holds_incoming).
    template <class T, class Fn> [[gnu::always_inline]] void write_from(const T* g, bool spread, Fn fn) const
    {
        if (spread) write<T>([fn, g0 = *g](std::int64_t i) { return fn(g0, i); });
        else write<T>([fn, g](std::int64_t i) { return fn(g[i], i); });
    }
};

/// Where a sweep sums the gradients arriving at each input: the sweep itself, which
/// BackwardContext::accumulator() and gradient_buffer() call directly (not through virtual
/// functions, so that the sweep's part of each gradient written in place is inlined there).
struct GradientSums;

/// An entry's saved tensors as its backward function sees them (`c.saved[k]`, in the order given
/// to record()): read where the entry keeps them, so that sweeping a long tape writes nothing
/// back into the entries forward left in memory. Valid while the backward function runs: copy a
/// tensor (or the range, into a std::vector) to keep it longer.
using SavedTensors = decltype(std::views::transform(std::span<const Saved>(), &Saved::value));

/// Per input of an entry, whether it wants a gradient (`c.needs[k]`): read from the entry's
/// inputs where they lie, so the sweep fills no list for each entry it runs.
class InputNeeds {
public:
    InputNeeds() = default;
    /// The needs of `inputs` (an empty span: none).
    explicit InputNeeds(InputNodes inputs) : inputs_(inputs) {}
    /// Whether input k wants a gradient.
    bool operator[](std::size_t k) const { return bool(inputs_[k]); }
    /// How many inputs the entry has.
    std::size_t size() const { return inputs_.size(); }

private:
    InputNodes inputs_;
};

/// What an entry's backward function receives.
struct BackwardContext {
    /// One per output; undefined where no gradient arrived. Mutable for take_grad().
    mutable SmallVector<Tensor, 2> grads;
    SavedTensors saved;  ///< in the order given to record()
    InputNeeds needs;  ///< per input: does it want a gradient?
    /// The entry's inputs; null where an input needs no gradient.
    InputNodes inputs;
    /// Per input, the shape and dtype of a non-leaf (Entry::input_meta); null when none was kept.
    const InputMeta* input_meta = nullptr;
    /// backward is being recorded (create_graph): it must compute with differentiable ops, or
    /// throw naming itself if it cannot.
    bool create_graph = false;
    /// Where the sweep sums gradients; null when gradients must be returned.
    GradientSums* sums = nullptr;
    /// The entry's first output's shape and dtype: those of every input marked like_output().
    const Shape* output_shape = nullptr;
    /// See output_shape.
    DType output_dtype = kFloat32;
    /// The gradient of the first output.
    const Tensor& grad() const { return grads[0]; }
    /// The gradient of output k, handed over rather than copied: for a backward that passes it
    /// on as it is (add, a region op), which then costs no copy of the handle (two atomic
    /// reference counts). Take it last: grad(k) is undefined after (input_shape() and
    /// input_dtype() still answer).
    Tensor take_grad(std::size_t k = 0) const { return std::move(grads[k]); }
    /// Input k's gradient summed so far in this sweep (zeros if nothing arrived yet), as a
    /// contiguous buffer that backward may add its gradient into in place (a GEMM with beta = 1:
    /// a weight used at every step then costs no extra addition) and then return an undefined
    /// tensor for k. Undefined when the sweep offers none (create_graph, anomaly mode, or input k
    /// needs no gradient); backward then returns the gradient as usual.
    Tensor accumulator(std::size_t k) const;
    /// Input k's sum in this sweep, for a backward that computes k's gradient element by element:
    /// it writes every element when the buffer is fresh, else adds into it, and returns an
    /// undefined tensor for k. Not offered (null) where accumulator() is not, or where the sum
    /// so far is a tensor the sweep does not own; backward then returns the gradient as usual.
    /// Ask only once the gradient is sure to be written: a fresh buffer holds no values.
    GradientBuffer gradient_buffer(std::size_t k) const { return gradient_buffer(k, false); }
    /// gradient_buffer(k); with `last_read_of_grad`, for the backward's last read of grad(): where
    /// nothing has arrived at input k yet and grad() is the sweep's alone, grad()'s own buffer is
    /// handed to k (GradientBuffer::holds_incoming), so no new buffer is made for k and none is
    /// freed after; grad() is undefined after such a hand-over.
    GradientBuffer gradient_buffer(std::size_t k, bool last_read_of_grad) const;
    /// Shape of input k; known for every input that needs a gradient, so ops need not save it.
    const Shape& input_shape(std::size_t k) const
    {
        const InputRef& in = inputs[k];
        if (in.like_output()) return *output_shape;
        return in.node() ? in.node()->shape : input_meta[k].shape;
    }
    /// Dtype of input k.
    DType input_dtype(std::size_t k) const
    {
        const InputRef& in = inputs[k];
        if (in.like_output()) return output_dtype;
        return in.node() ? in.node()->dtype : input_meta[k].dtype;
    }
};

/// One gradient per input; kept inline, so sweeping a small op costs no heap allocation for it.
/// GradList{g0, g1} moves each gradient in: a braced list of a plain SmallVector would copy
/// every handle (two atomic reference counts per gradient, in every backward).
struct GradList : SmallVector<Tensor, 3> {
    GradList() = default;
    /// n undefined gradients.
    explicit GradList(std::size_t n) : SmallVector(n) {}
    /// The gradients given, in input order.
    template <class... Ts>
        requires(sizeof...(Ts) > 0 && (std::is_convertible_v<Ts &&, Tensor> && ...))
    GradList(Ts&&... grads)  // NOLINT: implicit, for braced lists
    {
        reserve(sizeof...(Ts));
        (emplace_back(std::forward<Ts>(grads)), ...);
    }
};

/// Returns one gradient per input (undefined where not needed), each of that input's shape.
using BackwardFn = std::function<GradList(const BackwardContext&)>;

/// The op token: what the tape does with the backward closures of one type. There is one
/// constant table per closure type (backward_ops_of); an entry keeps a pointer to it beside the
/// closure, so recording an op makes no std::function, and dropping an entry whose closure
/// holds nothing to destroy calls nothing.
struct BackwardOps {
    /// Runs the closure.
    GradList (*call)(void* closure, const BackwardContext& c);
    /// Move-constructs a closure at `to` from the one at `from`.
    void (*move_construct)(void* from, void* to) noexcept;
    /// Destroys the closure; null when that does nothing.
    void (*destroy)(void* closure) noexcept;
    /// The closure's size.
    std::uint32_t size;
    /// The closure's alignment.
    std::uint32_t align;
    /// Kept in the entry's own bytes (StoredBackward::kInlineBytes), not in the tape's stream.
    bool kept_inline;
    /// For loom's element-wise ops: the formula (pointwise::Kind, internal) that the sweep may run
    /// in place of the closure; 0 for every other op.
    std::uint8_t pointwise;
    /// The closure captures nothing and is trivially copyable: nothing to move (std::is_empty).
    bool empty;
};

namespace detail {
/// Whether a closure of type C is kept in its entry: small, and copied by copying its bytes.
/// 16 bytes: a closure of loom's ops captures nothing or a number or two, and 8 more in every entry
/// would make it longer than two cache lines.
template <class C> inline constexpr bool closure_kept_inline = sizeof(C) <= 16 && alignof(C) <= 8 && std::is_trivially_copyable_v<C>;

/// The formula a closure of type C names (its `pointwise_kind`, see BackwardOps::pointwise), or 0.
template <class C> constexpr std::uint8_t pointwise_kind_of()
{
    if constexpr (requires { C::pointwise_kind; }) return C::pointwise_kind;
    else return 0;
}

/// Runs a closure of type C, which returns a GradList, or (a user's) a std::vector<Tensor>,
/// moved into one.
template <class C> GradList call_closure(void* closure, const BackwardContext& c)
{
    using Result = std::invoke_result_t<C&, const BackwardContext&>;
    if constexpr (std::is_same_v<Result, GradList>) {
        return (*static_cast<C*>(closure))(c);
    } else {
        std::vector<Tensor> grads = (*static_cast<C*>(closure))(c);
        GradList list;
        list.reserve(grads.size());
        for (Tensor& g : grads) list.push_back(std::move(g));
        return list;
    }
}
}  // namespace detail

/// The op token of closure type C.
template <class C>
inline constexpr BackwardOps backward_ops_of{
    &detail::call_closure<C>,
    [](void* from, void* to) noexcept { ::new (to) C(std::move(*static_cast<C*>(from))); },
    std::is_trivially_destructible_v<C> ? nullptr : +[](void* closure) noexcept { static_cast<C*>(closure)->~C(); },
    sizeof(C), alignof(C), detail::closure_kept_inline<C>, detail::pointwise_kind_of<C>(),
    std::is_empty_v<C> && detail::closure_kept_inline<C>};

/// An entry's backward function: its op token and its closure, kept in the entry when small and
/// trivially copyable (most of loom's ops capture nothing, or a number), else in the tape's byte
/// stream (memory the tape reuses from one recording to the next), which this points into.
class StoredBackward {
public:
    /// Bytes of closure an entry keeps inline.
    static constexpr std::size_t kInlineBytes = 16;
    StoredBackward() = default;
    ~StoredBackward() { reset(); }
    StoredBackward(const StoredBackward&) = delete;
    StoredBackward& operator=(const StoredBackward&) = delete;
    /// Takes over `other`'s closure, where it lies (an inline one is copied: it is trivially copyable).
    StoredBackward(StoredBackward&& other) noexcept : ops_(other.ops_), bytes_(other.bytes_) { other.ops_ = nullptr; }
    /// As the move constructor, after destroying its own closure.
    StoredBackward& operator=(StoredBackward&& other) noexcept
    {
        if (this != &other) {
            reset();
            ops_ = other.ops_;
            bytes_ = other.bytes_;
            other.ops_ = nullptr;
        }
        return *this;
    }
    /// Keeps a closure moved from `closure` (of the type `ops` is the token of): in the entry, or
    /// at `place`, which the tape's stream allocated for it when `!ops.kept_inline`. Only for an
    /// entry being recorded, which holds none yet: there is nothing to destroy first (and the
    /// compiler cannot tell, as the entry's one-byte fields written before may alias the token).
    [[gnu::always_inline]] void emplace(const BackwardOps& ops, void* closure, void* place) noexcept
    {
        // A closure that captures nothing (most of loom's ops) has no bytes to move: an indirect
        // call per entry saved.
        if (!ops.empty) ops.move_construct(closure, ops.kept_inline ? static_cast<void*>(bytes_.data()) : place);
        if (!ops.kept_inline) std::memcpy(bytes_.data(), &place, sizeof place);
        ops_ = &ops;
    }
    /// Moves a closure kept in a stream to `place`, which a new stream allocated for it.
    void relocate(void* place) noexcept
    {
        if (!ops_ || ops_->kept_inline) return;
        void* from = closure();
        ops_->move_construct(from, place);
        if (ops_->destroy) ops_->destroy(from);
        std::memcpy(bytes_.data(), &place, sizeof place);
    }
    /// Destroys the closure (the bytes it took in the stream are reclaimed with the stream).
    void reset() noexcept
    {
        if (ops_ && ops_->destroy) ops_->destroy(closure());
        ops_ = nullptr;
    }
    /// Runs it.
    GradList operator()(const BackwardContext& c) const { return ops_->call(closure(), c); }
    /// Whether it holds a closure.
    explicit operator bool() const { return ops_ != nullptr; }
    /// Its op token; null when empty.
    const BackwardOps* ops() const { return ops_; }

private:
    void* closure() const
    {
        if (ops_->kept_inline) return const_cast<std::byte*>(bytes_.data());
        void* place;
        std::memcpy(&place, bytes_.data(), sizeof place);
        return place;
    }
    const BackwardOps* ops_ = nullptr;
    alignas(8) std::array<std::byte, kInlineBytes> bytes_;
};

/// For an op whose output is a part of its one input (select, slice, narrow): maps a tensor of
/// the input's shape to that part.
using RegionFn = std::function<Tensor(const Tensor&)>;

/// One recorded op on the tape: 128 bytes, two cache lines, which forward writes, the sweep reads
/// and a reset drops, one after another along a tape that may outgrow the caches. What the sweep
/// of loom's element-wise ops never reads (the op's name, its output's shape, what few entries
/// have) lies aside in 32 bytes (Entry::Cold), in the entry's chunk of the tape, where the entry's
/// own address finds it.
struct Entry {
    /// Entries in a chunk of the tape (EntryStore): their cold parts follow them there.
    static constexpr std::size_t kPerChunk = 1024;
    /// A chunk's alignment: a power of two no smaller than the chunk, so that an entry's address
    /// tells its chunk and its index in it.
    static constexpr std::size_t kChunkAlign = std::size_t(1) << 18;
    /// Made only in a chunk of EntryStore, which has room for its cold part. User-provided, so
    /// that appending an entry does not first zero all of it.
    Entry() noexcept { ::new (static_cast<void*>(&cold())) Cold(); }
    ~Entry()
    {
        // The lists' codes are left as they are: nothing reads them after, and writing a one-byte
        // field would make the caller's loop read its own state again (see set_inputs).
        inputs_.clear(inputs_code_);
        saved_.clear(saved_code_);
        // Without a Rare part the cold part holds nothing to destroy: a reset then never reads
        // its line (EntryStore::clear fetches only the entry).
        if (has_rare) cold().~Cold();
    }
    Entry(const Entry&) = delete;
    /// Moves `other` here, leaving it empty (compaction moves the live entries down the tape).
    Entry& operator=(Entry&& other) noexcept;
    /// Its sequence number on its thread's tape.
    std::uint64_t seq = 0;
    /// Output k's gradient is summed in slot first_slot + k. Slots are numbered along the tape as
    /// entries are, so a sweep keeps the gradients it sums in one dense array indexed by slot,
    /// instead of reaching each output.
    std::uint64_t first_slot = 0;
    /// How many outputs it has (most ops have one).
    std::uint32_t num_outputs = 0;
    /// Its first output's dtype.
    DType output_dtype = kFloat32;
    /// How many dims Cold::output_dims keeps (0: a 0-d output, or none), or kShapeAside.
    std::uint8_t output_ndim : 3 = 0;
    /// An output has hooks or retains its gradient (register_hook, retain_grad): the sweep then
    /// looks up its node (Tape::watched_nodes); otherwise it never needs to.
    bool watched : 1 = false;
    /// Recorded by a user's op (autograd::record or Function): its mistakes are reported as the
    /// user's, and under create_graph a gradient it computed off the tape is an error.
    bool custom : 1 = false;
    /// Its cold part has a Rare part (Cold::rare is set only through rare_made or adopt_rare).
    bool has_rare : 1 = false;
    /// output_ndim of a first output whose shape is kept aside, in Rare::output_shape.
    static constexpr std::uint8_t kShapeAside = 7;

private:
    std::uint8_t inputs_code_ = 0;  ///< inputs_'s (PackedList)
    std::uint8_t saved_code_ = 0;  ///< saved_'s

public:
    /// Per input, the shape and dtype of each non-leaf input that neither its node nor the first
    /// output's gradient tells; null when no input needs it (most entries).
    KeptInputMeta input_meta;
    /// Its backward function.
    StoredBackward backward;

private:
    PackedList<InputRef, 3> inputs_;
    PackedList<Saved, 3> saved_;

public:
    /// Its inputs; null where an input does not require grad.
    InputNodes inputs() const { return inputs_.items(inputs_code_); }
    /// The tensors it saved for backward.
    std::span<const Saved> saved() const { return saved_.items(saved_code_); }
    /// Makes room for n inputs, before the first is added.
    void reserve_inputs(std::size_t n) { inputs_code_ = inputs_.reserve(n); }
    /// Adds an input (room for it reserved).
    void add_input(InputRef in) { inputs_code_ = inputs_.emplace_back(inputs_code_, in); }
    /// Makes room for n saved tensors, before the first is added.
    void reserve_saved(std::size_t n) { saved_code_ = saved_.reserve(n); }
    /// Adds a saved tensor made of `args` (room for it reserved).
    template <class... Args> void add_saved(Args&&... args)
    {
        saved_code_ = saved_.emplace_back(saved_code_, std::forward<Args>(args)...);
    }
    /// Sets all the inputs of an entry that has none yet, writing the list's one-byte code once:
    /// a one-byte write may alias anything, so each one makes the compiler read again what it
    /// had read.
    void set_inputs(std::span<const InputRef> refs)
    {
        std::uint8_t code = inputs_.reserve(refs.size());
        for (const InputRef& in : refs) code = inputs_.emplace_back(code, in);
        inputs_code_ = code;
    }
    /// Sets the n saved tensors of an entry that has none yet, the k-th the Saved that make(k)
    /// returns, writing the list's code once (as set_inputs).
    template <class Make> void set_saved(std::size_t n, Make&& make)
    {
        std::uint8_t code = saved_.reserve(n);
        for (std::size_t k = 0; k < n; ++k) code = saved_.emplace_back(code, make(k));
        saved_code_ = code;
    }
    /// Drops the inputs and the saved tensors.
    void clear_lists() noexcept
    {
        inputs_.clear(std::exchange(inputs_code_, 0));
        saved_.clear(std::exchange(saved_code_, 0));
    }

    /// What the entry keeps of one of its outputs.
    struct Output {
        /// Its shape.
        Shape shape;
        /// Its dtype.
        DType dtype = kFloat32;
    };
    /// What few entries have, behind one pointer.
    struct Rare {
        /// Outputs 1 and on.
        std::vector<Output> more_outputs;
        /// Set for a part-of-input op: backward then returns the gradient of the part, which the
        /// sweep adds into region(input's gradient) in place, so taking every step of a sequence
        /// costs time linear in its length instead of a full-size gradient per step.
        RegionFn region;
        /// The Scope it was recorded in.
        std::shared_ptr<const std::string> scope;
        /// The first output's shape, where output_dims cannot keep it.
        Shape output_shape;
    };
    /// The part of an entry that a sweep of loom's element-wise ops does not read.
    struct Cold {
        /// The op's name.
        const char* name = nullptr;
        /// Its first output's shape (for the graph exports, once the output is gone, and the
        /// inputs marked like_output()) in 16 bytes instead of a Shape's 48: up to four dims,
        /// each below 2^32. Any other shape is kept aside (Rare::output_shape, output_ndim
        /// kShapeAside).
        std::uint32_t output_dims[4];
        /// Null unless the entry has more than one output, a region, a scope, or a first output
        /// of more than four dims or a dim of 2^32 or more.
        std::unique_ptr<Rare> rare;
    };
    /// Its cold part, which follows the chunk's entries in the chunk.
    Cold& cold() const noexcept
    {
        const auto at = reinterpret_cast<std::uintptr_t>(this);
        const auto chunk = at & ~(kChunkAlign - 1);
        auto* colds = reinterpret_cast<Cold*>(chunk + kPerChunk * sizeof(Entry));
        return *std::launder(colds + (at - chunk) / sizeof(Entry));
    }
    /// The op's name.
    const char* name() const { return cold().name; }
    /// Its Rare part; null for most entries.
    const std::unique_ptr<Rare>& rare() const { return cold().rare; }
    /// Keeps `shape` as its first output's: in output_dims if it fits, else aside.
    [[gnu::always_inline]] void keep_first_output_shape(const Shape& shape)
    {
        if (shape.size() <= std::extent_v<decltype(Cold::output_dims)>) {
            std::uint32_t* dims = cold().output_dims;
            std::uint64_t all = 0;  // every dim's bits: one test of the high half for all of them
            for (std::size_t d = 0; d < shape.size(); ++d) {
                all |= static_cast<std::uint64_t>(shape[d]);
                dims[d] = static_cast<std::uint32_t>(shape[d]);
            }
            if (all <= UINT32_MAX) [[likely]] {
                output_ndim = static_cast<std::uint8_t>(shape.size()) & 7;
                return;
            }
        }
        keep_first_output_shape_aside(shape);
    }
    /// keep_first_output_shape() of a shape output_dims cannot hold (tape.cpp: rare, so out of line).
    void keep_first_output_shape_aside(const Shape& shape);
    /// The first output's shape: `scratch`, written with it, or the one kept aside.
    const Shape& first_output_shape(Shape& scratch) const
    {
        const Cold& c = cold();
        if (output_ndim == kShapeAside) [[unlikely]]
            return c.rare->output_shape;
        scratch.resize(output_ndim);
        std::int64_t* to = scratch.data();
        // Unrolled: cheaper than a loop of unknown length, for every entry swept.
        switch (output_ndim) {
        case 4: to[3] = c.output_dims[3]; [[fallthrough]];
        case 3: to[2] = c.output_dims[2]; [[fallthrough]];
        case 2: to[1] = c.output_dims[1]; [[fallthrough]];
        case 1: to[0] = c.output_dims[0]; [[fallthrough]];
        default: break;
        }
        return scratch;
    }
    /// Whether a sweep released it (it cannot be swept again): release drops its backward function.
    bool released() const { return backward.ops() == nullptr; }
    /// Output k's shape.
    Shape shape_of_output(std::size_t k) const
    {
        Shape scratch;
        return k == 0 ? first_output_shape(scratch) : rare()->more_outputs[k - 1].shape;
    }
    /// Output k's dtype.
    DType dtype_of_output(std::size_t k) const { return k == 0 ? output_dtype : rare()->more_outputs[k - 1].dtype; }
    /// The region of a part-of-input op; null for any other.
    const RegionFn* region() const
    {
        const auto& r = rare();
        return r && r->region ? &r->region : nullptr;
    }
    /// The Scope it was recorded in (null if none was alive).
    const std::shared_ptr<const std::string>& scope() const;
    /// rare, made if need be.
    Rare& rare_made()
    {
        auto& r = cold().rare;
        if (!r) r = std::make_unique<Rare>();
        has_rare = true;
        return *r;
    }
    /// rare, taken from `made` if the entry has none yet (nothing here can fail).
    Rare& adopt_rare(std::unique_ptr<Rare>& made) noexcept
    {
        auto& r = cold().rare;
        if (!r) r = std::move(made);
        has_rare = true;
        return *r;
    }
};

/// True when an op on these inputs must be recorded.
bool should_record(std::span<const Tensor> inputs);

// ---- anomaly mode ----
namespace detail {
/// DetectAnomalyGuards alive on this thread, and InnerOps open on it: read inline by every op.
extern constinit thread_local int anomaly_guards [[gnu::tls_model("initial-exec")]];
/// See anomaly_guards.
extern constinit thread_local int inner_ops_depth [[gnu::tls_model("initial-exec")]];
}  // namespace detail
/// Whether anomaly mode is on for the op being recorded.
inline bool anomaly_mode_enabled() { return detail::anomaly_guards > 0 && detail::inner_ops_depth == 0; }
namespace detail {
/// While alive, the ops called are parts of another op (a backward function, a custom op's
/// forward): anomaly mode checks that op's results instead of theirs.
struct InnerOps {
    InnerOps() { ++inner_ops_depth; }
    ~InnerOps() { --inner_ops_depth; }
    InnerOps(const InnerOps&) = delete;
    InnerOps& operator=(const InnerOps&) = delete;
};
}  // namespace detail
/// Checks one forward result of `op` for NaN or Inf (anomaly mode only); `seq` is its tape entry, 0 if unrecorded.
void check_forward_anomaly(const char* op, const Tensor& output, std::uint64_t seq);

/// Appends one entry for `outputs = name(inputs)` and marks each output as requiring grad.
/// `custom`: the op is the user's (autograd::record, Function), so its outputs may still need
/// preparing (detail::prepare_custom_outputs) and its mistakes are reported as the user's.
void push_entry(const char* name, std::span<const Tensor> inputs, std::span<const Tensor> outputs,
                std::span<const Tensor> saved, BackwardFn backward, bool custom = false);

namespace internal {
/// A tensor named in a braced list of inputs or saved tensors, by reference: an op that records
/// nothing (no grad) then copies no handle, which would cost two atomic reference counts each.
struct TensorRef {
    const Tensor* tensor;
    TensorRef(const Tensor& t) : tensor(&t) {}  // NOLINT: implicit, for braced lists
};
}  // namespace internal

namespace detail {
/// Appends the entry, with a backward closure moved from `closure`, of the type `ops` is the
/// token of. The inputs and saved tensors are named by pointer: loom's own ops record without
/// first copying each handle into a list (two atomic reference counts per tensor).
void push_entry_stored(const char* name, std::span<const Tensor* const> inputs, std::span<const Tensor> outputs,
                       std::span<const Tensor* const> saved, const BackwardOps& ops, void* closure, bool custom);
/// push_entry_stored for one of loom's own ops of one output, its inputs and saved tensors as
/// braced lists give them: no list is built, and the one output needs no loop (W7: about 300
/// instructions an entry, against 420 through the general route).
/// Made for the counts of inputs and saved tensors of the element-wise ops (1 or 2 inputs, 0 to 2
/// saves), each with its loops unrolled, and for any counts (std::dynamic_extent); push_op_entry_for
/// picks one.
template <std::size_t Inputs, std::size_t Saves>
void push_op_entry(const char* name, std::span<const internal::TensorRef, Inputs> inputs, const Tensor& output,
                   std::span<const internal::TensorRef, Saves> saved, const BackwardOps& ops, void* closure);
/// push_op_entry for these lists: inlined into record(), where their lengths are constants, so
/// the choice is made when compiling.
[[gnu::always_inline]] inline void push_op_entry_for(const char* name,
                                                     std::initializer_list<internal::TensorRef> inputs,
                                                     const Tensor& output,
                                                     std::initializer_list<internal::TensorRef> saved,
                                                     const BackwardOps& ops, void* closure)
{
    using Ref = const internal::TensorRef;
    const auto push = [&]<std::size_t Inputs, std::size_t Saves>() {
        push_op_entry<Inputs, Saves>(name, std::span<Ref, Inputs>(inputs.begin(), inputs.size()), output,
                                     std::span<Ref, Saves>(saved.begin(), saved.size()), ops, closure);
    };
    if (inputs.size() == 1 && saved.size() == 0) return push.template operator()<1, 0>();
    if (inputs.size() == 1 && saved.size() == 1) return push.template operator()<1, 1>();
    if (inputs.size() == 2 && saved.size() == 0) return push.template operator()<2, 0>();
    if (inputs.size() == 2 && saved.size() == 1) return push.template operator()<2, 1>();
    if (inputs.size() == 2 && saved.size() == 2) return push.template operator()<2, 2>();
    push.template operator()<std::dynamic_extent, std::dynamic_extent>();
}
/// The same with the inputs and saved tensors in lists.
void push_entry_stored(const char* name, std::span<const Tensor> inputs, std::span<const Tensor> outputs,
                       std::span<const Tensor> saved, const BackwardOps& ops, void* closure, bool custom);

/// Checks forward's results; an output that is an input, already on the tape, or returned twice
/// becomes an alias, so that it can carry this op's history.
void prepare_custom_outputs(const char* op, std::vector<Tensor>& outputs);
/// Checks the gradients a custom op's backward returned: one per input, each of its input's
/// shape and dtype or undefined; the errors name the op.
void check_custom_grads(const char* op, const GradList& grads, const BackwardContext& c);

/// A backward function as a BackwardFn: one returning a std::vector<Tensor> (a user's) has its
/// result moved into a GradList.
template <class F> BackwardFn as_backward_fn(F&& backward)
{
    using C = std::decay_t<F>;
    if constexpr (std::is_same_v<std::invoke_result_t<C&, const BackwardContext&>, GradList>) {
        return BackwardFn(std::forward<F>(backward));
    } else {
        return BackwardFn([f = C(std::forward<F>(backward))](const BackwardContext& c) mutable {
            return call_closure<C>(&f, c);
        });
    }
}

/// The closure an entry keeps for `backward`: the closure itself, or a BackwardFn holding it
/// when moving it might throw (the tape moves closures where nothing may fail) or it asks for
/// more alignment than the tape's stream gives (16 bytes).
template <class F> auto as_closure(F&& backward)
{
    using C = std::decay_t<F>;
    if constexpr (std::is_nothrow_move_constructible_v<C> && alignof(C) <= 16) return C(std::forward<F>(backward));
    else return as_backward_fn(std::forward<F>(backward));
}

/// push_entry for a backward closure of any type, kept as it is.
template <class Inputs, class Saved, class F>
void push_entry_with(const char* name, Inputs inputs, std::span<const Tensor> outputs, Saved saved, F&& backward,
                     bool custom)
{
    auto closure = as_closure(std::forward<F>(backward));
    push_entry_stored(name, inputs, outputs, saved, backward_ops_of<decltype(closure)>, &closure, custom);
}

template <class F>
Tensor record_entry(const char* name, std::span<const Tensor> inputs, Tensor output, std::span<const Tensor> saved,
                    F&& backward, bool custom)
{
    if (should_record(inputs)) {
        if (custom) {
            std::vector<Tensor> outputs{std::move(output)};
            prepare_custom_outputs(name, outputs);
            output = std::move(outputs[0]);
        }
        push_entry_with(name, inputs, std::span<const Tensor>(&output, 1), saved, std::forward<F>(backward), custom);
    } else if (anomaly_mode_enabled()) {
        check_forward_anomaly(name, output, 0);
    }
    return output;
}
}  // namespace detail

/// A new op of your own, single-output: records `output = name(inputs)` when an input requires
/// grad and returns `output` (the backward closure becomes a tape entry only then). backward
/// returns one gradient per input, of that input's shape and dtype, or undefined for none.
template <class F>
Tensor record(const char* name, std::span<const Tensor> inputs, Tensor output, std::span<const Tensor> saved,
              F&& backward)
{
    return detail::record_entry(name, inputs, std::move(output), saved, std::forward<F>(backward), true);
}
template <class F>
/// record() with braced lists of inputs and saved tensors.
Tensor record(const char* name, std::initializer_list<Tensor> inputs, Tensor output,
              std::initializer_list<Tensor> saved, F&& backward)
{
    return record(name, std::span<const Tensor>(inputs.begin(), inputs.size()), std::move(output),
                  std::span<const Tensor>(saved.begin(), saved.size()), std::forward<F>(backward));
}

/// record() for loom's own ops, whose outputs are fresh and whose backward is trusted.
namespace internal {
/// The backward closure of one of loom's element-wise ops, naming its formula (Kind, a
/// pointwise::Kind) so that the sweep may run the formula instead where nothing asks for the
/// closure (see BackwardOps::pointwise). The op must save what the formula reads, in its order.
template <std::uint8_t Kind, class F> struct PointwiseBackward : F {
    /// The formula.
    static constexpr std::uint8_t pointwise_kind = Kind;
};
/// `output` is taken by rvalue reference and moved out only on return: `saved` may name it, and
/// a copy of the handle would cost two atomic reference counts per op.
template <class F>
Tensor record(const char* name, std::initializer_list<TensorRef> inputs, Tensor&& output,
              std::initializer_list<TensorRef> saved, F&& backward)
{
    const bool recording =
        grad_enabled() && std::any_of(inputs.begin(), inputs.end(), [](TensorRef r) { return r.tensor->requires_grad(); });
    if (!recording) {
        if (anomaly_mode_enabled()) check_forward_anomaly(name, output, 0);
        return std::move(output);
    }
    auto closure = detail::as_closure(std::forward<F>(backward));
    detail::push_op_entry_for(name, inputs, output, saved, backward_ops_of<decltype(closure)>, &closure);
    return std::move(output);
}
template <class F>
Tensor record(const char* name, std::span<const Tensor> inputs, Tensor output, std::span<const Tensor> saved,
              F&& backward)
{
    return detail::record_entry(name, inputs, std::move(output), saved, std::forward<F>(backward), false);
}
/// record() for loom's own ops of several outputs: appends the entry when an input requires
/// grad; otherwise, in anomaly mode, checks each output, as record() does its one.
template <class F>
void record_outputs(const char* name, std::span<const Tensor> inputs, std::span<const Tensor> outputs,
                    std::span<const Tensor> saved, F&& backward)
{
    if (should_record(inputs))
        return detail::push_entry_with(name, inputs, outputs, saved, std::forward<F>(backward), false);
    if (anomaly_mode_enabled())
        for (const Tensor& out : outputs) check_forward_anomaly(name, out, 0);
}
}  // namespace internal

/// Records `output = region(input)` for an op that reads a part of its input (a view).
Tensor record_region(const char* name, const Tensor& input, Tensor output, RegionFn region);

namespace detail {
/// Bytes this thread's tape keeps beside its entries: backward closures too large to keep inline
/// and input shapes (rounded up to whole chunks but the last).
std::size_t tape_stream_bytes();
/// The sequence number the next recorded entry gets.
std::uint64_t next_sequence();
/// How many entries this thread's sweeps have run from their op's formula (pointwise.hpp) rather
/// than its backward function, ever: for tests of which route an entry takes.
std::uint64_t entries_swept_by_formula();
/// grad() through the entries numbered `first` and above alone, with allow_unused and nothing
/// kept; leaf hooks are left to the sweep that will hand the gradients on. For a backward function
/// that records part of its forward again and differentiates it while its own sweep is running
/// (a checkpointed layer): the running sweep's gradients below `first` are not touched.
std::vector<Tensor> grad_since(std::uint64_t first, const std::vector<Tensor>& outputs,
                               const std::vector<Tensor>& inputs, const std::vector<Tensor>& grad_outputs);
}  // namespace detail

/// Zeros of `shape` with `part` written at region(zeros): the gradient of a region op, as a
/// differentiable op for recorded backward passes.
Tensor embed_region(const Tensor& part, const Shape& shape, const RegionFn& region);

/// Number of entries on this thread's tape (live or released but not yet reclaimed).
std::size_t tape_size();
/// This thread's entry numbered seq, or null when it is not on the tape (another thread's, or
/// reclaimed). Valid until entries are reclaimed (a sweep ends, or compaction runs).
const Entry* find_entry(std::uint64_t seq);

// ---- anomaly mode and scopes ----

/// While alive, every forward result and every gradient an entry produces on this thread is
/// checked: the first NaN or Inf throws loom::Error naming the op, forward or backward, its tape
/// entry and the Scope it was recorded in. Off by default; nests. As libtorch's
/// torch::autograd::DetectAnomalyGuard.
class DetectAnomalyGuard {
public:
    DetectAnomalyGuard();
    ~DetectAnomalyGuard();
    DetectAnomalyGuard(const DetectAnomalyGuard&) = delete;
    DetectAnomalyGuard& operator=(const DetectAnomalyGuard&) = delete;
};

/// Names the code running while alive ("decoder/step 17"); nested scopes join with '/'. Anomaly
/// errors and graph exports name the innermost scope an op was recorded in.
class Scope {
public:
    /// Enters scope `name` until destroyed.
    explicit Scope(std::string name);
    ~Scope();
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

private:
    std::uint64_t id_;
    std::int64_t profile_event_ = -1;
};
/// The current scope path ("" outside any Scope).
std::string current_scope();

// ---- looking at the tape ----

/// What produced `root`, as Graphviz DOT: one node per tape entry (op name, output shape and
/// dtype) and one per leaf, named from `names` (e.g. module.named_parameters()) where given.
std::string to_dot(const Tensor& root, const std::vector<std::pair<std::string, Tensor>>& names = {});
/// The same graph as text, one line per entry in recording order:
/// "#12 tanh -> [2, 4] float32 <- #11, weight_hh [4, 4]".
std::string to_text(const Tensor& root, const std::vector<std::pair<std::string, Tensor>>& names = {});

}  // namespace autograd
}  // namespace loom
