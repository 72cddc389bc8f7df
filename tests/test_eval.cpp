// Evaluation: evaluate_rows equals an independent computation (logits +
// log-softmax over the shifted labels, in double), does not depend on the
// micro-batch, leaves the model's forward count alone; `qlora eval` prints
// that loss and exp(loss) for a dataset through the data pipeline.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <random>

#include "core/error.h"
#include "model/builtin.h"
#include "model/llama.h"
#include "model/lora.h"
#include "model/weights.h"
#include "test_models.h"
#include "testing.h"
#include "tools/evaluate.h"
#include "train/batch.h"
#include "train/peft_adapter.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;
using testing::CliResult;
using testing::random_lora;
using testing::run_qlora;
using testing::ScratchDir;

// Rows of T tokens: two documents each (positions restart), the first tokens
// of each untrained (a prompt), then padding; lengths vary by row.
std::vector<PackedRow> make_rows(int64_t n, int64_t T, int32_t vocab, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> id(0, vocab - 1);
  std::vector<PackedRow> rows;
  for (int64_t r = 0; r < n; ++r) {
    PackedRow row;
    const int32_t d1 = int32_t(T / 2 - r % 3), d2 = int32_t(T / 2 - 2 - r % 4);
    for (int32_t len : {d1, d2}) {
      row.doc_offsets.push_back(int32_t(row.input_ids.size()));
      for (int32_t p = 0; p < len; ++p) {
        row.input_ids.push_back(id(rng));
        row.labels.push_back(p < 3 ? kIgnoreLabel : row.input_ids.back());
        row.position_ids.push_back(p);
      }
    }
    row.doc_offsets.push_back(int32_t(row.input_ids.size()));
    while (int64_t(row.input_ids.size()) < T) {
      row.input_ids.push_back(0);
      row.labels.push_back(kIgnoreLabel);
      row.position_ids.push_back(0);
    }
    rows.push_back(std::move(row));
  }
  return rows;
}

// The reference: logits of each row alone, then -log softmax at the label of
// the next position, in double.
std::pair<double, int64_t> reference_loss(LlamaModel& model, const std::vector<PackedRow>& rows, int64_t V) {
  double sum = 0;
  int64_t count = 0;
  for (const PackedRow& row : rows) {
    const int64_t T = int64_t(row.input_ids.size());
    std::vector<float> logits(static_cast<size_t>(T * V));
    model.logits(logits.data(), {row.input_ids.data(), nullptr, row.position_ids.data(), 1, T});
    for (int64_t t = 0; t + 1 < T; ++t) {
      const int32_t y = row.labels[size_t(t + 1)];
      if (y == kIgnoreLabel) continue;
      const float* z = logits.data() + t * V;
      double mx = z[0], s = 0;
      for (int64_t v = 1; v < V; ++v) mx = std::max(mx, double(z[v]));
      for (int64_t v = 0; v < V; ++v) s += std::exp(double(z[v]) - mx);
      sum += mx + std::log(s) - z[y];
      ++count;
    }
  }
  return {sum / double(count), count};
}

