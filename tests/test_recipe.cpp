// The recipe loader: defaults, every key, expansion of target words, path
// resolution, overrides, every validation error (with its position), the
// YAML round trip and the training hash.
#include <gtest/gtest.h>
#include <yaml-cpp/yaml.h>

#include <cmath>
#include <map>
#include <regex>

#include "recipe/byte_size.h"
#include "recipe/recipe.h"
#include "recipe/recipe_schema.h"
#include "testing.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;
using testing::error_of;

const char* kMinimal =
    "model:\n"
    "  path: builtin:tiny\n"
    "data:\n"
    "  train: train.jsonl\n"
    "output:\n"
    "  dir: out\n";

Recipe parse(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  return parse_recipe(yaml, "r.yaml", "/base", overrides);
}

std::string error(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  return error_of([&] { parse(yaml, overrides); });
}

const std::vector<std::string> kAllLinear{"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                          "gate_proj", "up_proj", "down_proj"};

// Every key set to something other than its default.
const char* kFull = R"(model:
  path: models/llama
  preset: llama-3.2-1b
quant:
  type: fp4
  block_size: 128
  double_quant: false
lora:
  rank: 8
  alpha: 16.5
  dropout: 0.1
  rslora: true
  targets: [v_proj, q_proj]
  init: adapters/prev
  rank_pattern: {v_proj: 4, "layers\\.0\\..*": 2}
  alpha_pattern: {q_proj: 3.5}
  dora: true
  plus_lr_ratio: 16
data:
  train: [a.jsonl, /abs/b.jsonl]
  val: v.jsonl
  format: alpaca
  fields: {instruction: question, output: answer}
  chat_template: llama3
  seq_len: 512
  packing: false
  train_on_inputs: true
  over_long: drop
  on_bad_record: skip
  cache: false
  threads: 3
train:
  epochs: 3
  max_steps: 100
  micro_batch: 4
  grad_accum: 8
  lr: 1.5e-4
  schedule: linear
  warmup: 10
  min_lr_ratio: 0.1
  optimizer: sgd
  weight_decay: 0.01
  beta1: 0.8
  beta2: 0.99
  eps: 1e-6
  momentum: 0.9
  max_grad_norm: 0.5
  checkpointing: false
  seed: 18446744073709551615
  eval_every: 20
  save_every: 50
  keep_checkpoints: 2
device:
  backend: cpu
  memory_budget: 24GiB
  threads: 2
output:
  dir: runs/one
  merge: true
logging:
  every: 5
  report: false
  sample_prompts: ["Hello", "Say: yes"]
  sample_max_new_tokens: 12
)";

TEST(RecipeParse, MinimalRecipeGetsTheDocumentedDefaults) {
  const Recipe r = parse(kMinimal);
  EXPECT_EQ(r.model.path, "builtin:tiny");
  EXPECT_EQ(r.model.preset, "");
  EXPECT_EQ(r.quant.type, "nf4");
  EXPECT_EQ(r.quant.block_size, 64);
  EXPECT_TRUE(r.quant.double_quant);
  EXPECT_EQ(r.lora.rank, 16);
  EXPECT_EQ(r.lora.alpha, 32.0);
  EXPECT_EQ(r.lora.dropout, 0.05);
  EXPECT_FALSE(r.lora.rslora);
  EXPECT_EQ(r.lora.targets, kAllLinear);
  EXPECT_EQ(r.lora.init, "default");
  EXPECT_EQ(r.data.train, std::vector<std::string>{"/base/train.jsonl"});
  EXPECT_TRUE(r.data.val.empty());
  EXPECT_EQ(r.data.val_fraction, 0.0);
  EXPECT_EQ(r.data.format, "messages");
  EXPECT_TRUE(r.data.fields.empty());
  EXPECT_EQ(r.data.chat_template, "auto");
  EXPECT_EQ(r.data.seq_len, 2048);
  EXPECT_TRUE(r.data.packing);
  EXPECT_FALSE(r.data.train_on_inputs);
  EXPECT_EQ(r.data.over_long, "truncate");
  EXPECT_EQ(r.data.on_bad_record, "error");
  EXPECT_TRUE(r.data.cache);
  EXPECT_EQ(r.train.epochs, 1);
  EXPECT_EQ(r.train.max_steps, 0);
  EXPECT_EQ(r.train.micro_batch, 1);
  EXPECT_EQ(r.train.grad_accum, 1);
  EXPECT_EQ(r.train.lr, 2e-4);
  EXPECT_EQ(r.train.schedule, "cosine");
  EXPECT_EQ(r.train.warmup, 0.0);
  EXPECT_EQ(r.train.optimizer, "adamw");
  EXPECT_EQ(r.train.beta1, 0.9);
  EXPECT_EQ(r.train.beta2, 0.999);
  EXPECT_EQ(r.train.eps, 1e-8);
  EXPECT_EQ(r.train.max_grad_norm, 1.0);
  EXPECT_TRUE(r.train.checkpointing);
  EXPECT_EQ(r.train.seed, 42u);
  EXPECT_EQ(r.train.keep_checkpoints, 3);
  EXPECT_EQ(r.device.backend, "auto");
  EXPECT_EQ(r.device.memory_budget, "auto");
  EXPECT_EQ(r.output.dir, "/base/out");
  EXPECT_FALSE(r.output.merge);
  EXPECT_EQ(r.logging.every, 1);
  EXPECT_TRUE(r.logging.report);
  EXPECT_TRUE(r.logging.sample_prompts.empty());
  EXPECT_EQ(r.logging.sample_max_new_tokens, 48);
}

