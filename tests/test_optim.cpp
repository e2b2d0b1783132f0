// Optimizers, clipping and schedules against PyTorch's trajectories; checkpoints that resume
// bit for bit and survive a crash mid-write.
#include "helpers.hpp"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

using namespace loom;
using testing::check_error;
using testing::bytes_of;
using testing::close_tensors;
using testing::TempDir;
using testing::values;
namespace fs = std::filesystem;

namespace {

const std::string data_dir = LOOM_TEST_DATA;

std::vector<std::string> files_starting(const std::string& prefix)
{
    std::vector<std::string> out;
    for (const auto& entry : fs::directory_iterator(data_dir))
        if (entry.path().filename().string().rfind(prefix, 0) == 0) out.push_back(entry.path().string());
    std::sort(out.begin(), out.end());
    return out;
}

double number(const Metadata& m, const std::string& key, double fallback)
{
    const auto it = m.find(key);
    return it == m.end() ? fallback : std::stod(it->second);
}

// The optimizer a reference file describes, over `params` split into its groups.
std::unique_ptr<optim::Optimizer> optimizer_for(const Metadata& m, const std::vector<Tensor>& params)
{
    const std::string kind = m.at("optimizer");
    const std::size_t groups = std::stoul(m.at("groups"));
    const auto members = [&](std::size_t g) {
        return groups == 1 ? params : std::vector<Tensor>{params.at(g)};
    };
    const auto key = [](std::size_t g, const char* k) { return fmt::format("group{}.{}", g, k); };
    if (kind == "SGD") {
        std::vector<optim::ParamGroup<optim::SGDOptions>> gs;
        for (std::size_t g = 0; g < groups; ++g)
            gs.push_back({members(g), optim::SGDOptions(number(m, key(g, "lr"), 0))
                                          .momentum(number(m, key(g, "momentum"), 0))
                                          .dampening(number(m, key(g, "dampening"), 0))
                                          .nesterov(number(m, key(g, "nesterov"), 0) != 0)
                                          .weight_decay(number(m, key(g, "weight_decay"), 0))});
        return std::make_unique<optim::SGD>(gs);
    }
    if (kind == "Adam" || kind == "AdamW") {
        std::vector<optim::ParamGroup<optim::AdamOptions>> gs;
        for (std::size_t g = 0; g < groups; ++g)
            gs.push_back({members(g), optim::AdamOptions(number(m, key(g, "lr"), 0))
                                          .betas(number(m, key(g, "beta1"), 0), number(m, key(g, "beta2"), 0))
                                          .eps(number(m, key(g, "eps"), 0))
                                          .weight_decay(number(m, key(g, "weight_decay"), 0))
                                          .amsgrad(number(m, key(g, "amsgrad"), 0) != 0)});
        if (kind == "AdamW") return std::make_unique<optim::AdamW>(gs);
        return std::make_unique<optim::Adam>(gs);
    }
    if (kind == "RMSprop") {
        std::vector<optim::ParamGroup<optim::RMSpropOptions>> gs;
        for (std::size_t g = 0; g < groups; ++g)
            gs.push_back({members(g), optim::RMSpropOptions(number(m, key(g, "lr"), 0))
                                          .alpha(number(m, key(g, "alpha"), 0))
                                          .eps(number(m, key(g, "eps"), 0))
                                          .weight_decay(number(m, key(g, "weight_decay"), 0))
                                          .momentum(number(m, key(g, "momentum"), 0))
                                          .centered(number(m, key(g, "centered"), 0) != 0)});
        return std::make_unique<optim::RMSprop>(gs);
    }
    REQUIRE(kind == "Adagrad");
    std::vector<optim::ParamGroup<optim::AdagradOptions>> gs;
    for (std::size_t g = 0; g < groups; ++g)
        gs.push_back({members(g), optim::AdagradOptions(number(m, key(g, "lr"), 0))
                                      .lr_decay(number(m, key(g, "lr_decay"), 0))
                                      .weight_decay(number(m, key(g, "weight_decay"), 0))
                                      .initial_accumulator_value(number(m, key(g, "initial_accumulator_value"), 0))
                                      .eps(number(m, key(g, "eps"), 0))});
    return std::make_unique<optim::Adagrad>(gs);
}

// A small model that draws random numbers in training (dropout), so resuming needs the RNG state.
struct Net : nn::Module {
    std::shared_ptr<nn::LSTM> rnn;
    std::shared_ptr<nn::Dropout> drop;
    std::shared_ptr<nn::Dense> head;
    explicit Net(std::int64_t H = 8)
    {
        rnn = register_module("rnn", std::make_shared<nn::LSTM>(nn::LSTMOptions(3, H)));
        drop = register_module("drop", std::make_shared<nn::Dropout>(0.3));
        head = register_module("head", std::make_shared<nn::Dense>(H, 1));
    }
    Tensor forward(const Tensor& x) { return (*head)((*drop)(rnn->forward(x).output.select(0, -1))); }
};

void train_steps(Net& net, optim::Optimizer& opt, optim::Scheduler& sched, int from, int to)
{
    for (int step = from; step < to; ++step) {
        Generator data(1000 + step);  // the data of each step, whoever runs it
        const Tensor x = randn({5, 4, 3}, kFloat32, &data), y = randn({4, 1}, kFloat32, &data);
        opt.zero_grad();
        nn::mse_loss(net.forward(x), y).backward();
        nn::utils::clip_grad_norm(net.parameters(), 1.0);
        opt.step();
        sched.step();
    }
}

}  // namespace

