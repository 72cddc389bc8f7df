// The compute ops of the Llama-family model, as one interface that every
// backend implements (kernels/cpu/ is the fp32 reference; kernels/cuda/ will
// follow with the same signatures).
//
// Conventions (llm.c):
// - argument order: outputs, then what backward needs saved, then inputs,
//   then dimensions;
// - parameter gradients accumulate (+=), activation gradients assign (=).
//   The one exception is named where it occurs: a branch that adds into a
//   gradient the main path has already assigned (lora_backward's dinp);
// - all buffers are row-major fp32 unless stated; ids are int32.
//
// Dimension letters, fixed once for every op:
//   B = batch rows, T = time (tokens per row), N = B*T tokens,
//   C = hidden channels, H = query heads, KVH = key/value heads (H % KVH == 0),
//   D = head dim, I = MLP intermediate, V = vocabulary, R = LoRA rank,
//   IN/OUT = a linear's input/output features, S = KV-cache length.
#pragma once

#include <cstdint>

#include "quant/codebook.h"

namespace qlora::ops {

// ---- embedding ---------------------------------------------------------------
// out is (N,C); tokens is (N); wte is (V,C). The embedding is frozen, so no
// backward exists (nothing upstream of it needs a gradient). A token outside
// [0, V) throws qlora::Error naming its position.
void embedding_forward(float* out, const int32_t* tokens, const float* wte, int64_t N, int64_t C, int64_t V);

// ---- RMSNorm -----------------------------------------------------------------
// out = weight * (inp * rstd), rstd = 1/sqrt(mean(inp^2) + eps) (HF order of
// operations). out, inp are (N,C); rstd is (N), saved; weight is (C), frozen.
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N, int64_t C,
                     float eps);
// dinp is (N,C), assigned.
void rmsnorm_backward(float* dinp, const float* dout, const float* inp, const float* weight, const float* rstd,
                      int64_t N, int64_t C);

// ---- residual ----------------------------------------------------------------
// out = a + b, all (n); out may alias a. Backward is the identity on both sides.
void residual_forward(float* out, const float* a, const float* b, int64_t n);

// ---- frozen linear (dense fp32 or NF4/FP4 blockwise) ---------------------------
// A frozen (OUT,IN) weight. Either `dense` is set (fp32, row-major), or the
// 4-bit form: `codes` packed two per byte, high nibble first, over the
// flattened (OUT*IN) values, with one fp32 scale per `block` values in
// `absmax` (double quantization already undone at load time).
//
// When the scales were double quantized, the small form they were decoded
// from is kept beside them (else absmax8 is null): CPU ops read `absmax`; the
// GPU upload keeps only this form (1 byte per block instead of 4). absmax[b]
// is bit for bit code8[absmax8[b]] * nested_absmax[b / nested_block] + offset
// (fp32, rounded after the multiply and after the add: double_dequantize).
struct LinearWeight {
  int64_t out = 0, in = 0;
  const float* dense = nullptr;
  const uint8_t* codes = nullptr;
  const float* absmax = nullptr;
  int64_t block = 64;
  Quant4Type type = Quant4Type::NF4;
  const uint8_t* absmax8 = nullptr;      // one per block
  const float* nested_absmax = nullptr;  // one per nested_block blocks
  const float* code8 = nullptr;          // the 256-entry 8-bit code book
  float offset = 0.0f;
  int64_t nested_block = 256;
  bool quantized() const { return dense == nullptr; }
  bool double_quant() const { return absmax8 != nullptr; }
};
// out = inp W^T (+ bias). out is (N,OUT); inp is (N,IN); bias is (OUT) or null.
// The 4-bit path dequantizes row panels of W into a thread-local buffer and
// multiplies each with sgemm (up to 4 rows of inp: a fused dequantize-dot per
// output row); the whole layer is never materialized.
void linear_forward(float* out, const float* inp, const LinearWeight& w, const float* bias, int64_t N);
// dinp = dout W, (N,IN), assigned. The base is frozen: no weight or bias gradient.
// 4-bit: up to 3 rows fused (strips of W dequantized once, added into dinp
// in a fixed order), more rows through the same panels + sgemm as forward.
void linear_backward(float* dinp, const float* dout, const LinearWeight& w, int64_t N);
// Rows [r0, r1) of W dequantized to fp32 into dst ((r1-r0),IN). For tests and
// for the merge of adapters.
void linear_rows_fp32(float* dst, const LinearWeight& w, int64_t r0, int64_t r1);

