// Run by dist_test.sh under mpirun -np 2. Modes:
//   equivalence: two processes with shards of each batch (4 + 4 rows, then 3 + 5) take the same
//                Adam steps with clipping as one process with the whole batch, to 1e-12 in float64,
//                averaging after backward and then during it (start_during_backward);
//                then train::fit across both processes keeps their weights identical.
//   mismatch:    process 1 builds a different model; data_parallel must end both, naming the difference.
//   throw:       process 1 throws during training; the job must end (MPI_Abort), not hang.
//   train:       trains until killed (the test kills process 1 with SIGKILL); writes pid.<rank>.
//   averager_count, averager_dtype, averager_shape, negative_weight, overlap_weight, fit_sizes: the
//                processes pass different things (process 1 a parameter fewer, another dtype, another
//                shape, a negative weight, a weight other than the one it gave start_during_backward,
//                a training set of another size); every process must end with
//                a loom::Error, printed as "rank <r> caught: <message>", instead of hanging.
#include <loom/dist/dist.hpp>
#include <loom/loom.hpp>

#include <mpi.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>

using namespace loom;

namespace {

struct Net : nn::Module {
    std::shared_ptr<nn::LSTM> lstm;
    std::shared_ptr<nn::Dense> head;
    explicit Net(std::int64_t out = 1)
    {
        lstm = register_module("lstm", std::make_shared<nn::LSTM>(nn::LSTMOptions(3, 5).dtype(kFloat64)));
        head = register_module("head", std::make_shared<nn::Dense>(5, out, true, kFloat64));
    }
    Tensor forward(const Tensor& x) { return (*head)((*lstm)(x).h_n().select(0, 0)); }  // x [T, B, 3] -> [B, out]
};

// The largest difference of a value across processes, over every parameter.
double spread(const Net& net)
{
    double worst = 0;
    for (const Tensor& p : net.parameters()) {
        const double* v = p.data_ptr<double>();
        std::vector<double> lo(v, v + p.numel()), hi(lo);
        MPI_Allreduce(MPI_IN_PLACE, lo.data(), int(lo.size()), MPI_DOUBLE, MPI_MIN, MPI_COMM_WORLD);
        MPI_Allreduce(MPI_IN_PLACE, hi.data(), int(hi.size()), MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
        for (std::size_t i = 0; i < lo.size(); ++i) worst = std::max(worst, hi[i] - lo[i]);
    }
    return worst;
}

int equivalence()
{
    const int rank = dist::rank();
    manual_seed(100 + static_cast<std::uint64_t>(rank));  // different on each: data_parallel must copy rank 0's
    Net net;
    const train::Parallel parallel = dist::data_parallel(net, 256);  // small buckets: several of them
    manual_seed(100);
    Net whole;  // one process, the whole batch: the same start as rank 0
    Generator data_gen(7);
    const Tensor x = randn({6, 8, 3}, kFloat64, &data_gen), y = randn({8, 1}, kFloat64, &data_gen);
    optim::Adam opt(net.parameters(), optim::AdamOptions(0.05)), whole_opt(whole.parameters(), optim::AdamOptions(0.05));
    dist::GradientAverager averager(net.parameters(), 256);
    std::printf("rank %d: %zu gradient buckets\n", rank, averager.buckets());
    bool overlapped = true;
    for (int step = 0; step < 6; ++step) {
        const std::int64_t cut = step % 2 ? 3 : 4;  // unequal shards every other step
        const std::int64_t start = rank == 0 ? 0 : cut, rows = rank == 0 ? cut : 8 - cut;
        opt.zero_grad();
        // The last three steps start each bucket during backward, as soon as its gradients are final.
        if (step >= 3) averager.start_during_backward(double(rows));
        nn::mse_loss(net.forward(x.narrow(1, start, rows)), y.narrow(0, start, rows)).backward();
        averager.average(double(rows));
        if (step >= 3) overlapped = overlapped && averager.buckets_started_during_backward() == averager.buckets();
        else overlapped = overlapped && averager.buckets_started_during_backward() == 0;
        nn::utils::clip_grad_norm(net.parameters(), 0.5);
        opt.step();
        whole_opt.zero_grad();
        nn::mse_loss(whole.forward(x), y).backward();
        nn::utils::clip_grad_norm(whole.parameters(), 0.5);
        whole_opt.step();
    }
    double worst = 0;
    for (std::size_t i = 0; i < net.parameters().size(); ++i)
        worst = std::max(worst, (net.parameters()[i] - whole.parameters()[i]).abs().max().item<double>());
    const double across = spread(net);
    std::printf("rank %d: largest difference from one process with the whole batch %.3g; across processes %.3g\n",
                rank, worst, across);
    (void)parallel;

    // train::fit across both processes: the weights stay identical, and the loss falls.
    manual_seed(200 + static_cast<std::uint64_t>(rank));
    Net fitted;
    train::FitOptions o;
    o.epochs = 3;
    o.batch_size = 4;
    o.verbose = false;
    o.clip_grad_norm = 1;
    o.parallel = dist::data_parallel(fitted);
    optim::Adam fit_opt(fitted.parameters(), optim::AdamOptions(0.02));
    const Tensor fx = randn({6, 40, 3}, kFloat64, &data_gen), fy = randn({40, 1}, kFloat64, &data_gen);
    const train::Dataset data{40, [&](const std::vector<std::int64_t>& idx) {
                                  const Tensor i = from_vector<std::int64_t>(idx, {std::int64_t(idx.size())});
                                  return train::Batch{index_select(fx, 1, i), index_select(fy, 0, i), {}};
                              }};
    const auto history = train::fit(
        fitted, fit_opt, [&](const train::Batch& b) { return fitted.forward(b.input); },
        [](const Tensor& out, const train::Batch& b) { return nn::mse_loss(out, b.target); }, data, {}, o);
    const double fit_spread = spread(fitted), first = history.epochs.front().at("train_loss"),
                 last = history.epochs.back().at("train_loss");
    std::printf("rank %d: fit across processes: train loss %.4f -> %.4f, weights differ by %.3g\n", rank, first, last,
                fit_spread);
    std::printf("rank %d: buckets started during backward when asked, and only then: %s\n", rank,
                overlapped ? "yes" : "no");
    const bool ok = worst <= 1e-12 && across == 0 && fit_spread == 0 && last < first && overlapped;
    if (rank == 0) std::printf(ok ? "equivalent\n" : "NOT equivalent\n");
    return ok ? 0 : 1;
}

int mismatch()
{
    Net net(dist::rank() == 1 ? 2 : 1);  // head [1, 5] on rank 0, [2, 5] on rank 1
    dist::data_parallel(net);
    return 0;
}

int train_loop(bool throw_on_rank_1, bool forever)
{
    Net net;
    optim::Adam opt(net.parameters(), optim::AdamOptions(0.01));
    dist::GradientAverager averager(net.parameters());
    { std::ofstream(fmt::format("pid.{}", dist::rank())) << getpid() << '\n'; }
    const Tensor x = randn({6, 4, 3}, kFloat64), y = randn({4, 1}, kFloat64);
    for (int step = 0; forever || step < 50; ++step) {
        if (throw_on_rank_1 && dist::rank() == 1 && step == 3) throw Error("a bad batch on purpose at step 3");
        opt.zero_grad();
        nn::mse_loss(net.forward(x), y).backward();
        averager.average();
        opt.step();
    }
    return 0;
}

// Runs f, which must throw a loom::Error on this process; prints it and returns 0, or 1 if none came.
template <class F> int expect_error(F&& f)
{
    try {
        f();
    } catch (const Error& e) {
        std::printf("rank %d caught: %s\n", dist::rank(), e.what());
        return 0;
    }
    std::printf("rank %d: no error\n", dist::rank());
    return 1;
}

int mismatched(const std::string& mode)
{
    const int rank = dist::rank();
    Net net;
    std::vector<Tensor> params = net.parameters();
    if (mode == "averager_count") {
        if (rank == 1) params.pop_back();
        return expect_error([&] { dist::GradientAverager averager(params); });
    }
    if (mode == "averager_dtype") {
        if (rank == 1) params.back() = params.back().to(kFloat32).requires_grad_();
        return expect_error([&] { dist::GradientAverager averager(params); });
    }
    if (mode == "averager_shape") {
        if (rank == 1) params.back() = zeros({2}, kFloat64).requires_grad_();
        return expect_error([&] { dist::GradientAverager averager(params); });
    }
    if (mode == "negative_weight") {
        dist::GradientAverager averager(params);
        nn::mse_loss(net.forward(randn({6, 4, 3}, kFloat64)), randn({4, 1}, kFloat64)).backward();
        return expect_error([&] { averager.average(rank == 1 ? -1.0 : 1.0); });
    }
    if (mode == "overlap_weight") {  // rank 1 averages with another weight than it announced
        dist::GradientAverager averager(params);
        averager.start_during_backward(1.0);
        nn::mse_loss(net.forward(randn({6, 4, 3}, kFloat64)), randn({4, 1}, kFloat64)).backward();
        return expect_error([&] { averager.average(rank == 1 ? 2.0 : 1.0); });
    }
    // fit_sizes
    train::FitOptions o;
    o.epochs = 1;
    o.batch_size = 4;
    o.verbose = false;
    o.parallel = dist::data_parallel(net);
    optim::SGD opt(net.parameters(), optim::SGDOptions(0.01));
    const std::int64_t n = rank == 1 ? 41 : 40;
    const Tensor fx = randn({6, n, 3}, kFloat64), fy = randn({n, 1}, kFloat64);
    const train::Dataset data{n, [&](const std::vector<std::int64_t>& idx) {
                                  const Tensor i = from_vector<std::int64_t>(idx, {std::int64_t(idx.size())});
                                  return train::Batch{index_select(fx, 1, i), index_select(fy, 0, i), {}};
                              }};
    return expect_error([&] {
        train::fit(
            net, opt, [&](const train::Batch& b) { return net.forward(b.input); },
            [](const Tensor& out, const train::Batch& b) { return nn::mse_loss(out, b.target); }, data, {}, o);
    });
}

}  // namespace

int main(int argc, char** argv)
{
    dist::Environment env(&argc, &argv);
    const std::string mode = argc > 1 ? argv[1] : "";
    return dist::run_or_abort([&] {
        if (dist::world_size() != 2) throw Error("dist_check: run it with mpirun -np 2");
        if (mode == "equivalence") return equivalence();
        if (mode == "mismatch") return mismatch();
        if (mode == "throw") return train_loop(true, false);
        if (mode == "train") return train_loop(false, true);
        for (const char* m : {"averager_count", "averager_dtype", "averager_shape", "negative_weight", "overlap_weight",
                              "fit_sizes"})
            if (mode == m) return mismatched(mode);
        throw Error("dist_check: the mode is one of equivalence, mismatch, throw, train, averager_count, "
                    "averager_dtype, averager_shape, negative_weight, overlap_weight, fit_sizes");
    });
}