TEST(RecipeParse, EveryKeyOfEverySection) {
  const Recipe r = parse(kFull);
  EXPECT_EQ(r.model.path, "/base/models/llama");
  EXPECT_EQ(r.model.preset, "llama-3.2-1b");
  EXPECT_EQ(r.quant.type, "fp4");
  EXPECT_EQ(r.quant.block_size, 128);
  EXPECT_FALSE(r.quant.double_quant);
  EXPECT_EQ(r.lora.rank, 8);
  EXPECT_EQ(r.lora.alpha, 16.5);
  EXPECT_EQ(r.lora.dropout, 0.1);
  EXPECT_TRUE(r.lora.rslora);
  EXPECT_EQ(r.lora.targets, (std::vector<std::string>{"q_proj", "v_proj"}));  // the model's order
  EXPECT_EQ(r.lora.init, "/base/adapters/prev");
  using Ranks = std::vector<std::pair<std::string, int64_t>>;
  using Alphas = std::vector<std::pair<std::string, double>>;
  EXPECT_EQ(r.lora.rank_pattern, (Ranks{{"v_proj", 4}, {"layers\\.0\\..*", 2}}));  // in the order written
  EXPECT_EQ(r.lora.alpha_pattern, (Alphas{{"q_proj", 3.5}}));
  EXPECT_TRUE(r.lora.dora);
  EXPECT_EQ(r.lora.plus_lr_ratio, 16.0);
  EXPECT_EQ(r.data.train, (std::vector<std::string>{"/base/a.jsonl", "/abs/b.jsonl"}));
  EXPECT_EQ(r.data.val, std::vector<std::string>{"/base/v.jsonl"});
  EXPECT_EQ(r.data.val_fraction, 0.0);
  EXPECT_EQ(r.data.format, "alpaca");
  using Fields = std::vector<std::pair<std::string, std::string>>;
  EXPECT_EQ(r.data.fields, (Fields{{"instruction", "question"}, {"output", "answer"}}));
  EXPECT_EQ(r.data.chat_template, "llama3");
  EXPECT_EQ(r.data.seq_len, 512);
  EXPECT_FALSE(r.data.packing);
  EXPECT_TRUE(r.data.train_on_inputs);
  EXPECT_EQ(r.data.over_long, "drop");
  EXPECT_EQ(r.data.on_bad_record, "skip");
  EXPECT_FALSE(r.data.cache);
  EXPECT_EQ(r.data.threads, 3);
  EXPECT_EQ(r.train.epochs, 3);
  EXPECT_EQ(r.train.max_steps, 100);
  EXPECT_EQ(r.train.micro_batch, 4);
  EXPECT_EQ(r.train.grad_accum, 8);
  EXPECT_EQ(r.train.lr, 1.5e-4);
  EXPECT_EQ(r.train.schedule, "linear");
  EXPECT_EQ(r.train.warmup, 10.0);
  EXPECT_EQ(r.train.min_lr_ratio, 0.1);
  EXPECT_EQ(r.train.optimizer, "sgd");
  EXPECT_EQ(r.train.weight_decay, 0.01);
  EXPECT_EQ(r.train.beta1, 0.8);
  EXPECT_EQ(r.train.beta2, 0.99);
  EXPECT_EQ(r.train.eps, 1e-6);
  EXPECT_EQ(r.train.momentum, 0.9);
  EXPECT_EQ(r.train.max_grad_norm, 0.5);
  EXPECT_FALSE(r.train.checkpointing);
  EXPECT_EQ(r.train.seed, 18446744073709551615ull);
  EXPECT_EQ(r.train.eval_every, 20);
  EXPECT_EQ(r.train.save_every, 50);
  EXPECT_EQ(r.train.keep_checkpoints, 2);
  EXPECT_EQ(r.device.backend, "cpu");
  EXPECT_EQ(r.device.memory_budget, "24GiB");
  EXPECT_EQ(r.device.threads, 2);
  EXPECT_EQ(r.output.dir, "/base/runs/one");
  EXPECT_TRUE(r.output.merge);
  EXPECT_EQ(r.logging.every, 5);
  EXPECT_FALSE(r.logging.report);
  EXPECT_EQ(r.logging.sample_prompts, (std::vector<std::string>{"Hello", "Say: yes"}));
  EXPECT_EQ(r.logging.sample_max_new_tokens, 12);
}

TEST(RecipeParse, ValueFormsThatAreAccepted) {
  // A number for data.val is a fraction; a single string is a one-element list.
  Recipe r = parse(std::string(kMinimal) + "logging:\n  sample_prompts: Hi there\n", {"data.val=0.1"});
  EXPECT_EQ(r.data.val_fraction, 0.1);
  EXPECT_TRUE(r.data.val.empty());
  EXPECT_EQ(r.logging.sample_prompts, std::vector<std::string>{"Hi there"});
  // A section left empty keeps its defaults; warmup below 1 is a ratio.
  r = parse(std::string(kMinimal) + "quant:\ntrain:\n  warmup: 0.03\n  lr: 2e-5\n");
  EXPECT_EQ(r.quant.type, "nf4");
  EXPECT_EQ(r.train.warmup, 0.03);
  EXPECT_EQ(r.train.lr, 2e-5);
  for (const char* budget : {"auto", "24GiB", "48GB", "80000MiB", "1.5TiB", "rtx4090", "a100-80"})
    EXPECT_EQ(parse(kMinimal, {std::string("device.memory_budget=") + budget}).device.memory_budget, budget);
  for (const char* tmpl : {"auto", "chatml", "qwen2.5", "mistral"})
    EXPECT_EQ(parse(kMinimal, {std::string("data.chat_template=") + tmpl}).data.chat_template, tmpl);
  for (const char* block : {"32", "64", "4096"})
    EXPECT_EQ(parse(kMinimal, {std::string("quant.block_size=") + block}).quant.block_size,
              std::stoll(block));
}

