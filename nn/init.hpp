/// \file
/// Initialisers, in place and unrecorded, with PyTorch's formulas (torch.nn.init).
#pragma once
#include <string_view>

#include "../core/random.hpp"
#include "../core/tensor.hpp"

namespace loom::nn::init {

/// Whether a weight's fan is counted from its inputs or its outputs.
enum class FanMode { FanIn, FanOut };

/// Gain for a nonlinearity: "linear", "sigmoid", "tanh" (5/3), "relu" (sqrt 2), "leaky_relu" (with `param`).
double calculate_gain(std::string_view nonlinearity, double param = 0.01);
/// fan_in = size(1) * receptive field, fan_out = size(0) * receptive field; needs >= 2 dims.
std::pair<std::int64_t, std::int64_t> fans(const Tensor& t);

/// Fills t with uniform draws from [low, high).
void uniform_(Tensor& t, double low, double high, Generator* gen = nullptr);
/// Fills t with normal draws.
void normal_(Tensor& t, double mean, double std, Generator* gen = nullptr);
/// Fills t with `value`.
void constant_(Tensor& t, double value);
/// Fills t with zeros.
void zeros_(Tensor& t);
/// Fills t with ones.
void ones_(Tensor& t);
/// Glorot: U(-a, a) with a = gain * sqrt(6 / (fan_in + fan_out)).
void xavier_uniform_(Tensor& t, double gain = 1, Generator* gen = nullptr);
/// Glorot's normal initialisation: std = gain * sqrt(2 / (fan_in + fan_out)).
void xavier_normal_(Tensor& t, double gain = 1, Generator* gen = nullptr);
/// He: std = gain / sqrt(fan), gain = calculate_gain(nonlinearity, a).
void kaiming_uniform_(Tensor& t, double a = 0, FanMode mode = FanMode::FanIn,
                      std::string_view nonlinearity = "leaky_relu", Generator* gen = nullptr);
/// He's normal initialisation, as torch::nn::init::kaiming_normal_.
void kaiming_normal_(Tensor& t, double a = 0, FanMode mode = FanMode::FanIn,
                     std::string_view nonlinearity = "leaky_relu", Generator* gen = nullptr);
/// A (semi-)orthogonal matrix from the QR decomposition of a normal one (Keras' default for
/// recurrent weights). Rows of the flattened [size(0), rest] matrix are orthonormal when they can be.
void orthogonal_(Tensor& t, double gain = 1, Generator* gen = nullptr);

}  // namespace loom::nn::init
