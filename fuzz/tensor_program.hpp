// Runs bytes as a program of tensor API calls: creation, views, element-wise ops, reductions,
// matmul, joins, in-place writes, printing and backward, over a pool of tensors, with sizes,
// indices and scalars drawn from tables of ordinary and hostile values (zero, negative, huge,
// INT64_MIN/MAX, NaN, infinity). The only allowed outcomes of each call are a value or a
// loom::Error: the fuzz target (fuzz_tensor.cpp) and the corpus replay test
// (tests/test_fuzz_corpus.cpp) both run it.
#pragma once
#include <loom/loom.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>

namespace loom_fuzz {

using namespace loom;

class TensorProgram {
public:
    explicit TensorProgram(std::span<const std::uint8_t> bytes) : bytes_(bytes) {}

    // Runs to the end of the bytes; a loom::Error ends one call, never the program.
    void run()
    {
        manual_seed(1);
        pool_.assign(kPool, scalar_tensor(1.0));
        while (at_ < bytes_.size()) {
            const std::uint8_t op = next();
            try {
                step(op);
            } catch (const Error&) {
            }
        }
    }

private:
    static constexpr std::size_t kPool = 6;
    // Computing ops run only on tensors this small: the point is the checks, not the arithmetic.
    static constexpr std::int64_t kComputeLimit = 1 << 14;

    std::span<const std::uint8_t> bytes_;
    std::size_t at_ = 0;
    std::vector<Tensor> pool_;

    std::uint8_t next() { return at_ < bytes_.size() ? bytes_[at_++] : 0; }

    std::int64_t size_value()
    {
        static constexpr std::int64_t table[] = {0, 1, 2, 3, 4, 5, 7, -1, -2, -5, 1LL << 31, 1LL << 32, 1LL << 62,
                                                 std::numeric_limits<std::int64_t>::max(),
                                                 std::numeric_limits<std::int64_t>::min(), 16};
        return table[next() % std::size(table)];
    }
    double scalar_value()
    {
        static constexpr double table[] = {0, 1, -1, 0.5, 2, -3.25, 1e20, -1e20, 1e-30, 7,
                                           std::numeric_limits<double>::quiet_NaN(),
                                           std::numeric_limits<double>::infinity(),
                                           -std::numeric_limits<double>::infinity(), 9.3e18, 100, 0.1};
        return table[next() % std::size(table)];
    }
    DType dtype_value()
    {
        static constexpr DType table[] = {kFloat32, kFloat64, kInt64, kBool};
        return table[next() % 4];
    }
    Shape shape_value()
    {
        Shape s(next() % 5);
        for (auto& d : s) d = size_value();
        return s;
    }
    Tensor& pick() { return pool_[next() % kPool]; }
    void put(Tensor t) { pool_[next() % kPool] = std::move(t); }

    static bool small(const Tensor& t) { return t.numel() <= kComputeLimit; }
    static bool small_shape(const Shape& s)
    {
        std::int64_t n = 1;
        for (auto d : s)
            if (d < 0 || __builtin_mul_overflow(n, d, &n)) return true;  // refused before any allocation
        return n <= kComputeLimit;
    }
    // Whether making a tensor of this shape must be refused before allocating: a negative size,
    // or an element or byte count beyond int64. (Large but possible sizes are not tried: this
    // program also runs in the suite, where nothing caps an allocation.)
    static bool refused_shape(const Shape& s)
    {
        std::int64_t n = 1;
        for (auto d : s)
            if (d < 0 || __builtin_mul_overflow(n, d, &n)) return true;
        return __builtin_mul_overflow(n, std::int64_t(8), &n);
    }
    static bool small_pair(const Tensor& a, const Tensor& b)
    {
        return small(a) && small(b) && small_shape(broadcast_shapes("fuzz", a.sizes(), b.sizes()));
    }

