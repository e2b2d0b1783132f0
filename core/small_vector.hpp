/// \file
/// A vector that keeps its first N elements inside itself: sizes, strides and a tape entry's few
/// inputs are made and dropped for every op, and a heap allocation for each would cost more than
/// the op on a small tensor. Past N it grows on the heap like std::vector.
#pragma once
#include <algorithm>
#include <compare>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <iterator>
#include <memory>
#include <limits>
#include <new>
#include <stdexcept>
#include <ranges>
#include <type_traits>
#include <utility>

namespace loom {

/// The vector behind Shape: std::vector's interface and meaning (size, push_back, insert,
/// erase, resize, iteration, comparison), its first N elements stored inline. It also converts
/// from any range of integers (std::vector, std::array, std::span), as libtorch's IntArrayRef.
template <class T, std::size_t N> class SmallVector {
public:
    /// \cond small_vector_members
    using value_type = T;
    using size_type = std::size_t;
    using difference_type = std::ptrdiff_t;
    using reference = T&;
    using const_reference = const T&;
    using pointer = T*;
    using const_pointer = const T*;
    using iterator = T*;
    using const_iterator = const T*;
    using reverse_iterator = std::reverse_iterator<iterator>;
    using const_reverse_iterator = std::reverse_iterator<const_iterator>;

    SmallVector() noexcept = default;
    explicit SmallVector(size_type n) { resize(n); }
    SmallVector(size_type n, const T& value) { assign(n, value); }
    SmallVector(std::initializer_list<T> values) { append(values.begin(), values.end()); }
    template <std::input_iterator It> SmallVector(It first, It last) { append(first, last); }
    /// A shape or a list of dims computed at run time, from a std::vector, std::array or std::span
    /// of integers, as libtorch's IntArrayRef takes them.
    template <class R>
        requires std::integral<T> && std::ranges::contiguous_range<const R> && std::ranges::sized_range<const R> &&
                 std::integral<std::ranges::range_value_t<const R>> && (!std::same_as<std::remove_cvref_t<R>, SmallVector>)
    SmallVector(const R& values)
    {
        append(std::ranges::begin(values), std::ranges::end(values));
    }
    SmallVector(const SmallVector& other) { *this = other; }
    SmallVector(SmallVector&& other) noexcept { take(other); }
    ~SmallVector()
    {
        clear();
        release_heap();
    }

    SmallVector& operator=(const SmallVector& other)
    {
        if (this == &other) return *this;
        if constexpr (std::is_trivially_copyable_v<T>) {
            // Shapes and strides are copied into every new tensor's header. Copying the whole
            // inline block, a size known when compiling, takes a few moves where a copy of the
            // bytes in use is a call to memcpy; both ends hold at least N elements' room.
            if constexpr (sizeof(inline_) <= 64)
                if (other.size_ <= N) {
                    std::memcpy(data_, other.data_, sizeof(inline_));
                    size_ = other.size_;
                    return *this;
                }
            if (other.size_ <= capacity_) {
                std::memcpy(data_, other.data_, other.size_ * sizeof(T));
                size_ = other.size_;
                return *this;
            }
        }
        clear();
        append(other.begin(), other.end());
        return *this;
    }
    /// *this = other where this vector is a new one (empty, its elements inline): always
    /// inlined, as the copy of a shape every new tensor's header makes (operator= may be a call).
    [[gnu::always_inline]] void assign_to_new(const SmallVector& other)
    {
        if constexpr (std::is_trivially_copyable_v<T> && sizeof(inline_) <= 64)
            if (other.size_ <= N) {
                std::memcpy(data_, other.data_, sizeof(inline_));
                size_ = other.size_;
                return;
            }
        *this = other;
    }
    SmallVector& operator=(SmallVector&& other) noexcept
    {
        if (this != &other) {
            clear();
            release_heap();
            take(other);
        }
        return *this;
    }
    SmallVector& operator=(std::initializer_list<T> values)
    {
        clear();
        append(values.begin(), values.end());
        return *this;
    }

    T* data() noexcept { return data_; }
    const T* data() const noexcept { return data_; }
    size_type size() const noexcept { return size_; }
    bool empty() const noexcept { return size_ == 0; }
    size_type capacity() const noexcept { return capacity_; }

    iterator begin() noexcept { return data_; }
    iterator end() noexcept { return data_ + size_; }
    const_iterator begin() const noexcept { return data_; }
    const_iterator end() const noexcept { return data_ + size_; }
    const_iterator cbegin() const noexcept { return data_; }
    const_iterator cend() const noexcept { return data_ + size_; }
    reverse_iterator rbegin() noexcept { return reverse_iterator(end()); }
    reverse_iterator rend() noexcept { return reverse_iterator(begin()); }
    const_reverse_iterator rbegin() const noexcept { return const_reverse_iterator(end()); }
    const_reverse_iterator rend() const noexcept { return const_reverse_iterator(begin()); }

    T& operator[](size_type i) noexcept { return data_[i]; }
    const T& operator[](size_type i) const noexcept { return data_[i]; }
    T& front() noexcept { return data_[0]; }
    const T& front() const noexcept { return data_[0]; }
    T& back() noexcept { return data_[size_ - 1]; }
    const T& back() const noexcept { return data_[size_ - 1]; }

    void reserve(size_type n)
    {
        if (n > capacity_) grow(n);
    }
    void clear() noexcept
    {
        std::destroy(begin(), end());
        size_ = 0;
    }
    void resize(size_type n)
    {
        reserve(n);
        if (n > size_) std::uninitialized_value_construct(end(), data_ + n);
        else std::destroy(data_ + n, end());
        size_ = static_cast<Count>(n);
    }
    void resize(size_type n, const T& value)
    {
        if (n <= size_) return resize(n);
        const T copy = value;  // `value` may live in this vector, which may move
        reserve(n);
        std::uninitialized_fill(end(), data_ + n, copy);
        size_ = static_cast<Count>(n);
    }
    void assign(size_type n, const T& value)
    {
        const T copy = value;
        clear();
        resize(n, copy);
    }

    /// Inlined: a tape entry appends its inputs and saved tensors with it, and as a call it
    /// cost more than the append.
    template <class... Args> [[gnu::always_inline]] T& emplace_back(Args&&... args)
    {
        if (size_ == capacity_) [[unlikely]]
            return grow_and_emplace(std::forward<Args>(args)...);
        ::new (static_cast<void*>(end())) T(std::forward<Args>(args)...);
        return data_[size_++];
    }
    void push_back(const T& value) { emplace_back(value); }
    void push_back(T&& value) { emplace_back(std::move(value)); }
    void pop_back() noexcept { std::destroy_at(data_ + --size_); }

    iterator insert(const_iterator pos, const T& value)
    {
        const auto at = pos - begin();
        emplace_back(value);
        std::rotate(begin() + at, end() - 1, end());
        return begin() + at;
    }
    template <std::input_iterator It> iterator insert(const_iterator pos, It first, It last)
    {
        const auto at = pos - begin();
        const auto old = static_cast<difference_type>(size_);
        append(first, last);
        std::rotate(begin() + at, begin() + old, end());
        return begin() + at;
    }
    iterator insert(const_iterator pos, std::initializer_list<T> values)
    {
        return insert(pos, values.begin(), values.end());
    }
    iterator erase(const_iterator pos) { return erase(pos, pos + 1); }
    iterator erase(const_iterator first, const_iterator last)
    {
        const auto at = first - begin(), n = last - first;
        std::move(begin() + at + n, end(), begin() + at);
        std::destroy(end() - n, end());
        size_ -= static_cast<Count>(n);
        return begin() + at;
    }

    [[gnu::always_inline]] friend bool operator==(const SmallVector& a, const SmallVector& b)
    {
        // Shapes are compared in every op, every recorded input and every sweep step, and have
        // few dims: up to four are compared straight, after one jump on the count. The loop this
        // replaced was only 3 instructions longer an add, but its exit branch cost the no-grad
        // add of bench_tape 12-16% of its time. std::equal would call memcmp.
        if (a.size() != b.size()) return false;
        const T* x = a.data_;
        const T* y = b.data_;
        switch (a.size()) {
        case 4: if (!(x[3] == y[3])) return false; [[fallthrough]];
        case 3: if (!(x[2] == y[2])) return false; [[fallthrough]];
        case 2: if (!(x[1] == y[1])) return false; [[fallthrough]];
        case 1: return x[0] == y[0];
        case 0: return true;
        default:
            for (size_type i = 0; i < a.size(); ++i)
                if (!(x[i] == y[i])) return false;
            return true;
        }
    }
    friend auto operator<=>(const SmallVector& a, const SmallVector& b)
    {
        return std::lexicographical_compare_three_way(a.begin(), a.end(), b.begin(), b.end());
    }

    /// \endcond
    /// Whether the elements lie in a heap block (past N), which the destructor frees.
    bool on_heap() const noexcept { return data_ != reinterpret_cast<const T*>(inline_); }

private:
    T* inline_data() noexcept { return std::launder(reinterpret_cast<T*>(inline_)); }

    template <class It> void append(It first, It last)
    {
        if constexpr (std::forward_iterator<It>) reserve(size_ + static_cast<size_type>(std::distance(first, last)));
        for (; first != last; ++first) emplace_back(*first);
    }
    template <class... Args> [[gnu::noinline]] T& grow_and_emplace(Args&&... args)
    {
        T value(std::forward<Args>(args)...);  // args may refer into this vector, which may move
        grow(size_type(capacity_) * 2);
        ::new (static_cast<void*>(end())) T(std::move(value));
        return data_[size_++];
    }
    void grow(size_type n)
    {
        n = std::max<size_type>(n, size_type(capacity_) * 2);
        if (n > std::numeric_limits<Count>::max()) throw std::length_error("SmallVector: more than 2^32 - 1 elements");
        T* fresh = static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(alignof(T))));
        std::uninitialized_move(begin(), end(), fresh);
        std::destroy(begin(), end());
        release_heap();
        data_ = fresh;
        capacity_ = static_cast<Count>(n);
    }
    void release_heap() noexcept
    {
        if (on_heap()) ::operator delete(data_, std::align_val_t(alignof(T)));
        data_ = inline_data();
        capacity_ = N;
    }
    void take(SmallVector& other) noexcept
    {
        if (other.on_heap()) {
            data_ = other.data_;
            capacity_ = other.capacity_;
            size_ = other.size_;
            other.data_ = other.inline_data();
            other.capacity_ = N;
            other.size_ = 0;
            return;
        }
        std::uninitialized_move(other.begin(), other.end(), data_);
        size_ = other.size_;
        other.clear();
    }

    alignas(T) std::byte inline_[N * sizeof(T)];
    // 32-bit counts: a shape is then 48 bytes, not 56, and every tensor header and tape entry holds several.
    using Count = std::uint32_t;
    T* data_ = inline_data();
    Count size_ = 0;
    Count capacity_ = N;
};

}  // namespace loom
