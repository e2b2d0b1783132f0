// classify_sequences: variable-length sequence classification with a bidirectional GRU.
// Each sequence is a noisy sine wave of 8 to 40 steps whose frequency is one of three; the
// class is which. Sequences are padded into batches and their lengths passed to the layer, so
// padding never reaches the classifier. The best epoch is picked on a validation set; accuracy is
// reported on a test set used for nothing else (chance: 1/3). Under mpirun (with loom::dist
// built) it trains data-parallel: each process a shard of every epoch, gradients averaged.
#include <loom/loom.hpp>

#include <CLI/CLI.hpp>

#include <cmath>
#include <cstdio>

#include "processes.hpp"

using namespace loom;

namespace {

int classify(int argc, char** argv, const Processes& processes)
{
    CLI::App app{"classify_sequences: a bidirectional GRU with lengths"};
    std::int64_t epochs = 8, hidden = 24, n = 1200, seed = 0;
    app.add_option("--epochs", epochs, "training epochs")->check(CLI::Range(1, 10000));
    app.add_option("--hidden", hidden, "GRU hidden size")->check(CLI::Range(1, 4096));
    app.add_option("--sequences", n, "sequences in all; a fifth is held out")->check(CLI::Range(20, 1000000));
    app.add_option("--seed", seed, "random seed");
    std::string tensorboard_dir;
    app.add_option("--tensorboard", tensorboard_dir,
                   "also log to TensorBoard event files in this folder (loss, accuracy, learning rate, and every 10 "
                   "steps each parameter's weight and gradient histograms)");
    CLI11_PARSE(app, argc, argv);
    manual_seed(static_cast<std::uint64_t>(seed));

    Generator gen(static_cast<std::uint64_t>(seed) + 1);
    const double frequencies[3] = {0.25, 0.5, 1.0};
    std::vector<Tensor> sequences;
    std::vector<std::int64_t> labels;
    for (std::int64_t i = 0; i < n; ++i) {
        const std::int64_t label = gen.randint(0, 3), length = gen.randint(8, 41);
        const double phase = 6.283 * gen.uniform01();
        std::vector<double> v;
        for (std::int64_t t = 0; t < length; ++t) v.push_back(std::sin(frequencies[label] * t + phase) + 0.3 * gen.normal());
        sequences.push_back(tensor(v, {length, 1}));
        labels.push_back(label);
    }
    const train::Dataset all{n, [&](const std::vector<std::int64_t>& idx) {
                                 std::vector<Tensor> picked;
                                 std::vector<std::int64_t> y;
                                 for (auto i : idx) picked.push_back(sequences[i]), y.push_back(labels[i]);
                                 auto [padded, lengths] = train::pad_sequences(picked);
                                 return train::Batch{padded, from_vector<std::int64_t>(y, {std::int64_t(y.size())}), lengths};
                             }};
    // A test set never seen in training or model selection, and a validation set to pick the best epoch.
    auto [rest, test_set] = train::split(all, 0.2, gen);
    auto [train_set, val_set] = train::split(rest, 0.15, gen);

    struct Net : nn::Module {
        std::shared_ptr<nn::GRU> gru;
        std::shared_ptr<nn::Dense> head;
        explicit Net(std::int64_t H)
        {
            gru = register_module("gru", std::make_shared<nn::GRU>(nn::GRUOptions(1, H).bidirectional(true)));
            head = register_module("head", std::make_shared<nn::Dense>(2 * H, 3));
        }
        // Each direction's final state, taken at the sequence's own last step, into the classifier.
        Tensor forward(const Tensor& x, const Tensor& lengths)
        {
            const Tensor h = gru->forward(x, {}, lengths).h_n();  // [2, B, H]
            return head->forward(concat({h.select(0, 0), h.select(0, 1)}, 1));
        }
    } net(hidden);
    optim::Adam opt(net.parameters(), optim::AdamOptions(0.01));
    train::FitOptions options;
    options.epochs = epochs;
    options.batch_size = 32;
    options.accuracy = true;
    options.seed = static_cast<std::uint64_t>(seed);
    options.parallel = processes.fit_options(net);  // one process, or each its shard under mpirun
    if (!tensorboard_dir.empty()) options.callbacks.push_back(std::make_shared<train::TensorBoardLogger>(tensorboard_dir, 10));
    if (processes.world_size > 1 && processes.is_main())
        std::printf("%d processes, each with batches of %lld\n", processes.world_size, (long long)options.batch_size);
    const auto forward = [&](const train::Batch& b) { return net.forward(b.input, b.lengths); };
    const auto loss = [](const Tensor& logits, const train::Batch& b) { return nn::cross_entropy(logits, b.target); };
    const auto history = train::fit(net, opt, forward, loss, train_set, val_set, options);
    const auto test = train::evaluate(net, forward, loss, test_set, 64, true);
    if (!processes.is_main()) return 0;
    std::printf("test accuracy %.3f (chance 0.333) over %lld unseen sequences, with the model of epoch %lld\n",
                test.at("accuracy"), (long long)test_set.size, (long long)history.best_epoch);
    std::printf("test_accuracy %.4f\n", test.at("accuracy"));
    return 0;
}

}  // namespace

int main(int argc, char** argv)
{
    Processes processes(&argc, &argv);
    return processes.run([&] { return classify(argc, argv, processes); });
}
