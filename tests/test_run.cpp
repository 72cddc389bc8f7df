// End to end: `qlora run` on the built-in demo and on stories260K — the loss
// falls, a resumed run is bit-identical to an uninterrupted one, the output
// folder rules hold, a diverging run stops keeping its last good checkpoint.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "io/hf_config.h"
#include "model/builtin.h"
#include "model/lora.h"
#include "recipe/recipe.h"
#include "testing.h"
#include "train/checkpoint.h"
#include "train/metrics.h"
#include "train/report.h"
#include "train/sample_text.h"
#include "train/trainer.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;
using testing::error_of;
using testing::read_bytes;
using testing::ScratchDir;

const fs::path kDemo = fs::path(QLORA_SOURCE_DIR) / "recipes" / "demo.yaml";

// The demo recipe with the output in `out` and the given overrides; sample
// generations off, output quiet (a temporary file) unless asked.
struct Quiet {
  Quiet() : f(std::tmpfile()) {}
  ~Quiet() {
    if (f) std::fclose(f);
  }
  std::FILE* f;
};

Recipe demo(const fs::path& out, std::vector<std::string> overrides) {
  overrides.push_back("output.dir=" + out.string());
  overrides.push_back("data.cache=false");
  return load_recipe(kDemo, overrides);
}

RunSummary run_quiet(const Recipe& r, RunOptions o = {}) {
  Quiet q;
  o.out = q.f;
  o.live = false;
  o.samples = false;
  return run_recipe(r, o);
}

// A few steps of the demo with dropout and gradient accumulation, so that
// resuming must restore the dropout masks and the data position too.
std::vector<std::string> short_run() {
  return {"train.max_steps=6", "train.save_every=3", "train.eval_every=2", "train.micro_batch=1",
          "train.grad_accum=2", "lora.dropout=0.1", "logging.every=1"};
}

TEST(Run, DemoLossFallsWellBelowTheStart) {
  ScratchDir d;
  const Recipe r = demo(d / "run", {"train.epochs=1"});
  RunOptions o;
  o.live = false;
  std::FILE* log = std::fopen((d / "log").c_str(), "w");
  ASSERT_TRUE(log);
  o.out = log;
  const RunSummary s = run_recipe(r, o);
  std::fclose(log);
  ASSERT_TRUE(s.first_val_loss && s.last_val_loss);
  // A random base starts near ln(512) = 6.2 nats; one epoch of the demo
  // brings validation loss down by well over a nat.
  EXPECT_LT(*s.last_val_loss, *s.first_val_loss - 1.0) << *s.first_val_loss << " -> " << *s.last_val_loss;
  EXPECT_LT(s.last_loss, s.first_loss - 1.0);
  // The sample answers before and after: generated from the alpaca prompt, and
  // changed by training.
  const std::string text = read_bytes(d / "log");
  for (const auto& prompt : r.logging.sample_prompts) {
    auto reply = [&](const std::string& when) {
      const size_t at = text.find("sample (" + when + ")\n  prompt: " + prompt + "\n  reply:  ");
      EXPECT_NE(at, std::string::npos) << when << " " << prompt << "\n" << text;
      if (at == std::string::npos) return std::string();
      const size_t b = text.find("reply:  ", at) + 8;
      return text.substr(b, text.find('\n', b) - b);
    };
    const std::string before = reply("before training"), after = reply("after training");
    EXPECT_FALSE(after.empty());
    EXPECT_NE(before, after) << prompt;
    // The same answers in the report (HTML-escaped) and in samples.json (the
    // random base's replies may be invalid UTF-8, kept as U+FFFD: compared by count).
    const std::string html = read_bytes(d / "run" / "report.html");
    EXPECT_NE(html.find("Answers before and after training"), std::string::npos);
    EXPECT_NE(html.find(html_escape(after)), std::string::npos) << after;
    const SampleReplies kept = load_sample_replies(d / "run");
    EXPECT_EQ(kept.prompts, r.logging.sample_prompts);
    EXPECT_EQ(kept.before.size(), r.logging.sample_prompts.size());
    EXPECT_EQ(kept.after.size(), r.logging.sample_prompts.size());
  }

  // The run folder: resolved recipe, metrics, report, PEFT adapter.
  const fs::path out = d / "run";
  EXPECT_TRUE(fs::exists(out / "recipe.yaml"));
  EXPECT_TRUE(fs::exists(out / "report.html"));
  EXPECT_TRUE(fs::exists(out / "adapter" / "adapter_config.json"));
  const MetricsHistory h = read_metrics(out / "metrics.jsonl");
  ASSERT_EQ(int64_t(h.train.size()), s.total_steps / r.logging.every + (s.total_steps % r.logging.every != 0));
  EXPECT_EQ(h.train.back().step, s.total_steps);
  // The resolved recipe is the recipe.
  EXPECT_EQ(recipe_to_yaml(load_recipe(out / "recipe.yaml")), recipe_to_yaml(r));
  // The adapter loads as PEFT names and shapes say, for the demo model.
  const auto cfg_json = nlohmann::json::parse(read_bytes(out / "adapter" / "adapter_config.json"));
  EXPECT_EQ(cfg_json["r"], r.lora.rank);
  EXPECT_EQ(cfg_json["peft_type"], "LORA");
}

