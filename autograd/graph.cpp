// The tape as a graph: what produced a tensor, as Graphviz DOT or as a text listing.
#include <algorithm>
#include <map>
#include <unordered_map>
#include <unordered_set>

#include "tape_internal.hpp"

namespace loom::autograd {

namespace {

using Names = std::vector<std::pair<std::string, Tensor>>;

// A user's name (a parameter, a custom op, a Scope) as one line a reader and Graphviz take:
// control characters (a newline, a NUL) written as \xNN, and a long name cut to `max` bytes at
// a character boundary, saying how much was left out (Graphviz rejects labels over 16,384).
std::string visible(std::string_view s, std::size_t max = 200)
{
    std::size_t cut = s.size();
    if (cut > max) {
        cut = max;
        while (cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80) --cut;  // not inside a UTF-8 character
    }
    std::string out;
    for (char c : s.substr(0, cut)) {
        const auto u = static_cast<unsigned char>(c);
        if (u < 0x20 || u == 0x7f) out += fmt::format("\\x{:02x}", u);
        else out += c;
    }
    if (cut < s.size()) out += fmt::format("... ({} more bytes)", s.size() - cut);
    return out;
}

// The entries and leaves that `root` depends on, in recording order (leaves first).
struct Graph {
    std::vector<const Entry*> entries;       // ascending seq
    std::vector<const Node*> leaves;         // in the order first met
    std::unordered_map<const Node*, std::string> leaf_names;
    std::unordered_map<std::uint64_t, std::uint64_t> seq_of_slot;  // the producer of each non-leaf input

    std::unordered_map<const Node*, std::size_t> unnamed;  // numbers the leaves without a name: "leaf 0", ...

