#include "model/llama.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"

namespace qlora {

namespace {

void add_inplace(float* a, const float* b, int64_t n) { ops::residual_forward(a, a, b, n); }

}  // namespace

ops::RopeParams rope_params(const ModelConfig& c) {
  ops::RopeParams p;
  p.theta = c.rope_theta;
  p.kind = c.rope_scaling.type == RopeScalingType::Linear   ? ops::RopeKind::Linear
           : c.rope_scaling.type == RopeScalingType::Llama3 ? ops::RopeKind::Llama3
                                                            : ops::RopeKind::None;
  p.factor = c.rope_scaling.factor;
  p.low_freq_factor = c.rope_scaling.low_freq_factor;
  p.high_freq_factor = c.rope_scaling.high_freq_factor;
  p.original_max_positions = c.rope_scaling.original_max_position_embeddings;
  return p;
}

LlamaModel::LlamaModel(const LlamaWeights& w, LoraWeights* lora, int64_t max_B, int64_t max_T, LlamaRunOptions opt)
    : w_(w), lora_(lora), cfg_(w.cfg), opt_(opt), max_B_(max_B), max_T_(max_T) {
  if (max_B <= 0 || max_T <= 0) fail("batch shape must be positive, got B=", max_B, " T=", max_T);
  if (max_T > cfg_.max_position_embeddings)
    fail("sequence length ", max_T, " exceeds the model's max_position_embeddings ", cfg_.max_position_embeddings);
  const LoraConfig* lc = lora ? &lora->config() : nullptr;
  acts_ = Arena(arena_bytes(cfg_, lc, max_B, max_T, opt_), "activations");
  LlamaActivationViews::layout(acts_, cfg_, lc, max_B, max_T, opt_);
  ops::rope_inv_freq(inv_freq_, rope_params(cfg_), cfg_.head_dim);
  ops::rope_tables(cos_, sin_, inv_freq_, max_T_, cfg_.head_dim);
}

size_t LlamaModel::arena_bytes(const ModelConfig& cfg, const LoraConfig* lora, int64_t max_B, int64_t max_T,
                               const LlamaRunOptions& opt) {
  Arena measure;
  LlamaActivationViews views;
  views.layout(measure, cfg, lora, max_B, max_T, opt);
  return measure.used();
}

void LlamaActivationViews::layout(Arena& a, const ModelConfig& cfg, const LoraConfig* lora, int64_t max_B,
                                  int64_t max_T, const LlamaRunOptions& opt) {
  const int64_t N = max_B * max_T, C = cfg.hidden_size, I = cfg.intermediate_size, QD = cfg.q_dim(),
                KVD = cfg.kv_dim(), L = cfg.num_hidden_layers, H = cfg.num_attention_heads;
  const int64_t R = lora ? lora->rank : 0;
  const int64_t wide = std::max({C, I, QD});
  auto f = [&](int64_t n, const char* what) { return a.take<float>(size_t(n), what); };
  layer_acts_.assign(size_t(opt.checkpointing ? 1 : L), LayerActs{});
  for (LayerActs& s : layer_acts_) {
    s.ln1 = f(N * C, "ln1");
    s.rstd1 = f(N, "rstd1");
    s.q = f(N * QD, "q");
    s.k = f(N * KVD, "k");
    s.v = f(N * KVD, "v");
    s.qraw = cfg.qk_norm ? f(N * QD, "q before norm") : nullptr;
    s.kraw = cfg.qk_norm ? f(N * KVD, "k before norm") : nullptr;
    s.rstdq = cfg.qk_norm ? f(N * H, "q norm rstd") : nullptr;
    s.rstdk = cfg.qk_norm ? f(N * cfg.num_key_value_heads, "k norm rstd") : nullptr;
    s.att = f(N * QD, "att");
    s.lse = f(N * H, "lse");
    s.xmid = f(N * C, "xmid");
    s.ln2 = f(N * C, "ln2");
    s.rstd2 = f(N, "rstd2");
    s.gate = f(N * I, "gate");
    s.up = f(N * I, "up");
    s.act = f(N * I, "act");
    for (int t = 0; t < kNumLoraTargets; ++t)
      s.h[t] = (lora && lora->targets[size_t(t)]) ? f(N * R, "lora h") : nullptr;
  }
  resid_.assign(size_t(L + 1), nullptr);
  for (auto& r : resid_) r = f(N * C, "residual");
  lnf_ = f(N * C, "lnf");
  rstdf_ = f(N, "rstdf");
  losses_ = f(N, "losses");
  lse_ce_ = f(N, "lse_ce");
  ce_scratch_ = f(opt.ce.scratch_floats(), "cross-entropy tile");
  tmp_ = f(N * C, "tmp");
  xd_ = f(N * wide, "dropout input");
  inv_freq_ = f(cfg.head_dim / 2, "inv_freq");
  cos_ = f(max_T * cfg.head_dim / 2, "rope cos");
  sin_ = f(max_T * cfg.head_dim / 2, "rope sin");
  pos_ = a.take<int32_t>(size_t(N), "positions");
  doc_start_ = a.take<int32_t>(size_t(N), "doc_start");
  win_start_ = cfg.sliding_window ? a.take<int32_t>(size_t(N), "window starts") : nullptr;
  dres_ = f(N * C, "dres");
  dtmp_ = f(N * C, "dtmp");
  dln_ = f(N * C, "dln");
  dlin_ = f(N * wide, "dlin");
  dq_ = f(N * QD, "dq");
  dk_ = f(N * KVD, "dk");
  dv_ = f(N * KVD, "dv");
  datt_ = f(N * QD, "datt");
  dgate_ = f(N * I, "dgate");
  dup_ = f(N * I, "dup");
  dact_ = f(N * I, "dact");
  dh_ = f(N * std::max<int64_t>(R, 1), "dh");
  dxd_ = f(N * wide, "dxd");
}

void window_starts(int32_t* start, const int32_t* doc_start, int64_t B, int64_t T, int64_t window) {
  if (window < 1) fail("window_starts: window ", window, " must be at least 1");
  for (int64_t r = 0; r < B; ++r)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t i = r * T + t;
      start[i] = int32_t(std::max<int64_t>(doc_start[i], t - window + 1));
    }
}

