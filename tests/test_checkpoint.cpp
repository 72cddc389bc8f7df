// Training checkpoints: exact round trip of adapter, optimizer and state;
// keep-last-K pruning; latest_checkpoint skipping broken and temporary
// folders; failed writes leaving the previous checkpoint; resume checks.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "model/lora.h"
#include "test_models.h"
#include "testing.h"
#include "train/checkpoint.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;
using testing::FileSizeLimit;

LoraConfig lora_config(int64_t rank = 4) {
  LoraConfig lc;
  lc.rank = rank;
  lc.alpha = 8;
  lc.targets.fill(false);
  lc.targets[size_t(LoraTarget::Q)] = lc.targets[size_t(LoraTarget::V)] = lc.targets[size_t(LoraTarget::Up)] =
      true;
  return lc;
}

// A run in progress: LoRA weights and an optimizer after a few steps.
struct TrainRun {
  ModelConfig cfg = testing::tiny_gqa_config(2);
  LoraWeights lora;
  Optimizer opt;
  TrainState state;
  explicit TrainRun(OptimizerKind kind = OptimizerKind::adamw, int64_t rank = 4, unsigned seed = 1)
      : lora(cfg, lora_config(rank)), opt(make_opt(kind), lora.flat_size()) {
    lora.init_default(seed);
    for (unsigned s = 0; s < 3; ++s) step(seed * 100 + s);
    state.step = 3;
    state.epoch = 1;
    state.cursor = 17;
    state.forward_count = 0xfedcba9876543210ull;  // > 2^63: uint64 survives JSON
    state.rng = 0x8000000000000001ull;
    state.tokens_seen = 123456789012;
    state.wall_seconds = 1234.5678901234567;
    state.last_loss = 2.718281828459045;
    state.best_eval_loss = 3.0 / 7.0;
    state.recipe_hash = "abc123";
    state.base_fingerprint = "0123456789abcdef";
  }
  static OptimizerConfig make_opt(OptimizerKind kind) {
    OptimizerConfig c;
    c.kind = kind;
    c.momentum = 0.9;
    c.weight_decay = 0.01;
    return c;
  }
  void step(unsigned seed) {
    const auto g = testing::randn(int64_t(num_values()), seed, 0.1f);
    // Gradients only where parameters live (the padding stays zero).
    for (size_t i = 0; i < g.size(); ++i) lora.flat_grads()[i] = lora.flat_params()[i] != 0.0f ? g[i] : 0.0f;
    opt.step(lora.flat_params(), lora.flat_grads(), 1e-2);
  }
  size_t num_values() const { return lora.flat_size(); }
  fs::path save(const fs::path& out, int64_t step, int64_t keep = 3) {
    state.step = step;
    return save_checkpoint(out, state, lora, cfg, opt, "base-model", keep);
  }
};

std::vector<std::string> names_in(const fs::path& dir) {
  std::vector<std::string> r;
  for (const auto& e : fs::directory_iterator(dir)) r.push_back(e.path().filename().string());
  std::sort(r.begin(), r.end());
  return r;
}

TEST(Checkpoint, RoundTripIsBitIdentical) {
  for (auto kind : {OptimizerKind::adamw, OptimizerKind::sgd}) {
    SCOPED_TRACE(optimizer_kind_name(kind));
    testing::ScratchDir out;
    TrainRun a(kind);
    const fs::path ckpt = a.save(out.path(), 3);
    EXPECT_EQ(ckpt, out.path() / "checkpoints" / "step-00000003");
    EXPECT_EQ(names_in(ckpt), (std::vector<std::string>{"adapter", "optimizer.safetensors", "state.json"}));

    TrainRun b(kind, 4, /*seed=*/2);  // different weights and optimizer state
    const TrainState s = load_checkpoint(ckpt, b.lora, b.opt, b.cfg);
    ASSERT_EQ(b.lora.flat_size(), a.lora.flat_size());
    EXPECT_EQ(std::memcmp(b.lora.flat_params(), a.lora.flat_params(), a.num_values() * sizeof(float)), 0);
    const auto sa = a.opt.state(), sb = b.opt.state();
    ASSERT_EQ(sa.size(), sb.size());
    ASSERT_FALSE(sa.empty());
    for (size_t i = 0; i < sa.size(); ++i)
      EXPECT_EQ(std::memcmp(sa[i].data, sb[i].data, sa[i].n * sizeof(float)), 0) << sa[i].name;
    EXPECT_EQ(b.opt.steps(), a.opt.steps());
    EXPECT_EQ(s.step, 3);
    EXPECT_EQ(s.epoch, a.state.epoch);
    EXPECT_EQ(s.cursor, a.state.cursor);
    EXPECT_EQ(s.forward_count, a.state.forward_count);
    EXPECT_EQ(s.rng, a.state.rng);
    EXPECT_EQ(s.tokens_seen, a.state.tokens_seen);
    EXPECT_EQ(s.wall_seconds, a.state.wall_seconds);
    EXPECT_EQ(s.last_loss, a.state.last_loss);
    EXPECT_EQ(s.best_eval_loss, a.state.best_eval_loss);
    EXPECT_FALSE(s.last_eval_loss.has_value());
    EXPECT_EQ(s.recipe_hash, a.state.recipe_hash);
    EXPECT_EQ(s.base_fingerprint, a.state.base_fingerprint);
    EXPECT_EQ(s.source, ckpt);
    // Continuing from the checkpoint is continuing the run.
    a.step(7);
    b.step(7);
    EXPECT_EQ(std::memcmp(b.lora.flat_params(), a.lora.flat_params(), a.num_values() * sizeof(float)), 0);
  }
}

