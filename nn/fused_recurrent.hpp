// The fused RNN/LSTM/GRU layer of one layer and direction (internal to nn/recurrent.cpp).
#pragma once
#include <functional>

#include "recurrent.hpp"

namespace loom::nn::detail {

struct FusedWeights {
    Tensor w_ih, w_hh, b_ih, b_hh;  // biases may be undefined
};

// x [T, B, I] -> output [T, B, H] and final state ([B, H] each), recorded as one tape entry.
// `lengths` (per sequence, or empty) masks steps past each sequence's end; `reverse` runs from
// the last step. `on_grad_h`, if set, receives dL/dh_t [T, B, H] during backward.
RecurrentOutput fused_layer(CellKind kind, Nonlinearity nonlinearity, const Tensor& x, const FusedWeights& w,
                            const State& initial, const std::vector<std::int64_t>& lengths, bool reverse,
                            std::function<void(const Tensor&)> on_grad_h);

}  // namespace loom::nn::detail