// Stops a short run after step 3, resumes it, and compares with one that
// never stopped: the adapter bit for bit, the last loss, metrics once each.
void expect_resume_bit_identical(const std::vector<std::string>& extra) {
  ScratchDir d;
  std::vector<std::string> o = short_run();
  o.insert(o.end(), extra.begin(), extra.end());
  const RunSummary full = run_quiet(demo(d / "full", o));
  ASSERT_EQ(full.steps_done, 6);

  RunOptions stop;
  stop.stop_after_step = 3;
  const RunSummary first = run_quiet(demo(d / "resumed", o), stop);
  EXPECT_TRUE(first.interrupted);
  EXPECT_EQ(first.steps_done, 3);
  EXPECT_FALSE(fs::exists(d / "resumed" / "adapter"));

  RunOptions resume;
  resume.resume = true;
  // A changed recipe cannot continue the checkpoint: refused, with the reason.
  auto changed = o;
  changed.push_back("train.lr=1e-3");
  const std::string e = error_of([&] { run_quiet(demo(d / "resumed", changed), resume); });
  EXPECT_NE(e.find("different recipe"), std::string::npos) << e;

  const RunSummary second = run_quiet(demo(d / "resumed", o), resume);
  EXPECT_TRUE(second.resumed);
  EXPECT_EQ(second.start_step, 3);
  EXPECT_EQ(second.steps_done, 6);

  const std::string a = read_bytes(d / "full" / "adapter" / "adapter_model.safetensors");
  const std::string b = read_bytes(d / "resumed" / "adapter" / "adapter_model.safetensors");
  EXPECT_EQ(a.size(), b.size());
  EXPECT_TRUE(a == b) << "the resumed adapter differs from the uninterrupted one";
  EXPECT_EQ(full.last_loss, second.last_loss);
  // metrics.jsonl of the resumed run has each step once.
  const MetricsHistory h = read_metrics(d / "resumed" / "metrics.jsonl");
  ASSERT_EQ(h.train.size(), 6u);
  for (size_t i = 0; i < h.train.size(); ++i) EXPECT_EQ(h.train[i].step, int64_t(i + 1));
}

TEST(Run, ResumedRunIsBitIdenticalToAnUninterruptedOne) {
  expect_resume_bit_identical({});
}

