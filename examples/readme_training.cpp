// The README's training loop: an optimizer, clipping, a schedule, and checkpoint/resume.
// Learns to echo a random token sequence shifted by one step; run it twice and the second run
// resumes from the checkpoint the first one left. The loss cannot go below log(8)/12 = 0.17:
// the first target of each sequence is never seen.
#include <loom/loom.hpp>

#include <cstdio>
#include <filesystem>

using namespace loom;

struct CharModel : nn::Module {
    std::shared_ptr<nn::Embedding> embed;
    std::shared_ptr<nn::LSTM> rnn;
    std::shared_ptr<nn::Dense> head;
    CharModel(std::int64_t V, std::int64_t E, std::int64_t H)
    {
        embed = register_module("embed", std::make_shared<nn::Embedding>(V, E));
        rnn = register_module("rnn", std::make_shared<nn::LSTM>(nn::LSTMOptions(E, H)));
        head = register_module("head", std::make_shared<nn::Dense>(H, V));
    }
    Tensor forward(const Tensor& tokens) { return head->forward(rnn->forward(embed->forward(tokens)).output); }
};

int main()
{
    const std::int64_t V = 8, T = 12, B = 16, steps = 300;
    const std::string checkpoint = "readme_training.safetensors";
    manual_seed(0);
    CharModel model(V, 16, 32);
    optim::Adam opt(model.parameters(), optim::AdamOptions(1e-2));
    optim::CosineAnnealingLR schedule(opt, /*T_max=*/steps);
    optim::CheckpointInfo info;
    if (std::filesystem::exists(checkpoint)) {
        info = optim::load_checkpoint(checkpoint, model, opt, &schedule);
        std::printf("resumed at step %lld\n", static_cast<long long>(info.step));
    }
    for (std::int64_t step = info.step; step < steps; ++step) {
        const Tensor tokens = randint(0, V, {T + 1, B});
        const Tensor x = tokens.narrow(0, 1, T), y = tokens.narrow(0, 0, T);  // y_t = x_{t-1}: remember one step
        opt.zero_grad();
        Tensor loss = nn::cross_entropy(model.forward(x).reshape({-1, V}), y.reshape({-1}));
        loss.backward();
        nn::utils::clip_grad_norm(model.parameters(), 1.0);
        opt.step();
        schedule.step();
        if (step % 50 == 49) {
            optim::save_checkpoint(checkpoint, model, opt, &schedule, {.epoch = 0, .step = step + 1});
            std::printf("step %3lld  loss %.4f  lr %.5f\n", static_cast<long long>(step + 1), loss.item<double>(), opt.lr());
        }
    }
    return 0;
}
