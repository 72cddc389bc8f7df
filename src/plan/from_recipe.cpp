// Recipe -> planner input: the model's config (folder, builtin:NAME or
// preset), every setting the plan depends on, and the quantization of a
// 4-bit checkpoint read from its safetensors headers.
#include <filesystem>
#include <system_error>

#include "core/error.h"
#include "io/gguf.h"
#include "model/builtin.h"
#include "plan/plan.h"
#include "quant/bnb_layout.h"

namespace qlora {

namespace {

bool has_weights(const std::filesystem::path& dir) {
  std::error_code ec;
  return std::filesystem::is_regular_file(dir / "model.safetensors", ec) ||
         std::filesystem::is_regular_file(dir / "model.safetensors.index.json", ec);
}

// Rough token count of the data files: one token per 3 bytes of JSON (an
// overestimate for English chat data, which is what a memory plan wants).
uint64_t estimated_tokens(const Recipe& r) {
  uint64_t bytes = 0;
  std::error_code ec;
  for (const auto* files : {&r.data.train, &r.data.val})
    for (const std::string& f : *files) {
      const auto n = std::filesystem::file_size(f, ec);
      if (!ec) bytes += n;
    }
  return bytes / 3;
}

}  // namespace

ModelConfig model_config_for(const Recipe& r) {
  const std::filesystem::path dir = resolve_model_path(r.model.path);
  std::error_code ec;
  if (std::filesystem::is_regular_file(dir / "config.json", ec) || is_gguf_file(dir))
    return load_model_config(dir);
  if (!r.model.preset.empty()) return preset_config(r.model.preset);
  std::string known;
  for (const auto& n : preset_names()) known += str(known.empty() ? "" : ", ", n);
  fail("model.path: ", dir.string(),
       " has no config.json (and is no GGUF file); to plan without the model files set model.preset to one "
       "of ",
       known);
}

PlanInput plan_input_from_recipe(const Recipe& r, const ModelConfig& cfg) {
  PlanInput in;
  in.model = cfg;
  in.model_name = r.model.path.empty() ? r.model.preset : r.model.path;
  if (r.quant.type == "none") {
    in.quantize = false;
  } else if (const auto t = quant4_from_name(r.quant.type)) {
    in.quant_type = *t;
  } else {
    fail("quant.type: unknown '", r.quant.type, "', expected nf4, fp4 or none");
  }
  in.block = r.quant.block_size;
  in.double_quant = r.quant.double_quant;

  in.lora.rank = r.lora.rank;
  in.lora.alpha = r.lora.alpha;
  in.lora.dropout = r.lora.dropout;
  in.lora.rslora = r.lora.rslora;
  in.lora.rank_pattern = r.lora.rank_pattern;
  in.lora.alpha_pattern = r.lora.alpha_pattern;
  in.lora.dora = r.lora.dora;
  in.lora.seed = r.train.seed;
  in.lora.targets.fill(false);
  for (const std::string& name : r.lora.targets) {
    bool found = false;
    for (int t = 0; t < kNumLoraTargets; ++t)
      if (name == lora_target_module(LoraTarget(t))) {
        in.lora.targets[size_t(t)] = true;
        found = true;
      }
    if (!found)
      fail("lora.targets: unknown module '", name,
           "', expected q_proj, k_proj, v_proj, o_proj, gate_proj, "
           "up_proj or down_proj");
  }

  // llama.cpp's LoRA adapter GGUF has no place for DoRA's magnitudes (its
  // convert_lora_to_gguf.py stops at any tensor but lora_A/lora_B, and
  // llama-adapter.cpp throws on other suffixes).
  if (r.lora.dora && r.output.gguf)
    fail("output.gguf: llama.cpp's LoRA adapter format cannot hold DoRA (lora.dora: true); merge it instead "
         "(qlora merge -o model.gguf: DoRA applied to the weights), or set lora.dora: false");

  in.seq_len = r.data.seq_len;
  in.micro_batch = r.train.micro_batch;
  in.checkpointing = r.train.checkpointing;
  in.checkpointing_auto = r.train.checkpointing_auto;
  in.optimizer.kind = parse_optimizer_kind(r.train.optimizer);
  in.optimizer.beta1 = r.train.beta1;
  in.optimizer.beta2 = r.train.beta2;
  in.optimizer.eps = r.train.eps;
  in.optimizer.weight_decay = r.train.weight_decay;
  in.optimizer.momentum = r.train.momentum;
  in.optimizer.plus_lr_ratio = r.lora.plus_lr_ratio;

  const bool budget_given = r.device.memory_budget != "auto";
  if (r.device.backend == "cpu") {
    in.backend = PlanBackend::cpu;
  } else if (r.device.backend == "cuda") {
    in.backend = PlanBackend::cuda;
  } else {
    in.backend = budget_given ? PlanBackend::cuda : PlanBackend::cpu;
  }
  if (budget_given) {
    try {
      in.budget_bytes = gpu_memory_bytes(r.device.memory_budget);
    } catch (const Error& e) {
      fail("device.memory_budget: ", e.what());
    }
  }
  in.dataset_tokens = estimated_tokens(r);
  in.dataset_tokens_estimated = true;
  return in;
}

void apply_checkpoint_quant(PlanInput& in, const std::filesystem::path& dir) {
  if (!has_weights(dir)) return;
  const SafetensorsModel m(dir);
  const std::vector<std::string> bnb = bnb_quantized_weights(m);
  if (bnb.empty()) return;
  const BnbQuantState s = check_bnb_weight(m, bnb.front());
  in.prequantized = true;
  in.quant_type = s.type;
  in.block = s.block;
  in.double_quant = s.nested;
}

}  // namespace qlora