// LoRA+ and DoRA: the magnitudes travel with the adapter, the ratio with the
// optimizer state; continuing is continuing (bit for bit), and a run with
// another ratio is refused naming it.
TEST(Checkpoint, LoraPlusRatioAndDoraMagnitudesRoundTrip) {
  const ModelConfig cfg = testing::tiny_gqa_config(2);
  LoraConfig lc = lora_config(4);
  lc.dora = true;
  OptimizerConfig oc = TrainRun::make_opt(OptimizerKind::adamw);
  oc.plus_lr_ratio = 16.0;
  auto make = [&](unsigned seed, const OptimizerConfig& c) {
    auto lora = std::make_unique<LoraWeights>(testing::random_lora(cfg, lc, seed, 0.1f));
    auto opt = std::make_unique<Optimizer>(c, lora->flat_size(), lora->plus_ranges());
    const auto g = testing::randn(int64_t(lora->flat_size()), seed + 50, 0.1f);
    for (size_t i = 0; i < g.size(); ++i) lora->flat_grads()[i] = lora->flat_params()[i] != 0.0f ? g[i] : 0.0f;
    opt->step(lora->flat_params(), lora->flat_grads(), 1e-2);
    return std::make_pair(std::move(lora), std::move(opt));
  };
  testing::ScratchDir out;
  auto [la, oa] = make(1, oc);
  TrainState st;
  st.step = 1;
  const fs::path ckpt = save_checkpoint(out.path(), st, *la, cfg, *oa, "base", 1);
  auto [lb, ob] = make(2, oc);
  load_checkpoint(ckpt, *lb, *ob, cfg);
  EXPECT_EQ(std::memcmp(lb->flat_params(), la->flat_params(), la->flat_size() * sizeof(float)), 0);
  oa->step(la->flat_params(), la->flat_grads(), 1e-2);
  ob->step(lb->flat_params(), la->flat_grads(), 1e-2);
  EXPECT_EQ(std::memcmp(lb->flat_params(), la->flat_params(), la->flat_size() * sizeof(float)), 0);
  OptimizerConfig other = oc;
  other.plus_lr_ratio = 1.0;
  auto [lc2, oc2] = make(3, other);
  // Pointers captured, not the bindings: clang 14 cannot capture a structured binding.
  const std::string e =
      testing::error_of([&, l = lc2.get(), o = oc2.get()] { load_checkpoint(ckpt, *l, *o, cfg); });
  EXPECT_NE(e.find("trained with lora.plus_lr_ratio 16, this run uses 1"), std::string::npos) << e;
}

// Plain SGD has no state: optimizer.safetensors holds metadata only.
TEST(Checkpoint, StatelessOptimizer) {
  testing::ScratchDir out;
  TrainRun a(OptimizerKind::sgd);
  OptimizerConfig plain = TrainRun::make_opt(OptimizerKind::sgd);
  plain.momentum = 0;
  Optimizer opt(plain, a.lora.flat_size());
  opt.step(a.lora.flat_params(), a.lora.flat_grads(), 0.1);
  const auto ckpt = save_checkpoint(out.path(), a.state, a.lora, a.cfg, opt, "base", 1);
  EXPECT_EQ(SafetensorsFile(ckpt / "optimizer.safetensors").tensors().size(), 0u);
  TrainRun b(OptimizerKind::sgd, 4, 2);
  Optimizer opt2(plain, b.lora.flat_size());
  load_checkpoint(ckpt, b.lora, opt2, b.cfg);
  EXPECT_EQ(opt2.steps(), 1);
  EXPECT_EQ(std::memcmp(b.lora.flat_params(), a.lora.flat_params(), a.num_values() * sizeof(float)), 0);
  // A stateful optimizer cannot resume from it.
  const std::string e = testing::error_of([&] { load_checkpoint(ckpt, b.lora, b.opt, b.cfg); });
  EXPECT_NE(e.find("momentum_buffer is missing"), std::string::npos) << e;
}

