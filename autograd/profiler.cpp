// The profiler: a thread-local log of timed events that each Profiler copies its part of.
#include "profiler.hpp"

#include <algorithm>
#include <chrono>
#include <map>
#include <nlohmann/json.hpp>

#include "../core/allocator.hpp"
#include "../core/files_internal.hpp"
#include "tape_internal.hpp"

namespace loom::autograd {

namespace detail {
std::atomic<int> profilers_alive{0};
}  // namespace detail

namespace {

using Kind = Profiler::Event::Kind;

// This thread's events while a Profiler runs on it; cleared when the last one stops.
struct ThreadLog {
    std::vector<Profiler::Event> events;
    std::vector<std::int64_t> open;  // the running events that others nest in (not Scopes), innermost last
    int profilers = 0;               // alive on this thread
    int hidden = 0;                  // > 0 inside a backward function, whose ops are part of it
    std::uint64_t generation = 0;    // counts clears: an event begun before one is not ended after
    std::chrono::steady_clock::time_point origin;
};
thread_local ThreadLog thread_log;

std::int64_t now_ns()
{
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - thread_log.origin)
        .count();
}

std::int64_t requested_bytes() { return std::int64_t(storage_bytes_requested()); }

double ms(std::int64_t ns) { return double(ns) * 1e-6; }

const char* kind_name(Kind kind)
{
    switch (kind) {
    case Kind::Forward: return "forward";
    case Kind::Backward: return "backward";
    case Kind::Sweep: return "sweep";
    case Kind::Scope: return "scope";
    case Kind::Step: return "optimizer";
    }
    return "?";
}

// Each event's time and bytes less those of the events nested in it (Scopes nest nothing).
struct SelfCost {
    std::int64_t ns = 0, bytes = 0;
};
std::vector<SelfCost> self_costs(const std::vector<Profiler::Event>& events)
{
    std::vector<SelfCost> self(events.size());
    for (std::size_t i = 0; i < events.size(); ++i) {
        const auto& e = events[i];
        self[i].ns += e.end_ns - e.start_ns;
        self[i].bytes += e.bytes;
        if (e.parent >= 0 && e.kind != Kind::Scope) {
            self[std::size_t(e.parent)].ns -= e.end_ns - e.start_ns;
            self[std::size_t(e.parent)].bytes -= e.bytes;
        }
    }
    return self;
}

std::vector<ProfileRow> sorted(std::map<std::string, ProfileRow> rows)
{
    std::vector<ProfileRow> out;
    for (auto& [_, row] : rows) out.push_back(std::move(row));
    std::stable_sort(out.begin(), out.end(), [](const ProfileRow& a, const ProfileRow& b) { return a.total_ms() > b.total_ms(); });
    return out;
}

}  // namespace

Profiler::Profiler()
{
    auto& log = thread_log;
    if (log.profilers++ == 0) log.origin = std::chrono::steady_clock::now();
    detail::profilers_alive.fetch_add(1, std::memory_order_relaxed);
    first_ = log.events.size();
    start_ns_ = now_ns();
}

Profiler::~Profiler()
{
    // Another thread's log is not ours to stop: stopping it would unbalance that thread's count.
    if (std::this_thread::get_id() == owner_) stop();
}

void Profiler::stop()
{
    if (stop_ns_ >= 0) return;
    LOOM_CHECK(std::this_thread::get_id() == owner_, "Profiler",
               "stop() was called on another thread than the one that made the Profiler, whose ops it times");
    auto& log = thread_log;
    stop_ns_ = now_ns();
    // Its events, timed from its own start; one still running ends now.
    for (std::size_t i = first_; i < log.events.size(); ++i) {
        Event e = log.events[i];
        if (e.end_ns < 0) e.end_ns = stop_ns_;
        e.start_ns -= start_ns_;
        e.end_ns -= start_ns_;
        e.parent = e.parent >= std::int64_t(first_) ? e.parent - std::int64_t(first_) : -1;
        events_.push_back(std::move(e));
    }
    stop_ns_ -= start_ns_;
    detail::profilers_alive.fetch_sub(1, std::memory_order_relaxed);
    if (--log.profilers == 0) {
        log.events.clear();
        log.open.clear();
        log.hidden = 0;
        ++log.generation;
    }
}

const std::vector<Profiler::Event>& Profiler::events() const
{
    LOOM_CHECK(stop_ns_ >= 0, "Profiler", "read its results after stop()");
    return events_;
}

double Profiler::seconds() const
{
    return stop_ns_ >= 0 ? double(stop_ns_) * 1e-9 : double(now_ns() - start_ns_) * 1e-9;
}

