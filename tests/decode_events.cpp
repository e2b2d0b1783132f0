// decode_events FILE PROTO_DIR: every record of a TensorBoard event file, checksums verified,
// decoded by protoc, separated by lines "---". For the examples' smoke test.
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>

#include <unistd.h>

#include "event_reader.hpp"

int main(int argc, char** argv)
{
    if (argc != 3) {
        std::fprintf(stderr, "usage: decode_events FILE PROTO_DIR\n");
        return 2;
    }
    try {
        const std::string work = std::filesystem::temp_directory_path() / ("decode_events." + std::to_string(::getpid()));
        std::filesystem::create_directories(work);
        for (const auto& record : event_reader::records(argv[1]))
            std::printf("%s---\n", event_reader::decode(record, argv[2], work).c_str());
        std::filesystem::remove_all(work);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "decode_events: %s\n", e.what());
        return 1;
    }
}
