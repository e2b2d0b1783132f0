// rnn_by_hand: a tanh RNN written from tensor ops and unrolled through time by hand,
// trained with plain gradient descent. Every gradient comes from the tape: there is no
// hand-written backward anywhere in this file.
//
// Task: read 12 steps of a sine wave and predict the next value.
// Expected output: a loss that falls by two orders of magnitude or more, e.g.
//   step    0  loss 0.4...
//   ...
//   step  300  loss 0.00...
#include <loom/loom.hpp>

#include <cmath>
#include <cstdio>

using namespace loom;

int main()
{
    manual_seed(7);
    const std::int64_t T = 12, B = 32, H = 16;

    // Batch of sine windows with random phase and frequency: x [T, B, 1], target y [B, 1].
    Generator data_gen(1);
    std::vector<double> values;
    std::vector<double> phase(B), freq(B);
    for (std::int64_t i = 0; i < B; ++i) phase[i] = 6.283 * data_gen.uniform01(), freq[i] = 0.2 + 0.4 * data_gen.uniform01();
    for (std::int64_t s = 0; s <= T; ++s)
        for (std::int64_t i = 0; i < B; ++i) values.push_back(std::sin(freq[i] * double(s) + phase[i]));
    const Tensor series = tensor(values, {T + 1, B, 1});
    const Tensor x = series.narrow(0, 0, T), y = series.select(0, T);

    // Parameters: h_t = tanh(x_t W_ih^T + h_{t-1} W_hh^T + b), prediction = h_T w_out + b_out.
    const double k = 1 / std::sqrt(double(H));
    Tensor W_ih = uniform({H, 1}, -k, k).requires_grad_();
    Tensor W_hh = uniform({H, H}, -k, k).requires_grad_();
    Tensor b = zeros({H}).requires_grad_();
    Tensor w_out = uniform({H, 1}, -k, k).requires_grad_();
    Tensor b_out = zeros({1}).requires_grad_();
    std::vector<Tensor> params = {W_ih, W_hh, b, w_out, b_out};

    const double lr = 0.1;
    for (int step = 0; step <= 300; ++step) {
        Tensor h = zeros({B, H});
        for (std::int64_t s = 0; s < T; ++s)
            h = tanh(matmul(x.select(0, s), W_ih.t()) + matmul(h, W_hh.t()) + b);
        Tensor loss = (matmul(h, w_out) + b_out - y).pow(2).mean();

        for (auto& p : params) p.zero_grad();
        loss.backward();
        {
            NoGradGuard no_grad;
            for (auto& p : params) p.add_(p.grad(), -lr);
        }
        if (step % 25 == 0) std::printf("step %4d  loss %.6f\n", step, loss.item<double>());
    }
    return 0;
}