TEST_CASE("every optimizer and option follows PyTorch's trajectory")
{
    std::size_t cases = 0;
    for (const auto& path : files_starting("optim_")) {
        const auto file = load_with_metadata(path);
        const std::string name = fs::path(path).stem().string();
        std::vector<Tensor> params = {file.tensors.at("init.0").clone().requires_grad_(),
                                      file.tensors.at("init.1").clone().requires_grad_()};
        auto opt = optimizer_for(file.metadata, params);
        for (int t = 0; t < 5; ++t) {
            if (name == "optim_adam_lr_change" && t == 3) opt->set_lr(0.05);
            for (int k = 0; k < 2; ++k) params[k].set_grad(file.tensors.at(fmt::format("grad.{}.{}", t, k)));
            opt->step();
            for (int k = 0; k < 2; ++k)
                CHECK_MESSAGE(close_tensors(params[k], file.tensors.at(fmt::format("param.{}.{}", t, k)), 1e-12),
                              name << " step " << t << " parameter " << k);
        }
        ++cases;
    }
    CHECK(cases == 19);
}

TEST_CASE("gradient clipping matches PyTorch")
{
    for (const auto& path : files_starting("clip_")) {
        const auto file = load_with_metadata(path);
        const std::string kind = file.metadata.at("clip");
        std::vector<Tensor> params = {zeros({3, 2}, kFloat64).requires_grad_(), zeros({4}, kFloat64).requires_grad_()};
        for (int k = 0; k < 2; ++k) params[k].set_grad(file.tensors.at(fmt::format("grad.{}", k)).clone());
        if (kind == "value") {
            nn::utils::clip_grad_value(params, 0.5);
        } else {
            const double max_norm = kind == "norm_large" ? 1000 : 1;
            const double total = nn::utils::clip_grad_norm(params, max_norm, kind == "norm_inf" ? INFINITY : 2);
            CHECK(total == doctest::Approx(file.tensors.at("total_norm").item<double>()).epsilon(1e-12));
        }
        for (int k = 0; k < 2; ++k)
            CHECK_MESSAGE(close_tensors(params[k].grad(), file.tensors.at(fmt::format("clipped.{}", k)), 1e-12), kind);
    }
}

TEST_CASE("a non-finite gradient norm is reported, not applied")
{
    Tensor p = zeros({2}, kFloat64).requires_grad_();
    p.set_grad(tensor({1, NAN}, kFloat64));
    check_error([&] { (void)nn::utils::clip_grad_norm({p}, 1.0); }, {"clip_grad_norm", "nan", "nothing was clipped"});
    CHECK(p.grad().select(0, 0).item<double>() == 1);
}

TEST_CASE("schedules follow PyTorch's learning rates")
{
    for (const auto& path : files_starting("schedule_")) {
        const auto file = load_with_metadata(path);
        const std::string kind = file.metadata.at("schedule");
        Tensor p = zeros({1}).requires_grad_();
        optim::SGD opt({p}, optim::SGDOptions(0.1));
        std::unique_ptr<optim::Scheduler> sched;
        if (kind == "step") sched = std::make_unique<optim::StepLR>(opt, 3, 0.5);
        if (kind == "exponential") sched = std::make_unique<optim::ExponentialLR>(opt, 0.9);
        if (kind == "cosine") sched = std::make_unique<optim::CosineAnnealingLR>(opt, 5, 0.001);
        if (kind == "linear") sched = std::make_unique<optim::LinearLR>(opt, 0.25, 1.0, 4);
        optim::ReduceLROnPlateau* plateau = nullptr;
        if (kind == "plateau") {
            auto r = std::make_unique<optim::ReduceLROnPlateau>(opt, optim::ReduceLROnPlateau::Mode::Min, 0.5, 2, 0.01,
                                                                optim::ReduceLROnPlateau::ThresholdMode::Rel, 1);
            plateau = r.get();
            sched = std::move(r);
        }
        REQUIRE(sched);
        const auto lrs = values(file.tensors.at("lrs")), metrics = values(file.tensors.at("metrics"));
        std::vector<double> got = {opt.lr()};
        for (int t = 0; t < 12; ++t) {
            if (plateau) plateau->step(metrics[t]);
            else sched->step();
            got.push_back(opt.lr());
        }
        for (std::size_t i = 0; i < lrs.size(); ++i)
            CHECK_MESSAGE(got[i] == doctest::Approx(lrs[i]).epsilon(1e-12), kind << " at step " << i);
    }
}

