// Packed rows -> the model's micro-batch. Rows carry unshifted labels (HF:
// labels[i] belongs to input_ids[i]); the model wants, at each position, the
// id of the next token to predict, so targets[t] = labels[t + 1] and the last
// position predicts nothing. Document boundaries need no special case: the
// first label of every document is -100 (data/tokenize_sample.h), so no
// document is trained to predict the next one.
#pragma once

#include <cstdint>
#include <vector>

#include "data/packing.h"
#include "model/llama.h"

namespace qlora {

class BatchBuffer {
 public:
  // Room for max_rows rows of seq_len tokens, allocated once.
  BatchBuffer(int64_t max_rows, int64_t seq_len);
  // Fills the buffer from rows[first, first + count) of `order` (indices into
  // rows) and returns the batch; count <= max_rows.
  LlamaBatch fill(const std::vector<PackedRow>& rows, const std::vector<size_t>& order, size_t first,
                  size_t count);
  // Rows given directly (evaluation in file order).
  LlamaBatch fill(const std::vector<PackedRow>& rows, size_t first, size_t count);

 private:
  void fill_row(const PackedRow& row, int64_t b);
  int64_t max_rows_, T_;
  std::vector<int32_t> tokens_, targets_, positions_;
};

// Number of trained targets of a row (labels != -100 after the first position).
int64_t row_target_count(const PackedRow& row);

}  // namespace qlora
