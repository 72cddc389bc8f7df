// `qlora run`: a recipe from start to trained adapter (DESIGN.md, data flow):
// output folder check -> model config -> memory plan (refuse early) -> base
// weights -> tokenized, packed data -> LoRA init or adapter -> step loop
// (micro-batches with token-weighted gradient accumulation, clipping,
// optimizer, schedule, eval, atomic checkpoints) -> PEFT adapter, metrics and
// report.
//
// Determinism: the data order, the LoRA dropout masks and every update are
// functions of (recipe, step), so a run resumed from the checkpoint of step N
// ends bit-identical to one that never stopped (on the CPU).
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <optional>

#include "recipe/recipe.h"

namespace qlora {

struct RunOptions {
  bool resume = false;     // continue from the newest valid checkpoint in output.dir
  bool overwrite = false;  // replace the run in output.dir
  // Set asynchronously (Ctrl-C): the current step finishes, a checkpoint is
  // written and the run returns with interrupted = true.
  const std::atomic<bool>* interrupt = nullptr;
  int64_t stop_after_step = 0;  // > 0: behave as if interrupted after this step (tests)
  std::FILE* out = stdout;      // plain log lines and messages
  std::optional<bool> live;     // live progress line; default: stderr is a terminal
  bool samples = true;          // generate logging.sample_prompts before and after
};

struct RunSummary {
  std::filesystem::path output_dir, adapter_dir;  // adapter_dir empty when interrupted
  int64_t start_step = 0, steps_done = 0, total_steps = 0;
  double first_loss = 0, last_loss = 0;
  std::optional<double> first_val_loss, last_val_loss;
  bool interrupted = false;
  bool resumed = false;
};

RunSummary run_recipe(const Recipe& recipe, const RunOptions& options);

}  // namespace qlora
