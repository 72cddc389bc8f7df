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
  int64_t R = 0;  // the largest rank of any module (dh is shared)
  int64_t Rt[kNumLoraTargets] = {};
  for (int t = 0; t < kNumLoraTargets; ++t) {
    Rt[t] = lora ? lora_max_rank(cfg, *lora, LoraTarget(t)) : 0;
    R = std::max(R, Rt[t]);
  }
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
    for (int t = 0; t < kNumLoraTargets; ++t) {
      const bool on = lora && lora->targets[size_t(t)];
      s.h[t] = on ? f(N * Rt[t], "lora h") : nullptr;
      s.wnorm[t] = on && lora->dora ? f(lora_target_dims(cfg, LoraTarget(t)).second, "dora weight norm") : nullptr;
    }
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
  if (lora && lora->dora) {
    dora_base_ = f(N * wide, "dora base product");
    dora_lora_ = f(N * wide, "dora lora product");
    dora_panel_ = f(ops::kDoraPanelRows * wide, "dora norm panel");
  }
}

void init_dora_magnitudes(LoraWeights& lora, const LlamaWeights& w) {
  if (!lora.config().dora) return;
  const ModelConfig& cfg = w.cfg;
  int64_t wide = 0;
  for (int t = 0; t < kNumLoraTargets; ++t) wide = std::max(wide, lora_target_dims(cfg, LoraTarget(t)).first);
  std::vector<float> panel(size_t(ops::kDoraPanelRows * wide));
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t) {
      const LoraTarget tg = LoraTarget(t);
      if (!lora.has(tg)) continue;
      ops::dora_weight_norm(lora.M(l, tg), panel.data(), w.layers[size_t(l)].linear(tg), lora.A(l, tg), lora.B(l, tg),
                            lora.scale(l, tg), lora.rank(l, tg));
    }
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

// out (N,OUT) = inp W^T + bias + LoRA(inp) (or DoRA's (g-1) base + g lora).
void LlamaModel::project(float* out, const float* inp, const ops::LinearWeight& w, const float* bias, int64_t l,
                         LoraTarget t, LayerActs& s) {
  float* h = s.h[int(t)];
  float* wnorm = s.wnorm[int(t)];
  ops::linear_forward(out, inp, w, bias, N_);
  if (!lora_ || !lora_->has(t)) return;
  const auto& lc = lora_->config();
  const bool drop = lc.dropout > 0.0 && training_;
  const float* xd = inp;
  if (drop) {
    ops::dropout_forward(xd_, inp, N_ * w.in, float(lc.dropout), dropout_seed(l, t));
    xd = xd_;
  }
  const float* A = lora_->A(l, t);
  const float* Bm = lora_->B(l, t);
  const float scale = lora_->scale(l, t);
  const int64_t R = lora_->rank(l, t), n = N_ * w.out;
  if (!lc.dora) {
    ops::lora_forward(out, h, xd, A, Bm, scale, N_, w.in, w.out, R);
    return;
  }
  ops::dora_weight_norm(wnorm, dora_panel_, w, A, Bm, scale, R);
  std::fill_n(dora_lora_, n, 0.0f);
  ops::lora_forward(dora_lora_, h, xd, A, Bm, scale, N_, w.in, w.out, R);
  dora_base_product(dora_base_, out, xd, w, bias, drop);
  ops::dora_forward(out, dora_base_, dora_lora_, lora_->M(l, t), wnorm, N_, w.out);
}

// PEFT's base_result: without dropout (or in evaluation) the base layer's
// result minus its bias; with dropout the base applied to the dropped-out input.
void LlamaModel::dora_base_product(float* base, const float* result, const float* xd, const ops::LinearWeight& w,
                                   const float* bias, bool dropout) {
  const int64_t n = N_ * w.out;
  if (dropout) {
    ops::linear_forward(base, xd, w, nullptr, N_);
  } else if (bias) {
    for (int64_t i = 0; i < n; ++i) base[i] = result[i] - bias[i % w.out];
  } else if (base != result) {
    std::copy_n(result, n, base);
  }
}

