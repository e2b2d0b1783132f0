// Tensor printing in the look of PyTorch's repr, abridged when large.
#include <cmath>
#include <ostream>

#include "kernels.hpp"

namespace loom {

namespace {

constexpr std::int64_t kSummarizeAbove = 1000;  // elements
constexpr std::int64_t kEdgeItems = 3;

struct Printer {
    Tensor t;  // read through its own strides: printing copies nothing, even from a huge expanded view
    bool summarize;
    bool scientific = false;
    std::size_t width = 0;

    double value(std::int64_t flat) const
    {
        return t.dtype() == kFloat32 ? double(t.data_ptr<float>()[flat]) : t.data_ptr<double>()[flat];
    }

    std::string element(std::int64_t flat) const
    {
        switch (t.dtype()) {
        case kBool: return t.data_ptr<bool>()[flat] ? "True" : "False";
        case kInt64: return fmt::format("{}", t.data_ptr<std::int64_t>()[flat]);
        default: {
            const double v = value(flat);
            if (!std::isfinite(v)) return fmt::format("{}", v);
            return scientific ? fmt::format("{:.4e}", v) : fmt::format("{:.4f}", v);
        }
        }
    }

    // Indices shown along a dim of size n: all, or the first and last few with a gap marked -1.
    std::vector<std::int64_t> shown(std::int64_t n) const
    {
        std::vector<std::int64_t> idx;
        if (n <= 2 * kEdgeItems || (!summarize && n <= kSummarizeAbove)) {  // a huge dim of an empty tensor too
            for (std::int64_t i = 0; i < n; ++i) idx.push_back(i);
        } else {
            for (std::int64_t i = 0; i < kEdgeItems; ++i) idx.push_back(i);
            idx.push_back(-1);
            for (std::int64_t i = n - kEdgeItems; i < n; ++i) idx.push_back(i);
        }
        return idx;
    }

    void measure(std::int64_t dim, std::int64_t offset, const std::function<void(std::int64_t)>& visit) const
    {
        if (dim == t.dim()) {
            visit(offset);
            return;
        }
        for (auto i : shown(t.sizes()[dim]))
            if (i >= 0) measure(dim + 1, offset + i * t.impl().stride(dim), visit);
    }

    void write(std::string& out, std::int64_t dim, std::int64_t offset, std::size_t indent) const
    {
        if (dim == t.dim()) {
            const std::string e = element(offset);
            out.append(width - std::min(width, e.size()), ' ');
            out += e;
            return;
        }
        out += '[';
        const auto idx = shown(t.sizes()[dim]);
        const bool last_dim = dim + 1 == t.dim();
        for (std::size_t k = 0; k < idx.size(); ++k) {
            if (k > 0) {
                out += ',';
                if (last_dim) out += ' ';
                else out += std::string(t.dim() - dim - 1, '\n') + std::string(indent + 1, ' ');
            }
            if (idx[k] < 0) out += "...";
            else write(out, dim + 1, offset + idx[k] * t.impl().stride(dim), indent + 1);
        }
        out += ']';
    }
};

}  // namespace

std::string Tensor::to_string() const
{
    if (!defined()) return "tensor(undefined)";
    if (numel() == 0) return fmt::format("tensor([], shape={}, dtype={})", sizes(), dtype());
    Printer p{*this, numel() > kSummarizeAbove};
    if (is_floating(dtype())) {
        double largest = 0, smallest = INFINITY;
        p.measure(0, 0, [&](std::int64_t i) {
            const double v = std::abs(p.value(i));
            if (!std::isfinite(v)) return;
            largest = std::max(largest, v);
            if (v > 0) smallest = std::min(smallest, v);
        });
        p.scientific = largest >= 1e8 || (smallest < 1e-4 && largest > 0);
    }
    p.measure(0, 0, [&](std::int64_t i) { p.width = std::max(p.width, p.element(i).size()); });
    std::string out = "tensor(";
    p.write(out, 0, 0, 7);
    out += fmt::format(", shape={}, dtype={}", sizes(), dtype());
    if (requires_grad()) out += ", requires_grad=true";
    out += ')';
    return out;
}

std::ostream& operator<<(std::ostream& out, const Tensor& t) { return out << t.to_string(); }

}  // namespace loom
