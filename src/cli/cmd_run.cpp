// qlora run RECIPE [key.path=value ...] [--resume] [--overwrite]
#include <atomic>
#include <csignal>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "recipe/recipe.h"
#include "train/trainer.h"

namespace qlora::cli {

namespace {

std::atomic<bool> g_interrupt{false};
std::atomic<int> g_signal{0};

// What stops a run politely: Ctrl-C, and what kill, systemd and SLURM send
// (SIGTERM) or a closed terminal (SIGHUP).
constexpr int kStopSignals[] = {SIGINT, SIGTERM, SIGHUP};

// The first of them: finish the step, write a checkpoint, exit with 128 +
// the signal. Any second one falls back to the default action (the run is
// killed; at most the steps since the last checkpoint are lost).
extern "C" void on_stop_signal(int sig) {
  g_signal.store(sig);
  g_interrupt.store(true);
  for (int s : kStopSignals) std::signal(s, SIG_DFL);
}

struct RunArgs {
  std::string recipe;
  std::vector<std::string> overrides;
  bool resume = false, overwrite = false, no_samples = false;
};

Runner add_run(CLI::App& app) {
  auto a = std::make_shared<RunArgs>();
  auto* cmd =
      app.add_subcommand("run", "Fine-tune as a recipe says: quantize, tokenize, train, checkpoint, report");
  cmd->add_option("recipe", a->recipe, "Recipe YAML file (docs/recipes.md)")->required();
  cmd->add_option("overrides", a->overrides, "Overrides key.path=value, e.g. train.lr=1e-4 lora.rank=16");
  cmd->add_flag("--resume", a->resume, "Continue from the newest valid checkpoint in output.dir");
  cmd->add_flag("--overwrite", a->overwrite, "Replace the run in output.dir");
  cmd->add_flag("--no-samples", a->no_samples, "Skip the sample generations before and after training");
  return [a]() {
    const Recipe r = load_recipe(a->recipe, a->overrides);
    RunOptions o;
    o.resume = a->resume;
    o.overwrite = a->overwrite;
    o.samples = !a->no_samples;
    o.interrupt = &g_interrupt;
    for (int sig : kStopSignals) std::signal(sig, on_stop_signal);
    const RunSummary s = run_recipe(r, o);
    for (int sig : kStopSignals) std::signal(sig, SIG_DFL);
    // The shell's code for "ended by that signal": 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP.
    if (s.interrupted) return 128 + (g_signal.load() ? g_signal.load() : SIGINT);
    std::printf("trained %lld steps: loss %.4f -> %.4f", (long long)(s.steps_done - s.start_step),
                s.first_loss, s.last_loss);
    if (s.first_val_loss && s.last_val_loss)
      std::printf(", val loss %.4f -> %.4f", *s.first_val_loss, *s.last_val_loss);
    std::printf("\n");
    return 0;
  };
}

const CommandRegistration kRegistered(10, add_run);

}  // namespace

}  // namespace qlora::cli
