// safetensors files and module state dicts: round trips, corrupt files, atomic writes.
#include "helpers.hpp"

#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>

using namespace loom;
using testing::check_error;
using testing::close;
using testing::bytes_of;
using testing::TempDir;
using testing::values;
namespace fs = std::filesystem;

namespace {

void write_bytes(const std::string& path, const std::string& bytes)
{
    std::ofstream(path, std::ios::binary) << bytes;
}

// A file with the given JSON header and data bytes.
std::string file_with(const std::string& header, const std::string& data)
{
    std::string out(8, '\0');
    const std::uint64_t n = header.size();
    std::memcpy(out.data(), &n, 8);
    return out + header + data;
}

}  // namespace

TEST_CASE("save and load round-trip every dtype, views and metadata")
{
    TempDir dir;
    const Tensor f32 = tensor({1.5, -2, 3}, kFloat32), f64 = randn({2, 3}, kFloat64);
    const Tensor i64 = from_vector<std::int64_t>({-1, 0, 7}, {3}), mask = tensor({1, 0}).to(kBool);
    const Tensor strided = arange(12, kFloat64).reshape({3, 4}).t();  // saved as its values, row-major
    save(dir.file("a.safetensors"), {{"f32", f32}, {"f64", f64}, {"i64", i64}, {"mask", mask}, {"t", strided},
                                     {"empty", zeros({0, 2})}},
         {{"format", "pt"}, {"step", "12"}});
    const auto loaded = load_with_metadata(dir.file("a.safetensors"));
    CHECK(loaded.tensors.size() == 6);
    CHECK(loaded.tensors.at("f32").dtype() == kFloat32);
    CHECK(values(loaded.tensors.at("f32")) == values(f32));
    CHECK(values(loaded.tensors.at("f64")) == values(f64));
    CHECK(loaded.tensors.at("i64").dtype() == kInt64);
    CHECK(values(loaded.tensors.at("i64")) == values(i64));
    CHECK(loaded.tensors.at("mask").dtype() == kBool);
    CHECK(values(loaded.tensors.at("t")) == values(strided));
    CHECK(loaded.tensors.at("t").sizes() == Shape{4, 3});
    CHECK(loaded.tensors.at("empty").sizes() == Shape{0, 2});
    CHECK(loaded.metadata.at("step") == "12");

    // The layout is the format's: 8-byte length, JSON header padded to 8 bytes, data.
    const std::string raw = bytes_of(dir.file("a.safetensors"));
    std::uint64_t n = 0;
    std::memcpy(&n, raw.data(), 8);
    CHECK(n % 8 == 0);
    CHECK(raw[8] == '{');
    CHECK(raw.find("\"dtype\":\"F32\"") != std::string::npos);
    CHECK(raw.find("\"__metadata__\"") != std::string::npos);
}

TEST_CASE("corrupt or unsupported files give a clear error and nothing else")
{
    TempDir dir;
    const std::string path = dir.file("bad.safetensors");
    const auto expect = [&](const std::string& bytes, std::vector<std::string> parts) {
        write_bytes(path, bytes);
        parts.insert(parts.begin(), path);
        check_error([&] { (void)load(path); }, parts);
    };
    const std::string good_header = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
    const std::string good = file_with(good_header, std::string(8, '\1'));
    write_bytes(path, good);
    CHECK(load(path).at("w").sizes() == Shape{2});

    expect(good.substr(0, 5), {"too short"});
    expect(good.substr(0, 20), {"header length"});
    expect(good.substr(0, good.size() - 1), {"outside the 7 bytes"});
    expect(good + "x", {"1 bytes of data follow"});
    expect(file_with("{\"w\":", ""), {"not valid JSON"});
    expect(file_with("[1,2]", ""), {"not a JSON object"});
    expect(file_with(R"({"w":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}})", "1234"), {"F16", "does not support"});
    expect(file_with(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", std::string(8, 'a')),
           {"needs 12 bytes", "give 8"});
    expect(file_with(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", std::string(8, 'a')),
           {"non-negative integer"});
    expect(file_with(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", std::string(8, 'a')),
           {"larger than the data"});
    expect(file_with(R"({"w":{"dtype":"F32","shape":[2]}})", std::string(8, 'a')), {"needs dtype, shape and data_offsets"});
    expect(file_with(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                     std::string(8, 'a')),
           {"overlap or gap"});
    expect(file_with(R"({"__metadata__":{"k":1}})", ""), {"metadata", "not a string"});
    check_error([&] { (void)load(dir.file("missing.safetensors")); }, {"cannot open", "missing.safetensors"});
}

TEST_CASE("writes are atomic: a failed save leaves the previous file intact")
{
    TempDir dir;
    const std::string path = dir.file("model.safetensors");
    save(path, {{"w", ones({2})}});
    const std::string before = bytes_of(path);
    // An undefined tensor makes the save fail before anything is renamed over the file.
    check_error([&] { save(path, {{"a", ones({1000})}, {"z", Tensor()}}); }, {"save", "\"z\" is undefined"});
    CHECK(bytes_of(path) == before);
    // A rename that fails (the target is a non-empty directory) leaves no temporary file behind.
    fs::create_directory(dir.path / "taken");
    std::ofstream(dir.path / "taken" / "x") << "x";
    check_error([&] { save((dir.path / "taken").string(), {{"w", ones({2})}}); }, {"save", "cannot move"});
    std::size_t files = 0;
    for (const auto& entry : fs::directory_iterator(dir.path)) files += entry.is_regular_file();
    CHECK(files == 1);
    check_error([&] { save(dir.file("no/such/dir/m.safetensors"), {{"w", ones({2})}}); }, {"save", "temporary file"});
    CHECK(bytes_of(path) == before);
}

TEST_CASE("state dicts round-trip through a file and mismatches are reported together")
{
    TempDir dir;
    nn::LSTM a(nn::LSTMOptions(3, 4).num_layers(2).bidirectional(true));
    save(dir.file("lstm.safetensors"), a.state_dict());
    nn::LSTM b(nn::LSTMOptions(3, 4).num_layers(2).bidirectional(true));
    b.load_state_dict(load(dir.file("lstm.safetensors")));
    for (const auto& [name, p] : a.named_parameters())
        CHECK_MESSAGE(values(p) == values(b.state_dict().at(name)), name);

    nn::LSTM other(nn::LSTMOptions(3, 5).num_layers(1));
    const std::vector<double> before = values(other.weights(0, 0).w_ih);
    check_error([&] { other.load_state_dict(a.state_dict()); },
                {"load_state_dict", "unexpected keys: bias_hh_l0_reverse", "weight_ih_l1",
                 "shape or dtype mismatches: weight_ih_l0 (file [16, 3], module [20, 3])", "bias_hh_l0 (file [16], module [20])"});
    CHECK(values(other.weights(0, 0).w_ih) == before);  // nothing was copied

    NamedTensorMap partial = a.state_dict();
    partial.erase("weight_hh_l1");
    partial["extra"] = ones({1});
    check_error([&] { b.load_state_dict(partial); }, {"missing keys: weight_hh_l1", "unexpected keys: extra"});
    b.load_state_dict(partial, /*strict=*/false);

    // float64 values load into a float32 module, converted.
    nn::Dense d32(2, 2), d64(2, 2, true, kFloat64);
    d32.load_state_dict(d64.state_dict());
    CHECK(close(d32.weight, values(d64.weight)));
    CHECK(d32.weight.dtype() == kFloat32);
}
