/// \file
/// Element types and the one place that turns a runtime dtype into a C++ type.
#pragma once
#include <cmath>
#include <limits>
#include <type_traits>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "error.hpp"

namespace loom {

/// A tensor's element type.
enum class DType : std::uint8_t { Float32, Float64, Int64, Bool };

/// float, as torch::kFloat32.
inline constexpr DType kFloat32 = DType::Float32;
/// float, as torch::kFloat.
inline constexpr DType kFloat = DType::Float32;
/// double, as torch::kFloat64.
inline constexpr DType kFloat64 = DType::Float64;
/// double, as torch::kDouble.
inline constexpr DType kDouble = DType::Float64;
/// std::int64_t, as torch::kInt64.
inline constexpr DType kInt64 = DType::Int64;
/// std::int64_t, as torch::kLong.
inline constexpr DType kLong = DType::Int64;
/// bool, as torch::kBool.
inline constexpr DType kBool = DType::Bool;

/// "float32", "float64", "int64" or "bool".
constexpr std::string_view dtype_name(DType d)
{
    switch (d) {
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
    case DType::Int64: return "int64";
    case DType::Bool: return "bool";
    }
    return "?";
}

/// Bytes per element.
constexpr std::size_t dtype_size(DType d)
{
    switch (d) {
    case DType::Float32: return 4;
    case DType::Float64: return 8;
    case DType::Int64: return 8;
    case DType::Bool: return 1;
    }
    return 0;
}

/// Whether d is float32 or float64.
constexpr bool is_floating(DType d) { return d == DType::Float32 || d == DType::Float64; }

/// The dtype of the C++ type T.
template <class T> constexpr DType dtype_of();
/// float32.
template <> constexpr DType dtype_of<float>() { return DType::Float32; }
/// float64.
template <> constexpr DType dtype_of<double>() { return DType::Float64; }
/// int64.
template <> constexpr DType dtype_of<std::int64_t>() { return DType::Int64; }
/// bool.
template <> constexpr DType dtype_of<bool>() { return DType::Bool; }

/// `dispatch(d, [&]<class T>() { ... })` calls the lambda with T = the C++ type of d.
template <class F> decltype(auto) dispatch(DType d, F&& f)
{
    switch (d) {
    case DType::Float32: return f.template operator()<float>();
    case DType::Float64: return f.template operator()<double>();
    case DType::Int64: return f.template operator()<std::int64_t>();
    case DType::Bool: return f.template operator()<bool>();
    }
    throw Error("dispatch: unknown dtype");
}

/// Like dispatch, for ops defined on float32 and float64 only.
template <class F> decltype(auto) dispatch_floating(std::string_view op, DType d, F&& f)
{
    switch (d) {
    case DType::Float32: return f.template operator()<float>();
    case DType::Float64: return f.template operator()<double>();
    default: fail(op, "expects a float32 or float64 tensor, got {}", dtype_name(d));
    }
}

/// v converted from S to D, defined for every value: a float that is not finite or beyond
/// D's integer range is refused naming `op` (C++ leaves that conversion undefined; loom does not
/// guess), and a double beyond float's range becomes an infinity, as IEEE rounding gives.
template <class D, class S> D convert_value(std::string_view op, S v)
{
    if constexpr (std::is_floating_point_v<S> && std::is_integral_v<D> && !std::is_same_v<D, bool>) {
        constexpr S low = S(std::numeric_limits<D>::min()), high = -low;  // -2^(bits-1) and 2^(bits-1)
        if (!(std::isfinite(v) && v >= low && v < high))
            fail(op, "the {} value {} has no {}-bit integer equivalent", dtype_name(dtype_of<S>()), v,
                 8 * sizeof(D));
    } else if constexpr (std::is_same_v<S, double> && std::is_same_v<D, float>) {
        if (std::isfinite(v) && std::abs(v) > double(std::numeric_limits<float>::max()))
            return v > 0 ? std::numeric_limits<float>::infinity() : -std::numeric_limits<float>::infinity();
    }
    return static_cast<D>(v);
}

/// Throws naming `op` unless d is float32 or float64.
inline void check_floating(std::string_view op, DType d)
{
    if (!is_floating(d)) fail(op, "expects a float32 or float64 tensor, got {}", dtype_name(d));
}

/// Like dispatch, for arithmetic (every dtype but bool).
template <class F> decltype(auto) dispatch_numeric(std::string_view op, DType d, F&& f)
{
    switch (d) {
    case DType::Float32: return f.template operator()<float>();
    case DType::Float64: return f.template operator()<double>();
    case DType::Int64: return f.template operator()<std::int64_t>();
    default: fail(op, "expects a float32, float64 or int64 tensor, got {}", dtype_name(d));
    }
}

/// Throws naming `op` unless d is float32, float64 or int64.
inline void check_numeric(std::string_view op, DType d)
{
    if (!is_floating(d) && d != DType::Int64) fail(op, "expects a float32, float64 or int64 tensor, got {}", dtype_name(d));
}

}  // namespace loom

/// \cond fmt_formatters
template <> struct fmt::formatter<loom::DType> : fmt::formatter<std::string_view> {
    auto format(loom::DType d, fmt::format_context& ctx) const
    {
        return fmt::formatter<std::string_view>::format(loom::dtype_name(d), ctx);
    }
};
/// \endcond
