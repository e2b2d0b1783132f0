// W7: the LSTM objective of ADBench (Srajer, Habib and Fitzgibbon 2018; also gradbench's "lstm"),
// written twice: from loom's element-wise tensor ops exactly as the definition reads, and as plain
// C++ loops without AD (the primal limit). Its quirks are kept on purpose, so timings compare
// with published ones: every weight is diagonal (a vector), the forget and output gates read the
// layer's input while the input gate and the candidate read the hidden state, and the
// log-sum-exp adds 2 inside its log.
#pragma once
#include <loom/loom.hpp>

#include <cmath>
#include <vector>

namespace adbench {

// Parameters and data in ADBench's layout, flattened: main [l][2][4][b] (per layer: the weights
// then the biases of forget, ingate, outgate, change), extra [3][b] (input weight, output
// weight, output bias), state [l][2][b] (hidden, cell), sequence [c][b].
struct LstmInput {
    int l = 2, c = 1024, b = 14;
    std::vector<double> main, extra, state, sequence;
};

// Deterministic values (the same formula in bench/torch_reference.py), so loom, plain C++ and
// PyTorch evaluate the very same objective and their losses can be compared digit for digit.
inline LstmInput make_lstm_input(int l, int c, int b)
{
    LstmInput in{l, c, b, {}, {}, {}, {}};
    const auto fill = [](std::vector<double>& v, std::size_t n, double offset, double scale, double freq) {
        v.resize(n);
        for (std::size_t i = 0; i < n; ++i) v[i] = offset + scale * std::sin(freq * double(i) + 0.5);
    };
    fill(in.main, std::size_t(l) * 8 * b, 0.0, 0.8, 0.37);
    fill(in.extra, std::size_t(3) * b, 0.0, 0.9, 0.53);
    fill(in.state, std::size_t(l) * 2 * b, 0.0, 0.5, 0.71);
    fill(in.sequence, std::size_t(c) * b, 0.5, 0.5, 0.29);
    return in;
}

inline double sigmoid(double x) { return 1 / (1 + std::exp(-x)); }

// The primal limit: plain loops over doubles, no tape, no tensors.
inline double lstm_objective_plain(const LstmInput& in)
{
    const int l = in.l, c = in.c, b = in.b;
    std::vector<double> state = in.state, x(b), ypred(b);
    const double* extra = in.extra.data();
    double total = 0;
    for (int t = 0; t < c - 1; ++t) {
        const double* input = &in.sequence[std::size_t(t) * b];
        for (int i = 0; i < b; ++i) x[i] = input[i] * extra[i];
        const double* layer_input = x.data();
        for (int layer = 0; layer < l; ++layer) {
            const double* w = &in.main[std::size_t(layer) * 8 * b];
            const double* bias = w + 4 * b;
            double* hidden = &state[std::size_t(layer) * 2 * b];
            double* cell = hidden + b;
            for (int i = 0; i < b; ++i) {
                const double forget = sigmoid(layer_input[i] * w[i] + bias[i]);
                const double ingate = sigmoid(hidden[i] * w[b + i] + bias[b + i]);
                const double outgate = sigmoid(layer_input[i] * w[2 * b + i] + bias[2 * b + i]);
                const double change = std::tanh(hidden[i] * w[3 * b + i] + bias[3 * b + i]);
                cell[i] = cell[i] * forget + ingate * change;
                hidden[i] = outgate * std::tanh(cell[i]);
            }
            layer_input = hidden;
        }
        double sum_exp = 0;
        for (int i = 0; i < b; ++i) {
            ypred[i] = layer_input[i] * extra[b + i] + extra[2 * b + i];
            sum_exp += std::exp(ypred[i]);
        }
        const double lse = std::log(sum_exp + 2);
        const double* gold = &in.sequence[std::size_t(t + 1) * b];
        for (int i = 0; i < b; ++i) total += gold[i] * (ypred[i] - lse);
    }
    return -total / (double(c - 1) * b);
}

// The same objective from loom's tensor ops: main [l, 2, 4, b], extra [3, b], state [l, 2, b],
// sequence [c, b]. Differentiable in main and extra.
inline loom::Tensor lstm_objective(const loom::Tensor& main, const loom::Tensor& extra, const loom::Tensor& state,
                                   const loom::Tensor& sequence)
{
    using loom::Tensor;
    const std::int64_t l = main.size(0), c = sequence.size(0), b = sequence.size(1);
    struct Layer {
        Tensor weight[4], bias[4], hidden, cell;
    };
    std::vector<Layer> layers(static_cast<std::size_t>(l));
    for (std::int64_t i = 0; i < l; ++i) {
        Layer& layer = layers[static_cast<std::size_t>(i)];
        for (std::int64_t k = 0; k < 4; ++k) {
            layer.weight[k] = main.select(0, i).select(0, 0).select(0, k);
            layer.bias[k] = main.select(0, i).select(0, 1).select(0, k);
        }
        layer.hidden = state.select(0, i).select(0, 0);
        layer.cell = state.select(0, i).select(0, 1);
    }
    const Tensor in_weight = extra.select(0, 0), out_weight = extra.select(0, 1), out_bias = extra.select(0, 2);
    Tensor total = loom::zeros({}, main.dtype());
    for (std::int64_t t = 0; t < c - 1; ++t) {
        Tensor x = sequence.select(0, t) * in_weight;
        for (Layer& layer : layers) {
            const Tensor forget = loom::sigmoid(x * layer.weight[0] + layer.bias[0]);
            const Tensor ingate = loom::sigmoid(layer.hidden * layer.weight[1] + layer.bias[1]);
            const Tensor outgate = loom::sigmoid(x * layer.weight[2] + layer.bias[2]);
            const Tensor change = loom::tanh(layer.hidden * layer.weight[3] + layer.bias[3]);
            layer.cell = layer.cell * forget + ingate * change;
            layer.hidden = outgate * loom::tanh(layer.cell);
            x = layer.hidden;
        }
        const Tensor ypred = x * out_weight + out_bias;
        const Tensor lse = loom::log(loom::exp(ypred).sum() + 2.0);
        total = total + (sequence.select(0, t + 1) * (ypred - lse)).sum();
    }
    return -total / double((c - 1) * b);
}

// The same objective with the loop over characters written as loom::scan: the carry is every
// layer's hidden and cell state, a step reads one character and returns its prediction, and the
// log-likelihood of all predictions is taken after the scan, over all steps at once. scan traces
// the step, replays it over all characters as one tape entry and differentiates it by replaying
// its adjoint.
inline loom::Tensor lstm_objective_scan(const loom::Tensor& main, const loom::Tensor& extra, const loom::Tensor& state,
                                        const loom::Tensor& sequence)
{
    using loom::Tensor;
    const std::int64_t l = main.size(0), c = sequence.size(0), b = sequence.size(1);
    std::vector<Tensor> weight, bias, init;  // weight[4 * layer + k]
    for (std::int64_t i = 0; i < l; ++i) {
        for (std::int64_t k = 0; k < 4; ++k) {
            weight.push_back(main.select(0, i).select(0, 0).select(0, k));
            bias.push_back(main.select(0, i).select(0, 1).select(0, k));
        }
        init.push_back(state.select(0, i).select(0, 0));
        init.push_back(state.select(0, i).select(0, 1));
    }
    const Tensor in_weight = extra.select(0, 0), out_weight = extra.select(0, 1), out_bias = extra.select(0, 2);
    const auto step = [=](const std::vector<Tensor>& carry, const std::vector<Tensor>& input) {
        std::vector<Tensor> next;
        Tensor x = input[0] * in_weight;
        for (std::size_t i = 0; i < std::size_t(l); ++i) {
            const Tensor &hidden = carry[2 * i], &cell = carry[2 * i + 1];
            const Tensor* w = &weight[4 * i];
            const Tensor* bi = &bias[4 * i];
            const Tensor forget = loom::sigmoid(x * w[0] + bi[0]);
            const Tensor ingate = loom::sigmoid(hidden * w[1] + bi[1]);
            const Tensor outgate = loom::sigmoid(x * w[2] + bi[2]);
            const Tensor change = loom::tanh(hidden * w[3] + bi[3]);
            const Tensor new_cell = cell * forget + ingate * change;
            x = outgate * loom::tanh(new_cell);
            next.push_back(x);
            next.push_back(new_cell);
        }
        return loom::ScanStepResult{next, {x * out_weight + out_bias}};
    };
    const Tensor ypred = loom::scan(step, init, {sequence.narrow(0, 0, c - 1)}).ys[0];  // [c - 1, b]
    const Tensor lse = loom::log(loom::exp(ypred).sum({1}, true) + 2.0);
    return -(sequence.narrow(0, 1, c - 1) * (ypred - lse)).sum() / double((c - 1) * b);
}

// The input as loom tensors of `dtype`, shaped as lstm_objective reads them.
struct LstmTensors {
    loom::Tensor main, extra, state, sequence;
};
inline LstmTensors to_tensors(const LstmInput& in, loom::DType dtype = loom::kFloat64)
{
    return {loom::tensor(in.main, {in.l, 2, 4, in.b}, dtype), loom::tensor(in.extra, {3, in.b}, dtype),
            loom::tensor(in.state, {in.l, 2, in.b}, dtype), loom::tensor(in.sequence, {in.c, in.b}, dtype)};
}

}  // namespace adbench
