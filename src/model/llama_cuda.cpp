#include "model/llama_cuda.h"

#if QLORA_HAVE_CUDA

#include <algorithm>
#include <array>
#include <climits>
#include <cstring>

#include "core/dtype.h"
#include "core/error.h"
#include "kernels/cuda/attention_cuda.h"
#include "kernels/cuda/dora_cuda.h"
#include "kernels/cuda/lora_cuda.h"
#include "kernels/cuda/loss_cuda.h"
#include "kernels/cuda/ops_cuda.h"
#include "plan/cuda_constants.h"
#include "quant/blockwise.h"

namespace qlora {

namespace {

using cuda_ops::CudaLinearWeight;

// Views into one device buffer, 256-byte aligned. Laid out twice: once with
// no buffer to measure, then for real, so the size is exact by construction.
class DeviceArena {
 public:
  void allocate(size_t bytes) {
    buf_ = DeviceBuffer<uint8_t>(bytes);
    used_ = 0;
  }
  template <typename T>
  T* take(int64_t n) {
    const size_t off = (used_ + 255) & ~size_t(255);
    used_ = off + size_t(n) * sizeof(T);
    if (buf_.data() == nullptr) return nullptr;  // measuring
    if (used_ > buf_.bytes()) fail("CudaLlamaModel: activation arena overflow (", used_, " > ", buf_.bytes(), ")");
    return reinterpret_cast<T*>(buf_.data() + off);
  }
  size_t used() const { return used_; }
  size_t capacity() const { return buf_.bytes(); }

 private:
  DeviceBuffer<uint8_t> buf_;
  size_t used_ = 0;
};

// The frozen weights on the device, one buffer per tensor.
class DeviceStore {
 public:
  template <typename T>
  const T* put(const T* host, int64_t n) {
    if (host == nullptr || n <= 0) return nullptr;
    DeviceBuffer<uint8_t> b(size_t(n) * sizeof(T));
    b.upload(reinterpret_cast<const uint8_t*>(host), b.size());
    bytes_ += b.bytes();
    bufs_.push_back(std::move(b));
    return reinterpret_cast<const T*>(bufs_.back().data());
  }
  // fp32 host tensor -> bf16 on the device (rounded to nearest even).
  const uint16_t* put_bf16(const float* host, int64_t n) {
    if (host == nullptr || n <= 0) return nullptr;
    std::vector<uint16_t> h(static_cast<size_t>(n));
    for (size_t i = 0; i < h.size(); ++i) h[i] = f32_to_bf16(host[i]);
    return put(h.data(), n);
  }
  CudaLinearWeight linear(const ops::LinearWeight& w) {
    CudaLinearWeight d;
    d.out = w.out;
    d.in = w.in;
    const int64_t n = w.out * w.in;
    if (!w.quantized()) {
      d.dense = put_bf16(w.dense, n);
      return d;
    }
    const int64_t blocks = quant4_num_blocks(n, w.block);
    d.codes = put(w.codes, quant4_code_bytes(n));
    d.block = w.block;
    d.type = w.type;
    if (w.double_quant()) {
      // The kept double-quantized form only (1 byte per block, not 4): the
      // kernels decode each scale with the fp32 operations of
      // double_dequantize, so they read the CPU's absmax bit for bit.
      d.absmax8 = put(w.absmax8, blocks);
      d.nested_absmax = put(w.nested_absmax, quant4_num_blocks(blocks, w.nested_block));
      d.code8 = put(w.code8, 256);
      d.offset = w.offset;
      d.nested_block = w.nested_block;
    } else {
      d.absmax = put(w.absmax, blocks);
    }
    return d;
  }
  size_t bytes() const { return bytes_; }

 private:
  std::vector<DeviceBuffer<uint8_t>> bufs_;
  size_t bytes_ = 0;
};

struct Layer {
  const uint16_t *attn_norm = nullptr, *mlp_norm = nullptr;
  const uint16_t *q_norm = nullptr, *k_norm = nullptr;  // (D) each; qwen3 only
  CudaLinearWeight lin[kNumLoraTargets];
  const uint16_t* bias[kNumLoraTargets] = {};
};

// One layer's saved activations: bf16, with fp32 statistics.
struct Acts {
  uint16_t *ln1, *q, *k, *v, *att, *xmid, *ln2, *gate, *up, *act;
  float *rstd1, *lse, *rstd2;
  // qk_norm (qwen3) only, else null: q and k before the per-head norm, its rstd.
  uint16_t *qraw, *kraw;
  float *rstdq, *rstdk;
  uint16_t* h[kNumLoraTargets];
  float* wnorm[kNumLoraTargets];  // DoRA: the row norms of W + s B A (OUT) per target, else null
};

struct Adapter {
  int64_t off_a = -1, off_b = -1;  // into the flat arrays; -1: target off
  int64_t off_m = -1;              // the DoRA magnitude (OUT); -1 without DoRA
  int64_t rank = 0;                // this module's R (rank_pattern applied)
  float scale = 0.0f;              // its alpha/R (alpha_pattern, rsLoRA applied)
};

}  // namespace

struct CudaLlamaModel::Impl {
  CudaContext& ctx;
  ModelConfig cfg;
  LlamaRunOptions opt;
  LoraConfig lc;
  bool has_lora = false;
  int64_t max_B, max_T, max_N;
  int64_t B = 0, T = 0, N = 0;
  float grad_scale = 0.0f;
  bool have_forward = false;

  DeviceStore weights;
  const uint16_t *embed = nullptr, *lm_head = nullptr, *final_norm = nullptr;
  std::vector<Layer> layers;

  DeviceBuffer<float> master, grads;
  DeviceBuffer<uint16_t> params_bf16;
  std::vector<std::array<Adapter, kNumLoraTargets>> adapters;

