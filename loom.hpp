/// \file
/// loom: tensors with tape-based automatic differentiation, built for recurrent networks.
/// One header for everything a user needs.
#pragma once
#include "core/allocator.hpp"
#include "core/dtype.hpp"
#include "core/error.hpp"
#include "core/random.hpp"
#include "core/tensor.hpp"
#include "autograd/function.hpp"
#include "autograd/gradcheck.hpp"
#include "autograd/ops.hpp"
#include "autograd/tape.hpp"
#include "nn/init.hpp"
#include "nn/layers.hpp"
#include "nn/loss.hpp"
#include "nn/module.hpp"
#include "nn/recurrent.hpp"
#include "nn/safetensors.hpp"
#include "optim/checkpoint.hpp"
#include "optim/clip.hpp"
#include "optim/optimizer.hpp"
#include "optim/schedule.hpp"
#include "train/train.hpp"
