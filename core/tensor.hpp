/// \file
/// Tensor: a cheap handle on shared storage with a shape, strides, first element and dtype.
/// Views (reshape of contiguous data, permute, slicing, expand) share storage.
/// The differentiable methods (sum, tanh, ...) are defined by autograd/, which records them on the tape.
#pragma once
#include <algorithm>
#include <atomic>
#include <cassert>
#include <cstdint>
#include <functional>
#include <iosfwd>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "dtype.hpp"
#include "small_vector.hpp"
#include "error.hpp"
#include "parallel.hpp"

/// core/ is namespace loom itself: the tensor is the library's base type.
namespace loom {

/// Sizes or strides of a tensor; up to 4 dims without a heap allocation (5 or more are allowed, and
/// cost one). Every header and tape node carries shapes, and what a long tape weighs is what its
/// sweep waits for: 4 covers [T, B, E, N], the most loom's own layers use.
using Shape = SmallVector<std::int64_t, 4>;

class Tensor;
/// Tensors by name: state dicts, optimizer state, safetensors files.
using NamedTensorMap = std::map<std::string, Tensor>;

class Tensor;
class Generator;
namespace autograd {
struct Node;
/// A non-leaf's producer: the op, its tape entry, the slot where a sweep sums the tensor's
/// gradient, and the tape (seq 0: no producer).
struct History {
    const char* op = nullptr;  ///< the producing op's name, for errors once its entry is reclaimed
    std::uint64_t seq = 0;  ///< the producing entry's sequence number
    std::uint64_t slot = 0;  ///< where a sweep sums its gradient (see Entry::first_slot)
    std::uint64_t tape = 0;  ///< the id of the thread tape that recorded it
};
/// The records of kSlots consecutive slots of one thread's tape: for each, the op and entry that
/// produced it and whether its tensor is alive. Owned by the tape, which frees a chunk only once
/// none of its tensors is alive, so a tensor may die on any thread, even after its tape, without
/// counting references; each slot is one tensor's, and slots are never reused.
struct SlotChunk {
    /// Slots per chunk.
    static constexpr std::uint64_t kSlots = 1024;
    /// The chunk of slots first .. first + kSlots - 1 of tape `tape_id`.
    SlotChunk(std::uint64_t first, std::uint64_t tape_id) noexcept : first_slot(first), tape(tape_id) {}
    /// Its first slot (set again when its tape reuses it, none of its tensors alive).
    std::uint64_t first_slot;
    /// The id of its tape.
    const std::uint64_t tape;
    /// Per slot: the producing op's name.
    const char* op[kSlots];
    /// Per slot: the producing entry's sequence number.
    std::uint64_t seq[kSlots];
    /// Per slot: whether the tensor is alive (cleared by its header's destructor).
    std::atomic<bool> alive[kSlots];
    /// How many of its slots were handed out (the rest are never alive).
    std::uint64_t used = kSlots;
    /// Whether any of its tensors is alive (its tape may free or reuse it only when none is).
    /// Eight flags a step, each still its own acquire load: a tape's reset reads every slot's
    /// flag, and one test and branch per flag cost W7's gradient 0.37M instructions.
    bool any_alive() const
    {
        const std::uint64_t n = std::min(used, kSlots);
        std::uint64_t i = 0;
        const auto at = [&](std::uint64_t k) { return alive[k].load(std::memory_order_acquire); };
        for (; i + 8 <= n; i += 8)  // written out: GCC does not unroll a loop of atomic loads
            if (at(i) | at(i + 1) | at(i + 2) | at(i + 3) | at(i + 4) | at(i + 5) | at(i + 6) | at(i + 7)) return true;
        for (; i < n; ++i)
            if (at(i)) return true;
        return false;
    }
};
}  // namespace autograd

/// Raw bytes shared by a tensor and its views. `version` counts in-place writes,
/// so the tape can tell when a tensor saved for backward was modified. The bytes lie either
/// right after this record, in the same block (a small tensor's: nothing to free), or in a block
/// from loom's allocator, which a HeapStorage record (core/tensor.cpp) frees.
struct Storage {
    /// Uses `bytes`, `n` long, which must lie right after this record in the block that holds
    /// it (a small tensor's bytes, kept in its header's block: see detail::TensorWithBytes).
    Storage(std::size_t n, std::byte* bytes) noexcept : data(bytes), nbytes(n) {}
    /// Frees nothing: a HeapStorage frees its bytes, and a small tensor's go with its block.
    ~Storage() = default;
    Storage(const Storage&) = delete;
    Storage& operator=(const Storage&) = delete;