void batch_positions(const LlamaBatch& b, int32_t* pos, int32_t* doc_start) {
  for (int64_t r = 0; r < b.B; ++r)
    for (int64_t t = 0; t < b.T; ++t) {
      const int64_t i = r * b.T + t;
      const int32_t p = b.positions ? b.positions[i] : int32_t(t);
      // A document starts at position 0 and counts up by one.
      const bool ok = t == 0 ? p == 0 : (p == 0 || p == pos[i - 1] + 1);
      if (!ok) fail("position ", p, " at row ", r, " column ", t, ": positions must start at 0 and count up by one "
                    "within each packed document");
      pos[i] = p;
      doc_start[i] = int32_t(t - p);
    }
}

// Validates the batch against the arena, then positions -> document starts.
void LlamaModel::prepare(const LlamaBatch& b) {
  if (b.B <= 0 || b.T <= 0 || b.B > max_B_ || b.T > max_T_)
    fail("batch ", b.B, "x", b.T, " does not fit the model's reserved ", max_B_, "x", max_T_);
  B_ = b.B;
  T_ = b.T;
  N_ = b.B * b.T;
  batch_positions(b, pos_, doc_start_);
  if (cfg_.sliding_window) window_starts(win_start_, doc_start_, B_, T_, *cfg_.sliding_window);
}

uint64_t lora_dropout_seed(uint64_t lora_seed, uint64_t forward_count, int64_t l, LoraTarget t) {
  return lora_seed ^ (forward_count * 0x100000001b3ull) ^ uint64_t(l * kNumLoraTargets + int(t)) << 40;
}