TEST(RecipeTargets, WordsExpandToModuleLists) {
  EXPECT_EQ(parse(kMinimal, {"lora.targets=all-linear"}).lora.targets, kAllLinear);
  EXPECT_EQ(parse(kMinimal, {"lora.targets=[all-linear]"}).lora.targets, kAllLinear);
  EXPECT_EQ(parse(kMinimal, {"lora.targets=attention"}).lora.targets,
            (std::vector<std::string>{"q_proj", "k_proj", "v_proj", "o_proj"}));
  EXPECT_EQ(parse(kMinimal, {"lora.targets=down_proj"}).lora.targets, std::vector<std::string>{"down_proj"});
  EXPECT_EQ(parse(kMinimal, {"lora.targets=[up_proj, gate_proj, k_proj]"}).lora.targets,
            (std::vector<std::string>{"k_proj", "gate_proj", "up_proj"}));
}

TEST(RecipePaths, RelativePathsResolveAgainstTheRecipeFolder) {
  testing::ScratchDir dir;
  fs::create_directories(dir / "recipes");
  testing::write_bytes(dir / "recipes" / "r.yaml",
                       "model:\n  path: ../models/m\n"
                       "lora:\n  init: ./adapter\n"
                       "data:\n  train: [d/train.jsonl, /abs/t.jsonl]\n  val: [d/val.jsonl]\n"
                       "output:\n  dir: ../runs/x\n");
  const fs::path file = dir / "recipes" / "r.yaml";
  const Recipe r = load_recipe(file);
  const fs::path base = fs::absolute(dir.path());
  EXPECT_EQ(r.file, file);
  EXPECT_EQ(r.model.path, (base / "models" / "m").string());
  EXPECT_EQ(r.lora.init, (base / "recipes" / "adapter").string());
  EXPECT_EQ(r.data.train,
            (std::vector<std::string>{(base / "recipes" / "d" / "train.jsonl").string(), "/abs/t.jsonl"}));
  EXPECT_EQ(r.data.val, std::vector<std::string>{(base / "recipes" / "d" / "val.jsonl").string()});
  EXPECT_EQ(r.output.dir, (base / "runs" / "x").string());

  // builtin:NAME, absolute paths and lora.init: default stay as written.
  const Recipe b = parse("model: {path: builtin:tiny}\ndata: {train: /d/t.jsonl}\noutput: {dir: /o}\n");
  EXPECT_EQ(b.model.path, "builtin:tiny");
  EXPECT_EQ(b.data.train, std::vector<std::string>{"/d/t.jsonl"});
  EXPECT_EQ(b.output.dir, "/o");
  EXPECT_EQ(b.lora.init, "default");
}

TEST(RecipePaths, LoadErrorsNameTheFile) {
  testing::ScratchDir dir;
  const std::string missing = error_of([&] { load_recipe(dir / "nope.yaml"); });
  EXPECT_NE(missing.find((dir / "nope.yaml").string() + ": cannot read the recipe (no such file)"),
            std::string::npos)
      << missing;
  EXPECT_EQ(error_of([&] { load_recipe(dir.path()); }),
            dir.path().string() + ": is a folder; expected a recipe file (YAML)");
  testing::write_bytes(dir / "bad.yaml", std::string(kMinimal) + "lora:\n  rank: 0\n");
  const std::string bad = error_of([&] { load_recipe(dir / "bad.yaml"); });
  EXPECT_EQ(bad, (dir / "bad.yaml").string() + ":8:9: lora.rank: expected an integer >= 1, got '0'");
}

TEST(RecipeOverrides, ScalarListNestedAndSection) {
  const std::string base = std::string(kMinimal) + "train:\n  lr: 1e-3\n";
  const Recipe r =
      parse(base, {"train.lr=1e-4", "lora.targets=[q_proj,v_proj]", "data.fields.prompt=QUESTION",
                   "quant={type: fp4, block_size: 32}", "data.train=[x.jsonl, y.jsonl]"});
  EXPECT_EQ(r.train.lr, 1e-4);  // the override wins over the file
  EXPECT_EQ(r.lora.targets, (std::vector<std::string>{"q_proj", "v_proj"}));
  EXPECT_EQ(r.data.fields, (std::vector<std::pair<std::string, std::string>>{{"prompt", "QUESTION"}}));
  EXPECT_EQ(r.quant.type, "fp4");
  EXPECT_EQ(r.quant.block_size, 32);
  EXPECT_EQ(r.data.train, (std::vector<std::string>{"/base/x.jsonl", "/base/y.jsonl"}));
  // Later overrides win; an override can supply a required key.
  EXPECT_EQ(parse(kMinimal, {"lora.rank=4", "lora.rank=2"}).lora.rank, 2);
  EXPECT_EQ(parse(kMinimal, {" lora.rank = 5"}).lora.rank, 5);
  EXPECT_EQ(parse("model: {path: builtin:tiny}\ndata: {train: t.jsonl}\n", {"output.dir=/o"}).output.dir,
            "/o");
  // An empty section in the file takes overrides.
  EXPECT_EQ(parse(std::string(kMinimal) + "lora:\n", {"lora.rank=3"}).lora.rank, 3);
}

