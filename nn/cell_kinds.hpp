// The built-in cell kinds (internal to nn/): one table row per kind, built from that kind's
// type in cell_kinds.cpp. A row gives the facts the layers need (name, gate blocks in the
// weights, state tensors) and the two ways to run the kind: its step written with
// differentiable ops (the cells and the composed path) and its fused layer.
#pragma once
#include <functional>

#include "recurrent_types.hpp"

namespace loom::nn::detail {

// What the fused layer of one layer and direction needs.
struct FusedArgs {
    const Tensor& x;                           // [T, B, I], time-major
    const LayerWeights& weights;
    const State& initial;                      // empty for zeros, else [B, H] each
    const std::vector<std::int64_t>& lengths;  // per sequence, or empty: all T steps
    bool reverse;                              // run from the last step
    Nonlinearity nonlinearity;                 // RNN only
    // If set, receives dL/dh_t [T, B, H] of every step during backward (and dL/dc_t for an LSTM).
    std::function<void(const State&)> on_state_grads;
    // > 0: keep only the state entering every this many steps and recompute the rest in backward.
    std::int64_t checkpoint = 0;
    // Return every step's state, [T, B, H] each, in RecurrentOutput::all_states.
    bool all_states = false;
};

struct CellKindRow {
    CellKind kind;
    const char* name;  // "RNN", "LSTM", "GRU": the type name and the tape entry's name
    std::int64_t gates;
    std::size_t state_size;
    // One step from gx = x W_ih^T + b_ih [B, G*H], with differentiable ops.
    State (*composed_step)(const Tensor& gx, const State& state, const LayerWeights& w, Nonlinearity nl);
    // x [T, B, I] -> output [T, B, H] and final state, as one tape entry with a hand-written BPTT.
    RecurrentOutput (*fused)(const FusedArgs& args);
};

const CellKindRow& cell_kind_row(CellKind kind);

}  // namespace loom::nn::detail