    /// The first byte of the block.
    std::byte* data = nullptr;
    /// Bytes in use.
    std::size_t nbytes = 0;
    /// Counts in-place writes to these bytes.
    std::uint64_t version = 0;
    /// `data` lies right after this record, in its own block: nothing to free. Told by the
    /// address, not a flag: a flag would make a small tensor's block 16 bytes longer, and a long
    /// tape holds tens of thousands of them.
    bool inline_bytes() const { return data == reinterpret_cast<const std::byte*>(this + 1); }

protected:
    Storage() = default;
};

struct TensorImpl;
/// Row-major strides for `shape`.
Shape contiguous_strides(const Shape& shape);
namespace detail {
/// The owner tag of a merged header, and of one made by a thread without a tag (its owner then
/// counts as a thread that has ended: its last handle merges it at once).
inline constexpr std::uint16_t kNoOwner = 0xffff;
/// What a thread that makes headers keeps for them (see "Reference counts" in core/tensor.cpp).
struct ThreadOwner {
    /// The tag its headers record as their owner (1 to kNoOwner - 1).
    std::uint16_t tag = 0;
    /// Whether other threads queued headers for it to settle (at the next header it makes).
    std::atomic<bool> pending{false};
};
/// This thread's tag (0 before its first header and once it has exited: no header's owner).
/// initial-exec: libloom is linked, not dlopen()ed, and every handle copied or dropped reads it.
extern constinit thread_local std::uint16_t thread_tag [[gnu::tls_model("initial-exec")]];
/// This thread's owner record (null before its first header and once it has exited).
extern constinit thread_local ThreadOwner* thread_owner [[gnu::tls_model("initial-exec")]];
/// tag_for_new_header when the thread has no tag yet or has headers to settle (core/tensor.cpp).
std::uint16_t tag_for_new_header_slow();
/// The owner tag for a header this thread makes now. Settles first what other threads queued for
/// it: call it before the new header's block is allocated.
inline std::uint16_t tag_for_new_header()
{
    ThreadOwner* me = thread_owner;
    if (me && !me->pending.load(std::memory_order_relaxed)) [[likely]]
        return me->tag;
    return tag_for_new_header_slow();
}
/// Ends a header whose last handle is gone: destroys what it holds, and frees its block unless a
/// weak handle still counts it (core/tensor.cpp; out of line, as a header lies in one of several
/// kinds of block).
void release_last_handle(TensorImpl* impl) noexcept;
/// Drops the owner thread's last count on a header that other handles or weak handles count too.
void release_last_owned_handle(TensorImpl* impl) noexcept;
/// Drops one count of a handle on a thread other than the header's owner.
void release_shared_handle(TensorImpl* impl) noexcept;
/// Adds a handle on the owner thread whose byte count is full: a batch of its count moves to `counts`.
void add_owned_handle_past_byte(TensorImpl* impl) noexcept;
}  // namespace detail

/// A tensor's header: its storage, the view of it (shape, strides, first element), dtype and autograd
/// node, with its reference counts in it. Tensor is a handle on one (TensorHandle).
struct TensorImpl {
    /// A header owned by the thread of tag `owner_tag` (tag_for_new_header()), with one handle.
    /// User-provided, so that making a header does not first zero all of it.
    explicit TensorImpl(std::uint16_t owner_tag) noexcept : counts(kHandlesWeak), local(1), owner(owner_tag) {}
    /// The counts that threads other than the owner keep (biased reference counting, as
    /// CPython's free-threaded build): the high 32 bits are their handles, as a signed number
    /// (below zero when they dropped handles the owner counted); the low 30 bits count the weak
    /// handles plus one for all the handles together; kMerged and kQueued are the top two of
    /// the low 32. One word, so that the owner's last handle finds itself alone with one load.
    std::atomic<std::uint64_t> counts;
    /// One handle counted in `counts`.
    static constexpr std::uint64_t kOneShared = std::uint64_t(1) << 32;
    /// The owner's count was moved into `counts` for good: every thread counts there.
    static constexpr std::uint64_t kMerged = std::uint64_t(1) << 31;
    /// The header waits in its owner's queue, which holds one handle's count (see core/tensor.cpp).
    static constexpr std::uint64_t kQueued = std::uint64_t(1) << 30;
    /// The weak handles' part of `counts`.
    static constexpr std::uint64_t kWeakMask = kQueued - 1;
    /// The weak part of a header with no weak handle (the handles' one).
    static constexpr std::uint64_t kHandlesWeak = 1;
    /// One weak count.
    static constexpr std::uint64_t kOneWeak = 1;
    /// How many handles the owner moves to `counts` at once when its byte is full, and takes
    /// back when it drops its last (see "Reference counts" in core/tensor.cpp).
    static constexpr std::int32_t kHandleBatch = 128;
    /// The handles that a value of `counts` counts (may be below zero, or include the queue's).
    static constexpr std::int32_t shared_handles(std::uint64_t counts)
    {
        return static_cast<std::int32_t>(static_cast<std::uint32_t>(counts >> 32));
    }
    /// The bytes; shared by every view of them.
    std::shared_ptr<Storage> storage;
    /// Sizes of each dim.
    Shape shape;
    /// The strides, in elements, where they are not shape's row-major ones (null where they
    /// are): a view's, from the object pool. Most tensors are row-major, and a header with room
    /// for strides was 40 bytes longer: a long tape holds tens of thousands of headers, and what
    /// a sweep and a reset walk is what they weigh. Read them with strides() or stride().
    Shape* stored_strides = nullptr;
    /// The first element's address: the storage's bytes plus the view's offset (storage_offset()
    /// elements). Kept, not computed, as every op reads it: through the storage record, a sweep
    /// that reads a saved tensor's numbers waited on the record's line before the numbers' own.
    std::byte* data = nullptr;
    /// Element type.
    DType dtype = kFloat32;
    /// The kind of block the header lies in (core/tensor.cpp): how to free it.
    std::uint8_t block = 0;
    /// A non-leaf's slot is slots->first_slot + slot_index (kept in the padding after dtype).
    std::uint16_t slot_index = 0;
    /// Whether shape and strides lay the elements out row-major without gaps: kept, not computed
    /// on each ask, as every elementwise op asks it of each operand. Whoever sets strides sets it
    /// (set_layout; a new header is row-major).
    bool contiguous = true;
    /// The handles the owner thread counts, without atomic writes (0 once merged); only the
    /// owner writes it. At most 255: past that a batch of them moves to `counts`. Kept, with `owner`, in
    /// the padding before `node`: a small tensor's block stays 256 bytes.
    std::atomic<std::uint8_t> local;
    /// The tag of the thread that made the header (detail::kNoOwner once merged).
    std::atomic<std::uint16_t> owner;
    /// A leaf that requires grad: its gradient and hooks. A non-leaf has one only once a hook
    /// or retain_grad() asks for it.
    std::shared_ptr<autograd::Node> node;
    /// A non-leaf: the chunk of its tape's slot records holding its slot (null otherwise), not
    /// owned (see SlotChunk). A recorded op's result carries no object of its own.
    autograd::SlotChunk* slots = nullptr;
    ~TensorImpl()
    {
        release_slot();
        if (stored_strides) free_stored_strides();
    }
    /// A non-leaf's slot is marked dead (its tensor gone), as the destructor does first.
    void release_slot() noexcept
    {
        if (slots) slots->alive[slot_index].store(false, std::memory_order_release);
    }
    /// Whether the destructor would release nothing but the slot: no strides, node, shape or
    /// storage of its own on the heap. detail::release_last_handle then frees the block without
    /// it; a member added here that needs releasing must make this false.
    bool releases_only_slot() const noexcept
    {
        return !stored_strides && !node && !shape.on_heap() && storage.use_count() == 0;
    }
    TensorImpl(const TensorImpl&) = delete;
    TensorImpl& operator=(const TensorImpl&) = delete;
    /// Sets shape and strides, and whether they are contiguous (core/tensor.cpp).
    void set_layout(Shape shape_, const Shape& strides_);
    /// Points `data` at element `offset` of the storage, counted in this header's dtype.
    void set_storage_offset(std::int64_t offset)
    {
        data = storage->data + offset * static_cast<std::int64_t>(dtype_size(dtype));
    }
    /// Where `data` lies in the storage, in elements (0 without storage).
    std::int64_t storage_offset() const
    {
        if (!storage) return 0;
        return (data - storage->data) / static_cast<std::ptrdiff_t>(dtype_size(dtype));
    }
    /// Strides of each dim, in elements: the stored ones, or shape's row-major ones.
    Shape strides() const { return stored_strides ? *stored_strides : contiguous_strides(shape); }
    /// The stride of dim d (in range), without making the others.
    std::int64_t stride(std::int64_t d) const
    {
        if (stored_strides) return (*stored_strides)[d];
        std::int64_t s = 1;
        for (auto i = static_cast<std::size_t>(d) + 1; i < shape.size(); ++i) s = row_major_stride_before(s, shape[i]);
        return s;
    }
    /// The row-major stride of the dim before one of `size` whose stride is s. It saturates:
    /// only a shape with no elements (a 0 elsewhere) overflows, and its strides never reach an element.
    static std::int64_t row_major_stride_before(std::int64_t s, std::int64_t size)
    {
        std::int64_t before;
        return __builtin_mul_overflow(s, std::max<std::int64_t>(size, 1), &before) ? INT64_MAX : before;
    }
    /// Whether `shape` and `strides` lay the elements out row-major without gaps: a size-1 dim's
    /// stride does not matter, nor do any where there is no element.
    static bool layout_is_contiguous(const Shape& shape, const Shape& strides)
    {
        std::int64_t expected = 1;
        for (auto s : shape)
            if (s == 0) return true;  // no element to place; and the products below then fit
        for (auto i = static_cast<std::ptrdiff_t>(shape.size()) - 1; i >= 0; --i) {
            if (shape[i] == 1) continue;
            if (strides[i] != expected) return false;
            expected *= shape[i];
        }
        return true;
    }
    /// A non-leaf's slot.
    std::uint64_t slot() const { return slots->first_slot + slot_index; }

private:
    void free_stored_strides() noexcept;

public:
    /// A non-leaf's producer; seq 0 for any other tensor.
    autograd::History history() const
    {
        if (!slots) return {};
        return {slots->op[slot_index], slots->seq[slot_index], slot(), slots->tape};
    }
};

namespace detail {
/// The handles on `impl`: the owner's and the others' (see TensorHandle::use_count).
inline long handle_count(const TensorImpl& impl)
{
    return long(TensorImpl::shared_handles(impl.counts.load(std::memory_order_acquire))) +
           impl.local.load(std::memory_order_relaxed);
}
}  // namespace detail

/// A counted handle on a header, one pointer wide: copying a Tensor adds one count, the last
/// handle frees the header. On the thread that made the header the count is a plain byte (most
/// tensors never leave it); elsewhere it is atomic (a tensor may be shared between threads, as a
/// parameter is). A handle that finds itself the only one frees the header without an atomic write.
class TensorHandle {
public:
    TensorHandle() = default;
    /// Takes over one count on `impl` (a new header's first).
    explicit TensorHandle(TensorImpl* impl) noexcept : impl_(impl) {}
    /// Another handle on `other`'s header (one count more). Always inline, as Tensor's copy.
    [[gnu::always_inline]] TensorHandle(const TensorHandle& other) noexcept : impl_(other.impl_)
    {
        if (impl_) add_count();
    }
    /// Another handle on `impl`, which some handle holds alive.
    static TensorHandle another(TensorImpl* impl) noexcept
    {
        TensorHandle h(impl);
        h.add_count();
        return h;
    }
    /// Takes over `other`'s count, leaving it undefined.
    TensorHandle(TensorHandle&& other) noexcept : impl_(other.impl_) { other.impl_ = nullptr; }
    /// Refers to `other`'s header, dropping its own.
    TensorHandle& operator=(const TensorHandle& other) noexcept
    {
        TensorHandle(other).swap(*this);
        return *this;
    }
    /// Takes over `other`'s count, dropping its own. Always inline, for Tensor's (below).
    [[gnu::always_inline]] TensorHandle& operator=(TensorHandle&& other) noexcept
    {
        TensorHandle(std::move(other)).swap(*this);
        return *this;
    }
    [[gnu::always_inline]] ~TensorHandle()
    {
        if (!impl_) return;
        if (!owned_here()) {
            detail::release_shared_handle(impl_);
            return;
        }
        const std::uint8_t n = impl_->local.load(std::memory_order_relaxed);
        if (n > 1)
            impl_->local.store(n - 1, std::memory_order_relaxed);
        // The owner's last handle: alone when no other thread counts one and no weak handle exists.
        else if (impl_->counts.load(std::memory_order_acquire) == TensorImpl::kHandlesWeak)
            detail::release_last_handle(impl_);
        else
            detail::release_last_owned_handle(impl_);
    }
    /// Exchanges the two handles.
    void swap(TensorHandle& other) noexcept { std::swap(impl_, other.impl_); }
    /// The header (null for an undefined tensor).
    TensorImpl* get() const { return impl_; }
    /// How many handles there are on the header (0 for none); exact on the thread that made it
    /// while no other thread copies or drops one, else an estimate (a queued header counts one more).
    long use_count() const { return impl_ ? detail::handle_count(*impl_) : 0; }
    /// Whether the handles are on the same header.
    bool operator==(const TensorHandle& other) const { return impl_ == other.impl_; }
    /// Whether it is on a header.
    explicit operator bool() const { return impl_ != nullptr; }

private:
    /// One count more, for a new handle. Always inline: GCC kept it out of line where an op
    /// records its saved tensors, a call and the registers saved around it for a byte's increment.
    [[gnu::always_inline]] void add_count() noexcept
    {
        if (owned_here()) {
            const std::uint8_t n = impl_->local.load(std::memory_order_relaxed);
            if (n != UINT8_MAX) [[likely]] {
                impl_->local.store(n + 1, std::memory_order_relaxed);
                return;
            }
            return detail::add_owned_handle_past_byte(impl_);
        }
        impl_->counts.fetch_add(TensorImpl::kOneShared, std::memory_order_relaxed);
    }
    /// Whether this thread made the header (and has not merged its count into `counts`).
    bool owned_here() const { return impl_->owner.load(std::memory_order_relaxed) == detail::thread_tag; }
    TensorImpl* impl_ = nullptr;
};

/// A tensor: a counted handle on a TensorImpl. Copying a Tensor copies the handle, not the data; views share storage. An undefined Tensor (default-constructed) has no header.
class Tensor {
public:
    Tensor() = default;
    /// A handle on an existing header.
    explicit Tensor(TensorHandle impl) noexcept : impl_(std::move(impl)) {}
    /// Another handle on the same header. Always inline: GCC otherwise keeps it out of line in
    /// tape.cpp whenever that unit grows (push_op_entry's saves became calls, 1.7M instructions
    /// more in W7's gradient).
    [[gnu::always_inline]] Tensor(const Tensor& other) noexcept : impl_(other.impl_) {}
    /// Takes over `other`'s handle, leaving it undefined.
    Tensor(Tensor&&) noexcept = default;
    /// Refers to `other`'s header, dropping its own.
    Tensor& operator=(const Tensor&) = default;
    /// Takes over `other`'s handle, dropping its own. Always inline: GCC kept the implicit one
    /// out of line in the sweep, a call for each gradient summed (W7: 34,000 a gradient), where
    /// a slot's first gradient moved into its empty sum leaves two stores.
    [[gnu::always_inline]] Tensor& operator=(Tensor&& other) noexcept
    {
        impl_ = std::move(other.impl_);
        return *this;
    }

