// The pieces that make small ops cheap: SmallVector (sizes, strides, a tape entry's lists) and
// the per-thread cache of storage blocks.
#include <doctest/doctest.h>

#include <loom/loom.hpp>

#include <algorithm>
#include <memory>
#include <string>
#include <thread>
#include <vector>

using namespace loom;

TEST_CASE("SmallVector behaves as a vector inside and past its inline capacity")
{
    SmallVector<std::int64_t, 2> v{1, 2};
    CHECK(v.size() == 2);
    v.push_back(3);  // moves to the heap
    v.push_back(v[0]);  // an element of itself, while growing
    CHECK(v == SmallVector<std::int64_t, 2>{1, 2, 3, 1});
    v.insert(v.begin() + 1, 9);
    v.insert(v.end(), {7, 8});
    CHECK(v == SmallVector<std::int64_t, 2>{1, 9, 2, 3, 1, 7, 8});
    v.erase(v.begin(), v.begin() + 2);
    CHECK(v == SmallVector<std::int64_t, 2>{2, 3, 1, 7, 8});
    SmallVector<std::int64_t, 2> moved = std::move(v);
    CHECK(moved.size() == 5);
    CHECK(v.empty());
    v = moved;
    CHECK(v == moved);
    v.resize(1);
    v.resize(3, 5);
    CHECK(v == SmallVector<std::int64_t, 2>{2, 5, 5});
    CHECK(SmallVector<std::int64_t, 2>{1, 2} < SmallVector<std::int64_t, 2>{1, 3});
}

TEST_CASE("SmallVector owns non-trivial elements: copies, moves and destroys each once")
{
    SmallVector<std::string, 1> a;
    for (int i = 0; i < 5; ++i) a.emplace_back(std::string(40, char('a' + i)));  // long: heap strings
    SmallVector<std::string, 1> b = a;
    a.erase(a.begin() + 1);
    CHECK(a.size() == 4);
    CHECK(a[1] == std::string(40, 'c'));
    CHECK(b[1] == std::string(40, 'b'));
    SmallVector<std::string, 1> inline_one{"x"};
    SmallVector<std::string, 1> taken = std::move(inline_one);  // moved element by element
    CHECK(taken[0] == "x");
    b = std::move(taken);
    CHECK(b.size() == 1);
}

TEST_CASE("a freed storage block is reused for the next tensor of its size class, and zeros() still zeroes it")
{
    empty_storage_cache();
    const void* first = nullptr;
    {
        Tensor small = full({14}, 7.0, kFloat64);  // 112 bytes: kept inside its storage record
    }
    CHECK(cached_storage_bytes() == 0);
    {
        Tensor t = full({40}, 7.0, kFloat64);
        first = t.data_ptr<double>();
    }
    if (storage_cache_enabled()) {
        CHECK(cached_storage_bytes() == 512);  // 320 bytes round up to the 512-byte class
        const Tensor again = zeros({64}, kFloat64);  // 512 bytes: the same class
        CHECK(static_cast<const void*>(again.data_ptr<double>()) == first);
        CHECK(cached_storage_bytes() == 0);
        CHECK(again.sum().item<double>() == 0.0);
    }
    if (storage_cache_enabled()) {
        const std::size_t before = cached_storage_bytes();
        {
            Tensor large = empty({(3 << 20) / 4}, kFloat32);  // 3 MiB: kept by exact size
        }
        CHECK(cached_storage_bytes() == before + (3 << 20));
        {
            Tensor again = empty({((3 << 20) - 4096) / 4}, kFloat32);  // rounds up to the same 3 MiB block
        }
        CHECK(cached_storage_bytes() == before + (3 << 20));
        {
            Tensor huge = empty({std::int64_t(kLargestCachedBlock / 4 + 1)}, kFloat32);  // past the largest cached
        }
        CHECK(cached_storage_bytes() == before + (3 << 20));
    }
    CHECK(cached_storage_bytes() <= storage_cache_limit());
    if (storage_cache_enabled()) {
        // Under a lower limit the cache keeps what fits, handing back the blocks freed longest ago.
        empty_storage_cache();
        const std::size_t previous = set_storage_cache_limit(std::size_t(5) << 20);
        CHECK(previous == kDefaultCacheLimit);
        CHECK(storage_cache_limit() == std::size_t(5) << 20);
        {
            Tensor first = empty({(3 << 20) / 4}, kFloat32), second = empty({(3 << 20) / 4}, kFloat32);
        }
        CHECK(cached_storage_bytes() == std::size_t(3) << 20);  // both would make 6 MiB
        {
            Tensor other = empty({(4 << 20) / 4}, kFloat32);  // 4 MiB: the 3 MiB block freed before makes room
        }
        CHECK(cached_storage_bytes() == std::size_t(4) << 20);
        empty_storage_cache();
        set_storage_cache_limit(previous);
        {
            Tensor first = empty({(3 << 20) / 4}, kFloat32), second = empty({(3 << 20) / 4}, kFloat32);
        }
        CHECK(cached_storage_bytes() == std::size_t(6) << 20);
    }
    { Tensor t = ones({3}); }
    empty_storage_cache();
    CHECK(cached_storage_bytes() == 0);
}

