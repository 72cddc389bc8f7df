#include "model/llama_generate.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "core/error.h"
#include "model/llama.h"

namespace qlora {

namespace {

// The generator's buffers for S tokens and LoRA rank R, taken from `a` in one
// order (a measuring arena only adds up their sizes).
struct GeneratorBuffers {
  float *kcache, *vcache, *x, *ln, *q, *k, *v, *att, *tmp, *gate, *up, *h, *cos, *sin;
  int32_t* pos;
  float *qk_raw = nullptr, *qk_rstd = nullptr;  // qk_norm (qwen3) only
};

GeneratorBuffers lay_out(Arena& a, const ModelConfig& cfg, int64_t S, int64_t R) {
  const int64_t C = cfg.hidden_size, I = cfg.intermediate_size, QD = cfg.q_dim(), KVD = cfg.kv_dim(),
                L = cfg.num_hidden_layers, D = cfg.head_dim, H = cfg.num_attention_heads;
  auto f = [&](int64_t n, const char* what) { return a.take<float>(size_t(n), what); };
  GeneratorBuffers b;
  b.kcache = f(L * S * KVD, "k cache");
  b.vcache = f(L * S * KVD, "v cache");
  b.x = f(S * C, "x");
  b.ln = f(S * C, "ln");
  b.q = f(S * QD, "q");
  b.k = f(S * KVD, "k");
  b.v = f(S * KVD, "v");
  b.att = f(S * QD, "att");
  b.tmp = f(S * C, "tmp");
  b.gate = f(S * I, "gate");
  b.up = f(S * I, "up");
  b.h = f(S * R, "lora h");
  b.cos = f(S * D / 2, "cos");
  b.sin = f(S * D / 2, "sin");
  b.pos = a.take<int32_t>(size_t(S), "positions");
  if (cfg.qk_norm) {
    b.qk_raw = f(S * QD, "q/k before norm");
    b.qk_rstd = f(S * H, "q/k norm rstd");
  }
  return b;
}

}  // namespace

LlamaGenerator::LlamaGenerator(const LlamaWeights& w, const LoraWeights* lora, int64_t max_seq,
                               int64_t lora_rank)
    : w_(w), lora_(lora), cfg_(w.cfg), max_seq_(max_seq) {
  if (max_seq <= 0 || max_seq > cfg_.max_position_embeddings)
    fail("sequence of ", max_seq, " tokens does not fit the model's max_position_embeddings ",
         cfg_.max_position_embeddings);
  lora_rank_ = std::max<int64_t>({int64_t(1), lora_rank, lora ? lora->max_rank() : 1});
  arena_ = Arena(arena_bytes(cfg_, max_seq, lora_rank_), "generation");
  const GeneratorBuffers b = lay_out(arena_, cfg_, max_seq, lora_rank_);
  kcache_ = b.kcache, vcache_ = b.vcache, x_ = b.x, ln_ = b.ln, q_ = b.q, k_ = b.k, v_ = b.v, att_ = b.att;
  tmp_ = b.tmp, gate_ = b.gate, up_ = b.up, h_ = b.h, cos_ = b.cos, sin_ = b.sin, pos_ = b.pos;
  qk_raw_ = b.qk_raw, qk_rstd_ = b.qk_rstd;
  const int64_t D = cfg_.head_dim;
  std::vector<float> inv(size_t(D / 2));
  ops::rope_inv_freq(inv.data(), rope_params(cfg_), D);
  ops::rope_tables(cos_, sin_, inv.data(), max_seq, D);
  set_dora_norms();
}

void LlamaGenerator::set_dora_norms() {
  dora_norms_.clear();
  dora_offset_.clear();
  if (!lora_ || !lora_->config().dora) return;
  const int64_t L = cfg_.num_hidden_layers;
  int64_t wide = 0, outs = 0, most = 0;
  dora_offset_.assign(size_t(L * kNumLoraTargets), 0);
  for (int64_t l = 0; l < L; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t)
      if (lora_->has(LoraTarget(t))) {
        const auto [in, out] = lora_target_dims(cfg_, LoraTarget(t));
        dora_offset_[size_t(l * kNumLoraTargets + t)] = size_t(outs);
        outs += out;
        wide = std::max(wide, in);
        most = std::max(most, out * lora_->rank(l, LoraTarget(t)));
      }
  dora_norms_.assign(size_t(outs), 0.0f);
  dora_gb_.assign(size_t(most), 0.0f);
  std::vector<float> panel(size_t(ops::kDoraPanelRows * wide));
  for (int64_t l = 0; l < L; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t) {
      const LoraTarget tg = LoraTarget(t);
      if (!lora_->has(tg)) continue;
      ops::dora_weight_norm(dora_norms_.data() + dora_offset_[size_t(l * kNumLoraTargets + t)], panel.data(),
                            w_.layers[size_t(l)].linear(tg), lora_->A(l, tg), lora_->B(l, tg), lora_->scale(l, tg),
                            lora_->rank(l, tg));
    }
}

size_t LlamaGenerator::arena_bytes(const ModelConfig& cfg, int64_t max_seq, int64_t lora_rank) {
  Arena measure;
  lay_out(measure, cfg, max_seq, std::max<int64_t>(1, lora_rank));
  return measure.used();
}

void LlamaGenerator::set_lora(const LoraWeights* lora) {
  if (lora && lora->max_rank() > lora_rank_)
    fail("adapter of LoRA rank ", lora->max_rank(), " exceeds the rank ", lora_rank_, " this generator reserved");
  lora_ = lora;
  past_ = 0;
  set_dora_norms();
}

void LlamaGenerator::project(float* out, const float* inp, const ops::LinearWeight& w, const float* bias, int64_t l,
                             LoraTarget t, int64_t T) {
  ops::linear_forward(out, inp, w, bias, T);
  if (!lora_ || !lora_->has(t)) return;  // inference: no dropout
  const int64_t R = lora_->rank(l, t);
  if (!lora_->config().dora) {
    ops::lora_forward(out, h_, inp, lora_->A(l, t), lora_->B(l, t), lora_->scale(l, t), T, w.in, w.out, R);
    return;
  }
  // DoRA without dropout, PEFT's (g - 1) (result - bias) + g s x A^T B^T, in
  // place: the base term row by row, the LoRA term with B's rows scaled by g
  // (no (T, OUT) buffer for it).
  const float* n = dora_norms_.data() + dora_offset_[size_t(l * kNumLoraTargets + int(t))];
  const float* m = lora_->M(l, t);
  const float* B = lora_->B(l, t);
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = 0; j < w.out; ++j) {
      const float g = m[j] / n[j];
      float& y = out[i * w.out + j];
      y += (g - 1.0f) * (bias ? y - bias[j] : y);
    }
  for (int64_t j = 0; j < w.out; ++j)
    for (int64_t r = 0; r < R; ++r) dora_gb_[size_t(j * R + r)] = B[j * R + r] * (m[j] / n[j]);
  ops::lora_forward(out, h_, inp, lora_->A(l, t), dora_gb_.data(), lora_->scale(l, t), T, w.in, w.out, R);
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
    if (cfg_.qk_norm) {  // qwen3: per-head RMSNorm of q and k before RoPE
      project(qk_raw_, ln_, W.q, W.q_bias, l, LoraTarget::Q, T);
      ops::rmsnorm_forward(q_, qk_rstd_, qk_raw_, W.q_norm, T * H, D, eps);
      project(qk_raw_, ln_, W.k, W.k_bias, l, LoraTarget::K, T);
      ops::rmsnorm_forward(k_, qk_rstd_, qk_raw_, W.k_norm, T * KVH, D, eps);
    } else {
      project(q_, ln_, W.q, W.q_bias, l, LoraTarget::Q, T);
      project(k_, ln_, W.k, W.k_bias, l, LoraTarget::K, T);
    }
    project(v_, ln_, W.v, W.v_bias, l, LoraTarget::V, T);
    ops::rope_forward(q_, pos_, cos_, sin_, T, H, D);
    ops::rope_forward(k_, pos_, cos_, sin_, T, KVH, D);
    std::memcpy(kc + past_ * KVD, k_, size_t(T * KVD) * sizeof(float));
    std::memcpy(vc + past_ * KVD, v_, size_t(T * KVD) * sizeof(float));
    ops::attention_cached_forward(att_, q_, kc, vc, past_, T, H, KVH, D, cfg_.attention_window(l));
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