  DeviceArena arena;
  std::vector<Acts> acts;          // L sets, or 1 with checkpointing
  std::vector<uint16_t*> resid;    // L+1 layer inputs (N,C)
  uint16_t *lnf, *tmp, *xd, *out_scratch;
  float *rstdf, *losses, *lse_ce, *cos_t, *sin_t;
  int32_t *tokens, *targets, *pos, *doc_start, *win_start, *bad;
  float* dres;
  uint16_t *dres_bf, *dtmp, *dln, *dq, *dk, *dv, *datt, *dgate, *dup, *dact, *dh, *dxd;
  // DoRA only (else null): the base and LoRA products (N, <= wide) bf16 and
  // the fp32 panel of W + s B A the norms are built in.
  uint16_t *dora_base = nullptr, *dora_lora = nullptr;
  float* dora_panel = nullptr;

  std::vector<int32_t> h_pos, h_doc, h_win;
  std::vector<float> h_losses;
  DeviceBuffer<float> logits;  // (V) fp32, allocated by the first last_logits

  Impl(CudaContext& c, const ModelConfig& m, LlamaRunOptions o, int64_t mb, int64_t mt)
      : ctx(c), cfg(m), opt(o), max_B(mb), max_T(mt), max_N(mb * mt) {}

  void layout() {
    const int64_t Nn = max_N, C = cfg.hidden_size, I = cfg.intermediate_size, QD = cfg.q_dim(),
                  KVD = cfg.kv_dim(), L = cfg.num_hidden_layers, H = cfg.num_attention_heads, D = cfg.head_dim;
    int64_t R = 0, Rt[kNumLoraTargets] = {};  // largest rank, per target and overall
    for (int t = 0; t < kNumLoraTargets; ++t) {
      Rt[t] = has_lora ? lora_max_rank(cfg, lc, LoraTarget(t)) : 0;
      R = std::max(R, Rt[t]);
    }
    const int64_t wide = std::max({C, I, QD});
    DeviceArena& a = arena;
    auto bf = [&](int64_t n) { return a.take<uint16_t>(n); };
    auto f = [&](int64_t n) { return a.take<float>(n); };
    acts.assign(size_t(opt.checkpointing ? 1 : L), Acts{});
    for (Acts& s : acts) {
      s.ln1 = bf(Nn * C);
      s.rstd1 = f(Nn);
      s.q = bf(Nn * QD);
      s.k = bf(Nn * KVD);
      s.v = bf(Nn * KVD);
      s.qraw = cfg.qk_norm ? bf(Nn * QD) : nullptr;
      s.kraw = cfg.qk_norm ? bf(Nn * KVD) : nullptr;
      s.rstdq = cfg.qk_norm ? f(Nn * H) : nullptr;
      s.rstdk = cfg.qk_norm ? f(Nn * cfg.num_key_value_heads) : nullptr;
      s.att = bf(Nn * QD);
      s.lse = f(Nn * H);
      s.xmid = bf(Nn * C);
      s.ln2 = bf(Nn * C);
      s.rstd2 = f(Nn);
      s.gate = bf(Nn * I);
      s.up = bf(Nn * I);
      s.act = bf(Nn * I);
      for (int t = 0; t < kNumLoraTargets; ++t) {
        const bool on = has_lora && lc.targets[size_t(t)];
        s.h[t] = on ? bf(Nn * Rt[t]) : nullptr;
        s.wnorm[t] = on && lc.dora ? f(lora_target_dims(cfg, LoraTarget(t)).second) : nullptr;
      }
    }
    resid.assign(size_t(L + 1), nullptr);
    for (auto& r : resid) r = bf(Nn * C);
    lnf = bf(Nn * C);
    rstdf = f(Nn);
    losses = f(Nn);
    lse_ce = f(Nn);
    tmp = bf(Nn * C);
    out_scratch = bf(Nn * C);
    xd = bf(Nn * wide);
    cos_t = f(max_T * D / 2);
    sin_t = f(max_T * D / 2);
    tokens = a.take<int32_t>(Nn);
    targets = a.take<int32_t>(Nn);
    pos = a.take<int32_t>(Nn);
    doc_start = a.take<int32_t>(Nn);
    win_start = cfg.sliding_window ? a.take<int32_t>(Nn) : nullptr;
    bad = a.take<int32_t>(2);
    dres = f(Nn * C);
    dres_bf = bf(Nn * C);
    dtmp = bf(Nn * C);
    dln = bf(Nn * C);
    dq = bf(Nn * QD);
    dk = bf(Nn * KVD);
    dv = bf(Nn * KVD);
    datt = bf(Nn * QD);
    dgate = bf(Nn * I);
    dup = bf(Nn * I);
    dact = bf(Nn * I);
    dh = bf(Nn * std::max<int64_t>(R, 1));
    dxd = bf(Nn * wide);
    if (has_lora && lc.dora) {
      dora_base = bf(Nn * wide);
      dora_lora = bf(Nn * wide);
      dora_panel = f(plan_cuda::kDoraPanelRows * wide);
    }
  }

  const CudaLinearWeight& lin(int64_t l, LoraTarget t) const { return layers[size_t(l)].lin[int(t)]; }
  bool adapted(int64_t l, LoraTarget t) const { return has_lora && adapters[size_t(l)][size_t(t)].off_a >= 0; }
  // The attention mask of layer l: its first visible key per query (model/llama.h window_starts).
  const int32_t* starts_of(int64_t l) const { return cfg.attention_window(l) > 0 ? win_start : doc_start; }