TEST_CASE("a tensor made on one thread can be freed on another")
{
    Tensor t = ones({100});
    std::thread([moved = std::move(t)]() mutable { moved = Tensor(); }).join();
    std::thread([] {
        const Tensor u = ones({100});
        CHECK(u.sum().item<double>() == 100.0);
    }).join();  // this thread's cache is released when it ends
    CHECK(ones({100}).sum().item<double>() == 100.0);
}

TEST_CASE("a tensor's handles count past its thread's 255 and back, and those of another thread with them")
{
    Tensor t = ones({1000}, kFloat64);
    const std::weak_ptr<Storage> bytes = t.impl().storage;  // held by t's header alone
    std::vector<Tensor> copies(300, t);  // 255 counted by this thread, the rest in the shared word
    CHECK(t.impl_ptr().use_count() == 301);
    long seen_there = 0;
    std::thread([&] {
        const std::vector<Tensor> more(copies.begin(), copies.begin() + 10);
        seen_there = more[0].impl_ptr().use_count();
    }).join();
    CHECK(seen_there == 311);
    CHECK(t.impl_ptr().use_count() == 301);
    copies.clear();  // this thread's count reaches its last and takes back what it moved to the shared word
    CHECK(t.impl_ptr().use_count() == 1);
    // Still this thread's to count without atomic writes: a weight that a long tape saves
    // thousands of times stays so through every reset.
    CHECK(t.impl().owner.load() == detail::thread_tag);
    copies.assign(1000, t);
    CHECK(t.impl_ptr().use_count() == 1001);
    copies.resize(3);
    CHECK(t.impl_ptr().use_count() == 4);
    copies.clear();
    CHECK(t.impl().owner.load() == detail::thread_tag);
    CHECK(t.impl_ptr().use_count() == 1);
    CHECK(t.sum().item<double>() == 1000.0);
    t = Tensor();
    CHECK(bytes.expired());
}

TEST_CASE("a SmallVector copy that fits inline copies the whole inline block, from inline or heap storage alike")
{
    SmallVector<std::int64_t, 6> heap{1, 2, 3, 4, 5, 6, 7};  // on the heap
    heap.resize(3);  // still on the heap, now within the inline capacity
    const SmallVector<std::int64_t, 6> copied(heap);
    CHECK(copied == SmallVector<std::int64_t, 6>{1, 2, 3});
    SmallVector<std::int64_t, 6> onto{9, 9, 9, 9, 9, 9, 9, 9};  // a heap destination
    onto = heap;
    CHECK(onto == SmallVector<std::int64_t, 6>{1, 2, 3});
    onto[0] = 42;  // the copies are independent
    CHECK(heap[0] == 1);
    CHECK(copied[0] == 1);
    SmallVector<std::int64_t, 6> inline_copy;
    inline_copy = copied;
    CHECK(inline_copy == copied);
    const SmallVector<std::int64_t, 6> empty_source{};
    inline_copy = empty_source;
    CHECK(inline_copy.empty());
}

