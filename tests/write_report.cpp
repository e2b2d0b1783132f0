// Writes the HtmlReport of a short training run to argv[1], for tests/browser_test.sh: a
// 2-layer GRU learning to sum a sequence, with validation, every step sampled.
#include <loom/loom.hpp>

#include <cstdio>

using namespace loom;

struct Summer : nn::Module {
    Summer()
    {
        rnn = std::make_shared<nn::GRU>(nn::GRUOptions(1, 16).num_layers(2));
        head = std::make_shared<nn::Dense>(16, 1);
        register_child("rnn", rnn);
        register_child("head", head);
    }
    Tensor operator()(const Tensor& x) { return (*head)((*rnn)(x).output.select(0, x.size(0) - 1)); }
    std::shared_ptr<nn::GRU> rnn;
    std::shared_ptr<nn::Dense> head;
};

int main(int argc, char** argv)
{
    if (argc != 2) {
        std::fprintf(stderr, "usage: write_report REPORT.html\n");
        return 2;
    }
    manual_seed(1);
    Summer model;
    const std::int64_t T = 24, n = 512;
    const Tensor x = uniform({T, n, 1}, -1, 1), y = x.sum({0}) / std::sqrt(double(T));
    const train::Dataset all{n, [&](const std::vector<std::int64_t>& idx) {
                                 const Tensor i = from_vector<std::int64_t>(idx, {std::int64_t(idx.size())});
                                 return train::Batch{x.index_select(1, i), y.index_select(0, i), {}};
                             }};
    Generator gen(2);
    const auto [train_data, validation] = train::split(all, 0.25, gen);
    auto report = std::make_shared<train::HtmlReport>(argv[1], 2);
    report->set_title("write_report: a 2-layer GRU summing 24 numbers");
    train::FitOptions o;
    o.epochs = 6;
    o.batch_size = 32;
    o.verbose = false;
    o.callbacks = {report};
    optim::Adam adam(model.parameters(), optim::AdamOptions(3e-3));
    optim::StepLR schedule(adam, 2, 0.5);
    train::fit(model, adam, [&](const train::Batch& b) { return model(b.input); },
               [](const Tensor& out, const train::Batch& b) { return nn::mse_loss(out, b.target); }, train_data,
               validation, o, &schedule);
    std::printf("wrote %s\n", argv[1]);
    return 0;
}
