// The steps of `qlora run` before the first training step, in DESIGN.md's
// order: output folder (fresh, resumed or replaced) -> model config -> memory
// plan (refuse early) -> tokenizer and data -> base weights. Kept apart from
// the step loop (trainer.cpp) so each reads on its own.
#pragma once

#include <cstdio>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>

#include "data/chat_template.h"
#include "data/pipeline.h"
#include "model/lora.h"
#include "model/weights.h"
#include "plan/plan.h"
#include "recipe/recipe.h"
#include "tokenizer/tokenizer.h"

namespace qlora {

struct RunSetup {
  std::filesystem::path output_dir;
  std::filesystem::path model_dir;  // resolved (builtin:NAME -> its cache folder)
  std::string base_name;            // adapter_config's base_model_name_or_path
  std::string fingerprint;          // base_model_fingerprint(model_dir)
  std::optional<std::filesystem::path> resume_from;
  MemoryPlan plan;
  std::unique_ptr<Tokenizer> tokenizer;
  std::optional<ChatTemplate> chat_template;
  PreparedData data;
  std::string data_statistics;
  // The base weights on the CPU backend; on CUDA only weights.cfg (the folder
  // checked, its tensors left for the engine to stream to the device).
  LlamaWeights weights;
  WeightLoadOptions weight_options;  // the plan's (weight_load_options(plan.input))
  // The LoRA, optimizer and model options are the plan's (plan.input), so
  // the arenas the run allocates are the planned ones.
};

// Everything up to the step loop; prints the plan and the data statistics to
// `out`. Throws qlora::Error (nothing is loaded) when the output folder holds
// another run and neither resume nor overwrite is set, or the plan does not
// fit the memory budget.
RunSetup open_run(const Recipe& r, bool resume, bool overwrite, std::FILE* out);

// DataSpec from the recipe's data section (+ train.seed, the cache folder).
DataSpec data_spec_from(const Recipe& r);

}  // namespace qlora
