#include "allocator.hpp"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdlib>
#include <vector>

#include "error.hpp"

// GCC says a build is sanitized with __SANITIZE_*__, clang with __has_feature.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define LOOM_STORAGE_CACHE 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define LOOM_STORAGE_CACHE 0
#endif
#endif
#ifndef LOOM_STORAGE_CACHE
#define LOOM_STORAGE_CACHE 1
#endif

namespace loom {

namespace {

constexpr std::size_t kSmallestBlock = 64;
constexpr int kClasses = std::countr_zero(kLargestClassBlock) - std::countr_zero(kSmallestBlock) + 1;

// Per size class: W7's 46,000 recorded ops hold several objects of one class each until their
// backward, and a limit of 2^16 sent the rest back to malloc at every gradient (malloc and free
// were 7% of its time). What is kept is what the program itself held at its peak.
constexpr std::size_t kObjectsPerClass = std::size_t(1) << 18;

struct LargeBlock {
    std::size_t capacity;
    void* data;
};

struct Cache {
    std::vector<void*> free[kClasses];
    std::vector<LargeBlock> large;  // blocks above kLargestClassBlock, most recently freed last
    std::size_t bytes = 0;
    detail::ObjectLists objects;
    std::vector<std::uint32_t> scratch;  // order_small_objects' keys, kept

