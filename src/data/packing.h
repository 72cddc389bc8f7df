// Tokenized samples -> fixed-length rows of seq_len tokens, either packed
// (several documents per row, with their boundaries) or one sample per row
// with padding. Over-long samples are truncated or dropped (counted).
//
// Packed rows carry document boundaries so that attention never crosses a
// document and positions restart at 0 in each (DESIGN.md). Documents are
// never split across rows: a split document would train its second half
// without the context of its first.
#pragma once

#include <cstdint>
#include <vector>

#include "data/tokenize_sample.h"

namespace qlora {

enum class OverLong { truncate, drop };

struct PackOptions {
  int64_t seq_len = 2048;
  bool packing = true;
  OverLong over_long = OverLong::truncate;
  TokenId pad_id = 0;  // padding ids carry label -100, so any id works
};

struct PackedRow {
  std::vector<TokenId> input_ids;     // seq_len
  std::vector<int32_t> labels;        // seq_len; -100 on padding
  std::vector<int32_t> position_ids;  // seq_len; restart at 0 in each document; 0 on padding
  // Start offset of each document, then the end of the last one (cu_seqlens
  // style): document d spans [doc_offsets[d], doc_offsets[d+1]). Padding
  // follows doc_offsets.back().
  std::vector<int32_t> doc_offsets;
};

struct PackStats {
  size_t samples_in = 0;
  size_t truncated = 0;           // cut to seq_len (over_long = truncate)
  size_t dropped_too_long = 0;    // over_long = drop
  size_t dropped_untrained = 0;   // no trained token left (none to begin with, or truncated away)
  int64_t tokens = 0;             // non-padding tokens in the rows
  int64_t trained_tokens = 0;
  int64_t padding = 0;
  double efficiency() const { return tokens + padding == 0 ? 0.0 : double(tokens) / double(tokens + padding); }
  double trained_share() const { return tokens == 0 ? 0.0 : double(trained_tokens) / double(tokens); }
};

struct PackResult {
  std::vector<PackedRow> rows;
  PackStats stats;
};

// Packing uses best-fit decreasing (longest sample first into the fullest row
// it fits), deterministic for given input; shuffle the rows afterwards. Error
// when seq_len < 2 or when no row has a trained token (the whole dataset is
// masked: training would learn nothing).
PackResult pack_samples(const std::vector<TokenizedSample>& samples, const PackOptions& options);

}  // namespace qlora
