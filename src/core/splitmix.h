// splitmix64 (Steele, Lea and Flood 2014): a 64-bit counter through a fixed
// mixing function. Random numbers that are the same on every platform and
// standard library (std::normal_distribution and friends are
// implementation-defined): builtin models, random weights, benchmark data.
#pragma once

#include <cmath>
#include <cstdint>

namespace qlora {

// The output function: a bijection of 64-bit words that spreads every input
// bit over the output (a stateless hash of a counter or of a seed).
inline uint64_t splitmix64_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : s_(seed) {}
  uint64_t next() { return splitmix64_mix(s_ += 0x9e3779b97f4a7c15ull); }
  double uniform() { return (double(next() >> 11) + 0.5) * 0x1.0p-53; }  // (0, 1)
  // Box-Muller (one draw of the pair).
  double normal() {
    const double u = uniform(), v = uniform();
    return std::sqrt(-2.0 * std::log(u)) * std::cos(6.283185307179586 * v);
  }

 private:
  uint64_t s_;
};

}  // namespace qlora