  // out (N,OUT) = inp W^T + bias + LoRA(inp) (or DoRA's (g-1) base + g lora),
  // as LlamaModel::project.
  void project(uint16_t* out, const uint16_t* inp, int64_t l, LoraTarget t, Acts& s, bool training,
               uint64_t step) {
    const CudaLinearWeight& w = lin(l, t);
    const uint16_t* bias = layers[size_t(l)].bias[int(t)];
    cuda_ops::linear_forward(ctx, out, inp, w, bias, N);
    if (!adapted(l, t)) return;
    const Adapter& ad = adapters[size_t(l)][size_t(t)];
    const bool drop = lc.dropout > 0.0 && training;
    const uint16_t* x = inp;
    if (drop) {
      cuda_ops::dropout_forward(xd, inp, N * w.in, float(lc.dropout), lora_dropout_seed(lc.seed, step, l, t),
                                ctx.stream());
      x = xd;
    }
    const uint16_t *A = params_bf16.data() + ad.off_a, *Bm = params_bf16.data() + ad.off_b;
    if (!lc.dora) {
      cuda_ops::lora_forward(ctx, out, s.h[int(t)], x, A, Bm, ad.scale, N, w.in, w.out, ad.rank);
      return;
    }
    // DoRA: the norms from the fp32 masters (detached: no gradient flows
    // through them), computed on every forward as the CPU model does.
    float* wnorm = s.wnorm[int(t)];
    cuda_ops::dora_weight_norm(ctx, wnorm, dora_panel, w, master.data() + ad.off_a, master.data() + ad.off_b,
                               ad.scale, ad.rank);
    QLORA_CUDA_CHECK(cudaMemsetAsync(dora_lora, 0, size_t(N * w.out) * sizeof(uint16_t), ctx.stream()));
    cuda_ops::lora_forward(ctx, dora_lora, s.h[int(t)], x, A, Bm, ad.scale, N, w.in, w.out, ad.rank);
    const uint16_t* base = dora_base_product(out, x, w, bias, drop);
    cuda_ops::dora_forward(out, base, dora_lora, master.data() + ad.off_m, wnorm, N, w.out, ctx.stream());
  }

  // PEFT's base_result (LlamaModel::dora_base_product): without dropout and
  // bias the linear's own result (dora_forward may read it in place), else
  // x W^T on the input the LoRA branch saw, into dora_base.
  const uint16_t* dora_base_product(const uint16_t* result, const uint16_t* x, const CudaLinearWeight& w,
                                    const uint16_t* bias, bool drop) {
    if (!drop && bias == nullptr) return result;
    cuda_ops::linear_forward(ctx, dora_base, x, w, nullptr, N);
    return dora_base;
  }

  // dinp (N,IN) = (or +=) dout W + the LoRA branch's input gradient.
  void project_backward(uint16_t* dinp, bool accumulate, const uint16_t* dout, const uint16_t* inp, int64_t l,
                        LoraTarget t, const Acts& s, bool training, uint64_t step) {
    const CudaLinearWeight& w = lin(l, t);
    if (adapted(l, t) && lc.dora) {
      dora_project_backward(dinp, accumulate, dout, inp, l, t, s, training, step);
      return;
    }
    cuda_ops::linear_backward(ctx, dinp, dout, w, N, accumulate);
    if (!adapted(l, t)) return;
    const uint16_t* h = s.h[int(t)];
    const Adapter& ad = adapters[size_t(l)][size_t(t)];
    const uint16_t *A = params_bf16.data() + ad.off_a, *Bm = params_bf16.data() + ad.off_b;
    float *dA = grads.data() + ad.off_a, *dB = grads.data() + ad.off_b;
    const float scale = ad.scale;
    if (lc.dropout > 0.0 && training) {
      // The same counter-based mask as forward, recomputed rather than kept.
      const uint64_t seed = lora_dropout_seed(lc.seed, step, l, t);
      cuda_ops::dropout_forward(xd, inp, N * w.in, float(lc.dropout), seed, ctx.stream());
      QLORA_CUDA_CHECK(cudaMemsetAsync(dxd, 0, size_t(N * w.in) * sizeof(uint16_t), ctx.stream()));
      cuda_ops::lora_backward(ctx, dxd, dA, dB, dh, dout, h, xd, A, Bm, scale, N, w.in, w.out, ad.rank);
      cuda_ops::dropout_backward_accumulate(dinp, dxd, N * w.in, float(lc.dropout), seed, ctx.stream());
    } else {
      cuda_ops::lora_backward(ctx, dinp, dA, dB, dh, dout, h, inp, A, Bm, scale, N, w.in, w.out, ad.rank);
    }
  }

  // DoRA (LlamaModel::dora_backward): out = result + (g-1) base + g lora with
  // result = x W^T + bias on the undropped input, base and lora on xd, and the
  // forward's wnorm (so g) constant.
  void dora_project_backward(uint16_t* dinp, bool accumulate, const uint16_t* dout, const uint16_t* inp, int64_t l,
                             LoraTarget t, const Acts& s, bool training, uint64_t step) {
    const CudaLinearWeight& w = lin(l, t);
    const Adapter& ad = adapters[size_t(l)][size_t(t)];
    const uint16_t *A = params_bf16.data() + ad.off_a, *Bm = params_bf16.data() + ad.off_b;
    float *dA = grads.data() + ad.off_a, *dB = grads.data() + ad.off_b, *dm = grads.data() + ad.off_m;
    const float* m = master.data() + ad.off_m;
    const bool drop = lc.dropout > 0.0 && training;
    const uint64_t seed = lora_dropout_seed(lc.seed, step, l, t);
    cudaStream_t st = ctx.stream();
    const uint16_t* x = inp;
    if (drop) {
      cuda_ops::dropout_forward(xd, inp, N * w.in, float(lc.dropout), seed, st);
      x = xd;
    }
    // The two products again (dh as the hidden's scratch; s.h is the saved one).
    QLORA_CUDA_CHECK(cudaMemsetAsync(dora_lora, 0, size_t(N * w.out) * sizeof(uint16_t), st));
    cuda_ops::lora_forward(ctx, dora_lora, dh, x, A, Bm, ad.scale, N, w.in, w.out, ad.rank);
    // base = x W^T (no bias: the CPU's result - bias), on xd with dropout.
    cuda_ops::linear_forward(ctx, dora_base, x, w, nullptr, N);
    // In place: dbase over base (needed only with dropout), dlora over lora.
    cuda_ops::dora_backward(drop ? dora_base : nullptr, dora_lora, dm, dout, dora_base, dora_lora, m,
                            s.wnorm[int(t)], N, w.out, st);
    if (drop) {
      // dinp = dout W (result path) + dropout'(dbase W + the LoRA branch's dxd)
      cuda_ops::linear_backward(ctx, dinp, dout, w, N, accumulate);
      cuda_ops::linear_backward(ctx, dxd, dora_base, w, N, false);  // assigns dxd; the LoRA branch adds to it
      cuda_ops::lora_backward(ctx, dxd, dA, dB, dh, dora_lora, s.h[int(t)], xd, A, Bm, ad.scale, N, w.in, w.out,
                              ad.rank);
      cuda_ops::dropout_backward_accumulate(dinp, dxd, N * w.in, float(lc.dropout), seed, st);
    } else {
      // dout + dbase = dout * g = dlora: one input-gradient product for both base terms.
      cuda_ops::linear_backward(ctx, dinp, dora_lora, w, N, accumulate);
      cuda_ops::lora_backward(ctx, dinp, dA, dB, dh, dora_lora, s.h[int(t)], inp, A, Bm, ad.scale, N, w.in,
                              w.out, ad.rank);
    }
  }