// LoRA+, DoRA and per-module ranks resume exactly too (the ratio, the
// magnitudes and their optimizer state are in the checkpoint).
TEST(Run, ResumedLoraPlusDoraRunWithRankPatternIsBitIdentical) {
  expect_resume_bit_identical({"lora.plus_lr_ratio=16", "lora.dora=true", "lora.rank_pattern={down_proj: 2}"});
}

// LoRA+ changes the training (B moves at 16 x lr); DoRA's adapter holds the
// magnitudes as PEFT names them.
TEST(Run, LoraPlusAndDoraChangeWhatIsTrained) {
  ScratchDir d;
  const std::vector<std::string> o = {"train.max_steps=2", "train.micro_batch=1", "logging.every=1"};
  auto with = [&](const std::string& name, std::vector<std::string> extra) {
    extra.insert(extra.begin(), o.begin(), o.end());
    run_quiet(demo(d / name, extra));
    return LoraWeights::load_peft(d / name / "adapter", load_model_config(resolve_model_path("builtin:tiny")));
  };
  const LoraWeights plain = with("plain", {});
  const LoraWeights plus = with("plus", {"lora.plus_lr_ratio=16"});
  const LoraWeights dora = with("dora", {"lora.dora=true"});
  ASSERT_EQ(plain.flat_size(), plus.flat_size());
  // A is stepped at lr in both, B at 16 x lr: after step 1 (B = 0 before it)
  // B differs, A too from step 2 on through the loss.
  const float* b0 = plain.B(0, LoraTarget::Q);
  const float* b1 = plus.B(0, LoraTarget::Q);
  EXPECT_NE(std::memcmp(b0, b1, 4), 0);
  EXPECT_TRUE(dora.config().dora);
  EXPECT_NE(dora.M(0, LoraTarget::Q), nullptr);
  const auto cfg_json = nlohmann::json::parse(read_bytes(d / "dora" / "adapter" / "adapter_config.json"));
  EXPECT_EQ(cfg_json["use_dora"], true);
}

TEST(Run, InterruptFlagWritesACheckpointAndStops) {
  ScratchDir d;
  std::atomic<bool> flag{true};  // as if Ctrl-C came during the first step
  RunOptions o;
  o.interrupt = &flag;
  const RunSummary s = run_quiet(demo(d / "run", short_run()), o);
  EXPECT_TRUE(s.interrupted);
  EXPECT_EQ(s.steps_done, 1);
  const auto ckpt = latest_checkpoint(d / "run");
  ASSERT_TRUE(ckpt);
  EXPECT_EQ(read_train_state(*ckpt).step, 1);
}

TEST(Run, GradientAccumulationEqualsOneBigBatch) {
  ScratchDir d;
  // One SGD step at lr 1 from the same init: the update is the gradient. Two
  // micro-batches of one row must give what one micro-batch of two rows
  // gives: the loss is normalized by the target count of the whole step,
  // and the two rows hold different numbers of targets.
  const std::vector<std::string> common = {"train.max_steps=1", "train.optimizer=sgd", "train.lr=1",
                                           "train.schedule=constant", "train.warmup=0", "train.max_grad_norm=0",
                                           "lora.dropout=0"};
  auto with = [&](std::vector<std::string> v, const std::string& a, const std::string& b) {
    v.push_back(a);
    v.push_back(b);
    return v;
  };
  run_quiet(demo(d / "big", with(common, "train.micro_batch=2", "train.grad_accum=1")));
  run_quiet(demo(d / "accum", with(common, "train.micro_batch=1", "train.grad_accum=2")));
  const ModelConfig cfg = load_model_config(resolve_model_path("builtin:tiny"));
  const LoraWeights a = LoraWeights::load_peft(d / "big" / "adapter", cfg);
  const LoraWeights b = LoraWeights::load_peft(d / "accum" / "adapter", cfg);
  ASSERT_EQ(a.flat_size(), b.flat_size());
  double max_abs = 0, max_diff = 0;
  for (size_t i = 0; i < a.flat_size(); ++i) {
    max_abs = std::max(max_abs, double(std::fabs(a.flat_params()[i])));
    max_diff = std::max(max_diff, double(std::fabs(a.flat_params()[i] - b.flat_params()[i])));
  }
  // Only the summation order differs: fp32 rounding, far below a changed
  // normalization (which would scale whole micro-batches by ~0.5-2x).
  EXPECT_LT(max_diff, 1e-5 * max_abs) << max_diff << " vs " << max_abs;
}

