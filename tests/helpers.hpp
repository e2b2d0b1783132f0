// Small helpers shared by the test files.
#pragma once
#include <doctest/doctest.h>

#include <loom/loom.hpp>

#include <nlohmann/json.hpp>
#include <stdlib.h>

#include <algorithm>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace testing {

// The values of any tensor as doubles, row-major.
inline std::vector<double> values(const loom::Tensor& t)
{
    loom::NoGradGuard no_grad;
    const loom::Tensor c = t.to(loom::kFloat64).contiguous();
    const double* p = c.data_ptr<double>();
    return std::vector<double>(p, p + c.numel());
}

// Uniform float64 values in [low, high) from a generator of its own: the same tensor for the same seed.
inline loom::Tensor random(loom::Shape shape, std::uint64_t seed, double low = -1, double high = 1)
{
    loom::Generator gen(seed);
    return loom::uniform(shape, low, high, loom::kFloat64, &gen);
}

inline bool close(const loom::Tensor& a, const std::vector<double>& expected, double tol = 1e-6)
{
    const auto v = values(a);
    if (v.size() != expected.size()) return false;
    for (std::size_t i = 0; i < v.size(); ++i)
        if (!(std::abs(v[i] - expected[i]) <= tol * (1 + std::abs(expected[i])))) return false;
    return true;
}

inline bool close_tensors(const loom::Tensor& a, const loom::Tensor& b, double tol = 1e-6)
{
    return a.sizes() == b.sizes() && close(a, values(b), tol);
}

// Runs f, expecting a loom::Error whose message contains every one of `parts`.
template <class F> void check_error(F&& f, const std::vector<std::string>& parts)
{
    try {
        f();
        FAIL("expected a loom::Error containing \"" << parts.at(0) << "\"");
    } catch (const loom::Error& e) {
        const std::string message = e.what();
        for (const auto& part : parts) CHECK_MESSAGE(message.find(part) != std::string::npos, message);
    }
}

// A fresh folder under the system's temporary directory, removed with everything in it.
struct TempDir {
    std::filesystem::path path;
    TempDir()
    {
        std::string p = (std::filesystem::temp_directory_path() / "loom-test-XXXXXX").string();
        REQUIRE(::mkdtemp(p.data()) != nullptr);
        path = p;
    }
    ~TempDir() { std::filesystem::remove_all(path); }
    std::string file(const std::string& name) const { return (path / name).string(); }
};

// The committed PyTorch reference files (scripts/make_reference.py) whose names start with
// `prefix`, sorted.
inline std::vector<std::string> reference_files(const std::string& prefix)
{
    std::vector<std::string> out;
    for (const auto& entry : std::filesystem::directory_iterator(LOOM_TEST_DATA))
        if (entry.path().filename().string().rfind(prefix, 0) == 0 && entry.path().extension() == ".safetensors")
            out.push_back(entry.path().string());
    std::sort(out.begin(), out.end());
    return out;
}

// How many cases of `family` ("lstm", "optim", ...) the reference script wrote, from the
// manifest it writes beside them: a file gone missing fails the count.
inline std::size_t reference_count(const std::string& family)
{
    std::ifstream in(std::string(LOOM_TEST_DATA) + "/manifest.json");
    REQUIRE(in.good());
    const nlohmann::json manifest = nlohmann::json::parse(in);
    REQUIRE(manifest.contains(family));
    return manifest.at(family).get<std::size_t>();
}

inline std::string bytes_of(const std::filesystem::path& path)
{
    std::ifstream in(path, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace testing
