#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "core/error.h"
#include "io/gguf.h"
#include "model/builtin.h"
#include "plan/plan.h"
#include "recipe/recipe.h"

namespace qlora::cli {

namespace {

struct Args {
  std::string recipe, model, gpu, backend, quant, optimizer, targets, checkpointing;
  std::vector<std::string> overrides;  // key.path=value, as `qlora run` takes them
  int64_t seq = 0, batch = 0, rank = 0, block = 0, dataset_tokens = -1;
  bool json = false;
};

// --model: a preset name, builtin:NAME, a folder with config.json, or a GGUF file.
std::pair<ModelConfig, std::filesystem::path> model_from_arg(const std::string& m) {
  for (const auto& n : preset_names())
    if (m == n) return {preset_config(m), {}};
  const std::filesystem::path dir = resolve_model_path(m);
  std::error_code ec;
  if (std::filesystem::is_regular_file(dir / "config.json", ec) || is_gguf_file(dir))
    return {load_model_config(dir), dir};
  std::string known;
  for (const auto& n : preset_names()) known += str(known.empty() ? "" : ", ", n);
  fail(
      "--model: '", m,
      "' is neither a model folder with config.json, a GGUF file nor a known preset; known presets: ", known);
}

std::array<bool, kNumLoraTargets> parse_targets(const std::string& s) {
  std::array<bool, kNumLoraTargets> t{};
  if (s == "all-linear") {
    t.fill(true);
    return t;
  }
  if (s == "attention") {
    for (LoraTarget x : {LoraTarget::Q, LoraTarget::K, LoraTarget::V, LoraTarget::O}) t[size_t(x)] = true;
    return t;
  }
  std::stringstream ss(s);
  for (std::string name; std::getline(ss, name, ',');) {
    bool found = false;
    for (int i = 0; i < kNumLoraTargets; ++i)
      if (name == lora_target_module(LoraTarget(i))) t[size_t(i)] = found = true;
    if (!found)
      fail("--targets: unknown module '", name,
           "'; expected all-linear, attention or a comma list of "
           "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj");
  }
  return t;
}

bool parse_bool(const std::string& s, const char* what) {
  if (s == "on" || s == "true" || s == "1") return true;
  if (s == "off" || s == "false" || s == "0") return false;
  fail(what, ": expected on or off, got '", s, "'");
}

PlanInput make_input(const Args& a) {
  PlanInput in;
  // A recipe, or the recipe defaults (on the CPU unless a GPU is named);
  // --model replaces the recipe's model.
  if (a.recipe.empty() && !a.overrides.empty()) fail("key.path=value overrides need a RECIPE");
  const Recipe r = a.recipe.empty() ? Recipe{} : load_recipe(a.recipe, a.overrides);
  if (a.recipe.empty() && a.model.empty()) fail("give a RECIPE or --model DIR|PRESET");
  if (a.model.empty()) {
    in = plan_input_from_recipe(r, model_config_for(r));
    apply_checkpoint_quant(in, resolve_model_path(r.model.path));
  } else {
    const auto [cfg, dir] = model_from_arg(a.model);
    in = plan_input_from_recipe(r, cfg);
    in.model_name = a.model;
    if (!dir.empty()) apply_checkpoint_quant(in, dir);
  }
  if (a.seq > 0) in.seq_len = a.seq;
  if (a.batch > 0) in.micro_batch = a.batch;
  if (a.rank > 0) in.lora.rank = a.rank;
  if (a.block > 0) in.block = a.block;
  if (!a.targets.empty()) in.lora.targets = parse_targets(a.targets);
  if (a.checkpointing == "auto") {
    in.checkpointing_auto = true;
  } else if (!a.checkpointing.empty()) {
    in.checkpointing = parse_bool(a.checkpointing, "--checkpointing");
    in.checkpointing_auto = false;
  }
  if (!a.optimizer.empty()) in.optimizer.kind = parse_optimizer_kind(a.optimizer);
  if (!a.quant.empty()) {
    if (a.quant == "none") {
      in.quantize = false;
    } else if (const auto t = quant4_from_name(a.quant)) {
      in.quantize = true;
      in.quant_type = *t;
    } else {
      fail("--quant: expected nf4, fp4 or none, got '", a.quant, "'");
    }
  }
  if (a.dataset_tokens >= 0) {
    in.dataset_tokens = uint64_t(a.dataset_tokens);
    in.dataset_tokens_estimated = false;
  }
  if (!a.gpu.empty()) {
    in.backend = PlanBackend::cuda;
    in.budget_bytes = gpu_memory_bytes(a.gpu);
  }
  if (a.backend == "cpu") {
    in.backend = PlanBackend::cpu;
  } else if (a.backend == "cuda") {
    in.backend = PlanBackend::cuda;
  } else if (!a.backend.empty()) {
    fail("--backend: expected cpu or cuda, got '", a.backend, "'");
  }
  if (in.backend == PlanBackend::cpu && in.budget_bytes == 0) in.budget_bytes = host_memory_bytes();
  return in;
}

Runner add_estimate(CLI::App& app) {
  std::string gpus;
  for (const auto& [name, bytes] : gpu_table()) gpus += (gpus.empty() ? "" : ", ") + name;
  std::string presets;
  for (const auto& n : preset_names()) presets += (presets.empty() ? "" : ", ") + n;
  auto* cmd = app.add_subcommand(
      "estimate", "Plan the memory of a fine-tune: every buffer, device total vs budget, verdict and advice");
  auto a = std::make_shared<Args>();
  cmd->add_option("recipe", a->recipe, "Recipe YAML (optional with --model)");
  cmd->add_option("overrides", a->overrides, "Recipe overrides key.path=value, e.g. data.seq_len=4096");
  cmd->add_option("--model", a->model, "Model folder, builtin:tiny, or a preset: " + presets);
  cmd->add_option("--gpu", a->gpu, "GPU name (" + gpus + ") or memory size (24GiB, 48GB); plans CUDA");
  cmd->add_option("--backend", a->backend, "cpu or cuda (default: cuda with --gpu, else the recipe's)");
  cmd->add_option("--seq", a->seq, "data.seq_len")->check(CLI::PositiveNumber);
  cmd->add_option("--batch", a->batch, "train.micro_batch")->check(CLI::PositiveNumber);
  cmd->add_option("--rank", a->rank, "lora.rank")->check(CLI::PositiveNumber);
  cmd->add_option("--targets", a->targets, "lora.targets: all-linear, attention or q_proj,v_proj,...");
  cmd->add_option("--quant", a->quant, "quant.type: nf4, fp4 or none");
  cmd->add_option("--block", a->block, "quant.block_size")->check(CLI::PositiveNumber);
  cmd->add_option("--optimizer", a->optimizer, "train.optimizer: adamw, paged_adamw or sgd");
  cmd->add_option("--checkpointing", a->checkpointing, "train.checkpointing: on, off or auto (off when the run without it fits)");
  cmd->add_option("--dataset-tokens", a->dataset_tokens, "Tokens of the tokenized dataset (host memory)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_flag("--json", a->json, "Machine-readable output (same content)");
  return [a]() {
    const PlanInput in = make_input(*a);
    const MemoryPlan plan = make_plan(in);
    const PlanAdvice advice = make_advice(in);
    std::string out;
    if (a->json) {
      nlohmann::json j = plan_json(plan);
      j["advice"] = advice_json(advice);
      out = j.dump(2) + "\n";
    } else {
      out = plan_table(plan) + "\n" + advice_text(plan, advice);
    }
    std::fwrite(out.data(), 1, out.size(), stdout);
    return 0;
  };
}

const CommandRegistration kRegistered(15, add_estimate);

}  // namespace

}  // namespace qlora::cli