    // ---- metadata ----
    /// Whether the handle refers to a tensor (false for a default-constructed Tensor).
    bool defined() const { return impl_.get() != nullptr; }
    /// Element type.
    DType dtype() const { return impl().dtype; }
    /// Sizes of each dim (libtorch's name).
    const Shape& sizes() const { return impl().shape; }
    /// Sizes of each dim.
    const Shape& shape() const { return impl().shape; }
    /// Strides of each dim, in elements (made where the header keeps none: a row-major tensor's).
    Shape strides() const { return impl().strides(); }
    /// Size of `dim` (negative counts from the end).
    std::int64_t size(std::int64_t dim) const;
    /// Stride of `dim` in elements (negative counts from the end).
    std::int64_t stride(std::int64_t dim) const;
    /// Number of dims.
    std::int64_t dim() const { return static_cast<std::int64_t>(impl().shape.size()); }
    /// Number of elements. Always inlined, as data_ptr(): GCC otherwise
    /// leaves them as calls in the large kernels that dispatch over dtypes, and every
    /// elementwise op asks each of them for each operand.
    [[gnu::always_inline]] std::int64_t numel() const
    {
        std::int64_t n = 1;  // an existing tensor's element count was checked to fit when it was made
        for (auto s : sizes()) n *= s;
        return n;
    }
    /// Offset of the first element in the storage, in elements.
    std::int64_t storage_offset() const { return impl().storage_offset(); }
    /// Whether the elements are laid out row-major without gaps (kept in the header).
    bool is_contiguous() const { return impl().contiguous; }
    /// Whether both handles refer to the same header.
    bool is_same(const Tensor& other) const { return impl_ == other.impl_; }
    /// Whether both tensors view the same storage.
    bool shares_storage(const Tensor& other) const;
    /// The storage's count of in-place writes.
    std::uint64_t version() const { return impl().storage->version; }
    /// The header; throws loom::Error for an undefined tensor.
    TensorImpl& impl() const
    {
        if (!impl_) [[unlikely]]
            throw_undefined();
        return *impl_.get();
    }
    /// The handle on the header.
    const TensorHandle& impl_ptr() const { return impl_; }

