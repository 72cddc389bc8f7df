// The CUDA device model: what the GPU backend allocates per DESIGN.md (bf16
// storage, fp32 statistics, NF4 + double quantization, flash-style attention,
// chunked loss). Measured-on-device constants and kernel assumptions come from
// plan/cuda_constants.h only.
#include <algorithm>

#include "core/error.h"
#include "model/tensor_table.h"
#include "model/weights.h"
#include "plan/cuda_constants.h"
#include "plan/plan_internal.h"

namespace qlora::plan_detail {

using namespace plan_cuda;

namespace {

constexpr uint64_t kBf16 = 2, kF32 = 4;

// Base weights by kind (bytes on the device).
struct BaseBytes {
  uint64_t codes = 0, absmax8 = 0, nested = 0, absmax32 = 0, dense = 0, embed = 0, lm_head = 0, small = 0;
};

BaseBytes base_bytes(const PlanInput& in) {
  BaseBytes b;
  for (const TensorSlot& s : expected_tensors(in.model)) {
    const uint64_t n = uint64_t(shape_numel(s.shape));
    if (s.is_block_linear && in.quantize) {
      const uint64_t blocks = uint64_t(quant4_num_blocks(int64_t(n), in.block));
      b.codes += (n + 1) / 2;
      if (in.double_quant) {
        // As CudaLlamaModel uploads them (model/llama_cuda.cpp): the 8-bit
        // codes, an fp32 scale per 256 blocks and the 256-entry fp32 code book
        // per tensor; the offset is a kernel argument, not device memory.
        b.absmax8 += blocks;
        b.nested += (blocks + kNestedBlock - 1) / kNestedBlock * kF32 + 256 * kF32;
      } else {
        b.absmax32 += blocks * kF32;
      }
    } else if (s.is_block_linear) {
      b.dense += n * kBf16;
    } else if (s.kind == TensorKind::Embed) {
      b.embed += n * kBf16;
    } else if (s.kind == TensorKind::LmHead) {
      b.lm_head += n * kBf16;
    } else {
      b.small += n * kBf16;
    }
  }
  return b;
}

// Host bytes of the weight load (model/weights.h, stream_llama_weights) at its peak.
uint64_t weight_load_in_flight_bytes(const PlanInput& in) {
  uint64_t most = 0;
  for (const TensorSlot& s : expected_tensors(in.model)) {
    const uint64_t n = uint64_t(shape_numel(s.shape));
    // The values as fp32 (read and converted from the file), then the form the
    // device gets, built on the host beside them.
    uint64_t bytes = n * kF32;
    if (s.is_block_linear && in.quantize) {
      const uint64_t blocks = uint64_t(quant4_num_blocks(int64_t(n), in.block));
      bytes += (n + 1) / 2 + blocks * kF32;  // codes, fp32 scales
      if (in.double_quant) bytes += blocks + (blocks + kNestedBlock - 1) / kNestedBlock * kF32 + 256 * kF32;
    } else {
      bytes += n * kBf16;  // rounded for the upload
    }
    most = std::max(most, bytes);
  }
  return most;
}

}  // namespace

void add_cuda_buffers(MemoryPlan& p) {
  const PlanInput& in = p.input;
  const ModelConfig& c = in.model;
  const uint64_t B = uint64_t(in.micro_batch), T = uint64_t(in.seq_len), N = B * T;
  const uint64_t C = uint64_t(c.hidden_size), I = uint64_t(c.intermediate_size), QD = uint64_t(c.q_dim()),
                 KVD = uint64_t(c.kv_dim()), L = uint64_t(c.num_hidden_layers),
                 H = uint64_t(c.num_attention_heads), V = uint64_t(c.vocab_size), D = uint64_t(c.head_dim);
  const uint64_t wide = std::max({C, I, QD});
  uint64_t n_targets = 0;
  // R: the largest rank of any module (the shared LoRA-hidden gradient);
  // sum_R: the LoRA hiddens of one layer, each target at its largest rank.
  uint64_t R = 0, sum_R = 0;
  for (int t = 0; t < kNumLoraTargets; ++t) {
    const uint64_t r = uint64_t(lora_max_rank(c, in.lora, LoraTarget(t)));
    n_targets += in.lora.targets[size_t(t)] ? 1 : 0;
    R = std::max(R, r);
    sum_R += r;
  }
  const std::string qname(quant4_name(in.quant_type));

  // ---- base weights (persistent, device)
  const BaseBytes bb = base_bytes(in);
  const char* cat = "base weights";
  if (in.quantize) {
    add(p, cat, qname + " codes", bb.codes, qname, Lifetime::persistent, Place::device,
        "block linears: n/2 bytes (two 4-bit codes per byte)");
    if (in.double_quant) {
      add(p, cat, "absmax, 8-bit (double quant)", bb.absmax8, "uint8", Lifetime::persistent, Place::device,
          str("one byte per block of ", in.block));
      add(p, cat, "second-level scales + code", bb.nested, "fp32", Lifetime::persistent, Place::device,
          "per tensor: fp32 per 256 blocks + the 256-entry fp32 code book");
    } else {
      add(p, cat, "absmax", bb.absmax32, "fp32", Lifetime::persistent, Place::device,
          str("one fp32 per block of ", in.block));
    }
  } else {
    add(p, cat, "block linears (not quantized)", bb.dense, "bf16", Lifetime::persistent, Place::device,
        "quant.type none: 2 bytes per weight");
  }
  add(p, cat, "embeddings", bb.embed, "bf16", Lifetime::persistent, Place::device, "V x C");
  if (bb.lm_head > 0)
    add(p, cat, "lm_head", bb.lm_head, "bf16", Lifetime::persistent, Place::device, "V x C (untied)");
  add(p, cat, "norms and biases", bb.small, "bf16", Lifetime::persistent, Place::device,
      c.qk_norm ? "(2L+1) x C + 2L x D (q/k norms) + biases" : "(2L+1) x C + biases");

  // ---- LoRA and optimizer
  const uint64_t P = p.lora_params;
  add(p, "LoRA", "LoRA A, B", P * kBf16, "bf16", Lifetime::persistent, Place::device,
      str(P, in.lora.dora ? " params (r x (in + out) + the DoRA magnitude (out) per adapted linear)"
                          : " params (r x (in + out) per adapted linear)"));
  add(p, "LoRA", "LoRA gradients", P * kF32, "fp32", Lifetime::persistent, Place::device,
      "one fp32 per parameter (accumulated over micro-batches in fp32)");
  add(p, "LoRA", "fp32 master copies", P * kF32, "fp32", Lifetime::persistent, Place::device,
      "the optimizer updates these; bf16 weights are cast from them");
  const uint64_t state = optimizer_state_bytes(in.optimizer, size_t(P));
  const std::string oname = str(optimizer_kind_name(in.optimizer.kind), " state");
  if (in.optimizer.kind == OptimizerKind::paged_adamw) {
    add(p, "optimizer", oname + " (paged out)", state, "fp32", Lifetime::persistent, Place::paged,
        str("m and v in pinned host memory, paged in ", kPagedOptimizerPageParams, " params at a time"));
    add(p, "optimizer", oname + " (two pages on the device)", paged_optimizer_device_bytes(int64_t(P)),
        "fp32", Lifetime::persistent, Place::device,
        "two page slots (one updates while the next copies in), m and v of min(page, P) params each");
  } else {
    add(p, "optimizer", oname, state, "fp32", Lifetime::persistent, Place::device,
        in.optimizer.kind == OptimizerKind::sgd ? "momentum buffer when momentum > 0" : "m and v, fp32");
  }

  if (in.optimizer.plus_lr_ratio != 1.0 && n_targets > 0) {
    // engine_cuda: one [begin, end) int64 pair per B (and DoRA magnitude).
    const uint64_t ranges = L * n_targets * (in.lora.dora ? 2 : 1);
    add(p, "optimizer", "LoRA+ ranges", ranges * 16, "int64", Lifetime::persistent, Place::device,
        "where B (and DoRA magnitudes) step at lr x lora.plus_lr_ratio: 2 x int64 per range");
  }

  // ---- activations: one layer's saved set (bf16 tensors, fp32 statistics),
  // as the CPU model's LayerActs.
  // qwen3's q/k norms keep q and k before the norm (bf16) and their rstd (fp32) too.
  const uint64_t KVH = uint64_t(c.num_key_value_heads);
  const uint64_t qk_norm = c.qk_norm ? N * (kBf16 * (QD + KVD) + kF32 * (H + KVH)) : 0;
  // DoRA keeps each adapted linear's row norms (fp32, OUT) with the layer's set.
  uint64_t dora_norms = 0;
  for (int t = 0; t < kNumLoraTargets; ++t)
    if (in.lora.dora && in.lora.targets[size_t(t)])
      dora_norms += kF32 * uint64_t(lora_target_dims(c, LoraTarget(t)).second);
  const uint64_t layer_set =
      N * (kBf16 * (C + QD + 2 * KVD + QD + C + C + 3 * I + sum_R) + kF32 * (1 + H + 1)) + qk_norm + dora_norms;
  const uint64_t outputs = (L + 1) * N * C * kBf16;
  if (in.checkpointing) {
    add(p, "activations", "checkpointed layer inputs", outputs, "bf16", Lifetime::per_step, Place::device,
        "(L+1) x B x T x C");
    add(p, "activations", "recompute working set (one layer)", layer_set, "mixed", Lifetime::per_layer,
        Place::device, "norm outputs, q, k, v, attention out, gate, up, act, LoRA hidden; rstd and lse fp32");
  } else {
    add(p, "activations", "layer outputs", outputs, "bf16", Lifetime::per_step, Place::device,
        "(L+1) x B x T x C");
    add(p, "activations", "saved activations (all layers)", L * layer_set, "mixed", Lifetime::per_step,
        Place::device, "L x one layer's saved set (no checkpointing)");
  }
  const uint64_t bwd =
      N * (kF32 * C + kBf16 * (2 * C + 2 * QD + 2 * KVD + 3 * I + std::max<uint64_t>(R, 1) + 2 * wide));
  add(p, "activations", "backward scratch (one layer)", bwd, "mixed", Lifetime::per_layer, Place::device,
      "residual gradient fp32; gradients of q, k, v, attention, MLP, LoRA hidden bf16");
  if (in.lora.dropout > 0.0)
    add(p, "activations", "LoRA dropout input", N * wide * kBf16, "bf16", Lifetime::per_layer, Place::device,
        "B x T x max(C, I, H x D)");
  if (in.lora.dora)
    add(p, "activations", "DoRA products + norm panel", 2 * N * wide * kBf16 + kDoraPanelRows * wide * kF32,
        "mixed", Lifetime::per_layer, Place::device,
        str("base and LoRA products (B x T x max(C, I, H x D), bf16) and ", kDoraPanelRows,
            " fp32 rows of W + s B A for the norms"));
  add(p, "activations", "final norm + loss rows", N * (C * kBf16 + 3 * kF32), "mixed", Lifetime::per_step,
      Place::device, "normed output bf16; rstd, loss, lse fp32");
  // A sliding window adds the first visible key of each token (int32).
  add(p, "activations", "batch + rope tables", N * (c.sliding_window ? 4 : 3) * 4 + T * D * kF32, "mixed",
      Lifetime::per_step, Place::device,
      c.sliding_window ? "tokens, targets, positions, window starts int32; cos, sin fp32"
                       : "tokens, targets, positions int32; cos, sin fp32");

  // ---- workspaces
  add(p, "workspace", "attention workspace", N * H * kF32 + N * QD * kF32, "fp32", Lifetime::per_layer,
      Place::device, "flash-style, no T x T matrix: D per head + fp32 dq accumulator");
  const uint64_t vchunk = std::min<uint64_t>(V, uint64_t(kCeVocabChunk));
  add(p, "workspace", "cross-entropy chunk", N * vchunk * kF32, "fp32", Lifetime::per_chunk, Place::device,
      str("B x T x ", vchunk, " logits tile; the full vocabulary (", V, ") is never materialized"));
  if (in.quantize)
    add(p, "workspace", "dequantization scratch", kAssumedSms * kDequantTileBytes, "bf16",
        Lifetime::per_layer, Place::device,
        str("fused NF4 GEMM: one 128 x 256 bf16 tile per SM, ", kAssumedSms, " SMs assumed"));
  add(p, "workspace", "cuBLAS workspace", kCublasWorkspaceBytes, "uint8", Lifetime::persistent, Place::device,
      "NVIDIA's recommendation for Hopper");

  // ---- runtime: context, then the allocator's share of everything above
  uint64_t device = 0;
  for (const PlanBuffer& b : p.buffers)
    if (b.place == Place::device) device += b.bytes;
  add(p, "runtime", "CUDA context", kContextBytes, "-", Lifetime::persistent, Place::device,
      "to be calibrated on a device (plan/cuda_constants.h)");
  const uint64_t reserve =
      std::max(kAllocatorReserveMinBytes, uint64_t(double(device) * kAllocatorReserveFraction));
  add(p, "runtime", "allocator reserve", reserve, "-", Lifetime::persistent, Place::device,
      str(kAllocatorReserveFraction * 100, "% of the buffers, at least ", kAllocatorReserveMinBytes >> 20,
          " MiB; to be calibrated"));

  // ---- host
  // The weights stream from the folder to the device one tensor at a time
  // (stream_llama_weights): no host copy of the model, only the tensor in
  // flight, freed before the next is read.
  add(p, "host", "weight load: one tensor in flight", weight_load_in_flight_bytes(in), "mixed", Lifetime::load,
      Place::host, "the largest tensor as fp32 + its 4-bit codes and scales (bf16 copy when not 4-bit)");
  add(p, "host", "batch staging", 2 * N * 3 * 4, "int32", Lifetime::persistent, Place::pinned_host,
      "tokens, targets, positions, double-buffered");
}

}  // namespace qlora::plan_detail