TEST(RecipeOverrides, ErrorsNameTheOverride) {
  EXPECT_EQ(error(kMinimal, {"train.lr=abc"}),
            "override 'train.lr=abc': train.lr: expected a number > 0, got 'abc'");
  EXPECT_EQ(
      error(kMinimal, {"train.lrr=1"}),
      "override 'train.lrr=1': unknown key 'train.lrr'; did you mean 'train.lr'? (known keys of train: "
      "epochs, "
      "max_steps, micro_batch, grad_accum, lr, schedule, warmup, min_lr_ratio, optimizer, weight_decay, "
      "beta1, "
      "beta2, eps, momentum, max_grad_norm, checkpointing, seed, eval_every, save_every, keep_checkpoints)");
  const std::string section = error(kMinimal, {"trian.lr=1"});
  EXPECT_EQ(section.rfind(
                "override 'trian.lr=1': unknown key 'trian'; did you mean 'train'? (known sections: model, "
                "quant, lora, data, train, device, output, logging)",
                0),
            0u)
      << section;
  EXPECT_EQ(
      error(kMinimal, {"train.lr"}),
      "override 'train.lr': expected key.path=value, e.g. train.lr=1e-4 or lora.targets=[q_proj,v_proj]");
  EXPECT_NE(error(kMinimal, {"train..lr=1"}).find("override 'train..lr=1': 'train..lr' is not a key path"),
            std::string::npos);
  EXPECT_NE(error(kMinimal, {"lora.rank.x=1"}).find("lora.rank has no sub-keys"), std::string::npos);
  EXPECT_NE(error(kMinimal, {"data.fields.promt=Q"}).find("did you mean 'data.fields.prompt'?"),
            std::string::npos);
  EXPECT_NE(
      error(kMinimal, {"lora.targets=[q_proj"}).find("override 'lora.targets=[q_proj': invalid YAML value"),
      std::string::npos);
  // An empty value is null, not a default.
  EXPECT_EQ(error(kMinimal, {"lora.rank="}),
            "override 'lora.rank=': lora.rank: expected an integer >= 1, got nothing (null)");
  // A whole section from an override: its bad keys are the override's too.
  EXPECT_NE(error(kMinimal, {"lora={rnak: 3}"}).find("override 'lora={rnak: 3}': unknown key 'lora.rnak'"),
            std::string::npos);
  // An error in the file is still the file's, whatever else is overridden.
  EXPECT_EQ(error(std::string(kMinimal) + "lora:\n  alpha: 0\n", {"lora.rank=4"}),
            "r.yaml:8:10: lora.alpha: expected a number > 0, got '0'");
}

// ---- every bad value, with its position ------------------------------------

struct BadCase {
  std::string section, line, message;
  int column = 0;  // of the reported position; 0: the value after "key: "
};

// A valid recipe in which `line` is the first key of `section`, on line 2.
std::string recipe_with(const std::string& section, const std::string& line) {
  const std::map<std::string, std::string> required{
      {"model", "path: builtin:tiny"}, {"data", "train: t.jsonl"}, {"output", "dir: out"}};
  std::string y = section + ":\n  " + line + "\n";
  const auto same = required.find(section);
  const std::string key = line.substr(0, line.find(':'));
  if (same != required.end() && same->second.rfind(key + ":", 0) != 0) y += "  " + same->second + "\n";
  for (const auto& [s, k] : required)
    if (s != section) y += s + ":\n  " + k + "\n";
  return y;
}