  void layer_forward(int64_t l, const uint16_t* x, uint16_t* y, Acts& s, bool training, uint64_t step) {
    const Layer& W = layers[size_t(l)];
    const int64_t C = cfg.hidden_size, I = cfg.intermediate_size, H = cfg.num_attention_heads,
                  KVH = cfg.num_key_value_heads, D = cfg.head_dim;
    const float eps = float(cfg.rms_norm_eps);
    cudaStream_t st = ctx.stream();
    cuda_ops::rmsnorm_forward(s.ln1, s.rstd1, x, W.attn_norm, N, C, eps, st);
    // qwen3: q/k projected into qraw/kraw, then RMS-normed per head (rows of D).
    project(cfg.qk_norm ? s.qraw : s.q, s.ln1, l, LoraTarget::Q, s, training, step);
    project(cfg.qk_norm ? s.kraw : s.k, s.ln1, l, LoraTarget::K, s, training, step);
    project(s.v, s.ln1, l, LoraTarget::V, s, training, step);
    if (cfg.qk_norm) {
      cuda_ops::rmsnorm_forward(s.q, s.rstdq, s.qraw, W.q_norm, N * H, D, eps, st);
      cuda_ops::rmsnorm_forward(s.k, s.rstdk, s.kraw, W.k_norm, N * KVH, D, eps, st);
    }
    cuda_ops::rope_forward(s.q, pos, cos_t, sin_t, N, H, D, st);
    cuda_ops::rope_forward(s.k, pos, cos_t, sin_t, N, KVH, D, st);
    cuda_ops::attention_forward(ctx, s.att, s.lse, s.q, s.k, s.v, starts_of(l), B, T, H, KVH, D);
    project(tmp, s.att, l, LoraTarget::O, s, training, step);
    cuda_ops::residual_forward(s.xmid, x, tmp, N * C, st);
    cuda_ops::rmsnorm_forward(s.ln2, s.rstd2, s.xmid, W.mlp_norm, N, C, eps, st);
    project(s.gate, s.ln2, l, LoraTarget::Gate, s, training, step);
    project(s.up, s.ln2, l, LoraTarget::Up, s, training, step);
    cuda_ops::swiglu_forward(s.act, s.gate, s.up, N * I, st);
    project(tmp, s.act, l, LoraTarget::Down, s, training, step);
    cuda_ops::residual_forward(y, s.xmid, tmp, N * C, st);
  }

  // On entry dres = dL/dy (fp32); on exit dres = dL/dx.
  void layer_backward(int64_t l, const uint16_t* x, Acts& s, bool training, uint64_t step) {
    const Layer& W = layers[size_t(l)];
    const int64_t C = cfg.hidden_size, I = cfg.intermediate_size, H = cfg.num_attention_heads,
                  KVH = cfg.num_key_value_heads, D = cfg.head_dim;
    cudaStream_t st = ctx.stream();
    cuda_ops::round_to_bf16(dres_bf, dres, N * C, st);
    project_backward(dact, false, dres_bf, s.act, l, LoraTarget::Down, s, training, step);
    cuda_ops::swiglu_backward(dgate, dup, dact, s.gate, s.up, N * I, st);
    project_backward(dln, false, dgate, s.ln2, l, LoraTarget::Gate, s, training, step);
    project_backward(dln, true, dup, s.ln2, l, LoraTarget::Up, s, training, step);
    cuda_ops::rmsnorm_backward(dtmp, dln, s.xmid, W.mlp_norm, s.rstd2, N, C, st);
    cuda_ops::add_bf16_to_f32(dres, dtmp, N * C, st);  // dres = dL/dxmid
    cuda_ops::round_to_bf16(dres_bf, dres, N * C, st);
    project_backward(datt, false, dres_bf, s.att, l, LoraTarget::O, s, training, step);
    cuda_ops::attention_backward(ctx, dq, dk, dv, datt, s.att, s.lse, s.q, s.k, s.v, starts_of(l), B, T, H, KVH,
                                 D);
    cuda_ops::rope_backward(dq, pos, cos_t, sin_t, N, H, D, st);
    cuda_ops::rope_backward(dk, pos, cos_t, sin_t, N, KVH, D, st);
    // qk_norm: through the per-head norms into buffers free by now (datt after
    // attention backward, dq after q's projection backward), as the CPU model.
    const uint16_t* dqraw = dq;
    if (cfg.qk_norm) {
      cuda_ops::rmsnorm_backward(datt, dq, s.qraw, W.q_norm, s.rstdq, N * H, D, st);
      dqraw = datt;
    }
    project_backward(dln, false, dqraw, s.ln1, l, LoraTarget::Q, s, training, step);
    const uint16_t* dkraw = dk;
    if (cfg.qk_norm) {
      cuda_ops::rmsnorm_backward(dq, dk, s.kraw, W.k_norm, s.rstdk, N * KVH, D, st);
      dkraw = dq;
    }
    project_backward(dln, true, dkraw, s.ln1, l, LoraTarget::K, s, training, step);
    project_backward(dln, true, dv, s.ln1, l, LoraTarget::V, s, training, step);
    cuda_ops::rmsnorm_backward(dtmp, dln, x, W.attn_norm, s.rstd1, N, C, st);
    cuda_ops::add_bf16_to_f32(dres, dtmp, N * C, st);
  }

