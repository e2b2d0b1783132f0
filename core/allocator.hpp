/// \file
/// Storage bytes come from a per-thread cache of freed blocks: a recurrent step makes and drops
/// the same few small tensors thousands of times, and malloc's bookkeeping (and its consolidation
/// when a whole tape is released at once) then costs more than the arithmetic; a training step
/// makes and drops the same few large buffers, and malloc hands those back to the system and
/// faults their pages in again the next step (16% of W2's training time). Blocks up to 1 MiB
/// come in power-of-two size classes; larger ones, up to kLargestCachedBlock, round up to a
/// quarter of their power of two (at most 25% unused) and are kept by exact size. At most
/// storage_cache_limit() bytes are kept per thread (512 MiB unless set: a step of a model at
/// T = 1024 or 4096 frees several 64 MiB results, and under a hypervisor faulting their pages in
/// again took 3/4 of W8's minGRU step); a large block freed when the cache is full makes room by
/// handing back the large blocks freed longest ago, so the cache follows the sizes in use now.
/// empty_storage_cache() hands them all back. Under AddressSanitizer the cache is off, so every
/// use after free is still caught.
#pragma once
#include <cstddef>
#include <cstdint>
#include <new>

namespace loom {

/// Requests up to this size are served from size classes.
inline constexpr std::size_t kLargestClassBlock = std::size_t(1) << 20;
/// Blocks up to this size are cached for reuse.
inline constexpr std::size_t kLargestCachedBlock = std::size_t(512) << 20;
/// Bytes each thread's cache may hold before it frees blocks, unless set_storage_cache_limit() says otherwise.
inline constexpr std::size_t kDefaultCacheLimit = std::size_t(512) << 20;

/// The small objects made for every op (a tensor's handle and storage record, a tape node) come
/// from per-thread free lists by 16-byte size class, for the same reason: a tape of thousands of
/// entries is freed at once, and malloc then spends its time consolidating.
inline constexpr std::size_t kLargestSmallObject = 512;
namespace detail {
/// A thread's free lists of small objects, one per 16-byte size class. allocate_small_object
/// and free_small_object reach them inline: every op makes and drops several objects, and a
/// call into the library for each cost more than the list operation itself.
struct ObjectLists {
    /// Size classes: 8, 24, 40, ... bytes, up to kLargestSmallObject (see object_class).
    static constexpr std::size_t kClasses = (kLargestSmallObject + 7) / 16 + 1;
    /// One class's freed blocks, most recently freed last.
    struct List {
        void** items = nullptr;  ///< from malloc; grown by free_small_object_slow
        std::uint32_t size = 0;
        std::uint32_t capacity = 0;
    };
    /// By size class.
    List lists[kClasses];
};
/// This thread's lists: null before its first pooled allocation, once the thread's cache is
/// gone, and always in sanitized builds (every block then comes from malloc, so that every use
/// after free is caught). initial-exec: libloom is linked, not dlopen()ed.
extern constinit thread_local ObjectLists* object_lists [[gnu::tls_model("initial-exec")]];
/// The size class of a small object of `size` bytes: class k holds objects of 16k - 7 to 16k + 8
/// bytes in blocks of 16k + 8, which malloc places 16k + 16 bytes apart (its 8-byte header, then
/// 16-byte alignment). Classes of 16k bytes would lie 16k + 16 apart, 16 bytes more for an object
/// of 16k - 8 bytes, a small tensor's usual size.
constexpr std::size_t object_class(std::size_t size) { return (size + 7) / 16; }
/// The size of class k's blocks.
constexpr std::size_t object_class_size(std::size_t k) { return 16 * k + 8; }
/// allocate_small_object when its class's list is empty (or there is no pool yet).
void* allocate_small_object_slow(std::size_t size);
/// free_small_object when its class's list is full (or there is no pool).
void free_small_object_slow(void* p, std::size_t size) noexcept;
}  // namespace detail

/// A block of `size` bytes from a per-thread pool for small objects.
inline void* allocate_small_object(std::size_t size)
{
    if (detail::ObjectLists* pool = detail::object_lists) {
        detail::ObjectLists::List& list = pool->lists[detail::object_class(size)];
        if (list.size > 0) [[likely]]
            return list.items[--list.size];
    }
    return detail::allocate_small_object_slow(size);
}
namespace detail {
/// The free list that a block of `size` bytes goes back to, where it has room; null where it has
/// none or there is no pool (free_small_object_slow then takes the block).
inline ObjectLists::List* free_list_with_room(std::size_t size) noexcept
{
    if (ObjectLists* pool = object_lists) {
        ObjectLists::List& list = pool->lists[object_class(size)];
        if (list.size < list.capacity) [[likely]]
            return &list;
    }
    return nullptr;
}
}  // namespace detail
/// Returns a block from allocate_small_object.
inline void free_small_object(void* p, std::size_t size) noexcept
{
    if (detail::ObjectLists::List* list = detail::free_list_with_room(size)) [[likely]] {
        list->items[list->size++] = p;
        return;
    }
    detail::free_small_object_slow(p, size);
}

/// Puts this thread's long free lists of small objects in address order, the lowest handed out
/// first. Called when a long tape has been released at once: the records of the next forward are
/// then laid out in sequence, as in fresh memory, instead of scattered over the blocks the
/// last one freed in whatever order its entries let go of them (W7's recorded forward took
/// 7.9-9.4 ms with the lists as they were left, 6.1-6.8 ms with them ordered: what it writes is
/// fetched ahead instead of missing the cache at every new header).
void order_small_objects() noexcept;
/// The shortest free list order_small_objects() sorts: shorter ones fit in the caches anyway, and
/// their order costs nothing. A tape of fewer entries is not worth ordering after either.
inline constexpr std::uint32_t kOrderedListLength = 4096;

/// For std::allocate_shared: the object and its control block in one pooled block.
template <class T> struct PoolAllocator {
    /// The allocated type.
    using value_type = T;
    PoolAllocator() = default;
    /// Converts from an allocator of another type.
    template <class U> PoolAllocator(const PoolAllocator<U>&) noexcept {}
    /// Memory for n objects of T.
    T* allocate(std::size_t n)
    {
        static_assert(alignof(T) <= 16, "pooled blocks are 16-byte aligned");
        if (n == 1 && sizeof(T) <= kLargestSmallObject) return static_cast<T*>(allocate_small_object(sizeof(T)));
        return static_cast<T*>(::operator new(n * sizeof(T)));
    }
    /// Returns memory from allocate.
    void deallocate(T* p, std::size_t n) noexcept
    {
        if (n == 1 && sizeof(T) <= kLargestSmallObject) return free_small_object(p, sizeof(T));
        ::operator delete(p);
    }
    /// All PoolAllocators are interchangeable.
    template <class U> bool operator==(const PoolAllocator<U>&) const noexcept { return true; }
};

/// A block of at least `nbytes` (16-byte aligned); `capacity` receives its real size, which
/// free_storage_bytes must be given back. Throws loom::Error when memory runs out.
void* allocate_storage_bytes(std::size_t nbytes, std::size_t& capacity);
namespace detail {
/// What storage_bytes_requested() answers; inline, since every small tensor made counts its
/// bytes (a call through the PLT each, before).
extern constinit thread_local std::uint64_t bytes_requested [[gnu::tls_model("initial-exec")]];
}  // namespace detail
/// Bytes this thread has asked allocate_storage_bytes for since it started, with those of small
/// tensors kept inside their Storage (what the profiler reports as allocated).
inline std::uint64_t storage_bytes_requested() { return detail::bytes_requested; }
/// Counts `nbytes` of a small tensor kept inside its Storage in storage_bytes_requested().
inline void count_inline_storage_bytes(std::size_t nbytes) noexcept { detail::bytes_requested += nbytes; }
/// Returns a block from allocate_storage_bytes.
void free_storage_bytes(void* data, std::size_t capacity) noexcept;

/// Bytes this thread holds in freed blocks, ready for reuse.
std::size_t cached_storage_bytes();
/// The most bytes each thread's cache keeps (kDefaultCacheLimit unless set).
std::size_t storage_cache_limit();
/// Sets the most bytes each thread's cache keeps from now on (0: keeps no storage blocks);
/// blocks kept already stay until reused or empty_storage_cache(). Returns the previous limit.
std::size_t set_storage_cache_limit(std::size_t bytes);
/// Returns this thread's cached storage blocks and small objects to the system (as
/// torch.cuda.empty_cache does for a GPU).
void empty_storage_cache();
/// False in sanitized builds.
bool storage_cache_enabled();

}  // namespace loom