TEST(EvalRows, EqualsAnIndependentComputationForEveryMicroBatch) {
  ScratchDir dir;
  write_builtin_model("tiny", dir / "m");
  const LlamaWeights w = load_llama_weights(dir / "m");  // NF4, as training sees it
  LoraConfig lc;
  lc.rank = 4;
  LoraWeights lora = random_lora(w.cfg, lc, 5, 0.05f);
  const int64_t T = 24;
  const auto rows = make_rows(5, T, int32_t(w.cfg.vocab_size), 9);
  LlamaModel model(w, &lora, 5, T);
  const auto [ref, count] = reference_loss(model, rows, w.cfg.vocab_size);

  model.set_forward_count(7);
  std::vector<double> losses;
  for (int64_t mb : {1, 2, 3, 5, 8}) {
    SCOPED_TRACE(mb);
    const EvalResult r = evaluate_rows(model, rows, mb);
    EXPECT_EQ(r.target_tokens, count);
    EXPECT_EQ(r.rows, 5);
    // fp32 model, double accumulation: the two paths differ by fp32 rounding
    // of the logits (relative ~1e-6 of a loss near log V = 6.2).
    EXPECT_NEAR(r.loss, ref, 1e-5 * ref);
    EXPECT_DOUBLE_EQ(r.perplexity, std::exp(r.loss));
    losses.push_back(r.loss);
  }
  for (double l : losses) EXPECT_NEAR(l, losses[0], 1e-6 * losses[0]) << "depends on the micro-batch";
  EXPECT_EQ(model.forward_count(), 7u) << "evaluation must not move the dropout masks of training";

  // The allocation-free overload with the trainer's buffer: the same result.
  BatchBuffer buf(2, T);
  const EvalResult r2 = evaluate_rows(model, rows, buf, 2);
  EXPECT_NEAR(r2.loss, losses[1], 1e-12 * losses[1]);

  // The loss is the token-weighted mean, not a mean of per-row means: rows
  // with different target counts make the two differ.
  double mean_of_means = 0;
  for (const PackedRow& row : rows) mean_of_means += reference_loss(model, {row}, w.cfg.vocab_size).first;
  mean_of_means /= double(rows.size());
  EXPECT_NEAR(losses[0], ref, 1e-5 * ref);
  EXPECT_NE(mean_of_means, ref);
}

TEST(EvalRows, RefusesEmptyAndUntrainedSets) {
  ScratchDir dir;
  write_builtin_model("tiny", dir / "m");
  WeightLoadOptions dense;
  dense.quantize = false;
  const LlamaWeights w = load_llama_weights(dir / "m", dense);
  LlamaModel model(w, nullptr, 2, 16);
  auto rows = make_rows(2, 16, 512, 1);
  for (auto& row : rows) std::fill(row.labels.begin(), row.labels.end(), kIgnoreLabel);
  EXPECT_NE(testing::error_of([&] { evaluate_rows(model, rows, 2); }).find("no target"), std::string::npos);
  EXPECT_NE(testing::error_of([&] { evaluate_rows(model, {}, 2); }).find("no rows"), std::string::npos);
  EXPECT_THROW(evaluate_rows(model, make_rows(2, 16, 512, 1), 0), Error);
}

// A story the stories260K model was trained on the like of, and the same
// letters scrambled: the model must find the first far more likely.
const char* kStory =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
    "friends. One day, she saw a big red ball under a tree. She was very happy and ran to get it.";

std::string scrambled(std::string s) {
  std::mt19937 rng(3);
  std::shuffle(s.begin(), s.end(), rng);
  return s;
}

void write_text_jsonl(const fs::path& p, const std::vector<std::string>& texts) {
  std::string out;
  for (const auto& t : texts) out += nlohmann::json{{"text", t}}.dump() + "\n";
  testing::write_bytes(p, out);
}