TEST_CASE("order_small_objects hands a long free list out lowest address first, losing and repeating no block")
{
    // 496 bytes: a size class nothing else in this test uses, so the list holds these blocks alone.
    constexpr std::size_t kSize = 496, kCount = 5000;
    std::vector<void*> blocks;
    for (std::size_t i = 0; i < kCount; ++i) blocks.push_back(allocate_small_object(kSize));
    std::vector<void*> shuffled = blocks;
    for (std::size_t i = kCount - 1; i > 0; --i) std::swap(shuffled[i], shuffled[(i * 7919) % (i + 1)]);
    for (void* p : shuffled) free_small_object(p, kSize);
    order_small_objects();
    std::vector<void*> again;
    for (std::size_t i = 0; i < kCount; ++i) again.push_back(allocate_small_object(kSize));
    if (storage_cache_enabled()) {
        CHECK(std::is_sorted(again.begin(), again.end()));
        std::sort(blocks.begin(), blocks.end());
        CHECK(again == blocks);
    }
    for (void* p : again) free_small_object(p, kSize);
    order_small_objects();  // harmless when called again, or with nothing to order
}

TEST_CASE("order_small_objects leaves a list as it is where one block is not 16 bytes from the others")
{
    // The sort rebuilds each address from its distance to the lowest in 16-byte units; a block
    // 8 bytes off that grid must not be moved onto it. (A size class of its own again: 480 bytes.)
    if (!storage_cache_enabled()) return;  // no list: each block goes back to malloc as it is freed
    constexpr std::size_t kSize = 480, kCount = 5000;
    std::vector<void*> blocks;
    for (std::size_t i = 0; i < kCount; ++i) blocks.push_back(allocate_small_object(kSize));
    void* off_grid = static_cast<char*>(blocks.back()) + 8;  // inside a block of ours, never dereferenced
    std::vector<void*> listed(blocks.begin(), blocks.end() - 1);
    listed.insert(listed.begin() + kCount / 2, off_grid);
    for (std::size_t i = listed.size() - 1; i > 0; --i) std::swap(listed[i], listed[(i * 7919) % (i + 1)]);
    for (void* p : listed) free_small_object(p, kSize);
    order_small_objects();
    std::vector<void*> again;
    for (std::size_t i = 0; i < listed.size(); ++i) again.push_back(allocate_small_object(kSize));
    std::reverse(again.begin(), again.end());
    CHECK(again == listed);  // handed back in the order freed: last freed first
    for (void* p : again)
        if (p != off_grid) free_small_object(p, kSize);
    free_small_object(blocks.back(), kSize);
}

TEST_CASE("a small tensor's header and bytes are one block: a view holds the header, and sharing a tensor's own bytes back with it holds nothing")
{
    const Tensor big = zeros({1000});
    CHECK(big.impl().storage.use_count() == 1);  // a storage record of its own
    Tensor view, view_of_view;
    {
        const Tensor small = arange(0, 8, 1, kFloat64);
        CHECK(small.impl().storage.use_count() == 0);  // its bytes lie in its header's block
        const std::shared_ptr<Storage> shared = shared_storage(small);
        CHECK(shared.get() == small.impl().storage.get());
        CHECK(small.impl_ptr().use_count() == 2);  // the handle on the bytes holds the header
        view = small.narrow(0, 2, 4);
        view_of_view = view.narrow(0, 1, 2);  // shares the view's handle on the bytes
        CHECK(small.impl_ptr().use_count() == 3);
    }
    // Written through one view after the tensor is gone, seen through the other.
    view.data_ptr<double>()[1] = 30.0;
    CHECK(view_of_view.data_ptr<double>()[0] == 30.0);
    CHECK(view.sum().item<double>() == 2 + 30 + 4 + 5);
    CHECK(view.shares_storage(view_of_view));

    // A tensor given its own bytes back (through a view of itself) does not hold its own header.
    const Tensor t = arange(0, 4, 1, kFloat64);
    detail::share_storage(t, t.narrow(0, 1, 2));
    CHECK(t.impl_ptr().use_count() == 1);
    CHECK(t.impl().storage.use_count() == 0);
    CHECK(t.sum().item<double>() == 6.0);
    // Another small tensor's bytes: t now holds that tensor's header, which outlives it.
    {
        const Tensor other = full({4}, 2.0, kFloat64);
        detail::share_storage(t, other);
        CHECK(other.impl_ptr().use_count() == 2);
    }
    CHECK(t.sum().item<double>() == 8.0);
}

