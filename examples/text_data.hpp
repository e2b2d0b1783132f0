// Reading the text examples' data files. Every problem is a loom::Error that names the file, the
// line and what was expected. UTF-8 is checked and decoded with utfcpp (Debian's libutfcpp-dev),
// which covers every malformed and overlong sequence so that we do not have to write that code ourselves.
#pragma once
#include <loom/loom.hpp>

#include <utf8cpp/utf8.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

namespace text_data {

[[noreturn]] inline void bad_line(const std::string& path, std::size_t line, const std::string& what)
{
    throw loom::Error(fmt::format("{} line {}: {}", path, line, what));
}

// The lines of a UTF-8 text file without their endings ("\r\n" too). Line k is lines[k - 1].
inline std::vector<std::string> read_lines(const std::string& path)
{
    std::ifstream in(path, std::ios::binary);
    if (!in) throw loom::Error(fmt::format("cannot open {}: {}", path, std::strerror(errno)));
    std::vector<std::string> lines;
    for (std::string line; std::getline(in, line);) {
        if (!line.empty() && line.back() == '\r') line.pop_back();
        const auto bad = utf8::find_invalid(line.begin(), line.end());
        if (bad != line.end())
            bad_line(path, lines.size() + 1,
                     fmt::format("byte {} (0x{:02x}) is not valid UTF-8; expected UTF-8 text", bad - line.begin() + 1,
                                 static_cast<unsigned char>(*bad)));
        lines.push_back(std::move(line));
    }
    if (in.bad()) throw loom::Error(fmt::format("reading {} failed after line {}", path, lines.size()));
    return lines;
}

// One record of a CSV file, as RFC 4180 writes them: a field holding a comma or a quote is
// quoted, and a quote inside it is doubled.
inline std::vector<std::string> csv_fields(const std::string& line, const std::string& path, std::size_t number)
{
    std::vector<std::string> fields(1);
    bool quoted = false;
    for (std::size_t i = 0; i < line.size(); ++i) {
        const char c = line[i];
        if (quoted) {
            if (c != '"') fields.back() += c;
            else if (i + 1 < line.size() && line[i + 1] == '"') fields.back() += '"', ++i;
            else if (i + 1 == line.size() || line[i + 1] == ',') quoted = false;
            else bad_line(path, number, fmt::format("a closing quote at column {} is not followed by a comma", i + 1));
        } else if (c == ',') {
            fields.emplace_back();
        } else if (c == '"' && fields.back().empty()) {
            quoted = true;
        } else {
            fields.back() += c;
        }
    }
    if (quoted) bad_line(path, number, "a quoted field is not closed (expected a closing \")");
    return fields;
}

// v in a seeded random order: train::minibatches' shuffle, so the examples' splits and batches
// draw from the generator as loom's own shuffles do.
template <class T> void shuffle(std::vector<T>& v, loom::Generator& gen)
{
    if (v.empty()) return;
    const auto n = static_cast<std::int64_t>(v.size());
    const std::vector<std::int64_t> order = loom::train::minibatches(n, n, &gen).front();
    std::vector<T> shuffled;
    shuffled.reserve(v.size());
    for (std::int64_t i : order) shuffled.push_back(std::move(v[std::size_t(i)]));
    v = std::move(shuffled);
}

inline std::u32string code_points(const std::string& utf8_text) { return utf8::utf8to32(utf8_text); }

inline std::string to_utf8(const std::u32string& text) { return utf8::utf32to8(text); }

}  // namespace text_data