TEST(EvalModel, StoriesModelPrefersStoriesAndTheCliAgrees) {
  QLORA_REQUIRE_FIXTURES(fx);
  const fs::path model = fx / "models/stories260K/hf";
  ScratchDir dir;
  write_text_jsonl(dir / "story.jsonl",
                   {kStory, std::string(kStory).substr(0, 90), "Tom had a dog. The dog was fun."});
  write_text_jsonl(dir / "noise.jsonl", {scrambled(kStory)});

  EvalOptions opt;
  opt.model = model;
  opt.weights.quantize = false;
  opt.data.read.format = DataFormat::text;
  opt.data.chat_template = "none";  // the base model's tokenizer has no chat template
  opt.data.pack.seq_len = 64;
  opt.data.train_files = {dir / "story.jsonl"};
  opt.micro_batch = 2;
  EvalDataInfo info;
  const EvalResult story = evaluate_model(opt, &info);
  EXPECT_EQ(info.samples, 3u);
  EXPECT_GT(story.rows, 1);
  EXPECT_DOUBLE_EQ(story.perplexity, std::exp(story.loss));
  opt.data.train_files = {dir / "noise.jsonl"};
  const EvalResult noise = evaluate_model(opt);
  EXPECT_LT(story.loss + 1.0, noise.loss) << "a story should be far more likely than scrambled letters";
  opt.data.train_files = {dir / "story.jsonl"};
  opt.micro_batch = 1;
  EXPECT_NEAR(evaluate_model(opt).loss, story.loss, 1e-6 * story.loss);

  // The CLI: the same numbers, as text and as JSON.
  const std::string args = "--model '" + model.string() + "' --data '" + (dir / "story.jsonl").string() +
                           "' --format text --seq-len 64 --batch 2 --quant none";
  CliResult r = run_qlora("eval " + args);
  ASSERT_EQ(r.status, 0) << r.output;
  double loss = 0, ppl = 0;
  long long targets = 0, rows = 0;
  const size_t at = r.output.find("loss ");
  ASSERT_NE(at, std::string::npos) << r.output;
  ASSERT_EQ(std::sscanf(r.output.c_str() + at, "loss %lf  perplexity %lf  (%lld target tokens in %lld rows)",
                        &loss, &ppl, &targets, &rows),
            4)
      << r.output;
  EXPECT_NEAR(loss, story.loss, 1e-4);
  EXPECT_NEAR(ppl, story.perplexity, 0.01);
  EXPECT_EQ(targets, story.target_tokens);
  EXPECT_EQ(rows, story.rows);
  r = run_qlora("eval " + args + " --json");
  ASSERT_EQ(r.status, 0) << r.output;
  const auto j = nlohmann::json::parse(r.output);
  EXPECT_NEAR(j.at("loss").get<double>(), story.loss, 1e-9 * story.loss);
  EXPECT_DOUBLE_EQ(j.at("perplexity").get<double>(), std::exp(j.at("loss").get<double>()));
  EXPECT_EQ(j.at("target_tokens").get<int64_t>(), story.target_tokens);
  EXPECT_EQ(j.at("samples").get<int64_t>(), 3);

  // Bad input: named.
  r = run_qlora("eval " + args + " --field nonsense=x");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("nonsense"), std::string::npos) << r.output;
  r = run_qlora("eval --model '" + model.string() + "' --data '" + (dir / "missing.jsonl").string() +
                "' --format text");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("missing.jsonl"), std::string::npos) << r.output;
}

TEST(EvalModel, AdapterIsAppliedWithoutDropout) {
  QLORA_REQUIRE_FIXTURES(fx);
  const fs::path model = fx / "models/stories260K/hf";
  ScratchDir dir;
  write_text_jsonl(dir / "story.jsonl", {kStory});
  const ModelConfig cfg = load_model_config(model);
  EvalOptions opt;
  opt.model = model;
  opt.data.read.format = DataFormat::text;
  opt.data.chat_template = "none";  // the base model's tokenizer has no chat template
  opt.data.pack.seq_len = 64;
  opt.data.train_files = {dir / "story.jsonl"};
  const EvalResult base = evaluate_model(opt);  // NF4 base

  LoraConfig lc;
  lc.rank = 4;
  LoraWeights zero(cfg, lc);
  zero.init_default(1);  // B = 0: the adapted model is the base
  save_peft_adapter(zero, cfg, dir / "zero", "stories260K");
  opt.adapter = dir / "zero";
  EXPECT_DOUBLE_EQ(evaluate_model(opt).loss, base.loss);

  // A non-zero adapter saved with dropout 0.1 evaluates as with dropout 0.
  const LoraWeights nz = random_lora(cfg, lc, 2, 0.05f);
  save_peft_adapter(nz, cfg, dir / "nz0", "stories260K");
  lc.dropout = 0.1;
  LoraWeights nzd(cfg, lc);
  std::memcpy(nzd.flat_params(), nz.flat_params(), nz.flat_size() * sizeof(float));
  save_peft_adapter(nzd, cfg, dir / "nzd", "stories260K");
  opt.adapter = dir / "nz0";
  const EvalResult with = evaluate_model(opt);
  EXPECT_NE(with.loss, base.loss);
  opt.adapter = dir / "nzd";
  EXPECT_DOUBLE_EQ(evaluate_model(opt).loss, with.loss);
}

}  // namespace
}  // namespace qlora