TEST(Run, CtrlCWritesACheckpointAndExitsWith130) {
  ScratchDir d;
  // The whole demo takes far longer than 3 s, so SIGINT arrives mid-run
  // (or, on a very slow machine, during setup: then it stops after step 1).
  const std::string cmd = "sh -c '" + std::string(QLORA_BINARY) + " run " + kDemo.string() + " output.dir=" +
                          (d / "run").string() + " data.cache=false --no-samples > " + (d / "log").string() +
                          " 2>&1 & pid=$!; sleep 3; kill -INT $pid; wait $pid; echo $? > " +
                          (d / "rc").string() + "'";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  const std::string log = read_bytes(d / "log");
  EXPECT_EQ(read_bytes(d / "rc"), "130\n") << log;
  EXPECT_NE(log.find("--resume"), std::string::npos) << log;
  const auto ckpt = latest_checkpoint(d / "run");
  ASSERT_TRUE(ckpt) << log;
  EXPECT_GE(read_train_state(*ckpt).step, 1);
}

// SIGTERM (kill, systemd, SLURM) and SIGHUP stop a run as Ctrl-C does, with
// 128 + their number as the exit status.
TEST(Run, SigtermAndSighupCheckpointLikeCtrlC) {
  for (const auto& [sig, code] : {std::pair<std::string, std::string>{"TERM", "143"}, {"HUP", "129"}}) {
    ScratchDir d;
    const std::string cmd = "sh -c '" + std::string(QLORA_BINARY) + " run " + kDemo.string() + " output.dir=" +
                            (d / "run").string() + " data.cache=false --no-samples > " + (d / "log").string() +
                            " 2>&1 & pid=$!; sleep 3; kill -" + sig + " $pid; wait $pid; echo $? > " +
                            (d / "rc").string() + "'";
    ASSERT_EQ(std::system(cmd.c_str()), 0);
    const std::string log = read_bytes(d / "log");
    EXPECT_EQ(read_bytes(d / "rc"), code + "\n") << sig << "\n" << log;
    EXPECT_NE(log.find("--resume"), std::string::npos) << log;
    const auto ckpt = latest_checkpoint(d / "run");
    ASSERT_TRUE(ckpt) << sig << "\n" << log;
    EXPECT_GE(read_train_state(*ckpt).step, 1);
  }
}

TEST(Run, AnotherRunInTheOutputFolderIsRefusedUnlessResumeOrOverwrite) {
  ScratchDir d;
  const Recipe r = demo(d / "run", {"train.max_steps=1"});
  run_quiet(r);
  const std::string e = error_of([&] { run_quiet(r); });
  EXPECT_NE(e.find("holds another run"), std::string::npos) << e;
  EXPECT_NE(e.find("--overwrite"), std::string::npos) << e;

  RunOptions o;
  o.overwrite = true;
  EXPECT_EQ(run_quiet(r, o).steps_done, 1);

  // A folder that is not a run is never written into or deleted.
  fs::create_directories(d / "other");
  testing::write_bytes(d / "other" / "notes.txt", "mine");
  const std::string e2 = error_of([&] { run_quiet(demo(d / "other", {"train.max_steps=1"}), o); });
  EXPECT_NE(e2.find("no qlora run"), std::string::npos) << e2;
  EXPECT_EQ(read_bytes(d / "other" / "notes.txt"), "mine");
}

