// The elementwise ops' formulas, one struct per op: its value and the gradient it sends to each
// operand, for one element. The eager ops (elementwise.cpp) and a replayed step program
// (scan.cpp) both compute with these, so the two paths cannot drift apart. Not installed.
//
// Unary: value(x); grad(g, x, y) is dL/dx given g = dL/dy and y = value(x).
// Binary: value(a, b); grad_a(g, a, b, y) and grad_b(g, a, b, y) likewise.
// `reads` says which of x (a, b) and y the gradients use: a replay keeps every step's value of
// only those (scan.cpp), and an op that the sweep runs from its formula (sweep.cpp) saves
// exactly those for backward, in that order. `kind` names the formula in such an op's backward
// token (BackwardOps::pointwise).
#pragma once
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../core/kernels.hpp"
#include "../core/math.hpp"

namespace loom::pointwise {

/// The formulas an entry's backward token may name (0: none), so that the sweep can run them
/// without the backward function; and those a replayed step program's elementwise instructions
/// compute with (relu only there: its eager op is swept through its backward function).
enum class Kind : std::uint8_t { none, add, sub, mul, div, neg, exp, log, tanh, sigmoid, relu };

// Whether a gradient g can be read element by element where it lies: floating, and contiguous or
// one value spread over its shape (*spread says which).
[[gnu::always_inline]] inline bool readable_in_place(const Tensor& g, bool* spread)
{
    const bool contiguous = g.is_contiguous();
    *spread = !contiguous && g.numel() > 0 && kernels::all_strides_zero(g);
    return is_floating(g.dtype()) && (*spread || contiguous);
}
// Whether the operand v pairs with g element for element: contiguous, of g's shape and dtype.
[[gnu::always_inline]] inline bool pairs_with(const Tensor& v, const Tensor& g)
{
    return v.is_contiguous() && v.dtype() == g.dtype() && v.sizes() == g.sizes();
}

struct UnaryReads {
    bool x, y;
};
struct BinaryReads {
    bool a, b, y;
};

struct Add {
    static constexpr Kind kind = Kind::add;
    static constexpr BinaryReads reads{false, false, false};
    template <class T> static T value(T a, T b) { return wrapping_add(a, b); }
    template <class T> static T grad_a(T g, T, T, T) { return g; }
    template <class T> static T grad_b(T g, T, T, T) { return g; }
};

struct Sub {
    static constexpr Kind kind = Kind::sub;
    static constexpr BinaryReads reads{false, false, false};
    template <class T> static T value(T a, T b) { return wrapping_sub(a, b); }
    template <class T> static T grad_a(T g, T, T, T) { return g; }
    template <class T> static T grad_b(T g, T, T, T) { return -g; }
};

struct Mul {
    static constexpr Kind kind = Kind::mul;
    static constexpr BinaryReads reads{true, true, false};
    template <class T> static T value(T a, T b) { return wrapping_mul(a, b); }
    template <class T> static T grad_a(T g, T, T b, T) { return g * b; }
    template <class T> static T grad_b(T g, T a, T, T) { return g * a; }
};

struct Div {
    static constexpr Kind kind = Kind::div;
    static constexpr BinaryReads reads{false, true, true};
    template <class T> static T value(T a, T b) { return a / b; }
    template <class T> static T grad_a(T g, T, T b, T) { return g / b; }
    template <class T> static T grad_b(T g, T, T b, T y) { return -(g * y / b); }
};

struct Neg {
    static constexpr Kind kind = Kind::neg;
    static constexpr UnaryReads reads{false, false};
    template <class T> static T value(T x) { return wrapping_sub(T(0), x); }
    template <class T> static T grad(T g, T, T) { return -g; }
};

struct Exp {
    static constexpr Kind kind = Kind::exp;
    static constexpr UnaryReads reads{false, true};
    template <class T> static T value(T x) { return exp_of(x); }
    template <class T> static T grad(T g, T, T y) { return g * y; }
};

struct Log {
    static constexpr Kind kind = Kind::log;
    static constexpr UnaryReads reads{true, false};
    template <class T> static T value(T x) { return log_of(x); }
    template <class T> static T grad(T g, T x, T) { return g / x; }
};

struct Tanh {
    static constexpr Kind kind = Kind::tanh;
    static constexpr UnaryReads reads{false, true};
    template <class T> static T value(T x) { return tanh_of(x); }
    template <class T> static T grad(T g, T, T y) { return g * (1 - y * y); }
};

struct Sigmoid {
    static constexpr Kind kind = Kind::sigmoid;
    static constexpr UnaryReads reads{false, true};
    template <class T> static T value(T x) { return sigmoid_of(x); }
    template <class T> static T grad(T g, T, T y) { return g * y * (1 - y); }
};

struct Relu {
    static constexpr Kind kind = Kind::relu;
    static constexpr UnaryReads reads{false, true};
    template <class T> static T value(T x) { return x > 0 ? x : T(0); }
    template <class T> static T grad(T g, T, T y) { return y > 0 ? g : T(0); }
};

/// Whether formula F is a binary op's (value(a, b)) rather than a unary one's.
template <class F> constexpr bool is_binary = std::is_same_v<decltype(F::reads), const BinaryReads>;

/// with_formula's failure, out of line.
[[noreturn, gnu::cold]] void fail_no_formula();

/// fn.template operator()<F>() for the formula F that `kind` names: the one place that maps a
/// Kind to its formula, for the sweep and for a replayed step program alike. `none` is an
/// internal error.
template <class Fn> [[gnu::always_inline]] inline decltype(auto) with_formula(Kind kind, Fn&& fn)
{
    switch (kind) {
    case Kind::add: return fn.template operator()<Add>();
    case Kind::sub: return fn.template operator()<Sub>();
    case Kind::mul: return fn.template operator()<Mul>();
    case Kind::div: return fn.template operator()<Div>();
    case Kind::neg: return fn.template operator()<Neg>();
    case Kind::exp: return fn.template operator()<Exp>();
    case Kind::log: return fn.template operator()<Log>();
    case Kind::tanh: return fn.template operator()<Tanh>();
    case Kind::sigmoid: return fn.template operator()<Sigmoid>();
    case Kind::relu: return fn.template operator()<Relu>();
    case Kind::none: break;
    }
    fail_no_formula();
}

}  // namespace loom::pointwise