TEST(RecipeErrors, EveryBadValueIsReportedWhereItIsWithTheExpectation) {
  const std::vector<BadCase> cases{
      {"train", "micro_batch: 1.5", "train.micro_batch: expected an integer >= 1, got '1.5'"},
      {"train", "micro_batch: abc", "train.micro_batch: expected an integer >= 1, got 'abc'"},
      {"train", "micro_batch: 0", "train.micro_batch: expected an integer >= 1, got '0'"},
      {"train", "micro_batch: [1]", "train.micro_batch: expected an integer >= 1, got a list"},
      {"train", "grad_accum: 0", "train.grad_accum: expected an integer >= 1, got '0'"},
      {"train", "epochs: 0", "train.epochs: expected an integer >= 1, got '0'"},
      {"train", "max_steps: -1", "train.max_steps: expected an integer >= 0 (0 = use epochs), got '-1'"},
      {"train", "lr: 0", "train.lr: expected a number > 0, got '0'"},
      {"train", "lr: -1e-4", "train.lr: expected a number > 0, got '-1e-4'"},
      {"train", "lr: inf", "train.lr: expected a number > 0, got 'inf'"},
      {"train", "lr: .nan", "train.lr: expected a number > 0, got '.nan'"},
      {"train", "lr: abc", "train.lr: expected a number > 0, got 'abc'"},
      {"train", "warmup: -0.1",
       "train.warmup: expected a ratio in [0, 1) or a whole number of steps >= 1, got '-0.1'"},
      {"train", "warmup: 2.5",
       "train.warmup: expected a ratio in [0, 1) or a whole number of steps >= 1, got '2.5'"},
      {"train", "min_lr_ratio: 1.5", "train.min_lr_ratio: expected a number in [0, 1], got '1.5'"},
      {"train", "beta1: 1", "train.beta1: expected a number in [0, 1), got '1'"},
      {"train", "beta2: -0.1", "train.beta2: expected a number in [0, 1), got '-0.1'"},
      {"train", "eps: 0", "train.eps: expected a number > 0, got '0'"},
      {"train", "weight_decay: -1", "train.weight_decay: expected a number >= 0, got '-1'"},
      {"train", "momentum: 1", "train.momentum: expected a number in [0, 1), got '1'"},
      {"train", "max_grad_norm: -1",
       "train.max_grad_norm: expected a number >= 0 (0 = no clipping), got '-1'"},
      {"train", "checkpointing: yes", "train.checkpointing: expected true, false or auto, got 'yes'"},
      {"train", "checkpointing: 1", "train.checkpointing: expected true, false or auto, got '1'"},
      {"train", "seed: -1", "train.seed: expected an integer in [0, 2^64), got '-1'"},
      {"train", "seed: 18446744073709551616",
       "train.seed: expected an integer in [0, 2^64), got '18446744073709551616'"},
      {"train", "eval_every: -1",
       "train.eval_every: expected an integer >= 0 (0 = only at the end), got '-1'"},
      {"train", "save_every: -1",
       "train.save_every: expected an integer >= 0 (0 = only at the end), got '-1'"},
      {"train", "keep_checkpoints: 0", "train.keep_checkpoints: expected an integer >= 1, got '0'"},
      {"train", "schedule: step", "train.schedule: expected one of constant, linear, cosine, got 'step'"},
      {"train", "optimizer: adam", "train.optimizer: expected one of adamw, paged_adamw, sgd, got 'adam'"},
      {"lora", "rank: 0", "lora.rank: expected an integer >= 1, got '0'"},
      {"lora", "rank: 8.0", "lora.rank: expected an integer >= 1, got '8.0'"},
      {"lora", "rank:", "lora.rank: expected an integer >= 1, got nothing (null)", 3},
      {"lora", "alpha: 0", "lora.alpha: expected a number > 0, got '0'"},
      {"lora", "dropout: 1", "lora.dropout: expected a number in [0, 1), got '1'"},
      {"lora", "rslora: True", "lora.rslora: expected true or false, got 'True'"},
      {"lora", "targets: []",
       "lora.targets: expected at least one of module names (q_proj, k_proj, v_proj, o_proj, gate_proj, "
       "up_proj, "
       "down_proj) or all-linear or attention, got a list"},
      {"lora", "targets: [q_proj, all-linear]",
       "lora.targets: expected all-linear alone, not mixed with other names, got a list"},
      {"lora", "targets: [q_proj, qproj]",
       "lora.targets[1]: expected one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, "
       "all-linear, "
       "attention, got 'qproj'",
       21},
      {"lora", "targets: [v_proj, v_proj]",
       "lora.targets[1]: expected each module once (v_proj is listed twice)", 21},
      {"lora", "targets: {q_proj: 1}", "lora.targets: expected module names"},
      {"quant", "type: int8", "quant.type: expected one of nf4, fp4, none, got 'int8'"},
      {"quant", "block_size: 48",
       "quant.block_size: expected a power of two in [32, 4096] (32, 64, 128, ..., 4096)"},
      {"quant", "block_size: 16", "quant.block_size: expected a power of two in [32, 4096]"},
      {"quant", "block_size: 8192", "quant.block_size: expected a power of two in [32, 4096]"},
      {"quant", "double_quant: no", "quant.double_quant: expected true or false, got 'no'"},
      {"data", "seq_len: 1", "data.seq_len: expected an integer >= 2, got '1'"},
      {"data", "format: csv",
       "data.format: expected one of alpaca, messages, sharegpt, prompt_completion, text, tokens, got 'csv'"},
      {"data", "over_long: cut", "data.over_long: expected one of truncate, drop, got 'cut'"},
      {"data", "on_bad_record: ignore", "data.on_bad_record: expected one of error, skip, got 'ignore'"},
      {"data", "val: 1.5", "data.val: expected a fraction in [0, 1) or a file or list of files, got '1.5'"},
      {"data", "val: -0.1", "data.val: expected a fraction in [0, 1) or a file or list of files, got '-0.1'"},
      {"data", "val: {a: 1}",
       "data.val: expected a fraction in [0, 1) or a file or list of files, got a map"},
      {"data", "train: []", "data.train: expected a file or a non-empty list of files, got a list"},
      {"data", "train: [a.jsonl, {b: 1}]", "data.train[1]: expected a non-empty string, got a map", 20},
      {"data", "fields: [prompt]",
       "data.fields: expected a map of field names, e.g. {prompt: QUESTION}, got a list"},
      {"data", "fields: {promt: Q}",
       "unknown key 'data.fields.promt'; did you mean 'data.fields.prompt'? (known keys of data.fields: "
       "instruction, input, output, system, messages, role, content, conversations, from, value, prompt, "
       "completion, text, input_ids, labels)",
       12},
      {"data", "fields: {prompt: [a]}",
       "data.fields.prompt: expected a field name (a non-empty string), got a list", 20},
      {"data", "chat_template: jinja2", "data.chat_template: expected auto or one of "},
      {"data", "cache: maybe", "data.cache: expected true or false, got 'maybe'"},
      {"data", "threads: -1", "data.threads: expected an integer >= 0 (0 = all cores), got '-1'"},
      {"device", "backend: gpu", "device.backend: expected one of auto, cpu, cuda, got 'gpu'"},
      {"device", "threads: 1.5", "device.threads: expected an integer >= 0 (0 = all cores), got '1.5'"},
      {"device", "memory_budget: 24",
       "device.memory_budget: expected auto, a size such as 24GiB, 48GB or 80000MiB, or a GPU name such as "
       "rtx4090, "
       "got '24'"},
      {"device", "memory_budget: 24XB", "device.memory_budget: expected auto, a size"},
      {"device", "memory_budget: 0GiB", "device.memory_budget: expected auto, a size"},
      {"device", "memory_budget: RTX 4090", "device.memory_budget: expected auto, a size"},
      {"model", "path: {a: 1}",
       "model.path: expected a model folder, 4-bit checkpoint or builtin:NAME, got a map"},
      {"model", "path: [a]",
       "model.path: expected a model folder, 4-bit checkpoint or builtin:NAME, got a list"},
      {"model", "preset: [x]", "model.preset: expected a preset name, got a list"},
      {"output", "dir: ''", "output.dir: expected a folder, got ''"},
      {"output", "merge: 0", "output.merge: expected true or false, got '0'"},
      {"logging", "every: 0", "logging.every: expected an integer >= 1, got '0'"},
      {"logging", "report: on", "logging.report: expected true or false, got 'on'"},
      {"logging", "sample_prompts: {a: 1}",
       "logging.sample_prompts: expected a prompt or a list of prompts, got a map"},
      {"logging", "sample_max_new_tokens: 0",
       "logging.sample_max_new_tokens: expected an integer >= 1, got '0'"},
  };
  for (const BadCase& c : cases) {
    const std::string yaml = recipe_with(c.section, c.line);
    const int column = c.column ? c.column : static_cast<int>(3 + c.line.find(": ") + 2);
    const std::string want = "r.yaml:2:" + std::to_string(column) + ": " + c.message;
    const std::string got = error(yaml);
    EXPECT_EQ(got.substr(0, want.size()), want) << "recipe:\n" << yaml;
  }
}