TEST_CASE("parameter groups keep their own options and rates")
{
    Tensor a = zeros({1}).requires_grad_(), b = zeros({1}).requires_grad_();
    optim::SGD opt(std::vector<optim::ParamGroup<optim::SGDOptions>>{{{a}, optim::SGDOptions(1.0)}, {{b}, optim::SGDOptions(0.1)}});
    CHECK(opt.num_groups() == 2);
    a.set_grad(ones({1}));
    b.set_grad(ones({1}));
    opt.step();
    CHECK(a.item<double>() == doctest::Approx(-1));
    CHECK(b.item<double>() == doctest::Approx(-0.1));
    opt.set_lr(0.5, 1);
    opt.step();
    CHECK(b.item<double>() == doctest::Approx(-0.6));
    opt.zero_grad();
    CHECK(!a.grad().defined());
    opt.step();  // no gradients: nothing moves
    CHECK(a.item<double>() == doctest::Approx(-2));
}

TEST_CASE("optimizer misuse gives clear errors")
{
    Tensor p = zeros({2}).requires_grad_();
    check_error([] { optim::SGD({}, optim::SGDOptions(0.1)); }, {"optimizer", "no parameters"});
    check_error([&] { optim::Adam({p, p}); }, {"optimizer", "appears twice"});
    check_error([&] { optim::Adam({zeros({2})}); }, {"optimizer", "require grad"});
    check_error([&] { optim::SGD({p}, optim::SGDOptions(-0.1)); }, {"SGD", "learning rate", "-0.1"});
    check_error([&] { optim::SGD({p}, optim::SGDOptions(NAN)); }, {"SGD", "learning rate", "nan"});
    check_error([&] { optim::Adam({p}, optim::AdamOptions().betas(0.9, 1.0)); }, {"Adam", "beta2", "[0, 1)"});
    check_error([&] { optim::Adam({p}, optim::AdamOptions().betas(-0.1, 0.9)); }, {"Adam", "beta1"});
    check_error([&] { optim::SGD({p}, optim::SGDOptions(0.1).nesterov(true)); }, {"SGD", "nesterov"});
    check_error([&] { optim::RMSprop({p}, optim::RMSpropOptions().eps(-1)); }, {"RMSprop", "eps"});
    optim::Adam adam({p});
    check_error([&] { adam.set_lr(INFINITY); }, {"Adam", "learning rate", "inf"});

    // Loading state that does not match.
    p.set_grad(ones({2}));
    adam.step();
    Tensor q = zeros({3}).requires_grad_();
    optim::Adam other({q});
    check_error([&] { other.load_state_dict(adam.state_dict()); }, {"Adam", "shape [2]", "shape [3]"});
    optim::Adam two({zeros({2}).requires_grad_(), zeros({2}).requires_grad_()});
    check_error([&] { two.load_state_dict(adam.state_dict()); }, {"Adam", "1 parameters", "has 2"});
    optim::SGD sgd({zeros({2}).requires_grad_()}, optim::SGDOptions(0.1));
    check_error([&] { sgd.load_state_dict(adam.state_dict()); }, {"SGD", "exp_avg", "another optimizer"});
    check_error([&] { optim::StepLR(adam, 0); }, {"StepLR", "step_size"});
    optim::ReduceLROnPlateau plateau(adam);
    check_error([&] { plateau.step(); }, {"ReduceLROnPlateau", "metric"});
}

