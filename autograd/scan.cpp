// scan: a step traced into a program of ops, checked against a second trace, and replayed over
// all steps on raw buffers as one tape entry (see scan.hpp).
//
// A trace watches the entries the step records (the tape shows each one to the tracer before
// pushing it) while it runs on stand-ins for the carry and x_t that require grad, so every op
// that depends on them records. Each entry becomes an instruction over numbered values; a
// tensor the step reads from outside is a parameter (it requires grad) or a constant (copied
// when traced; a second trace on other values must read the same). Values run at one of three
// rates: once per call (parameters, constants and what is made of them alone), once per step
// but before the loop (what depends on x_t and not on the carry: hoisted, one GEMM over all
// steps), or per step inside the loop (what depends on the carry).
#include "scan.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <optional>
#include <set>
#include <unordered_map>

#include "../core/kernels.hpp"
#include "../core/math.hpp"
#include "../core/random.hpp"
#include "ops.hpp"
#include "pointwise.hpp"
#include "profiler.hpp"
#include "tape_internal.hpp"

namespace loom {

namespace {

// Elementwise: computes with the formula its pointwise::Kind names (pointwise.hpp), as the eager
// op and the sweep do. Move: the output's elements are the input's, rearranged (views, reshapes,
// copies). Concat: each input's elements go to a part of the output.
enum class Op { Elementwise, Linear, Matmul, Move, Concat };

struct ReplayableOp {
    Op op;
    pointwise::Kind formula = pointwise::Kind::none;  // Elementwise only
};

// The ops a program can hold, by the name their entry is recorded under.
const std::unordered_map<std::string_view, ReplayableOp>& replayable_ops()
{
    using pointwise::Kind;
    constexpr Op E = Op::Elementwise;
    static const std::unordered_map<std::string_view, ReplayableOp> ops{
        {"add", {E, Kind::add}},       {"sub", {E, Kind::sub}},   {"mul", {E, Kind::mul}},
        {"div", {E, Kind::div}},       {"neg", {E, Kind::neg}},   {"exp", {E, Kind::exp}},
        {"log", {E, Kind::log}},       {"tanh", {E, Kind::tanh}}, {"sigmoid", {E, Kind::sigmoid}},
        {"relu", {E, Kind::relu}},     {"linear", {Op::Linear}},  {"matmul", {Op::Matmul}},
        {"reshape", {Op::Move}},       {"view", {Op::Move}},      {"squeeze", {Op::Move}},
        {"unsqueeze", {Op::Move}},     {"clone", {Op::Move}},     {"permute", {Op::Move}},
        {"expand", {Op::Move}},        {"slice", {Op::Move}},     {"select", {Op::Move}},
        {"concat", {Op::Concat}}};
    return ops;
}

enum class Source { Carry, X, Param, Const, Computed };
// Invariant: once per call. PerStep: per step, but not through the carry (hoisted before the
// loop). Carried: per step, through the carry.
enum class Rate { Invariant = 0, PerStep = 1, Carried = 2 };

struct Value {
    Source source;
    std::size_t index;  // carry k, x k, param k, const k, or the instruction computing it
    Shape shape;
    std::int64_t numel;
    Rate rate;
    bool operator==(const Value&) const = default;
};

// How an elementwise op reads an operand for output element i: element i, element 0, or map[i].
enum class Access { Same, Scalar, Mapped };

// `length` consecutive elements from input element `from` to output element `to`: a chunk of a
// [B, 4H] gate block is B runs of H, copied with memcpy rather than element by element.
struct Run {
    std::int64_t to, from, length;
    bool operator==(const Run&) const = default;
};

struct Instr {
    Op op;
    pointwise::Kind formula = pointwise::Kind::none;  // Elementwise: its formula
    std::vector<std::size_t> in;  // value ids
    std::size_t out = 0;
    std::vector<Access> access;  // elementwise: per operand
    std::vector<std::vector<std::int64_t>> maps;  // elementwise: per Mapped operand, its element for each output element
    std::vector<std::vector<Run>> runs;  // Move and Concat: per input, where its elements go
    std::int64_t n = 0, k = 0, m = 0;  // Linear: rows, in and out features; Matmul: [n, k] @ [k, m]
    // Linear: its last input, a value of the output's shape computed before the loop, is added to
    // the product (a product folded into the sum that read it; see fold_products).
    bool addend = false;
    bool operator==(const Instr&) const = default;
};

// A linear's bias: its third input, unless that is its addend.
bool has_bias(const Instr& ins) { return ins.in.size() == (ins.addend ? 4u : 3u); }

struct Program {
    DType dtype = kFloat32;
    std::vector<Value> values;
    std::vector<Instr> instrs;
    std::vector<Tensor> params;  // tensors from outside that receive gradients
    std::vector<Tensor> consts;  // tensors from outside that do not, contiguous
    std::vector<std::size_t> carry_in, x_in, carry_out, y_out;
    std::string failure;  // why it cannot be replayed; empty when it can

    void fail(std::string why)
    {
        if (failure.empty()) failure = std::move(why);
    }
    Rate rate(std::size_t v) const { return values[v].rate; }
};

// The bytes of a contiguous tensor.
const char* bytes_of(const Tensor& t)
{
    return reinterpret_cast<const char*>(t.impl().data);
}

// x flipped along its first dim (the time dim), as a new contiguous tensor.
Tensor flip_time(const Tensor& x)
{
    const Tensor in = kernels::contiguous(x);
    Tensor out = empty(in.sizes(), in.dtype());
    const std::int64_t T = in.size(0);
    const std::size_t row = T == 0 ? 0 : std::size_t(in.numel() / T) * dtype_size(in.dtype());
    char* to = const_cast<char*>(bytes_of(out));
    for (std::int64_t t = 0; t < T; ++t) std::memcpy(to + std::size_t(T - 1 - t) * row, bytes_of(in) + std::size_t(t) * row, row);
    return out;
}

// Calls f(offset) for every element of `shape` in row-major order, offset = sum of index * stride.
template <class F> void for_each_index(const Shape& shape, const Shape& strides, std::int64_t start, F&& f)
{
    const std::size_t D = shape.size();
    std::int64_t total = 1;
    for (std::int64_t s : shape) total *= s;
    if (total == 0) return;
    Shape index(D, 0);  // inline: no allocation per call
    std::int64_t offset = start;
    for (std::int64_t i = 0; i < total; ++i) {
        f(offset);
        for (std::size_t d = D; d-- > 0;) {
            if (++index[d] < shape[d]) {
                offset += strides[d];
                break;
            }
            offset -= strides[d] * (shape[d] - 1);
            index[d] = 0;
        }
    }
}

// For each element of `out` (row-major), the element of `in` it reads under broadcasting.
std::vector<std::int64_t> broadcast_map(const Shape& in, const Shape& out)
{
    const Shape own = contiguous_strides(in);
    Shape strides(out.size(), 0);
    for (std::size_t j = 0; j < in.size(); ++j) {
        const std::size_t d = out.size() - in.size() + j;
        strides[d] = in[j] == 1 ? 0 : own[j];
    }
    std::vector<std::int64_t> map;
    for_each_index(out, strides, 0, [&](std::int64_t i) { map.push_back(i); });
    return map;
}

// For a view `out` of `in` (both read through their strides over one storage): the element of
// `in` (row-major) that each element of `out` is. Empty when some element is not found.
std::vector<std::int64_t> view_map(const Tensor& in, const Tensor& out)
{
    std::vector<std::int64_t> map;
    if (in.is_contiguous()) {  // the usual case, and cheap: an element's offset is its index
        map.reserve(std::size_t(out.numel()));
        bool inside = true;
        for_each_index(out.sizes(), out.strides(), out.storage_offset() - in.storage_offset(), [&](std::int64_t i) {
            inside = inside && i >= 0 && i < in.numel();
            map.push_back(i);
        });
        return inside ? map : std::vector<std::int64_t>();
    }
    std::unordered_map<std::int64_t, std::int64_t> element_at;  // storage offset -> in's element
    std::int64_t next = 0;
    for_each_index(in.sizes(), in.strides(), in.storage_offset(), [&](std::int64_t off) { element_at.emplace(off, next++); });
    bool found = true;
    for_each_index(out.sizes(), out.strides(), out.storage_offset(), [&](std::int64_t off) {
        const auto it = element_at.find(off);
        found = found && it != element_at.end();
        map.push_back(found ? it->second : 0);
    });
    return found ? map : std::vector<std::int64_t>();
}

// `index` as runs: output element i reads input element index[i] (gather), or input element i
// goes to output element index[i] (scatter).
std::vector<Run> runs_of(const std::vector<std::int64_t>& index, bool gather)
{
    std::vector<Run> runs;
    for (std::size_t i = 0; i < index.size(); ++i) {
        const std::int64_t to = gather ? std::int64_t(i) : index[i], from = gather ? index[i] : std::int64_t(i);
        if (!runs.empty() && runs.back().to + runs.back().length == to && runs.back().from + runs.back().length == from)
            ++runs.back().length;
        else
            runs.push_back(Run{to, from, 1});
    }
    return runs;
}

// Watches one run of the step and writes down its program.
class StepTracer final : public autograd::engine::Tracer {
public:
    StepTracer(Program& p, const std::vector<Tensor>& declared_params) : p_(p)
    {
        for (const Tensor& t : declared_params)
            if (t.defined()) declared_.insert(&t.impl());
    }

    // A stand-in for carry k or x k: a fresh leaf that requires grad, so that every op on it records.
    Tensor stand_in(Source source, std::size_t k, const Tensor& value)
    {
        Tensor t = value.detach().clone().requires_grad_();
        const std::size_t id = add_value(source, k, t);
        (source == Source::Carry ? p_.carry_in : p_.x_in).push_back(id);
        return t;
    }

