// The frozen linear: dense fp32 through sgemm, or 4-bit (NF4/FP4) blockwise
// weights dequantized panel by panel into a thread-local buffer, each panel
// multiplied with sgemm. The full fp32 layer never exists.
#include <cblas.h>

#include <algorithm>
#include <vector>

#include "core/error.h"
#include "kernels/ops.h"

namespace qlora::ops {

namespace {

// Values per dequantized panel: 1M floats (4 MiB) keeps the panel's sgemm
// wide enough to run near sgemm speed (see bench/bench_cpu_engine.cpp) while
// the buffer stays small next to any real layer (4096 x 4096 = 16M values).
constexpr int64_t kPanelFloats = int64_t(1) << 20;

int64_t panel_rows(const LinearWeight& w) { return std::max<int64_t>(1, std::min(w.out, kPanelFloats / w.in)); }

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
  float table[16];
  for (int c = 0; c < 16; ++c)
    table[c] = w.type == Quant4Type::NF4 ? nf4_code_value(uint8_t(c)) : fp4_code_value(uint8_t(c));
  const int64_t begin = r0 * w.in, end = r1 * w.in;
  const int64_t b0 = begin / w.block, b1 = (end + w.block - 1) / w.block;
  // One scale per block: the loop runs over blocks so the scale is read once.
#pragma omp parallel for schedule(static)
  for (int64_t b = b0; b < b1; ++b) {
    const float scale = w.absmax[b];
    const int64_t lo = std::max(begin, b * w.block), hi = std::min(end, (b + 1) * w.block);
    for (int64_t i = lo; i < hi; ++i) {
      const uint8_t byte = w.codes[i >> 1];
      const uint8_t code = (i & 1) ? (byte & 0x0f) : (byte >> 4);
      dst[i - begin] = table[code] * scale;
    }
  }
}

namespace {

// Up to this many input rows the forward pass dequantizes inside the dot
// products instead of through a panel and sgemm: at N = 1 (generation) the
// panel path spent most of its time writing and re-reading the fp32 panel
// (bench_cpu_engine: 4.0x sgemm before, see docs/benchmarks.md for after).
constexpr int64_t kFusedMaxRows = 4;

// out[n, o] = sum_k inp[n, k] * code[o, k] * scale(block of (o, k)), for
// n < N <= kFusedMaxRows. Runs over the row's elements in stretches that share
// one block scale; the codes are read a byte (two elements) at a time when the
// stretch starts on a byte boundary.
// N is a template parameter so the per-element loop over rows unrolls.
template <int64_t N>
void linear_forward_fused(float* out, const float* inp, const LinearWeight& w) {
  float table[16];
  for (int c = 0; c < 16; ++c)
    table[c] = w.type == Quant4Type::NF4 ? nf4_code_value(uint8_t(c)) : fp4_code_value(uint8_t(c));
  // Both values of every byte: one lookup per two elements.
  float pairs[256][2];
  for (int b = 0; b < 256; ++b) pairs[b][0] = table[b >> 4], pairs[b][1] = table[b & 0x0f];
#pragma omp parallel for schedule(static)
  for (int64_t o = 0; o < w.out; ++o) {
    float acc[N] = {};
    const int64_t row = o * w.in;
    for (int64_t k = 0; k < w.in;) {
      const int64_t i = row + k;
      const int64_t stretch = std::min(w.in - k, (i / w.block + 1) * w.block - i);
      float part[N] = {};
      int64_t j = 0;
      if ((i & 1) == 0) {
        const uint8_t* codes = w.codes + (i >> 1);
        for (; j + 2 <= stretch; j += 2) {
          const float* v = pairs[codes[j >> 1]];
          const float v0 = v[0], v1 = v[1];
          for (int64_t n = 0; n < N; ++n) part[n] += v0 * inp[n * w.in + k + j] + v1 * inp[n * w.in + k + j + 1];
        }
      }
      for (; j < stretch; ++j) {  // odd start or odd tail: one nibble at a time
        const float v = table[quant4_unpack(w.codes, i + j)];
        for (int64_t n = 0; n < N; ++n) part[n] += v * inp[n * w.in + k + j];
      }
      const float scale = w.absmax[i / w.block];
      for (int64_t n = 0; n < N; ++n) acc[n] += part[n] * scale;
      k += stretch;
    }
    for (int64_t n = 0; n < N; ++n) out[n * w.out + o] = acc[n];
  }
}

}  // namespace

void linear_forward(float* out, const float* inp, const LinearWeight& w, const float* bias, int64_t N) {
  check_weight(w);
  const int IN = int(w.in), OUT = int(w.out);
  if (!w.dense && N <= kFusedMaxRows) {
    switch (N) {
      case 1: linear_forward_fused<1>(out, inp, w); break;
      case 2: linear_forward_fused<2>(out, inp, w); break;
      case 3: linear_forward_fused<3>(out, inp, w); break;
      default: linear_forward_fused<4>(out, inp, w); break;
    }
  } else if (w.dense) {
    // out (N,OUT) = inp (N,IN) * W^T
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(N), OUT, IN, 1.0f, inp, IN, w.dense, IN, 0.0f, out,
                OUT);
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
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(N), IN, OUT, 1.0f, dout, OUT, w.dense, IN, 0.0f,
                dinp, IN);
    return;
  }
  const int64_t P = panel_rows(w);
  float* panel = panel_buffer(P * w.in);
  for (int64_t r0 = 0; r0 < w.out; r0 += P) {
    const int64_t r1 = std::min(w.out, r0 + P);
    linear_rows_fp32(panel, w, r0, r1);
    // dinp (N,IN) (+)= dout[:, r0:r1] (N,r1-r0) * panel (r1-r0,IN); the first panel assigns.
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(N), IN, int(r1 - r0), 1.0f, dout + r0, OUT, panel,
                IN, r0 == 0 ? 0.0f : 1.0f, dinp, IN);
  }
}

}  // namespace qlora::ops
