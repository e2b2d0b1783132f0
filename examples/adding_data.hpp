// The adding problem's data (Hochreiter & Schmidhuber 1997), shared by adding_problem and
// gradient_flow: each step carries a value in [0, 1) and a marker; exactly two steps are marked,
// one in each half of the sequence, and the target is the sum of their values.
#pragma once
#include <loom/loom.hpp>

#include <utility>
#include <vector>

// A batch of B sequences of length T: input [T, B, 2], target [B, 1].
inline std::pair<loom::Tensor, loom::Tensor> adding_batch(std::int64_t T, std::int64_t B, loom::Generator& gen)
{
    std::vector<float> x(static_cast<std::size_t>(T * B * 2), 0.0f), y(static_cast<std::size_t>(B), 0.0f);
    for (std::int64_t b = 0; b < B; ++b) {
        const std::int64_t first = gen.randint(0, T / 2), second = gen.randint(T / 2, T);
        for (std::int64_t t = 0; t < T; ++t) {
            const auto v = static_cast<float>(gen.uniform01());
            x[std::size_t((t * B + b) * 2)] = v;
            if (t == first || t == second) {
                x[std::size_t((t * B + b) * 2 + 1)] = 1;
                y[std::size_t(b)] += v;
            }
        }
    }
    return {loom::from_vector<float>(x, {T, B, 2}), loom::from_vector<float>(y, {B, 1})};
}