TEST(Checkpoint, KeepsTheLastK) {
  testing::ScratchDir out;
  TrainRun r;
  for (int64_t s : {10, 20, 30, 40}) r.save(out.path(), s, 2);
  EXPECT_EQ(names_in(out.path() / "checkpoints"),
            (std::vector<std::string>{"step-00000030", "step-00000040"}));
  r.save(out.path(), 50, 1);
  EXPECT_EQ(names_in(out.path() / "checkpoints"), (std::vector<std::string>{"step-00000050"}));
  // Saving the same step again replaces it.
  r.save(out.path(), 50, 1);
  EXPECT_EQ(names_in(out.path() / "checkpoints"), (std::vector<std::string>{"step-00000050"}));
  EXPECT_NE(testing::error_of([&] { r.save(out.path(), 60, 0); }).find("keep_checkpoints"),
            std::string::npos);
}

TEST(Checkpoint, PruningLeavesLaterStepsAndLiveTemporaries) {
  testing::ScratchDir out;
  TrainRun r;
  r.save(out.path(), 10, 1);
  r.save(out.path(), 90, 1);
  // Resumed from an older one (e.g. step 90 was set aside by hand): later
  // steps are not "older" and stay.
  fs::remove_all(out.path() / "checkpoints" / "step-00000010");
  r.save(out.path(), 20, 1);
  r.save(out.path(), 30, 1);
  EXPECT_EQ(names_in(out.path() / "checkpoints"),
            (std::vector<std::string>{"step-00000030", "step-00000090"}));

  // A leftover temporary of a dead process goes; one of a live process stays.
  const pid_t child = fork();
  if (child == 0) _exit(0);
  waitpid(child, nullptr, 0);
  const auto dead = out.path() / "checkpoints" / ("step-00000040.tmp-" + std::to_string(child) + "-0");
  const auto live = out.path() / "checkpoints" / ("step-00000040.tmp-" + std::to_string(getppid()) + "-0");
  fs::create_directories(dead / "adapter");
  fs::create_directories(live);
  r.save(out.path(), 40, 1);
  EXPECT_FALSE(fs::exists(dead));
  EXPECT_TRUE(fs::exists(live));
}

TEST(Checkpoint, LatestSkipsBrokenAndTemporaryFolders) {
  testing::ScratchDir out;
  EXPECT_FALSE(latest_checkpoint(out.path()).has_value());  // no checkpoints folder at all
  TrainRun r;
  const auto c10 = r.save(out.path(), 10);
  const auto c20 = r.save(out.path(), 20);
  EXPECT_EQ(latest_checkpoint(out.path()), c20);
  const auto ck = out.path() / "checkpoints";

  // A temporary folder of an interrupted write, complete-looking inside.
  fs::copy(c20, ck / "step-00000030.tmp-1-0", fs::copy_options::recursive);
  // An incomplete folder: optimizer state missing.
  fs::copy(c20, ck / "step-00000040", fs::copy_options::recursive);
  fs::remove(ck / "step-00000040" / "optimizer.safetensors");
  // A state.json truncated mid-write.
  fs::copy(c20, ck / "step-00000050", fs::copy_options::recursive);
  const std::string js = testing::read_bytes(ck / "step-00000050" / "state.json");
  testing::write_bytes(ck / "step-00000050" / "state.json", js.substr(0, js.size() / 2));
  // A truncated adapter file.
  fs::copy(c20, ck / "step-00000060", fs::copy_options::recursive);
  fs::resize_file(ck / "step-00000060" / "adapter" / "adapter_model.safetensors", 100);
  // state.json of another step (a folder renamed by hand).
  fs::copy(c10, ck / "step-00000070", fs::copy_options::recursive);
  // Not a checkpoint name at all.
  fs::create_directories(ck / "step-xyz");
  EXPECT_EQ(latest_checkpoint(out.path()), c20);
  EXPECT_EQ(list_checkpoints(out.path()), (std::vector<fs::path>{c10, c20}));

  // And the newest valid one broken too: the one before.
  fs::remove(c20 / "state.json");
  EXPECT_EQ(latest_checkpoint(out.path()), c10);
}