// A value that another setting makes meaningless is reported at its own line
// with both settings named; the default value of such a key is never flagged
// (a recipe written back in full must read again).
TEST(RecipeErrors, SettingsThatHaveNoEffectAreReportedAtTheirLine) {
  struct Case {
    std::string section, line;
    std::vector<std::string> overrides;
    std::string message;
  };
  const std::vector<Case> cases{
      {"train", "momentum: 0.9", {}, "train.momentum: 0.9 has no effect with train.optimizer adamw"},
      {"train", "momentum: 0.9", {"train.optimizer=paged_adamw"}, "with train.optimizer paged_adamw"},
      {"train", "warmup: 100", {"train.max_steps=100"}, "train.warmup: 100 warmup steps take the whole run"},
      {"train", "eval_every: 10", {}, "train.eval_every: 10 asks for validation but there is no validation data"},
      {"quant", "block_size: 128", {"quant.type=none"}, "quant.block_size: 128 has no effect with quant.type none"},
      {"quant", "double_quant: false", {"quant.type=none"}, "quant.double_quant: has no effect with quant.type"},
  };
  for (const Case& c : cases) {
    const std::string yaml = recipe_with(c.section, c.line);
    const std::string where = "r.yaml:2:" + std::to_string(3 + c.line.find(": ") + 2) + ": ";
    const std::string got = error(yaml, c.overrides);
    EXPECT_EQ(got.rfind(where, 0), 0u) << got << "\nrecipe:\n" << yaml;
    EXPECT_NE(got.find(c.message), std::string::npos) << got;
  }
  // The same values where they do mean something, and defaults anywhere, read.
  EXPECT_EQ(parse(recipe_with("train", "momentum: 0.9"), {"train.optimizer=sgd"}).train.momentum, 0.9);
  // A decay floor under a constant schedule is harmless and common when an override switches schedule.
  EXPECT_EQ(parse(recipe_with("train", "min_lr_ratio: 0.1"), {"train.schedule=constant"}).train.min_lr_ratio, 0.1);
  EXPECT_EQ(parse(recipe_with("train", "warmup: 99"), {"train.max_steps=100"}).train.warmup, 99.0);
  EXPECT_EQ(parse(recipe_with("train", "eval_every: 10"), {"data.val=0.1"}).train.eval_every, 10);
  EXPECT_EQ(parse(recipe_with("train", "momentum: 0"), {"train.optimizer=adamw"}).train.momentum, 0.0);
  EXPECT_EQ(parse(recipe_with("quant", "block_size: 64"), {"quant.type=none"}).quant.type, "none");
  // An override that makes the conflict is named as its place.
  const std::string e = error(kMinimal, {"train.momentum=0.5"});
  EXPECT_EQ(e.rfind("override 'train.momentum=0.5': train.momentum: 0.5 has no effect", 0), 0u) << e;
}

TEST(RecipeErrors, UnknownKeysSuggestTheNearestKnownOne) {
  EXPECT_EQ(error(recipe_with("lora", "rnak: 8")),
            "r.yaml:2:3: unknown key 'lora.rnak'; did you mean 'lora.rank'? (known keys of lora: rank, "
            "alpha, dropout, "
            "rslora, targets, init, rank_pattern, alpha_pattern, dora, plus_lr_ratio)");
  EXPECT_EQ(error(recipe_with("lroa", "rank: 8")),
            "r.yaml:1:1: unknown key 'lroa'; did you mean 'lora'? (known sections: model, quant, lora, data, "
            "train, "
            "device, output, logging)");
  // A key of another section, and a name from axolotl.
  EXPECT_NE(error(recipe_with("lora", "lr: 1e-4"))
                .find("r.yaml:2:3: unknown key 'lora.lr'; did you mean 'train.lr'?"),
            std::string::npos);
  EXPECT_NE(error(std::string(kMinimal) + "lora_r: 8\n")
                .find("r.yaml:7:1: unknown key 'lora_r'; did you mean 'lora.rank'?"),
            std::string::npos);
  EXPECT_NE(error(recipe_with("train", "learning_rate: 1e-4")).find("did you mean 'train.lr'?"),
            std::string::npos);
  // PEFT's and axolotl's names for DoRA, LoRA+ and per-module ranks.
  for (const auto& [name, ours] : std::vector<std::pair<std::string, std::string>>{
           {"use_dora", "lora.dora"}, {"peft_use_dora", "lora.dora"}, {"loraplus_lr_ratio", "lora.plus_lr_ratio"},
           {"rank_pattern", "lora.rank_pattern"}, {"alpha_pattern", "lora.alpha_pattern"}}) {
    EXPECT_NE(error(std::string(kMinimal) + name + ": true\n").find("did you mean '" + ours + "'?"),
              std::string::npos)
        << name;
    if (name.find("pattern") == std::string::npos) {  // inside lora those are our own key names
      EXPECT_NE(error(recipe_with("lora", name + ": true")).find("did you mean '" + ours + "'?"), std::string::npos)
          << name;
    }
  }
  // Nothing close: no suggestion, but the list of keys.
  const std::string far = error(recipe_with("lora", "zzzzzzzz: 1"));
  EXPECT_EQ(far.find("did you mean"), std::string::npos) << far;
  EXPECT_NE(far.find("unknown key 'lora.zzzzzzzz' (known keys of lora: rank,"), std::string::npos) << far;
}

