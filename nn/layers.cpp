#include "layers.hpp"

#include <cmath>

#include "init.hpp"

namespace loom::nn {

Dense::Dense(std::int64_t in, std::int64_t out, bool with_bias, DType dtype) : in_features(in), out_features(out)
{
    LOOM_CHECK(in > 0 && out > 0, "Dense", "expects positive sizes, got in={} out={}", in, out);
    const double bound = 1 / std::sqrt(double(in));
    weight = register_parameter("weight", uniform({out, in}, -bound, bound, dtype));
    if (with_bias) bias = register_parameter("bias", uniform({out}, -bound, bound, dtype));
}

Dense::Dense(const Tensor& shared_weight, bool with_bias)
{
    LOOM_CHECK(shared_weight.defined() && shared_weight.dim() == 2 && is_floating(shared_weight.dtype()) &&
                   shared_weight.is_leaf(),
               "Dense", "a shared weight must be a float [out, in] leaf tensor (a parameter), got {}",
               shared_weight.defined() ? fmt::format("shape {} and dtype {}", shared_weight.sizes(), shared_weight.dtype())
                                       : std::string("an undefined tensor"));
    out_features = shared_weight.size(0);
    in_features = shared_weight.size(1);
    LOOM_CHECK(in_features > 0 && out_features > 0, "Dense", "expects positive sizes, got in={} out={}", in_features,
               out_features);
    weight = register_parameter("weight", shared_weight);
    const double bound = 1 / std::sqrt(double(in_features));
    if (with_bias) bias = register_parameter("bias", uniform({out_features}, -bound, bound, shared_weight.dtype()));
}

Tensor Dense::forward(const Tensor& x)
{
    LOOM_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "Dense",
               "expects input [..., {}], got shape {} (last dim is the feature size)", in_features, x.sizes());
    return linear(x, weight, bias);
}

Embedding::Embedding(std::int64_t n, std::int64_t d, std::optional<std::int64_t> padding, DType dtype)
    : num_embeddings(n), dim(d), padding_idx(padding)
{
    LOOM_CHECK(n > 0 && d > 0, "Embedding", "expects positive sizes, got num_embeddings={} dim={}", n, d);
    if (padding_idx) {
        LOOM_CHECK(*padding_idx >= -n && *padding_idx < n, "Embedding", "padding_idx {} is outside [{}, {})",
                   *padding_idx, -n, n);
        if (*padding_idx < 0) *padding_idx += n;
    }
    Tensor w = randn({n, d}, dtype);
    if (padding_idx) w.select(0, *padding_idx).zero_();
    weight = register_parameter("weight", w);
}

Tensor Embedding::forward(const Tensor& indices)
{
    LOOM_CHECK(indices.dtype() == kInt64, "Embedding", "expects int64 indices, got {}", indices.dtype());
    const Tensor flat = indices.reshape({-1}).contiguous();
    const std::int64_t* p = flat.data_ptr<std::int64_t>();
    for (std::int64_t i = 0; i < flat.numel(); ++i)
        LOOM_CHECK(p[i] >= 0 && p[i] < num_embeddings, "Embedding", "index {} is outside [0, {})", p[i],
                   num_embeddings);
    Tensor rows = weight.index_select(0, flat);
    if (padding_idx) {
        // Same values, but the padding rows pass no gradient back to the table.
        const Tensor used = flat.ne(scalar_tensor(double(*padding_idx), kInt64)).unsqueeze(1);
        rows = where(used, rows, rows.detach());
    }
    Shape shape = indices.sizes();
    shape.push_back(dim);
    return rows.reshape(shape);
}

Dropout::Dropout(double p_, Generator* gen) : p(p_), gen_(gen)
{
    LOOM_CHECK(p >= 0 && p < 1, "Dropout", "expects 0 <= p < 1, got {}", p);
}

Tensor Dropout::forward(const Tensor& x)
{
    if (!is_training() || p == 0) return x;
    const Tensor keep = lt(rand(x.sizes(), x.dtype(), gen_), scalar_tensor(1 - p, x.dtype()));
    return x * (keep.to(x.dtype()) * (1 / (1 - p)));
}

LayerNorm::LayerNorm(Shape shape, double eps_, bool affine, DType dtype) : normalized_shape(std::move(shape)), eps(eps_)
{
    LOOM_CHECK(!normalized_shape.empty(), "LayerNorm", "expects a non-empty normalized_shape");
    if (affine) {
        weight = register_parameter("weight", ones(normalized_shape, dtype));
        bias = register_parameter("bias", zeros(normalized_shape, dtype));
    }
}

Tensor LayerNorm::forward(const Tensor& x)
{
    const auto n = static_cast<std::int64_t>(normalized_shape.size());
    LOOM_CHECK(x.dim() >= n && Shape(x.sizes().end() - n, x.sizes().end()) == normalized_shape, "LayerNorm",
               "expects input [..., {}], got shape {}", fmt::join(normalized_shape, ", "), x.sizes());
    Shape dims;
    for (std::int64_t i = 0; i < n; ++i) dims.push_back(-1 - i);
    const Tensor centered = x - x.mean(dims, true);
    const Tensor y = centered / sqrt((centered * centered).mean(dims, true) + eps);
    return weight.defined() ? y * weight + bias : y;
}

Sequential::Sequential(std::initializer_list<std::shared_ptr<Layer>> layers)
{
    for (auto& layer : layers) push_back(layer);
}

void Sequential::push_back(std::shared_ptr<Layer> layer)
{
    LOOM_CHECK(layer != nullptr, "Sequential", "cannot add a null layer");
    layers_.push_back(register_module(std::to_string(layers_.size()), std::move(layer)));
}

Tensor Sequential::forward(const Tensor& x)
{
    Tensor y = x;
    for (auto& layer : layers_) y = (*layer)(y);  // through each layer's hooks
    return y;
}

}  // namespace loom::nn
