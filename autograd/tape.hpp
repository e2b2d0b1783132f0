// The tape: one per thread. A differentiable op computes its value and, when grad mode is on
// and an input requires grad, appends one Entry: the inputs it sends gradients to, its outputs,
// the tensors it saved, and its backward function. backward() sweeps the entries in reverse.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "../core/tensor.hpp"

namespace loom {

// ---- grad mode ----
bool grad_enabled();
void set_grad_enabled(bool enabled);

// Stops recording while alive (evaluation, optimizer updates).
class NoGradGuard {
public:
    NoGradGuard() : previous_(grad_enabled()) { set_grad_enabled(false); }
    ~NoGradGuard() { set_grad_enabled(previous_); }
    NoGradGuard(const NoGradGuard&) = delete;
    NoGradGuard& operator=(const NoGradGuard&) = delete;

private:
    bool previous_;
};

// Gradients of `outputs` (scalars, or seeded by `grad_outputs`) with respect to `inputs`,
// returned without touching any .grad(). An input the outputs do not depend on is an error
// unless `allow_unused`, which returns an undefined tensor for it.
std::vector<Tensor> grad(const std::vector<Tensor>& outputs, const std::vector<Tensor>& inputs,
                         const std::vector<Tensor>& grad_outputs = {}, bool retain_graph = false,
                         bool allow_unused = false);

namespace autograd {

using Hook = std::function<Tensor(const Tensor&)>;

// Gradient bookkeeping of one tensor that requires grad.
struct Node {
    Shape shape;
    DType dtype;
    std::uint64_t seq = 0;   // sequence number of the entry that produced it; 0 for a leaf
    Tensor grad;             // accumulated .grad() (leaves, or retain_grad())
    Tensor pending;          // gradient being summed during a sweep
    bool retains_grad = false;
    bool captured = false;   // grad() wants this node's gradient
    std::vector<Hook> hooks;
};

// A tensor saved for backward, with the storage version it had when saved.
struct Saved {
    Tensor value;  // detached: saving never keeps a node alive
    std::uint64_t version;
};

// What an entry's backward function receives.
struct BackwardContext {
    std::vector<Tensor> grads;   // one per output; undefined where no gradient arrived
    std::vector<Tensor> saved;   // in the order given to record()
    std::vector<bool> needs;     // per input: does it want a gradient?
    const Tensor& grad() const { return grads[0]; }
};

// Returns one gradient per input (undefined where not needed), each of that input's shape.
using BackwardFn = std::function<std::vector<Tensor>(const BackwardContext&)>;

struct Entry {
    std::uint64_t seq;
    const char* name;
    std::vector<std::shared_ptr<Node>> inputs;  // null where an input does not require grad
    std::vector<std::weak_ptr<Node>> outputs;   // weak: the tape alone never keeps a result alive
    std::vector<Saved> saved;
    BackwardFn backward;
    bool released = false;
};

// True when an op on these inputs must be recorded.
bool should_record(std::initializer_list<Tensor> inputs);
bool should_record(const std::vector<Tensor>& inputs);

// Appends one entry for `outputs = name(inputs)` and marks each output as requiring grad.
void push_entry(const char* name, const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                const std::vector<Tensor>& saved, BackwardFn backward);

// The usual single-output case: records when needed and returns `output`.
template <class F>
Tensor record(const char* name, std::initializer_list<Tensor> inputs, Tensor output,
              std::initializer_list<Tensor> saved, F&& backward)
{
    if (should_record(inputs)) push_entry(name, inputs, {output}, saved, BackwardFn(std::forward<F>(backward)));
    return output;
}

template <class F>
Tensor record(const char* name, const std::vector<Tensor>& inputs, Tensor output,
              std::initializer_list<Tensor> saved, F&& backward)
{
    if (should_record(inputs)) push_entry(name, inputs, {output}, saved, BackwardFn(std::forward<F>(backward)));
    return output;
}

// Number of entries on this thread's tape (live or released but not yet reclaimed).
std::size_t tape_size();

}  // namespace autograd
}  // namespace loom
