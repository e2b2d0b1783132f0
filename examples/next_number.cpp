// next_number: the smallest LSTM example. LSTM(3) -> Dense(1) learns to continue [1,2] -> 3,
// [2,3] -> 4, ... [4,5] -> 6, then is asked about [5,6] ... [8,9], which it never saw.
// Extrapolating beyond the training range is hard for a network whose units saturate: expect
// good answers near the training range and drift further out. It prints what it gets.
#include <loom/loom.hpp>

#include <CLI/CLI.hpp>

#include <cstdio>

using namespace loom;

int main(int argc, char** argv)
{
    CLI::App app{"next_number: LSTM(3) continues counting"};
    std::int64_t epochs = 600, seed = 0;
    app.add_option("--epochs", epochs, "training epochs over the four examples")->check(CLI::Range(1, 100000));
    app.add_option("--seed", seed, "random seed");
    CLI11_PARSE(app, argc, argv);
    manual_seed(static_cast<std::uint64_t>(seed));

    // [a, a+1] -> a+2; inputs [T=2, B, 1], scaled by 1/10 so the numbers suit tanh units.
    const auto examples = [](std::int64_t first, std::int64_t count) {
        std::vector<double> x, y;
        for (std::int64_t a = first; a < first + count; ++a) x.push_back(a / 10.0), y.push_back((a + 2) / 10.0);
        std::vector<double> time_major;  // [2, count, 1]
        for (std::int64_t t = 0; t < 2; ++t)
            for (std::int64_t b = 0; b < count; ++b) time_major.push_back(x[b] + t / 10.0);
        return std::pair{tensor(time_major, {2, count, 1}), tensor(y, {count, 1})};
    };
    const auto [x_train, y_train] = examples(1, 4);
    const auto [x_test, y_test] = examples(5, 4);

    struct Net : nn::Module {
        std::shared_ptr<nn::LSTM> lstm = register_module("lstm", std::make_shared<nn::LSTM>(nn::LSTMOptions(1, 3)));
        std::shared_ptr<nn::Dense> head = register_module("head", std::make_shared<nn::Dense>(3, 1));
        Tensor forward(const Tensor& x) { return head->forward(lstm->forward(x).h_n().select(0, 0)); }
    } net;
    optim::Adam opt(net.parameters(), optim::AdamOptions(0.05));
    const train::Dataset data{4, [&](const std::vector<std::int64_t>& idx) {
                                  const Tensor i = from_vector<std::int64_t>(idx, {std::int64_t(idx.size())});
                                  return train::Batch{x_train.index_select(1, i), y_train.index_select(0, i), {}};
                              }};
    train::FitOptions options;
    options.epochs = epochs;
    options.batch_size = 4;
    options.verbose = false;
    const auto forward = [&](const train::Batch& b) { return net.forward(b.input); };
    const auto loss = [](const Tensor& out, const train::Batch& b) { return nn::mse_loss(out, b.target); };
    const auto history = train::fit(net, opt, forward, loss, data, {}, options);
    std::printf("train loss: %.6f after %lld epochs (first epoch %.4f)\n", history.epochs.back().at("train_loss"),
                (long long)epochs, history.epochs.front().at("train_loss"));

    NoGradGuard no_grad;
    const Tensor seen = net.forward(x_train), unseen = net.forward(x_test);
    std::printf("\n%-10s %8s %10s\n", "sequence", "answer", "predicted");
    for (std::int64_t a = 1; a <= 8; ++a) {
        const Tensor& p = a <= 4 ? seen : unseen;
        std::printf("[%lld, %lld]%s %8lld %10.2f%s\n", (long long)a, (long long)(a + 1), a + 1 < 10 ? "    " : "   ",
                    (long long)(a + 2), p.select(0, (a - 1) % 4).item<double>() * 10, a == 4 ? "   (last seen in training)" : "");
    }
    const double test_mse = nn::mse_loss(unseen * 10.0, y_test * 10.0).item<double>();
    std::printf("\ntest loss (MSE on the unseen sequences, in units of the numbers): %.4f\n", test_mse);
    std::printf("extrapolation is hard: the network only ever saw numbers up to 6.\n");
    return 0;
}
