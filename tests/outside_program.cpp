// A program outside the loom tree, built against the installed headers and pkg-config file.
#include <loom/loom.hpp>

#include <cstdio>

int main()
{
    loom::Tensor x = loom::tensor({1, 2, 3}, loom::kFloat64).requires_grad_();
    loom::Tensor y = (x * x).sum();
    y.backward();
    const double g = x.grad().select(0, 2).item<double>();  // d(sum x^2)/dx_2 = 6
    std::printf("outside program: grad %.1f\n", g);
    return g == 6.0 ? 0 : 1;
}
