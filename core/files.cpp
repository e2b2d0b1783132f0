#include "files_internal.hpp"

#include <filesystem>
#include <fstream>

#include "error.hpp"

namespace loom::detail {

void write_file_atomically(const std::string& path, std::string_view text, const char* op)
{
    const std::string temp = path + ".tmp";
    {
        std::ofstream out(temp, std::ios::trunc | std::ios::binary);
        out.write(text.data(), std::streamsize(text.size()));
        out.flush();
        LOOM_CHECK(out.good(), op, "cannot write {}", temp);
    }
    std::error_code error;
    std::filesystem::rename(temp, path, error);
    LOOM_CHECK(!error, op, "cannot rename {} to {}: {}", temp, path, error.message());
}

}  // namespace loom::detail
