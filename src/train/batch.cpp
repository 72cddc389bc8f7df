#include "train/batch.h"

#include "core/error.h"
#include "kernels/ops.h"

namespace qlora {

BatchBuffer::BatchBuffer(int64_t max_rows, int64_t seq_len)
    : max_rows_(max_rows),
      T_(seq_len),
      tokens_(static_cast<size_t>(max_rows * seq_len)),
      targets_(static_cast<size_t>(max_rows * seq_len)),
      positions_(static_cast<size_t>(max_rows * seq_len)) {}

void BatchBuffer::fill_row(const PackedRow& row, int64_t b) {
  if (int64_t(row.input_ids.size()) != T_ || int64_t(row.labels.size()) != T_ ||
      int64_t(row.position_ids.size()) != T_)
    fail("packed row of ", row.input_ids.size(), " tokens, expected seq_len ", T_);
  const size_t o = size_t(b * T_);
  for (int64_t t = 0; t < T_; ++t) {
    tokens_[o + size_t(t)] = row.input_ids[size_t(t)];
    positions_[o + size_t(t)] = row.position_ids[size_t(t)];
    targets_[o + size_t(t)] = t + 1 < T_ ? row.labels[size_t(t + 1)] : ops::kIgnoreIndex;
  }
}

LlamaBatch BatchBuffer::fill(const std::vector<PackedRow>& rows, const std::vector<size_t>& order, size_t first,
                             size_t count) {
  if (int64_t(count) > max_rows_ || first + count > order.size())
    fail("batch of ", count, " rows at ", first, " does not fit (", max_rows_, " rows, ", order.size(), " in order)");
  for (size_t i = 0; i < count; ++i) fill_row(rows.at(order[first + i]), int64_t(i));
  return {tokens_.data(), targets_.data(), positions_.data(), int64_t(count), T_};
}

LlamaBatch BatchBuffer::fill(const std::vector<PackedRow>& rows, size_t first, size_t count) {
  if (int64_t(count) > max_rows_ || first + count > rows.size())
    fail("batch of ", count, " rows at ", first, " does not fit (", max_rows_, " rows, ", rows.size(), " rows)");
  for (size_t i = 0; i < count; ++i) fill_row(rows[first + i], int64_t(i));
  return {tokens_.data(), targets_.data(), positions_.data(), int64_t(count), T_};
}

int64_t row_target_count(const PackedRow& row) {
  int64_t n = 0;
  for (size_t t = 1; t < row.labels.size(); ++t) n += row.labels[t] != ops::kIgnoreIndex;
  return n;
}

}  // namespace qlora