// ---- LoRA --------------------------------------------------------------------
// out += scale * (xd A^T) B^T, with xd = dropout(x) (or x itself when p = 0).
// out is (N,OUT); h = xd A^T is (N,R), saved; xd is (N,IN); A is (R,IN); B is (OUT,R).
// scale = alpha/R, or alpha/sqrt(R) for rsLoRA (the caller decides).
void lora_forward(float* out, float* h, const float* xd, const float* A, const float* B, float scale, int64_t N,
                  int64_t IN, int64_t OUT, int64_t R);
// dA (R,IN) and dB (OUT,R) accumulate (+=, parameters). dinp (N,IN) also
// accumulates (+=): the LoRA path is a branch beside the base linear, whose
// backward has already assigned dinp. dh is (N,R) scratch.
void lora_backward(float* dinp, float* dA, float* dB, float* dh, const float* dout, const float* h, const float* xd,
                   const float* A, const float* B, float scale, int64_t N, int64_t IN, int64_t OUT, int64_t R);

// ---- DoRA (weight-decomposed LoRA, as PEFT 0.22's DoraLinearLayer) ----------
// With W the (dequantized) base, s the LoRA scale and m (OUT) the magnitude:
//   wnorm_j = || W_j + s (B A)_j ||_2   (row j of W + s B A; PEFT's norm over
//                                        dim 1; detached: no gradient flows
//                                        through it, as PEFT detaches it)
//   g_j     = m_j / wnorm_j
//   out    += (g - 1) * base + g * lora  (PEFT's result_dora, added to the base
//                                        layer's result)
// with base = xd W^T (no bias) and lora = s xd A^T B^T, xd the dropped-out
// input (PEFT: with dropout off or in evaluation, base is the base layer's
// own result minus its bias).
//
// wnorm (OUT) = the row norms, computed in panels of kDoraPanelRows rows of
// W + s B A in `panel` (kDoraPanelRows x IN floats); sums of squares in double.
inline constexpr int64_t kDoraPanelRows = 64;
void dora_weight_norm(float* wnorm, float* panel, const LinearWeight& w, const float* A, const float* B,
                      float scale, int64_t R);
// out (N,OUT) += (g - 1) * base + g * lora; base, lora are (N,OUT); m, wnorm (OUT).
void dora_forward(float* out, const float* base, const float* lora, const float* m, const float* wnorm, int64_t N,
                  int64_t OUT);
// For out += (g - 1) * base + g * lora with wnorm constant:
// dm (OUT) += sum_i dout_ij (base_ij + lora_ij) / wnorm_j   (parameter: accumulates)
// dbase (N,OUT) = dout * (g - 1), dlora (N,OUT) = dout * g   (assigned)
// dbase may be null (its gradient is folded elsewhere by the caller); dbase
// may alias base and dlora lora (in place).
void dora_backward(float* dbase, float* dlora, float* dm, const float* dout, const float* base, const float* lora,
                   const float* m, const float* wnorm, int64_t N, int64_t OUT);

// ---- dropout (counter-based, so it needs no saved mask) -----------------------
// out = inp * keep / (1-p) with keep decided by a hash of (seed, index): a
// recomputation (activation checkpointing, backward) sees the same mask.
// out, inp are (n). p = 0 copies.
void dropout_forward(float* out, const float* inp, int64_t n, float p, uint64_t seed);
// dinp += dout * keep / (1-p) (accumulates: it feeds the same dinp the base path assigned).
void dropout_backward_accumulate(float* dinp, const float* dout, int64_t n, float p, uint64_t seed);

// ---- RoPE (HF rotate-half layout) ---------------------------------------------
// The rotation of a head vector x = [x1, x2] (halves of D) at position p:
//   out1 = x1 cos - x2 sin,  out2 = x2 cos + x1 sin,  with angle p * inv_freq[j].
enum class RopeKind { None, Linear, Llama3 };
struct RopeParams {
  double theta = 10000.0;
  RopeKind kind = RopeKind::None;
  double factor = 1.0;
  double low_freq_factor = 1.0, high_freq_factor = 4.0;
  int64_t original_max_positions = 8192;
};
// inv_freq is (D/2): HF's inv_freq (computed in fp32 as transformers does),
// with the linear or llama3 rescaling applied.
void rope_inv_freq(float* inv_freq, const RopeParams& p, int64_t D);
// cos, sin are (P, D/2) for positions 0..P-1: cos(float(p) * inv_freq) in fp32.
void rope_tables(float* cos, float* sin, const float* inv_freq, int64_t P, int64_t D);
// In place on x (N,NH,D) (NH = H or KVH); pos is (N), each < P of the tables.
void rope_forward(float* x, const int32_t* pos, const float* cos, const float* sin, int64_t N, int64_t NH,
                  int64_t D);