    void step(std::uint8_t op)
    {
        switch (op % 32) {
        case 0: {  // creation
            const Shape s = shape_value();
            const DType d = dtype_value();
            if (refused_shape(s)) {
                (void)zeros(s, d);  // must throw before allocating
                return;
            }
            if (!small_shape(s)) return;
            switch (next() % 6) {
            case 0: put(zeros(s, d)); break;
            case 1: put(ones(s, d)); break;
            case 2: put(full(s, scalar_value(), d)); break;
            case 3: put(randn(s, d)); break;
            case 4: put(randint(size_value(), size_value(), s)); break;
            default: put(empty(s, d).fill_(0)); break;
            }
            return;
        }
        case 1: {
            const double a = scalar_value(), b = scalar_value(), c = scalar_value();
            if (std::isfinite(a) && std::isfinite(b) && std::isfinite(c) && c != 0 && std::abs((b - a) / c) > kComputeLimit)
                return;
            put(arange(a, b, c, dtype_value()));
            return;
        }
        case 2: {
            const Tensor& a = pick();
            if (!small(a) && !a.is_contiguous()) return;  // that reshape copies
            put(a.reshape(shape_value()));
            return;
        }
        case 3: put(pick().expand(shape_value())); return;
        case 4: put(pick().narrow(size_value(), size_value(), size_value())); return;
        case 5: put(pick().slice(size_value(), size_value(), size_value(), size_value())); return;
        case 6: put(pick().select(size_value(), size_value())); return;
        case 7: put(pick().transpose(size_value(), size_value())); return;
        case 8: put(pick().permute(shape_value())); return;
        case 9: put(next() % 2 ? pick().unsqueeze(size_value()) : pick().squeeze(size_value())); return;
        case 10: {
            const Tensor &a = pick(), &b = pick();
            if (!small_pair(a, b)) return;
            switch (next() % 7) {
            case 0: put(a + b); break;
            case 1: put(a - b); break;
            case 2: put(a * b); break;
            case 3: put(a / b); break;
            case 4: put(maximum(a, b)); break;
            case 5: put(minimum(a, b)); break;
            default: put(pow(a, b)); break;
            }
            return;
        }
        case 11: {
            const Tensor& a = pick();
            if (!small(a)) return;
            const double s = scalar_value();
            switch (next() % 5) {
            case 0: put(a + s); break;
            case 1: put(a * s); break;
            case 2: put(s / a); break;
            case 3: put(pow(a, s)); break;
            default: put(clamp(a, s, std::nullopt)); break;
            }
            return;
        }
        case 12: {
            const Tensor& a = pick();
            if (!small(a)) return;
            switch (next() % 8) {
            case 0: put(exp(a)); break;
            case 1: put(log(a)); break;
            case 2: put(tanh(a)); break;
            case 3: put(sigmoid(a)); break;
            case 4: put(relu(a)); break;
            case 5: put(abs(a)); break;
            case 6: put(-a); break;
            default: put(sqrt(a)); break;
            }
            return;
        }
        case 13: {
            const Tensor& a = pick();
            if (!small(a)) return;
            Shape dims(next() % 3);
            for (auto& d : dims) d = size_value();
            const bool keep = next() % 2;
            switch (next() % 7) {
            case 0: put(sum(a, dims, keep)); break;
            case 1: put(mean(a, dims, keep)); break;
            case 2: put(amax(a, dims, keep)); break;
            case 3: put(amin(a, dims, keep)); break;
            case 4: put(var(a, dims, true, keep)); break;
            case 5: put(norm(a, scalar_value(), dims, keep)); break;
            default: put(next() % 2 ? argmin(a, size_value(), keep) : argmax(a)); break;
            }
            return;
        }
        case 14: {
            const Tensor &a = pick(), &b = pick();
            if (!small(a) || !small(b)) return;
            put(matmul(a, b));
            return;
        }
        case 15: {
            const Tensor &a = pick(), &b = pick();
            if (!small(a) || !small(b)) return;
            put(next() % 2 ? concat({a, b}, size_value()) : stack({a, b}, size_value()));
            return;
        }
        case 16: {
            const Tensor& a = pick();
            // A huge dim (even of an empty tensor) split in ones is billions of legitimate parts.
            if (!small(a) || std::any_of(a.sizes().begin(), a.sizes().end(), [](auto s) { return s > kComputeLimit; }))
                return;
            auto parts = next() % 2 ? a.split(size_value(), size_value()) : a.chunk(size_value(), size_value());
            if (!parts.empty()) put(parts[next() % parts.size()]);
            return;
        }
        case 17: {  // in place, with and without grad mode
            Tensor& a = pick();
            const Tensor& b = pick();
            if (!small_pair(a, b)) return;
            std::optional<NoGradGuard> guard;
            if (next() % 2) guard.emplace();
            switch (next() % 5) {
            case 0: a.fill_(scalar_value()); break;
            case 1: a.mul_(scalar_value()); break;
            case 2: a.add_(b, scalar_value()); break;
            case 3: a.copy_(b); break;
            default: a.zero_(); break;
            }
            return;
        }
        case 18: pick().requires_grad_(next() % 2); return;
        case 19: {  // backward
            const Tensor& a = pick();
            if (!small(a) || !a.requires_grad()) return;
            const Tensor loss = a.numel() == 1 ? a : sum(a);
            loss.backward({}, next() % 2);
            return;
        }
        case 20: {
            const Tensor &a = pick(), &b = pick();
            if (!a.requires_grad() || !b.requires_grad() || !small(a) || !small(b)) return;
            const auto g = grad({sum(a)}, {b}, {}, false, false, /*allow_unused=*/true);
            if (g[0].defined()) put(g[0]);
            return;
        }
        case 21: {
            const Tensor& a = pick();
            if (a.numel() <= 64 || next() % 4 == 0) (void)a.to_string();
            return;
        }
        case 22: {
            const Tensor& a = pick();
            if (!small(a)) return;
            put(next() % 2 ? a.to(dtype_value()) : a.contiguous().clone());
            return;
        }
        case 23: {
            const Tensor& a = pick();
            const Tensor index = randint(size_value() % 8, 8, {next() % 5});
            if (!small(a)) return;
            put(next() % 2 ? a.index_select(size_value(), index) : a.gather(size_value(), index));
            return;
        }
        case 24: {
            const Tensor &a = pick(), &b = pick();
            if (!small_pair(a, b)) return;
            put(next() % 2 ? where(gt(a, b), a, b) : a.masked_fill(lt(a, b), scalar_value()));
            return;
        }
        case 25: {
            const Tensor& a = pick();
            if (!small(a)) return;
            put(next() % 2 ? softmax(a, size_value()) : log_softmax(a, size_value()));
            return;
        }
        case 26: {
            const Tensor& a = pick();
            if (a.numel() == 1) (void)a.item<double>();
            (void)a.is_contiguous();
            return;
        }
        case 27: {
            const Tensor& a = pick();
            if (!small(a)) return;
            put(one_hot(a, size_value() % 64, dtype_value()));
            return;
        }
        case 28: {
            Tensor& a = pick();
            if (!small(a)) return;
            NoGradGuard no_grad;  // uniform_ on a tensor that requires grad is refused otherwise
            a.uniform_(scalar_value(), scalar_value());
            return;
        }
        default: {
            const Tensor &a = pick(), &b = pick();
            if (!small_pair(a, b)) return;
            put(nn::mse_loss(a, b));
            return;
        }
        }
    }
};

}  // namespace loom_fuzz
