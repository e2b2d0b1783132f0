#include "safetensors.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <vector>

#include "../core/kernels.hpp"

namespace loom {

static_assert(std::endian::native == std::endian::little, "safetensors data is little-endian");

namespace {

constexpr std::uint64_t kMaxHeader = 100'000'000;  // as the reference implementation

std::string_view safetensors_dtype(DType d)
{
    switch (d) {
    case kFloat32: return "F32";
    case kFloat64: return "F64";
    case kInt64: return "I64";
    case kBool: return "BOOL";
    }
    return "?";
}

DType dtype_from(const std::string& name, const std::string& source, const std::string& tensor)
{
    if (name == "F32") return kFloat32;
    if (name == "F64") return kFloat64;
    if (name == "I64") return kInt64;
    if (name == "BOOL") return kBool;
    fail("load", "{}: tensor \"{}\" has dtype {}, which loom does not support (F32, F64, I64, BOOL)", source, tensor,
         name);
}

struct Region {
    std::uint64_t begin, end;
    std::string name;
};

}  // namespace

SafetensorsContents parse_safetensors(std::span<const std::byte> bytes, const std::string& source)
{
    LOOM_CHECK(bytes.size() >= 8, "load", "{}: file of {} bytes is too short for a safetensors header", source,
               bytes.size());
    std::uint64_t header_size = 0;
    std::memcpy(&header_size, bytes.data(), 8);
    LOOM_CHECK(header_size <= kMaxHeader && header_size <= bytes.size() - 8, "load",
               "{}: header length {} exceeds the file ({} bytes)", source, header_size, bytes.size());
    const char* header_begin = reinterpret_cast<const char*>(bytes.data() + 8);
    nlohmann::json header;
    try {
        header = nlohmann::json::parse(header_begin, header_begin + header_size);
    } catch (const nlohmann::json::exception& e) {
        fail("load", "{}: header is not valid JSON ({})", source, e.what());
    }
    LOOM_CHECK(header.is_object(), "load", "{}: header is not a JSON object", source);
    const std::span<const std::byte> data = bytes.subspan(8 + header_size);

    SafetensorsContents out;
    std::vector<Region> regions;
    for (const auto& [name, entry] : header.items()) {
        if (name == "__metadata__") {
            LOOM_CHECK(entry.is_object(), "load", "{}: __metadata__ is not an object", source);
            for (const auto& [key, value] : entry.items()) {
                LOOM_CHECK(value.is_string(), "load", "{}: metadata \"{}\" is not a string", source, key);
                out.metadata[key] = value.get<std::string>();
            }
            continue;
        }
        LOOM_CHECK(entry.is_object() && entry.contains("dtype") && entry.contains("shape") &&
                       entry.contains("data_offsets"),
                   "load", "{}: tensor \"{}\" needs dtype, shape and data_offsets", source, name);
        const auto& dtype_json = entry["dtype"];
        const auto& shape_json = entry["shape"];
        const auto& offsets_json = entry["data_offsets"];
        LOOM_CHECK(dtype_json.is_string(), "load", "{}: tensor \"{}\" has a dtype that is not a string", source, name);
        const DType dtype = dtype_from(dtype_json.get<std::string>(), source, name);
        LOOM_CHECK(shape_json.is_array(), "load", "{}: tensor \"{}\" has a shape that is not an array", source, name);
        Shape shape;
        std::uint64_t numel = 1;
        for (const auto& dim : shape_json) {
            LOOM_CHECK(dim.is_number_unsigned(), "load", "{}: tensor \"{}\" has a dimension that is not a "
                       "non-negative integer", source, name);
            const auto size = dim.get<std::uint64_t>();
            LOOM_CHECK(size <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) &&
                           (size == 0 || numel <= data.size() / size),
                       "load", "{}: tensor \"{}\" has shape {} larger than the data", source, name, shape_json.dump());
            numel *= size;
            shape.push_back(static_cast<std::int64_t>(size));
        }
        LOOM_CHECK(offsets_json.is_array() && offsets_json.size() == 2 && offsets_json[0].is_number_unsigned() &&
                       offsets_json[1].is_number_unsigned(),
                   "load", "{}: tensor \"{}\" needs data_offsets [begin, end]", source, name);
        const auto begin = offsets_json[0].get<std::uint64_t>(), end = offsets_json[1].get<std::uint64_t>();
        LOOM_CHECK(begin <= end && end <= data.size(), "load",
                   "{}: tensor \"{}\" has data_offsets [{}, {}] outside the {} bytes of data", source, name, begin,
                   end, data.size());
        LOOM_CHECK(end - begin == numel * dtype_size(dtype), "load",
                   "{}: tensor \"{}\" of shape {} and dtype {} needs {} bytes, its data_offsets give {}", source, name,
                   shape, dtype, numel * dtype_size(dtype), end - begin);
        regions.push_back({begin, end, name});
        Tensor t = empty(shape, dtype);
        if (end > begin) std::memcpy(t.impl().storage->data, data.data() + begin, end - begin);
        out.tensors.emplace(name, std::move(t));
    }
    // The data must be exactly the tensors' bytes, back to back: no overlaps, holes or trailing bytes.
    std::sort(regions.begin(), regions.end(), [](const Region& a, const Region& b) {
        return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    std::uint64_t at = 0;
    for (const auto& r : regions) {
        LOOM_CHECK(r.begin == at, "load", "{}: tensor \"{}\" starts at byte {}, expected {} (overlap or gap)", source,
                   r.name, r.begin, at);
        at = r.end;
    }
    LOOM_CHECK(at == data.size(), "load", "{}: {} bytes of data follow the last tensor", source, data.size() - at);
    return out;
}

SafetensorsContents load_with_metadata(const std::string& path)
{
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    LOOM_CHECK(fd >= 0, "load", "cannot open {}: {}", path, std::strerror(errno));
    std::vector<std::byte> bytes;
    try {
        struct stat st {};
        LOOM_CHECK(::fstat(fd, &st) == 0, "load", "cannot read {}: {}", path, std::strerror(errno));
        LOOM_CHECK(S_ISREG(st.st_mode), "load", "{} is not a regular file (a safetensors file is expected)", path);
        // Read to the end rather than trust st_size, which some files (in /proc) report as 0.
        std::size_t used = 0;
        bytes.resize(std::max<std::size_t>(static_cast<std::size_t>(st.st_size) + 1, 4096));
        while (true) {
            if (used == bytes.size()) bytes.resize(bytes.size() * 2);
            const ssize_t n = ::read(fd, bytes.data() + used, bytes.size() - used);
            if (n < 0 && errno == EINTR) continue;
            LOOM_CHECK(n >= 0, "load", "cannot read {}: {}", path, std::strerror(errno));
            if (n == 0) break;
            used += static_cast<std::size_t>(n);
        }
        bytes.resize(used);
    } catch (const std::bad_alloc&) {
        ::close(fd);
        fail("load", "{} is too large to read into memory", path);
    } catch (...) {
        ::close(fd);
        throw;
    }
    ::close(fd);
    return parse_safetensors(bytes, path);
}

NamedTensorMap load(const std::string& path) { return load_with_metadata(path).tensors; }

// ---- writing ----

namespace {

// The process's umask, read without changing it (umask() would race with other threads).
mode_t current_umask()
{
    std::ifstream status("/proc/self/status");
    std::string line;
    while (std::getline(status, line))
        if (line.rfind("Umask:", 0) == 0) return static_cast<mode_t>(std::stoul(line.substr(6), nullptr, 8));
    return 022;
}

// Temporary files are named .<target>.tmp-<pid>-XXXXXX: one left by a process that no longer
// runs (killed mid-save) is removed by the next save of the same target.
std::string temp_prefix(const std::filesystem::path& target) { return fmt::format(".{}.tmp-", target.filename().string()); }

void remove_stale_temps(const std::filesystem::path& dir, const std::filesystem::path& target)
{
    const std::string prefix = temp_prefix(target);
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
        const std::string name = entry.path().filename().string();
        if (name.rfind(prefix, 0) != 0) continue;
        const std::string rest = name.substr(prefix.size());
        const auto dash = rest.find('-');
        if (dash == std::string::npos || dash == 0 || rest.find_first_not_of("0123456789") != dash) continue;
        const long pid = std::strtol(rest.substr(0, dash).c_str(), nullptr, 10);
        if (pid > 0 && ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) std::filesystem::remove(entry.path(), ec);
    }
}

// Writes all of `data` to `fd`, or throws.
void write_all(int fd, const void* data, std::size_t size, const std::string& path)
{
    const char* p = static_cast<const char*>(data);
    while (size > 0) {
        const ssize_t n = ::write(fd, p, size);
        if (n < 0 && errno == EINTR) continue;
        LOOM_CHECK(n > 0, "save", "writing {} failed: {}", path, std::strerror(errno));
        p += n;
        size -= static_cast<std::size_t>(n);
    }
}

}  // namespace

void save(const std::string& path, const NamedTensorMap& tensors, const Metadata& metadata)
{
    nlohmann::json header = nlohmann::json::object();
    if (!metadata.empty()) header["__metadata__"] = metadata;
    std::vector<Tensor> ordered;
    std::uint64_t offset = 0;
    for (const auto& [name, t] : tensors) {
        LOOM_CHECK(name != "__metadata__" && !name.empty(), "save", "invalid tensor name \"{}\"", name);
        LOOM_CHECK(t.defined(), "save", "tensor \"{}\" is undefined", name);
        const Tensor c = kernels::contiguous(t);
        const std::uint64_t bytes = static_cast<std::uint64_t>(c.numel()) * dtype_size(c.dtype());
        header[name] = {{"dtype", safetensors_dtype(c.dtype())}, {"shape", c.sizes()}, {"data_offsets", {offset, offset + bytes}}};
        offset += bytes;
        ordered.push_back(c);
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');  // keeps the data 8-byte aligned
    const std::uint64_t header_size = text.size();

    const std::filesystem::path target(path);
    const std::filesystem::path dir = target.has_parent_path() ? target.parent_path() : ".";
    remove_stale_temps(dir, target);
    std::string temp = (dir / fmt::format("{}{}-XXXXXX", temp_prefix(target), ::getpid())).string();
    const int fd = ::mkstemp(temp.data());
    LOOM_CHECK(fd >= 0, "save", "cannot create a temporary file next to {}: {}", path, std::strerror(errno));
    try {
        // mkstemp makes the file 0600; give it the mode any new file gets (0666 less the umask).
        LOOM_CHECK(::fchmod(fd, 0666 & ~current_umask()) == 0, "save", "cannot set the mode of {}: {}", temp,
                   std::strerror(errno));
        write_all(fd, &header_size, 8, temp);
        write_all(fd, text.data(), text.size(), temp);
        for (const Tensor& t : ordered)
            write_all(fd, t.impl().data,
                      static_cast<std::size_t>(t.numel()) * dtype_size(t.dtype()), temp);
        LOOM_CHECK(::fsync(fd) == 0, "save", "flushing {} failed: {}", temp, std::strerror(errno));
    } catch (...) {
        ::close(fd);
        ::unlink(temp.c_str());
        throw;
    }
    if (::close(fd) != 0) {
        const int err = errno;
        ::unlink(temp.c_str());
        fail("save", "closing {} failed: {}", temp, std::strerror(err));
    }
    if (::rename(temp.c_str(), path.c_str()) != 0) {
        const int err = errno;
        ::unlink(temp.c_str());
        fail("save", "cannot move {} to {}: {}", temp, path, std::strerror(err));
    }
    // The rename is durable only once the folder's entry is on disk.
    const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    LOOM_CHECK(dir_fd >= 0, "save", "wrote {} but cannot open its folder to flush it: {}", path, std::strerror(errno));
    const int synced = ::fsync(dir_fd);
    const int err = errno;
    ::close(dir_fd);
    LOOM_CHECK(synced == 0, "save", "wrote {} but flushing its folder failed: {}", path, std::strerror(err));
}

}  // namespace loom