uint64_t LlamaModel::dropout_seed(int64_t l, LoraTarget t) const {
  return lora_dropout_seed(lora_ ? lora_->config().seed : 0, step_, l, t);
}

// out (N,OUT) = inp W^T + bias + LoRA(inp)
void LlamaModel::project(float* out, const float* inp, const ops::LinearWeight& w, const float* bias, int64_t l,
                         LoraTarget t, float* h) {
  ops::linear_forward(out, inp, w, bias, N_);
  if (!lora_ || !lora_->has(t)) return;
  const auto& lc = lora_->config();
  const float* xd = inp;
  if (lc.dropout > 0.0 && training_) {
    ops::dropout_forward(xd_, inp, N_ * w.in, float(lc.dropout), dropout_seed(l, t));
    xd = xd_;
  }
  ops::lora_forward(out, h, xd, lora_->A(l, t), lora_->B(l, t), lc.scale(), N_, w.in, w.out, lc.rank);
}

// dinp (N,IN) = (or +=, when accumulate) dout W + the LoRA branch's input gradient.
void LlamaModel::project_backward(float* dinp, bool accumulate, const float* dout, const float* inp,
                                  const ops::LinearWeight& w, int64_t l, LoraTarget t, const float* h) {
  if (accumulate) {
    ops::linear_backward(dlin_, dout, w, N_);
    add_inplace(dinp, dlin_, N_ * w.in);
  } else {
    ops::linear_backward(dinp, dout, w, N_);
  }
  if (!lora_ || !lora_->has(t)) return;
  const auto& lc = lora_->config();
  const float scale = lc.scale();
  if (lc.dropout > 0.0 && training_) {
    // Recompute the same mask (counter-based) rather than keeping it.
    const uint64_t seed = dropout_seed(l, t);
    ops::dropout_forward(xd_, inp, N_ * w.in, float(lc.dropout), seed);
    std::fill_n(dxd_, N_ * w.in, 0.0f);
    ops::lora_backward(dxd_, lora_->dA(l, t), lora_->dB(l, t), dh_, dout, h, xd_, lora_->A(l, t), lora_->B(l, t),
                       scale, N_, w.in, w.out, lc.rank);
    ops::dropout_backward_accumulate(dinp, dxd_, N_ * w.in, float(lc.dropout), seed);
  } else {
    ops::lora_backward(dinp, lora_->dA(l, t), lora_->dB(l, t), dh_, dout, h, inp, lora_->A(l, t), lora_->B(l, t),
                       scale, N_, w.in, w.out, lc.rank);
  }
}