    // The value `t` is: one the trace computed, or one from outside, numbered now.
    std::size_t value_of(const Tensor& t)
    {
        if (!t.defined()) {
            p_.fail("the step returned an undefined tensor");
            return 0;
        }
        if (const auto it = ids_.find(&t.impl()); it != ids_.end()) return it->second;
        if (t.dtype() != p_.dtype)
            p_.fail(fmt::format("the step reads a {} tensor of shape {}; scan replays steps computing in the "
                                "carry's dtype, {}",
                                t.dtype(), t.sizes(), p_.dtype));
        if (t.requires_grad() || declared_.count(&t.impl())) {
            p_.params.push_back(t);
            return add_value(Source::Param, p_.params.size() - 1, t);
        }
        p_.consts.push_back(kernels::contiguous(t));
        return add_value(Source::Const, p_.consts.size() - 1, t);
    }

    void on_entry(const char* name, std::span<const Tensor> inputs, std::span<const Tensor> outputs) override
    {
        if (!p_.failure.empty()) return;
        const auto op = replayable_ops().find(name);
        if (op == replayable_ops().end()) return p_.fail(fmt::format("it cannot replay op '{}'", name));
        if (outputs.size() != 1) return p_.fail(fmt::format("op '{}' has {} outputs", name, outputs.size()));
        const Tensor& out = outputs[0];
        if (out.dtype() != p_.dtype)
            return p_.fail(fmt::format("op '{}' computes in {}, the carry in {}", name, out.dtype(), p_.dtype));
        Instr ins{op->second.op, op->second.formula, {}, 0, {}, {}, {}, 0, 0, 0};
        std::vector<const Tensor*> read;
        for (const Tensor& t : inputs)
            if (t.defined()) read.push_back(&t), ins.in.push_back(value_of(t));
        if (!p_.failure.empty()) return;
        const Shape& shape = out.sizes();
        switch (ins.op) {
        case Op::Linear: {
            const Shape& w = read[1]->sizes();
            ins.k = w[1], ins.m = w[0], ins.n = ins.k == 0 ? 0 : read[0]->numel() / ins.k;
            break;
        }
        case Op::Matmul:
            if (read[0]->dim() != 2 || read[1]->dim() != 2)
                return p_.fail(fmt::format("it replays matmul of 2-d operands, not {} @ {}", read[0]->sizes(),
                                           read[1]->sizes()));
            ins.n = read[0]->size(0), ins.k = read[0]->size(1), ins.m = read[1]->size(1);
            break;
        case Op::Move: {
            const std::string_view n(name);
            // reshape, view, squeeze, unsqueeze and clone keep the row-major order of the elements.
            if (n == "permute" || n == "expand" || n == "slice" || n == "select") {
                if (read[0]->impl().storage != out.impl().storage)
                    return p_.fail(fmt::format("op '{}' copied instead of making a view", name));
                const std::vector<std::int64_t> map = view_map(*read[0], out);
                if (map.empty() && out.numel() > 0)
                    return p_.fail(fmt::format("op '{}' made a view scan cannot follow", name));
                ins.runs.push_back(runs_of(map, true));
            } else {
                ins.runs.push_back({Run{0, 0, out.numel()}});
            }
            break;
        }
        case Op::Concat: {
            std::size_t dim = 0;
            for (std::size_t d = 0; d < shape.size(); ++d)
                if (shape[d] != read[0]->sizes()[d]) dim = d;
            const Shape strides = contiguous_strides(shape);
            std::int64_t at = 0;
            for (const Tensor* t : read) {
                std::vector<std::int64_t> positions;
                for_each_index(t->sizes(), strides, at * strides[dim], [&](std::int64_t off) { positions.push_back(off); });
                ins.runs.push_back(runs_of(positions, false));
                at += t->sizes()[dim];
            }
            break;
        }
        case Op::Elementwise:
            for (const Tensor* t : read) {
                if (t->sizes() == shape) {
                    ins.access.push_back(Access::Same);
                } else if (t->numel() == 1) {
                    ins.access.push_back(Access::Scalar);
                } else {
                    ins.access.push_back(Access::Mapped);
                    ins.maps.push_back(broadcast_map(t->sizes(), shape));
                }
            }
        }
        ins.out = add_value(Source::Computed, p_.instrs.size(), out);
        p_.instrs.push_back(std::move(ins));
    }

private:
    std::size_t add_value(Source source, std::size_t k, const Tensor& t)
    {
        p_.values.push_back(Value{source, k, t.sizes(), t.numel(), Rate::Invariant});
        ids_[&t.impl()] = p_.values.size() - 1;
        keep_.push_back(t);  // alive until the trace ends, so no other tensor takes its address
        return p_.values.size() - 1;
    }

    Program& p_;
    std::set<const TensorImpl*> declared_;
    std::unordered_map<const TensorImpl*, std::size_t> ids_;
    std::vector<Tensor> keep_;
};

// Shows entries to `tracer` while alive.
struct Tracing {
    explicit Tracing(autograd::engine::Tracer* tracer) : previous(autograd::engine::current_tracer)
    {
        autograd::engine::current_tracer = tracer;
    }
    ~Tracing() { autograd::engine::current_tracer = previous; }
    autograd::engine::Tracer* previous;
};

// Values of t's shape and dtype that are neither t's nor anything a step would make: the second
// trace runs on them, so that a value the step derives from its inputs without recording an op
// (a comparison, a detach) differs between the traces.
Tensor other_values(const Tensor& t, std::uint64_t& seed)
{
    Tensor out = empty(t.sizes(), t.dtype());
    const auto fill = [&](auto* data) {
        for (std::int64_t i = 0; i < out.numel(); ++i) {
            std::uint64_t z = (seed += 0x9e3779b97f4a7c15ull);  // splitmix64: no Generator is drawn from
            z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
            z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
            z ^= z >> 31;
            data[i] = static_cast<std::remove_pointer_t<decltype(data)>>(double(z >> 11) * 0x1.0p-53 * 3.0 - 1.5);
        }
    };
    if (t.dtype() == kFloat64) fill(out.data_ptr<double>());
    else fill(out.data_ptr<float>());
    return out;
}

// Traces one step on stand-ins holding `carry` and `x`.
Program trace_step(const ScanStep& step, const std::vector<Tensor>& carry, const std::vector<Tensor>& x,
                   const std::vector<Tensor>& params)
{
    Program p;
    p.dtype = carry.empty() ? x[0].dtype() : carry[0].dtype();
    StepTracer tracer(p, params);
    std::vector<Tensor> c, xt;
    for (std::size_t k = 0; k < carry.size(); ++k) c.push_back(tracer.stand_in(Source::Carry, k, carry[k]));
    for (std::size_t k = 0; k < x.size(); ++k) xt.push_back(tracer.stand_in(Source::X, k, x[k]));
    ScanStepResult r;
    {
        const GradModeGuard recording(true);
        const Tracing tracing(&tracer);
        r = step(c, xt);
    }
    if (r.carry.size() != carry.size()) {
        p.fail(fmt::format("the step returned {} carry tensors for {}", r.carry.size(), carry.size()));
        return p;
    }
    for (std::size_t k = 0; k < r.carry.size(); ++k) {
        if (r.carry[k].defined() && r.carry[k].sizes() != carry[k].sizes())
            p.fail(fmt::format("the step returned carry {} of shape {} for {}", k, r.carry[k].sizes(), carry[k].sizes()));
        p.carry_out.push_back(tracer.value_of(r.carry[k]));
    }
    for (const Tensor& y : r.y) p.y_out.push_back(tracer.value_of(y));
    return p;
}

// trace_step, after which the entries the trace recorded, which nothing holds any more, leave
// the tape at once: else they would wait for compaction, and a training step's tape, never all
// released, would not be emptied by its backward.
Program trace(const ScanStep& step, const std::vector<Tensor>& carry, const std::vector<Tensor>& x,
              const std::vector<Tensor>& params)
{
    const std::uint64_t first = autograd::detail::next_sequence();
    Program p = trace_step(step, carry, x, params);
    autograd::engine::compact_since(first);
    return p;
}

// Whether two contiguous tensors hold the same bytes in the same shape.
bool same_values(const Tensor& u, const Tensor& v)
{
    return u.sizes() == v.sizes() && u.dtype() == v.dtype() &&
           std::memcmp(bytes_of(u), bytes_of(v), std::size_t(u.numel()) * dtype_size(u.dtype())) == 0;
}

// Whether two traces ran the same ops on the same shapes and returned the same values.
bool same_ops(const Program& a, const Program& b)
{
    return a.dtype == b.dtype && a.values == b.values && a.instrs == b.instrs && a.carry_in == b.carry_in &&
           a.x_in == b.x_in && a.carry_out == b.carry_out && a.y_out == b.y_out;
}

// The first difference between two traces of the step, or "" when they are the same program.
std::string difference(const Program& a, const Program& b)
{
    if (!same_ops(a, b))
        return a.values == b.values && a.instrs == b.instrs
                   ? "two traces of the step returned different values"
                   : "two traces of the step ran different ops or shapes (its ops depend on the data)";
    for (std::size_t k = 0; k < a.params.size(); ++k)
        if (&a.params[k].impl() != &b.params[k].impl()) return "two traces of the step read different parameters";
    for (std::size_t k = 0; k < a.consts.size(); ++k) {
        const Tensor& u = a.consts[k];
        if (!same_values(u, b.consts[k]))
            return fmt::format("a tensor the step makes without recording an op (of shape {}) differed between two "
                               "traces (random numbers, or a value derived from the data without gradient)",
                               u.sizes());
    }
    return {};
}

// The programs this thread compiled lately, each with the trace it came from. A call whose first
// trace is one of these (the same ops, shapes and parameters, equal constants) replays its
// program without tracing again or compiling: that trace and a second one on other values
// agreed when it was compiled. Parameters are held weakly: a program never keeps a model alive.
class ProgramCache {
public:
    static std::shared_ptr<const Program> find(const Program& traced)
    {
        auto& entries = cache();
        for (std::size_t k = 0; k < entries.size(); ++k)
            if (entries[k].matches(traced)) {
                std::rotate(entries.begin(), entries.begin() + std::ptrdiff_t(k), entries.begin() + std::ptrdiff_t(k) + 1);
                return entries.front().compiled;
            }
        return nullptr;
    }
    static std::shared_ptr<const Program> add(const Program& traced, Program compiled)
    {
        Entry e;
        e.trace = traced;
        for (const Tensor& t : traced.params) e.params.emplace_back(t);
        e.trace.params.clear();
        e.compiled = std::make_shared<const Program>(std::move(compiled));
        auto& entries = cache();
        if (entries.size() == capacity) entries.pop_back();
        entries.insert(entries.begin(), std::move(e));
        return entries.front().compiled;
    }

private:
    static constexpr std::size_t capacity = 8;
    struct Entry {
        Program trace;  // without its parameters
        std::vector<detail::WeakTensor> params;
        std::shared_ptr<const Program> compiled;