namespace {

// The forward and backward events summed per key (op name or scope path). A row's forward_ms is
// the events' whole time when `inclusive`, else their self time (a scope's rows would otherwise
// count an op's nested ops twice).
template <class Key>
std::vector<ProfileRow> grouped(const std::vector<Profiler::Event>& list, Key key_of, bool inclusive)
{
    const auto self = self_costs(list);
    std::map<std::string, ProfileRow> rows;
    for (std::size_t i = 0; i < list.size(); ++i) {
        const auto& e = list[i];
        if (e.kind != Kind::Forward && e.kind != Kind::Backward) continue;
        std::string key = key_of(e);
        ProfileRow& row = rows[key];
        row.name = std::move(key);
        row.bytes += self[i].bytes;
        if (e.kind == Kind::Forward) {
            ++row.calls;
            row.forward_ms += ms(inclusive ? e.end_ns - e.start_ns : self[i].ns);
            row.self_ms += ms(self[i].ns);
        } else {
            ++row.backward_calls;
            row.backward_ms += ms(self[i].ns);
        }
    }
    return sorted(std::move(rows));
}

}  // namespace

std::vector<ProfileRow> Profiler::by_op() const
{
    return grouped(events(), [](const Event& e) { return e.name; }, true);
}

std::vector<ProfileRow> Profiler::by_scope() const
{
    return grouped(events(), [](const Event& e) { return e.scope ? *e.scope : std::string(); }, false);
}

double Profiler::untimed_ms() const
{
    std::int64_t timed = 0;
    for (const auto& e : events())
        if (e.parent < 0 && e.kind != Kind::Scope) timed += e.end_ns - e.start_ns;
    return ms(stop_ns_ - timed);
}

std::string Profiler::table(std::size_t rows) const
{
    const auto ops = by_op();
    const auto& list = events();
    const auto self = self_costs(list);
    const double total = ms(stop_ns_);
    std::int64_t sweeps = 0, steps = 0;
    double sweep_ms = 0, step_ms = 0;
    for (std::size_t i = 0; i < list.size(); ++i) {
        if (list[i].kind == Kind::Sweep) ++sweeps, sweep_ms += ms(self[i].ns);
        if (list[i].kind == Kind::Step) ++steps, step_ms += ms(self[i].ns);
    }
    const auto percent = [&](double t) { return total > 0 ? 100 * t / total : 0.0; };
    std::string out = fmt::format("{:<34} {:>8} {:>11} {:>10} {:>8} {:>11} {:>10} {:>6} {:>10}\n", "op", "calls",
                                  "forward ms", "self ms", "bw calls", "backward ms", "total ms", "%", "alloc MiB");
    const auto line = [&](const std::string& name, std::int64_t calls, double forward, double self_ms,
                          std::int64_t backward_calls, double backward, std::int64_t bytes) {
        out += fmt::format("{:<34} {:>8} {:>11.3f} {:>10.3f} {:>8} {:>11.3f} {:>10.3f} {:>6.1f} {:>10.2f}\n", name,
                           calls, forward, self_ms, backward_calls, backward, self_ms + backward,
                           percent(self_ms + backward), double(bytes) / (1 << 20));
    };
    const std::size_t shown = rows == 0 ? ops.size() : std::min(rows, ops.size());
    for (std::size_t i = 0; i < shown; ++i)
        line(ops[i].name, ops[i].calls, ops[i].forward_ms, ops[i].self_ms, ops[i].backward_calls, ops[i].backward_ms,
             ops[i].bytes);
    if (shown < ops.size()) {
        ProfileRow rest;
        for (std::size_t i = shown; i < ops.size(); ++i) {
            rest.calls += ops[i].calls, rest.forward_ms += ops[i].forward_ms, rest.self_ms += ops[i].self_ms;
            rest.backward_calls += ops[i].backward_calls, rest.backward_ms += ops[i].backward_ms, rest.bytes += ops[i].bytes;
        }
        line(fmt::format("({} more ops)", ops.size() - shown), rest.calls, rest.forward_ms, rest.self_ms,
             rest.backward_calls, rest.backward_ms, rest.bytes);
    }
    out += fmt::format("{:<34} {:>8} {:>11} {:>10} {:>8} {:>11} {:>10.3f} {:>6.1f}\n", "(sweep bookkeeping)", "", "", "",
                       sweeps, "", sweep_ms, percent(sweep_ms));
    if (steps > 0)
        out += fmt::format("{:<34} {:>8} {:>11} {:>10} {:>8} {:>11} {:>10.3f} {:>6.1f}\n", "(optimizer steps)", steps, "",
                           "", "", "", step_ms, percent(step_ms));
    const double untimed = untimed_ms();
    out += fmt::format("{:<34} {:>8} {:>11} {:>10} {:>8} {:>11} {:>10.3f} {:>6.1f}\n", "(untimed: your code between ops)",
                       "", "", "", "", "", untimed, percent(untimed));
    out += fmt::format("{:<34} {:>8} {:>11} {:>10} {:>8} {:>11} {:>10.3f}\n", "total", "", "", "", "", "", total);
    const auto scopes = by_scope();
    if (scopes.size() > 1 || (scopes.size() == 1 && !scopes[0].name.empty())) {
        out += fmt::format("\n{:<40} {:>8} {:>10} {:>8} {:>11} {:>10} {:>6}\n", "scope", "op calls", "self ms",
                           "bw calls", "backward ms", "total ms", "%");
        for (const auto& s : scopes)
            out += fmt::format("{:<40} {:>8} {:>10.3f} {:>8} {:>11.3f} {:>10.3f} {:>6.1f}\n",
                               s.name.empty() ? "(no scope)" : s.name, s.calls, s.self_ms, s.backward_calls,
                               s.backward_ms, s.total_ms(), percent(s.total_ms()));
    }
    return out;
}

