// Writing a whole text file so that a reader never sees half of it. Not installed.
#pragma once
#include <string>
#include <string_view>

namespace loom::detail {

// Writes `text` to a temporary file beside `path` and renames it over `path`; errors name `op`.
void write_file_atomically(const std::string& path, std::string_view text, const char* op);

}  // namespace loom::detail
