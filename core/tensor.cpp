#include "tensor.hpp"


#include <cmath>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include <pthread.h>

#include "allocator.hpp"
#include "random.hpp"
#include "tensor_block.hpp"

namespace loom {

namespace {
// A storage record whose bytes come from loom's allocator (core/allocator.hpp), freed with it.
struct HeapStorage final : Storage {
    explicit HeapStorage(std::size_t n)
    {
        nbytes = n;
        data = static_cast<std::byte*>(allocate_storage_bytes(n, capacity));
    }
    ~HeapStorage() { free_storage_bytes(data, capacity); }
    std::size_t capacity = 0;  // of the block behind `data`
};
}  // namespace

void Tensor::throw_dtype_mismatch(DType asked) const
{
    fail("data_ptr", "tensor has dtype {}, asked for {}", dtype(), asked);
}

void Tensor::throw_undefined()
{
    throw Error("tensor: used an undefined tensor (default-constructed, or a gradient never computed)");
}

std::int64_t checked_numel(std::string_view op, const Shape& shape)
{
    std::int64_t n = 1;
    for (auto s : shape) {
        LOOM_CHECK(s >= 0, op, "negative dimension {} in shape {}", s, shape);
        LOOM_CHECK(!__builtin_mul_overflow(n, s, &n), op, "shape {} has more than 2^63 - 1 elements", shape);
    }
    return n;
}

std::int64_t numel_of(const Shape& shape) { return checked_numel("shape", shape); }

namespace {
// Writes shape's row-major strides into `strides`: a copy of the shape (its size, and a copy
// that fits inline costs a few moves), its values then replaced.
void write_contiguous_strides(const Shape& shape, Shape& strides)
{
    strides = shape;
    std::int64_t s = 1;
    for (auto i = static_cast<std::int64_t>(shape.size()) - 1; i >= 0; --i) {
        strides[i] = s;
        s = TensorImpl::row_major_stride_before(s, shape[i]);
    }
}
}  // namespace

Shape contiguous_strides(const Shape& shape)
{
    Shape strides;
    write_contiguous_strides(shape, strides);
    return strides;
}

std::int64_t wrap_dim(std::string_view op, std::int64_t dim, std::int64_t ndim)
{
    const std::int64_t lo = ndim == 0 ? -1 : -ndim, hi = ndim == 0 ? 0 : ndim - 1;
    LOOM_CHECK(dim >= lo && dim <= hi, op, "dim {} is out of range for a tensor of {} dims (expected {} to {})",
               dim, ndim, lo, hi);
    return dim < 0 ? dim + std::max<std::int64_t>(ndim, 1) : dim;
}

std::int64_t wrap_indexed_dim(std::string_view op, std::int64_t dim, std::int64_t ndim)
{
    LOOM_CHECK(ndim > 0, op, "cannot be applied to a 0-d tensor (it has no dim {} to index)", dim);
    return wrap_dim(op, dim, ndim);
}

Shape broadcast_shapes(std::string_view op, const Shape& a, const Shape& b)
{
    const std::size_t n = std::max(a.size(), b.size());
    Shape out(n);
    for (std::size_t i = 0; i < n; ++i) {
        const std::int64_t da = i < n - a.size() ? 1 : a[i - (n - a.size())];
        const std::int64_t db = i < n - b.size() ? 1 : b[i - (n - b.size())];
        LOOM_CHECK(da == db || da == 1 || db == 1, op,
                   "shapes {} and {} do not broadcast (dim {}: {} vs {})", a, b, i, da, db);
        out[i] = da == 1 ? db : da;
    }
    return out;
}

std::int64_t Tensor::size(std::int64_t d) const { return sizes()[wrap_indexed_dim("size", d, dim())]; }
std::int64_t Tensor::stride(std::int64_t d) const
{
    return impl().stride(wrap_indexed_dim("stride", d, dim()));
}

void TensorImpl::set_layout(Shape shape_, const Shape& strides_)
{
    const bool row_major_ = layout_is_contiguous(shape_, strides_);
    if (row_major_ && strides_ == contiguous_strides(shape_)) {
        if (stored_strides) free_stored_strides();
    } else if (stored_strides) {
        *stored_strides = strides_;
    } else {
        void* room = allocate_small_object(sizeof(Shape));
        try {
            stored_strides = ::new (room) Shape(strides_);
        } catch (...) {
            free_small_object(room, sizeof(Shape));
            throw;
        }
    }
    shape = std::move(shape_);
    contiguous = row_major_;
}

void TensorImpl::free_stored_strides() noexcept
{
    stored_strides->~Shape();
    free_small_object(stored_strides, sizeof(Shape));
    stored_strides = nullptr;
}
bool Tensor::shares_storage(const Tensor& other) const
{
    return defined() && other.defined() && impl().storage == other.impl().storage;
}

template <class T> T Tensor::item() const
{
    LOOM_CHECK(numel() == 1, "item", "expects a tensor with one element, got shape {}", sizes());
    return dispatch(dtype(), [&]<class S>() { return convert_value<T>("item", *data_ptr<S>()); });
}
template float Tensor::item<float>() const;
template double Tensor::item<double>() const;
template std::int64_t Tensor::item<std::int64_t>() const;
template int Tensor::item<int>() const;
template bool Tensor::item<bool>() const;

// ---- creation ----

using detail::block_size;
using detail::kHeaderAlone;
using detail::kInlineStorageBytes;
using detail::TensorWithBytes;

namespace {
// Calls fn with the header as the type of its block, and the block's size.
template <class Fn> void as_block(TensorImpl* impl, Fn fn)
{
    if (impl->block == kHeaderAlone) return fn(impl, sizeof(TensorImpl));
    return fn(static_cast<TensorWithBytes*>(impl), block_size(impl->block));
}
void destroy_contents(TensorImpl* impl) noexcept
{
    as_block(impl, []<class B>(B* b, std::size_t) { b->~B(); });
}
void free_block(TensorImpl* impl) noexcept
{
    as_block(impl, [](auto* b, std::size_t size) { free_small_object(b, size); });
}
// Drops one weak count (the handles' together, or a WeakTensor's); the last frees the block.
void release_weak(TensorImpl* impl) noexcept
{
    const std::uint64_t before = impl->counts.fetch_sub(TensorImpl::kOneWeak, std::memory_order_acq_rel);
    if ((before & TensorImpl::kWeakMask) == 1) free_block(impl);
}
// Ends a header whose handles are all gone, while weak handles may still count it.
void release_handles(TensorImpl* impl) noexcept
{
    destroy_contents(impl);
    release_weak(impl);
}

// ---- Reference counts ----
// Biased reference counting (Choi, Shull and Torrellas, PACT 2018; CPython's free-threaded
// build): a header's owner, the thread that made it, counts its handles in the plain byte
// `local`, and every other thread in the atomic word `counts`. Most tensors never leave their
// thread, and no program of loom's runs single-threaded: Debian's OpenBLAS starts a thread as it
// loads, so counts kept atomic "once the process has threads" were atomic always, a lock-prefixed
// instruction per handle copied or dropped.
//
// A handle may be copied on one thread and dropped on another, so only the sum of the two counts
// is the number of handles. The owner's byte holds 255: the next handle moves kHandleBatch of
// them to `counts`. When the owner drops its last count and `counts` holds a batch, it takes the
// batch back into its byte; otherwise (weak handles, a queued count, fewer handles there than a
// batch) it merges: `counts` takes the sum and kMerged, and from then on every thread counts
// there (the last to drop one frees). A weight that a long tape saves thousands of times was
// otherwise merged at the first reset, and each later save and drop of it was a lock-prefixed
// instruction and a call (W7: 7,700 of each per gradient). When
// another thread drops a handle that only the owner's count holds (its own count would go below
// zero), it sets kQueued instead and queues the header to its owner, the queue keeping that
// handle's count: the owner merges what is queued at the next header it makes, or when it exits,
// and a thread that has exited has its queue merged at once by whoever queues to it. Until then
// the header stays allocated: a tensor that a thread made and another thread dropped last is
// freed when its maker next makes a tensor.
//
// A WeakTensor merges its header first (or queues it, holding a count, from another thread), so
// lock() reads one word on any thread: a merged header with no handle is gone for good.
struct OwnerState final : detail::ThreadOwner {
    std::mutex mutex;                  // guards what follows
    std::vector<TensorImpl*> queued;   // headers queued by other threads, each holding a count
    bool exited = false;               // the thread has ended; a new one may take the tag again
};
// Every tag's state, by tag (0 unused), and the tags free to take again. Never destroyed: threads
// drop handles until the process ends.
struct Owners {
    std::mutex mutex;
    std::vector<OwnerState*> by_tag{nullptr};
    std::vector<std::uint16_t> free_tags;
};
Owners& owners()
{
    static Owners* all = new Owners;
    return *all;
}
// The owner of the headers made by threads without a tag: one that has ended.
OwnerState& no_owner()
{
    static OwnerState* nobody = [] {
        auto* state = new OwnerState;
        state->tag = detail::kNoOwner;
        state->exited = true;
        return state;
    }();
    return *nobody;
}
constinit thread_local bool thread_untagged [[gnu::tls_model("initial-exec")]] = false;

// Moves the owner's count into `counts` for good and adds `extra`; returns the handles then.
// Called by the owner thread, or with its state's mutex held once it has exited.
std::int64_t merge_counts(TensorImpl* impl, int extra) noexcept
{
    const std::int64_t local = impl->local.load(std::memory_order_relaxed);
    std::uint64_t counts = impl->counts.load(std::memory_order_relaxed), merged;
    std::int64_t handles;
    do {
        handles = TensorImpl::shared_handles(counts) + local + extra;
        merged = (std::uint64_t(std::uint32_t(handles)) << 32) | (counts & TensorImpl::kWeakMask) | TensorImpl::kMerged;
    } while (!impl->counts.compare_exchange_weak(counts, merged, std::memory_order_acq_rel, std::memory_order_relaxed));
    impl->local.store(0, std::memory_order_relaxed);
    // Only after the exchange: a thread that queues the header reads its owner before its own.
    impl->owner.store(detail::kNoOwner, std::memory_order_relaxed);
    return handles;
}
// Merges a header and drops one count (its queue's, or its owner's last handle's); the last frees it.
void merge_and_drop_one(TensorImpl* impl) noexcept
{
    if (merge_counts(impl, -1) == 0) release_handles(impl);
}
// Settles the headers other threads queued for this one.
void settle_queued(OwnerState& me) noexcept
{
    std::vector<TensorImpl*> queued;
    {
        const std::lock_guard lock(me.mutex);
        queued.swap(me.queued);
        me.pending.store(false, std::memory_order_relaxed);
    }
    for (TensorImpl* impl : queued) merge_and_drop_one(impl);
}
// Hands a header that holds a count for it to the owner of tag `tag`; merges it here if that thread has exited.
void queue_for_owner(TensorImpl* impl, std::uint16_t tag) noexcept
{
    OwnerState* owner = &no_owner();
    if (tag != detail::kNoOwner) {
        const std::lock_guard lock(owners().mutex);
        owner = owners().by_tag[tag];
    }
    std::int64_t left;
    {
        const std::lock_guard lock(owner->mutex);
        if (!owner->exited) {
            owner->queued.push_back(impl);  // a failed allocation of 8 bytes here ends the process (noexcept)
            owner->pending.store(true, std::memory_order_release);
            return;
        }
        // Merged under the lock, so that no new thread takes the tag meanwhile; freed after it,
        // as freeing drops handles that may queue here again.
        left = merge_counts(impl, -1);
    }
    if (left == 0) release_handles(impl);
}
// Ends this thread's ownership: what is queued is merged, and whatever is queued later is merged
// by the thread that queues it. The tag may be taken by a new thread, which then counts the
// unmerged headers as their owner (their counts were last written here, before the unlock).
struct ThreadExit {
    ~ThreadExit()
    {
        auto* me = static_cast<OwnerState*>(detail::thread_owner);
        detail::thread_tag = 0;
        detail::thread_owner = nullptr;
        thread_untagged = true;  // headers made from now on (by later thread_local destructors) have no owner
        std::vector<TensorImpl*> queued;
        {
            const std::lock_guard lock(me->mutex);
            me->exited = true;
            queued.swap(me->queued);
        }
        for (TensorImpl* impl : queued) merge_and_drop_one(impl);
        const std::lock_guard lock(owners().mutex);
        owners().free_tags.push_back(me->tag);
    }
};

// A child made by fork() has only the thread that forked: every other thread's headers are
// merged there, and its tags are free. The locks are held across the fork, so none is left held
// by a thread that did not come along.
void lock_owners_for_fork() noexcept
{
    owners().mutex.lock();
    for (OwnerState* state : owners().by_tag)
        if (state) state->mutex.lock();
    no_owner().mutex.lock();
}
void unlock_owners_after_fork() noexcept
{
    no_owner().mutex.unlock();
    for (OwnerState* state : owners().by_tag)
        if (state) state->mutex.unlock();
    owners().mutex.unlock();
}
void end_other_owners_in_child() noexcept
{
    unlock_owners_after_fork();
    std::vector<TensorImpl*> queued;
    {
        const std::lock_guard lock(owners().mutex);
        for (OwnerState* state : owners().by_tag) {
            if (!state || state == detail::thread_owner || state->exited) continue;
            state->exited = true;
            queued.insert(queued.end(), state->queued.begin(), state->queued.end());
            state->queued.clear();
            owners().free_tags.push_back(state->tag);
        }
    }
    for (TensorImpl* impl : queued) merge_and_drop_one(impl);
}
[[gnu::constructor]] void merge_other_owners_after_fork()
{
    pthread_atfork(lock_owners_for_fork, unlock_owners_after_fork, end_other_owners_in_child);
}
}  // namespace

std::uint16_t detail::tag_for_new_header_slow()
{
    if (auto* me = static_cast<OwnerState*>(thread_owner)) {
        settle_queued(*me);
        return me->tag;
    }
    if (thread_untagged) return kNoOwner;
    OwnerState* me = nullptr;
    {
        const std::lock_guard lock(owners().mutex);
        Owners& all = owners();
        if (!all.free_tags.empty()) {
            me = all.by_tag[all.free_tags.back()];
            all.free_tags.pop_back();
        } else if (all.by_tag.size() < kNoOwner) {
            try {
                me = new OwnerState;
                me->tag = static_cast<std::uint16_t>(all.by_tag.size());
                all.by_tag.push_back(me);
            } catch (const std::bad_alloc&) {
                delete me;
                me = nullptr;
            }
        }
    }
    if (!me) {
        thread_untagged = true;  // every tag is taken by a live thread: this one's headers count atomically
        return kNoOwner;
    }
    {
        const std::lock_guard lock(me->mutex);
        me->exited = false;
    }
    static thread_local ThreadExit at_exit;
    (void)&at_exit;
    thread_owner = me;
    thread_tag = me->tag;
    return me->tag;
}

constinit thread_local std::uint16_t detail::thread_tag [[gnu::tls_model("initial-exec")]] = 0;
constinit thread_local detail::ThreadOwner* detail::thread_owner [[gnu::tls_model("initial-exec")]] = nullptr;

namespace {

// The header of a new tensor of `nbytes` bytes, its storage made: in the same block when small,
// else with the bytes from the storage cache. Always inlined: returned from a call, a handle was
// written to memory and read back, a store-forwarding stall that perf put at half of making a
// small tensor.
[[gnu::always_inline]] inline TensorHandle make_tensor_impl(std::size_t nbytes)
{
    if (nbytes <= kInlineStorageBytes) return detail::new_tensor_with_bytes(nbytes);
    TensorHandle impl = detail::new_tensor_header();
    TensorImpl& h = *impl.get();
    h.storage = std::allocate_shared<HeapStorage>(PoolAllocator<HeapStorage>(), nbytes);
    h.data = h.storage->data;
    return impl;
}

// A contiguous tensor of `shape`, its size checked: `op` names the call in errors.
Tensor allocate(std::string_view op, const Shape& shape, DType dtype)
{
    const std::int64_t n = checked_numel(op, shape);
    std::int64_t nbytes = 0;
    LOOM_CHECK(!__builtin_mul_overflow(n, std::int64_t(dtype_size(dtype)), &nbytes), op,
               "a {} tensor of shape {} needs more than 2^63 - 1 bytes", dtype, shape);
    TensorHandle impl = make_tensor_impl(static_cast<std::size_t>(nbytes));
    TensorImpl& h = *impl.get();
    h.shape = shape;  // row-major, as a new header is: no strides to store
    h.dtype = dtype;
    return Tensor(std::move(impl));
}
}  // namespace

bool detail::holds_bytes_alone(const Tensor& t)
{
    const std::shared_ptr<Storage>& storage = t.impl().storage;
    if (bytes_in_own_block(t)) return true;
    if (storage.use_count() != 1) return false;
    if (!storage->inline_bytes()) return true;
    // Another small tensor's bytes, held through a handle on its header (shared_storage()): that
    // header must have no handle but this one.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Winvalid-offsetof"  // single inheritance, no virtual base: GCC and Clang lay it out as standard
    constexpr std::size_t own_offset = offsetof(TensorWithBytes, own);
#pragma GCC diagnostic pop
    const auto* owner = reinterpret_cast<const TensorImpl*>(reinterpret_cast<const std::byte*>(storage.get()) - own_offset);
    return detail::handle_count(*owner) == 1;
}

namespace {
// release_last_handle for any header: its destructor, then its block back to the pool.
[[gnu::noinline]] void destroy_and_free(TensorImpl* impl) noexcept
{
    // One dispatch on the block's kind for both steps.
    as_block(impl, []<class B>(B* b, std::size_t size) {
        b->~B();
        free_small_object(b, size);
    });
}
}  // namespace

void detail::release_last_handle(TensorImpl* impl) noexcept
{
    // Every result an op drops comes here, and nearly all are a small tensor's block with nothing
    // of its own to release but its slot. Such a block goes back to its free list here, in a
    // function that saves no register: through the destructor, a drop cost 47 instructions, four
    // registers saved and restored among them.
    if (impl->block != kHeaderAlone && impl->releases_only_slot()) [[likely]] {
        if (ObjectLists::List* list = free_list_with_room(block_size(impl->block))) [[likely]] {
            impl->release_slot();
            list->items[list->size++] = static_cast<TensorWithBytes*>(impl);
            return;
        }
    }
    destroy_and_free(impl);
}

namespace {
// A batch of handles as `counts` counts them: what the owner moves there past its byte's 255 and
// takes back when it drops its last.
constexpr std::uint64_t kBatchInCounts = std::uint64_t(TensorImpl::kHandleBatch) * TensorImpl::kOneShared;
}  // namespace

void detail::add_owned_handle_past_byte(TensorImpl* impl) noexcept
{
    // The byte holds 255: kHandleBatch of them move to `counts`, and the byte counts the new one.
    impl->counts.fetch_add(kBatchInCounts, std::memory_order_relaxed);
    impl->local.store(UINT8_MAX + 1 - TensorImpl::kHandleBatch, std::memory_order_relaxed);
}

void detail::release_last_owned_handle(TensorImpl* impl) noexcept
{
    // A batch that the owner moved to `counts` past the byte's 255 (add_owned_handle_past_byte)
    // comes back to its byte, and it goes on counting alone. Only the sum of the counts means
    // anything, so this takes a batch wherever `counts` holds one; with fewer (other threads'
    // handles alone), the header merges as it always did, and their last drop frees it at once
    // rather than queueing it to an owner that may make no tensor for a long time.
    std::uint64_t counts = impl->counts.load(std::memory_order_relaxed);
    while (!(counts & (TensorImpl::kMerged | TensorImpl::kQueued)) &&
           (counts & TensorImpl::kWeakMask) == TensorImpl::kHandlesWeak &&
           TensorImpl::shared_handles(counts) >= TensorImpl::kHandleBatch) {
        if (impl->counts.compare_exchange_weak(counts, counts - kBatchInCounts, std::memory_order_acq_rel,
                                               std::memory_order_relaxed)) {
            impl->local.store(TensorImpl::kHandleBatch, std::memory_order_relaxed);  // and the dropped one gone
            return;
        }
    }
    // Weak handles, a queued count, or fewer handles in `counts` than a batch: merge, and the
    // last handle frees.
    merge_and_drop_one(impl);
}

void detail::release_shared_handle(TensorImpl* impl) noexcept
{
    // Read before the exchange below: the owner changes it only after an exchange that merges.
    const std::uint16_t owner = impl->owner.load(std::memory_order_relaxed);
    std::uint64_t counts = impl->counts.load(std::memory_order_relaxed);
    for (;;) {
        if (counts & TensorImpl::kMerged) {
            if (TensorImpl::shared_handles(impl->counts.fetch_sub(TensorImpl::kOneShared, std::memory_order_acq_rel)) == 1)
                release_handles(impl);
            return;
        }
        if (TensorImpl::shared_handles(counts) == 0 && !(counts & TensorImpl::kQueued)) {
            // A handle only the owner's count holds: its count goes to the owner's queue.
            if (impl->counts.compare_exchange_weak(counts, counts | TensorImpl::kQueued, std::memory_order_acq_rel,
                                                   std::memory_order_relaxed))
                return queue_for_owner(impl, owner);
        } else if (impl->counts.compare_exchange_weak(counts, counts - TensorImpl::kOneShared, std::memory_order_acq_rel,
                                                      std::memory_order_relaxed))
            return;
    }
}

TensorHandle detail::new_tensor_header()
{
    const std::uint16_t owner = tag_for_new_header();
    auto* impl = ::new (allocate_small_object(sizeof(TensorImpl))) TensorImpl(owner);
    impl->block = kHeaderAlone;
    return TensorHandle(impl);
}

detail::WeakTensor::~WeakTensor()
{
    if (impl_) release_weak(impl_);
}

detail::WeakTensor::WeakTensor(const Tensor& t) noexcept : impl_(t.impl_ptr().get())
{
    if (!impl_) return;
    impl_->counts.fetch_add(TensorImpl::kOneWeak, std::memory_order_relaxed);
    const std::uint16_t owner = impl_->owner.load(std::memory_order_relaxed);
    if (owner == thread_tag) {
        merge_counts(impl_, 0);  // t's handle keeps it above zero
        return;
    }
    // Another thread's header: unless merged, its owner merges it, the queue holding a count.
    std::uint64_t counts = impl_->counts.load(std::memory_order_relaxed);
    while (!(counts & TensorImpl::kMerged))
        if (impl_->counts.compare_exchange_weak(counts, (counts + TensorImpl::kOneShared) | TensorImpl::kQueued,
                                                std::memory_order_acq_rel, std::memory_order_relaxed)) {
            queue_for_owner(impl_, owner);
            return;
        }
}

Tensor detail::WeakTensor::lock() const
{
    if (!impl_) return {};
    if (impl_->owner.load(std::memory_order_relaxed) == thread_tag) return Tensor(TensorHandle::another(impl_));  // alive: unmerged
    // Merged, or queued with a count: no handle left only once merged at zero.
    std::uint64_t counts = impl_->counts.load(std::memory_order_relaxed);
    while (!(counts & TensorImpl::kMerged) || TensorImpl::shared_handles(counts) != 0)
        if (impl_->counts.compare_exchange_weak(counts, counts + TensorImpl::kOneShared, std::memory_order_acq_rel,
                                                std::memory_order_relaxed))
            return Tensor(TensorHandle(impl_));
    return {};
}

std::shared_ptr<Storage> shared_storage(const Tensor& t)
{
    const std::shared_ptr<Storage>& storage = t.impl().storage;
    if (!detail::bytes_in_own_block(t)) return storage;
    return std::shared_ptr<Storage>(storage.get(), [header = t](Storage*) noexcept {}, PoolAllocator<Storage>());
}

void detail::share_storage(const Tensor& dst, const Tensor& src)
{
    const std::int64_t offset = dst.storage_offset();  // kept, as the view's strides are
    std::shared_ptr<Storage> storage = shared_storage(src);
    // A handle on dst's own bytes, kept in dst, would hold dst's header forever.
    TensorImpl* own = dst.impl_ptr().get();
    as_block(own, [&]<class B>(B* b, std::size_t) {
        if constexpr (!std::is_same_v<B, TensorImpl>)
            if (storage.get() == &b->own) storage = std::shared_ptr<Storage>(std::shared_ptr<Storage>(), storage.get());
    });
    TensorImpl& d = dst.impl();
    d.storage = std::move(storage);
    d.set_storage_offset(offset);
}

Tensor empty(const Shape& shape, DType dtype) { return allocate("empty", shape, dtype); }

Tensor detail::empty_like_contiguous(const Tensor& like, DType dtype)
{
    TensorHandle impl = make_tensor_impl(static_cast<std::size_t>(like.numel()) * dtype_size(dtype));  // checked when `like` was made
    impl.get()->shape = like.sizes();  // row-major, as a new header is
    impl.get()->dtype = dtype;
    return Tensor(std::move(impl));
}

void check_scalar_fits(std::string_view op, double value, DType dtype)
{
    if (dtype == kInt64)
        LOOM_CHECK(std::isfinite(value) && value == std::trunc(value) && value >= -0x1p63 && value < 0x1p63, op,
                   "the scalar {} is not a whole number an int64 tensor can hold; loom does not promote: convert the "
                   "tensor with .to(kFloat32) first",
                   value);
    else if (dtype == kBool)
        LOOM_CHECK(value == 0 || value == 1, op, "the scalar {} is not 0 or 1, which a bool tensor holds", value);
}

Tensor full(const Shape& shape, double value, DType dtype)
{
    check_scalar_fits("full", value, dtype);
    Tensor t = allocate("full", shape, dtype);
    dispatch(dtype, [&]<class T>() { std::fill_n(t.data_ptr<T>(), t.numel(), convert_value<T>("full", value)); });
    return t;
}

Tensor zeros(const Shape& shape, DType dtype)
{
    Tensor t = allocate("zeros", shape, dtype);
    std::memset(t.impl().storage->data, 0, t.impl().storage->nbytes);
    return t;
}

Tensor ones(const Shape& shape, DType dtype)
{
    Tensor t = allocate("ones", shape, dtype);
    dispatch(dtype, [&]<class T>() { std::fill_n(t.data_ptr<T>(), t.numel(), T(1)); });
    return t;
}
Tensor zeros_like(const Tensor& t) { return zeros(t.sizes(), t.dtype()); }
Tensor ones_like(const Tensor& t) { return ones(t.sizes(), t.dtype()); }
Tensor full_like(const Tensor& t, double value) { return full(t.sizes(), value, t.dtype()); }
Tensor scalar_tensor(double value, DType dtype) { return full({}, value, dtype); }

Tensor tensor(const std::vector<double>& values, const Shape& shape, DType dtype)
{
    LOOM_CHECK(numel_of(shape) == static_cast<std::int64_t>(values.size()), "tensor",
               "{} values do not fill shape {} ({} elements)", values.size(), shape, numel_of(shape));
    Tensor t = empty(shape, dtype);
    dispatch(dtype, [&]<class T>() {
        T* p = t.data_ptr<T>();
        for (std::size_t i = 0; i < values.size(); ++i) p[i] = convert_value<T>("tensor", values[i]);
    });
    return t;
}

Tensor tensor(const std::vector<double>& values, DType dtype)
{
    return tensor(values, {static_cast<std::int64_t>(values.size())}, dtype);
}

template <class T> Tensor from_vector(const std::vector<T>& values, const Shape& shape)
{
    LOOM_CHECK(numel_of(shape) == static_cast<std::int64_t>(values.size()), "from_vector",
               "{} values do not fill shape {} ({} elements)", values.size(), shape, numel_of(shape));
    Tensor t = empty(shape, dtype_of<T>());
    std::copy(values.begin(), values.end(), t.data_ptr<T>());
    return t;
}
template Tensor from_vector<float>(const std::vector<float>&, const Shape&);
template Tensor from_vector<double>(const std::vector<double>&, const Shape&);
template Tensor from_vector<std::int64_t>(const std::vector<std::int64_t>&, const Shape&);

Tensor arange(double end, DType dtype) { return arange(0, end, 1, dtype); }

Tensor arange(double start, double end, double step, DType dtype)
{
    LOOM_CHECK(step != 0 && std::isfinite(start) && std::isfinite(end) && std::isfinite(step), "arange",
               "expects finite bounds and a non-zero step, got start={} end={} step={}", start, end, step);
    const double count = std::max(0.0, std::ceil((end - start) / step));
    LOOM_CHECK(count < 0x1p62, "arange", "[{}, {}) with step {} has {} elements, more than a tensor can hold", start,
               end, step, count);
    const auto n = static_cast<std::int64_t>(count);
    Tensor t = empty({n}, dtype);
    dispatch(dtype, [&]<class T>() {
        T* p = t.data_ptr<T>();
        for (std::int64_t i = 0; i < n; ++i) p[i] = convert_value<T>("arange", start + static_cast<double>(i) * step);
    });
    return t;
}

Tensor eye(std::int64_t n, DType dtype)
{
    Tensor t = zeros({n, n}, dtype);
    dispatch(dtype, [&]<class T>() {
        for (std::int64_t i = 0; i < n; ++i) t.data_ptr<T>()[i * n + i] = T(1);
    });
    return t;
}

Tensor uniform(const Shape& shape, double low, double high, DType dtype, Generator* gen)
{
    Tensor t = empty(shape, dtype);
    t.uniform_(low, high, gen);
    return t;
}

Tensor normal(const Shape& shape, double mean, double std, DType dtype, Generator* gen)
{
    Tensor t = empty(shape, dtype);
    t.normal_(mean, std, gen);
    return t;
}

Tensor rand(const Shape& shape, DType dtype, Generator* gen) { return uniform(shape, 0, 1, dtype, gen); }
Tensor randn(const Shape& shape, DType dtype, Generator* gen) { return normal(shape, 0, 1, dtype, gen); }

Tensor randint(std::int64_t low, std::int64_t high, const Shape& shape, Generator* gen)
{
    Generator& g = gen ? *gen : default_generator();
    Tensor t = empty(shape, kInt64);
    std::int64_t* p = t.data_ptr<std::int64_t>();
    for (std::int64_t i = 0; i < t.numel(); ++i) p[i] = g.randint(low, high);
    return t;
}

}  // namespace loom