// dinp (N,IN) = (or +=, when accumulate) dout W + the LoRA branch's input gradient.
void LlamaModel::project_backward(float* dinp, bool accumulate, const float* dout, const float* inp,
                                  const ops::LinearWeight& w, const float* bias, int64_t l, LoraTarget t,
                                  const LayerActs& s) {
  const float* h = s.h[int(t)];
  const float* wnorm = s.wnorm[int(t)];
  const bool adapted = lora_ && lora_->has(t);
  const bool dora = adapted && lora_->config().dora;
  const bool drop = adapted && lora_->config().dropout > 0.0 && training_;
  if (dora) {
    dora_backward(dinp, accumulate, dout, inp, w, bias, l, t, h, wnorm, drop);
    return;
  }
  if (accumulate) {
    ops::linear_backward(dlin_, dout, w, N_);
    add_inplace(dinp, dlin_, N_ * w.in);
  } else {
    ops::linear_backward(dinp, dout, w, N_);
  }
  if (!adapted) return;
  const auto& lc = lora_->config();
  const float scale = lora_->scale(l, t);
  const int64_t R = lora_->rank(l, t);
  if (drop) {
    // Recompute the same mask (counter-based) rather than keeping it.
    const uint64_t seed = dropout_seed(l, t);
    ops::dropout_forward(xd_, inp, N_ * w.in, float(lc.dropout), seed);
    std::fill_n(dxd_, N_ * w.in, 0.0f);
    ops::lora_backward(dxd_, lora_->dA(l, t), lora_->dB(l, t), dh_, dout, h, xd_, lora_->A(l, t), lora_->B(l, t),
                       scale, N_, w.in, w.out, R);
    ops::dropout_backward_accumulate(dinp, dxd_, N_ * w.in, float(lc.dropout), seed);
  } else {
    ops::lora_backward(dinp, lora_->dA(l, t), lora_->dB(l, t), dh_, dout, h, inp, lora_->A(l, t), lora_->B(l, t),
                       scale, N_, w.in, w.out, R);
  }
}