    /// Pointer to the first element; T must match the dtype.
    template <class T> [[gnu::always_inline]] T* data_ptr() const
    {
        if (dtype_of<T>() != dtype()) [[unlikely]]
            throw_dtype_mismatch(dtype_of<T>());
        return unsafe_data<T>();
    }
    /// data_ptr() without its checks, as libtorch's TensorImpl::unsafe_data: for loom's inner
    /// loops, on a tensor they know to be defined and of dtype T (asserted where assertions are
    /// on). The sweep reads three per product it differentiates: the two factors and the
    /// incoming gradient.
    template <class T> [[gnu::always_inline]] T* unsafe_data() const
    {
        assert(defined() && dtype_of<T>() == impl_.get()->dtype);
        return reinterpret_cast<T*>(impl_.get()->data);
    }
    /// The single value of a one-element tensor, converted to T.
    template <class T> T item() const;

    // ---- autograd ----
    /// Whether gradients flow to this tensor (it is a leaf that requires grad, or was computed from one with grad mode on).
    bool requires_grad() const { return defined() && (impl().node != nullptr || impl().slots != nullptr); }
    /// Makes this tensor a leaf that requires grad (float dtypes only), or stops it requiring grad (leaves only). As PyTorch's.
    Tensor& requires_grad_(bool on = true);
    /// Whether the tensor has no recorded history: it does not require grad, or it requires grad and was not computed by a recorded op.
    bool is_leaf() const;
    /// The gradient accumulated by backward() (leaves, and tensors that called retain_grad()); undefined before the first backward.
    Tensor grad() const;
    /// Replaces the accumulated gradient (same shape and dtype, or undefined to clear it).
    void set_grad(const Tensor& grad) const;
    /// Forgets the accumulated gradient (grad() is undefined until the next backward), like
    /// PyTorch's zero_grad(set_to_none=True): the next backward writes a fresh tensor.
    void zero_grad() const;
    /// Keeps this non-leaf's gradient in grad() after backward, as a leaf's.
    void retain_grad() const;
    /// Calls hook(grad) when this tensor's gradient is computed; a defined result replaces it.
    void register_hook(std::function<Tensor(const Tensor&)> hook) const;
    /// Leaves only: calls hook(*this) during each backward() as soon as this tensor's gradient
    /// is final (every entry reading it has run) and has been added into grad(), as PyTorch's
    /// register_post_accumulate_grad_hook. Data-parallel training starts reducing a gradient
    /// there, while backward goes on. Hooks run with grad mode off (on under create_graph); a
    /// backward that fails later keeps the gradients already added.
    void register_post_accumulate_grad_hook(std::function<void(const Tensor&)> hook) const;
    /// Sweeps the tape back from this tensor. A non-scalar needs `gradient` of its shape. As
    /// libtorch's: retain_graph keeps the graph for another sweep, by default exactly when
    /// create_graph records the backward pass (so .grad() can be differentiated again).
    void backward(const Tensor& gradient = {}, std::optional<bool> retain_graph = std::nullopt,
                  bool create_graph = false) const;
    /// Same values, cut off the tape.
    Tensor detach() const;