TEST_CASE("a resumed run is bit-identical to an uninterrupted one")
{
    TempDir dir;
    const std::string path = (dir.path / "run.safetensors").string();
    const int N = 6;

    manual_seed(11);
    Net straight;
    optim::Adam opt_a(straight.parameters(), optim::AdamOptions(0.01).amsgrad(true));
    optim::StepLR sched_a(opt_a, 2, 0.5);
    train_steps(straight, opt_a, sched_a, 0, N);

    manual_seed(11);
    std::vector<double> before_resume;
    {
        auto first = std::make_unique<Net>();
        auto opt = std::make_unique<optim::Adam>(first->parameters(), optim::AdamOptions(0.01).amsgrad(true));
        auto sched = std::make_unique<optim::StepLR>(*opt, 2, 0.5);
        train_steps(*first, *opt, *sched, 0, N / 2);
        optim::CheckpointInfo info;
        info.step = N / 2;
        info.metadata["note"] = "halfway";
        optim::save_checkpoint(path, *first, *opt, sched.get(), info);
        manual_seed(999);  // whatever happens to the random state afterwards must not matter
    }  // everything destroyed

    Net resumed;  // fresh objects, with other initial values
    optim::Adam opt_b(resumed.parameters(), optim::AdamOptions(0.01).amsgrad(true));
    optim::StepLR sched_b(opt_b, 2, 0.5);
    const auto info = optim::load_checkpoint(path, resumed, opt_b, &sched_b);
    CHECK(info.step == N / 2);
    CHECK(info.metadata.at("note") == "halfway");
    CHECK(opt_b.lr() == opt_a.lr() * 4);  // StepLR halves every 2 steps: 3 steps vs 6
    train_steps(resumed, opt_b, sched_b, N / 2, N);

    const auto a = straight.named_parameters(), b = resumed.named_parameters();
    for (std::size_t i = 0; i < a.size(); ++i) CHECK_MESSAGE(values(a[i].second) == values(b[i].second), a[i].first);
    CHECK(opt_a.lr() == opt_b.lr());
}

TEST_CASE("a checkpoint from another model or optimizer is refused and changes nothing")
{
    TempDir dir;
    const std::string path = (dir.path / "ckpt.safetensors").string();
    Net net;
    optim::Adam adam(net.parameters());
    optim::save_checkpoint(path, net, adam, nullptr);

    Net wider(16);
    optim::Adam wider_adam(wider.parameters());
    const auto before = values(wider.head->weight);
    check_error([&] { optim::load_checkpoint(path, wider, wider_adam, nullptr); },
                {"load_checkpoint", "different model", "head.weight"});
    CHECK(values(wider.head->weight) == before);
    optim::SGD sgd(net.parameters(), optim::SGDOptions(0.1));
    check_error([&] { optim::load_checkpoint(path, net, sgd, nullptr); }, {"load_checkpoint", "Adam state", "SGD"});
    optim::StepLR sched(adam, 2);
    check_error([&] { optim::load_checkpoint(path, net, adam, &sched); }, {"load_checkpoint", "none", "StepLR"});
    check_error([&] {
        nn::Dense plain(2, 2);
        save(path + ".plain", plain.state_dict());
        optim::load_checkpoint(path + ".plain", net, adam, nullptr);
    }, {"load_checkpoint", "not a loom training checkpoint"});
}

TEST_CASE("a checkpoint write killed part-way leaves the previous checkpoint intact")
{
    TempDir dir;
    const fs::path path = dir.path / "ckpt.safetensors";
    Net net;
    optim::Adam adam(net.parameters());
    optim::save_checkpoint(path.string(), net, adam, nullptr);
    const std::string previous = bytes_of(path);

    const pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) {  // writes a large checkpoint until killed
        struct Big : nn::Module {
            Tensor w;
            Big() { w = register_parameter("w", zeros({64, 1024, 1024})); }  // 256 MiB
        } big;
        optim::SGD sgd(big.parameters(), optim::SGDOptions(0.1));
        for (;;) optim::save_checkpoint(path.string(), big, sgd, nullptr);
    }
    // Wait until the child's temporary file holds some data, then kill it mid-write.
    bool writing = false;
    for (int i = 0; i < 2000 && !writing; ++i) {
        for (const auto& entry : fs::directory_iterator(dir.path))
            if (entry.path().filename().string().find(".tmp-") != std::string::npos && fs::file_size(entry.path()) > 0)
                writing = true;
        if (!writing) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    ::kill(child, SIGKILL);
    int status = 0;
    ::waitpid(child, &status, 0);
    REQUIRE(writing);
    CHECK(WIFSIGNALED(status));
    CHECK(bytes_of(path) == previous);  // never replaced by the half-written file
    Net restored;
    optim::Adam restored_adam(restored.parameters());
    optim::load_checkpoint(path.string(), restored, restored_adam, nullptr);
    CHECK(values(restored.head->weight) == values(net.head->weight));
}
