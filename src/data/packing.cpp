#include "data/packing.h"

#include <algorithm>
#include <map>
#include <numeric>

#include "core/error.h"

namespace qlora {

namespace {

bool any_trained(const std::vector<int32_t>& labels, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (labels[i] != kIgnoreLabel) return true;
  return false;
}

PackedRow empty_row() {
  PackedRow r;
  r.doc_offsets.push_back(0);
  return r;
}

void append_doc(PackedRow& row, const TokenizedSample& s, size_t n) {
  row.input_ids.insert(row.input_ids.end(), s.input_ids.begin(), s.input_ids.begin() + static_cast<ptrdiff_t>(n));
  row.labels.insert(row.labels.end(), s.labels.begin(), s.labels.begin() + static_cast<ptrdiff_t>(n));
  for (size_t i = 0; i < n; ++i) row.position_ids.push_back(static_cast<int32_t>(i));
  row.doc_offsets.push_back(static_cast<int32_t>(row.input_ids.size()));
}

void pad_row(PackedRow& row, size_t seq_len, TokenId pad, PackStats& st) {
  const size_t used = row.input_ids.size();
  st.tokens += static_cast<int64_t>(used);
  st.padding += static_cast<int64_t>(seq_len - used);
  for (size_t i = 0; i < used; ++i) st.trained_tokens += row.labels[i] != kIgnoreLabel;
  row.input_ids.resize(seq_len, pad);
  row.labels.resize(seq_len, kIgnoreLabel);
  row.position_ids.resize(seq_len, 0);
}

}  // namespace

PackResult pack_samples(const std::vector<TokenizedSample>& samples, const PackOptions& o) {
  if (o.seq_len < 2) fail("seq_len must be at least 2, got ", o.seq_len);
  const size_t seq_len = static_cast<size_t>(o.seq_len);
  PackResult out;
  PackStats& st = out.stats;
  st.samples_in = samples.size();

  // Keep (index, length used) of the samples that survive the length policy.
  std::vector<std::pair<size_t, size_t>> keep;
  for (size_t i = 0; i < samples.size(); ++i) {
    const auto& s = samples[i];
    if (s.labels.size() != s.input_ids.size()) fail("sample ", i, ": labels and input_ids differ in length");
    size_t n = s.input_ids.size();
    if (n == 0) continue;
    if (n > seq_len) {
      if (o.over_long == OverLong::drop) {
        ++st.dropped_too_long;
        continue;
      }
      ++st.truncated;
      n = seq_len;
    }
    if (!any_trained(s.labels, n)) {
      ++st.dropped_untrained;
      continue;
    }
    keep.emplace_back(i, n);
  }
  if (keep.empty())
    fail("no sample has a trained token (", st.samples_in, " samples: ", st.dropped_untrained,
         " with every token masked, ", st.dropped_too_long,
         " too long); check the chat template, train_on_inputs and seq_len");

  if (!o.packing) {
    for (const auto& [i, n] : keep) {
      PackedRow row = empty_row();
      append_doc(row, samples[i], n);
      pad_row(row, seq_len, o.pad_id, st);
      out.rows.push_back(std::move(row));
    }
    return out;
  }

  // Best-fit decreasing: free space -> row index, smallest sufficient first.
  std::stable_sort(keep.begin(), keep.end(), [](const auto& a, const auto& b) { return a.second > b.second; });
  std::multimap<size_t, size_t> free_space;
  for (const auto& [i, n] : keep) {
    auto it = free_space.lower_bound(n);
    size_t r;
    if (it == free_space.end()) {
      r = out.rows.size();
      out.rows.push_back(empty_row());
    } else {
      r = it->second;
      free_space.erase(it);
    }
    append_doc(out.rows[r], samples[i], n);
    const size_t left = seq_len - out.rows[r].input_ids.size();
    if (left > 0) free_space.emplace(left, r);
  }
  for (auto& row : out.rows) pad_row(row, seq_len, o.pad_id, st);
  return out;
}

}  // namespace qlora