    // ---- views and copies (differentiable) ----
    /// Same elements in a new shape (one -1 is inferred): a view when contiguous, else a copy.
    Tensor reshape(const Shape& shape) const;
    Tensor view(const Shape& shape) const;  ///< contiguous tensors only
    /// All elements in one dim.
    Tensor flatten() const { return reshape({-1}); }
    /// Reorders the dims (a view).
    Tensor permute(const Shape& dims) const;
    /// Swaps two dims (a view).
    Tensor transpose(std::int64_t dim0, std::int64_t dim1) const;
    Tensor t() const;  ///< 2-D transpose
    /// Drops every dim of size 1 (a view).
    Tensor squeeze() const;
    /// Drops `dim` if its size is 1 (a view).
    Tensor squeeze(std::int64_t dim) const;
    /// Inserts a dim of size 1 at `dim` (a view).
    Tensor unsqueeze(std::int64_t dim) const;
    /// Broadcasts size-1 dims to `shape` without copying (a view).
    Tensor expand(const Shape& shape) const;
    /// `length` entries of `dim` from `start` (a view).
    Tensor narrow(std::int64_t dim, std::int64_t start, std::int64_t length) const;
    /// Entries start, start+step, ... < end of `dim` (a view); negative indices count from the end.
    Tensor slice(std::int64_t dim, std::int64_t start, std::int64_t end, std::int64_t step = 1) const;
    /// Entry `index` of `dim`, the dim dropped (a view).
    Tensor select(std::int64_t dim, std::int64_t index) const;
    /// The entries of `dim` at the int64 `index` (a copy).
    Tensor index_select(std::int64_t dim, const Tensor& index) const;
    /// Gathers along `dim` at the int64 `index`, which has this tensor's number of dims.
    Tensor gather(std::int64_t dim, const Tensor& index) const;
    /// This tensor if contiguous, else a contiguous copy.
    Tensor contiguous() const;
    /// A contiguous copy; differentiable.
    Tensor clone() const;
    /// Converted to `dtype` (this tensor itself when it already has it); differentiable between float dtypes.
    Tensor to(DType dtype) const;
    /// Pieces of `split_size` along `dim` (the last may be smaller), as views.
    std::vector<Tensor> split(std::int64_t split_size, std::int64_t dim = 0) const;
    /// `chunks` pieces of equal size (the last may be smaller) along `dim`, as views.
    std::vector<Tensor> chunk(std::int64_t chunks, std::int64_t dim = 0) const;

