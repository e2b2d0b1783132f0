/// \file
/// Feed-forward layers: Dense, Embedding, Dropout, LayerNorm, activations, Sequential.
#pragma once
#include <initializer_list>

#include "../core/random.hpp"
#include "module.hpp"

namespace loom::nn {

/// y = x W^T + b, like PyTorch's Linear. weight [out, in], bias [out];
/// both U(-1/sqrt(in), 1/sqrt(in)), PyTorch's default.
class Dense : public Layer {
public:
    /// y = x W^T + b for x of [..., in_features]; PyTorch's parameter names and initialisation.
    Dense(std::int64_t in_features, std::int64_t out_features, bool bias = true, DType dtype = kFloat32);
    /// A layer whose weight [out, in] is a tensor registered elsewhere too (weight tying: a
    /// language model's output layer sharing its embedding's table, Press & Wolf 2017); the
    /// bias, if any, is its own.
    explicit Dense(const Tensor& shared_weight, bool bias = true);
    Tensor forward(const Tensor& x) override;  ///< x [..., in] -> [..., out]
    Tensor weight;  ///< [out_features, in_features]
    Tensor bias;    ///< [out_features]; undefined without bias
    std::int64_t in_features;   ///< input width
    std::int64_t out_features;  ///< output width
};

/// Rows of a [num_embeddings, dim] table, N(0, 1) like PyTorch. The padding_idx row starts at
/// zero and receives no gradient.
class Embedding : public Module {
public:
    /// A table of `num_embeddings` rows of width `dim`; the row `padding_idx` gets no gradient.
    Embedding(std::int64_t num_embeddings, std::int64_t dim, std::optional<std::int64_t> padding_idx = std::nullopt,
              DType dtype = kFloat32);
    Tensor forward(const Tensor& indices);  ///< int64 [...] -> [..., dim]
    /// The rows at int64 `indices`: [..., dim].
    Tensor operator()(const Tensor& indices)
    {
        if (!has_hooks()) return forward(indices);
        return call_with_hooks({indices}, [this](const Tensors& in) { return Tensors{forward(in[0])}; })[0];
    }
    /// [num_embeddings, dim].
    Tensor weight;
    std::int64_t num_embeddings;  ///< rows of the table
    std::int64_t dim;             ///< width of each row
    /// The row that gets no gradient, if any.
    std::optional<std::int64_t> padding_idx;
};

/// Inverted dropout: in training, zeroes each element with probability p and scales the rest by
/// 1/(1-p); in eval, the identity. Draws from `gen` (the default generator if none).
class Dropout : public Layer {
public:
    /// Zeroes each element with probability p in training (scaling the rest by 1/(1-p)); the identity in evaluation.
    explicit Dropout(double p = 0.5, Generator* gen = nullptr);
    /// Applies dropout.
    Tensor forward(const Tensor& x) override;
    /// The probability of zeroing an element.
    double p;

private:
    Generator* gen_;
};

/// Normalises over the trailing `normalized_shape` dims, then scales and shifts (weight 1, bias 0).
class LayerNorm : public Layer {
public:
    /// Normalises over the last dims `normalized_shape`, with a learnt scale and shift, as torch::nn::LayerNorm.
    LayerNorm(Shape normalized_shape, double eps = 1e-5, bool elementwise_affine = true, DType dtype = kFloat32);
    /// Applies the normalisation.
    Tensor forward(const Tensor& x) override;
    Tensor weight;  ///< the scale, of normalized_shape; undefined without elementwise_affine
    Tensor bias;    ///< the shift, of normalized_shape; undefined without elementwise_affine
    /// The trailing dims normalised over.
    Shape normalized_shape;
    /// Added to the variance.
    double eps;
};

/// tanh as a layer.
class Tanh : public Layer {
public:
    /// tanh(x).
    Tensor forward(const Tensor& x) override { return tanh(x); }
};
/// sigmoid as a layer.
class Sigmoid : public Layer {
public:
    /// sigmoid(x).
    Tensor forward(const Tensor& x) override { return sigmoid(x); }
};
/// relu as a layer.
class ReLU : public Layer {
public:
    /// relu(x).
    Tensor forward(const Tensor& x) override { return relu(x); }
};

/// Applies its layers in order; they are named "0", "1", ... as in PyTorch.
class Sequential : public Layer {
public:
    Sequential() = default;
    /// The layers, in order.
    Sequential(std::initializer_list<std::shared_ptr<Layer>> layers);
    /// Appends a layer.
    void push_back(std::shared_ptr<Layer> layer);
    /// Each layer's forward in turn.
    Tensor forward(const Tensor& x) override;
    /// Number of layers.
    std::size_t size() const { return layers_.size(); }

private:
    std::vector<std::shared_ptr<Layer>> layers_;
};

}  // namespace loom::nn
