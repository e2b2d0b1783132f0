/// \file
/// autograd::Profiler: where the time of a training step goes, op by op. While a Profiler is
/// alive, every op called on its thread, every backward function a sweep runs, every Scope and
/// every optimizer step is timed, with the storage bytes it allocated; table() sums them per op
/// name and per Scope, and chrome_trace() writes the timeline for Chromium's tracing viewer
/// (chrome://tracing) or Perfetto (ui.perfetto.dev). Off by default; when no Profiler runs, an
/// op pays one relaxed atomic load.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace loom::autograd {

/// One line of Profiler's tables: an op name, or a Scope path. Times are in milliseconds.
struct ProfileRow {
    /// The op's name ("matmul"), or the scope's path ("decoder/step 3"; "" outside any Scope).
    std::string name;
    std::int64_t calls = 0;           ///< forward calls (for a scope: ops called in it)
    double forward_ms = 0;            ///< forward time including the ops it called
    double self_ms = 0;               ///< forward time less the ops it called: its own work and its recording
    std::int64_t backward_calls = 0;  ///< backward functions run by sweeps
    double backward_ms = 0;           ///< their time, including the ops they called
    std::int64_t bytes = 0;           ///< storage bytes allocated by its own forward work and its backward
    /// Its share of the step: self_ms + backward_ms.
    double total_ms() const { return self_ms + backward_ms; }
};

/// Times the ops called on this thread while alive (and until stop()), as a guard:
///
///     autograd::Profiler profiler;
///     train_one_step();
///     profiler.stop();
///     std::cout << profiler.table(15);
///     profiler.chrome_trace("step.json");
///
/// What is timed: each op of loom's (the forward computation and its recording on the tape),
/// each custom op's forward (Function::apply), each backward function a sweep runs, the sweep as
/// a whole ("backward()" / "grad()": what it adds beyond the backward functions is the tape's
/// bookkeeping), each Scope and each optimizer step. An op called inside another is timed on
/// its own and subtracted from the caller's self time. Ops that a backward function calls are
/// part of that backward's time, not forward calls of their own. Profilers nest: an inner one
/// sees what ran during its lifetime, and the outer one sees it too.
class Profiler {
public:
    /// Starts timing this thread's ops.
    Profiler();
    /// Stops, if stop() was not called.
    ~Profiler();
    Profiler(const Profiler&) = delete;
    Profiler& operator=(const Profiler&) = delete;
    /// Stops timing; the results stay readable. Calling it again does nothing. An error on
    /// another thread than the one that made it.
    void stop();
    /// Per op name, sorted by total_ms(), largest first.
    std::vector<ProfileRow> by_op() const;
    /// Per Scope path, sorted by total_ms(): the ops' self times and backward times summed by the
    /// Scope they were called (for backward: recorded) in.
    std::vector<ProfileRow> by_scope() const;
    /// Seconds from construction to stop() (or to now).
    double seconds() const;
    /// The time spent outside every timed op, backward and optimizer step (your own code, data
    /// loading), in milliseconds.
    double untimed_ms() const;
    /// An aligned table: the `rows` largest ops (0: all), then the sweeps' bookkeeping, the
    /// optimizer's steps, the untimed rest and the total; then the scopes, when there are any.
    std::string table(std::size_t rows = 0) const;
    /// Writes the timeline as a Trace Event file (JSON) at `path`, atomically.
    void chrome_trace(const std::string& path) const;

    /// What happened while profiling: one event per timed op, backward, sweep, scope or step.
    struct Event {
        /// What an event is.
        enum class Kind : std::uint8_t { Forward, Backward, Sweep, Scope, Step };
        Kind kind;                                 ///< what it is
        std::string name;                          ///< the op's (or scope's, or sweep's) name
        std::shared_ptr<const std::string> scope;  ///< Scope path it ran (backward: was recorded) in; null: none
        std::int64_t start_ns = 0;                 ///< from the Profiler's start
        std::int64_t end_ns = -1;                  ///< -1 while it runs
        std::int64_t bytes = 0;                    ///< storage bytes allocated, including nested events
        std::int64_t parent = -1;                  ///< index of the event it ran inside (not a Scope); -1: none
    };
    /// The events, in the order they began.
    const std::vector<Event>& events() const;

private:
    void copy_events() const;
    std::thread::id owner_ = std::this_thread::get_id();
    std::int64_t start_ns_ = 0, stop_ns_ = -1;
    std::size_t first_ = 0;  // index of its first event in the thread's log
    mutable std::vector<Event> events_;
    mutable bool copied_ = false;
};

namespace detail {
/// Profilers alive on any thread: what a timed region checks first, so that it costs one load
/// when there are none.
extern std::atomic<int> profilers_alive;

/// Times what runs while alive as an event of `kind` named `name`, when a Profiler runs on
/// this thread. `scope`: the Scope path to file it under (default: the current one).
class ProfiledRegion {
public:
    /// Starts the event.
    ProfiledRegion(Profiler::Event::Kind kind, const char* name,
                   const std::shared_ptr<const std::string>* scope = nullptr)
    {
        if (profilers_alive.load(std::memory_order_relaxed) != 0) [[unlikely]]
            begin(kind, name, scope);
    }
    /// Ends it.
    ~ProfiledRegion()
    {
        if (index_ >= 0) [[unlikely]]
            end();
    }
    ProfiledRegion(const ProfiledRegion&) = delete;
    ProfiledRegion& operator=(const ProfiledRegion&) = delete;

private:
    void begin(Profiler::Event::Kind kind, const char* name, const std::shared_ptr<const std::string>* scope);
    void end() noexcept;
    std::int64_t index_ = -1;  // in the thread's log; -1: not timed
    // Set by begin() and read only when it timed the region: left unset otherwise, as every op
    // makes one of these (three stores an op, 1% of an add of 14 floats with no grad).
    std::uint64_t generation_;
    std::int64_t bytes_at_start_;
    bool hides_ops_;
};

/// Times one op's forward: the first line of each of loom's ops.
struct ProfiledOp : ProfiledRegion {
    /// Starts timing op `name`.
    explicit ProfiledOp(const char* name) : ProfiledRegion(Profiler::Event::Kind::Forward, name) {}
};

/// Starts a Scope's event when profiling; a token for end_scope_event, or -1.
std::int64_t begin_scope_event(const std::string& name) noexcept;
/// Ends the Scope event begun with `token`.
void end_scope_event(std::int64_t token) noexcept;
}  // namespace detail

}  // namespace loom::autograd