        bool matches(const Program& t) const
        {
            if (!same_ops(t, trace) || t.params.size() != params.size() || t.consts.size() != trace.consts.size())
                return false;
            for (std::size_t k = 0; k < params.size(); ++k)
                if (!params[k].lock().is_same(t.params[k])) return false;
            for (std::size_t k = 0; k < trace.consts.size(); ++k)
                if (!same_values(trace.consts[k], t.consts[k])) return false;
            return true;
        }
    };
    static std::vector<Entry>& cache()
    {
        thread_local std::vector<Entry> entries;
        return entries;
    }
};

// The values from which a gradient reaches an output that received one (`seeds`: the final
// carries', then the stacked ys'), over `steps` steps. The eager loop gives an input with no such
// path no gradient at all, not zeros (an optimizer then skips it), so the replay must too. A y is
// seeded at every step, a final carry at the last; a carry read by the next step is reached when
// what that step computes from it is, one step further back per round.
std::vector<bool> reached_values(const Program& p, const SmallVector<Tensor, 2>& seeds, std::int64_t steps)
{
    std::vector<bool> reached(p.values.size(), false);
    const std::size_t S = p.carry_out.size();
    for (std::size_t k = 0; k < S; ++k)
        if (seeds[k].defined()) reached[p.carry_out[k]] = true;
    for (std::size_t k = 0; k < p.y_out.size(); ++k)
        if (seeds[S + k].defined()) reached[p.y_out[k]] = true;
    for (std::int64_t step = 0; step < steps; ++step) {
        for (std::size_t i = p.instrs.size(); i-- > 0;)
            if (reached[p.instrs[i].out])
                for (std::size_t v : p.instrs[i].in) reached[v] = true;
        if (step + 1 == steps) break;  // no step before the first
        // Marked after the test of every carry: a carry passed on as another is one step each.
        std::vector<std::size_t> earlier;
        for (std::size_t k = 0; k < S; ++k)
            if (reached[p.carry_in[k]] && !reached[p.carry_out[k]]) earlier.push_back(p.carry_out[k]);
        if (earlier.empty()) break;
        for (std::size_t v : earlier) reached[v] = true;
    }
    return reached;
}

// The instruction of a value no result reads, dropped by compile().
constexpr std::size_t kNoInstr = ~std::size_t(0);

// A product inside the loop added to a value computed before it, as every gated cell adds
// h W_hh^T + b_hh to x_t W_ih^T + b_ih: the sum becomes the product with that value as its
// addend, so a step adds the two into the sum's buffer and accumulates the GEMM there, as the
// fused layers do, instead of writing the product and adding it in another pass. The product
// instruction, read by nothing now, is dropped by compile().
void fold_products(Program& p)
{
    std::vector<int> readers(p.values.size(), 0);
    for (const Instr& ins : p.instrs)
        for (std::size_t v : ins.in) ++readers[v];
    for (const std::vector<std::size_t>* results : {&p.carry_out, &p.y_out})
        for (std::size_t v : *results) ++readers[v];
    for (Instr& sum : p.instrs) {
        if (sum.formula != pointwise::Kind::add || p.rate(sum.out) != Rate::Carried ||
            sum.access[0] != Access::Same || sum.access[1] != Access::Same)
            continue;
        for (std::size_t side = 0; side < 2; ++side) {
            const std::size_t product = sum.in[side], other = sum.in[1 - side];
            const Value& v = p.values[product];
            if (v.source != Source::Computed || readers[product] != 1 || p.rate(other) != Rate::PerStep) continue;
            const Instr& linear = p.instrs[v.index];
            if (linear.op != Op::Linear || linear.addend) continue;
            Instr folded = linear;
            folded.out = sum.out;
            folded.in.push_back(other);
            folded.addend = true;
            sum = std::move(folded);
            break;
        }
    }
}

// Sets each value's rate, folds products into sums, drops instructions no result reads, and
// checks what the replay needs.
void compile(Program& p)
{
    for (std::size_t v : p.carry_in) p.values[v].rate = Rate::Carried;
    for (std::size_t v : p.x_in) p.values[v].rate = Rate::PerStep;
    for (const Instr& ins : p.instrs) {
        Rate r = Rate::Invariant;
        for (std::size_t v : ins.in) r = std::max(r, p.rate(v));
        p.values[ins.out].rate = r;
        if (ins.op == Op::Linear)
            for (std::size_t j = 1; j < ins.in.size(); ++j)
                if (p.rate(ins.in[j]) != Rate::Invariant) p.fail("a linear's weight or bias changes from step to step");
    }
    fold_products(p);
    std::vector<bool> live(p.values.size(), false);
    for (std::size_t v : p.carry_out) live[v] = true;
    for (std::size_t v : p.y_out) live[v] = true;
    std::vector<bool> keep(p.instrs.size(), false);
    for (std::size_t i = p.instrs.size(); i-- > 0;)
        if (live[p.instrs[i].out]) {
            keep[i] = true;
            for (std::size_t v : p.instrs[i].in) live[v] = true;
        }
    std::vector<Instr> kept;
    for (std::size_t i = 0; i < p.instrs.size(); ++i) {
        p.values[p.instrs[i].out].index = keep[i] ? kept.size() : kNoInstr;
        if (keep[i]) kept.push_back(std::move(p.instrs[i]));
    }
    p.instrs = std::move(kept);
}

// The elementwise loops, compiled for AVX2 too (they are most of a small step's arithmetic):
// `rows` rows of n elements, each operand's rows `stride` elements apart (0: the same row, which
// a gradient then sums over the rows). Scalar operands are read at element 0.
template <class F, class T>
LOOM_VECTOR_CLONES void unary_values(std::int64_t rows, std::int64_t n, const T* x, std::int64_t xs, T* y, std::int64_t ys)
{
    for (std::int64_t r = 0; r < rows; ++r, x += xs, y += ys)
        for (std::int64_t i = 0; i < n; ++i) y[i] = F::value(x[i]);
}
template <class F, class T>
LOOM_VECTOR_CLONES void unary_grads(std::int64_t rows, std::int64_t n, const T* g, std::int64_t gs, const T* x,
                                    std::int64_t xs, const T* y, std::int64_t ys, T* dx, std::int64_t dxs)
{
    for (std::int64_t r = 0; r < rows; ++r, g += gs, x += xs, y += ys, dx += dxs)
        for (std::int64_t i = 0; i < n; ++i) dx[i] += F::grad(g[i], x[i], y[i]);
}
template <class F, bool ScalarA, bool ScalarB, class T>
LOOM_VECTOR_CLONES void binary_values(std::int64_t rows, std::int64_t n, const T* a, std::int64_t as, const T* b,
                                      std::int64_t bs, T* y, std::int64_t ys)
{
    for (std::int64_t r = 0; r < rows; ++r, a += as, b += bs, y += ys)
        for (std::int64_t i = 0; i < n; ++i) y[i] = F::value(a[ScalarA ? 0 : i], b[ScalarB ? 0 : i]);
}
// d += the gradient of operand a (ToA) or b, which is read elementwise.
template <class F, bool ToA, bool ScalarA, bool ScalarB, class T>
LOOM_VECTOR_CLONES void binary_grads(std::int64_t rows, std::int64_t n, const T* g, std::int64_t gs, const T* a,
                                     std::int64_t as, const T* b, std::int64_t bs, const T* y, std::int64_t ys, T* d,
                                     std::int64_t ds)
{
    for (std::int64_t r = 0; r < rows; ++r, g += gs, a += as, b += bs, y += ys, d += ds)
        for (std::int64_t i = 0; i < n; ++i) {
            const T u = a[ScalarA ? 0 : i], v = b[ScalarB ? 0 : i];
            d[i] += ToA ? F::grad_a(g[i], u, v, y[i]) : F::grad_b(g[i], u, v, y[i]);
        }
}

// da += the gradient of a and db += that of b, both read elementwise, in one pass.
template <class F, class T>
LOOM_VECTOR_CLONES void binary_grads_both(std::int64_t rows, std::int64_t n, const T* g, std::int64_t gs, const T* a,
                                          std::int64_t as, const T* b, std::int64_t bs, const T* y, std::int64_t ys,
                                          T* da, std::int64_t das, T* db, std::int64_t dbs)
{
    for (std::int64_t r = 0; r < rows; ++r, g += gs, a += as, b += bs, y += ys, da += das, db += dbs)
        for (std::int64_t i = 0; i < n; ++i) {
            da[i] += F::grad_a(g[i], a[i], b[i], y[i]);
            db[i] += F::grad_b(g[i], a[i], b[i], y[i]);
        }
}

// Which inputs a backward pass sends gradients to: those that change from step to step, those
// that do not (weights), or all.
enum class Part { Varying, Invariant, All };

template <class T> LOOM_VECTOR_CLONES void add_long_run_into(T* to, const T* from, std::int64_t n)
{
    for (std::int64_t i = 0; i < n; ++i) to[i] += from[i];
}
// to[i] += from[i] for n elements: a long run in the AVX2 loop, a short one inline (a call
// through the clones' resolver costs more than W7's 14 additions).
template <class T> void add_into(T* to, const T* from, std::int64_t n)
{
    if (n >= 256) return add_long_run_into(to, from, n);
    for (std::int64_t i = 0; i < n; ++i) to[i] += from[i];
}

// One call's replay of a program in float or double: the forward over all steps, and its adjoint.
template <class T> struct Replay {
    std::shared_ptr<const Program> p;
    std::vector<Tensor> params, consts;  // this call's (the program holds none)
    std::int64_t steps = 0;
    std::vector<std::int64_t> lengths;  // empty: every row runs every step
    bool reverse = false;
    std::int64_t rows = 1;  // B, when lengths are given
    std::vector<Tensor> held;  // the contiguous parameters, constants, xs and init read through `base`
    std::vector<T*> base;
    Tensor arena;  // the buffers of the values the replay computes, in one block from loom's pool
    std::vector<T*> adj;  // backward: each value's gradient buffer, null for constants
    Tensor adj_arena;

    // A value computed in the loop that no backward reads (an add's output, a chunk's; every one
    // without backward to come) is needed only until the step ends: one buffer, overwritten at
    // every step, stays in cache.
    bool for_backward = true;
    std::vector<bool> read_by_backward;
    bool one_buffer(std::size_t v) const
    {
        return p->rate(v) == Rate::Invariant || (p->rate(v) == Rate::Carried && p->values[v].source == Source::Computed &&
                                                 (!for_backward || !read_by_backward[v]));
    }
    // Elements from one step's value v to the next's: 0 for one buffer; its input's for an alias.
    std::vector<std::int64_t> strides;
    // A move that takes one contiguous block of its input (a reshape, a chunk of one row) is no
    // copy: its value is that block of its input's buffer, gradient included (aliased[j] for
    // instruction j, at the input element of its one run).
    std::vector<char> aliased;  // bytes, not bits: read for every instruction at every step
    // Checkpointing (segment > 0): the values computed inside the loop are kept for `segment`
    // steps at a time, those from step `window` on (windowed[v]), not for every step; backward
    // computes each segment's again from the carries, which are kept for every step.
    std::int64_t segment = 0;
    std::int64_t window = 0;
    bool window_filled = false;  // the windowed buffers hold the values of the steps from `window`
    std::vector<char> windowed;  // bytes, not bits: read for every operand at every step
    std::int64_t kept_steps() const { return segment > 0 ? segment : steps; }
    // Inlined: called for every operand of every instruction at every step.
    [[gnu::always_inline]] std::int64_t row(std::size_t v, std::int64_t t) const { return windowed[v] ? t - window : t; }
    [[gnu::always_inline]] T* at(std::size_t v, std::int64_t t) const { return base[v] + row(v, t) * strides[v]; }
    [[gnu::always_inline]] T* adj_at(std::size_t v, std::int64_t t)
    {
        return adj[v] ? adj[v] + row(v, t) * adj_strides[v] : nullptr;
    }
    // The gradients of values laid out step by step live one step at a time: a step's are all
    // taken by the end of its backward, so one block, zeroed per step, stays in L1.
    std::vector<std::int64_t> adj_strides;
    T* adj_step = nullptr;

    // Values computed in the loop that no product reads or writes are laid out step by step: one
    // step's values side by side (offset_in_step), so the backward loop, walking the steps down,
    // reads one block per step instead of a row in each of dozens of arrays (W7: 50 values of 14
    // doubles a step, where the scattered rows cost a cache miss each). A product's operands
    // keep all steps' rows together, for the one GEMM over all steps.
    std::vector<std::int64_t> offset_in_step;  // -1: a buffer of its own
    std::int64_t step_block = 0;
    // The same for the gradients, which every value computed in the loop has, read by backward
    // or not: one step's, side by side.
    std::vector<std::int64_t> adj_offset_in_step;
    std::int64_t adj_step_block = 0;
    T* steps_start = nullptr;  // where carve() put the block of values laid out step by step
    T* values_step = nullptr;  // forward's block of them, steps * step_block

    // Fusion: the loop's elementwise instructions come in runs over values of one size (a cell's
    // sigmoids, tanhs, products and sums), each operand read element by element or as a scalar. A
    // run is one pass per step, a tile of elements at a time through all its instructions, so what
    // one writes is still in L1 when the next reads it; its adjoint goes tile by tile too, through
    // the run in reverse. Any other instruction is a pass of its own (n < 0).
    struct Pass {
        std::size_t first, last;  // instructions loop[first] .. loop[last - 1]
        std::int64_t n;  // elements of each
    };
    static constexpr std::int64_t tile = 4096 / sizeof(T);
    std::vector<std::size_t> loop;  // the instructions inside the loop that do work, in program order
    std::vector<Pass> passes;
    static bool fusable(const Instr& ins)
    {
        return ins.op == Op::Elementwise &&
               std::none_of(ins.access.begin(), ins.access.end(), [](Access a) { return a == Access::Mapped; });
    }
    void plan_passes()
    {
        loop.clear(), passes.clear();
        for (std::size_t j = 0; j < p->instrs.size(); ++j)
            if (p->rate(p->instrs[j].out) == Rate::Carried && !aliased[j]) loop.push_back(j);
        for (std::size_t k = 0; k < loop.size(); ++k) {
            const Instr& ins = p->instrs[loop[k]];
            const std::int64_t n = fusable(ins) ? p->values[ins.out].numel : -1;
            if (n >= 0 && !passes.empty() && passes.back().n == n) ++passes.back().last;
            else passes.push_back(Pass{k, k + 1, n});
        }
    }

    void lay_out()
    {
        const Program& prog = *p;
        const std::size_t n = prog.values.size();
        std::vector<bool> in_product(n, false);
        for (const Instr& ins : prog.instrs)
            if (is_product(ins)) {
                for (std::size_t v : ins.in) in_product[v] = true;
                in_product[ins.out] = true;
            }
        aliased.assign(prog.instrs.size(), false);
        for (std::size_t j = 0; j < prog.instrs.size(); ++j) {
            const Instr& ins = prog.instrs[j];
            aliased[j] = ins.op == Op::Move && ins.runs[0].size() == 1 && ins.runs[0][0].to == 0;
        }
        read_by_backward.assign(n, false);
        for (std::size_t j = prog.instrs.size(); j-- > 0;) {
            const Instr& ins = prog.instrs[j];
            const Reads r = backward_reads(ins);
            for (std::size_t k = 0; k < ins.in.size() && k < 2; ++k)
                if (r.in[k]) read_by_backward[ins.in[k]] = true;
            if (r.out) read_by_backward[ins.out] = true;
            if (aliased[j] && read_by_backward[ins.out]) read_by_backward[ins.in[0]] = true;  // its buffer
        }
        strides.resize(n);
        adj_strides.resize(n);
        offset_in_step.assign(n, -1);
        adj_offset_in_step.assign(n, -1);
        step_block = adj_step_block = 0;
        constexpr std::int64_t align = 32 / sizeof(T);
        const auto place = [&](std::int64_t& block, std::size_t v) {
            const std::int64_t at = block;
            block += (prog.values[v].numel + align - 1) / align * align;
            return at;
        };
        for (std::size_t v = 0; v < n; ++v) {
            strides[v] = one_buffer(v) ? 0 : prog.values[v].numel;
            adj_strides[v] = prog.rate(v) == Rate::Invariant ? 0 : prog.values[v].numel;
            if (prog.values[v].source != Source::Computed || prog.rate(v) != Rate::Carried || in_product[v] ||
                is_alias(v) || dead(v))
                continue;
            adj_offset_in_step[v] = place(adj_step_block, v);
            adj_strides[v] = 0;
            if (!one_buffer(v)) offset_in_step[v] = place(step_block, v);
        }
        for (std::size_t v = 0; v < n; ++v)
            if (offset_in_step[v] >= 0) strides[v] = step_block;
        windowed.assign(n, false);
        if (segment > 0)
            for (std::size_t v = 0; v < n; ++v)
                windowed[v] = prog.values[v].source == Source::Computed && prog.rate(v) == Rate::Carried && !dead(v);
        plan_passes();
        for (std::size_t j = 0; j < prog.instrs.size(); ++j)
            if (aliased[j]) {
                strides[prog.instrs[j].out] = strides[prog.instrs[j].in[0]];
                adj_strides[prog.instrs[j].out] = adj_strides[prog.instrs[j].in[0]];
                windowed[prog.instrs[j].out] = windowed[prog.instrs[j].in[0]];  // a view of a carry is not
            }
    }
    static bool is_product(const Instr& ins) { return ins.op == Op::Linear || ins.op == Op::Matmul; }
    // Points each alias into its input's buffer (`buffers`: base or adj).
    void point_aliases(std::vector<T*>& buffers) const
    {
        for (std::size_t j = 0; j < p->instrs.size(); ++j) {
            const Instr& ins = p->instrs[j];
            if (aliased[j]) buffers[ins.out] = buffers[ins.in[0]] ? buffers[ins.in[0]] + ins.runs[0][0].from : nullptr;
        }
    }
    bool is_alias(std::size_t v) const
    {
        const Value& val = p->values[v];
        return val.source == Source::Computed && val.index != kNoInstr && aliased[val.index];
    }
    bool dead(std::size_t v) const { return p->values[v].source == Source::Computed && p->values[v].index == kNoInstr; }
    // What instruction `ins`'s backward reads: its first two inputs' values, and its output's.
    struct Reads {
        bool in[2] = {false, false};
        bool out = false;
    };
    template <class F> static Reads unary_reads() { return {{F::reads.x, false}, F::reads.y}; }
    template <class F> static Reads binary_reads() { return {{F::reads.a, F::reads.b}, F::reads.y}; }
    static Reads backward_reads(const Instr& ins)
    {
        switch (ins.op) {
        case Op::Elementwise:
            return pointwise::with_formula(ins.formula, []<class F>() {
                if constexpr (pointwise::is_binary<F>) return binary_reads<F>();
                else return unary_reads<F>();
            });
        case Op::Linear:  // x for the weight's gradient, the weight for x's
        case Op::Matmul: return {{true, true}, false};
        case Op::Move:
        case Op::Concat: return {};
        }
        return {{true, true}, true};
    }
    // Elements of value v's buffer: one per step (the carry: one more, for the initial one), or one
    // in all for a value computed once per call (or read only within its step); of its gradient's
    // (`adjoint`), one per step unless the value is computed once per call.
    std::int64_t buffer_size(std::size_t v, bool adjoint = false) const
    {
        const Value& val = p->values[v];
        const bool one = adjoint ? p->rate(v) == Rate::Invariant : one_buffer(v);
        return val.numel * (val.source == Source::Carry ? steps + 1 : one ? 1 : windowed[v] ? segment : steps);
    }
    // Carves one buffer per value from one pooled block: a buffer each, freshly allocated, would
    // cost page faults at every call.
    // step_rows: how many steps the block of values laid out step by step holds.
    // adjoint: the gradients' buffers (zeroed), else the values'.
    template <class Wanted> std::vector<T*> carve(Tensor& block, bool adjoint, std::int64_t step_rows, Wanted&& wanted)
    {
        constexpr std::int64_t align = 64 / sizeof(T);  // each buffer on a cache line, as BLAS likes
        const auto padded = [&](std::int64_t size) { return (size + align - 1) / align * align; };
        const std::vector<std::int64_t>& offset_in_step = adjoint ? adj_offset_in_step : this->offset_in_step;
        const std::int64_t step_block = adjoint ? adj_step_block : this->step_block;
        const auto own = [&](std::size_t v) { return wanted(v) && offset_in_step[v] < 0; };
        std::int64_t total = align + padded(step_block * step_rows);
        for (std::size_t v = 0; v < p->values.size(); ++v)
            if (own(v)) total += padded(buffer_size(v, adjoint));
        block = adjoint ? zeros({total}, p->dtype) : empty({total}, p->dtype);
        std::vector<T*> at_v(p->values.size(), nullptr);
        T* next = block.template data_ptr<T>();
        next += (align - std::int64_t(reinterpret_cast<std::uintptr_t>(next) / sizeof(T) % align)) % align;
        steps_start = next;
        next += padded(step_block * step_rows);
        for (std::size_t v = 0; v < p->values.size(); ++v) {
            if (!wanted(v)) continue;
            if (offset_in_step[v] >= 0) {
                at_v[v] = steps_start + offset_in_step[v];
            } else {
                at_v[v] = next;
                next += padded(buffer_size(v, adjoint));
            }
        }
        return at_v;
    }
    std::int64_t time_of(std::int64_t i) const { return reverse ? steps - 1 - i : i; }
    bool active(std::int64_t i, std::int64_t b) const { return lengths.empty() || time_of(i) < lengths[b]; }

    T* bind(std::size_t v, const Tensor& t)
    {
        held.push_back(kernels::contiguous(t));
        return base[v] = held.back().template data_ptr<T>();
    }

    // Forward over all steps; xs are in processing order already.
    void forward(const std::vector<Tensor>& init, const std::vector<Tensor>& xs, std::vector<Tensor>& carry_out,
                 std::vector<Tensor>& ys)
    {
        const Program& prog = *p;
        lay_out();
        base = carve(arena, false, kept_steps(), [&](std::size_t v) {
            return prog.values[v].source == Source::Carry ||
                   (prog.values[v].source == Source::Computed && !is_alias(v) && !dead(v));
        });
        values_step = steps_start;
        for (std::size_t v = 0; v < prog.values.size(); ++v) {
            const Value& val = prog.values[v];
            switch (val.source) {
            case Source::Param: bind(v, params[val.index]); break;
            case Source::Const: bind(v, consts[val.index]); break;
            case Source::X: bind(v, xs[val.index]); break;
            case Source::Carry:
                std::memcpy(base[v], kernels::contiguous(init[val.index]).template data_ptr<T>(), sizeof(T) * val.numel);
                break;
            case Source::Computed: break;
            }
        }
        point_aliases(base);
        for (const Instr& ins : prog.instrs)
            if (prog.rate(ins.out) == Rate::Invariant) run(ins, 0, 1);
        for (const Instr& ins : prog.instrs)
            if (prog.rate(ins.out) == Rate::PerStep) run(ins, 0, steps);
        for (std::size_t k = 0; k < prog.y_out.size(); ++k) {
            Shape shape = prog.values[prog.y_out[k]].shape;
            shape.insert(shape.begin(), steps);
            ys.push_back(empty(shape, prog.dtype));
        }
        for (std::int64_t i = 0; i < steps; ++i) {
            if (segment > 0) window = i / segment * segment, window_filled = true;
            run_step(i);
            for (std::size_t k = 0; k < prog.carry_in.size(); ++k) {
                const std::size_t c = prog.carry_in[k];
                pass_rows(at(c, i + 1), at(prog.carry_out[k], i), at(c, i), prog.values[c].numel, i);
            }
            for (std::size_t k = 0; k < prog.y_out.size(); ++k) {
                const std::int64_t n = prog.values[prog.y_out[k]].numel;
                pass_rows(ys[k].template data_ptr<T>() + time_of(i) * n, at(prog.y_out[k], i), nullptr, n, i);
            }
        }
        for (std::size_t k = 0; k < prog.carry_in.size(); ++k) {
            const std::size_t c = prog.carry_in[k];
            carry_out.push_back(empty(prog.values[c].shape, prog.dtype));
            std::memcpy(carry_out.back().template data_ptr<T>(), at(c, steps), sizeof(T) * prog.values[c].numel);
        }
    }

    // The instructions inside the loop at step i.
    void run_step(std::int64_t i)
    {
        for (const Pass& pass : passes) {
            if (pass.n < 0) {
                run(p->instrs[loop[pass.first]], i, i + 1);
                continue;
            }
            for (std::int64_t from = 0; from < pass.n; from += tile)
                for (std::size_t k = pass.first; k < pass.last; ++k)
                    run(p->instrs[loop[k]], i, i + 1, from, std::min(tile, pass.n - from));
        }
    }

    // The adjoint of step i's instructions, those of each pass tile by tile. A weight read by a
    // product gets its gradient later, from one GEMM over many steps; one read elementwise gets
    // its share now, while the step's gradient is at hand.
    void run_step_backward(std::int64_t i)
    {
        for (std::size_t q = passes.size(); q-- > 0;) {
            const Pass& pass = passes[q];
            if (pass.n < 0) {
                const Instr& ins = p->instrs[loop[pass.first]];
                run_backward(ins, i, i + 1, is_product(ins) ? Part::Varying : Part::All);
                continue;
            }
            for (std::int64_t from = 0; from < pass.n; from += tile)
                for (std::size_t k = pass.last; k-- > pass.first;)
                    run_backward(p->instrs[loop[k]], i, i + 1, Part::All, from, std::min(tile, pass.n - from));
        }
    }

    // The backward of pass_rows: adds from's rows active at step i into `active_to`, and the
    // others into `held_to`; either may be null (nothing to add to).
    void add_rows(T* active_to, T* held_to, const T* from, std::int64_t n, std::int64_t i) const
    {
        const std::int64_t row = lengths.empty() ? n : n / rows;
        for (std::int64_t b = 0; b < (lengths.empty() ? 1 : rows); ++b) {
            T* to = active(i, b) ? active_to : held_to;
            if (to) add_into(to + b * row, from + b * row, row);
        }
    }

    // to = from in the rows active at step i, `held` (or zeros) in the others.
    void pass_rows(T* to, const T* from, const T* held_rows, std::int64_t n, std::int64_t i) const
    {
        if (lengths.empty()) {
            std::memcpy(to, from, sizeof(T) * n);
            return;
        }
        const std::int64_t row = n / rows;
        for (std::int64_t b = 0; b < rows; ++b) {
            if (active(i, b)) std::memcpy(to + b * row, from + b * row, sizeof(T) * row);
            else if (held_rows) std::memcpy(to + b * row, held_rows + b * row, sizeof(T) * row);
            else std::fill(to + b * row, to + (b + 1) * row, T(0));
        }
    }

    // The adjoint: gradients of init, xs (processing order) and params from those of the
    // final carry and the ys (undefined where none arrived).
    void backward(const std::vector<Tensor>& d_carry, const std::vector<Tensor>& d_ys)
    {
        const Program& prog = *p;
        adj = carve(adj_arena, true, 1,
                    [&](std::size_t v) { return prog.values[v].source != Source::Const && !is_alias(v) && !dead(v); });
        adj_step = steps_start;
        point_aliases(adj);
        for (std::size_t k = 0; k < prog.carry_in.size(); ++k)
            if (d_carry[k].defined()) {
                const std::size_t c = prog.carry_in[k];
                std::memcpy(adj_at(c, steps), kernels::contiguous(d_carry[k]).template data_ptr<T>(),
                            sizeof(T) * prog.values[c].numel);
            }
        std::vector<Tensor> gy(prog.y_out.size());
        for (std::size_t k = 0; k < prog.y_out.size(); ++k)
            if (d_ys[k].defined() && adj[prog.y_out[k]]) gy[k] = kernels::contiguous(d_ys[k]);
        // Checkpointed, the steps go back a segment at a time: its values computed again from
        // its first carry, its adjoint, and the weight gradients of its products.
        for (std::int64_t end = steps; end > 0;) {
            const std::int64_t start = segment > 0 ? (end - 1) / segment * segment : 0;
            if (segment > 0) {
                if (!window_filled || window != start) {  // forward left the last segment's
                    window = start;
                    for (std::int64_t i = start; i < end; ++i) run_step(i);
                }
                for (std::size_t v = 0; v < prog.values.size(); ++v)
                    if (windowed[v] && adj[v] && !is_alias(v) && adj_offset_in_step[v] < 0)
                        std::fill_n(adj[v], buffer_size(v, true), T(0));
            }
            for (std::int64_t i = end; i-- > start;) {
                if (adj_step_block) std::fill_n(adj_step, adj_step_block, T(0));
                // The step before this one is read next: fetch its values now, one cache line at a
                // time, while this step computes (long sequences no longer fit in cache).
                if (i > start)
                    for (std::int64_t e = 0; e < step_block; e += 64 / std::int64_t(sizeof(T)))
                        __builtin_prefetch(values_step + (i - 1 - (segment > 0 ? window : 0)) * step_block + e);
                for (std::size_t k = 0; k < prog.y_out.size(); ++k) {
                    if (!gy[k].defined()) continue;
                    const std::size_t y = prog.y_out[k];
                    const std::int64_t n = prog.values[y].numel;
                    add_rows(adj_at(y, i), nullptr, gy[k].template data_ptr<T>() + time_of(i) * n, n, i);
                }
                for (std::size_t k = 0; k < prog.carry_in.size(); ++k) {
                    const std::size_t c = prog.carry_in[k];
                    add_rows(adj_at(prog.carry_out[k], i), adj_at(c, i), adj_at(c, i + 1), prog.values[c].numel, i);
                }
                run_step_backward(i);
            }
            // A weight's gradient from a product inside the loop: one GEMM over all the steps kept.
            for (std::size_t j = prog.instrs.size(); j-- > 0;)
                if (prog.rate(prog.instrs[j].out) == Rate::Carried && is_product(prog.instrs[j]))
                    run_backward(prog.instrs[j], start, end, Part::Invariant);
            end = start;
        }
        for (std::size_t j = prog.instrs.size(); j-- > 0;)
            if (prog.rate(prog.instrs[j].out) == Rate::PerStep) {
                run_backward(prog.instrs[j], 0, steps, Part::All);
            }
        for (std::size_t j = prog.instrs.size(); j-- > 0;)
            if (prog.rate(prog.instrs[j].out) == Rate::Invariant) run_backward(prog.instrs[j], 0, 1, Part::Invariant);
    }

    // ---- one instruction over steps [t0, t1) ----

    std::int64_t index(const Instr& ins, std::size_t operand, std::size_t map, std::int64_t i) const
    {
        switch (ins.access[operand]) {
        case Access::Same: return i;
        case Access::Scalar: return 0;
        default: return ins.maps[map][std::size_t(i)];
        }
    }

    // An elementwise instruction runs over elements [from, from + n) of its output (a tile of a
    // fused group, or all of it), and so of each operand read element by element.
    template <class F> void unary(const Instr& ins, std::int64_t t0, std::int64_t t1, std::int64_t from, std::int64_t n)
    {
        const std::size_t x = ins.in[0], y = ins.out;
        unary_values<F>(t1 - t0, n, at(x, t0) + from, strides[x], at(y, t0) + from, strides[y]);
    }

    template <class F> void binary(const Instr& ins, std::int64_t t0, std::int64_t t1, std::int64_t from, std::int64_t n)
    {
        const std::int64_t rows = t1 - t0;
        const std::size_t a = ins.in[0], b = ins.in[1], y = ins.out;
        const Access ka = ins.access[0], kb = ins.access[1];
        const auto rows_of = [&]<bool SA, bool SB>() {
            binary_values<F, SA, SB>(rows, n, at(a, t0) + (SA ? 0 : from), strides[a], at(b, t0) + (SB ? 0 : from),
                                     strides[b], at(y, t0) + from, strides[y]);
        };
        if (ka == Access::Same && kb == Access::Same) return rows_of.template operator()<false, false>();
        if (ka == Access::Same && kb == Access::Scalar) return rows_of.template operator()<false, true>();
        if (ka == Access::Scalar && kb == Access::Same) return rows_of.template operator()<true, false>();
        const std::size_t mb = ka == Access::Mapped ? 1 : 0;
        for (std::int64_t t = t0; t < t1; ++t) {
            const T *pa = at(a, t), *pb = at(b, t);
            T* py = at(y, t);
            for (std::int64_t i = from; i < from + n; ++i) py[i] = F::value(pa[index(ins, 0, 0, i)], pb[index(ins, 1, mb, i)]);
        }
    }

    // `n` < 0: all of the output; else elements [from, from + n) of an elementwise op's.
    void run(const Instr& ins, std::int64_t t0, std::int64_t t1, std::int64_t from = 0, std::int64_t n = -1)
    {
        if (aliased[std::size_t(&ins - p->instrs.data())]) return;
        if (n < 0) n = p->values[ins.out].numel;
        switch (ins.op) {
        case Op::Elementwise:
            return pointwise::with_formula(ins.formula, [&]<class F>() {
                if constexpr (pointwise::is_binary<F>) binary<F>(ins, t0, t1, from, n);
                else unary<F>(ins, t0, t1, from, n);
            });
        case Op::Linear: {  // rows of x varying, weight and bias once per call: one GEMM over all steps asked for
            const std::int64_t R = ins.n * (p->rate(ins.in[0]) == Rate::Invariant ? 1 : t1 - t0);
            T* y = at(ins.out, t0);
            const bool bias = has_bias(ins), start = bias || ins.addend;  // y starts as bias + addend
            const T* b = bias ? at(ins.in[2], 0) : nullptr;
            if (ins.addend) {
                const T* u = at(ins.in.back(), t0);
                if (b) binary_values<pointwise::Add, false, false>(R, ins.m, u, ins.m, b, 0, y, ins.m);
                else std::memcpy(y, u, sizeof(T) * R * ins.m);
            } else if (b) {
                for (std::int64_t r = 0; r < R; ++r) std::memcpy(y + r * ins.m, b, sizeof(T) * ins.m);
            }
            if (R * ins.m * ins.k <= kernels::kSmallProduct)
                kernels::small_gemm<T>(R, ins.m, ins.k, at(ins.in[0], t0), transposed(ins), y, start);
            else
                kernels::gemm<T>("scan", false, true, R, ins.m, ins.k, at(ins.in[0], t0), at(ins.in[1], 0), T(start ? 1 : 0), y);
            return;
        }
        case Op::Matmul: {
            const std::size_t a = ins.in[0], b = ins.in[1];
            if (p->rate(b) == Rate::Invariant && p->rate(a) != Rate::Invariant) {
                const std::int64_t R = ins.n * (t1 - t0);
                if (R * ins.m * ins.k <= kernels::kSmallProduct)
                    kernels::small_gemm<T>(R, ins.m, ins.k, at(a, t0), at(b, 0), at(ins.out, t0));
                else
                    kernels::gemm<T>("scan", false, false, R, ins.m, ins.k, at(a, t0), at(b, 0), T(0), at(ins.out, t0));
                return;
            }
            for (std::int64_t t = t0; t < t1; ++t)
                kernels::gemm<T>("scan", false, false, ins.n, ins.m, ins.k, at(a, t), at(b, t), T(0), at(ins.out, t));
            return;
        }
        case Op::Move:
        case Op::Concat:
            for (std::int64_t t = t0; t < t1; ++t) {
                T* y = at(ins.out, t);
                for (std::size_t j = 0; j < ins.in.size(); ++j) {
                    const T* x = at(ins.in[j], t);
                    for (const Run& r : ins.runs[j]) std::memcpy(y + r.to, x + r.from, sizeof(T) * r.length);
                }
            }
            return;
        }
    }

    // A linear's weight [m, k] transposed to [k, m], made once per call for small_gemm.
    std::vector<Tensor> weights_t;
    const T* transposed(const Instr& ins)
    {
        const std::size_t j = std::size_t(&ins - p->instrs.data());
        if (weights_t.empty()) weights_t.resize(p->instrs.size());
        if (!weights_t[j].defined()) {
            weights_t[j] = empty({ins.k, ins.m}, p->dtype);
            T* wt = weights_t[j].template data_ptr<T>();
            const T* w = at(ins.in[1], 0);
            // Eight rows at a time: each column's eight elements are written side by side.
            constexpr std::int64_t rows = 8;
            std::int64_t r0 = 0;
            for (; r0 + rows <= ins.m; r0 += rows)
                for (std::int64_t c = 0; c < ins.k; ++c)
                    for (std::int64_t r = r0; r < r0 + rows; ++r) wt[c * ins.m + r] = w[r * ins.k + c];
            for (std::int64_t r = r0; r < ins.m; ++r)
                for (std::int64_t c = 0; c < ins.k; ++c) wt[c * ins.m + r] = w[r * ins.k + c];
        }
        return weights_t[j].template data_ptr<T>();
    }

    // Whether a backward pass for `part` of the inputs sends to value v.
    bool sends_to(std::size_t v, Part part) const
    {
        return adj[v] && (part == Part::All || (p->rate(v) == Rate::Invariant) == (part == Part::Invariant));
    }

    template <class F>
    void unary_backward(const Instr& ins, std::int64_t t0, std::int64_t t1, Part part, std::int64_t from, std::int64_t n)
    {
        const std::size_t x = ins.in[0], y = ins.out;
        if (!sends_to(x, part)) return;
        unary_grads<F>(t1 - t0, n, adj_at(y, t0) + from, adj_strides[y], at(x, t0) + from, strides[x],
                       at(y, t0) + from, strides[y], adj_at(x, t0) + from, adj_strides[x]);
    }

    template <class F>
    void binary_backward(const Instr& ins, std::int64_t t0, std::int64_t t1, Part part, std::int64_t from, std::int64_t n)
    {
        const std::size_t a = ins.in[0], b = ins.in[1], y = ins.out;
        const bool to_a = sends_to(a, part), to_b = sends_to(b, part);
        if (!to_a && !to_b) return;
        const std::int64_t rows = t1 - t0;
        const Access ka = ins.access[0], kb = ins.access[1];
        // Operand k's element `from` (a scalar operand's element 0); null for no gradient buffer.
        const auto value_at = [&](std::size_t k) { return at(ins.in[k], t0) + (ins.access[k] == Access::Same ? from : 0); };
        const auto grad_at = [&](std::size_t k) {
            T* d = adj_at(ins.in[k], t0);
            return d && ins.access[k] == Access::Same ? d + from : d;
        };
        const T *g = adj_at(y, t0) + from, *out = at(y, t0) + from;
        const auto rows_of = [&]<bool ToA, bool SA, bool SB>() {
            binary_grads<F, ToA, SA, SB>(rows, n, g, adj_strides[y], value_at(0), strides[a], value_at(1), strides[b], out,
                                         strides[y], grad_at(ToA ? 0 : 1), adj_strides[ToA ? a : b]);
        };
        if (ka == Access::Same && kb == Access::Same && a != b) {  // the common cases, in loops that vectorise
            if (to_a && to_b)
                return binary_grads_both<F>(rows, n, g, adj_strides[y], value_at(0), strides[a], value_at(1), strides[b],
                                            out, strides[y], grad_at(0), adj_strides[a], grad_at(1), adj_strides[b]);
            if (to_a) rows_of.template operator()<true, false, false>();
            if (to_b) rows_of.template operator()<false, false, false>();
            return;
        }
        if (ka == Access::Same && kb == Access::Scalar && !to_b) return rows_of.template operator()<true, false, true>();
        if (ka == Access::Scalar && kb == Access::Same && !to_a) return rows_of.template operator()<false, true, false>();
        const std::size_t mb = ka == Access::Mapped ? 1 : 0;
        for (std::int64_t t = t0; t < t1; ++t) {
            const T *pa = at(a, t), *pb = at(b, t), *py = at(y, t), *g = adj_at(y, t);  // `from` indexes them
            T *da = to_a ? adj_at(a, t) : nullptr, *db = to_b ? adj_at(b, t) : nullptr;
            for (std::int64_t i = from; i < from + n; ++i) {
                const std::int64_t ia = index(ins, 0, 0, i), ib = index(ins, 1, mb, i);
                if (da) da[ia] += F::grad_a(g[i], pa[ia], pb[ib], py[i]);
                if (db) db[ib] += F::grad_b(g[i], pa[ia], pb[ib], py[i]);
            }
        }
    }

    // `n` < 0: all of the output; else elements [from, from + n) of an elementwise op's.
    void run_backward(const Instr& ins, std::int64_t t0, std::int64_t t1, Part part, std::int64_t from = 0,
                      std::int64_t n = -1)
    {
        if (!adj[ins.out] || aliased[std::size_t(&ins - p->instrs.data())]) return;
        if (n < 0) n = p->values[ins.out].numel;
        switch (ins.op) {
        case Op::Elementwise:
            return pointwise::with_formula(ins.formula, [&]<class F>() {
                if constexpr (pointwise::is_binary<F>) binary_backward<F>(ins, t0, t1, part, from, n);
                else unary_backward<F>(ins, t0, t1, part, from, n);
            });
        case Op::Linear: {
            const std::size_t x = ins.in[0], w = ins.in[1];
            const std::int64_t R = ins.n * (p->rate(x) == Rate::Invariant ? 1 : t1 - t0);
            const T* g = adj_at(ins.out, t0);
            if (sends_to(x, part)) {
                if (R * ins.m * ins.k <= kernels::kSmallProduct)
                    kernels::small_gemm<T>(R, ins.k, ins.m, g, at(w, 0), adj_at(x, t0), true);
                else
                    kernels::gemm<T>("scan", false, false, R, ins.k, ins.m, g, at(w, 0), T(1), adj_at(x, t0));
            }
            if (sends_to(w, part)) kernels::gemm<T>("scan", true, false, ins.m, ins.k, R, g, at(x, t0), T(1), adj_at(w, 0));
            if (has_bias(ins) && sends_to(ins.in[2], part)) kernels::add_column_sums<T>(g, R, ins.m, adj_at(ins.in[2], 0));
            if (ins.addend && sends_to(ins.in.back(), part)) add_into(adj_at(ins.in.back(), t0), g, R * ins.m);
            return;
        }
        case Op::Matmul: {
            const std::size_t a = ins.in[0], b = ins.in[1];
            const bool a_varies = p->rate(a) != Rate::Invariant, b_varies = p->rate(b) != Rate::Invariant;
            if (sends_to(a, part)) {
                if (!b_varies && a_varies)
                    kernels::gemm<T>("scan", false, true, ins.n * (t1 - t0), ins.k, ins.m, adj_at(ins.out, t0), at(b, 0), T(1), adj_at(a, t0));
                else
                    for (std::int64_t t = t0; t < t1; ++t)
                        kernels::gemm<T>("scan", false, true, ins.n, ins.k, ins.m, adj_at(ins.out, t), at(b, t), T(1), adj_at(a, t));
            }
            if (sends_to(b, part)) {
                if (!b_varies && a_varies)
                    kernels::gemm<T>("scan", true, false, ins.k, ins.m, ins.n * (t1 - t0), at(a, t0), adj_at(ins.out, t0), T(1), adj_at(b, 0));
                else
                    for (std::int64_t t = t0; t < t1; ++t)
                        kernels::gemm<T>("scan", true, false, ins.k, ins.m, ins.n, at(a, t), adj_at(ins.out, t), T(1), adj_at(b, t));
            }
            return;
        }
        case Op::Move:
        case Op::Concat:
            for (std::size_t j = 0; j < ins.in.size(); ++j) {
                if (!sends_to(ins.in[j], part)) continue;
                for (std::int64_t t = t0; t < t1; ++t) {
                    const T* g = adj_at(ins.out, t);
                    T* dx = adj_at(ins.in[j], t);
                    for (const Run& r : ins.runs[j]) add_into(dx + r.from, g + r.to, r.length);
                }
            }
            return;
        }
    }
};

// A tensor of `shape` holding n elements from `data`.
template <class T> Tensor tensor_from(const T* data, const Shape& shape, DType dtype)
{
    Tensor t = empty(shape, dtype);
    if (t.numel() > 0) std::memcpy(t.data_ptr<T>(), data, sizeof(T) * t.numel());
    return t;
}

void check_arguments(const std::vector<Tensor>& init, const std::vector<Tensor>& xs, const ScanOptions& o)
{
    LOOM_CHECK(!xs.empty(), "scan", "expects at least one tensor in xs to scan over");
    LOOM_CHECK(xs[0].defined() && xs[0].dim() >= 1 && xs[0].size(0) >= 1, "scan",
               "expects at least one step: xs 0 must have a dim 0 of size 1 or more, got {}",
               xs[0].defined() ? fmt::format("shape {}", xs[0].sizes()) : std::string("an undefined tensor"));
    for (std::size_t k = 0; k < xs.size(); ++k) {
        LOOM_CHECK(xs[k].defined() && xs[k].dim() >= 1, "scan", "xs {} must be a tensor of at least 1 dim, got {}", k,
                   xs[k].defined() ? fmt::format("shape {}", xs[k].sizes()) : std::string("an undefined tensor"));
        LOOM_CHECK(xs[k].size(0) == xs[0].size(0), "scan", "xs {} has {} steps (dim 0), xs 0 has {}", k,
                   xs[k].size(0), xs[0].size(0));
    }
    for (std::size_t k = 0; k < init.size(); ++k) LOOM_CHECK(init[k].defined(), "scan", "init {} is an undefined tensor", k);
    LOOM_CHECK(o.checkpoint_every >= 0, "scan", "expects checkpoint_every >= 0 (0: every ceil(sqrt(T)) steps), got {}",
               o.checkpoint_every);
    LOOM_CHECK(!o.checkpoint || o.replay, "scan",
               "checkpoint applies to a replayed step, and replay is off: the eager loop keeps every op's tensors");
    LOOM_CHECK(o.checkpoint_every == 0 || o.checkpoint, "scan",
               "checkpoint_every({}) is set but checkpoint is off; set checkpoint as well, or leave checkpoint_every at 0",
               o.checkpoint_every);
    if (o.lengths.defined()) {
        const std::int64_t T = xs[0].size(0);
        LOOM_CHECK(o.lengths.dtype() == kInt64 && o.lengths.dim() == 1, "scan", "expects lengths as int64 [B], got {} {}",
                   o.lengths.dtype(), o.lengths.sizes());
        const Tensor lens = kernels::contiguous(o.lengths);
        for (std::int64_t b = 0; b < lens.numel(); ++b) {
            const std::int64_t n = lens.data_ptr<std::int64_t>()[b];
            LOOM_CHECK(n >= 0 && n <= T, "scan", "length {} of row {} is outside [0, T] = [0, {}]", n, b, T);
        }
        for (std::size_t k = 0; k < init.size(); ++k)
            LOOM_CHECK(init[k].dim() >= 1 && init[k].size(0) == lens.numel(), "scan",
                       "with lengths [{}], init {} must have dim 0 of size {}, got shape {}", lens.numel(), k,
                       lens.numel(), init[k].sizes());
    }
}

// The step at every t, one op at a time: the eager loop, and what create_graph differentiates.
ScanOutput run_eager(const ScanStep& step, const std::vector<Tensor>& init, const std::vector<Tensor>& xs,
                     const ScanOptions& o)
{
    const std::int64_t T = xs[0].size(0);
    std::vector<Tensor> carry = init;
    std::vector<std::vector<Tensor>> per_step;
    const Tensor lens = o.lengths.defined() ? kernels::contiguous(o.lengths) : Tensor();
    // Row b's mask, shaped to broadcast against a tensor of `dims` dims whose dim 0 is B.
    const auto mask = [&](std::int64_t t, std::int64_t dims) {
        Shape shape(std::size_t(std::max<std::int64_t>(dims, 1)), 1);
        shape[0] = lens.numel();
        return reshape(gt(lens, scalar_tensor(double(t), kInt64)), shape);
    };
    for (std::int64_t i = 0; i < T; ++i) {
        const std::int64_t t = o.reverse ? T - 1 - i : i;
        std::vector<Tensor> x;
        for (const Tensor& xk : xs) x.push_back(xk.select(0, t));
        // In anomaly mode a NaN is named with its op and, through this scope, its step.
        std::optional<autograd::Scope> scope;
        if (autograd::anomaly_mode_enabled()) scope.emplace(fmt::format("step {}", t));
        ScanStepResult r = step(carry, x);
        scope.reset();
        LOOM_CHECK(r.carry.size() == carry.size(), "scan", "the step returned {} carry tensors at step {}, expected {}",
                   r.carry.size(), t, carry.size());
        for (std::size_t k = 0; k < carry.size(); ++k)
            LOOM_CHECK(r.carry[k].defined() && r.carry[k].sizes() == carry[k].sizes() &&
                           r.carry[k].dtype() == carry[k].dtype(),
                       "scan", "the step returned carry {} as {} at step {}; the carry must keep its shape {} and dtype {}",
                       k, r.carry[k].defined() ? fmt::format("{} {}", r.carry[k].dtype(), r.carry[k].sizes()) : "undefined",
                       t, carry[k].sizes(), carry[k].dtype());
        if (i == 0) per_step.assign(r.y.size(), std::vector<Tensor>(std::size_t(T)));
        LOOM_CHECK(r.y.size() == per_step.size(), "scan", "the step returned {} outputs at step {}, {} at the first",
                   r.y.size(), t, per_step.size());
        for (std::size_t k = 0; k < r.y.size(); ++k) {
            LOOM_CHECK(r.y[k].defined(), "scan", "the step returned an undefined output {} at step {}", k, t);
            if (lens.defined()) {
                const Tensor m = mask(t, r.y[k].dim());
                LOOM_CHECK(r.y[k].dim() >= 1 && r.y[k].size(0) == lens.numel(), "scan",
                           "with lengths [{}], output {} must have dim 0 of size {}, got shape {}", lens.numel(), k,
                           lens.numel(), r.y[k].sizes());
                r.y[k] = where(m, r.y[k], zeros({1}, r.y[k].dtype()));
            }
            per_step[k][std::size_t(t)] = r.y[k];
        }
        for (std::size_t k = 0; k < carry.size(); ++k)
            carry[k] = lens.defined() ? where(mask(t, carry[k].dim()), r.carry[k], carry[k]) : r.carry[k];
    }
    ScanOutput out;
    out.carry = std::move(carry);
    for (auto& steps : per_step) out.ys.push_back(stack(steps, 0));
    return out;
}

template <class T>
bool replay(const ScanStep& step, const std::shared_ptr<const Program>& prog, const Program& traced,
            const std::vector<Tensor>& init, const std::vector<Tensor>& xs, const ScanOptions& o, ScanOutput& out)
{
    auto r = std::make_shared<Replay<T>>();
    r->p = prog;
    r->params = traced.params;
    r->consts = traced.consts;
    r->steps = xs[0].size(0);
    r->reverse = o.reverse;
    if (o.lengths.defined()) {
        const Tensor lens = kernels::contiguous(o.lengths);
        r->lengths.assign(lens.data_ptr<std::int64_t>(), lens.data_ptr<std::int64_t>() + lens.numel());
        r->rows = lens.numel();
        for (std::size_t v : prog->y_out) {
            const Shape& s = prog->values[v].shape;
            if (s.empty() || s[0] != r->rows) {
                out.eager_reason = fmt::format("with lengths, each output must have dim 0 of size {}", r->rows);
                return false;
            }
        }
    }
    std::vector<Tensor> x_order;
    for (const Tensor& x : xs) x_order.push_back(o.reverse ? flip_time(x) : kernels::contiguous(x));
    std::vector<Tensor> inputs = init;
    inputs.insert(inputs.end(), xs.begin(), xs.end());
    inputs.insert(inputs.end(), r->params.begin(), r->params.end());
    r->for_backward = autograd::should_record(inputs);
    if (r->for_backward && o.checkpoint)
        r->segment = o.checkpoint_every > 0 ? o.checkpoint_every : std::int64_t(std::ceil(std::sqrt(double(r->steps))));
    std::vector<Tensor> carry, ys;
    r->forward(init, x_order, carry, ys);
    if (r->for_backward) {
        std::vector<Tensor> outputs = carry;
        outputs.insert(outputs.end(), ys.begin(), ys.end());
        const std::size_t S = init.size(), X = xs.size();
        auto backward = [r, step, o, S, X](const autograd::BackwardContext& c) {
            const std::vector<Tensor> in(c.saved.begin(), c.saved.end());  // init, xs, params
            autograd::GradList grads(in.size());
            if (c.create_graph) {  // the eager loop again, recorded, and its gradient recorded too
                const GradModeGuard recording(true);
                const ScanOutput again =
                    run_eager(step, std::vector<Tensor>(in.begin(), in.begin() + S),
                              std::vector<Tensor>(in.begin() + S, in.begin() + S + X), o);
                std::vector<Tensor> roots, seeds, wrt;
                std::vector<std::size_t> wanted;
                for (std::size_t k = 0; k < c.grads.size(); ++k) {
                    const Tensor& result = k < S ? again.carry[k] : again.ys[k - S];
                    if (c.grads[k].defined() && result.requires_grad()) roots.push_back(result), seeds.push_back(c.grads[k]);
                }
                for (std::size_t k = 0; k < in.size(); ++k)
                    if (c.needs[k]) wanted.push_back(k), wrt.push_back(in[k]);
                if (roots.empty()) return grads;
                const std::vector<Tensor> g = grad(roots, wrt, seeds, true, true, true);
                for (std::size_t j = 0; j < wanted.size(); ++j) grads[wanted[j]] = g[j];
                return grads;
            }
            const Program& p = *r->p;
            const std::vector<bool> reached = reached_values(p, c.grads, r->steps);
            r->backward(std::vector<Tensor>(c.grads.begin(), c.grads.begin() + S),
                        std::vector<Tensor>(c.grads.begin() + S, c.grads.end()));
            for (std::size_t k = 0; k < S; ++k)
                if (c.needs[k] && reached[p.carry_in[k]])
                    grads[k] = tensor_from(r->adj_at(p.carry_in[k], 0), in[k].sizes(), p.dtype);
            for (std::size_t k = 0; k < X; ++k)
                if (c.needs[S + k] && reached[p.x_in[k]]) {
                    Tensor g = tensor_from(r->adj[p.x_in[k]], in[S + k].sizes(), p.dtype);
                    grads[S + k] = o.reverse ? flip_time(g) : g;
                }
            for (std::size_t k = 0; k < r->params.size(); ++k)
                if (c.needs[S + X + k]) {
                    std::size_t v = 0;
                    while (p.values[v].source != Source::Param || p.values[v].index != k) ++v;
                    if (reached[v]) grads[S + X + k] = tensor_from(r->adj[v], in[S + X + k].sizes(), p.dtype);
                }
            r->adj.clear();
            r->adj_arena = Tensor();
            return grads;
        };
        autograd::push_entry("scan", inputs, outputs, inputs, autograd::detail::as_backward_fn(std::move(backward)));
    }
    out.carry = std::move(carry);
    out.ys = std::move(ys);
    return true;
}

}  // namespace

namespace detail {

void say_once_why_eager(const std::string& why)
{
    static std::mutex mutex;
    static std::set<std::string> said;
    const std::lock_guard<std::mutex> lock(mutex);
    if (said.insert(why).second) std::fprintf(stderr, "loom: scan runs eagerly: %s\n", why.c_str());
}

bool try_replay_scan(const ScanStep& step, const std::vector<Tensor>& init, const std::vector<Tensor>& xs,
                     const std::vector<Tensor>& params, const ScanOptions& o, ScanOutput& out)
{
    const autograd::detail::ProfiledOp profiled("scan");  // the traces' ops show as well, as its parts
    check_arguments(init, xs, o);
    const DType dtype = init.empty() ? xs[0].dtype() : init[0].dtype();
    if (!o.replay) return out.eager_reason = "replay is off (ScanOptions::replay)", false;
    if (autograd::anomaly_mode_enabled()) return out.eager_reason = "anomaly mode is on, which checks every op at every step", false;
    if (xs[0].size(0) < 2) return out.eager_reason = "there are fewer than 2 steps", false;
    if (dtype != kFloat32 && dtype != kFloat64)
        return out.eager_reason = fmt::format("it replays float32 and float64 steps, not {}", dtype), false;
    for (const std::vector<Tensor>* list : {&init, &xs})
        for (const Tensor& t : *list)
            if (t.dtype() != dtype)
                return out.eager_reason = fmt::format("the carry and xs mix {} and {}", dtype, t.dtype()), false;

    // Two traces: on the first step's values, and on values of the same shapes that no step would
    // see; then the default generator is put back, so a step that draws numbers draws the same
    // ones when it runs eagerly.
    const auto generator = default_generator().state();
    std::vector<Tensor> x0;
    {
        const NoGradGuard no_grad;  // values for the stand-ins only: nothing to record
        for (const Tensor& x : xs) x0.push_back(x.select(0, o.reverse ? x.size(0) - 1 : 0));
    }
    const Program first = trace(step, init, x0, params);  // draws go on: the second trace's differ
    if (!first.failure.empty()) return default_generator().set_state(generator), out.eager_reason = first.failure, false;
    std::shared_ptr<const Program> compiled = ProgramCache::find(first);
    if (!compiled) {
        std::uint64_t seed = 0x5ca9;
        std::vector<Tensor> c1, x1;
        for (const Tensor& t : init) c1.push_back(other_values(t, seed));
        for (const Tensor& t : x0) x1.push_back(other_values(t, seed));
        const Program second = trace(step, c1, x1, params);
        default_generator().set_state(generator);
        if (!second.failure.empty()) return out.eager_reason = second.failure, false;
        if (const std::string d = difference(first, second); !d.empty()) return out.eager_reason = d, false;
        Program program = first;
        program.params.clear(), program.consts.clear();
        compile(program);
        if (!program.failure.empty()) return out.eager_reason = program.failure, false;
        compiled = ProgramCache::add(first, std::move(program));
    }
    default_generator().set_state(generator);
    return dtype == kFloat64 ? replay<double>(step, compiled, first, init, xs, o, out)
                             : replay<float>(step, compiled, first, init, xs, o, out);
}

}  // namespace detail

ScanOutput scan(const ScanStep& step, const std::vector<Tensor>& init, const std::vector<Tensor>& xs,
                const std::vector<Tensor>& params, const ScanOptions& options)
{
    ScanOutput out;
    if (detail::try_replay_scan(step, init, xs, params, options, out)) return out;
    std::string why = out.eager_reason;
    if (options.checkpoint) why += " (so checkpoint does not apply: every op's tensors are kept)";
    // Anomaly mode's eager loop is asked for and goes unsaid, unless it costs the checkpoint.
    if (options.replay && xs[0].size(0) >= 2 && (options.checkpoint || !autograd::anomaly_mode_enabled()))
        detail::say_once_why_eager(why);
    out = run_eager(step, init, xs, options);
    out.eager_reason = why;
    return out;
}

}  // namespace loom