// DoRA: out = result + (g-1) base + g lora, with result = x W^T + bias on the
// undropped input, base and lora on xd, and wnorm (so g) constant.
void LlamaModel::dora_backward(float* dinp, bool accumulate, const float* dout, const float* inp,
                               const ops::LinearWeight& w, const float* bias, int64_t l, LoraTarget t, const float* h,
                               const float* wnorm, bool drop) {
  const auto& lc = lora_->config();
  const float* A = lora_->A(l, t);
  const float* Bm = lora_->B(l, t);
  const float scale = lora_->scale(l, t);
  const int64_t R = lora_->rank(l, t), n = N_ * w.out;
  const uint64_t seed = dropout_seed(l, t);
  const float* xd = inp;
  if (drop) {
    ops::dropout_forward(xd_, inp, N_ * w.in, float(lc.dropout), seed);
    xd = xd_;
  }
  // The two products again (dh_ as the hidden's scratch; h is the saved one).
  std::fill_n(dora_lora_, n, 0.0f);
  ops::lora_forward(dora_lora_, dh_, xd, A, Bm, scale, N_, w.in, w.out, R);
  if (drop) {
    ops::linear_forward(dora_base_, xd, w, nullptr, N_);
  } else {
    // result - bias = x W^T (+ the bias's rounding, which PEFT's subtraction has too)
    ops::linear_forward(dora_base_, inp, w, bias, N_);
    dora_base_product(dora_base_, dora_base_, inp, w, bias, false);
  }
  // In place: dbase over base, dlora over lora.
  ops::dora_backward(drop ? dora_base_ : nullptr, dora_lora_, lora_->dM(l, t), dout, dora_base_, dora_lora_,
                     lora_->M(l, t), wnorm, N_, w.out);
  if (drop) {
    // dinp = dout W (result path) + dropout'(dbase W + the LoRA branch's dxd)
    if (accumulate) {
      ops::linear_backward(dlin_, dout, w, N_);
      add_inplace(dinp, dlin_, N_ * w.in);
    } else {
      ops::linear_backward(dinp, dout, w, N_);
    }
    ops::linear_backward(dxd_, dora_base_, w, N_);  // assigns dxd_; the LoRA branch adds to it
    ops::lora_backward(dxd_, lora_->dA(l, t), lora_->dB(l, t), dh_, dora_lora_, h, xd_, A, Bm, scale, N_, w.in,
                       w.out, R);
    ops::dropout_backward_accumulate(dinp, dxd_, N_ * w.in, float(lc.dropout), seed);
  } else {
    // dout + dbase = dout * g = dlora: one input-gradient product for both base terms.
    if (accumulate) {
      ops::linear_backward(dlin_, dora_lora_, w, N_);
      add_inplace(dinp, dlin_, N_ * w.in);
    } else {
      ops::linear_backward(dinp, dora_lora_, w, N_);
    }
    ops::lora_backward(dinp, lora_->dA(l, t), lora_->dB(l, t), dh_, dora_lora_, h, inp, A, Bm, scale, N_, w.in,
                       w.out, R);
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
  project(cfg_.qk_norm ? s.qraw : s.q, s.ln1, W.q, W.q_bias, l, LoraTarget::Q, s);
  project(cfg_.qk_norm ? s.kraw : s.k, s.ln1, W.k, W.k_bias, l, LoraTarget::K, s);
  project(s.v, s.ln1, W.v, W.v_bias, l, LoraTarget::V, s);
  if (cfg_.qk_norm) {
    ops::rmsnorm_forward(s.q, s.rstdq, s.qraw, W.q_norm, N_ * H, D, eps);
    ops::rmsnorm_forward(s.k, s.rstdk, s.kraw, W.k_norm, N_ * KVH, D, eps);
  }
  ops::rope_forward(s.q, pos_, cos_, sin_, N_, H, D);
  ops::rope_forward(s.k, pos_, cos_, sin_, N_, KVH, D);
  ops::attention_forward(s.att, s.lse, s.q, s.k, s.v, starts_of(l), B_, T_, H, KVH, D);
  project(tmp_, s.att, W.o, W.o_bias, l, LoraTarget::O, s);
  ops::residual_forward(s.xmid, x, tmp_, N_ * C);
  ops::rmsnorm_forward(s.ln2, s.rstd2, s.xmid, W.mlp_norm, N_, C, eps);
  project(s.gate, s.ln2, W.gate, W.gate_bias, l, LoraTarget::Gate, s);
  project(s.up, s.ln2, W.up, W.up_bias, l, LoraTarget::Up, s);
  ops::swiglu_forward(s.act, s.gate, s.up, N_ * I);
  project(tmp_, s.act, W.down, W.down_bias, l, LoraTarget::Down, s);
  ops::residual_forward(y, s.xmid, tmp_, N_ * C);
}

// On entry dres_ = dL/dy; on exit dres_ = dL/dx.
void LlamaModel::layer_backward(int64_t l, const float* x, LayerActs& s) {
  const LlamaLayerWeights& W = w_.layers[size_t(l)];
  const int64_t C = cfg_.hidden_size, I = cfg_.intermediate_size, H = cfg_.num_attention_heads,
                KVH = cfg_.num_key_value_heads, D = cfg_.head_dim;
  // MLP: y = xmid + down(swiglu(gate(ln2), up(ln2)))
  project_backward(dact_, false, dres_, s.act, W.down, W.down_bias, l, LoraTarget::Down, s);
  ops::swiglu_backward(dgate_, dup_, dact_, s.gate, s.up, N_ * I);
  project_backward(dln_, false, dgate_, s.ln2, W.gate, W.gate_bias, l, LoraTarget::Gate, s);
  project_backward(dln_, true, dup_, s.ln2, W.up, W.up_bias, l, LoraTarget::Up, s);
  ops::rmsnorm_backward(dtmp_, dln_, s.xmid, W.mlp_norm, s.rstd2, N_, C);
  add_inplace(dres_, dtmp_, N_ * C);  // dres = dL/dxmid
  // attention: xmid = x + o(attn(rope(q(ln1)), rope(k(ln1)), v(ln1)))
  project_backward(datt_, false, dres_, s.att, W.o, W.o_bias, l, LoraTarget::O, s);
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
  project_backward(dln_, false, dqraw, s.ln1, W.q, W.q_bias, l, LoraTarget::Q, s);
  const float* dkraw = dk_;
  if (cfg_.qk_norm) {
    ops::rmsnorm_backward(dq_, dk_, s.kraw, W.k_norm, s.rstdk, N_ * KVH, D);
    dkraw = dq_;
  }
  project_backward(dln_, true, dkraw, s.ln1, W.k, W.k_bias, l, LoraTarget::K, s);
  project_backward(dln_, true, dv_, s.ln1, W.v, W.v_bias, l, LoraTarget::V, s);
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
