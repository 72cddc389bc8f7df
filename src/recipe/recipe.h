// The recipe of a run: one YAML file with sections model, quant, lora, data,
// train, device, output, logging (names familiar to axolotl and torchtune
// users; every key is documented in docs/recipes.md).
//
// load_recipe validates everything before anything is loaded: unknown keys
// (with a did-you-mean), wrong types and out-of-range values throw
// qlora::Error as "<file>:<line>:<column>: <key.path>: expected <what>, got
// '<value>'" (1-based positions). Command-line overrides ("train.lr=1e-4") are
// applied to the YAML tree before validation, so they are checked by the same
// code; an error in an override names it ("override 'train.lr=abc':
// train.lr: expected a number > 0, got 'abc'").
//
// Beside this header: recipe_schema.h (the keys in order; field_names() applies
// data.fields to the reader's FieldNames), byte_size.h (parse_byte_size for
// device.memory_budget sizes).
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace qlora {

struct RecipeModel {
  std::string path;    // HF folder, 4-bit checkpoint or "builtin:NAME" (required)
  std::string preset;  // published config to assume when `path` has no config.json (estimate only); "" = none
};

struct RecipeQuant {
  std::string type = "nf4";  // nf4 | fp4 | none (none: dense base, CPU reference only)
  int64_t block_size = 64;   // 32..4096, a power of two
  bool double_quant = true;
};

struct RecipeLora {
  int64_t rank = 16;                // >= 1
  double alpha = 32.0;              // > 0
  double dropout = 0.05;            // [0, 1)
  bool rslora = false;
  // Module names among q_proj k_proj v_proj o_proj gate_proj up_proj
  // down_proj; the YAML also accepts "all-linear" (all seven) and
  // "attention" (q, k, v, o), expanded here.
  std::vector<std::string> targets{"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  std::string init = "default";     // "default" (A kaiming-uniform, B zero) or a PEFT adapter folder
  // PEFT's rank_pattern / alpha_pattern: {module-name pattern: value}, in the
  // order written (the first matching key wins; model/lora.h).
  std::vector<std::pair<std::string, int64_t>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  bool dora = false;                // PEFT's use_dora
  double plus_lr_ratio = 1.0;       // LoRA+: B's (and DoRA magnitudes') lr = ratio x train.lr; 1 = off
};

struct RecipeData {
  std::vector<std::string> train;    // files (required; a string is a one-element list)
  std::vector<std::string> val;      // files; empty: val_fraction of train
  double val_fraction = 0.0;         // YAML `val:` given as a number in [0, 1)
  std::string format = "messages";   // alpaca | messages | sharegpt | prompt_completion | text | tokens
  std::vector<std::pair<std::string, std::string>> fields;  // FieldNames overrides, e.g. {prompt: QUESTION}
  std::string chat_template = "auto";
  int64_t seq_len = 2048;            // >= 2
  bool packing = true;
  bool train_on_inputs = false;
  std::string over_long = "truncate";   // truncate | drop
  std::string on_bad_record = "error";  // error | skip
  bool cache = true;                 // cache tokenized data under <cache root>/data (core/cache_dir.h)
  int64_t threads = 0;               // 0 = all cores
};

struct RecipeTrain {
  int64_t epochs = 1;                // used when max_steps == 0
  int64_t max_steps = 0;             // > 0 overrides epochs
  int64_t micro_batch = 1;           // rows per forward
  int64_t grad_accum = 1;            // micro-batches per optimizer step
  double lr = 2e-4;
  std::string schedule = "cosine";   // constant | linear | cosine
  double warmup = 0.0;               // < 1: ratio of total steps; >= 1: steps (an integer)
  double min_lr_ratio = 0.0;         // linear/cosine end at lr * min_lr_ratio
  std::string optimizer = "adamw";   // adamw | paged_adamw | sgd
  double weight_decay = 0.0;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double momentum = 0.0;             // sgd only
  double max_grad_norm = 1.0;        // 0 = no clipping
  bool checkpointing = true;         // activation checkpointing
  bool checkpointing_auto = false;   // "auto": the memory plan decides (plan/plan.h PlanInput)
  uint64_t seed = 42;
  int64_t eval_every = 0;            // steps; 0 = only at the end (when there is validation data)
  int64_t save_every = 0;            // steps; 0 = only at the end
  int64_t keep_checkpoints = 3;      // >= 1
};

struct RecipeDevice {
  std::string backend = "auto";      // auto | cpu | cuda
  // "auto" (the device's free memory) or a size: "24GiB", "48GB", "80000MiB",
  // a GPU name from `qlora estimate --help` (rtx4090, a100-80, ...).
  std::string memory_budget = "auto";
  int64_t threads = 0;               // CPU backend threads; 0 = all cores
};

struct RecipeOutput {
  std::string dir;                   // required
  bool merge = false;                // also write a merged HF folder to <dir>/merged
  bool gguf = false;                 // also write <dir>/adapter.gguf (llama.cpp's LoRA adapter format)
};

struct RecipeLogging {
  int64_t every = 1;                 // steps between log lines / metrics.jsonl records
  bool report = true;                // report.html at checkpoints and at the end
  // Sample generations before and after training (the demo uses them).
  std::vector<std::string> sample_prompts;
  int64_t sample_max_new_tokens = 48;
};

struct Recipe {
  std::filesystem::path file;        // where it was read from ("" when built in code)
  RecipeModel model;
  RecipeQuant quant;
  RecipeLora lora;
  RecipeData data;
  RecipeTrain train;
  RecipeDevice device;
  RecipeOutput output;
  RecipeLogging logging;
};

// Reads, applies overrides ("key.path=value", value parsed as YAML), validates.
// Relative paths in data.train/val, model.path, lora.init and output.dir are
// resolved against the recipe file's folder (builtin:NAME and absolute paths
// stay as they are).
Recipe load_recipe(const std::filesystem::path& file, const std::vector<std::string>& overrides = {});
// The same from YAML text (`name` stands for the file in messages; relative
// paths resolve against `base_dir`).
Recipe parse_recipe(const std::string& yaml, const std::string& name, const std::filesystem::path& base_dir,
                    const std::vector<std::string>& overrides = {});

// The fully resolved recipe (every key, defaults included) as YAML; parsing it
// back gives an equal Recipe. Written into the output folder as recipe.yaml.
std::string recipe_to_yaml(const Recipe& r);

// A hash of everything that changes what training computes (not logging,
// output.dir, eval_every, save_every, keep_checkpoints, max_steps/epochs,
// device.threads): a resumed run refuses a checkpoint whose hash differs. Hex.
std::string recipe_training_hash(const Recipe& r);

}  // namespace qlora
