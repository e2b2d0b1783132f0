/// \file
/// How a small tensor lies in memory: its header, storage record and bytes in one pooled block
/// (core/tensor.cpp makes and frees them), and new_contiguous_like, the elementwise kernels' way
/// to make their result, inline in each of them.
#pragma once
#include <cstddef>
#include <cstdint>
#include <new>

#include "allocator.hpp"
#include "dtype.hpp"
#include "tensor.hpp"

namespace loom::detail {

/// A small tensor's header with its storage record and its bytes, in one pooled block of the
/// size they need: one allocation per tensor instead of two, and a sweep that reads the header
/// finds the record and the numbers beside it rather than behind another pointer. A long tape
/// holds tens of thousands of them, and what a sweep walks is what they weigh: a tensor of 14
/// doubles takes 256 bytes (120 of header, 24 of record, 112 of numbers), which malloc places
/// 272 apart. `storage` points at `own` without a count (a count on its own block would keep the
/// block alive forever); shared_storage() gives a view a handle that holds the header instead.
struct TensorWithBytes final : TensorImpl {
    Storage own;
    TensorWithBytes(std::uint16_t owner, std::size_t nbytes) noexcept
        : TensorImpl(owner), own(nbytes, reinterpret_cast<std::byte*>(this + 1))
    {
        data = own.data;
        storage = std::shared_ptr<Storage>(std::shared_ptr<Storage>(), &own);
        count_inline_storage_bytes(nbytes);
    }
};
// The pool's blocks are 16-byte aligned (malloc's), and so are the bytes after the record: a
// vector loop over 8-byte-aligned bytes splits more of its loads across cache lines (W7's
// primal took 12% longer).
static_assert(sizeof(TensorImpl) == 120, "the owner's count and tag must fit in the header's padding");
static_assert(sizeof(TensorWithBytes) % 16 == 0, "the bytes after a small tensor's header must be 16-byte aligned");
/// The most bytes a tensor keeps in its header's block.
inline constexpr std::size_t kInlineStorageBytes = 256;
static_assert(sizeof(TensorWithBytes) + kInlineStorageBytes <= kLargestSmallObject,
              "a small tensor's block must come from the object pool");

/// TensorImpl::block: kHeaderAlone, or the size of a TensorWithBytes block in 8-byte units.
inline constexpr std::uint8_t kHeaderAlone = 0;
/// The size of a block in TensorImpl::block's units.
constexpr std::size_t block_size(std::uint8_t block) { return std::size_t(block) * 8; }
static_assert((sizeof(TensorWithBytes) + kInlineStorageBytes) / 8 <= UINT8_MAX);

/// A new header with room for `nbytes` (at most kInlineStorageBytes) in its own block, one
/// handle on it, its shape empty and its bytes uninitialised.
[[gnu::always_inline]] inline TensorHandle new_tensor_with_bytes(std::size_t nbytes)
{
    const auto units = static_cast<std::uint8_t>((sizeof(TensorWithBytes) + nbytes + 7) / 8);
    const std::uint16_t owner = tag_for_new_header();
    auto* impl = ::new (allocate_small_object(block_size(units))) TensorWithBytes(owner, nbytes);
    impl->block = units;
    return TensorHandle(impl);
}

/// empty_like_contiguous(like, dtype_of<R>()) where the caller knows like's element count, and
/// its first element's address in `data`: a small result is made here, inline, which spares each
/// elementwise op a call that counts the elements again and picks the element size from the dtype
/// (an add of 14 floats with no grad took 363 instructions, 321 with this and assign_to_new), and
/// the address is known without reading it back through the header.
template <class R> [[gnu::always_inline]] inline Tensor new_contiguous_like(const Tensor& like, std::int64_t numel, R*& data)
{
    static_assert(sizeof(R) == dtype_size(dtype_of<R>()), "R must be its dtype's element type");
    const std::size_t nbytes = static_cast<std::size_t>(numel) * sizeof(R);
    if (nbytes > kInlineStorageBytes) [[unlikely]] {
        Tensor t = empty_like_contiguous(like, dtype_of<R>());
        data = t.data_ptr<R>();
        return t;
    }
    // Found before the new header is written, whose stores may alias like's handle: after them,
    // the handle would be read and tested again.
    const Shape& shape = like.sizes();
    TensorHandle impl = new_tensor_with_bytes(nbytes);
    TensorImpl* header = impl.get();
    // The dtype before the shape: the shape's copy (char-typed) would keep this store apart from
    // the constructor's, which it replaces.
    header->dtype = dtype_of<R>();
    header->shape.assign_to_new(shape);  // row-major, as a new header is
    data = reinterpret_cast<R*>(static_cast<TensorWithBytes*>(header) + 1);
    return Tensor(std::move(impl));
}

/// new_contiguous_like without the address. The sweep calls it through a function of its own:
/// inlined into its large formula functions, it cost more than the call it saved.
template <class R> [[gnu::always_inline]] inline Tensor new_contiguous_like(const Tensor& like, std::int64_t numel)
{
    R* data;
    return new_contiguous_like(like, numel, data);
}

}  // namespace loom::detail
