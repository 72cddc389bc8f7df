// Small models and adapters for tests of LoRA, checkpoints and adapters (kept
// out of testing.h so that tests without a model need not include the model).
#pragma once

#include <algorithm>
#include <cstdint>

#include "io/hf_config.h"
#include "model/lora.h"
#include "testing.h"

namespace qlora::testing {

// A tiny Llama with grouped-query attention: 4 query heads and 2 key/value
// heads of 8, so k/v project to 16 and q to 32 (a k/v mixed up with q shows
// as a shape error).
inline ModelConfig tiny_gqa_config(int64_t layers) {
  ModelConfig c;
  c.model_type = "llama";
  c.vocab_size = 64;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_hidden_layers = layers;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.max_position_embeddings = 64;
  return c;
}

// An adapter with random A and B ~ N(0, sigma^2) on the targets `lc` enables,
// seeds seed, seed + 1, ... in layer and target order. B is nonzero, unlike
// PEFT's init (B = 0), so a merge, a swap of A and B or of two layers shows.
inline LoraWeights random_lora(const ModelConfig& cfg, const LoraConfig& lc, unsigned seed,
                               float sigma = 1.0f) {
  LoraWeights w(cfg, lc);
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t) {
      if (!w.has(LoraTarget(t))) continue;
      const auto [in, out] = lora_target_dims(cfg, LoraTarget(t));
      const int64_t R = w.rank(l, LoraTarget(t));  // rank_pattern applied
      const auto a = randn(R * in, seed++, sigma), b = randn(out * R, seed++, sigma);
      std::copy(a.begin(), a.end(), w.A(l, LoraTarget(t)));
      std::copy(b.begin(), b.end(), w.B(l, LoraTarget(t)));
      if (lc.dora) {  // DoRA magnitudes: positive, around 1 + sigma
        const auto m = randn(out, seed++, 0.25f);
        for (int64_t i = 0; i < out; ++i) w.M(l, LoraTarget(t))[i] = 1.0f + sigma + m[size_t(i)];
      }
    }
  return w;
}

}  // namespace qlora::testing
