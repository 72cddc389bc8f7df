#include "model/llama_generate.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "core/error.h"
#include "model/llama.h"

namespace qlora {

LlamaGenerator::LlamaGenerator(const LlamaWeights& w, const LoraWeights* lora, int64_t max_seq)
    : w_(w), lora_(lora), cfg_(w.cfg), max_seq_(max_seq) {
  if (max_seq <= 0 || max_seq > cfg_.max_position_embeddings)
    fail("sequence of ", max_seq, " tokens does not fit the model's max_position_embeddings ",
         cfg_.max_position_embeddings);
  const int64_t S = max_seq, C = cfg_.hidden_size, I = cfg_.intermediate_size, QD = cfg_.q_dim(),
                KVD = cfg_.kv_dim(), L = cfg_.num_hidden_layers, D = cfg_.head_dim;
  const int64_t R = lora ? lora->config().rank : 1;
  auto lay = [&](Arena& a) {
    auto f = [&](int64_t n, const char* what) { return a.take<float>(size_t(n), what); };
    kcache_ = f(L * S * KVD, "k cache");
    vcache_ = f(L * S * KVD, "v cache");
    x_ = f(S * C, "x");
    ln_ = f(S * C, "ln");
    q_ = f(S * QD, "q");
    k_ = f(S * KVD, "k");
    v_ = f(S * KVD, "v");
    att_ = f(S * QD, "att");
    tmp_ = f(S * C, "tmp");
    gate_ = f(S * I, "gate");
    up_ = f(S * I, "up");
    h_ = f(S * R, "lora h");
    cos_ = f(S * D / 2, "cos");
    sin_ = f(S * D / 2, "sin");
    pos_ = a.take<int32_t>(size_t(S), "positions");
  };
  Arena measure;
  lay(measure);
  arena_ = Arena(measure.used(), "generation");
  lay(arena_);
  std::vector<float> inv(size_t(D / 2));
  ops::rope_inv_freq(inv.data(), rope_params(cfg_), D);
  ops::rope_tables(cos_, sin_, inv.data(), S, D);
}

void LlamaGenerator::project(float* out, const float* inp, const ops::LinearWeight& w, const float* bias, int64_t l,
                             LoraTarget t, int64_t T) {
  ops::linear_forward(out, inp, w, bias, T);
  if (lora_ && lora_->has(t))  // inference: no dropout
    ops::lora_forward(out, h_, inp, lora_->A(l, t), lora_->B(l, t), lora_->config().scale(), T, w.in, w.out,
                      lora_->config().rank);
}

void LlamaGenerator::feed(const int32_t* tokens, int64_t T, float* logits) {
  if (T <= 0) fail("nothing to feed");
  if (past_ + T > max_seq_)
    fail("sequence of ", past_ + T, " tokens exceeds the ", max_seq_, " reserved (max_position_embeddings ",
         cfg_.max_position_embeddings, ")");
  const int64_t C = cfg_.hidden_size, I = cfg_.intermediate_size, H = cfg_.num_attention_heads,
                KVH = cfg_.num_key_value_heads, D = cfg_.head_dim, KVD = cfg_.kv_dim(), S = max_seq_;
  const float eps = float(cfg_.rms_norm_eps);
  for (int64_t t = 0; t < T; ++t) pos_[t] = int32_t(past_ + t);
  ops::embedding_forward(x_, tokens, w_.embed, T, C, cfg_.vocab_size);
  for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l) {
    const LlamaLayerWeights& W = w_.layers[size_t(l)];
    float* kc = kcache_ + l * S * KVD;
    float* vc = vcache_ + l * S * KVD;
    ops::rmsnorm_forward(ln_, tmp_, x_, W.attn_norm, T, C, eps);  // rstd into tmp_: unused here
    project(q_, ln_, W.q, W.q_bias, l, LoraTarget::Q, T);
    project(k_, ln_, W.k, W.k_bias, l, LoraTarget::K, T);
    project(v_, ln_, W.v, W.v_bias, l, LoraTarget::V, T);
    ops::rope_forward(q_, pos_, cos_, sin_, T, H, D);
    ops::rope_forward(k_, pos_, cos_, sin_, T, KVH, D);
    std::memcpy(kc + past_ * KVD, k_, size_t(T * KVD) * sizeof(float));
    std::memcpy(vc + past_ * KVD, v_, size_t(T * KVD) * sizeof(float));
    ops::attention_cached_forward(att_, q_, kc, vc, past_, T, H, KVH, D);
    project(tmp_, att_, W.o, W.o_bias, l, LoraTarget::O, T);
    ops::residual_forward(x_, x_, tmp_, T * C);
    ops::rmsnorm_forward(ln_, tmp_, x_, W.mlp_norm, T, C, eps);
    project(gate_, ln_, W.gate, W.gate_bias, l, LoraTarget::Gate, T);
    project(up_, ln_, W.up, W.up_bias, l, LoraTarget::Up, T);
    ops::swiglu_forward(gate_, gate_, up_, T * I);
    project(tmp_, gate_, W.down, W.down_bias, l, LoraTarget::Down, T);
    ops::residual_forward(x_, x_, tmp_, T * C);
  }
  past_ += T;
  // Only the last token's logits are needed.
  const float* last = x_ + (T - 1) * C;
  float rstd;
  ops::rmsnorm_forward(ln_, &rstd, last, w_.final_norm, 1, C, eps);
  ops::LinearWeight head;
  head.out = cfg_.vocab_size;
  head.in = C;
  head.dense = w_.lm_head;
  ops::linear_forward(logits, ln_, head, nullptr, 1);
}

int32_t sample_token(const float* logits, int64_t V, const SamplingOptions& opt, std::mt19937_64& rng) {
  if (opt.temperature <= 0.0f) return int32_t(std::max_element(logits, logits + V) - logits);
  const float m = *std::max_element(logits, logits + V);
  std::vector<double> p(static_cast<size_t>(V));
  double sum = 0;
  for (int64_t i = 0; i < V; ++i) sum += p[size_t(i)] = std::exp(double(logits[i] - m) / opt.temperature);
  std::vector<int32_t> order(static_cast<size_t>(V));
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return p[size_t(a)] > p[size_t(b)]; });
  // Nucleus: the smallest prefix of the sorted distribution with mass >= top_p.
  double mass = 0;
  size_t keep = 0;
  while (keep < order.size() && (keep == 0 || mass < opt.top_p * sum)) mass += p[size_t(order[keep++])];
  std::uniform_real_distribution<double> u(0.0, mass);
  double r = u(rng);
  for (size_t i = 0; i < keep; ++i) {
    r -= p[size_t(order[i])];
    if (r <= 0) return order[i];
  }
  return order[keep - 1];
}

}  // namespace qlora
