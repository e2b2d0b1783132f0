/// \file
/// Training checkpoints: model, optimizer, schedule, random state, counters and your metadata in
/// one safetensors file, written atomically, restored into freshly built objects so training
/// resumes bit for bit.
#pragma once
#include "../nn/module.hpp"
#include "../nn/safetensors.hpp"
#include "schedule.hpp"

namespace loom::optim {

/// Where training stood when a checkpoint was written.
struct CheckpointInfo {
    std::int64_t epoch = 0;  ///< epochs completed
    std::int64_t step = 0;   ///< optimizer steps taken
    Metadata metadata = {};  ///< yours: strings by name
};

/// `scheduler` may be null. The default generator's state is saved too.
void save_checkpoint(const std::string& path, const nn::Module& model, const Optimizer& optimizer,
                     const Schedule* scheduler, const CheckpointInfo& info = {});
/// Checks everything against the objects given (model keys and shapes, optimizer kind, parameter
/// count and state shapes, schedule kind) before changing any of them; then restores all of it.
CheckpointInfo load_checkpoint(const std::string& path, nn::Module& model, Optimizer& optimizer,
                               Schedule* scheduler);

}  // namespace loom::optim
