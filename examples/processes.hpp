// The examples that train across processes (char_lm, classify_sequences) do it through this one
// header: under mpirun with loom::dist built (LOOM_WITH_DIST), each process is one rank of the
// job; otherwise, or when loom was built without MPI, the program is one process as always.
#pragma once
#include <loom/loom.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <optional>

#ifdef LOOM_WITH_DIST
#include <loom/dist/dist.hpp>
#endif

class Processes {
public:
    Processes(int* argc, char*** argv)
    {
#ifdef LOOM_WITH_DIST
        environment_.emplace(argc, argv);
        rank = loom::dist::rank();
        world_size = loom::dist::world_size();
#else
        (void)argc, (void)argv;
        const char* launched = std::getenv("OMPI_COMM_WORLD_SIZE");
        unsupported_ = launched && std::atoi(launched) > 1;
#endif
    }
    int rank = 0, world_size = 1;
    bool is_main() const { return rank == 0; }

    // For train::fit: one process unless launched with several.
    loom::train::Parallel fit_options(loom::nn::Module& model) const
    {
#ifdef LOOM_WITH_DIST
        if (world_size > 1) return loom::dist::data_parallel(model);
#endif
        (void)model;
        return {};
    }
    // For a loop of one's own: the same weights everywhere to start with, and averaged gradients.
    void share_weights(loom::nn::Module& model) { shared_ = fit_options(model); }
    // Before backward(): average_gradients() may then start during it, bucket by bucket.
    void before_backward()
    {
        if (shared_.before_backward) shared_.before_backward(1);
    }
    void average_gradients()
    {
        if (!shared_.average_gradients) return;  // one process: its gradient is the average
        const auto start = std::chrono::steady_clock::now();
        shared_.average_gradients(1);
        averaging_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
    double averaging_seconds = 0;  // spent in average_gradients() after backward, waiting on the other processes included
    double sum(double value) const
    {
#ifdef LOOM_WITH_DIST
        if (world_size > 1) return loom::dist::sum(value);
#endif
        return value;
    }
    // Runs the program's body; under mpirun an exception ends every process (MPI_Abort).
    template <class F> int run(F&& body)
    {
#ifdef LOOM_WITH_DIST
        if (world_size > 1) return loom::dist::run_or_abort(body);
#endif
        if (unsupported_) {
            std::fprintf(stderr, "this example was built without loom::dist (MPI was not found at build time), so it "
                                 "cannot train across processes; install libopenmpi-dev and rebuild\n");
            return 1;
        }
        try {
            return body();
        } catch (const std::exception& e) {
            std::fprintf(stderr, "%s\n", e.what());
            return 1;
        }
    }

private:
    bool unsupported_ = false;  // launched by mpirun, but built without loom::dist
    loom::train::Parallel shared_;  // what share_weights() set up
#ifdef LOOM_WITH_DIST
    std::optional<loom::dist::Environment> environment_;
#endif
};