TEST(Run, ADivergingRunStopsAndKeepsItsLastGoodCheckpoint) {
  ScratchDir d;
  // lr 1e30 makes the adapters overflow after the first update: step 2's loss
  // is not finite.
  const Recipe r =
      demo(d / "run", {"train.max_steps=4", "train.save_every=1", "train.lr=1e30", "train.max_grad_norm=0",
                       "train.schedule=constant", "train.warmup=0"});
  const std::string e = error_of([&] { run_quiet(r); });
  EXPECT_NE(e.find("last good checkpoint"), std::string::npos) << e;
  const auto ckpt = latest_checkpoint(d / "run");
  ASSERT_TRUE(ckpt);
  EXPECT_TRUE(std::isfinite(*read_train_state(*ckpt).last_loss));
}

TEST(Run, ContinuingFromAnAdapterStartsWhereTheFirstRunEnded) {
  ScratchDir d;
  const RunSummary first = run_quiet(demo(d / "a", {"train.max_steps=3"}));
  ASSERT_TRUE(first.last_val_loss);
  const RunSummary second =
      run_quiet(demo(d / "b", {"train.max_steps=1", "lora.init=" + (d / "a" / "adapter").string()}));
  ASSERT_TRUE(second.first_val_loss);
  // Same adapter, same validation rows, evaluation without dropout: the same loss.
  EXPECT_EQ(*second.first_val_loss, *first.last_val_loss);

  const std::string e =
      error_of([&] { run_quiet(demo(d / "c", {"lora.rank=4", "lora.init=" + (d / "a" / "adapter").string()})); });
  EXPECT_NE(e.find("lora.init"), std::string::npos) << e;
  EXPECT_NE(e.find("r=8"), std::string::npos) << e;
  // Same shapes, another scale: continuing would start from another model.
  const std::string e2 =
      error_of([&] { run_quiet(demo(d / "c", {"lora.alpha=8", "lora.init=" + (d / "a" / "adapter").string()})); });
  EXPECT_NE(e2.find("lora_alpha=16"), std::string::npos) << e2;
}

TEST(Run, APlanThatDoesNotFitStopsBeforeLoadingAnything) {
  ScratchDir d;
  const std::string e =
      error_of([&] { run_quiet(demo(d / "run", {"device.backend=cpu", "device.memory_budget=1MiB"})); });
  EXPECT_NE(e.find("does not fit"), std::string::npos) << e;
  EXPECT_NE(e.find("micro_batch"), std::string::npos) << "the advice comes with it: " << e;
  EXPECT_FALSE(fs::exists(d / "run" / "checkpoints"));
  // Nothing was trained, so the folder does not hold a run: a fitting retry goes ahead.
  EXPECT_EQ(run_quiet(demo(d / "run", {"train.max_steps=1"})).steps_done, 1);
}

TEST(Run, EveryShippedRecipeLoadsAndEstimates) {
  ScratchDir d;
  int n = 0;
  for (const auto& e : fs::directory_iterator(kDemo.parent_path())) {
    if (e.path().extension() != ".yaml") continue;
    ++n;
    // The SmolLM2 recipes name the fixtures beside the checkout
    // (../../shared/fixtures/...): pointed at wherever they are, or skipped.
    std::string overrides;
    const std::string text = read_bytes(e.path());
    constexpr std::string_view kFx = "../../shared/fixtures/";
    if (text.find(kFx) != std::string::npos) {
      const auto fx = testing::fixtures_dir();
      if (!fx) {
        std::printf("[ skip ] %s: needs the fixtures (../shared/fixtures or QLORA_FIXTURES)\n", e.path().c_str());
        continue;
      }
      std::istringstream lines(text);
      for (std::string l; std::getline(lines, l);) {
        const size_t at = l.find(kFx);
        if (at == std::string::npos) continue;
        const std::string rest = (*fx / l.substr(at + kFx.size())).string();
        if (l.find("path:") != std::string::npos) overrides += " 'model.path=" + rest + "'";
        if (l.find("train:") != std::string::npos) overrides += " 'data.train=" + rest + "'";
      }
    }
    const testing::CliResult r = testing::run_qlora("estimate " + e.path().string() + overrides,
                                                     "QLORA_CACHE='" + (d / "cache").string() + "'");
    EXPECT_EQ(r.status, 0) << e.path() << "\n" << r.output;
    const std::string& out = r.output;
    const size_t v = out.find("verdict");
    ASSERT_NE(v, std::string::npos) << e.path() << "\n" << out;
    const std::string verdict = out.substr(v, out.find('\n', v) - v);
    EXPECT_NE(verdict.find("fits"), std::string::npos) << e.path() << ": " << verdict;
    EXPECT_EQ(verdict.find("does not fit"), std::string::npos) << e.path() << ": " << verdict;
  }
  EXPECT_GE(n, 4);
}