TEST_CASE("a weak handle gives a tensor back while it is alive, and nothing after")
{
    detail::WeakTensor weak;
    {
        const Tensor t = arange(0, 4, 1, kFloat64);
        weak = detail::WeakTensor(t);
        const detail::WeakTensor copy = weak;
        CHECK(weak.lock().is_same(t));
        CHECK(copy.lock().is_same(t));
        CHECK(t.impl_ptr().use_count() == 1);  // lock()'s handles are gone again
    }
    CHECK(!weak.lock().defined());
    CHECK(!detail::WeakTensor().lock().defined());
}

TEST_CASE("a leaf's first gradient becomes .grad() without a copy when nothing else holds its bytes, in its own block or not")
{
    for (std::int64_t n : {3, 100}) {  // 3 doubles lie in the header's block, 100 do not
        CAPTURE(n);
        CHECK(detail::bytes_in_own_block(zeros({n}, kFloat64)) == (n == 3));
        const Tensor w = zeros({n}, kFloat64).requires_grad_();
        // A backward that returns a fresh gradient it keeps nothing of, and remembers its bytes.
        const void* returned = nullptr;
        const auto fresh = [&returned](const autograd::BackwardContext& c) {
            Tensor g = ones(c.input_shape(0), kFloat64);
            returned = g.data_ptr<double>();
            return autograd::GradList{std::move(g)};
        };
        autograd::record("fresh", {w}, zeros({n}, kFloat64), {}, fresh).sum().backward();
        CHECK(w.grad().data_ptr<double>() == returned);
        // One whose bytes a view still holds is copied: .grad() must not change under it.
        w.zero_grad();
        Tensor kept;
        const auto shared = [&kept](const autograd::BackwardContext& c) {
            const Tensor g = ones(c.input_shape(0), kFloat64);
            kept = g.view({c.input_shape(0)});
            return autograd::GradList{g};
        };
        autograd::record("shared", {w}, zeros({n}, kFloat64), {}, shared).sum().backward();
        REQUIRE(kept.defined());
        CHECK(w.grad().data_ptr<double>() != kept.data_ptr<double>());
        kept.fill_(5.0);
        CHECK(w.grad().sum().item<double>() == double(n));
        // And one that is a whole view of a tensor still held: the view alone holds its bytes'
        // record, but the tensor behind it shares them. Neither .grad() nor a sum the sweep adds
        // into in place may be those bytes.
        w.zero_grad();
        const Tensor source = ones({n}, kFloat64);
        const auto view_of_held = [&source](const autograd::BackwardContext&) {
            return autograd::GradList{source.view({source.numel()})};
        };
        autograd::record("view_of_held", {w}, zeros({n}, kFloat64), {}, view_of_held).sum().backward();
        CHECK(w.grad().data_ptr<double>() != source.data_ptr<double>());
        w.zero_grad();
        const Tensor y = w * 1.0;
        const Tensor second = autograd::record("view_of_held", {y}, zeros({n}, kFloat64), {}, view_of_held);
        const Tensor first = autograd::record("fresh", {y}, zeros({n}, kFloat64), {}, fresh);  // swept first
        (first.sum() + second.sum()).backward();
        CHECK(source.sum().item<double>() == double(n));
        CHECK(w.grad().sum().item<double>() == 2.0 * double(n));
    }
}
