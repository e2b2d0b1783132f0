/// \file
/// loom::Error and the one helper every op uses to report misuse.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

namespace loom {

/// Every misuse of the library throws this. The message starts with the op's name.
class Error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

template <class... Args>
/// Throws loom::Error for `op` with a fmt-formatted message.
[[noreturn]] void fail(std::string_view op, fmt::format_string<Args...> format, Args&&... args)
{
    throw Error(fmt::format("{}: {}", op, fmt::format(format, std::forward<Args>(args)...)));
}

}  // namespace loom

// LOOM_CHECK(condition, "op", "message {}", args...): throws loom::Error naming the op.
#define LOOM_CHECK(cond, op, ...)           \
    do {                                    \
        if (!(cond)) ::loom::fail(op, __VA_ARGS__); \
    } while (0)
