#include "checkpoint.hpp"

#include <cstring>

#include "../core/random.hpp"

namespace loom::optim {

namespace {

const std::string kModel = "model.", kOptimizer = "optimizer.", kScheduler = "scheduler.", kUser = "user.";

NamedTensorMap with_prefix(const std::string& prefix, const std::map<std::string, Tensor>& tensors)
{
    NamedTensorMap out;
    for (const auto& [k, v] : tensors) out[prefix + k] = v;
    return out;
}

NamedTensorMap strip_prefix(const std::string& prefix, const NamedTensorMap& tensors)
{
    NamedTensorMap out;
    for (const auto& [k, v] : tensors)
        if (k.rfind(prefix, 0) == 0) out[k.substr(prefix.size())] = v;
    return out;
}

std::string value_of(const Metadata& m, const std::string& key)
{
    const auto it = m.find(key);
    return it == m.end() ? std::string("none") : it->second;
}

}  // namespace

void save_checkpoint(const std::string& path, const nn::Module& model, const Optimizer& optimizer,
                     const Schedule* scheduler, const CheckpointInfo& info)
{
    NamedTensorMap all = with_prefix(kModel, model.state_dict());
    all.merge(with_prefix(kOptimizer, optimizer.state_dict()));
    if (scheduler) all.merge(with_prefix(kScheduler, scheduler->state_dict()));
    const auto rng = default_generator().state();
    std::vector<std::int64_t> words(rng.size());
    std::memcpy(words.data(), rng.data(), sizeof(std::uint64_t) * rng.size());
    all["rng.default"] = from_vector<std::int64_t>(words, {static_cast<std::int64_t>(words.size())});
    all["counter.epoch"] = scalar_tensor(double(info.epoch), kInt64);
    all["counter.step"] = scalar_tensor(double(info.step), kInt64);
    Metadata meta;
    for (const auto& [k, v] : info.metadata) meta[kUser + k] = v;
    meta["loom.optimizer"] = optimizer.name();
    meta["loom.scheduler"] = scheduler ? scheduler->name() : "none";
    meta["loom.model"] = model.type_name();
    save(path, all, meta);
}

CheckpointInfo load_checkpoint(const std::string& path, nn::Module& model, Optimizer& optimizer, Schedule* scheduler)
{
    const SafetensorsContents file = load_with_metadata(path);
    const auto rng = file.tensors.find("rng.default");
    LOOM_CHECK(rng != file.tensors.end() && rng->second.sizes() == Shape{4} && rng->second.dtype() == kInt64 &&
                   file.tensors.count("counter.epoch") && file.tensors.count("counter.step"),
               "load_checkpoint", "{} is not a loom training checkpoint (no random state or counters)", path);
    // Everything read and checked before anything changes.
    const auto counter = [&](const std::string& key) {
        const Tensor& t = file.tensors.at(key);
        LOOM_CHECK(t.numel() == 1 && t.dtype() == kInt64, "load_checkpoint",
                   "{}: \"{}\" is {} {}, expected one int64 value", path, key, t.dtype(), t.sizes());
        const auto v = t.item<std::int64_t>();
        LOOM_CHECK(v >= 0, "load_checkpoint", "{}: \"{}\" is {}, expected a count >= 0", path, key, v);
        return v;
    };
    CheckpointInfo info;
    info.epoch = counter("counter.epoch");
    info.step = counter("counter.step");
    for (const auto& [k, v] : file.metadata)
        if (k.rfind(kUser, 0) == 0) info.metadata[k.substr(kUser.size())] = v;

    const std::string saved_optimizer = value_of(file.metadata, "loom.optimizer");
    const std::string saved_scheduler = value_of(file.metadata, "loom.scheduler");
    LOOM_CHECK(saved_optimizer == optimizer.name(), "load_checkpoint", "{} holds {} state, the optimizer is {}", path,
               saved_optimizer, optimizer.name());
    LOOM_CHECK(saved_scheduler == (scheduler ? scheduler->name() : "none"), "load_checkpoint",
               "{} holds {} schedule state, the schedule given is {}", path, saved_scheduler,
               scheduler ? scheduler->name() : "none");
    // Each part checks its state before taking it; should a later part refuse, the earlier ones
    // are put back, so a mismatch changes nothing.
    const NamedTensorMap model_state = strip_prefix(kModel, file.tensors);
    NamedTensorMap model_backup;
    for (const auto& [k, v] : model.state_dict()) model_backup[k] = v.clone();
    const NamedTensorMap optimizer_backup = optimizer.state_dict();
    try {
        try {
            model.load_state_dict(model_state);
        } catch (const Error& e) {
            fail("load_checkpoint", "{} was saved from a different model: {}", path, e.what());
        }
        optimizer.load_state_dict(strip_prefix(kOptimizer, file.tensors));
        if (scheduler) scheduler->load_state_dict(strip_prefix(kScheduler, file.tensors));
    } catch (const Error& e) {
        model.load_state_dict(model_backup);
        optimizer.load_state_dict(optimizer_backup);
        const std::string what = e.what();
        if (what.find(path) != std::string::npos) throw;
        fail("load_checkpoint", "{}: {}", path, what);
    } catch (...) {
        model.load_state_dict(model_backup);
        optimizer.load_state_dict(optimizer_backup);
        throw;
    }
    std::array<std::uint64_t, 4> state{};
    std::memcpy(state.data(), rng->second.data_ptr<std::int64_t>(), sizeof(state));
    default_generator().set_state(state);
    return info;
}

}  // namespace loom::optim
