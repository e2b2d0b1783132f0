// A program outside the loom tree that trains across processes with loom::dist, built against
// the installed headers by CMake (loom::dist) or pkg-config (loom-dist) and run under mpirun.
#include <loom/dist/dist.hpp>
#include <loom/loom.hpp>

#include <cstdio>

int main(int argc, char** argv)
{
    loom::dist::Environment env(&argc, &argv);
    return loom::dist::run_or_abort([] {
        loom::manual_seed(static_cast<std::uint64_t>(loom::dist::rank()));  // different weights on each process...
        loom::nn::Dense model(3, 1, true, loom::kFloat64);
        loom::dist::check_same_model(model);
        loom::dist::broadcast_parameters(model);  // ...until process 0's are copied to all
        loom::dist::GradientAverager averager(model.parameters());
        const loom::Tensor x = loom::full({2, 3}, double(loom::dist::rank() + 1), loom::kFloat64);
        model(x).sum().backward();
        averager.average();
        // The bias's gradient is 2 on every process (two rows), so its average is 2 too.
        const double g = model.bias.grad().item<double>();
        const double total = loom::dist::sum(1.0);
        std::printf("outside dist program: rank %d of %d, bias gradient %.1f, processes counted %.0f\n",
                    loom::dist::rank(), loom::dist::world_size(), g, total);
        return g == 2.0 && total == loom::dist::world_size() ? 0 : 1;
    });
}
