// Reads TensorBoard event files independently of loom: TFRecord frames checked with a CRC-32C
// computed here bit by bit, and each record decoded by protoc with tests/data/tensorboard_event.proto.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace event_reader {

inline std::uint32_t crc32c_bitwise(const std::string& bytes)
{
    std::uint32_t crc = 0xffffffffu;
    for (unsigned char byte : bytes) {
        crc ^= byte;
        for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0x82f63b78u & (0u - (crc & 1u)));
    }
    return ~crc;
}
inline std::uint32_t masked(std::uint32_t crc) { return ((crc >> 15) | (crc << 17)) + 0xa282ead8u; }

template <class T> T read_le(const std::string& s, std::size_t at)
{
    T v = 0;
    for (std::size_t i = 0; i < sizeof(T); ++i) v |= T(static_cast<unsigned char>(s[at + i])) << (8 * i);
    return v;
}

// Every record of an event file; throws on a truncated frame or a checksum that does not match.
inline std::vector<std::string> records(const std::string& path)
{
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("cannot open " + path);
    const std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::vector<std::string> out;
    std::size_t at = 0;
    while (at < data.size()) {
        if (at + 12 > data.size()) throw std::runtime_error("truncated frame header at byte " + std::to_string(at));
        const auto length = read_le<std::uint64_t>(data, at);
        if (read_le<std::uint32_t>(data, at + 8) != masked(crc32c_bitwise(data.substr(at, 8))))
            throw std::runtime_error("bad length checksum at byte " + std::to_string(at));
        if (at + 12 + length + 4 > data.size()) throw std::runtime_error("truncated record at byte " + std::to_string(at));
        const std::string record = data.substr(at + 12, length);
        if (read_le<std::uint32_t>(data, at + 12 + length) != masked(crc32c_bitwise(record)))
            throw std::runtime_error("bad data checksum at byte " + std::to_string(at));
        out.push_back(record);
        at += 12 + length + 4;
    }
    return out;
}

// protoc's text form of one record; `work` is a folder for the temporary files.
inline std::string decode(const std::string& record, const std::string& proto_dir, const std::string& work)
{
    const std::string bin = work + "/record.bin", text = work + "/record.txt";
    std::ofstream(bin, std::ios::binary) << record;
    const std::string command = "protoc --proto_path=" + proto_dir +
                                " --decode=tensorboard.Event tensorboard_event.proto < " + bin + " > " + text;
    if (std::system(command.c_str()) != 0)
        throw std::runtime_error("protoc failed (scripts/install-deps.sh installs it): " + command);
    std::ifstream in(text);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

}  // namespace event_reader