  Acts& acts_of(int64_t l) { return opt.checkpointing ? acts[0] : acts[size_t(l)]; }

  void run_trunk(const LlamaBatch& b, bool training, uint64_t step);
  // Throws for the first bad token (first_bad[0]) or target (first_bad[1]) the kernels found.
  void check_tokens(const LlamaBatch& b, const int32_t first_bad[2]) const;
};

void CudaLlamaModel::check_shape(int64_t max_B, int64_t max_T) {
  const ModelConfig& cfg = impl_->cfg;
  max_T_ = max_T;
  if (max_B <= 0 || max_T <= 0) fail("batch shape must be positive, got B=", max_B, " T=", max_T);
  if (max_T > cfg.max_position_embeddings)
    fail("sequence length ", max_T, " exceeds the model's max_position_embeddings ", cfg.max_position_embeddings);
}

CudaLlamaModel::CudaLlamaModel(CudaContext& ctx, const LlamaWeights& w, const LoraWeights* lora, int64_t max_B,
                               int64_t max_T, LlamaRunOptions opt)
    : impl_(std::make_unique<Impl>(ctx, w.cfg, opt, max_B, max_T)) {
  check_shape(max_B, max_T);
  Impl& m = *impl_;
  const ModelConfig& cfg = w.cfg;
  const int64_t C = cfg.hidden_size, V = cfg.vocab_size, L = cfg.num_hidden_layers;

  // Base weights.
  m.embed = m.weights.put_bf16(w.embed, V * C);
  m.lm_head = w.lm_head == w.embed ? m.embed : m.weights.put_bf16(w.lm_head, V * C);
  m.final_norm = m.weights.put_bf16(w.final_norm, C);
  m.layers.resize(size_t(L));
  for (int64_t l = 0; l < L; ++l) {
    const LlamaLayerWeights& hw = w.layers[size_t(l)];
    Layer& d = m.layers[size_t(l)];
    d.attn_norm = m.weights.put_bf16(hw.attn_norm, C);
    d.mlp_norm = m.weights.put_bf16(hw.mlp_norm, C);
    d.q_norm = m.weights.put_bf16(hw.q_norm, cfg.head_dim);  // null (none) unless qwen3
    d.k_norm = m.weights.put_bf16(hw.k_norm, cfg.head_dim);
    const ops::LinearWeight* lins[kNumLoraTargets] = {&hw.q, &hw.k, &hw.v, &hw.o, &hw.gate, &hw.up, &hw.down};
    const float* biases[kNumLoraTargets] = {hw.q_bias,    hw.k_bias,  hw.v_bias,   hw.o_bias,
                                            hw.gate_bias, hw.up_bias, hw.down_bias};
    for (int t = 0; t < kNumLoraTargets; ++t) {
      d.lin[t] = m.weights.linear(*lins[t]);
      d.bias[t] = m.weights.put_bf16(biases[t], lins[t]->out);
    }
  }
  finish(lora);
}

namespace {

// Puts each streamed tensor on the device as the LlamaWeights constructor
// uploads the same tensor from the arena (DeviceStore, same conversions).
class DeviceSink final : public WeightSink {
 public:
  DeviceSink(DeviceStore& store, std::vector<Layer>& layers, const uint16_t*& embed, const uint16_t*& lm_head,
             const uint16_t*& final_norm)
      : store_(store), layers_(layers), embed_(embed), lm_head_(lm_head), final_norm_(final_norm) {}

  void begin(const ModelConfig& cfg, const WeightLoadOptions& opt, const std::vector<TensorSlot>&) override {
    cfg_ = cfg;
    opt_ = opt;
    layers_.assign(size_t(cfg.num_hidden_layers), Layer{});
  }

  void put(const StreamedTensor& t) override {
    const TensorSlot& s = *t.slot;
    Layer* L = s.layer >= 0 ? &layers_.at(size_t(s.layer)) : nullptr;
    auto dense = [&] {
      if (!t.dense) fail("internal: ", s.name, " arrived 4-bit for a dense slot");
      return store_.put_bf16(t.dense, t.numel);
    };
    auto linear = [&](LoraTarget target) {
      // The view bind_weights gives the arena's copy of this tensor.
      L->lin[int(target)] = store_.linear(linear_view(t, opt_));
    };
    switch (s.kind) {
      case TensorKind::Embed: embed_ = dense(); break;
      case TensorKind::LmHead: lm_head_ = dense(); break;
      case TensorKind::FinalNorm: final_norm_ = dense(); break;
      case TensorKind::AttnNorm: L->attn_norm = dense(); break;
      case TensorKind::MlpNorm: L->mlp_norm = dense(); break;
      case TensorKind::QNorm: L->q_norm = dense(); break;
      case TensorKind::KNorm: L->k_norm = dense(); break;
      case TensorKind::Q: linear(LoraTarget::Q); break;
      case TensorKind::K: linear(LoraTarget::K); break;
      case TensorKind::V: linear(LoraTarget::V); break;
      case TensorKind::O: linear(LoraTarget::O); break;
      case TensorKind::Gate: linear(LoraTarget::Gate); break;
      case TensorKind::Up: linear(LoraTarget::Up); break;
      case TensorKind::Down: linear(LoraTarget::Down); break;
      case TensorKind::QBias: L->bias[int(LoraTarget::Q)] = dense(); break;
      case TensorKind::KBias: L->bias[int(LoraTarget::K)] = dense(); break;
      case TensorKind::VBias: L->bias[int(LoraTarget::V)] = dense(); break;
      case TensorKind::OBias: L->bias[int(LoraTarget::O)] = dense(); break;
      case TensorKind::GateBias: L->bias[int(LoraTarget::Gate)] = dense(); break;
      case TensorKind::UpBias: L->bias[int(LoraTarget::Up)] = dense(); break;
      case TensorKind::DownBias: L->bias[int(LoraTarget::Down)] = dense(); break;
    }
  }