void Profiler::chrome_trace(const std::string& path) const
{
    // The Trace Event format's complete events ("ph": "X"), times in microseconds.
    nlohmann::json trace_events = nlohmann::json::array();
    for (const auto& e : events()) {
        nlohmann::json args = {{"bytes", e.bytes}};
        if (e.scope) args["scope"] = *e.scope;
        trace_events.push_back({{"name", e.name},
                                {"cat", kind_name(e.kind)},
                                {"ph", "X"},
                                {"ts", double(e.start_ns) * 1e-3},
                                {"dur", double(e.end_ns - e.start_ns) * 1e-3},
                                {"pid", 1},
                                {"tid", 1},
                                {"args", std::move(args)}});
    }
    const nlohmann::json trace = {{"traceEvents", std::move(trace_events)}, {"displayTimeUnit", "ns"}};
    loom::detail::write_file_atomically(path, trace.dump(), "Profiler::chrome_trace");
}

namespace detail {

void ProfiledRegion::begin(Profiler::Event::Kind kind, const char* name,
                           const std::shared_ptr<const std::string>* scope)
{
    auto& log = thread_log;
    if (log.profilers == 0 || (log.hidden > 0 && kind == Kind::Forward)) return;
    Profiler::Event e;
    e.kind = kind;
    e.name = name;
    e.scope = scope ? *scope : engine::scope_path();
    e.parent = log.open.empty() ? -1 : log.open.back();
    index_ = std::int64_t(log.events.size());
    generation_ = log.generation;
    log.events.push_back(std::move(e));
    log.open.push_back(index_);
    hides_ops_ = kind == Kind::Backward;
    if (hides_ops_) ++log.hidden;
    bytes_at_start_ = requested_bytes();
    log.events.back().start_ns = now_ns();
}

void ProfiledRegion::end() noexcept
{
    auto& log = thread_log;
    if (generation_ != log.generation) return;  // its Profiler stopped while it ran
    const std::int64_t end = now_ns();
    auto& e = log.events[std::size_t(index_)];
    e.end_ns = end;
    e.bytes = requested_bytes() - bytes_at_start_;
    if (!log.open.empty() && log.open.back() == index_) log.open.pop_back();
    else std::erase(log.open, index_);
    if (hides_ops_) --log.hidden;
}

std::int64_t begin_scope_event(const std::string& name) noexcept
{
    if (profilers_alive.load(std::memory_order_relaxed) == 0) return -1;
    auto& log = thread_log;
    if (log.profilers == 0) return -1;
    try {
    Profiler::Event e;
    e.kind = Kind::Scope;
    e.name = name;
    e.scope = engine::scope_path();
    e.parent = log.open.empty() ? -1 : log.open.back();
    e.start_ns = now_ns();
    e.bytes = -requested_bytes();  // completed in end_scope_event
    log.events.push_back(std::move(e));
    } catch (...) {
        return -1;  // out of memory: the scope goes untimed rather than failing
    }
    return std::int64_t(log.events.size() - 1) | std::int64_t((log.generation & 0x7fffff) << 40);
}

void end_scope_event(std::int64_t token) noexcept
{
    auto& log = thread_log;
    if (token < 0 || std::uint64_t(token >> 40) != (log.generation & 0x7fffff)) return;
    const std::size_t index = std::size_t(token & ((std::int64_t(1) << 40) - 1));
    if (index >= log.events.size()) return;
    auto& e = log.events[index];
    e.end_ns = now_ns();
    e.bytes += requested_bytes();
}

}  // namespace detail

}  // namespace loom::autograd