// x (N,C) -> y (N,C); s receives what backward needs.
void LlamaModel::layer_forward(int64_t l, const float* x, float* y, LayerActs& s) {
  const LlamaLayerWeights& W = w_.layers[size_t(l)];
  const int64_t C = cfg_.hidden_size, I = cfg_.intermediate_size, H = cfg_.num_attention_heads,
                KVH = cfg_.num_key_value_heads, D = cfg_.head_dim;
  const float eps = float(cfg_.rms_norm_eps);
  ops::rmsnorm_forward(s.ln1, s.rstd1, x, W.attn_norm, N_, C, eps);
  // qwen3: q and k are projected into qraw/kraw, then RMS-normed per head (a
  // row of D values with a weight (D)) into q/k.
  project(cfg_.qk_norm ? s.qraw : s.q, s.ln1, W.q, W.q_bias, l, LoraTarget::Q, s.h[int(LoraTarget::Q)]);
  project(cfg_.qk_norm ? s.kraw : s.k, s.ln1, W.k, W.k_bias, l, LoraTarget::K, s.h[int(LoraTarget::K)]);
  project(s.v, s.ln1, W.v, W.v_bias, l, LoraTarget::V, s.h[int(LoraTarget::V)]);
  if (cfg_.qk_norm) {
    ops::rmsnorm_forward(s.q, s.rstdq, s.qraw, W.q_norm, N_ * H, D, eps);
    ops::rmsnorm_forward(s.k, s.rstdk, s.kraw, W.k_norm, N_ * KVH, D, eps);
  }
  ops::rope_forward(s.q, pos_, cos_, sin_, N_, H, D);
  ops::rope_forward(s.k, pos_, cos_, sin_, N_, KVH, D);
  ops::attention_forward(s.att, s.lse, s.q, s.k, s.v, starts_of(l), B_, T_, H, KVH, D);
  project(tmp_, s.att, W.o, W.o_bias, l, LoraTarget::O, s.h[int(LoraTarget::O)]);
  ops::residual_forward(s.xmid, x, tmp_, N_ * C);
  ops::rmsnorm_forward(s.ln2, s.rstd2, s.xmid, W.mlp_norm, N_, C, eps);
  project(s.gate, s.ln2, W.gate, W.gate_bias, l, LoraTarget::Gate, s.h[int(LoraTarget::Gate)]);
  project(s.up, s.ln2, W.up, W.up_bias, l, LoraTarget::Up, s.h[int(LoraTarget::Up)]);
  ops::swiglu_forward(s.act, s.gate, s.up, N_ * I);
  project(tmp_, s.act, W.down, W.down_bias, l, LoraTarget::Down, s.h[int(LoraTarget::Down)]);
  ops::residual_forward(y, s.xmid, tmp_, N_ * C);
}

// On entry dres_ = dL/dy; on exit dres_ = dL/dx.
void LlamaModel::layer_backward(int64_t l, const float* x, LayerActs& s) {
  const LlamaLayerWeights& W = w_.layers[size_t(l)];
  const int64_t C = cfg_.hidden_size, I = cfg_.intermediate_size, H = cfg_.num_attention_heads,
                KVH = cfg_.num_key_value_heads, D = cfg_.head_dim;
  // MLP: y = xmid + down(swiglu(gate(ln2), up(ln2)))
  project_backward(dact_, false, dres_, s.act, W.down, l, LoraTarget::Down, s.h[int(LoraTarget::Down)]);
  ops::swiglu_backward(dgate_, dup_, dact_, s.gate, s.up, N_ * I);
  project_backward(dln_, false, dgate_, s.ln2, W.gate, l, LoraTarget::Gate, s.h[int(LoraTarget::Gate)]);
  project_backward(dln_, true, dup_, s.ln2, W.up, l, LoraTarget::Up, s.h[int(LoraTarget::Up)]);
  ops::rmsnorm_backward(dtmp_, dln_, s.xmid, W.mlp_norm, s.rstd2, N_, C);
  add_inplace(dres_, dtmp_, N_ * C);  // dres = dL/dxmid
  // attention: xmid = x + o(attn(rope(q(ln1)), rope(k(ln1)), v(ln1)))
  project_backward(datt_, false, dres_, s.att, W.o, l, LoraTarget::O, s.h[int(LoraTarget::O)]);
  ops::attention_backward(dq_, dk_, dv_, datt_, s.att, s.lse, s.q, s.k, s.v, starts_of(l), B_, T_, H, KVH, D);
  ops::rope_backward(dq_, pos_, cos_, sin_, N_, H, D);
  ops::rope_backward(dk_, pos_, cos_, sin_, N_, KVH, D);
  // qk_norm: through the per-head norms into buffers free by now (datt_ after
  // attention backward, dq_ after q's projection backward).
  const float* dqraw = dq_;
  if (cfg_.qk_norm) {
    ops::rmsnorm_backward(datt_, dq_, s.qraw, W.q_norm, s.rstdq, N_ * H, D);
    dqraw = datt_;
  }
  project_backward(dln_, false, dqraw, s.ln1, W.q, l, LoraTarget::Q, s.h[int(LoraTarget::Q)]);
  const float* dkraw = dk_;
  if (cfg_.qk_norm) {
    ops::rmsnorm_backward(dq_, dk_, s.kraw, W.k_norm, s.rstdk, N_ * KVH, D);
    dkraw = dq_;
  }
  project_backward(dln_, true, dkraw, s.ln1, W.k, l, LoraTarget::K, s.h[int(LoraTarget::K)]);
  project_backward(dln_, true, dv_, s.ln1, W.v, l, LoraTarget::V, s.h[int(LoraTarget::V)]);
  ops::rmsnorm_backward(dtmp_, dln_, x, W.attn_norm, s.rstd1, N_, C);
  add_inplace(dres_, dtmp_, N_ * C);
}