    // ---- math (differentiable) ----
    /// e^x elementwise.
    Tensor exp() const;
    /// Natural logarithm elementwise.
    Tensor log() const;
    /// Square root elementwise.
    Tensor sqrt() const;
    /// Absolute value elementwise.
    Tensor abs() const;
    /// Hyperbolic tangent elementwise.
    Tensor tanh() const;
    /// Logistic sigmoid 1 / (1 + e^-x) elementwise.
    Tensor sigmoid() const;
    /// max(x, 0) elementwise.
    Tensor relu() const;
    /// -x elementwise.
    Tensor neg() const;
    /// x^exponent elementwise.
    Tensor pow(double exponent) const;
    /// x^exponent elementwise, the exponent broadcast.
    Tensor pow(const Tensor& exponent) const;
    /// Clamped to [min, max] elementwise; either bound may be absent.
    Tensor clamp(std::optional<double> min, std::optional<double> max) const;
    /// Matrix product with broadcasting of batch dims, as torch.matmul.
    Tensor matmul(const Tensor& other) const;
    /// `value` where the bool `mask` (broadcast) is true.
    Tensor masked_fill(const Tensor& mask, double value) const;

    // ---- reductions (differentiable but argmax/argmin) ----
    /// Sum of all elements (a scalar).
    Tensor sum() const;
    /// Sum over `dims`.
    Tensor sum(const Shape& dims, bool keepdim = false) const;
    /// Mean of all elements (a scalar).
    Tensor mean() const;
    /// Mean over `dims`.
    Tensor mean(const Shape& dims, bool keepdim = false) const;
    /// Largest element (a scalar).
    Tensor max() const;
    /// Largest entries along `dim`.
    Tensor max(std::int64_t dim, bool keepdim = false) const;
    /// Smallest element (a scalar).
    Tensor min() const;
    /// Smallest entries along `dim`.
    Tensor min(std::int64_t dim, bool keepdim = false) const;
    /// Flat index of the largest element (int64 scalar).
    Tensor argmax() const;
    /// Index of the largest entry along `dim` (int64).
    Tensor argmax(std::int64_t dim, bool keepdim = false) const;
    /// Flat index of the smallest element (int64 scalar).
    Tensor argmin() const;
    /// Index of the smallest entry along `dim` (int64).
    Tensor argmin(std::int64_t dim, bool keepdim = false) const;
    Tensor var() const;  ///< unbiased, over all elements
    /// Variance over `dims` (Bessel-corrected when `unbiased`).
    Tensor var(const Shape& dims, bool unbiased = true, bool keepdim = false) const;
    /// p-norm of all elements.
    Tensor norm(double p = 2) const;
    /// p-norm over `dims`.
    Tensor norm(double p, const Shape& dims, bool keepdim = false) const;
    /// Softmax along `dim`.
    Tensor softmax(std::int64_t dim) const;
    /// Log of the softmax along `dim`, computed stably.
    Tensor log_softmax(std::int64_t dim) const;

