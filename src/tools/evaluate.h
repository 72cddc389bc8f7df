// Evaluation loss: the token-weighted mean cross entropy over every target
// token of a set of packed rows, and its perplexity. evaluate_rows is what the
// trainer calls for its validation loss; evaluate_model is the whole
// `qlora eval` (model + optional adapter + tokenizer + data pipeline).
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "data/packing.h"
#include "data/pipeline.h"
#include "model/llama.h"
#include "model/weights.h"

namespace qlora {

class BatchBuffer;

struct EvalResult {
  double loss = 0;        // sum of target losses / target_tokens (nats)
  double perplexity = 0;  // exp(loss)
  int64_t target_tokens = 0, rows = 0;
};

// Runs forward over `rows` (all of one length T, T <= the model's max_T) in
// micro-batches of up to `micro_batch` rows (<= the model's max_B). The loss
// is exact over the whole set (sum of target losses / total target tokens,
// accumulated in double), so it does not depend on micro_batch or row order
// beyond rounding. Allocates only the batch buffer (micro_batch x T ids);
// the overload taking a BatchBuffer allocates nothing. Runs the model in
// evaluation mode (LlamaModel::set_training(false): no LoRA dropout, and the
// forward count that seeds the masks of later training steps does not move),
// then restores its mode. A set without any target token is an error.
EvalResult evaluate_rows(TrainableModel& model, const std::vector<PackedRow>& rows, int64_t micro_batch);
EvalResult evaluate_rows(TrainableModel& model, const std::vector<PackedRow>& rows, BatchBuffer& buffer,
                         int64_t micro_batch);

struct EvalOptions {
  std::filesystem::path model;                     // HF folder or bnb 4-bit checkpoint
  std::optional<std::filesystem::path> adapter;    // PEFT adapter folder
  std::optional<std::filesystem::path> tokenizer;  // default: the model folder
  WeightLoadOptions weights;                       // quantize = false: dense fp32 base
  // train_files are the evaluated files (val_* are ignored); pack.seq_len is
  // the row length. The rows' shuffle does not change the result.
  DataSpec data;
  int64_t micro_batch = 4;
};

// What the data pipeline made of the files, for the report.
struct EvalDataInfo {
  size_t samples = 0;          // tokenized samples before packing
  size_t skipped_records = 0;  // on_bad_record = skip
  std::string template_name;
  PackStats pack;
};

EvalResult evaluate_model(const EvalOptions& opt, EvalDataInfo* info = nullptr);

}  // namespace qlora