    void clear() noexcept
    {
        const auto release = [](auto& lists) {
            for (auto& list : lists) {
                for (void* p : list) std::free(p);
                list.clear();
            }
        };
        release(free);
        scratch = std::vector<std::uint32_t>();
        for (auto& list : objects.lists) {
            for (std::uint32_t i = 0; i < list.size; ++i) std::free(list.items[i]);
            list.size = 0;
        }
        for (const LargeBlock& b : large) std::free(b.data);
        large.clear();
        bytes = 0;
    }
};

// The most recently freed block of a free list, or null when it is empty.
void* take_from(std::vector<void*>& list) noexcept
{
    if (list.empty()) return nullptr;
    void* p = list.back();
    list.pop_back();
    return p;
}

// Keeps p in a free list; false when the list could not grow (the caller frees p instead).
bool keep_in(std::vector<void*>& list, void* p) noexcept
{
    try {
        list.push_back(p);
        return true;
    } catch (...) {
        return false;
    }
}

// A small object gets its class's block (object_class).
std::size_t rounded_object_size(std::size_t size) { return detail::object_class_size(detail::object_class(size)); }

// The cache lives behind a plain pointer that outlives it: a tensor freed while this thread
// is being torn down (after the cache is gone) goes straight back to malloc.
// initial-exec: libloom is linked, not dlopen()ed, and the general model costs a call per access.
[[gnu::tls_model("initial-exec")]] thread_local Cache* cache = nullptr;
std::atomic<std::size_t> cache_limit{kDefaultCacheLimit};
struct CacheOwner {
    Cache storage;
    CacheOwner()
    {
        cache = &storage;
        if (LOOM_STORAGE_CACHE) detail::object_lists = &storage.objects;
    }
    ~CacheOwner()
    {
        cache = nullptr;
        detail::object_lists = nullptr;
        storage.clear();
        for (auto& list : storage.objects.lists) std::free(list.items);
    }
};

Cache* this_thread_cache()
{
    [[gnu::tls_model("initial-exec")]] thread_local CacheOwner owner;
    return cache;
}

int size_class(std::size_t capacity) { return std::countr_zero(capacity) - std::countr_zero(kSmallestBlock); }

// What a block of n bytes is allocated as: a power of two up to kLargestClassBlock, above it a
// multiple of a quarter of n's power of two.
std::size_t block_capacity(std::size_t n)
{
    if (n <= kLargestClassBlock) return std::max(kSmallestBlock, std::bit_ceil(n));
    const std::size_t quarter = std::bit_floor(n) / 4;
    return (n + quarter - 1) / quarter * quarter;
}

// A cached large block of exactly this capacity, or null.
void* take_large(Cache& c, std::size_t capacity) noexcept
{
    for (std::size_t i = c.large.size(); i-- > 0;)
        if (c.large[i].capacity == capacity) {
            void* p = c.large[i].data;
            c.large.erase(c.large.begin() + std::ptrdiff_t(i));
            return p;
        }
    return nullptr;
}

void* checked_malloc(std::size_t n)
{
    void* p = std::malloc(n == 0 ? 1 : n);  // 16-byte aligned: enough for every dtype
    if (!p) throw Error(fmt::format("empty: out of memory allocating {} bytes", n));
    return p;
}

}  // namespace

constinit thread_local std::uint64_t detail::bytes_requested [[gnu::tls_model("initial-exec")]] = 0;
using detail::bytes_requested;

void* allocate_storage_bytes(std::size_t nbytes, std::size_t& capacity)
{
    bytes_requested += nbytes;
    if (!LOOM_STORAGE_CACHE || nbytes > kLargestCachedBlock) {
        capacity = nbytes;
        return checked_malloc(nbytes);
    }
    capacity = block_capacity(nbytes);
    if (Cache* c = this_thread_cache()) {
        void* p = capacity <= kLargestClassBlock ? take_from(c->free[size_class(capacity)]) : take_large(*c, capacity);
        if (p) {
            c->bytes -= capacity;
            return p;
        }
    }
    return checked_malloc(capacity);
}

void free_storage_bytes(void* data, std::size_t capacity) noexcept
{
    const bool ours = LOOM_STORAGE_CACHE && capacity >= kSmallestBlock && capacity <= kLargestCachedBlock &&
                      capacity == block_capacity(capacity);
    const std::size_t limit = cache_limit.load(std::memory_order_relaxed);
    // A large block makes room by handing back the large blocks freed longest ago: a cache full
    // of sizes an earlier model used would otherwise send every block of the next one back to
    // the system, to be faulted in again at its next step.
    if (ours && cache && capacity > kLargestClassBlock && capacity <= limit)
        while (cache->bytes + capacity > limit && !cache->large.empty()) {
            std::free(cache->large.front().data);
            cache->bytes -= cache->large.front().capacity;
            cache->large.erase(cache->large.begin());
        }
    if (ours && cache && cache->bytes + capacity <= limit) {
        bool kept = false;
        if (capacity <= kLargestClassBlock) {
            kept = keep_in(cache->free[size_class(capacity)], data);
        } else {
            try {
                cache->large.push_back({capacity, data});
                kept = true;
            } catch (...) {
            }
        }
        if (kept) {
            cache->bytes += capacity;
            return;
        }
    }
    std::free(data);
}

constinit thread_local detail::ObjectLists* detail::object_lists [[gnu::tls_model("initial-exec")]] = nullptr;

void* detail::allocate_small_object_slow(std::size_t size)
{
    if (LOOM_STORAGE_CACHE && !object_lists) this_thread_cache();  // makes the pool, on first use
    void* p = std::malloc(rounded_object_size(size));
    if (!p) throw std::bad_alloc();
    return p;
}

void detail::free_small_object_slow(void* p, std::size_t size) noexcept
{
    if (LOOM_STORAGE_CACHE && object_lists) {
        ObjectLists::List& list = object_lists->lists[object_class(size)];
        if (list.size == list.capacity && list.capacity < kObjectsPerClass) {
            const std::uint32_t grown = std::max<std::uint32_t>(64, 2 * list.capacity);
            if (auto* items = static_cast<void**>(std::realloc(list.items, grown * sizeof(void*)))) {
                list.items = items;
                list.capacity = grown;
            }
        }
        if (list.size < list.capacity) {
            list.items[list.size++] = p;
            return;
        }
    }
    std::free(p);
}

namespace {
// Sorts items by address, highest first (a list hands out its last item first), by LSD radix on
// each block's distance from the lowest in 16-byte units, as 32-bit keys: two passes of at most
// 12-bit digits for spans up to 256 MiB, where a comparison sort of W7's 38,000 headers took 3 ms
// (and sorting the pointers themselves, half again the instructions). The pointers are made again
// from the keys, so blocks must lie a multiple of 16 bytes apart (malloc's); a list that breaks
// that, or spans 64 GiB or more, is left as it is: the order is only what the cache prefers.
void sort_by_address_descending(void** items, std::size_t n, std::vector<std::uint32_t>& scratch)
{
    auto lowest = reinterpret_cast<std::uintptr_t>(items[0]), highest = lowest;
    std::uintptr_t off_grid = 0;  // the low bits of any block's distance from the first
    for (std::size_t i = 1; i < n; ++i) {
        const auto a = reinterpret_cast<std::uintptr_t>(items[i]);
        lowest = std::min(lowest, a);
        highest = std::max(highest, a);
        off_grid |= a - reinterpret_cast<std::uintptr_t>(items[0]);
    }
    const std::uintptr_t span = (highest - lowest) >> 4;
    if ((off_grid & 15) != 0 || span > UINT32_MAX) return;
    scratch.resize(2 * n);  // the keys and their sorted copy
    std::uint32_t* keys = scratch.data();
    std::uint32_t* sorted = keys + n;
    for (std::size_t i = 0; i < n; ++i)
        keys[i] = static_cast<std::uint32_t>((reinterpret_cast<std::uintptr_t>(items[i]) - lowest) >> 4);
    constexpr int kMostBits = 12;  // a digit's; span fits 32 bits, so three passes do
    const int bits = std::bit_width(span);
    const int passes = std::max(1, (bits + kMostBits - 1) / kMostBits);
    const int digit = (bits + passes - 1) / passes;
    const std::uint32_t mask = (std::uint32_t(1) << digit) - 1;
    std::uint32_t count[(std::size_t(1) << kMostBits) + 1];
    for (int pass = 0, shift = 0; pass < passes; ++pass, shift += digit) {
        std::fill(count, count + mask + 2, 0);
        for (std::size_t i = 0; i < n; ++i) ++count[((keys[i] >> shift) & mask) + 1];
        for (std::size_t b = 0; b <= mask; ++b) count[b + 1] += count[b];
        for (std::size_t i = 0; i < n; ++i) sorted[count[(keys[i] >> shift) & mask]++] = keys[i];
        std::swap(keys, sorted);
    }
    for (std::size_t i = 0; i < n; ++i)
        items[n - 1 - i] = reinterpret_cast<void*>(lowest + (std::uintptr_t(keys[i]) << 4));
}
}  // namespace

void order_small_objects() noexcept
{
    if (!detail::object_lists || !cache) return;
    try {
        for (auto& list : detail::object_lists->lists)
            if (list.size >= kOrderedListLength) sort_by_address_descending(list.items, list.size, cache->scratch);
    } catch (...) {  // no memory for the buffer: the lists stay as they are, as correct as before
    }
}

std::size_t storage_cache_limit() { return cache_limit.load(); }

std::size_t set_storage_cache_limit(std::size_t bytes) { return cache_limit.exchange(bytes); }

std::size_t cached_storage_bytes() { return cache ? cache->bytes : 0; }

void empty_storage_cache()
{
    if (cache) cache->clear();
}

bool storage_cache_enabled() { return LOOM_STORAGE_CACHE; }

}  // namespace loom
