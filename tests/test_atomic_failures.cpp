// Defect class 6: a call that fails changes nothing. load_checkpoint reads and checks the whole
// file before touching the model, the optimizer, the schedule or the generator; an optimizer
// step checks every gradient and state first (also in test_optim.cpp); a backward that fails
// part-way releases nothing and can be retried.
#include "helpers.hpp"

using namespace loom;
using testing::check_error;
using testing::TempDir;
using testing::values;

namespace {
struct Snapshot {
    std::vector<std::vector<double>> params;
    NamedTensorMap optimizer;
    std::array<std::uint64_t, 4> rng;
    double lr;
};
Snapshot snapshot(const nn::Module& m, const optim::Optimizer& o)
{
    Snapshot s;
    for (const auto& p : m.parameters()) s.params.push_back(values(p));
    for (const auto& [k, t] : o.state_dict()) s.optimizer[k] = t.clone();
    s.rng = default_generator().state();
    s.lr = o.lr();
    return s;
}
void check_same(const Snapshot& a, const Snapshot& b)
{
    CHECK(a.params == b.params);
    REQUIRE(a.optimizer.size() == b.optimizer.size());
    for (const auto& [k, t] : a.optimizer) CHECK_MESSAGE(values(t) == values(b.optimizer.at(k)), k);
    CHECK(a.rng == b.rng);
    CHECK(a.lr == b.lr);
}
}  // namespace

TEST_CASE("load_checkpoint with a malformed part changes nothing and names the file")
{
    TempDir dir;
    manual_seed(5);
    nn::GRU model(nn::GRUOptions(2, 3));
    optim::Adam opt(model.parameters(), optim::AdamOptions(0.05));
    optim::StepLR schedule(opt, 2, 0.5);
    for (auto& p : model.parameters()) p.set_grad(ones_like(p));
    opt.step();
    schedule.step();
    const std::string good = dir.file("good.safetensors");
    optim::save_checkpoint(good, model, opt, &schedule, {.epoch = 1, .step = 10});

    // Train on, so that a load which changed anything would show.
    for (auto& p : model.parameters()) p.set_grad(full_like(p, 0.3));
    opt.step();
    (void)randn({3});
    const Snapshot before = snapshot(model, opt);

    const auto corrupt = [&](const std::string& name, const std::function<void(NamedTensorMap&)>& change) {
        SafetensorsContents file = load_with_metadata(good);
        change(file.tensors);
        const std::string path = dir.file(name);
        save(path, file.tensors, file.metadata);
        return path;
    };
    const std::vector<std::pair<std::string, std::function<void(NamedTensorMap&)>>> cases = {
        {"counter.step", [](NamedTensorMap& t) { t["counter.step"] = zeros({3}, kInt64); }},
        {"counter.epoch", [](NamedTensorMap& t) { t["counter.epoch"] = scalar_tensor(-1, kInt64); }},
        {"step.0", [](NamedTensorMap& t) { t["optimizer.step.0"] = zeros({2}, kInt64); }},
        {"exp_avg", [](NamedTensorMap& t) { t["optimizer.state.0.exp_avg"] = zeros({1}); }},
        {"base_lr", [](NamedTensorMap& t) { t.erase("scheduler.base_lr.0"); }},
        {"weight_hh_l0", [](NamedTensorMap& t) { t["model.weight_hh_l0"] = zeros({2, 2}); }},
    };
    for (const auto& [what, change] : cases) {
        CAPTURE(what);
        const std::string path = corrupt(what + ".safetensors", change);
        check_error([&] { (void)optim::load_checkpoint(path, model, opt, &schedule); }, {"load_checkpoint", path, what});
        check_same(before, snapshot(model, opt));
        CHECK(schedule.last_epoch() == 1);
    }
    const auto info = optim::load_checkpoint(good, model, opt, &schedule);  // the good one still loads
    CHECK(info.step == 10);
}

TEST_CASE("a backward whose hook threw releases nothing and can be run again")
{
    Tensor w = tensor({1, 2}, kFloat64).requires_grad_();
    Tensor h = tanh(w * 3.0);
    bool fail = true;
    h.register_hook([&](const Tensor& g) -> Tensor {
        if (fail) throw Error("hook: refused");
        return g;
    });
    Tensor loss = h.sum();
    check_error([&] { loss.backward(); }, {"hook: refused"});
    CHECK(!w.grad().defined());
    fail = false;
    loss.backward();  // not "released": the failed sweep released nothing
    CHECK(w.grad().defined());
}
