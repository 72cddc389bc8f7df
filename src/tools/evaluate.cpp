#include "tools/evaluate.h"

#include <algorithm>
#include <cmath>
#include <memory>

#include "core/error.h"
#include "model/lora.h"
#include "tokenizer/tokenizer.h"
#include "train/batch.h"

namespace qlora {

EvalResult evaluate_rows(TrainableModel& model, const std::vector<PackedRow>& rows, int64_t micro_batch) {
  if (rows.empty()) fail("evaluation: no rows to evaluate");
  if (micro_batch <= 0) fail("evaluation: micro-batch must be positive, got ", micro_batch);
  const int64_t B = std::min<int64_t>(micro_batch, int64_t(rows.size()));
  BatchBuffer buffer(B, int64_t(rows.front().input_ids.size()));
  return evaluate_rows(model, rows, buffer, B);
}

EvalResult evaluate_rows(TrainableModel& model, const std::vector<PackedRow>& rows, BatchBuffer& buffer,
                         int64_t micro_batch) {
  if (rows.empty()) fail("evaluation: no rows to evaluate");
  if (micro_batch <= 0) fail("evaluation: micro-batch must be positive, got ", micro_batch);
  // Evaluation mode (no LoRA dropout, dropout masks of later training steps
  // untouched), restored however this returns (an error in a batch included).
  struct EvalMode {
    TrainableModel& m;
    bool was_training;
    ~EvalMode() { m.set_training(was_training); }
  } mode{model, model.training()};
  model.set_training(false);
  double sum = 0;
  EvalResult r;
  for (size_t first = 0; first < rows.size(); first += size_t(micro_batch)) {
    const size_t count = std::min(size_t(micro_batch), rows.size() - first);
    const LlamaBatch batch = buffer.fill(rows, first, count);
    // n_targets_step = 1: forward returns the plain sum of this batch's
    // target losses, so the set's loss is normalized once, by its own count.
    sum += model.forward(batch, 1);
    r.target_tokens += model.last_num_targets();
  }
  if (r.target_tokens == 0) fail("evaluation: the ", rows.size(), " rows hold no target token");
  r.rows = int64_t(rows.size());
  r.loss = sum / double(r.target_tokens);
  r.perplexity = std::exp(r.loss);
  return r;
}

EvalResult evaluate_model(const EvalOptions& opt, EvalDataInfo* info) {
  if (opt.micro_batch <= 0) fail("evaluation: micro-batch must be positive, got ", opt.micro_batch);
  const LlamaWeights w = load_llama_weights(opt.model, opt.weights);
  std::unique_ptr<LoraWeights> lora;
  if (opt.adapter) {
    lora = std::make_unique<LoraWeights>(LoraWeights::load_peft(*opt.adapter, w.cfg));
  }
  const std::filesystem::path tok_dir = opt.tokenizer.value_or(opt.model);
  const auto tok = Tokenizer::load(tok_dir);
  DataSpec spec = opt.data;
  spec.val_files.clear();
  spec.val_fraction = 0.0;
  const PreparedData data = prepare_dataset(*tok, tok_dir, spec);
  if (info) {
    info->samples = data.train_samples;
    info->skipped_records = data.skipped_records;
    info->template_name = data.template_name;
    info->pack = data.train.stats;
  }
  const auto& rows = data.train.rows;
  if (rows.empty()) fail("evaluation: the data files gave no rows");
  const int64_t B = std::clamp<int64_t>(opt.micro_batch, 1, int64_t(rows.size()));
  LlamaModel model(w, lora.get(), B, spec.pack.seq_len);
  return evaluate_rows(model, rows, B);
}

}  // namespace qlora