// In place on dx (N,NH,D): the transpose rotation (angle -p * inv_freq).
void rope_backward(float* dx, const int32_t* pos, const float* cos, const float* sin, int64_t N, int64_t NH,
                   int64_t D);

// ---- attention (causal, grouped-query, document-masked) ------------------------
// Token t of a row attends to tokens s with doc_start[t] <= s <= t: causal and
// only within its own document of a packed row (doc_start[t] = t - position),
// and within a sliding window when the caller raises doc_start to
// max(doc_start, t - window + 1) (model/llama.h window_starts).
// out is (B,T,H,D); lse is (B,H,T), saved (log-sum-exp of each softmax row, so
// backward recomputes probabilities instead of keeping (B,H,T,T));
// q is (B,T,H,D); k, v are (B,T,KVH,D); doc_start is (B,T), values in [0,t].
// Query head h reads key/value head h / (H/KVH). Scores are scaled by 1/sqrt(D).
void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       const int32_t* doc_start, int64_t B, int64_t T, int64_t H, int64_t KVH, int64_t D);
// Scratch of the training attention outside any arena: each OpenMP thread
// keeps two score tiles of this many floats (thread-local, grown once); the
// CPU memory plan counts them.
int64_t attention_scratch_floats(int64_t T);
// dq (B,T,H,D), dk, dv (B,T,KVH,D): assigned.
void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* out, const float* lse,
                        const float* q, const float* k, const float* v, const int32_t* doc_start, int64_t B,
                        int64_t T, int64_t H, int64_t KVH, int64_t D);
// Inference against a KV cache of one sequence: the T new queries sit at cache
// positions past..past+T-1 (their keys/values already written there) and each
// attends causally to the cache up to its own position p, from p - window + 1
// on when window > 0 (a sliding-window layer; 0: the whole cache).
// out is (T,H,D); q is (T,H,D); kcache, vcache are (S,KVH,D) with past+T <= S.
void attention_cached_forward(float* out, const float* q, const float* kcache, const float* vcache, int64_t past,
                              int64_t T, int64_t H, int64_t KVH, int64_t D, int64_t window = 0);

// ---- SwiGLU ------------------------------------------------------------------
// out = silu(gate) * up; out, gate, up are (N,I).
void swiglu_forward(float* out, const float* gate, const float* up, int64_t n);
// dgate, dup (N,I), assigned.
void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate, const float* up, int64_t n);

// ---- lm_head + cross entropy, chunked over the vocabulary ----------------------
// logits = x W^T for W (V,C) dense fp32 (frozen, possibly the tied embedding)
// are computed `rows` x `vchunk` at a time into `scratch` and folded into an
// online log-sum-exp, so the (N,V) logits never exist at once.
// Rows with targets[i] == kIgnoreIndex contribute nothing.
inline constexpr int32_t kIgnoreIndex = -100;
struct CeChunking {
  int64_t rows = 256;     // token rows per chunk
  int64_t vchunk = 4096;  // vocabulary entries per chunk
  int64_t scratch_floats() const { return rows * vchunk; }
};
// losses is (N): -log p(target) (0 for ignored rows); lse is (N), saved;
// x is (N,C); W is (V,C); targets is (N). scratch: chunking.scratch_floats().
// Returns the sum of losses (in double). A target outside [0,V) throws.
double lm_head_cross_entropy_forward(float* losses, float* lse, const float* x, const float* W,
                                     const int32_t* targets, float* scratch, CeChunking chunking, int64_t N,
                                     int64_t C, int64_t V);
// dx (N,C), assigned, for loss = sum(losses) * grad_scale, where grad_scale =
// 1 / (number of target tokens of the whole optimizer step).
void lm_head_cross_entropy_backward(float* dx, const float* x, const float* W, const float* lse,
                                    const int32_t* targets, float grad_scale, float* scratch, CeChunking chunking,
                                    int64_t N, int64_t C, int64_t V);

}  // namespace qlora::ops
