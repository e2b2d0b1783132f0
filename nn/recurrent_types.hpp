/// \file
/// The types the recurrent layers and their kernels share: a cell's state, what a layer returns,
/// the built-in cell kinds and one layer's weights. recurrent.hpp (the layers users build) and
/// the fused kernels' table (nn/cell_kinds.hpp, internal) both include this header, so neither
/// includes the other.
#pragma once
#include <string_view>
#include <vector>

#include "../core/tensor.hpp"

namespace loom::nn {

/// A cell's state: h first (the cell's output); an LSTM adds c. Each tensor is [B, H].
using State = std::vector<Tensor>;

/// The nonlinearity of an Elman RNN.
enum class Nonlinearity { Tanh, ReLU };

/// What a recurrent layer returns: output [T, B, D*H] ([B, T, D*H] with batch_first) and the
/// final state, each tensor [L*D, B, H] (h_n; for an LSTM also c_n).
struct RecurrentOutput {
    /// The top layer's output at every step: [T, B, directions x H] ([B, T, ...] with batch_first).
    Tensor output;
    /// Final states, one tensor per state kind ([layers x directions, B, H] each).
    State state;
    /// With RecurrentOptions::all_states: h (and c) of every step, [L*D, T, B, H] each, time-major
    /// whatever batch_first says. Past a sequence's length its state stays at its last step's.
    State all_states;
    /// Final hidden state.
    const Tensor& h_n() const { return state.at(0); }
    /// Final cell state (LSTM).
    const Tensor& c_n() const { return state.at(1); }
    /// Every step's hidden state of every layer and direction (all_states only).
    const Tensor& all_h() const;
    const Tensor& all_c() const;  ///< LSTM only
};

/// The built-in kinds; cell_kind_name gives "RNN", "LSTM", "GRU", and cell_kind_from_name reads
/// them back in any case ("lstm" for a command-line flag).
enum class CellKind { RNN, LSTM, GRU };
/// "RNN", "LSTM" or "GRU".
const char* cell_kind_name(CellKind kind);
/// The kind named "RNN", "LSTM" or "GRU"; throws loom::Error for any other name.
CellKind cell_kind_from_name(std::string_view name);

/// The parameters of one layer and direction, in PyTorch's order; the biases are undefined
/// without bias.
struct LayerWeights {
    Tensor w_ih;  ///< weight_ih_l{k}{_reverse}
    Tensor w_hh;  ///< weight_hh_l{k}{_reverse}
    Tensor b_ih;  ///< bias_ih_l{k}{_reverse}; undefined without bias
    Tensor b_hh;  ///< bias_hh_l{k}{_reverse}; undefined without bias
};

}  // namespace loom::nn
