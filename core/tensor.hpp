// Tensor: a cheap handle on shared storage with a shape, strides, offset and dtype.
// Views (reshape of contiguous data, permute, slicing, expand) share storage.
// The differentiable methods (sum, tanh, ...) are defined by autograd/, which records them on the tape.
#pragma once
#include <cstdint>
#include <functional>
#include <iosfwd>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "dtype.hpp"
#include "small_vector.hpp"
#include "error.hpp"

// core/ is namespace loom itself: the tensor is the library's base type.
namespace loom {

// Sizes or strides of a tensor; up to 6 dims without a heap allocation.
using Shape = SmallVector<std::int64_t, 6>;

class Tensor;
// Tensors by name: state dicts, optimizer state, safetensors files.
using NamedTensorMap = std::map<std::string, Tensor>;

class Tensor;
class Generator;
namespace autograd {
struct Node;
}

// Raw bytes shared by a tensor and its views. `version` counts in-place writes,
// so the tape can tell when a tensor saved for backward was modified.
struct Storage {
    explicit Storage(std::size_t nbytes);
    ~Storage();
    Storage(const Storage&) = delete;
    Storage& operator=(const Storage&) = delete;

    std::byte* data = nullptr;
    std::size_t nbytes = 0;
    std::size_t capacity = 0;  // of the block behind `data` (core/allocator.hpp)
    std::uint64_t version = 0;
};

struct TensorImpl {
    std::shared_ptr<Storage> storage;
    Shape shape;
    Shape strides;  // in elements
    std::int64_t offset = 0;  // in elements
    DType dtype = kFloat32;
    std::shared_ptr<autograd::Node> node;  // set iff the tensor requires grad
};

class Tensor {
public:
    Tensor() = default;
    explicit Tensor(std::shared_ptr<TensorImpl> impl) : impl_(std::move(impl)) {}

    // ---- metadata ----
    bool defined() const { return impl_ != nullptr; }
    DType dtype() const { return impl().dtype; }
    const Shape& sizes() const { return impl().shape; }
    const Shape& shape() const { return impl().shape; }
    const Shape& strides() const { return impl().strides; }
    std::int64_t size(std::int64_t dim) const;
    std::int64_t stride(std::int64_t dim) const;
    std::int64_t dim() const { return static_cast<std::int64_t>(impl().shape.size()); }
    std::int64_t numel() const;
    std::int64_t storage_offset() const { return impl().offset; }
    bool is_contiguous() const;
    bool is_same(const Tensor& other) const { return impl_ == other.impl_; }
    bool shares_storage(const Tensor& other) const;
    std::uint64_t version() const { return impl().storage->version; }
    TensorImpl& impl() const
    {
        if (!impl_) [[unlikely]]
            throw_undefined();
        return *impl_;
    }
    const std::shared_ptr<TensorImpl>& impl_ptr() const { return impl_; }

    // Pointer to the first element; T must match the dtype.
    template <class T> T* data_ptr() const
    {
        LOOM_CHECK(dtype_of<T>() == dtype(), "data_ptr", "tensor has dtype {}, asked for {}", dtype(),
                   dtype_of<T>());
        return reinterpret_cast<T*>(impl().storage->data) + impl().offset;
    }
    // The single value of a one-element tensor, converted to T.
    template <class T> T item() const;

    // ---- autograd ----
    bool requires_grad() const { return defined() && impl().node != nullptr; }
    Tensor& requires_grad_(bool on = true);
    bool is_leaf() const;
    Tensor grad() const;
    void set_grad(const Tensor& grad) const;
    // Forgets the accumulated gradient (grad() is undefined until the next backward), like
    // PyTorch's zero_grad(set_to_none=True): the next backward writes a fresh tensor.
    void zero_grad() const;
    void retain_grad() const;
    // Calls hook(grad) when this tensor's gradient is computed; a defined result replaces it.
    void register_hook(std::function<Tensor(const Tensor&)> hook) const;
    // Sweeps the tape back from this tensor. A non-scalar needs `gradient` of its shape. As
    // libtorch's: retain_graph keeps the graph for another sweep, by default exactly when
    // create_graph records the backward pass (so .grad() can be differentiated again).
    void backward(const Tensor& gradient = {}, std::optional<bool> retain_graph = std::nullopt,
                  bool create_graph = false) const;
    // Same values, cut off the tape.
    Tensor detach() const;

    // ---- views and copies (differentiable) ----
    Tensor reshape(const Shape& shape) const;
    Tensor view(const Shape& shape) const;  // contiguous tensors only
    Tensor flatten() const { return reshape({-1}); }
    Tensor permute(const Shape& dims) const;
    Tensor transpose(std::int64_t dim0, std::int64_t dim1) const;
    Tensor t() const;  // 2-D transpose
    Tensor squeeze() const;
    Tensor squeeze(std::int64_t dim) const;
    Tensor unsqueeze(std::int64_t dim) const;
    Tensor expand(const Shape& shape) const;
    Tensor narrow(std::int64_t dim, std::int64_t start, std::int64_t length) const;
    Tensor slice(std::int64_t dim, std::int64_t start, std::int64_t end, std::int64_t step = 1) const;
    Tensor select(std::int64_t dim, std::int64_t index) const;
    Tensor index_select(std::int64_t dim, const Tensor& index) const;
    Tensor gather(std::int64_t dim, const Tensor& index) const;
    Tensor contiguous() const;
    Tensor clone() const;
    Tensor to(DType dtype) const;
    std::vector<Tensor> split(std::int64_t split_size, std::int64_t dim = 0) const;
    std::vector<Tensor> chunk(std::int64_t chunks, std::int64_t dim = 0) const;