  void finish() {
    if (cfg_.tie_word_embeddings) lm_head_ = embed_;
  }

 private:
  DeviceStore& store_;
  std::vector<Layer>& layers_;
  const uint16_t*& embed_;
  const uint16_t*& lm_head_;
  const uint16_t*& final_norm_;
  ModelConfig cfg_;
  WeightLoadOptions opt_;
};

}  // namespace

CudaLlamaModel::CudaLlamaModel(CudaContext& ctx, const std::filesystem::path& model_dir, const WeightLoadOptions& wopt,
                               const LoraWeights* lora, int64_t max_B, int64_t max_T, LlamaRunOptions opt)
    // config.json alone here: stream_llama_weights checks the whole folder
    // before it hands over the first tensor.
    : impl_(std::make_unique<Impl>(ctx, load_model_config(model_dir), opt, max_B, max_T)) {
  check_shape(max_B, max_T);
  Impl& m = *impl_;
  DeviceSink sink(m.weights, m.layers, m.embed, m.lm_head, m.final_norm);
  stream_llama_weights(model_dir, wopt, sink);
  sink.finish();
  finish(lora);
}

void CudaLlamaModel::finish(const LoraWeights* lora) {
  Impl& m = *impl_;
  CudaContext& ctx = m.ctx;
  const ModelConfig& cfg = m.cfg;
  const LlamaRunOptions& opt = m.opt;
  const int64_t max_B = m.max_B, max_T = m.max_T;
  const int64_t C = cfg.hidden_size, V = cfg.vocab_size, L = cfg.num_hidden_layers, D = cfg.head_dim;

  // LoRA: the flat arrays in LoraWeights' layout.
  if (lora != nullptr) {
    m.has_lora = true;
    m.lc = lora->config();
    lora_n_ = int64_t(lora->flat_size());
    m.master = DeviceBuffer<float>(size_t(lora_n_));
    m.grads = DeviceBuffer<float>(size_t(lora_n_));
    m.params_bf16 = DeviceBuffer<uint16_t>(size_t(lora_n_));
    master_ = m.master.data();
    grads_ = m.grads.data();
    params_bf16_ = m.params_bf16.data();
    m.adapters.assign(size_t(L), {});
    for (int64_t l = 0; l < L; ++l)
      for (int t = 0; t < kNumLoraTargets; ++t)
        if (lora->has(LoraTarget(t))) {
          m.adapters[size_t(l)][size_t(t)].off_a = lora->A(l, LoraTarget(t)) - lora->flat_params();
          m.adapters[size_t(l)][size_t(t)].off_b = lora->B(l, LoraTarget(t)) - lora->flat_params();
          m.adapters[size_t(l)][size_t(t)].rank = lora->rank(l, LoraTarget(t));
          m.adapters[size_t(l)][size_t(t)].scale = lora->scale(l, LoraTarget(t));
          if (m.lc.dora) m.adapters[size_t(l)][size_t(t)].off_m = lora->M(l, LoraTarget(t)) - lora->flat_params();
        }
    upload_lora(lora->flat_params());
    zero_grad();
  }

  // Activations: measure, allocate, lay out.
  m.layout();
  m.arena.allocate(m.arena.used());
  m.layout();

  // RoPE tables for positions 0..max_T-1, computed as the CPU model does.
  std::vector<float> inv(size_t(D / 2)), cos_h(size_t(max_T * D / 2)), sin_h(cos_h.size());
  ops::rope_inv_freq(inv.data(), rope_params(cfg), D);
  ops::rope_tables(cos_h.data(), sin_h.data(), inv.data(), max_T, D);
  QLORA_CUDA_CHECK(cudaMemcpy(m.cos_t, cos_h.data(), cos_h.size() * sizeof(float), cudaMemcpyHostToDevice));
  QLORA_CUDA_CHECK(cudaMemcpy(m.sin_t, sin_h.data(), sin_h.size() * sizeof(float), cudaMemcpyHostToDevice));

  // The op workspace at its largest need, so no step allocates.
  const int64_t N = m.max_N;
  size_t ws = cuda_ops::attention_backward_workspace_bytes(max_B, max_T, cfg.num_attention_heads, D);
  ws = std::max(ws, cuda_ops::lm_head_ce_workspace_bytes(opt.ce, N, C, V));
  for (const Layer& d : m.layers)
    for (const CudaLinearWeight& lw : d.lin) ws = std::max(ws, cuda_ops::linear_workspace_bytes(lw, N));
  ctx.workspace(ws);
  m.h_pos.resize(size_t(N));
  m.h_doc.resize(size_t(N));
  if (cfg.sliding_window) m.h_win.resize(size_t(N));
  m.h_losses.resize(size_t(N));
  // The raw cudaMemcpy of the RoPE tables (legacy stream) lands before ctx's
  // non-blocking streams use them.
  QLORA_CUDA_CHECK(cudaDeviceSynchronize());
}

CudaLlamaModel::~CudaLlamaModel() = default;

void CudaLlamaModel::zero_grad() {
  if (lora_n_ > 0)
    QLORA_CUDA_CHECK(cudaMemsetAsync(grads_, 0, size_t(lora_n_) * sizeof(float), impl_->ctx.stream()));
}

void CudaLlamaModel::upload_lora(const float* host) {
  if (lora_n_ == 0) return;
  CudaContext& ctx = impl_->ctx;
  QLORA_CUDA_CHECK(cudaStreamSynchronize(ctx.stream()));
  impl_->master.upload(host, size_t(lora_n_));
  cuda_ops::round_to_bf16(params_bf16_, master_, lora_n_, ctx.stream());
  QLORA_CUDA_CHECK(cudaStreamSynchronize(ctx.stream()));
}

void CudaLlamaModel::download_lora(float* host) const {
  if (lora_n_ == 0) return;
  QLORA_CUDA_CHECK(cudaStreamSynchronize(impl_->ctx.stream()));
  impl_->master.download(host, size_t(lora_n_));
}

void CudaLlamaModel::download_grads(float* host) const {
  if (lora_n_ == 0) return;
  QLORA_CUDA_CHECK(cudaStreamSynchronize(impl_->ctx.stream()));
  impl_->grads.download(host, size_t(lora_n_));
}

void CudaLlamaModel::init_dora_magnitudes() {
  Impl& m = *impl_;
  if (!m.has_lora || !m.lc.dora) return;
  for (int64_t l = 0; l < m.cfg.num_hidden_layers; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t) {
      if (!m.adapted(l, LoraTarget(t))) continue;
      const Adapter& ad = m.adapters[size_t(l)][size_t(t)];
      cuda_ops::dora_weight_norm(m.ctx, master_ + ad.off_m, m.dora_panel, m.lin(l, LoraTarget(t)), master_ + ad.off_a,
                                 master_ + ad.off_b, ad.scale, ad.rank);
    }
  cuda_ops::round_to_bf16(params_bf16_, master_, lora_n_, m.ctx.stream());
  QLORA_CUDA_CHECK(cudaStreamSynchronize(m.ctx.stream()));
}

size_t CudaLlamaModel::weight_bytes() const { return impl_->weights.bytes(); }

size_t CudaLlamaModel::device_bytes() const {
  const size_t lora = size_t(lora_n_) * (2 * sizeof(float) + sizeof(uint16_t));
  return impl_->weights.bytes() + lora + impl_->arena.capacity() + impl_->ctx.workspace_bytes();
}

// Checks the batch's shape and positions, uploads its ids and positions, and
// queues embedding, the layers and the final norm (into lnf). Targets are the
// caller's.
void CudaLlamaModel::Impl::run_trunk(const LlamaBatch& b, bool training, uint64_t step) {
  if (b.B <= 0 || b.T <= 0 || b.B > max_B || b.T > max_T)
    fail("batch ", b.B, "x", b.T, " does not fit the model's reserved ", max_B, "x", max_T);
  B = b.B;
  T = b.T;
  N = b.B * b.T;
  have_forward = false;
  const int64_t C = cfg.hidden_size, L = cfg.num_hidden_layers, V = cfg.vocab_size;
  batch_positions(b, h_pos.data(), h_doc.data());
  cudaStream_t st = ctx.stream();
  const size_t ids = size_t(N) * sizeof(int32_t);
  // Pageable sources: each copy has read its source when the call returns.
  QLORA_CUDA_CHECK(cudaMemcpyAsync(tokens, b.tokens, ids, cudaMemcpyHostToDevice, st));
  QLORA_CUDA_CHECK(cudaMemcpyAsync(pos, h_pos.data(), ids, cudaMemcpyHostToDevice, st));
  QLORA_CUDA_CHECK(cudaMemcpyAsync(doc_start, h_doc.data(), ids, cudaMemcpyHostToDevice, st));
  if (cfg.sliding_window) {
    window_starts(h_win.data(), h_doc.data(), B, T, *cfg.sliding_window);
    QLORA_CUDA_CHECK(cudaMemcpyAsync(win_start, h_win.data(), ids, cudaMemcpyHostToDevice, st));
  }
  const int32_t none[2] = {INT32_MAX, INT32_MAX};
  QLORA_CUDA_CHECK(cudaMemcpyAsync(bad, none, sizeof(none), cudaMemcpyHostToDevice, st));
  cuda_ops::embedding_forward(resid[0], tokens, embed, N, C, V, bad, st);
  for (int64_t l = 0; l < L; ++l) layer_forward(l, resid[size_t(l)], resid[size_t(l + 1)], acts_of(l), training, step);
  cuda_ops::rmsnorm_forward(lnf, rstdf, resid[size_t(L)], final_norm, N, C, float(cfg.rms_norm_eps), st);
}

void CudaLlamaModel::Impl::check_tokens(const LlamaBatch& b, const int32_t first_bad[2]) const {
  const int64_t V = cfg.vocab_size;
  if (first_bad[0] != INT32_MAX)
    fail("token id ", b.tokens[first_bad[0]], " at position ", first_bad[0], " is outside the vocabulary [0, ", V,
         ")");
  if (first_bad[1] != INT32_MAX)
    fail("target id ", b.targets[first_bad[1]], " at position ", first_bad[1], " is outside the vocabulary [0, ", V,
         ") and is not ", ops::kIgnoreIndex);
}

double CudaLlamaModel::forward(const LlamaBatch& b, int64_t n_targets_step) {
  Impl& m = *impl_;
  if (training_) ++step_;
  m.run_trunk(b, training_, step_);
  const int64_t N = m.N, C = m.cfg.hidden_size, V = m.cfg.vocab_size;
  cudaStream_t st = m.ctx.stream();
  QLORA_CUDA_CHECK(
      cudaMemcpyAsync(m.targets, b.targets, size_t(N) * sizeof(int32_t), cudaMemcpyHostToDevice, st));
  cuda_ops::lm_head_cross_entropy_forward(m.ctx, m.losses, m.lse_ce, m.lnf, m.lm_head, m.targets, m.opt.ce, N, C, V,
                                          m.bad + 1);
  int32_t first_bad[2] = {0, 0};
  QLORA_CUDA_CHECK(cudaMemcpyAsync(m.h_losses.data(), m.losses, size_t(N) * sizeof(float), cudaMemcpyDeviceToHost,
                                   st));
  QLORA_CUDA_CHECK(cudaMemcpyAsync(first_bad, m.bad, sizeof(first_bad), cudaMemcpyDeviceToHost, st));
  QLORA_CUDA_CHECK(cudaStreamSynchronize(st));
  m.check_tokens(b, first_bad);

  double sum = 0;
  n_targets_ = 0;
  for (int64_t i = 0; i < N; ++i) {
    sum += double(m.h_losses[size_t(i)]);
    n_targets_ += b.targets[i] != ops::kIgnoreIndex;
  }
  const int64_t denom = n_targets_step > 0 ? n_targets_step : std::max<int64_t>(n_targets_, 1);
  m.grad_scale = float(1.0 / double(denom));
  m.have_forward = true;
  return sum / double(denom);
}

void CudaLlamaModel::last_logits(const int32_t* tokens, int64_t T, float* logits) {
  Impl& m = *impl_;
  LlamaBatch b;
  b.tokens = tokens;
  b.B = 1;
  b.T = T;
  m.run_trunk(b, /*training=*/false, step_);
  const int64_t C = m.cfg.hidden_size, V = m.cfg.vocab_size;
  if (m.logits.size() == 0) m.logits = DeviceBuffer<float>(size_t(V));
  // The last row of lnf against lm_head: (1,C) x (V,C)^T, fp32 out.
  cuda_ops::gemm(m.ctx, cuda_ops::Trans::N, cuda_ops::Trans::T, 1, V, C, 1.0f, m.lnf + (T - 1) * C, C, m.lm_head, C,
                 0.0f, m.logits.data(), cuda_ops::GemmOut::F32, V, "CudaLlamaModel::last_logits");
  cudaStream_t st = m.ctx.stream();
  int32_t first_bad[2] = {0, 0};
  QLORA_CUDA_CHECK(cudaMemcpyAsync(logits, m.logits.data(), size_t(V) * sizeof(float), cudaMemcpyDeviceToHost, st));
  QLORA_CUDA_CHECK(cudaMemcpyAsync(first_bad, m.bad, sizeof(int32_t), cudaMemcpyDeviceToHost, st));
  QLORA_CUDA_CHECK(cudaStreamSynchronize(st));
  first_bad[1] = INT32_MAX;  // no targets
  m.check_tokens(b, first_bad);
}

CudaTokenGenerator::CudaTokenGenerator(CudaLlamaModel& model, int64_t max_seq) : model_(model), max_seq_(max_seq) {
  if (max_seq <= 0 || max_seq > model.max_T())
    fail("generation of ", max_seq, " tokens does not fit the GPU model's reserved ", model.max_T());
  ids_.reserve(size_t(max_seq));
}

void CudaTokenGenerator::feed(const int32_t* tokens, int64_t T, float* logits) {
  if (T <= 0) fail("nothing to feed");
  if (length() + T > max_seq_) fail("sequence of ", length() + T, " tokens exceeds the ", max_seq_, " reserved");
  const size_t before = ids_.size();
  ids_.insert(ids_.end(), tokens, tokens + T);
  try {
    model_.last_logits(ids_.data(), length(), logits);
  } catch (...) {
    ids_.resize(before);  // a bad token leaves the sequence as it was
    throw;
  }
}

namespace {

class OwningCudaGenerator final : public TokenGenerator {
 public:
  OwningCudaGenerator(const std::filesystem::path& model_dir, const WeightLoadOptions& wopt, const LoraWeights* lora,
                      int64_t max_seq)
      : model_(ctx_, model_dir, wopt, lora, 1, max_seq), gen_(model_, max_seq) {
    model_.set_training(false);
  }
  void feed(const int32_t* tokens, int64_t T, float* logits) override { gen_.feed(tokens, T, logits); }
  int64_t length() const override { return gen_.length(); }
  int64_t capacity() const override { return gen_.capacity(); }