    // ---- comparisons (masks of dtype bool, not differentiable) ----
    /// Elementwise ==, as a bool mask.
    Tensor eq(const Tensor& other) const;
    /// Elementwise !=, as a bool mask.
    Tensor ne(const Tensor& other) const;
    /// Elementwise <, as a bool mask.
    Tensor lt(const Tensor& other) const;
    /// Elementwise <=, as a bool mask.
    Tensor le(const Tensor& other) const;
    /// Elementwise >, as a bool mask.
    Tensor gt(const Tensor& other) const;
    /// Elementwise >=, as a bool mask.
    Tensor ge(const Tensor& other) const;

    // ---- in place (not recorded: refused on a tensor that requires grad while grad mode is on) ----
    /// Sets every element to 0 in place.
    Tensor& zero_();
    /// Sets every element to `value` in place.
    Tensor& fill_(double value);
    /// Copies `src` (broadcast, converted) into this tensor in place.
    Tensor& copy_(const Tensor& src);
    /// Adds alpha * other in place.
    Tensor& add_(const Tensor& other, double alpha = 1.0);
    /// Multiplies by `factor` in place.
    Tensor& mul_(double factor);
    /// Multiplies by `other` (broadcast) in place.
    Tensor& mul_(const Tensor& other);
    /// Writes `value` where the bool `mask` is true, in place.
    Tensor& masked_fill_(const Tensor& mask, double value);
    /// Fills with uniform draws from [low, high) in place (from `gen`, else the default generator).
    Tensor& uniform_(double low, double high, Generator* gen = nullptr);
    /// Fills with normal draws in place (from `gen`, else the default generator).
    Tensor& normal_(double mean, double std, Generator* gen = nullptr);