TEST(Run, FineTuningStories260KOnAnInventedStyleLowersItsValidationLoss) {
  QLORA_REQUIRE_FIXTURES(fx);
  ScratchDir d;
  const fs::path data = fs::path(QLORA_SOURCE_DIR) / "tests" / "data" / "style_stories";
  const std::string yaml = "model: {path: " + (fx / "models" / "stories260K" / "hf").string() +
                           "}\n"
                           "lora: {rank: 8, alpha: 16, dropout: 0.0, targets: all-linear}\n"
                           "data: {train: " + (data / "train.jsonl").string() +
                           ", val: " + (data / "val.jsonl").string() +
                           ", format: text, chat_template: none, seq_len: 256, cache: false}\n"
                           "train: {epochs: 3, micro_batch: 4, lr: 3.0e-3, schedule: cosine, warmup: 2}\n"
                           "output: {dir: " + (d / "run").string() + "}\n";
  const Recipe r = parse_recipe(yaml, "stories.yaml", d.path());
  const RunSummary s = run_quiet(r);
  ASSERT_TRUE(s.first_val_loss && s.last_val_loss);
  // Held-back stories of the style become clearly more predictable.
  EXPECT_LT(*s.last_val_loss, *s.first_val_loss - 0.2) << *s.first_val_loss << " -> " << *s.last_val_loss;
}

TEST(Run, CliRunsTheRecipeWithOverridesAndRejectsABadOne) {
  ScratchDir d;
  const std::string base = std::string(QLORA_BINARY) + " run " + kDemo.string() + " output.dir=" +
                           (d / "run").string() + " data.cache=false --no-samples";
  EXPECT_EQ(std::system((base + " train.max_steps=2 output.merge=true > " + (d / "log").string() + " 2>&1").c_str()), 0);
  const std::string log = read_bytes(d / "log");
  EXPECT_NE(log.find("trained 2 steps"), std::string::npos) << log;
  EXPECT_NE(log.find("exact"), std::string::npos) << log;  // planned == measured arenas
  EXPECT_TRUE(fs::exists(d / "run" / "merged" / "config.json")) << "output.merge writes a merged HF folder";

  const int rc = std::system((base + " --overwrite train.lr=abc > " + (d / "bad").string() + " 2>&1").c_str());
  EXPECT_NE(rc, 0);
  const std::string bad = read_bytes(d / "bad");
  EXPECT_NE(bad.find("train.lr"), std::string::npos) << bad;
  EXPECT_TRUE(fs::exists(d / "run" / "adapter")) << "a rejected recipe must not touch the previous run";

  // Errors of the data module name the recipe key.
  const testing::CliResult t =
      testing::run_qlora("run " + kDemo.string() + " output.dir=" + (d / "t").string() + " data.chat_template=auto");
  EXPECT_NE(t.status, 0);
  EXPECT_NE(t.output.find("data.chat_template"), std::string::npos) << t.output;
}

}  // namespace
}  // namespace qlora
