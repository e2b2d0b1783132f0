/// \file
/// Scalar math shared by kernels.
#pragma once
#include <algorithm>
#include <cmath>
#include <type_traits>

// Compiles a hot loop twice, for AVX2 and for the baseline x86-64 (SSE2), and picks one when the
// program starts: 8 floats per instruction where the CPU has them, while the library still runs
// everywhere. No FMA, so both versions compute the same bits. GCC only: clang 14 does not clone
// templates, and builds without (the fuzz targets). Not under ThreadSanitizer, whose runtime is
// not ready when the loader runs the functions that pick a version (the program dies at start).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_THREAD__)
#define LOOM_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LOOM_VECTOR_CLONES
#endif

namespace loom {

/// tanh for float32 as a rational function (the approximation Eigen and XLA use): within a few
/// float32 ulps of std::tanh, and several times faster than glibc's tanhf, which dominated the
/// recurrent layers' time. float64 keeps std::tanh.
/// Branch-free, so loops over it vectorise.
inline float tanh_float(float x)
{
    constexpr float bound = 7.90531110763549805f;  // tanh is 1 to float precision past it
    const float low = x < -bound ? -bound : x, c = low > bound ? bound : low, x2 = c * c;
    float p = -2.76076847742355e-16f;
    p = p * x2 + 2.00018790482477e-13f;
    p = p * x2 - 8.60467152213735e-11f;
    p = p * x2 + 5.12229709037114e-08f;
    p = p * x2 + 1.48572235717979e-05f;
    p = p * x2 + 6.37261928875436e-04f;
    p = p * x2 + 4.89352455891786e-03f;
    float q = 1.19825839466702e-06f;
    q = q * x2 + 1.18534705686654e-04f;
    q = q * x2 + 2.26843463243900e-03f;
    q = q * x2 + 4.89352518554385e-03f;
    return c * p / q;  // near 0 within an ulp of x
}

/// sigmoid(x) = (1 + tanh(x / 2)) / 2 for float32: vectorises with tanh_float, where a loop over
/// 1 / (1 + expf(-x)) calls libm once per element. Within a few 1e-8 of the exact value.
inline float sigmoid_float(float x) { return 0.5f * tanh_float(0.5f * x) + 0.5f; }

/// Integer arithmetic wraps around in two's complement, as PyTorch's does, instead of being
/// undefined on overflow; floating point is unchanged.
template <class T> T wrapping_add(T a, T b)
{
    if constexpr (std::is_integral_v<T>) return static_cast<T>(static_cast<std::make_unsigned_t<T>>(a) + static_cast<std::make_unsigned_t<T>>(b));
    else return a + b;
}
/// a - b, wrapping around for integers as unsigned arithmetic does (no undefined overflow).
template <class T> T wrapping_sub(T a, T b)
{
    if constexpr (std::is_integral_v<T>) return static_cast<T>(static_cast<std::make_unsigned_t<T>>(a) - static_cast<std::make_unsigned_t<T>>(b));
    else return a - b;
}
/// a * b, wrapping around for integers as unsigned arithmetic does (no undefined overflow).
template <class T> T wrapping_mul(T a, T b)
{
    if constexpr (std::is_integral_v<T>) return static_cast<T>(static_cast<std::make_unsigned_t<T>>(a) * static_cast<std::make_unsigned_t<T>>(b));
    else return a * b;
}

/// tanh: tanh_float for float (vectorises), std::tanh otherwise.
template <class T> T tanh_of(T x)
{
    if constexpr (std::is_same_v<T, float>) return tanh_float(x);
    else return std::tanh(x);
}

/// sigmoid: sigmoid_float for float (vectorises), 1 / (1 + e^-x) otherwise.
template <class T> T sigmoid_of(T x)
{
    if constexpr (std::is_same_v<T, float>) return sigmoid_float(x);
    else return T(1) / (T(1) + std::exp(-x));
}

}  // namespace loom