TEST(Checkpoint, FailedWriteKeepsThePreviousCheckpoint) {
  testing::ScratchDir out;
  TrainRun r;
  const auto c10 = r.save(out.path(), 10);
  const std::string before = testing::read_bytes(c10 / "optimizer.safetensors");
  r.step(42);
  {
    FileSizeLimit limit(2048);  // the adapter alone is larger: fails part way, as a full disk would
    const std::string e = testing::error_of([&] { r.save(out.path(), 20); });
    EXPECT_NE(e.find("cannot save checkpoint " + (out.path() / "checkpoints" / "step-00000020").string()),
              std::string::npos)
        << e;
    EXPECT_NE(e.find("File too large"), std::string::npos) << e;  // the cause
    EXPECT_NE(e.find("the previous checkpoint " + c10.string() + " is intact"), std::string::npos) << e;
  }
  EXPECT_EQ(names_in(out.path() / "checkpoints"), (std::vector<std::string>{"step-00000010"}));
  EXPECT_EQ(latest_checkpoint(out.path()), c10);
  EXPECT_EQ(testing::read_bytes(c10 / "optimizer.safetensors"), before);
  TrainRun b;
  EXPECT_EQ(load_checkpoint(c10, b.lora, b.opt, b.cfg).step, 10);
}

TEST(Checkpoint, UnwritableOutputFolder) {
  testing::ScratchDir out;
  TrainRun r;
  // An output "folder" that is a file: nothing can be created under it.
  testing::write_bytes(out / "file", "x");
  const std::string e = testing::error_of([&] { r.save(out / "file", 10); });
  EXPECT_NE(e.find((out / "file" / "checkpoints").string()), std::string::npos) << e;
  EXPECT_NE(e.find("no earlier checkpoint"), std::string::npos) << e;

  // A read-only checkpoints folder (root ignores permissions: checked for
  // non-root users only; the file size limit above covers root).
  const auto c10 = r.save(out.path(), 10);
  if (geteuid() == 0) GTEST_SKIP() << "running as root: permissions do not make a folder unwritable";
  chmod((out.path() / "checkpoints").c_str(), 0555);
  const std::string e2 = testing::error_of([&] { r.save(out.path(), 20); });
  chmod((out.path() / "checkpoints").c_str(), 0755);
  EXPECT_NE(e2.find("the previous checkpoint " + c10.string() + " is intact"), std::string::npos) << e2;
  EXPECT_EQ(latest_checkpoint(out.path()), c10);
}

TEST(Checkpoint, LoadRejectsAnotherShapeAndLeavesTheRunAlone) {
  testing::ScratchDir out;
  TrainRun saved;
  const auto ckpt = saved.save(out.path(), 5);
  auto unchanged = [](TrainRun& r, const std::vector<float>& before) {
    return std::equal(before.begin(), before.end(), r.lora.flat_params());
  };
  {  // another rank
    TrainRun r(OptimizerKind::adamw, /*rank=*/8, 3);
    const std::vector<float> before(r.lora.flat_params(), r.lora.flat_params() + r.num_values());
    const std::string e = testing::error_of([&] { load_checkpoint(ckpt, r.lora, r.opt, r.cfg); });
    EXPECT_NE(e.find((ckpt / "adapter" / "adapter_config.json").string()), std::string::npos) << e;
    EXPECT_NE(e.find("r=4"), std::string::npos) << e;
    EXPECT_NE(e.find("r=8"), std::string::npos) << e;
    EXPECT_TRUE(unchanged(r, before));
    EXPECT_EQ(r.opt.steps(), 3);
  }
  {  // other target modules
    TrainRun r;
    LoraConfig lc = lora_config();
    lc.targets[size_t(LoraTarget::Down)] = true;
    LoraWeights other(r.cfg, lc);
    Optimizer opt(TrainRun::make_opt(OptimizerKind::adamw), other.flat_size());
    const std::string e = testing::error_of([&] { load_checkpoint(ckpt, other, opt, r.cfg); });
    EXPECT_NE(e.find("q_proj v_proj up_proj]"), std::string::npos) << e;
    EXPECT_NE(e.find("down_proj]"), std::string::npos) << e;
  }
  {  // another optimizer
    TrainRun r(OptimizerKind::sgd, 4, 3);
    const std::vector<float> before(r.lora.flat_params(), r.lora.flat_params() + r.num_values());
    const std::string e = testing::error_of([&] { load_checkpoint(ckpt, r.lora, r.opt, r.cfg); });
    EXPECT_NE(e.find((ckpt / "optimizer.safetensors").string()), std::string::npos) << e;
    EXPECT_NE(e.find("momentum_buffer"), std::string::npos) << e;
    EXPECT_NE(e.find("adamw"), std::string::npos) << e;
    EXPECT_TRUE(unchanged(r, before));
  }
  {  // another model (GQA off: k/v widths differ)
    ModelConfig cfg = testing::tiny_gqa_config(2);
    cfg.num_key_value_heads = 4;
    LoraWeights lw(cfg, lora_config());
    Optimizer opt(TrainRun::make_opt(OptimizerKind::adamw), lw.flat_size());
    const std::string e = testing::error_of([&] { load_checkpoint(ckpt, lw, opt, cfg); });
    EXPECT_NE(e.find("v_proj.lora_B.weight"), std::string::npos) << e;
    EXPECT_NE(e.find("adapter_model.safetensors"), std::string::npos) << e;
  }
  EXPECT_NE(testing::error_of([&] {
              TrainRun r;
              load_checkpoint(out.path() / "nope", r.lora, r.opt, r.cfg);
            }).find("state.json"),
            std::string::npos);
}