    // ---- math (differentiable) ----
    Tensor exp() const;
    Tensor log() const;
    Tensor sqrt() const;
    Tensor abs() const;
    Tensor tanh() const;
    Tensor sigmoid() const;
    Tensor relu() const;
    Tensor neg() const;
    Tensor pow(double exponent) const;
    Tensor pow(const Tensor& exponent) const;
    Tensor clamp(std::optional<double> min, std::optional<double> max) const;
    Tensor matmul(const Tensor& other) const;
    Tensor masked_fill(const Tensor& mask, double value) const;

    // ---- reductions (differentiable but argmax/argmin) ----
    Tensor sum() const;
    Tensor sum(const Shape& dims, bool keepdim = false) const;
    Tensor mean() const;
    Tensor mean(const Shape& dims, bool keepdim = false) const;
    Tensor max() const;
    Tensor max(std::int64_t dim, bool keepdim = false) const;
    Tensor min() const;
    Tensor min(std::int64_t dim, bool keepdim = false) const;
    Tensor argmax() const;
    Tensor argmax(std::int64_t dim, bool keepdim = false) const;
    Tensor argmin() const;
    Tensor argmin(std::int64_t dim, bool keepdim = false) const;
    Tensor var() const;  // unbiased, over all elements
    Tensor var(const Shape& dims, bool unbiased = true, bool keepdim = false) const;
    Tensor norm(double p = 2) const;
    Tensor norm(double p, const Shape& dims, bool keepdim = false) const;
    Tensor softmax(std::int64_t dim) const;
    Tensor log_softmax(std::int64_t dim) const;

    // ---- comparisons (masks of dtype bool, not differentiable) ----
    Tensor eq(const Tensor& other) const;
    Tensor ne(const Tensor& other) const;
    Tensor lt(const Tensor& other) const;
    Tensor le(const Tensor& other) const;
    Tensor gt(const Tensor& other) const;
    Tensor ge(const Tensor& other) const;

    // ---- in place (not recorded: refused on a tensor that requires grad while grad mode is on) ----
    Tensor& zero_();
    Tensor& fill_(double value);
    Tensor& copy_(const Tensor& src);
    Tensor& add_(const Tensor& other, double alpha = 1.0);
    Tensor& mul_(double factor);
    Tensor& mul_(const Tensor& other);
    Tensor& masked_fill_(const Tensor& mask, double value);
    Tensor& uniform_(double low, double high, Generator* gen = nullptr);
    Tensor& normal_(double mean, double std, Generator* gen = nullptr);

    std::string to_string() const;

private:
    [[noreturn]] static void throw_undefined();
    std::shared_ptr<TensorImpl> impl_;
};

std::ostream& operator<<(std::ostream& out, const Tensor& t);

// ---- creation ----
Tensor empty(const Shape& shape, DType dtype = kFloat32);
Tensor zeros(const Shape& shape, DType dtype = kFloat32);
Tensor ones(const Shape& shape, DType dtype = kFloat32);
Tensor full(const Shape& shape, double value, DType dtype = kFloat32);
Tensor zeros_like(const Tensor& t);
Tensor ones_like(const Tensor& t);
Tensor full_like(const Tensor& t, double value);
Tensor scalar_tensor(double value, DType dtype = kFloat32);  // 0-d
// Values in row-major order; shape defaults to 1-D.
Tensor tensor(const std::vector<double>& values, const Shape& shape, DType dtype = kFloat32);
Tensor tensor(const std::vector<double>& values, DType dtype = kFloat32);
template <class T> Tensor from_vector(const std::vector<T>& values, const Shape& shape);
Tensor arange(double end, DType dtype = kFloat32);
Tensor arange(double start, double end, double step = 1, DType dtype = kFloat32);
Tensor eye(std::int64_t n, DType dtype = kFloat32);
Tensor rand(const Shape& shape, DType dtype = kFloat32, Generator* gen = nullptr);
Tensor randn(const Shape& shape, DType dtype = kFloat32, Generator* gen = nullptr);
Tensor uniform(const Shape& shape, double low, double high, DType dtype = kFloat32, Generator* gen = nullptr);
Tensor normal(const Shape& shape, double mean, double std, DType dtype = kFloat32, Generator* gen = nullptr);
Tensor randint(std::int64_t low, std::int64_t high, const Shape& shape, Generator* gen = nullptr);

// ---- shape helpers ----
// The number of elements; throws naming `op` for a negative size or a count beyond int64.
std::int64_t checked_numel(std::string_view op, const Shape& shape);
std::int64_t numel_of(const Shape& shape);
// Throws naming `op` when `value` cannot be held exactly by `dtype` (a fraction in an int64
// tensor, 2 in a bool): loom never truncates a scalar silently.
void check_scalar_fits(std::string_view op, double value, DType dtype);
Shape contiguous_strides(const Shape& shape);
// NumPy broadcasting; throws naming `op` when the shapes do not broadcast.
Shape broadcast_shapes(std::string_view op, const Shape& a, const Shape& b);
// Wraps a possibly negative dim into [0, ndim), naming `op` when out of range.
std::int64_t wrap_dim(std::string_view op, std::int64_t dim, std::int64_t ndim);
// The same for an op that indexes along the dim, which a 0-d tensor does not have.
std::int64_t wrap_indexed_dim(std::string_view op, std::int64_t dim, std::int64_t ndim);

// Sets the number of threads OpenBLAS uses for matmul.
void set_num_threads(int threads);

}  // namespace loom

template <> struct fmt::formatter<loom::Tensor> : fmt::formatter<std::string_view> {
    auto format(const loom::Tensor& t, fmt::format_context& ctx) const
    {
        return fmt::formatter<std::string_view>::format(t.to_string(), ctx);
    }
};
