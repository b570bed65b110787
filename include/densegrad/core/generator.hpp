// densegrad/core/generator.hpp: a seedable random generator with portable distributions.
// The same seed gives the same numbers on every platform and standard library
// (std::normal_distribution does not promise that, so it is not used).
#pragma once

#include <cmath>
#include <cstdint>
#include <random>

namespace dg {

/// Like torch.Generator: `Generator g(42); auto w = dg::randn<float>({3, 3}, g);`
class Generator {
 public:
  explicit Generator(uint64_t seed = 0) : engine_(seed) {}
  void manual_seed(uint64_t seed) {
    engine_.seed(seed);
    has_spare_ = false;
  }
  uint64_t next_u64() { return engine_(); }
  /// Uniform in [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }
  /// Standard normal by Marsaglia's polar method (pairs; the second value is kept for the
  /// next call).
  double normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    double u, v, s;
    do {
      u = 2.0 * uniform() - 1.0;
      v = 2.0 * uniform() - 1.0;
      s = u * u + v * v;
    } while (s >= 1.0 || s == 0.0);
    double f = std::sqrt(-2.0 * std::log(s) / s);
    spare_ = v * f;
    has_spare_ = true;
    return u * f;
  }
  /// Uniform integer in [0, n).
  uint64_t randint(uint64_t n) {
    if (n == 0) return 0;
    const uint64_t limit = UINT64_MAX - UINT64_MAX % n;  // reject the biased tail
    uint64_t v;
    do v = next_u64(); while (v >= limit);
    return v % n;
  }
  /// Engine state, for checkpoints (std::mt19937_64 text form).
  const std::mt19937_64& engine() const { return engine_; }
  std::mt19937_64& engine() { return engine_; }

 private:
  std::mt19937_64 engine_;
  double spare_ = 0.0;
  bool has_spare_ = false;
};

/// This thread's default generator (torch's default generator, but one per thread so two
/// threads training two models never share a random stream). Seed it with manual_seed().
inline Generator& default_generator() {
  thread_local Generator gen(0);
  return gen;
}

/// torch.manual_seed for this thread's default generator.
inline void manual_seed(uint64_t seed) { default_generator().manual_seed(seed); }

}  // namespace dg
