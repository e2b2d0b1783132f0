// Smith's learning-rate range test, as a callback over fit().
#include "train.hpp"

#include <cmath>

namespace loom::train {

namespace {

// Sets each step's rate before its batch, smooths the losses after, stops at divergence.
struct RangeTest final : Callback {
    const LrFindOptions& o;
    LrFindResult& result;
    double average = 0, best = INFINITY;
    bool diverged = false;  // the last loss recorded is the one that diverged
    RangeTest(const LrFindOptions& options, LrFindResult& r) : o(options), result(r) {}

    double rate(std::int64_t step) const
    {
        return o.start_lr * std::pow(o.end_lr / o.start_lr, double(step) / double(o.steps - 1));
    }
    void on_batch_begin(FitState& state) override { state.optimizer.set_lr(rate(state.step)); }
    void on_batch_end(FitState& state) override
    {
        const double loss = state.loss.item<double>();
        const auto k = static_cast<double>(result.losses.size() + 1);
        average = o.smoothing * average + (1 - o.smoothing) * loss;
        const double smoothed = average / (1 - std::pow(o.smoothing, k));
        result.lrs.push_back(rate(state.step - 1));
        result.losses.push_back(smoothed);
        best = std::min(best, smoothed);
        diverged = !std::isfinite(smoothed) || smoothed > o.diverge * best;
        if (diverged || state.step >= o.steps) state.stop_training = true;
    }
};

}  // namespace

LrFindResult lr_find(nn::Module& model, optim::Optimizer& optimizer, const ForwardFn& forward, const LossFn& loss,
                     const Dataset& data, const LrFindOptions& o)
{
    LOOM_CHECK(o.start_lr > 0 && o.end_lr > o.start_lr, "lr_find", "expects 0 < start_lr < end_lr, got {} and {}",
               o.start_lr, o.end_lr);
    LOOM_CHECK(o.steps >= 2, "lr_find", "expects steps >= 2, got {}", o.steps);
    LOOM_CHECK(o.smoothing >= 0 && o.smoothing < 1, "lr_find", "expects 0 <= smoothing < 1, got {}", o.smoothing);
    LOOM_CHECK(o.diverge > 1, "lr_find", "expects diverge > 1, got {}", o.diverge);
    LOOM_CHECK(data.size > 0 && data.get, "lr_find", "the training set is empty");
    NamedTensorMap weights;
    for (const auto& [name, t] : model.state_dict()) weights[name] = t.clone();
    const NamedTensorMap optimizer_state = optimizer.state_dict();
    LrFindResult result;
    FitOptions fo;
    fo.batch_size = o.batch_size;
    fo.seed = o.seed;
    fo.verbose = false;
    fo.restore_best = false;
    const std::int64_t batches_per_epoch = (data.size + o.batch_size - 1) / o.batch_size;
    fo.epochs = (o.steps + batches_per_epoch - 1) / batches_per_epoch;
    const auto range_test = std::make_shared<RangeTest>(o, result);
    fo.callbacks = {range_test};
    try {
        (void)fit(model, optimizer, forward, loss, data, {}, fo);
    } catch (...) {
        model.load_state_dict(weights);
        optimizer.load_state_dict(optimizer_state);
        throw;
    }
    model.load_state_dict(weights);
    optimizer.load_state_dict(optimizer_state);
    // The steepest fall of the smoothed loss against log(rate), before it diverged (the sweep
    // stopped at the first loss that did, so only the last can have).
    double steepest = INFINITY;
    const std::size_t usable = result.losses.size() - (range_test->diverged ? 1 : 0);
    for (std::size_t i = 1; i < usable; ++i) {
        const double slope = (result.losses[i] - result.losses[i - 1]) / std::log(result.lrs[i] / result.lrs[i - 1]);
        if (slope < steepest) steepest = slope, result.suggested_lr = result.lrs[i];
    }
    if (!o.chart.empty()) {
        Series s{"smoothed loss", {}, {}};
        for (std::size_t i = 0; i < result.lrs.size(); ++i)
            if (std::isfinite(result.losses[i])) s.x.push_back(std::log10(result.lrs[i])), s.y.push_back(result.losses[i]);
        plot_svg(o.chart, "learning-rate range test", "log10(learning rate)", "smoothed loss", {s});
    }
    return result;
}

}  // namespace loom::train
