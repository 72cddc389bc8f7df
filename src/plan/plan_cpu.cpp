// The CPU device model: the exact arenas of this codebase, each measured by
// the layout function its constructor runs (no formula repeated here), plus
// the few allocations outside arenas.
#include <omp.h>

#include <algorithm>

#include "core/error.h"
#include "kernels/ops.h"
#include "model/tensor_table.h"
#include "plan/plan_internal.h"

namespace qlora::plan_detail {

namespace {

// kernels/cpu/linear_nf4.cpp: 4-bit weights are dequantized panel by panel
// (1M floats, at least one row) into a thread-local buffer of the calling
// thread that grows to the largest panel.
constexpr int64_t kPanelFloats = int64_t(1) << 20;

}  // namespace

void add_cpu_buffers(MemoryPlan& p) {
  const PlanInput& in = p.input;
  const ModelConfig& c = in.model;
  const WeightLoadOptions wopt = weight_load_options(in);
  const std::string quant = in.quantize ? str(quant4_name(in.quant_type), " block ", in.block) : "dense";

  p.arenas.weights = base_weight_arena_bytes(c, wopt);
  add(p, "base weights", "base weights arena", p.arenas.weights, in.quantize ? "mixed" : "fp32",
      Lifetime::persistent, Place::host,
      in.quantize
          ? str("block linears ", quant, ": codes n/2 + one fp32 scale per block",
                in.double_quant ? " + the double-quantized form it decodes from (kept for the GPU)" : "",
                "; embeddings, lm_head, norms, biases fp32")
          : "every tensor fp32");

  const LoraWeights::ArenaBytes lb = LoraWeights::arena_bytes(c, in.lora);
  p.arenas.lora_params = lb.params;
  p.arenas.lora_grads = lb.grads;
  add(p, "LoRA", "LoRA A, B (their own fp32 master)", lb.params, "fp32", Lifetime::persistent, Place::host,
      str(p.lora_params, " params x 4 bytes + 64-byte alignment per tensor"));
  add(p, "LoRA", "LoRA gradients", lb.grads, "fp32", Lifetime::persistent, Place::host,
      "same layout as A, B");

  p.arenas.optimizer = optimizer_state_bytes(in.optimizer, lb.params / sizeof(float));
  add(p, "optimizer", str(optimizer_kind_name(in.optimizer.kind), " state"), p.arenas.optimizer, "fp32",
      Lifetime::persistent, Place::host,
      in.optimizer.kind == OptimizerKind::sgd
          ? "momentum buffer when momentum > 0"
          : "m and v, one fp32 each per parameter (nothing pages on the CPU)");

  p.arenas.activations =
      uint64_t(LlamaModel::arena_bytes(c, &in.lora, in.micro_batch, in.seq_len, llama_run_options(in)));
  add(p, "activations", "activation arena", p.arenas.activations, "fp32", Lifetime::per_step, Place::host,
      str(in.checkpointing ? "layer inputs (L+1) x B x T x C + one layer's saved set"
                           : "every layer's saved set + layer outputs",
          ", backward scratch, loss tile ", in.ce.rows, " x ", in.ce.vchunk, " (never the full vocabulary)"));

  // Outside the arenas: the dequantization panel, and while loading one
  // tensor as fp32 plus its quantized copy.
  int64_t panel = 0, largest = 0;
  for (const TensorSlot& s : expected_tensors(c)) {
    const int64_t n = shape_numel(s.shape);
    largest = std::max(largest, n);
    if (s.is_block_linear) {
      const int64_t rows = std::max<int64_t>(1, std::min(s.shape[0], kPanelFloats / s.shape[1]));
      panel = std::max(panel, rows * s.shape[1]);
    }
  }
  if (in.quantize)
    add(p, "workspace", "dequantization panel (thread-local)", uint64_t(panel) * 4, "fp32",
        Lifetime::per_layer, Place::host, "largest panel of 1M floats (at least one row) of a 4-bit linear");
  const uint64_t threads = uint64_t(std::max(1, omp_get_max_threads()));
  add(p, "workspace", "attention score tiles (thread-local)",
      threads * 2 * uint64_t(ops::attention_scratch_floats(in.seq_len)) * 4, "fp32", Lifetime::per_layer,
      Place::host, str("two tiles of ", ops::attention_scratch_floats(in.seq_len), " floats per OpenMP thread (",
                       threads, ")"));
  const uint64_t load =
      uint64_t(largest) * 4 + (in.quantize ? uint64_t(largest) / 2 + uint64_t(largest) / 8 : 0);
  add(p, "host", "weight load: one tensor in flight", load, "fp32", Lifetime::load, Place::host,
      "the largest tensor as fp32 (+ its 4-bit codes and scales); the safetensors mapping is page cache");
}

}  // namespace qlora::plan_detail