    /// The values as text, as PyTorch prints them.
    std::string to_string() const;

private:
    [[noreturn]] static void throw_undefined();
    // Out of line, so that data_ptr stays small enough to inline into every kernel.
    [[noreturn]] void throw_dtype_mismatch(DType asked) const;
    TensorHandle impl_;
};

/// Prints to_string().
std::ostream& operator<<(std::ostream& out, const Tensor& t);

// ---- creation ----
/// A new tensor of `shape`, its values uninitialised.
Tensor empty(const Shape& shape, DType dtype = kFloat32);
/// A handle on t's storage that keeps it alive, for a view of t. A small tensor's bytes lie in its
/// header's block, whose storage record holds no count on it: the handle then holds t's header.
std::shared_ptr<Storage> shared_storage(const Tensor& t);
namespace detail {
/// Whether t's bytes lie in its own header's block (a small tensor's): its storage record then
/// holds no count, and whatever shares the bytes counts the header instead (shared_storage()).
inline bool bytes_in_own_block(const Tensor& t) { return t.impl().storage && t.impl().storage.use_count() == 0; }
/// Whether nothing but t's header holds t's bytes: no other header shares its storage, and where
/// the bytes lie in another small tensor's block, that tensor is gone and no other view holds it.
/// (The caller checks that t's header has one handle.)
bool holds_bytes_alone(const Tensor& t);
/// Makes dst use src's storage (see shared_storage()): dst's header is kept, so every handle on it
/// sees src's bytes from now on. Its shape, strides, storage offset and dtype are left as they
/// were: the caller sets them to fit the new bytes (nothing is checked here).
void share_storage(const Tensor& dst, const Tensor& src);
/// An uninitialised tensor of contiguous `like`'s shape, its shape and strides copied rather than
/// computed and checked again: the fast path of elementwise ops.
Tensor empty_like_contiguous(const Tensor& like, DType dtype);
/// A new header with no storage, shape or strides yet (a view's, which the caller fills).
TensorHandle new_tensor_header();

/// A weak handle on a tensor: it knows whether the tensor is still alive and gives it back then,
/// without keeping it alive (a hook kept by the tensor's own node, a cache keyed by parameters).
class WeakTensor {
public:
    WeakTensor() = default;
    /// A weak handle on t (none when t is undefined).
    /// Every handle on t counts in its shared word from now on (at once on the thread that made
    /// t, else once that thread settles it), so that lock() can tell from any thread.
    explicit WeakTensor(const Tensor& t) noexcept;
    WeakTensor(const WeakTensor& other) noexcept : impl_(other.impl_)
    {
        if (impl_) impl_->counts.fetch_add(TensorImpl::kOneWeak, std::memory_order_relaxed);
    }
    WeakTensor(WeakTensor&& other) noexcept : impl_(std::exchange(other.impl_, nullptr)) {}
    WeakTensor& operator=(WeakTensor other) noexcept
    {
        std::swap(impl_, other.impl_);
        return *this;
    }
    ~WeakTensor();
    /// The tensor while any handle on it is alive, else an undefined one.
    Tensor lock() const;

private:
    TensorImpl* impl_ = nullptr;
};
}  // namespace detail
/// Zeros of `shape`.
Tensor zeros(const Shape& shape, DType dtype = kFloat32);
/// Ones of `shape`.
Tensor ones(const Shape& shape, DType dtype = kFloat32);
/// `value` everywhere in `shape`.
Tensor full(const Shape& shape, double value, DType dtype = kFloat32);
/// Zeros of t's shape and dtype.
Tensor zeros_like(const Tensor& t);
/// Ones of t's shape and dtype.
Tensor ones_like(const Tensor& t);
/// `value` everywhere in t's shape and dtype.
Tensor full_like(const Tensor& t, double value);
Tensor scalar_tensor(double value, DType dtype = kFloat32);  ///< 0-d
/// Values in row-major order; shape defaults to 1-D.
Tensor tensor(const std::vector<double>& values, const Shape& shape, DType dtype = kFloat32);
/// A 1-D tensor of `values`.
Tensor tensor(const std::vector<double>& values, DType dtype = kFloat32);
/// A tensor of `shape` holding `values` (whose count must match), with T's dtype.
template <class T> Tensor from_vector(const std::vector<T>& values, const Shape& shape);
/// 0, 1, ..., up to `end` (exclusive).
Tensor arange(double end, DType dtype = kFloat32);
/// start, start+step, ... up to `end` (exclusive).
Tensor arange(double start, double end, double step = 1, DType dtype = kFloat32);
/// The n x n identity matrix.
Tensor eye(std::int64_t n, DType dtype = kFloat32);
/// Uniform draws from [0, 1).
Tensor rand(const Shape& shape, DType dtype = kFloat32, Generator* gen = nullptr);
/// Standard normal draws.
Tensor randn(const Shape& shape, DType dtype = kFloat32, Generator* gen = nullptr);
/// Uniform draws from [low, high).
Tensor uniform(const Shape& shape, double low, double high, DType dtype = kFloat32, Generator* gen = nullptr);
/// Normal draws of the given mean and standard deviation.
Tensor normal(const Shape& shape, double mean, double std, DType dtype = kFloat32, Generator* gen = nullptr);
/// Uniform integers in [low, high), int64.
Tensor randint(std::int64_t low, std::int64_t high, const Shape& shape, Generator* gen = nullptr);

// ---- shape helpers ----
/// The number of elements; throws naming `op` for a negative size or a count beyond int64.
std::int64_t checked_numel(std::string_view op, const Shape& shape);
/// The product of a shape's sizes.
std::int64_t numel_of(const Shape& shape);
/// Throws naming `op` when `value` cannot be held exactly by `dtype` (a fraction in an int64
/// tensor, 2 in a bool): loom never truncates a scalar silently.
void check_scalar_fits(std::string_view op, double value, DType dtype);
/// NumPy broadcasting; throws naming `op` when the shapes do not broadcast.
Shape broadcast_shapes(std::string_view op, const Shape& a, const Shape& b);
/// Wraps a possibly negative dim into [0, ndim), naming `op` when out of range.
std::int64_t wrap_dim(std::string_view op, std::int64_t dim, std::int64_t ndim);
/// The same for an op that indexes along the dim, which a 0-d tensor does not have.
std::int64_t wrap_indexed_dim(std::string_view op, std::int64_t dim, std::int64_t ndim);

}  // namespace loom

/// \cond fmt_formatters
template <> struct fmt::formatter<loom::Tensor> : fmt::formatter<std::string_view> {
    auto format(const loom::Tensor& t, fmt::format_context& ctx) const
    {
        return fmt::formatter<std::string_view>::format(t.to_string(), ctx);
    }
};
/// \endcond
