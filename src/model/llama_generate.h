// Inference with a KV cache: prefill a prompt, then one token per step.
// Greedy at temperature 0, else softmax(logits / temperature) with top-p.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "core/arena.h"
#include "model/lora.h"
#include "model/token_generator.h"
#include "model/weights.h"

namespace qlora {

class LlamaGenerator final : public TokenGenerator {
 public:
  // Cache and activations for up to max_seq tokens (prompt + generated),
  // sized here; max_seq beyond max_position_embeddings throws. lora_rank
  // reserves room for adapters up to that rank (set_lora), beyond lora's own.
  LlamaGenerator(const LlamaWeights& w, const LoraWeights* lora, int64_t max_seq, int64_t lora_rank = 0);
  // Appends T tokens to the sequence and writes the logits (V) of the last one.
  void feed(const int32_t* tokens, int64_t T, float* logits) override;
  int64_t length() const override { return past_; }
  int64_t capacity() const override { return max_seq_; }
  void reset() { past_ = 0; }
  // Empties the sequence and applies `lora` (unmerged; nullptr = the base
  // alone) from now on: one generator, its cache allocated once, serves any
  // adapter of rank up to the one reserved. Throws past that rank.
  void set_lora(const LoraWeights* lora);
  // The bytes of its cache and activations.
  size_t arena_bytes() const { return arena_.capacity(); }
  // The same, before building one: what a server plans per concurrent generation.
  static size_t arena_bytes(const ModelConfig& cfg, int64_t max_seq, int64_t lora_rank);

 private:
  void project(float* out, const float* inp, const ops::LinearWeight& w, const float* bias, int64_t l, LoraTarget t,
               int64_t T);
  const LlamaWeights& w_;
  const LoraWeights* lora_;
  ModelConfig cfg_;
  int64_t max_seq_, past_ = 0, lora_rank_ = 1;
  Arena arena_;
  float *kcache_, *vcache_;  // (L, S, KVH*D)
  float *x_, *ln_, *q_, *k_, *v_, *att_, *tmp_, *gate_, *up_, *h_, *cos_, *sin_;
  float *qk_raw_, *qk_rstd_;  // qk_norm only (else null): a projection before its per-head norm, and the rstd
  int32_t* pos_;
  // DoRA adapters only (else empty): the row norm ||W + s B A|| of every
  // adapted module, computed when the adapter is set (it is fixed while
  // generating), and one B scaled by the magnitudes. Outside the arena: they
  // depend on the adapter, not on the sequence length.
  void set_dora_norms();
  std::vector<float> dora_norms_;
  std::vector<size_t> dora_offset_;  // (L * targets) into dora_norms_
  std::vector<float> dora_gb_;       // (OUT, R) of one module
};

struct SamplingOptions {
  float temperature = 0.0f;  // 0 = greedy (argmax, lowest id on ties)
  float top_p = 1.0f;
};
int32_t sample_token(const float* logits, int64_t V, const SamplingOptions& opt, std::mt19937_64& rng);

}  // namespace qlora