    std::string leaf_label(const Node* n) const
    {
        auto it = leaf_names.find(n);
        return it != leaf_names.end() ? visible(it->second) : fmt::format("leaf {}", unnamed.at(n));
    }
    // How an input appears: "#12" for an entry's output, a leaf's name otherwise.
    std::string source(const InputRef& in) const
    {
        return in.node() ? leaf_label(in.node()) : fmt::format("#{}", seq_of_slot.at(in.slot()));
    }
};

// A tensor that requires grad and was recorded by no op.
bool is_leaf_node(const Tensor& t) { return t.defined() && t.requires_grad() && !t.impl().slots; }

// The entry that produced a non-leaf: an error naming its op when an earlier backward()
// released that entry, whether it is still on the tape or was reclaimed since.
const Entry& entry_of(std::string_view op, const History& h)
{
    const auto& tape = engine::this_tape();
    const bool reclaimed = h.tape == tape.id && h.seq < tape.reset_floor;
    // Numbers are per tape: another thread's entry #5 is not this one's.
    const Entry* e = reclaimed || h.tape != tape.id ? nullptr : find_entry(h.seq);
    LOOM_CHECK(!reclaimed && !(e && e->released()), op,
               "'{}' (tape entry #{}) was released by an earlier backward(); export the graph before backward, "
               "or pass retain_graph=true",
               h.op, h.seq);
    LOOM_CHECK(e, op, "the tensor's history is not on this thread's tape (computed on another thread, or reclaimed)");
    return *e;
}

// The entry whose output a non-leaf input of slot `slot` is.
const Entry& producer_of(std::string_view op, std::uint64_t slot)
{
    return entry_of(op, engine::producer_of_slot(engine::this_tape(), slot));
}

Graph collect(std::string_view op, const Tensor& root, const Names& names)
{
    LOOM_CHECK(root.defined() && root.requires_grad(), op,
               "the tensor has no history to show: it does not require grad (was it computed under NoGradGuard, or "
               "from tensors without requires_grad_()?)");
    Graph g;
    for (const auto& [name, t] : names)
        if (is_leaf_node(t)) g.leaf_names.emplace(t.impl().node.get(), name);
    std::map<std::uint64_t, const Entry*> found;
    std::unordered_set<const Node*> seen_leaves;
    std::vector<const Entry*> todo;
    if (is_leaf_node(root)) {
        g.leaves.push_back(root.impl().node.get());
        seen_leaves.insert(g.leaves.back());
    } else {
        todo.push_back(&entry_of(op, root.impl().history()));
    }
    while (!todo.empty()) {
        const Entry& e = *todo.back();
        todo.pop_back();
        if (!found.emplace(e.seq, &e).second) continue;
        for (const auto& input : e.inputs()) {
            if (const Node* leaf = input.node()) {
                if (seen_leaves.insert(leaf).second) g.leaves.push_back(leaf);
            } else if (input.slot() != 0) {
                const Entry& producer = producer_of(op, input.slot());
                g.seq_of_slot.emplace(input.slot(), producer.seq);
                todo.push_back(&producer);
            }
        }
    }
    for (const auto& [seq, e] : found) g.entries.push_back(e);
    // Named leaves in the order the user listed them, then the others in the order first met.
    std::vector<const Node*> ordered;
    std::unordered_set<const Node*> placed;
    for (const auto& [name, t] : names) {
        if (!is_leaf_node(t)) continue;
        const Node* n = t.impl().node.get();
        if (seen_leaves.count(n) && placed.insert(n).second) ordered.push_back(n);  // reached, listed once
    }
    for (const Node* n : g.leaves)
        if (!g.leaf_names.count(n)) {
            g.unnamed.emplace(n, g.unnamed.size());
            ordered.push_back(n);
        }
    g.leaves = std::move(ordered);
    return g;
}

// "[2, 4] float32", or one such per output, comma-separated.
std::string outputs_of(const Entry& e)
{
    std::string out;
    for (std::size_t k = 0; k < e.num_outputs; ++k) {
        if (!out.empty()) out += ", ";
        out += fmt::format("{} {}", e.shape_of_output(k), e.dtype_of_output(k));
    }
    return out;
}

std::string quoted(std::string_view s)
{
    std::string out = "\"";
    for (char c : s) {
        if (c == '\n') {
            out += "\\n";
            continue;
        }
        if (c == '"' || c == '\\') out += '\\';
        out += c;
    }
    return out + "\"";
}

}  // namespace

std::string to_dot(const Tensor& root, const Names& names)
{
    const Graph g = collect("to_dot", root, names);
    std::string dot = "digraph loom {\n  rankdir=BT;\n  node [fontname=\"Helvetica\", fontsize=10];\n";
    for (std::size_t i = 0; i < g.leaves.size(); ++i) {
        const Node* n = g.leaves[i];
        const bool named = g.leaf_names.count(n) > 0;
        dot += fmt::format("  l{} [shape=box, style=filled, fillcolor={}, label={}];\n", i,
                           named ? "\"#cfe8cf\"" : "\"#e8e8e8\"",
                           quoted(fmt::format("{}\n{} {}", g.leaf_label(n), n->shape, n->dtype)));
    }
    std::unordered_map<const Node*, std::size_t> leaf_index;
    for (std::size_t i = 0; i < g.leaves.size(); ++i) leaf_index[g.leaves[i]] = i;
    const std::uint64_t root_seq = root.impl().history().seq;
    for (const Entry* e : g.entries) {
        std::string label = fmt::format("{}\n{}", visible(e->name()), outputs_of(*e));
        if (e->scope()) label += fmt::format("\n({})", visible(*e->scope()));
        dot += fmt::format("  e{} [shape=ellipse{}, label={}];\n", e->seq,
                           e->seq == root_seq ? ", style=filled, fillcolor=\"#f4d6a0\"" : "", quoted(label));
    }
    for (const Entry* e : g.entries)
        for (const auto& input : e->inputs()) {
            if (!input) continue;
            const std::string from = input.node() ? fmt::format("l{}", leaf_index.at(input.node()))
                                                  : fmt::format("e{}", g.seq_of_slot.at(input.slot()));
            dot += fmt::format("  {} -> e{};\n", from, e->seq);
        }
    return dot + "}\n";
}

std::string to_text(const Tensor& root, const Names& names)
{
    const Graph g = collect("to_text", root, names);
    std::string text;
    for (const Node* n : g.leaves) text += fmt::format("{}: leaf {} {}\n", g.leaf_label(n), n->shape, n->dtype);
    for (const Entry* e : g.entries) {
        std::string inputs;
        for (const auto& input : e->inputs()) {
            if (!input) continue;
            if (!inputs.empty()) inputs += ", ";
            inputs += g.source(input);
        }
        text += fmt::format("#{} {} -> {} <- {}{}\n", e->seq, visible(e->name()), outputs_of(*e), inputs,
                            e->scope() ? fmt::format("  ({})", visible(*e->scope())) : std::string());
    }
    return text;
}

}  // namespace loom::autograd
