// Defect classes 7 and 9: every failure from loom's API is a loom::Error, and its message names
// the op the user called and the real problem.
#include "helpers.hpp"

#include <fstream>

using namespace loom;
using testing::check_error;
using testing::TempDir;

TEST_CASE("files that are not safetensors files give loom::Error naming them")
{
    TempDir dir;
    check_error([&] { (void)load(dir.path.string()); }, {"load", dir.path.string(), "not a regular file"});
    check_error([] { (void)load("/proc/self/status"); }, {"load", "/proc/self/status"});
    check_error([&] { (void)load(dir.file("missing.safetensors")); }, {"load", "missing.safetensors", "cannot open"});
    std::ofstream(dir.file("empty.safetensors")).close();
    check_error([&] { (void)load(dir.file("empty.safetensors")); }, {"load", "empty.safetensors", "too short"});
}

TEST_CASE("malformed optimizer keys and groups give loom::Error")
{
    Tensor p = zeros({2}).requires_grad_();
    optim::Adam adam({p});
    p.set_grad(ones({2}));
    adam.step();
    NamedTensorMap state = adam.state_dict();
    state["state.x.exp_avg"] = zeros({2});
    check_error([&] { adam.load_state_dict(state); }, {"Adam", "state.x.exp_avg"});
    state.erase("state.x.exp_avg");
    state["state.12345678901234567890123.exp_avg"] = zeros({2});
    check_error([&] { adam.load_state_dict(state); }, {"Adam", "12345678901234567890123"});
    check_error([] { optim::Adam(std::vector<optim::ParamGroup<optim::AdamOptions>>{}); }, {"optimizer", "group"});
    check_error([&] { (void)adam.lr(1); }, {"Adam", "group 1"});
}

TEST_CASE("messages name the op called and the real problem")
{
    check_error([] { (void)arange(0, 1e20); }, {"arange", "more than a tensor can hold"});
    check_error([] { (void)ones({2, 3}).mean({5}); }, {"mean", "dim 5"});
    check_error([] { (void)ones({2, 3}).var({0, 0}); }, {"var", "repeats"});
    check_error([] { (void)ones({2, 3}).norm(2, {-3}); }, {"norm", "dim -3"});
    {
        Shape many(65, 1);  // a reduction keeps its dims as 64 bits; 64 dims still reduce
        check_error([&] { (void)ones(many).sum(); }, {"sum", "at most 64 dims", "65"});
        many.pop_back();
        CHECK(ones(many).sum({63}).dim() == 63);
    }
    {
        nn::Dense d(2, 2);
        check_error([&] { d.load_state_dict({{"weight", Tensor()}, {"bias", zeros({2})}}); },
                    {"load_state_dict", "weight", "undefined"});
    }
    {
        // minimum's backward names minimum (it used to say maximum).
        Tensor a = tensor({1, 2}).requires_grad_();
        Tensor m = minimum(a, tensor({2, 1}));
        CHECK(m.requires_grad());
        check_error([] { (void)minimum(tensor({1}), tensor({1}, kFloat64)); }, {"minimum", "dtypes differ"});
    }
    check_error([] { (void)ones({2}).narrow(0, 2, INT64_MAX); }, {"narrow", "length 9223372036854775807"});
    check_error([] { (void)randint(5, 5, {2}); }, {"randint", "low < high"});
}
