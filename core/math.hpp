/// \file
/// Scalar math shared by kernels.
#pragma once
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
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

/// c ? a : b for float32 as bit masks: GCC will not turn a conditional that guards floating-point
/// arithmetic into a vector blend (that arithmetic might trap), so a loop over it would not vectorise.
inline float select_float(bool c, float a, float b)
{
    const std::int32_t mask = -static_cast<std::int32_t>(c);
    return std::bit_cast<float>((std::bit_cast<std::int32_t>(a) & mask) | (std::bit_cast<std::int32_t>(b) & ~mask));
}

/// e^x for float32, branch-free so loops over it vectorise, where std::exp is a libm call per
/// element: Cody-Waite reduction x = n ln 2 + r and Cephes' expf polynomial, within 2 ulps of
/// std::exp, subnormal results included; x < -104 is 0, x > 88.72 inf, NaN stays NaN.
inline float exp_float(float x)
{
    constexpr float lowest = -104.0f, highest = 88.7228390f;  // e^-104 rounds to 0
    const float c = select_float(x > lowest, std::min(x, highest), lowest);  // NaN takes `lowest`: finite below
    // n = round(c / ln 2): adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits.
    constexpr float shifter = 12582912.0f;
    const float shifted = c * 1.44269504088896341f + shifter;
    const float n = shifted - shifter;
    const std::int32_t ni = std::bit_cast<std::int32_t>(shifted) - std::bit_cast<std::int32_t>(shifter);
    const float r = (c - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float e = p * r * r + r + 1.0f;
    // 2^n in two factors: n reaches 128 and -150, whose 2^n alone is no normal float.
    const std::int32_t half = ni >> 1;
    const float scaled = e * std::bit_cast<float>((half + 127) << 23) * std::bit_cast<float>((ni - half + 127) << 23);
    const float result = select_float(x < lowest, 0.0f, select_float(x > highest, std::numeric_limits<float>::infinity(), scaled));
    return select_float(x != x, x, result);
}

/// log(x) for float32, branch-free: x = 2^e m with m in [sqrt(1/2), sqrt(2)) by bit arithmetic and
/// Cephes' logf polynomial, within 2 ulps of std::log; 0 gives -inf, a negative x or NaN NaN,
/// inf inf.
inline float log_float(float x)
{
    constexpr float smallest = std::numeric_limits<float>::min(), inf = std::numeric_limits<float>::infinity();
    const bool subnormal = x < smallest;
    const float normal = select_float(subnormal, x * 8388608.0f, x);  // times 2^23
    // Unsigned arithmetic on the bits: a negative x or NaN (answered below) must not overflow.
    const std::uint32_t bits = std::bit_cast<std::uint32_t>(normal);
    const std::int32_t e = std::bit_cast<std::int32_t>(bits - 0x3f3504f3u) >> 23;  // 0x3f3504f3: sqrt(1/2)
    const float f = std::bit_cast<float>(bits - (static_cast<std::uint32_t>(e) << 23)) - 1.0f;
    const float z = f * f;
    float y = 7.0376836292e-2f;
    y = y * f - 1.1514610310e-1f;
    y = y * f + 1.1676998740e-1f;
    y = y * f - 1.2420140846e-1f;
    y = y * f + 1.4249322787e-1f;
    y = y * f - 1.6668057665e-1f;
    y = y * f + 2.0000714765e-1f;
    y = y * f - 2.4999993993e-1f;
    y = y * f + 3.3333331174e-1f;
    const float fe = static_cast<float>(e) - select_float(subnormal, 23.0f, 0.0f);
    const float result = f + (y * f * z + fe * -2.12194440e-4f - 0.5f * z) + fe * 0.693359375f;
    return select_float(x > 0.0f, select_float(x < inf, result, inf),
                        select_float(x == 0.0f, -inf, std::numeric_limits<float>::quiet_NaN()));
}

/// log(1 + u) for float32 and finite u >= 0 (its callers pass e^-|v|, at most 1), branch-free:
/// log_float(1 + u) corrected by the rounding of 1 + u (Goldberg's form), so a tiny u gives u.
inline float log1p_float(float u)
{
    const float w = 1.0f + u;
    return log_float(w) - ((w - 1.0f) - u) / w;
}

/// c ? a : b, for float and double as bit masks (select_float), so a loop over it vectorises.
template <class T> T select_of(bool c, T a, T b)
{
    if constexpr (std::is_same_v<T, float>) {
        return select_float(c, a, b);
    } else if constexpr (std::is_same_v<T, double>) {
        const std::int64_t mask = -static_cast<std::int64_t>(c);
        return std::bit_cast<double>((std::bit_cast<std::int64_t>(a) & mask) | (std::bit_cast<std::int64_t>(b) & ~mask));
    } else {
        return c ? a : b;
    }
}

/// e^x: exp_float for float (vectorises), std::exp otherwise.
template <class T> T exp_of(T x)
{
    if constexpr (std::is_same_v<T, float>) return exp_float(x);
    else return std::exp(x);
}

/// log(x): log_float for float (vectorises), std::log otherwise.
template <class T> T log_of(T x)
{
    if constexpr (std::is_same_v<T, float>) return log_float(x);
    else return std::log(x);
}

/// log(1 + u) for finite u >= 0: log1p_float for float (vectorises), std::log1p otherwise.
template <class T> T log1p_of(T u)
{
    if constexpr (std::is_same_v<T, float>) return log1p_float(u);
    else return std::log1p(u);
}

/// softplus(x) = log(1 + e^x) as max(x, 0) + log(1 + e^-|x|): no overflow for large |x|, exact to
/// the last bit where e^-|x| is tiny, and branch-free, so that a loop of it vectorises for float
/// (always inlined: as a call it is not, into the AVX2 clones of the loops that use it).
template <class T> [[gnu::always_inline]] inline T softplus_of(T x)
{
    return std::max(x, T(0)) + log1p_of(exp_of(-std::abs(x)));
}

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
