// The steps around packing: tokenizing many samples on several threads,
// a seeded shuffle, and the train/validation split. Everything here is
// deterministic for a given input and seed, whatever the thread count, so a
// run can be reproduced (and, later, cached by a hash of its inputs).
#pragma once

#include <cstdint>
#include <vector>

#include "data/tokenize_sample.h"

namespace qlora {

// tokenize_sample over all samples on `threads` threads (0 = hardware
// concurrency), results in input order. On errors the one of the earliest
// failing sample is thrown, so the message does not depend on scheduling.
std::vector<TokenizedSample> tokenize_all(const Tokenizer& tok, const ChatTemplate& tmpl,
                                          const std::vector<Sample>& samples, const TokenizeOptions& options,
                                          unsigned threads = 0);

// Fisher-Yates with mt19937_64 and our own bounded draw: std::shuffle and
// std::uniform_int_distribution differ between standard libraries, and the
// order must not change with the toolchain.
template <typename T>
void seeded_shuffle(std::vector<T>& v, uint64_t seed);

// Index permutation used by seeded_shuffle.
std::vector<size_t> seeded_permutation(size_t n, uint64_t seed);

struct Split {
  std::vector<size_t> train, val;  // indices into the input, each in input order
};
// Holds out round(fraction * n) items chosen by seed (at least 1 when
// fraction > 0 and n > 1, never all of them). fraction in [0, 1).
Split split_validation(size_t n, double fraction, uint64_t seed);

template <typename T>
void seeded_shuffle(std::vector<T>& v, uint64_t seed) {
  const auto perm = seeded_permutation(v.size(), seed);
  std::vector<T> out;
  out.reserve(v.size());
  for (size_t i : perm) out.push_back(std::move(v[i]));
  v = std::move(out);
}

}  // namespace qlora
