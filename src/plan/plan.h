// The memory planner: from (model config, recipe settings, device) the list of
// every buffer a run allocates, with bytes, dtype, lifetime and place, a
// verdict against a budget, and advice (largest micro-batch, longest seq_len,
// what each switch saves). The single source of truth for `qlora estimate` and
// for the allocations of `qlora run` (docs/memory.md).
//
// Two device models. CPU: the exact arenas of this codebase, measured by the
// same layout functions the constructors run (base_weight_arena_bytes,
// LoraWeights::arena_bytes, optimizer_state_bytes, LlamaModel::arena_bytes),
// so planned == allocated. CUDA: what the GPU backend will allocate per
// DESIGN.md (bf16 storage, NF4 + double quant), with the constants that need a
// device measurement in plan/cuda_constants.h.
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "io/hf_config.h"
#include "kernels/ops.h"
#include "model/llama.h"
#include "model/lora.h"
#include "model/weights.h"
#include "quant/blockwise.h"
#include "recipe/recipe.h"
#include "train/optimizer.h"

namespace qlora {

enum class PlanBackend { cpu, cuda };
const char* plan_backend_name(PlanBackend b);  // "cpu" | "cuda"

// When a buffer exists. persistent: the whole run; per_step: through one
// forward + backward; per_layer: one layer at a time (reused); per_chunk: one
// loss chunk at a time (reused); load: only while the weights load.
enum class Lifetime { persistent, per_step, per_layer, per_chunk, load };
const char* lifetime_name(Lifetime l);

// Where a buffer lives. On the CPU backend "device" memory is host RAM.
// pinned_host: page-locked host memory (DMA); paged: pinned host memory that is
// paged in to the device piece by piece (paged optimizer state); host:
// ordinary pageable host memory.
enum class Place { device, pinned_host, paged, host };
const char* place_name(Place p);

struct PlanBuffer {
  std::string category;  // "base weights", "LoRA", "optimizer", "activations", "workspace", "runtime", "host"
  std::string name;
  uint64_t bytes = 0;
  std::string dtype;  // "nf4", "fp4", "bf16", "fp32", "uint8", "int32", "mixed"
  Lifetime lifetime = Lifetime::persistent;
  Place place = Place::device;
  std::string note;  // the formula or the assumption behind the figure
};

struct PlanInput {
  ModelConfig model;
  std::string model_name;  // for display: preset name or folder
  PlanBackend backend = PlanBackend::cpu;
  // Base weights: quantize = false keeps block linears dense (fp32 on the CPU,
  // bf16 on CUDA). prequantized: the folder is a bitsandbytes 4-bit checkpoint
  // (type and block then come from its files).
  bool quantize = true;
  Quant4Type quant_type = Quant4Type::NF4;
  int64_t block = kDefaultBlock4;
  bool double_quant = true;
  bool prequantized = false;
  LoraConfig lora;
  int64_t seq_len = 2048;
  int64_t micro_batch = 1;
  bool checkpointing = true;
  // train.checkpointing: auto. make_plan decides `checkpointing` and keeps
  // this flag in MemoryPlan::input (so the report can say "auto"): off when
  // the run without recomputation (about a third less compute) fits in
  // kAutoCheckpointingShare of the budget, else on; on without a budget.
  bool checkpointing_auto = false;
  OptimizerConfig optimizer;
  ops::CeChunking ce;                     // the CPU loss tiles
  uint64_t budget_bytes = 0;              // 0: unknown (no verdict)
  uint64_t dataset_tokens = 0;            // 0: unknown (not counted)
  bool dataset_tokens_estimated = false;  // from file sizes, not a count
};

// The share of the budget a run without checkpointing may plan to use for
// `auto` to choose it: the planned bytes are exact, but the budget is all of
// the GPU's or the machine's memory, which other processes share.
inline constexpr double kAutoCheckpointingShare = 0.9;

// The options the runtime must construct its objects with for the CPU arenas
// to equal the plan.
WeightLoadOptions weight_load_options(const PlanInput& in);
LlamaRunOptions llama_run_options(const PlanInput& in);

enum class Verdict { fits, fits_with_paging, does_not_fit, no_budget };
const char* verdict_name(Verdict v);  // "fits", "fits with paging", "does not fit", "no budget"

// The CPU arenas, bytes (all zero on CUDA).
struct CpuArenas {
  uint64_t weights = 0, lora_params = 0, lora_grads = 0, optimizer = 0, activations = 0;
  uint64_t total() const { return weights + lora_params + lora_grads + optimizer + activations; }
};

struct MemoryPlan {
  PlanInput input;
  std::vector<PlanBuffer> buffers;
  uint64_t device_bytes = 0;       // counted against the budget (CPU: everything in RAM)
  uint64_t pinned_host_bytes = 0;  // CUDA: pinned + paged host memory
  uint64_t host_bytes = 0;         // CUDA: pageable host memory
  uint64_t lora_params = 0;        // trainable parameters
  CpuArenas arenas;
  Verdict verdict = Verdict::no_budget;
};

// Validates (lora.rank against every target's smaller dimension, data.seq_len
// against max_position_embeddings, train.micro_batch >= 1; errors name the
// key) and plans. Fast: no allocation of the planned buffers, no file access.
MemoryPlan make_plan(const PlanInput& in);
// The longest seq_len this config accepts (max_position_embeddings; times the
// factor of linear rope scaling on CUDA).
int64_t max_seq_len(const PlanInput& in);

// Advice: largest micro-batch and longest seq_len that fit the budget, and
// what each switch would change.
struct PlanSwitch {
  std::string
      name;  // "checkpointing", "paged optimizer", "lower rank", "fewer targets", "shorter sequences", ...
  std::string change;       // "train.checkpointing: false -> true"
  int64_t saved_bytes = 0;  // device bytes saved (negative: costs)
  bool fits_after = false;
};
inline constexpr int64_t kAdviceMaxMicroBatch = 4096;  // the search stops there
struct PlanAdvice {
  int64_t max_micro_batch = 0;  // at this seq_len; 0: not even 1 fits (or no budget)
  int64_t max_seq_len = 0;      // at this micro_batch; 0: not even 2 fits (or no budget)
  std::vector<PlanSwitch> switches;
};
PlanAdvice make_advice(const PlanInput& in);

// Human-readable table by category, device total vs budget and the verdict.
std::string plan_table(const MemoryPlan& p);
std::string advice_text(const MemoryPlan& p, const PlanAdvice& a);
nlohmann::json plan_json(const MemoryPlan& p);
nlohmann::json advice_json(const PlanAdvice& a);
// For the end of a CPU run: planned vs measured arena bytes, one line each.
std::string plan_vs_measured_text(const MemoryPlan& p, const CpuArenas& measured);

// Presets: published config.json files embedded as text, parsed by
// parse_model_config. Unknown name -> Error listing the known ones.
std::vector<std::string> preset_names();
ModelConfig preset_config(std::string_view name);

// "rtx4090", "a100-80", ... or a size ("24GiB", "48GB"; recipe/byte_size.h).
// Anything else -> Error listing the GPU names.
uint64_t gpu_memory_bytes(std::string_view name_or_size);
std::vector<std::pair<std::string, uint64_t>> gpu_table();
// Physical RAM of this machine (the CPU backend's budget when none is given).
uint64_t host_memory_bytes();

// The model of a recipe: model.path (an HF folder, or builtin:NAME, resolved
// with resolve_model_path) or, when the folder has no config.json, the preset
// named by model.preset. Reads only config.json.
ModelConfig model_config_for(const Recipe& r);
// Every setting of the recipe that the plan depends on. backend "auto" plans
// CUDA when device.memory_budget is not "auto", else the CPU; the budget is
// device.memory_budget (0 for "auto": the caller knows the device).
PlanInput plan_input_from_recipe(const Recipe& r, const ModelConfig& cfg);
// A bitsandbytes 4-bit checkpoint in `dir` (safetensors headers and quant
// states only, no weights read) fixes prequantized, quant_type, block and
// double_quant; other folders leave `in` as it is.
void apply_checkpoint_quant(PlanInput& in, const std::filesystem::path& dir);

}  // namespace qlora