 private:
  CudaContext ctx_;
  CudaLlamaModel model_;
  CudaTokenGenerator gen_;
};

}  // namespace

std::unique_ptr<TokenGenerator> make_cuda_generator(const std::filesystem::path& model_dir,
                                                    const WeightLoadOptions& wopt, const LoraWeights* lora,
                                                    int64_t max_seq) {
  return std::make_unique<OwningCudaGenerator>(model_dir, wopt, lora, max_seq);
}

void CudaLlamaModel::backward() {
  Impl& m = *impl_;
  if (!m.have_forward) fail("CudaLlamaModel::backward called before forward");
  const int64_t N = m.N, C = m.cfg.hidden_size, L = m.cfg.num_hidden_layers, V = m.cfg.vocab_size;
  cudaStream_t st = m.ctx.stream();
  cuda_ops::lm_head_cross_entropy_backward(m.ctx, m.dtmp, m.lnf, m.lm_head, m.lse_ce, m.targets, m.grad_scale,
                                           m.opt.ce, N, C, V);
  cuda_ops::rmsnorm_backward(m.dln, m.dtmp, m.resid[size_t(L)], m.final_norm, m.rstdf, N, C, st);
  QLORA_CUDA_CHECK(cudaMemsetAsync(m.dres, 0, size_t(N * C) * sizeof(float), st));
  cuda_ops::add_bf16_to_f32(m.dres, m.dln, N * C, st);
  for (int64_t l = L - 1; l >= 0; --l) {
    Acts& s = m.acts_of(l);
    // Checkpointing: rebuild this layer's activations from its kept input.
    if (m.opt.checkpointing) m.layer_forward(l, m.resid[size_t(l)], m.out_scratch, s, training_, step_);
    m.layer_backward(l, m.resid[size_t(l)], s, training_, step_);
  }
  // Errors of the queued kernels surface here, with the step that made them.
  QLORA_CUDA_CHECK(cudaStreamSynchronize(st));
}

}  // namespace qlora

#endif  // QLORA_HAVE_CUDA