// A small HF-style model folder.
void write_model(const fs::path& dir, const std::string& config, float fill) {
  fs::create_directories(dir);
  testing::write_bytes(dir / "config.json", config);
  std::vector<float> w(3000, fill);
  w[1500] = fill + 1;  // in the middle of the data
  std::vector<uint8_t> bytes(w.size() * sizeof(float));
  std::memcpy(bytes.data(), w.data(), bytes.size());
  save_safetensors(dir / "model.safetensors", {{"model.embed_tokens.weight", DType::F32, {1000, 3}, bytes}});
}

TEST(Checkpoint, BaseModelFingerprint) {
  testing::ScratchDir d;
  write_model(d / "a", R"({"model_type": "llama"})", 1.0f);
  const std::string fa = base_model_fingerprint(d / "a");
  EXPECT_EQ(fa.size(), 16u);
  EXPECT_EQ(fa.find_first_not_of("0123456789abcdef"), std::string::npos) << fa;
  EXPECT_EQ(base_model_fingerprint(d / "a"), fa);  // deterministic
  // The same folder copied elsewhere.
  fs::create_directories(d / "elsewhere");
  fs::copy(d / "a", d / "elsewhere" / "copy", fs::copy_options::recursive);
  EXPECT_EQ(base_model_fingerprint(d / "elsewhere" / "copy"), fa);
  // Another config.
  write_model(d / "b", R"({"model_type": "llama", "rope_theta": 1e6})", 1.0f);
  EXPECT_NE(base_model_fingerprint(d / "b"), fa);
  // Same shapes, other weights.
  write_model(d / "c", R"({"model_type": "llama"})", 2.0f);
  EXPECT_NE(base_model_fingerprint(d / "c"), fa);
  // Another shard layout.
  fs::copy(d / "a", d / "e", fs::copy_options::recursive);
  fs::rename(d / "e" / "model.safetensors", d / "e" / "model-00001-of-00001.safetensors");
  EXPECT_NE(base_model_fingerprint(d / "e"), fa);
  // Not a folder / not safetensors.
  EXPECT_NE(testing::error_of([&] { base_model_fingerprint(d / "nope"); }).find("not a model folder"),
            std::string::npos);
  testing::write_bytes(d / "a" / "junk.safetensors", "xy");
  EXPECT_NE(testing::error_of([&] { base_model_fingerprint(d / "a"); }).find("junk.safetensors"),
            std::string::npos);
}

TEST(Checkpoint, ResumeCompatibility) {
  TrainState s;
  s.recipe_hash = "r1";
  s.base_fingerprint = "f1";
  s.source = "/out/checkpoints/step-00000010";
  EXPECT_NO_THROW(check_resume_compatible(s, "r1", "f1"));
  EXPECT_EQ(
      testing::error_of([&] { check_resume_compatible(s, "r1", "f2"); }),
      "checkpoint /out/checkpoints/step-00000010 was trained on another base model (fingerprint f1, now f2): "
      "it cannot be resumed on this one; use --overwrite to start again");
  EXPECT_EQ(
      testing::error_of([&] { check_resume_compatible(s, "r2", "f1"); }),
      "checkpoint /out/checkpoints/step-00000010 was trained with a different recipe (hash r1, now r2): "
      "changed keys cannot be resumed; use --overwrite to start again");
  // From disk: source is set by read_train_state.
  testing::ScratchDir out;
  TrainRun r;
  const auto ckpt = r.save(out.path(), 1);
  const TrainState t = read_train_state(ckpt);
  EXPECT_NE(
      testing::error_of([&] { check_resume_compatible(t, "other", t.base_fingerprint); }).find(ckpt.string()),
      std::string::npos);
}

}  // namespace
}  // namespace qlora
