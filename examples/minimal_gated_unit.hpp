// The minimal gated unit (Zhou et al. 2016), a recurrent cell defined from loom's ops: one gate f
// decides how much of the state to overwrite. custom_cell.cpp checks and trains it;
// adding_problem.cpp races it against the built-in cells.
#pragma once
#include <loom/loom.hpp>

class MinimalGatedUnit : public loom::nn::Cell {
public:
    MinimalGatedUnit(std::int64_t input, std::int64_t hidden, loom::DType dtype = loom::kFloat32)
        : loom::nn::Cell(input, hidden)
    {
        gate = register_module("gate", std::make_shared<loom::nn::Dense>(input + hidden, hidden, true, dtype));
        candidate = register_module("candidate", std::make_shared<loom::nn::Dense>(input + hidden, hidden, true, dtype));
    }
    // f = s(W_f [x, h] + b_f);  h~ = tanh(W_h [x, f * h] + b_h);  h' = (1 - f) h + f h~
    loom::nn::State forward(const loom::Tensor& x, const loom::nn::State& state) override
    {
        using namespace loom;
        const Tensor& h = state[0];
        const Tensor f = sigmoid((*gate)(concat({x, h}, 1)));
        const Tensor h_tilde = tanh((*candidate)(concat({x, f * h}, 1)));
        return {(1.0 - f) * h + f * h_tilde};
    }
    std::shared_ptr<loom::nn::Dense> gate, candidate;
};
