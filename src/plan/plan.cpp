// make_plan: validation, the device model's buffers, totals and the verdict.
#include "plan/plan.h"

#include <algorithm>

#include "core/error.h"
#include "plan/plan_internal.h"

namespace qlora {

namespace plan_detail {

uint64_t lora_param_count(const ModelConfig& cfg, const LoraConfig& lc) {
  const std::vector<LoraModuleParams> mp = lora_module_params(cfg, lc);
  uint64_t n = 0;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t)
      if (lc.targets[size_t(t)]) {
        const auto [in, out] = lora_target_dims(cfg, LoraTarget(t));
        const uint64_t r = uint64_t(mp[size_t(l * kNumLoraTargets + t)].rank);
        n += r * uint64_t(in + out) + (lc.dora ? uint64_t(out) : 0);  // A, B (+ DoRA magnitude)
      }
  return n;
}

void add(MemoryPlan& p, std::string category, std::string name, uint64_t bytes, std::string dtype,
         Lifetime lifetime, Place place, std::string note) {
  p.buffers.push_back(
      {std::move(category), std::move(name), bytes, std::move(dtype), lifetime, place, std::move(note)});
}

// Packed rows hold ids, labels and position ids (int32 each); the tokenized
// samples (ids + labels) they were packed from are alive at the same time.
void add_dataset_buffer(MemoryPlan& p) {
  const PlanInput& in = p.input;
  if (in.dataset_tokens == 0) return;
  constexpr uint64_t kBytesPerToken = 3 * 4 + 2 * 4;
  add(p, "host", "tokenized dataset", in.dataset_tokens * kBytesPerToken, "int32", Lifetime::persistent,
      Place::host,
      str(in.dataset_tokens, in.dataset_tokens_estimated ? " tokens (estimated from file sizes)" : " tokens",
          " x 20 bytes (packed ids, labels, positions + tokenized samples)"));
}

}  // namespace plan_detail

const char* plan_backend_name(PlanBackend b) {
  return b == PlanBackend::cuda ? "cuda" : "cpu";
}

const char* lifetime_name(Lifetime l) {
  switch (l) {
    case Lifetime::persistent:
      return "persistent";
    case Lifetime::per_step:
      return "per step";
    case Lifetime::per_layer:
      return "per layer";
    case Lifetime::per_chunk:
      return "per chunk";
    case Lifetime::load:
      return "load";
  }
  return "?";
}

const char* place_name(Place p) {
  switch (p) {
    case Place::device:
      return "device";
    case Place::pinned_host:
      return "pinned host";
    case Place::paged:
      return "paged (pinned host)";
    case Place::host:
      return "host";
  }
  return "?";
}

const char* verdict_name(Verdict v) {
  switch (v) {
    case Verdict::fits:
      return "fits";
    case Verdict::fits_with_paging:
      return "fits with paging";
    case Verdict::does_not_fit:
      return "does not fit";
    case Verdict::no_budget:
      return "no budget";
  }
  return "?";
}

WeightLoadOptions weight_load_options(const PlanInput& in) {
  WeightLoadOptions o;
  o.quantize = in.quantize;
  o.type = in.quant_type;
  o.block = in.block;
  o.double_quant = in.double_quant;
  return o;
}

LlamaRunOptions llama_run_options(const PlanInput& in) {
  LlamaRunOptions o;
  o.checkpointing = in.checkpointing;
  o.ce = in.ce;
  return o;
}

namespace {

int64_t max_positions(const PlanInput& in) {
  const ModelConfig& c = in.model;
  // Older linearly scaled configs keep the original max_position_embeddings;
  // the CPU model refuses anything beyond it, so only CUDA plans stretch it.
  if (in.backend == PlanBackend::cuda && c.rope_scaling.type == RopeScalingType::Linear)
    return int64_t(double(c.max_position_embeddings) * c.rope_scaling.factor);
  return c.max_position_embeddings;
}

}  // namespace

int64_t max_seq_len(const PlanInput& in) { return max_positions(in); }

