#include "data/prepare.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <limits>
#include <numeric>
#include <random>
#include <thread>

#include "core/error.h"

namespace qlora {

namespace {

// Uniform in [0, bound) by rejection (no modulo bias), from raw mt19937_64
// output, which the standard fixes bit for bit.
uint64_t draw(std::mt19937_64& rng, uint64_t bound) {
  const uint64_t limit = std::numeric_limits<uint64_t>::max() - std::numeric_limits<uint64_t>::max() % bound;
  uint64_t x;
  do x = rng();
  while (x >= limit);
  return x % bound;
}

}  // namespace

std::vector<TokenizedSample> tokenize_all(const Tokenizer& tok, const ChatTemplate& tmpl,
                                          const std::vector<Sample>& samples, const TokenizeOptions& options,
                                          unsigned threads) {
  const size_t n = samples.size();
  std::vector<TokenizedSample> out(n);
  std::vector<std::exception_ptr> errors(n);
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  threads = static_cast<unsigned>(std::min<size_t>(threads, std::max<size_t>(n, 1)));
  // Work is handed out in small chunks from a shared counter: sample costs
  // vary by orders of magnitude (a tweet vs. a contract).
  constexpr size_t kChunk = 16;
  std::atomic<size_t> next{0};
  // No early stop on a failure: every sample is tried, so the error thrown
  // (the earliest sample's) does not depend on thread timing.
  auto work = [&] {
    for (size_t begin; (begin = next.fetch_add(kChunk)) < n;) {
      for (size_t i = begin; i < std::min(n, begin + kChunk); ++i) {
        try {
          out[i] = tokenize_sample(tok, tmpl, samples[i], options);
        } catch (...) {
          errors[i] = std::current_exception();
        }
      }
    }
  };
  std::vector<std::thread> pool;
  for (unsigned t = 1; t < threads; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
  return out;
}

std::vector<size_t> seeded_permutation(size_t n, uint64_t seed) {
  std::vector<size_t> p(n);
  std::iota(p.begin(), p.end(), size_t{0});
  std::mt19937_64 rng(seed);
  for (size_t i = n; i > 1; --i) std::swap(p[i - 1], p[draw(rng, i)]);
  return p;
}

Split split_validation(size_t n, double fraction, uint64_t seed) {
  if (!(fraction >= 0.0 && fraction < 1.0)) fail("validation fraction must be in [0, 1), got ", fraction);
  size_t k = static_cast<size_t>(std::llround(fraction * static_cast<double>(n)));
  if (fraction > 0.0 && n > 1) k = std::clamp<size_t>(k, 1, n - 1);
  if (n <= 1) k = 0;
  const auto perm = seeded_permutation(n, seed);
  std::vector<char> is_val(n, 0);
  for (size_t i = 0; i < k; ++i) is_val[perm[i]] = 1;
  Split s;
  for (size_t i = 0; i < n; ++i) (is_val[i] ? s.val : s.train).push_back(i);
  return s;
}

}  // namespace qlora