TEST(RecipeErrors, RequiredKeys) {
  EXPECT_EQ(error("data: {train: t.jsonl}\noutput: {dir: o}\n")
                .rfind("r.yaml: missing required key 'model.path'", 0),
            0u);
  EXPECT_EQ(
      error("model: {path: m}\noutput: {dir: o}\n").rfind("r.yaml: missing required key 'data.train'", 0),
      0u);
  EXPECT_EQ(error("model: {path: m}\ndata: {train: t.jsonl}\n")
                .rfind("r.yaml: missing required key 'output.dir'", 0),
            0u);
  EXPECT_EQ(error("model: {path: m}\ndata:\noutput: {dir: o}\n")
                .rfind("r.yaml: missing required key 'data.train'", 0),
            0u);
}

TEST(RecipeErrors, DocumentShape) {
  const std::string syntax = error("model:\n  path: [a, b\ndata: {train: t}\n");
  EXPECT_TRUE(std::regex_search(syntax, std::regex("^r\\.yaml:[0-9]+:[0-9]+: invalid YAML: "))) << syntax;
  EXPECT_EQ(error("").rfind("r.yaml: the recipe is empty; expected a map of sections (model, quant,", 0), 0u);
  EXPECT_EQ(error("# nothing but a comment\n").rfind("r.yaml: the recipe is empty", 0), 0u);
  EXPECT_EQ(error("- model\n- data\n")
                .rfind("r.yaml:1:1: the recipe: expected a map of sections (model, quant,", 0),
            0u);
  EXPECT_NE(error("just words\n").find("the recipe: expected a map of sections"), std::string::npos);
  EXPECT_EQ(error(std::string(kMinimal) + "---\n" + kMinimal),
            "r.yaml: holds 2 YAML documents (separated by ---); a recipe is one");
  EXPECT_EQ(
      error(std::string(kMinimal) + "lora: 5\n"),
      "r.yaml:7:7: lora: expected a map of lora keys (rank, alpha, dropout, rslora, targets, init, rank_pattern, "
            "alpha_pattern, dora, plus_lr_ratio), got '5'");
}

TEST(RecipeErrors, DuplicateKeysNameBothLines) {
  EXPECT_EQ(error(std::string(kMinimal) + "lora:\n  rank: 8\n  alpha: 16\n  rank: 4\n"),
            "r.yaml:10:3: duplicate key 'lora.rank' (first given at line 8, again at line 10)");
  EXPECT_EQ(error(std::string(kMinimal) + "model:\n  preset: x\n"),
            "r.yaml:7:1: duplicate key 'model' (first given at line 1, again at line 7)");
  EXPECT_NE(error(kMinimal, {"data.fields={prompt: a, prompt: b}"})
                .find("override 'data.fields={prompt: a, prompt: b}': duplicate key 'data.fields.prompt'"),
            std::string::npos);
}

// ---- round trip ------------------------------------------------------------

TEST(RecipeYaml, RoundTripGivesTheSameRecipe) {
  Recipe r = parse(kFull);
  // Values that a careless writer would lose: floats needing 17 digits,
  // strings that read as other types, quotes and line breaks.
  r.train.lr = 1.0 / 3.0;
  r.lora.alpha = 0.1 + 0.2;
  r.train.eps = 1e-300;
  r.logging.sample_prompts = {"true",       "~",      "1e3", "null", "a: b",      "say \"hi\"\nnow",
                              "  padded  ", "日本語", "- x", "No",   "builtin:x", "a #b",
                              "x:",         "50%"};
  r.model.preset = "";
  const std::string yaml = recipe_to_yaml(r);
  const Recipe back = parse_recipe(yaml, "back.yaml", "/elsewhere");
  EXPECT_EQ(recipe_to_yaml(back), yaml);
  EXPECT_EQ(back.train.lr, r.train.lr);
  EXPECT_EQ(back.lora.alpha, r.lora.alpha);
  EXPECT_EQ(back.train.eps, r.train.eps);
  EXPECT_EQ(back.logging.sample_prompts, r.logging.sample_prompts);
  EXPECT_EQ(back.data.train, r.data.train);  // already absolute: not re-resolved
  EXPECT_EQ(back.data.fields, r.data.fields);
  EXPECT_EQ(back.train.seed, r.train.seed);

  // train.checkpointing: auto is kept as auto (the plan decides per machine).
  Recipe a = parse(kMinimal, {"train.checkpointing=auto"});
  EXPECT_TRUE(a.train.checkpointing_auto);
  const Recipe a2 = parse_recipe(recipe_to_yaml(a), "a.yaml", "/elsewhere");
  EXPECT_TRUE(a2.train.checkpointing_auto);
  EXPECT_NE(recipe_to_yaml(a2).find("checkpointing: auto"), std::string::npos) << recipe_to_yaml(a2);
  EXPECT_FALSE(parse(kMinimal, {"train.checkpointing=false"}).train.checkpointing_auto);

  // The defaults, and data.val as a fraction.
  const Recipe d = parse(kMinimal, {"data.val=0.25"});
  const Recipe d2 = parse_recipe(recipe_to_yaml(d), "d.yaml", "/elsewhere");
  EXPECT_EQ(recipe_to_yaml(d2), recipe_to_yaml(d));
  EXPECT_EQ(d2.data.val_fraction, 0.25);
}

