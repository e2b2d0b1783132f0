// Feed-forward layers: Dense, Embedding, Dropout, LayerNorm, activations, Sequential.
#pragma once
#include <initializer_list>

#include "../core/random.hpp"
#include "module.hpp"

namespace loom::nn {

// y = x W^T + b, like PyTorch's Linear. weight [out, in], bias [out];
// both U(-1/sqrt(in), 1/sqrt(in)), PyTorch's default.
class Dense : public Layer {
public:
    Dense(std::int64_t in_features, std::int64_t out_features, bool bias = true, DType dtype = kFloat32);
    // A layer whose weight [out, in] is a tensor registered elsewhere too (weight tying: a
    // language model's output layer sharing its embedding's table, Press & Wolf 2017); the
    // bias, if any, is its own.
    explicit Dense(const Tensor& shared_weight, bool bias = true);
    Tensor forward(const Tensor& x) override;  // x [..., in] -> [..., out]
    Tensor weight, bias;
    std::int64_t in_features, out_features;
};

// Rows of a [num_embeddings, dim] table, N(0, 1) like PyTorch. The padding_idx row starts at
// zero and receives no gradient.
class Embedding : public Module {
public:
    Embedding(std::int64_t num_embeddings, std::int64_t dim, std::optional<std::int64_t> padding_idx = std::nullopt,
              DType dtype = kFloat32);
    Tensor forward(const Tensor& indices);  // int64 [...] -> [..., dim]
    Tensor operator()(const Tensor& indices)
    {
        if (!has_hooks()) return forward(indices);
        return call_with_hooks({indices}, [this](const Tensors& in) { return Tensors{forward(in[0])}; })[0];
    }
    Tensor weight;
    std::int64_t num_embeddings, dim;
    std::optional<std::int64_t> padding_idx;
};

// Inverted dropout: in training, zeroes each element with probability p and scales the rest by
// 1/(1-p); in eval, the identity. Draws from `gen` (the default generator if none).
class Dropout : public Layer {
public:
    explicit Dropout(double p = 0.5, Generator* gen = nullptr);
    Tensor forward(const Tensor& x) override;
    double p;

private:
    Generator* gen_;
};

// Normalises over the trailing `normalized_shape` dims, then scales and shifts (weight 1, bias 0).
class LayerNorm : public Layer {
public:
    LayerNorm(Shape normalized_shape, double eps = 1e-5, bool elementwise_affine = true, DType dtype = kFloat32);
    Tensor forward(const Tensor& x) override;
    Tensor weight, bias;
    Shape normalized_shape;
    double eps;
};

class Tanh : public Layer {
public:
    Tensor forward(const Tensor& x) override { return tanh(x); }
};
class Sigmoid : public Layer {
public:
    Tensor forward(const Tensor& x) override { return sigmoid(x); }
};
class ReLU : public Layer {
public:
    Tensor forward(const Tensor& x) override { return relu(x); }
};

// Applies its layers in order; they are named "0", "1", ... as in PyTorch.
class Sequential : public Layer {
public:
    Sequential() = default;
    Sequential(std::initializer_list<std::shared_ptr<Layer>> layers);
    void push_back(std::shared_ptr<Layer> layer);
    Tensor forward(const Tensor& x) override;
    std::size_t size() const { return layers_.size(); }

private:
    std::vector<std::shared_ptr<Layer>> layers_;
};

}  // namespace loom::nn
