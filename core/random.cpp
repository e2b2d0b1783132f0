#include "random.hpp"

#include <cmath>
#include <numbers>

#include "error.hpp"

namespace loom {

namespace {
std::uint64_t splitmix64(std::uint64_t& x)
{
    std::uint64_t z = (x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}
std::uint64_t rotl(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
}  // namespace

void Generator::manual_seed(std::uint64_t seed)
{
    for (auto& word : s_) word = splitmix64(seed);
}

namespace {
// The calling thread's default generator, and how many numbers other generators have drawn on
// this thread: a checkpointed layer replays the default generator, and must notice the others.
[[gnu::tls_model("initial-exec")]] thread_local const Generator* thread_default = nullptr;
[[gnu::tls_model("initial-exec")]] thread_local std::uint64_t own_generator_draws = 0;
}  // namespace

std::uint64_t detail::draws_from_own_generators() { return own_generator_draws; }

std::uint64_t Generator::next_u64()
{
    if (this != thread_default) ++own_generator_draws;
    const std::uint64_t result = rotl(s_[1] * 5, 7) * 9;
    const std::uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
}

double Generator::uniform01() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }

double Generator::normal()
{
    const double u1 = 1.0 - uniform01();  // (0, 1]: log stays finite
    const double u2 = uniform01();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
}

std::int64_t Generator::randint(std::int64_t low, std::int64_t high)
{
    LOOM_CHECK(low < high, "randint", "expects low < high, got [{}, {})", low, high);
    // In unsigned arithmetic, where wrapping is defined: high - low may exceed INT64_MAX.
    const std::uint64_t range = static_cast<std::uint64_t>(high) - static_cast<std::uint64_t>(low);
    // Rejection sampling keeps the distribution exactly uniform.
    const std::uint64_t limit = UINT64_MAX - UINT64_MAX % range;
    std::uint64_t x;
    do x = next_u64();
    while (x >= limit);
    return static_cast<std::int64_t>(static_cast<std::uint64_t>(low) + x % range);
}

// One generator per thread: no locking, and no thread's numbers depend on another's timing.
Generator& default_generator()
{
    thread_local Generator gen(0);
    thread_default = &gen;
    return gen;
}

void manual_seed(std::uint64_t seed) { default_generator().manual_seed(seed); }

}  // namespace loom