namespace {

void validate(const PlanInput& in) {
  const ModelConfig& c = in.model;
  if (in.micro_batch < 1) fail("train.micro_batch: must be at least 1, got ", in.micro_batch);
  if (in.seq_len < 2) fail("data.seq_len: must be at least 2, got ", in.seq_len);
  const int64_t max_t = max_positions(in);
  if (in.seq_len > max_t) {
    if (c.rope_scaling.type == RopeScalingType::None)
      fail("data.seq_len: ", in.seq_len, " exceeds the model's max_position_embeddings ",
           c.max_position_embeddings, " and config.json has no rope_scaling to extend it");
    fail("data.seq_len: ", in.seq_len, " exceeds the longest sequence the model allows, ", max_t,
         " (max_position_embeddings ", c.max_position_embeddings, ", rope_scaling ",
         rope_scaling_name(c.rope_scaling.type), ")");
  }
  if (in.lora.rank < 1) fail("lora.rank: must be at least 1, got ", in.lora.rank);
  std::vector<LoraModuleParams> mp;
  try {
    mp = lora_module_params(c, in.lora);
  } catch (const Error& e) {
    fail("lora.", e.what());  // "lora.rank_pattern key 'x' matches no module ..."
  }
  bool any = false;
  for (int t = 0; t < kNumLoraTargets; ++t) {
    if (!in.lora.targets[size_t(t)]) continue;
    any = true;
    const auto [d_in, d_out] = lora_target_dims(c, LoraTarget(t));
    const int64_t smaller = std::min(d_in, d_out);
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      const int64_t r = mp[size_t(l * kNumLoraTargets + t)].rank;
      if (r > smaller)
        fail(r == in.lora.rank ? "lora.rank: " : "lora.rank_pattern: ", r,
             " is larger than the smaller dimension (", smaller, ") of ", lora_module_name(l, LoraTarget(t)),
             " [in ", d_in, ", out ", d_out, "]");
    }
  }
  if (!any) fail("lora.targets: no target module; expected at least one of q_proj ... down_proj");
  if (in.quantize && !in.prequantized && !valid_block4(in.block))
    fail("quant.block_size: ", in.block, " is not a valid 4-bit block size (a power of two, 32..4096)");
}

MemoryPlan plan_buffers(const PlanInput& in) {
  MemoryPlan p;
  p.input = in;
  p.lora_params = plan_detail::lora_param_count(in.model, in.lora);
  if (in.backend == PlanBackend::cpu) {
    plan_detail::add_cpu_buffers(p);
  } else {
    plan_detail::add_cuda_buffers(p);
  }
  plan_detail::add_dataset_buffer(p);
  for (const PlanBuffer& b : p.buffers) {
    // The CPU backend's device is host RAM: everything counts against its budget.
    if (in.backend == PlanBackend::cpu || b.place == Place::device) {
      p.device_bytes += b.bytes;
    } else if (b.place == Place::host) {
      p.host_bytes += b.bytes;
    } else {
      p.pinned_host_bytes += b.bytes;
    }
  }
  return p;
}

// train.checkpointing: auto (PlanInput::checkpointing_auto).
bool auto_checkpointing(PlanInput x) {
  if (x.budget_bytes == 0) return true;
  x.checkpointing = false;
  return double(plan_buffers(x).device_bytes) > kAutoCheckpointingShare * double(x.budget_bytes);
}

}  // namespace

MemoryPlan make_plan(const PlanInput& request) {
  validate(request);
  PlanInput in = request;
  if (in.checkpointing_auto) in.checkpointing = auto_checkpointing(in);
  MemoryPlan p = plan_buffers(in);
  if (in.budget_bytes == 0) {
    p.verdict = Verdict::no_budget;
  } else if (p.device_bytes > in.budget_bytes) {
    p.verdict = Verdict::does_not_fit;
  } else {
    p.verdict = Verdict::fits;
    // "With paging" when the paged optimizer state is what makes it fit.
    if (in.backend == PlanBackend::cuda && in.optimizer.kind == OptimizerKind::paged_adamw) {
      PlanInput unpaged = in;
      unpaged.optimizer.kind = OptimizerKind::adamw;
      if (plan_buffers(unpaged).device_bytes > in.budget_bytes) p.verdict = Verdict::fits_with_paging;
    }
  }
  return p;
}

}  // namespace qlora
