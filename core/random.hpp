/// \file
/// Seeded random numbers: xoshiro256** seeded by splitmix64, so a seed gives the same
/// numbers on every platform and the state is four integers a checkpoint can store.
#pragma once
#include <array>
#include <cstdint>

namespace loom {

/// A random stream (xoshiro256**): a Generator of one's own gives draws independent of the default one, for reproducible data or dropout.
class Generator {
public:
    /// A stream seeded with `seed`.
    explicit Generator(std::uint64_t seed = 0) { manual_seed(seed); }
    /// Restarts the stream from `seed`.
    void manual_seed(std::uint64_t seed);
    /// The next 64 random bits.
    std::uint64_t next_u64();
    double uniform01();  ///< [0, 1), 53 random bits
    double normal();  ///< standard normal (Box-Muller)
    std::int64_t randint(std::int64_t low, std::int64_t high);  ///< [low, high)

    /// The stream's state, to save.
    std::array<std::uint64_t, 4> state() const { return s_; }
    /// Restores a saved state.
    void set_state(const std::array<std::uint64_t, 4>& s) { s_ = s; }

private:
    std::array<std::uint64_t, 4> s_{};
};

/// The generator used when an op is given none. Each thread has its own, seeded with 0 when the
/// thread first uses it, so threads never race on it; manual_seed seeds the calling thread's.
/// For reproducible streams on worker threads, call manual_seed(base + worker index) at the
/// start of each (or hand each a Generator of its own).
Generator& default_generator();
/// Seeds the calling thread's default generator.
void manual_seed(std::uint64_t seed);

namespace detail {
/// How many numbers generators other than this thread's default one have drawn on this thread.
std::uint64_t draws_from_own_generators();
}  // namespace detail

}  // namespace loom
