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
    for (const auto& path : testing::reference_files("optim_")) {
        const auto file = load_with_metadata(path);
        const std::string name = fs::path(path).stem().string();
        std::vector<Tensor> params = {file.tensors.at("init.0").clone().requires_grad_(),
                                      file.tensors.at("init.1").clone().requires_grad_()};
        auto opt = optimizer_for(file.metadata, params);
        const auto steps = static_cast<int>(number(file.metadata, "steps", -1));
        REQUIRE(steps > 0);
        for (int t = 0; t < steps; ++t) {
            if (t == number(file.metadata, "lr_change_step", -1)) opt->set_lr(number(file.metadata, "lr_change_to", -1));
            for (int k = 0; k < 2; ++k) params[k].set_grad(file.tensors.at(fmt::format("grad.{}.{}", t, k)));
            opt->step();
            for (int k = 0; k < 2; ++k)
                CHECK_MESSAGE(close_tensors(params[k], file.tensors.at(fmt::format("param.{}.{}", t, k)), 1e-12),
                              name << " step " << t << " parameter " << k);
        }
        ++cases;
    }
    CHECK(cases == testing::reference_count("optim"));
}

TEST_CASE("gradient clipping matches PyTorch")
{
    for (const auto& path : testing::reference_files("clip_")) {
        const auto file = load_with_metadata(path);
        const std::string kind = file.metadata.at("clip");
        std::vector<Tensor> params = {zeros({3, 2}, kFloat64).requires_grad_(), zeros({4}, kFloat64).requires_grad_()};
        for (int k = 0; k < 2; ++k) params[k].set_grad(file.tensors.at(fmt::format("grad.{}", k)).clone());
        if (kind == "value") {
            nn::utils::clip_grad_value(params, number(file.metadata, "clip_value", -1));
        } else {
            REQUIRE(kind == "norm");
            const double total = nn::utils::clip_grad_norm(params, number(file.metadata, "max_norm", -1),
                                                           number(file.metadata, "norm_type", -1));
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

namespace {
// The schedule a reference file names, with its arguments from the file's metadata.
std::unique_ptr<optim::Schedule> schedule_for(const Metadata& m, optim::Optimizer& opt)
{
    const std::string cls = m.at("class");
    const auto arg = [&](const char* key) { return number(m, key, NAN); };
    if (cls == "StepLR") return std::make_unique<optim::StepLR>(opt, std::int64_t(arg("step_size")), arg("gamma"));
    if (cls == "ExponentialLR") return std::make_unique<optim::ExponentialLR>(opt, arg("gamma"));
    if (cls == "CosineAnnealingLR")
        return std::make_unique<optim::CosineAnnealingLR>(opt, std::int64_t(arg("T_max")), arg("eta_min"));
    if (cls == "LinearLR")
        return std::make_unique<optim::LinearLR>(opt, arg("start_factor"), arg("end_factor"),
                                                 std::int64_t(arg("total_iters")));
    if (cls == "ReduceLROnPlateau")
        return std::make_unique<optim::ReduceLROnPlateau>(
            opt, optim::ReduceLROnPlateau::Mode::Min, arg("factor"), std::int64_t(arg("patience")), arg("threshold"),
            optim::ReduceLROnPlateau::ThresholdMode::Rel, std::int64_t(arg("cooldown")));
    FAIL("unknown schedule class " << cls);
    return nullptr;
}
}  // namespace

TEST_CASE("schedules follow PyTorch's learning rates")
{
    for (const auto& path : testing::reference_files("schedule_")) {
        const auto file = load_with_metadata(path);
        const std::string kind = file.metadata.at("schedule");
        Tensor p = zeros({1}).requires_grad_();
        optim::SGD opt({p}, optim::SGDOptions(number(file.metadata, "lr", -1)));
        const auto sched = schedule_for(file.metadata, opt);
        REQUIRE(sched);
        const auto lrs = values(file.tensors.at("lrs")), metrics = values(file.tensors.at("metrics"));
        std::vector<double> got = {opt.lr()};
        for (double metric : metrics) {
            sched->epoch_end(metric);  // a time-driven schedule steps and ignores the metric
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
    check_error([&] { plateau.epoch_end(std::nullopt); }, {"ReduceLROnPlateau", "validation loss"});
    using Plateau = optim::ReduceLROnPlateau;
    for (double eps : {std::nan(""), -1e-8, double(INFINITY)}) {
        CAPTURE(eps);
        check_error([&] { Plateau(adam, Plateau::Mode::Min, 0.1, 10, 1e-4, Plateau::ThresholdMode::Rel, 0, 0, eps); },
                    {"ReduceLROnPlateau", "eps"});
    }
    check_error([&] { Plateau(adam, Plateau::Mode::Min, 0.1, 10, 1e-4, Plateau::ThresholdMode::Rel, 0, std::nan("")); },
                {"ReduceLROnPlateau", "min_lr"});
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

namespace {

// A language model whose output layer shares its embedding's table.
struct TiedLM : nn::Module {
    std::shared_ptr<nn::Embedding> embed;
    std::shared_ptr<nn::LSTM> rnn;
    std::shared_ptr<nn::Dense> head;
    TiedLM()
    {
        embed = register_module("embed", std::make_shared<nn::Embedding>(7, 4));
        rnn = register_module("rnn", std::make_shared<nn::LSTM>(nn::LSTMOptions(4, 4)));
        head = register_module("head", std::make_shared<nn::Dense>(embed->weight));
    }
    Tensor loss(std::int64_t step)
    {
        Generator data(500 + step);
        const Tensor tokens = randint(0, 7, {6, 3}, &data);
        const Tensor logits = head->forward(rnn->forward(embed->forward(tokens.narrow(0, 0, 5))).output);
        return nn::cross_entropy(logits.reshape({-1, 7}), tokens.narrow(0, 1, 5).reshape({-1}));
    }
};

void train_tied(TiedLM& lm, optim::Adam& opt, int from, int to)
{
    for (int step = from; step < to; ++step) {
        opt.zero_grad();
        lm.loss(step).backward();
        nn::utils::clip_grad_norm(lm.parameters(), 1.0);
        opt.step();
    }
}

}  // namespace

TEST_CASE("a model with tied weights trains with Adam and resumes from its checkpoint bit-identically")
{
    TempDir dir;
    const std::string path = (dir.path / "tied.safetensors").string();
    manual_seed(21);
    TiedLM straight;
    CHECK(straight.parameter_count() == straight.embed->weight.numel() + straight.head->bias.numel() +
                                            straight.rnn->parameter_count());
    optim::Adam opt_a(straight.parameters(), optim::AdamOptions(0.05));
    const double first_loss = straight.loss(0).item<double>();
    train_tied(straight, opt_a, 0, 8);
    CHECK(straight.loss(0).item<double>() < first_loss);

    manual_seed(21);
    {
        TiedLM first;
        optim::Adam opt(first.parameters(), optim::AdamOptions(0.05));
        train_tied(first, opt, 0, 4);
        optim::save_checkpoint(path, first, opt, nullptr, {});
    }
    manual_seed(77);
    TiedLM resumed;
    optim::Adam opt_b(resumed.parameters(), optim::AdamOptions(0.05));
    optim::load_checkpoint(path, resumed, opt_b, nullptr);
    CHECK(resumed.embed->weight.is_same(resumed.head->weight));  // still one tensor
    train_tied(resumed, opt_b, 4, 8);
    const auto a = straight.named_parameters(), b = resumed.named_parameters();
    REQUIRE(a.size() == b.size());
    for (std::size_t i = 0; i < a.size(); ++i) CHECK_MESSAGE(values(a[i].second) == values(b[i].second), a[i].first);
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

TEST_CASE("every optimizer's state goes through one typed place: keys, checkpoint and update agree")
{
    const auto run = [](optim::Optimizer& opt, std::vector<Tensor>& params) {
        for (int t = 0; t < 3; ++t) {
            for (auto& p : params) p.set_grad(full_like(p, 0.1 * (t + 1)));
            opt.step();
        }
    };
    const auto fresh = [] {
        return std::vector<Tensor>{tensor({1, 2, 3}, kFloat64).requires_grad_(), tensor({-1}, kFloat64).requires_grad_()};
    };
    using Make = std::function<std::unique_ptr<optim::Optimizer>(std::vector<Tensor>)>;
    const std::vector<Make> makers = {
        [](auto p) { return std::make_unique<optim::SGD>(p, optim::SGDOptions(0.1).momentum(0.9)); },
        [](auto p) { return std::make_unique<optim::Adam>(p, optim::AdamOptions(0.1).amsgrad(true)); },
        [](auto p) { return std::make_unique<optim::AdamW>(p, optim::AdamOptions(0.1).amsgrad(true)); },
        [](auto p) { return std::make_unique<optim::RMSprop>(p, optim::RMSpropOptions(0.1).centered(true).momentum(0.5)); },
        [](auto p) { return std::make_unique<optim::Adagrad>(p, optim::AdagradOptions(0.1)); }};
    for (const auto& make : makers) {
        auto params = fresh();
        auto opt = make(params);
        CAPTURE(opt->name());
        run(*opt, params);
        const NamedTensorMap state = opt->state_dict();
        const auto keys = opt->state_keys();
        // Every kind the optimizer declares was created by its update, for every parameter.
        for (std::size_t i = 0; i < params.size(); ++i) {
            CHECK(opt->step_count(i) == 3);
            for (const auto& k : keys) CHECK_MESSAGE(state.count(fmt::format("state.{}.{}", i, k)), k);
        }
        // A fresh optimizer loaded from it continues exactly as the original.
        auto params2 = fresh();
        {
            NoGradGuard no_grad;
            for (std::size_t i = 0; i < params.size(); ++i) params2[i].copy_(params[i]);
        }
        auto opt2 = make(params2);
        opt2->load_state_dict(state);
        run(*opt, params);
        run(*opt2, params2);
        for (std::size_t i = 0; i < params.size(); ++i) CHECK(values(params[i]) == values(params2[i]));
    }
    // AdamW is its own optimizer: it decays the weights, not the gradient.
    Tensor a = ones({1}, kFloat64).requires_grad_(), b = ones({1}, kFloat64).requires_grad_();
    optim::Adam adam({a}, optim::AdamOptions(0.1).weight_decay(0.5));
    optim::AdamW adamw({b}, optim::AdamOptions(0.1).weight_decay(0.5));
    CHECK(adamw.name() == "AdamW");
    a.set_grad(zeros({1}, kFloat64));
    b.set_grad(zeros({1}, kFloat64));
    adam.step();
    adamw.step();
    CHECK(a.item<double>() == doctest::Approx(0.9));   // the decay went through the normalised moments
    CHECK(b.item<double>() == doctest::Approx(0.95));  // p *= 1 - lr * weight_decay
}

TEST_CASE("an optimizer step that throws changes nothing")
{
    nn::Dense model(2, 2);
    optim::Adam opt(model.parameters());
    for (auto& p : model.parameters()) p.set_grad(ones_like(p));
    opt.step();
    model.to(kFloat64);  // the moments stay float32: the next step cannot run
    for (auto& p : model.parameters()) p.set_grad(ones_like(p));
    const NamedTensorMap before = opt.state_dict();
    std::vector<std::vector<double>> params_before;
    for (auto& p : model.parameters()) params_before.push_back(values(p));
    check_error([&] { opt.step(); }, {"Adam", "exp_avg", "float32", "float64", "to()"});
    const NamedTensorMap after = opt.state_dict();
    REQUIRE(after.size() == before.size());
    for (const auto& [k, t] : before) CHECK_MESSAGE(values(after.at(k)) == values(t), k);
    for (std::size_t i = 0; i < params_before.size(); ++i) CHECK(values(model.parameters()[i]) == params_before[i]);
}

namespace {

struct MomentumState {
    Tensor velocity;
    static auto fields() { return std::array{optim::StateField<MomentumState>{"velocity", &MomentumState::velocity}}; }
};

// A rule of one's own that updates its state and the parameter in place, then throws at the
// parameter numbered `fail_at`, part-way through a step.
class Fragile : public optim::OptimizerWith<optim::SGDOptions, MomentumState> {
public:
    Fragile(std::vector<Tensor> params, std::size_t fail_at_)
        : OptimizerWith(std::vector<optim::ParamGroup<optim::SGDOptions>>{{std::move(params), optim::SGDOptions(0.1)}}),
          fail_at(fail_at_)
    {
    }
    std::string name() const override { return "Fragile"; }
    std::size_t fail_at;
    std::size_t calls = 0;

private:
    void update(const Tensor& p, const Tensor& grad, MomentumState& s, const optim::SGDOptions&, double lr,
                std::int64_t) override
    {
        Tensor& v = optim::state_tensor(s.velocity, p);
        v.mul_(0.9).add_(grad);
        Tensor(p).add_(v, -lr);
        if (calls++ == fail_at) throw Error("Fragile: a rule that fails on purpose");
    }
};

struct TwiceNamedState {
    Tensor a, b;
    static auto fields()
    {
        return std::array{optim::StateField<TwiceNamedState>{"moment", &TwiceNamedState::a},
                          optim::StateField<TwiceNamedState>{"moment", &TwiceNamedState::b}};
    }
};

class TwiceNamed : public optim::OptimizerWith<optim::SGDOptions, TwiceNamedState> {
public:
    explicit TwiceNamed(std::vector<Tensor> params)
        : OptimizerWith(std::vector<optim::ParamGroup<optim::SGDOptions>>{{std::move(params), optim::SGDOptions(0.1)}})
    {
    }
    std::string name() const override { return "TwiceNamed"; }

private:
    void update(const Tensor&, const Tensor&, TwiceNamedState&, const optim::SGDOptions&, double, std::int64_t) override {}
};

}  // namespace

TEST_CASE("a rule of one's own that throws part-way through a step changes nothing")
{
    nn::Dense model(3, 2);
    std::vector<Tensor> params = model.parameters();
    Fragile opt(params, 100);  // a first step that succeeds, so there is state to keep
    for (auto& p : params) p.set_grad(ones_like(p));
    opt.step();
    opt.fail_at = opt.calls + 1;  // the next step fails at its second parameter, after changing the first
    for (auto& p : params) p.set_grad(full_like(p, 0.5));
    std::map<std::string, std::vector<double>> before;  // values, not the live state tensors
    for (const auto& [k, t] : opt.state_dict()) before[k] = values(t);
    std::vector<std::vector<double>> params_before;
    for (auto& p : params) params_before.push_back(values(p));
    check_error([&] { opt.step(); }, {"a rule that fails on purpose"});
    const NamedTensorMap after = opt.state_dict();
    REQUIRE(after.size() == before.size());
    for (const auto& [k, v] : before) CHECK_MESSAGE(values(after.at(k)) == v, k);
    for (std::size_t i = 0; i < params.size(); ++i) CHECK(values(params[i]) == params_before[i]);
    CHECK(opt.step_count(0) == 1);
    CHECK(opt.step_count(1) == 1);
}

TEST_CASE("an optimizer state naming two fields alike is refused")
{
    nn::Dense model(3, 2);
    check_error([&] { TwiceNamed opt(model.parameters()); }, {"\"moment\" twice"});
}

TEST_CASE("malformed optimizer state and groups give loom::Error")
{
    Tensor p = zeros({2}).requires_grad_();
    check_error([] { optim::SGD(std::vector<optim::ParamGroup<optim::SGDOptions>>{}); },
                {"optimizer", "at least one parameter group"});
    optim::Adam adam({p});
    check_error([&] { (void)adam.lr(3); }, {"Adam", "1 parameter group", "group 3"});
    check_error([&] { adam.set_lr(0.1, 3); }, {"Adam", "group 3"});
    p.set_grad(ones({2}));
    adam.step();
    const NamedTensorMap good = adam.state_dict();
    for (const std::string key : {"state.x.exp_avg", "state.99999999999999999999999.exp_avg", "state..exp_avg",
                                  "state.-1.exp_avg"}) {
        NamedTensorMap bad = good;
        bad[key] = zeros({2});
        check_error([&] { adam.load_state_dict(bad); }, {"Adam", key});
    }
    NamedTensorMap bad = good;
    bad["step.0"] = zeros({3}, kInt64);
    check_error([&] { adam.load_state_dict(bad); }, {"Adam", "step.0", "[3]"});
    bad = good;
    bad["lr.0"] = scalar_tensor(NAN, kFloat64);
    check_error([&] { adam.load_state_dict(bad); }, {"Adam", "learning rate", "nan"});
    CHECK(adam.lr() == doctest::Approx(1e-3));  // nothing was taken
    CHECK(adam.step_count(0) == 1);
}