double LlamaModel::forward(const LlamaBatch& b, int64_t n_targets_step) {
  prepare(b);
  if (training_) ++step_;
  const int64_t C = cfg_.hidden_size, L = cfg_.num_hidden_layers;
  ops::embedding_forward(resid_[0], b.tokens, w_.embed, N_, C, cfg_.vocab_size);
  for (int64_t l = 0; l < L; ++l) layer_forward(l, resid_[size_t(l)], resid_[size_t(l + 1)], acts_of(l));
  ops::rmsnorm_forward(lnf_, rstdf_, resid_[size_t(L)], w_.final_norm, N_, C, float(cfg_.rms_norm_eps));
  const double sum = ops::lm_head_cross_entropy_forward(losses_, lse_ce_, lnf_, w_.lm_head, b.targets, ce_scratch_,
                                                        opt_.ce, N_, C, cfg_.vocab_size);
  n_targets_ = 0;
  for (int64_t i = 0; i < N_; ++i) n_targets_ += b.targets[i] != ops::kIgnoreIndex;
  const int64_t denom = n_targets_step > 0 ? n_targets_step : std::max<int64_t>(n_targets_, 1);
  grad_scale_ = float(1.0 / double(denom));
  targets_ = b.targets;
  return sum / double(denom);
}

void LlamaModel::backward() {
  if (!targets_) fail("LlamaModel::backward called before forward");
  const int64_t C = cfg_.hidden_size, L = cfg_.num_hidden_layers;
  ops::lm_head_cross_entropy_backward(dtmp_, lnf_, w_.lm_head, lse_ce_, targets_, grad_scale_, ce_scratch_, opt_.ce,
                                      N_, C, cfg_.vocab_size);
  ops::rmsnorm_backward(dres_, dtmp_, resid_[size_t(L)], w_.final_norm, rstdf_, N_, C);
  for (int64_t l = L - 1; l >= 0; --l) {
    LayerActs& s = acts_of(l);
    // Checkpointing: rebuild this layer's activations from its kept input
    // (the output goes to scratch: resid_[l+1] is no longer needed).
    if (opt_.checkpointing) layer_forward(l, resid_[size_t(l)], dlin_, s);
    layer_backward(l, resid_[size_t(l)], s);
  }
}

void LlamaModel::logits(float* out, const LlamaBatch& b) {
  prepare(b);
  const int64_t C = cfg_.hidden_size, L = cfg_.num_hidden_layers;
  ops::embedding_forward(resid_[0], b.tokens, w_.embed, N_, C, cfg_.vocab_size);
  for (int64_t l = 0; l < L; ++l) layer_forward(l, resid_[size_t(l)], resid_[size_t(l + 1)], acts_of(l));
  ops::rmsnorm_forward(lnf_, rstdf_, resid_[size_t(L)], w_.final_norm, N_, C, float(cfg_.rms_norm_eps));
  ops::LinearWeight head;
  head.out = cfg_.vocab_size;
  head.in = C;
  head.dense = w_.lm_head;
  ops::linear_forward(out, lnf_, head, nullptr, N_);
}

}  // namespace qlora
