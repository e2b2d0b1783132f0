#include <loom/loom.hpp>
using namespace loom;

int main()
{
    manual_seed(0);
    const std::int64_t T = 5, B = 4, I = 3, H = 8;
    Tensor W_ih = (randn({H, I}) * 0.3).requires_grad_();
    Tensor W_hh = (randn({H, H}) * 0.3).requires_grad_();
    Tensor b = zeros({H}).requires_grad_();
    Tensor x = randn({T, B, I}), target = randn({B, H});

    Tensor h = zeros({B, H});
    for (std::int64_t t = 0; t < T; ++t)  // unrolled through time, by hand
        h = tanh(matmul(x.select(0, t), W_ih.t()) + matmul(h, W_hh.t()) + b);
    Tensor loss = (h - target).pow(2).mean();
    loss.backward();  // backpropagation through time, from the tape

    fmt::print("loss {:.4f}\ndL/db {}\n", loss.item<double>(), b.grad());
}
