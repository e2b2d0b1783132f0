// The elementwise ops' formulas, one struct per op: its value and the gradient it sends to each
// operand, for one element. The eager ops (elementwise.cpp) and a replayed step program
// (scan.cpp) both compute with these, so the two paths cannot drift apart. Not installed.
//
// Unary: value(x); grad(g, x, y) is dL/dx given g = dL/dy and y = value(x).
// Binary: value(a, b); grad_a(g, a, b, y) and grad_b(g, a, b, y) likewise.
// `reads` says which of x (a, b) and y the gradients use: a replay keeps every step's value of
// only those (scan.cpp).
#pragma once
#include <cmath>

#include "../core/math.hpp"

namespace loom::pointwise {

struct UnaryReads {
    bool x, y;
};
struct BinaryReads {
    bool a, b, y;
};

struct Add {
    static constexpr BinaryReads reads{false, false, false};
    template <class T> static T value(T a, T b) { return wrapping_add(a, b); }
    template <class T> static T grad_a(T g, T, T, T) { return g; }
    template <class T> static T grad_b(T g, T, T, T) { return g; }
};

struct Sub {
    static constexpr BinaryReads reads{false, false, false};
    template <class T> static T value(T a, T b) { return wrapping_sub(a, b); }
    template <class T> static T grad_a(T g, T, T, T) { return g; }
    template <class T> static T grad_b(T g, T, T, T) { return -g; }
};

struct Mul {
    static constexpr BinaryReads reads{true, true, false};
    template <class T> static T value(T a, T b) { return wrapping_mul(a, b); }
    template <class T> static T grad_a(T g, T, T b, T) { return g * b; }
    template <class T> static T grad_b(T g, T a, T, T) { return g * a; }
};

struct Div {
    static constexpr BinaryReads reads{false, true, true};
    template <class T> static T value(T a, T b) { return a / b; }
    template <class T> static T grad_a(T g, T, T b, T) { return g / b; }
    template <class T> static T grad_b(T g, T, T b, T y) { return -(g * y / b); }
};

struct Neg {
    static constexpr UnaryReads reads{false, false};
    template <class T> static T value(T x) { return wrapping_sub(T(0), x); }
    template <class T> static T grad(T g, T, T) { return -g; }
};

struct Exp {
    static constexpr UnaryReads reads{false, true};
    template <class T> static T value(T x) { return exp_of(x); }
    template <class T> static T grad(T g, T, T y) { return g * y; }
};

struct Log {
    static constexpr UnaryReads reads{true, false};
    template <class T> static T value(T x) { return log_of(x); }
    template <class T> static T grad(T g, T x, T) { return g / x; }
};

struct Tanh {
    static constexpr UnaryReads reads{false, true};
    template <class T> static T value(T x) { return tanh_of(x); }
    template <class T> static T grad(T g, T, T y) { return g * (1 - y * y); }
};

struct Sigmoid {
    static constexpr UnaryReads reads{false, true};
    template <class T> static T value(T x) { return sigmoid_of(x); }
    template <class T> static T grad(T g, T, T y) { return g * y * (1 - y); }
};

struct Relu {
    static constexpr UnaryReads reads{false, true};
    template <class T> static T value(T x) { return x > 0 ? x : T(0); }
    template <class T> static T grad(T g, T, T y) { return y > 0 ? g : T(0); }
};

}  // namespace loom::pointwise