TEST(RecipeYaml, EveryKeyInTheSchemaOrder) {
  const YAML::Node doc = YAML::Load(recipe_to_yaml(parse(kMinimal)));
  std::vector<std::string> sections, want_sections;
  for (const auto& s : recipe_schema::sections()) want_sections.push_back(s.name);
  for (auto it = doc.begin(); it != doc.end(); ++it) {
    const std::string name = it->first.Scalar();
    sections.push_back(name);
    const auto* schema = recipe_schema::find_section(name);
    ASSERT_NE(schema, nullptr) << name;
    std::vector<std::string> keys;
    for (auto kv = it->second.begin(); kv != it->second.end(); ++kv) keys.push_back(kv->first.Scalar());
    EXPECT_EQ(keys, schema->keys) << name;
  }
  EXPECT_EQ(sections, want_sections);
  // Floats are written so YAML 1.1 readers (PyYAML) also see floats.
  EXPECT_EQ(doc["lora"]["alpha"].Scalar(), "32.0");
  EXPECT_EQ(doc["train"]["eps"].Scalar(), "1.0e-08");
  EXPECT_EQ(doc["train"]["lr"].Scalar(), "2.0e-04");
}

TEST(RecipeYaml, DocsListEveryKey) {
  const std::string docs = testing::read_bytes(fs::path(QLORA_SOURCE_DIR) / "docs" / "recipes.md");
  for (const auto& s : recipe_schema::sections())
    for (const auto& k : s.keys)
      EXPECT_NE(docs.find("| `" + s.name + "." + k + "`"), std::string::npos) << s.name << "." << k;
}

// ---- training hash ---------------------------------------------------------

TEST(RecipeHash, StableAndSensitiveToTrainingOnly) {
  const Recipe base = parse(kFull);
  const std::string h = recipe_training_hash(base);
  EXPECT_TRUE(std::regex_match(h, std::regex("[0-9a-f]{16}"))) << h;
  EXPECT_EQ(recipe_training_hash(parse(kFull)), h);

  auto with = [&](const std::string& override) { return recipe_training_hash(parse(kFull, {override})); };
  for (const char* changes :
       {"train.lr=1e-4", "lora.rank=4", "train.seed=7", "lora.dora=false", "lora.plus_lr_ratio=2",
        "lora.rank_pattern={v_proj: 4}", "lora.alpha_pattern={q_proj: 3.5, v_proj: 1}",
        "lora.rank_pattern={\"layers\\\\.0\\\\..*\": 2, v_proj: 4}", "data.train=other.jsonl",
        "data.train=[a.jsonl, /abs/c.jsonl]", "lora.targets=attention", "quant.type=nf4", "data.seq_len=256",
        "train.grad_accum=2", "data.fields.prompt=Q"})
    EXPECT_NE(with(changes), h) << changes;
  for (const char* same :
       {"output.dir=/elsewhere", "output.merge=false", "logging.every=100", "logging.report=true",
        "logging.sample_prompts=[x]", "train.eval_every=1", "train.save_every=1", "train.keep_checkpoints=9",
        "train.max_steps=50", "train.epochs=9", "device.threads=9", "lora.targets=[q_proj, v_proj]",
        "data.fields={output: answer, instruction: question}"})
    EXPECT_EQ(with(same), h) << same;
}

// Keys added with DoRA / LoRA+ / patterns enter the hash only when set, so a
// checkpoint written before them still resumes; set, they change it.
TEST(RecipeHash, NewLoraKeysAtTheirDefaultsLeaveTheHashAlone) {
  const std::string h = recipe_training_hash(parse(kMinimal));
  for (const char* same : {"lora.dora=false", "lora.plus_lr_ratio=1", "lora.rank_pattern={}", "lora.alpha_pattern={}"})
    EXPECT_EQ(recipe_training_hash(parse(kMinimal, {same})), h) << same;
  for (const char* changes : {"lora.dora=true", "lora.plus_lr_ratio=16", "lora.rank_pattern={down_proj: 8}"})
    EXPECT_NE(recipe_training_hash(parse(kMinimal, {changes})), h) << changes;
}

TEST(RecipeErrors, PatternsAndLoraPlusValues) {
  EXPECT_NE(error(recipe_with("lora", "rank_pattern: [down_proj]")).find("lora.rank_pattern: expected a map of "
                                                                         "module-name patterns to ranks"),
            std::string::npos);
  EXPECT_NE(error(recipe_with("lora", "rank_pattern: {down_proj: 0}"))
                .find("r.yaml:2:29: lora.rank_pattern.down_proj: expected a rank (an integer >= 1), got '0'"),
            std::string::npos)
      << error(recipe_with("lora", "rank_pattern: {down_proj: 0}"));
  EXPECT_NE(error(recipe_with("lora", "alpha_pattern: {down_proj: -1}")).find("expected an alpha (a number > 0)"),
            std::string::npos);
  EXPECT_NE(error(recipe_with("lora", "plus_lr_ratio: 0")).find("lora.plus_lr_ratio: expected a number > 0"),
            std::string::npos);
  EXPECT_NE(error(recipe_with("lora", "dora: yes")).find("lora.dora: expected true or false"), std::string::npos);
}

// ---- sizes -----------------------------------------------------------------

TEST(RecipeByteSize, UnitsAndRejections) {
  EXPECT_EQ(parse_byte_size("24GiB"), 24ull << 30);
  EXPECT_EQ(parse_byte_size("48GB"), 48'000'000'000ull);
  EXPECT_EQ(parse_byte_size("80000MiB"), 80000ull << 20);
  EXPECT_EQ(parse_byte_size("1.5TiB"), 3ull << 39);
  EXPECT_EQ(parse_byte_size("512 B"), 512u);
  EXPECT_EQ(parse_byte_size("2kb"), 2000u);
  EXPECT_EQ(parse_byte_size("0.5KiB"), 512u);
  EXPECT_EQ(parse_byte_size("16777215TiB"), 16777215ull << 40);
  for (const char* bad : {"", "24", "GiB", "24XB", "-1GiB", "+1GiB", "1.GiB", ".5GiB", "1e3GB", " 1GiB",
                          "1GiB ", "1  GiB", "16777216TiB", "99999999999999999999B", "inf GB"})
    EXPECT_FALSE(parse_byte_size(bad).has_value()) << bad;
}

}  // namespace
}  // namespace qlora
