// The frozen linear: dense fp32 through sgemm, or 4-bit (NF4/FP4) blockwise
// weights. Few input rows (generation, small-N backward) dequantize short
// stretches of W into an L1-sized stack buffer and consume them at once; many
// rows dequantize row panels into a thread-local buffer, each panel
// multiplied with sgemm. The full fp32 layer never exists.
//
// Every loop below is written for the compiler's auto-vectorizer (the library
// targets baseline x86-64 and builds with -ffp-contract=off, so no FMA):
// the code lookup stays scalar (one 8-byte load per byte, both nibbles), and
// everything after it runs over contiguous fp32 stretches.
#include <cblas.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "kernels/ops.h"

namespace qlora::ops {

namespace {

// Both decoded values of every code byte (high nibble first), per type: one
// lookup per two elements instead of two nibble extractions.
struct CodeTables {
  float value[16];
  float pair[256][2];
};

CodeTables make_tables(Quant4Type type) {
  CodeTables t{};
  for (int c = 0; c < 16; ++c)
    t.value[c] = type == Quant4Type::NF4 ? nf4_code_value(uint8_t(c)) : fp4_code_value(uint8_t(c));
  for (int b = 0; b < 256; ++b) t.pair[b][0] = t.value[b >> 4], t.pair[b][1] = t.value[b & 0x0f];
  return t;
}

const CodeTables& tables(Quant4Type type) {
  static const CodeTables nf4 = make_tables(Quant4Type::NF4), fp4 = make_tables(Quant4Type::FP4);
  return type == Quant4Type::NF4 ? nf4 : fp4;
}

// Elements dequantized at a time: a stretch (2 KiB of fp32) stays in L1 while
// it is scaled and consumed, and a stretch of a row is 256 bytes of codes
// (four cache lines) read contiguously.
constexpr int64_t kStretch = 512;

// dst[0, n) = the fp32 values of the flattened elements [i, i+n) of W, n <=
// kStretch: value(code) * absmax(block), exactly as dequantize_tensor computes
// them. Two passes: codes to raw values through the pair table (scalar, one
// 8-byte store per byte), then a vectorized multiply by each block's scale.
// The whole stretch is looked up before any of it is scaled: scaling each
// block straight after its lookup read 16-byte vectors back from pairs of
// 8-byte stores still in the store buffer, a failed store-to-load forward
// (measured 1.5x slower).
void dequant_stretch(float* dst, const LinearWeight& w, const CodeTables& t, int64_t i, int64_t n) {
  const int64_t end = i + n;
  float* d = dst;
  int64_t j = i;
  if (j & 1) *d++ = t.value[w.codes[j++ >> 1] & 0x0f];  // starts on a low nibble
  const uint8_t* c = w.codes + (j >> 1);
  for (; j + 2 <= end; j += 2, d += 2) std::memcpy(d, t.pair[*c++], 2 * sizeof(float));
  if (j < end) *d = t.value[*c >> 4];  // ends on a high nibble
  for (int64_t b = i; b < end;) {
    const int64_t stop = std::min(end, (b / w.block + 1) * w.block);
    const float scale = w.absmax[b / w.block];
    for (int64_t k = b - i; k < stop - i; ++k) dst[k] *= scale;
    b = stop;
  }
}

// dequant_stretch over any length.
void dequant_span(float* dst, const LinearWeight& w, const CodeTables& t, int64_t i, int64_t n) {
  for (int64_t k = 0; k < n; k += kStretch) dequant_stretch(dst + k, w, t, i + k, std::min(kStretch, n - k));
}

// Values per dequantized panel: 1M floats (4 MiB) keeps the panel's sgemm
// wide enough to run near sgemm speed (see bench/bench_cpu_engine.cpp) while
// the buffer stays small next to any real layer (4096 x 4096 = 16M values).
constexpr int64_t kPanelFloats = int64_t(1) << 20;

int64_t panel_rows(const LinearWeight& w) {
  return std::max<int64_t>(1, std::min(w.out, kPanelFloats / w.in));
}

// The calling thread's panel buffer. It grows once to the largest panel and is
// reused by every later call, so steady-state steps allocate nothing.
float* panel_buffer(int64_t floats) {
  thread_local std::vector<float> buf;
  if (int64_t(buf.size()) < floats) buf.resize(size_t(floats));
  return buf.data();
}

void check_weight(const LinearWeight& w) {
  if (w.out <= 0 || w.in <= 0) fail("linear weight has invalid shape [", w.out, ", ", w.in, "]");
  if (!w.dense && (!w.codes || !w.absmax)) fail("linear weight [", w.out, ", ", w.in, "] has no data");
  if (!w.dense && w.block <= 0) fail("linear weight has invalid block size ", w.block);
}

}  // namespace

void linear_rows_fp32(float* dst, const LinearWeight& w, int64_t r0, int64_t r1) {
  check_weight(w);
  if (w.dense) {
    std::copy(w.dense + r0 * w.in, w.dense + r1 * w.in, dst);
    return;
  }
  const CodeTables& t = tables(w.type);
  // Fixed 16K-value pieces, so the work splits evenly whatever the block size;
  // a piece is 8 KiB of codes and 64 KiB of output, long enough to hide the
  // parallel loop's overhead.
  constexpr int64_t kPiece = int64_t(1) << 14;
  const int64_t begin = r0 * w.in, n = (r1 - r0) * w.in;
  const int64_t pieces = (n + kPiece - 1) / kPiece;
#pragma omp parallel for schedule(static) if (pieces > 1)
  for (int64_t p = 0; p < pieces; ++p)
    dequant_span(dst + p * kPiece, w, t, begin + p * kPiece, std::min(kPiece, n - p * kPiece));
}

namespace {

// Up to these many input rows the 4-bit forward and input gradient skip the
// panel + sgemm path and dequantize stretches of W straight into the products:
// at N = 1 (generation) the panel path spent most of its time writing and
// re-reading the fp32 panel. The fused cost is one dequantization (~0.35 ns
// per element and core) plus ~0.12 ns per element and row, the panel path's
// a dequantization into memory plus an sgemm that hardly grows with N, so
// the panel path wins from about N = 4 (backward: measured 2.9 vs 3.2 ms on
// one core at 2048x2048) or N = 5 (forward); see docs/engine.md.
constexpr int64_t kForwardFusedMaxRows = 4;
constexpr int64_t kBackwardFusedMaxRows = 3;

// Lanes of the forward dot products. Eight independent partial sums per row
// make the dot a plain elementwise loop the compiler vectorizes (two SSE
// vectors, or one AVX one); they are added in a fixed order at the end, so the
// result does not depend on the thread count.
constexpr int64_t kLanes = 8;

// Rows ahead of the input-gradient loop whose codes are prefetched.
constexpr int64_t kPrefetchRows = 8;

// out[n, o] = sum_k inp[n, k] W[o, k] for n < N. Parallel over output rows;
// each row is dequantized kStretch elements at a time and dotted with the N
// input rows while the stretch is in L1.
template <int64_t N>
void linear_forward_fused(float* out, const float* inp, const LinearWeight& w) {
  const CodeTables& t = tables(w.type);
#pragma omp parallel for schedule(static)
  for (int64_t o = 0; o < w.out; ++o) {
    alignas(64) float buf[kStretch];
    float acc[N][kLanes] = {};
    for (int64_t k0 = 0; k0 < w.in; k0 += kStretch) {
      const int64_t len = std::min(kStretch, w.in - k0);
      dequant_stretch(buf, w, t, o * w.in + k0, len);
      // Row by row over the stretch (it stays in L1): the row's lanes live in
      // registers for the whole stretch instead of round-tripping through memory.
      for (int64_t n = 0; n < N; ++n) {
        const float* x = inp + n * w.in + k0;
        float lane[kLanes];
        for (int64_t l = 0; l < kLanes; ++l) lane[l] = acc[n][l];
        int64_t k = 0;
        for (; k + kLanes <= len; k += kLanes)
          for (int64_t l = 0; l < kLanes; ++l) lane[l] += x[k + l] * buf[k + l];
        for (; k < len; ++k) lane[k % kLanes] += x[k] * buf[k];  // the row's last partial group
        for (int64_t l = 0; l < kLanes; ++l) acc[n][l] = lane[l];
      }
    }
    for (int64_t n = 0; n < N; ++n) {
      float s = 0.0f;
      for (int64_t l = 0; l < kLanes; ++l) s += acc[n][l];
      out[n * w.out + o] = s;
    }
  }
}

// dinp[n, k] = sum_o dout[n, o] W[o, k] for n < N. Parallel over column
// stretches of dinp: a thread owns its columns and adds the rows o = 0, 1, ...
// in order, so every element is the same left-to-right fp32 sum whatever the
// thread count (no partial sums to reduce). Each stretch of W is dequantized
// once and added into all N accumulator rows.
template <int64_t N>
void linear_backward_fused(float* dinp, const float* dout, const LinearWeight& w) {
  const CodeTables& t = tables(w.type);
  const int64_t stretches = (w.in + kStretch - 1) / kStretch;
#pragma omp parallel for schedule(static)
  for (int64_t s = 0; s < stretches; ++s) {
    const int64_t c0 = s * kStretch, len = std::min(kStretch, w.in - c0);
    alignas(64) float buf[kStretch];
    alignas(64) float acc[N][kStretch];
    for (int64_t n = 0; n < N; ++n) std::fill(acc[n], acc[n] + len, 0.0f);
    for (int64_t o = 0; o < w.out; ++o) {
      // The stretches of W this thread reads are a row apart, too far apart
      // for the hardware prefetcher to follow: fetch a few rows ahead.
      if (o + kPrefetchRows < w.out)
        for (int64_t b = 0; b < len; b += 128)
          __builtin_prefetch(w.codes + ((o + kPrefetchRows) * w.in + c0 + b) / 2);
      dequant_stretch(buf, w, t, o * w.in + c0, len);
      for (int64_t n = 0; n < N; ++n) {
        const float a = dout[n * w.out + o];
        for (int64_t k = 0; k < len; ++k) acc[n][k] += a * buf[k];
      }
    }
    for (int64_t n = 0; n < N; ++n) std::copy(acc[n], acc[n] + len, dinp + n * w.in + c0);
  }
}

using FusedFn = void (*)(float*, const float*, const LinearWeight&);
// The fused kernels by row count, index N - 1 (N is a template parameter so
// the loops over rows unroll).
constexpr FusedFn kForwardFused[kForwardFusedMaxRows] = {&linear_forward_fused<1>, &linear_forward_fused<2>,
                                                         &linear_forward_fused<3>, &linear_forward_fused<4>};
constexpr FusedFn kBackwardFused[kBackwardFusedMaxRows] = {
    &linear_backward_fused<1>, &linear_backward_fused<2>, &linear_backward_fused<3>};

}  // namespace

void linear_forward(float* out, const float* inp, const LinearWeight& w, const float* bias, int64_t N) {
  check_weight(w);
  const int IN = int(w.in), OUT = int(w.out);
  if (!w.dense && N >= 1 && N <= kForwardFusedMaxRows) {
    kForwardFused[N - 1](out, inp, w);
  } else if (w.dense && N == 1) {
    // One row (generation's lm_head): sgemv reads W once; sgemm packed all of
    // W first (measured: 22% of SmolLM2 generation in OpenBLAS's packing).
    cblas_sgemv(CblasRowMajor, CblasNoTrans, OUT, IN, 1.0f, w.dense, IN, inp, 1, 0.0f, out, 1);
  } else if (w.dense) {
    // out (N,OUT) = inp (N,IN) * W^T
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(N), OUT, IN, 1.0f, inp, IN, w.dense, IN, 0.0f,
                out, OUT);
  } else {
    const int64_t P = panel_rows(w);
    float* panel = panel_buffer(P * w.in);
    for (int64_t r0 = 0; r0 < w.out; r0 += P) {
      const int64_t r1 = std::min(w.out, r0 + P);
      linear_rows_fp32(panel, w, r0, r1);
      // out[:, r0:r1] (N,r1-r0) = inp (N,IN) * panel^T
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(N), int(r1 - r0), IN, 1.0f, inp, IN, panel, IN,
                  0.0f, out + r0, OUT);
    }
  }
  if (bias) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; ++i)
      for (int64_t o = 0; o < w.out; ++o) out[i * w.out + o] += bias[o];
  }
}

void linear_backward(float* dinp, const float* dout, const LinearWeight& w, int64_t N) {
  check_weight(w);
  const int IN = int(w.in), OUT = int(w.out);
  if (w.dense) {
    // dinp (N,IN) = dout (N,OUT) * W (OUT,IN)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(N), IN, OUT, 1.0f, dout, OUT, w.dense, IN,
                0.0f, dinp, IN);
    return;
  }
  if (N >= 1 && N <= kBackwardFusedMaxRows) {
    kBackwardFused[N - 1](dinp, dout, w);
    return;
  }
  const int64_t P = panel_rows(w);
  float* panel = panel_buffer(P * w.in);
  for (int64_t r0 = 0; r0 < w.out; r0 += P) {
    const int64_t r1 = std::min(w.out, r0 + P);
    linear_rows_fp32(panel, w, r0, r1);
    // dinp (N,IN) (+)= dout[:, r0:r1] (N,r1-r0) * panel (r1-r0,IN); the first panel assigns.
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(N), IN, int(r1 - r0), 1.0f, dout + r0, OUT,
                panel, IN, r0 == 0 ? 0.0f : 1.0f, dinp, IN);
  }
}

}  // namespace qlora::ops
