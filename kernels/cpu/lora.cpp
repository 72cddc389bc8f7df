// The LoRA branch y += scale * dropout(x) A^T B^T and its counter-based dropout.
#include <cblas.h>

#include "kernels/ops.h"

namespace qlora::ops {

void lora_forward(float* out, float* h, const float* xd, const float* A, const float* B, float scale, int64_t N,
                  int64_t IN, int64_t OUT, int64_t R) {
  // h (N,R) = xd (N,IN) A^T
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(N), int(R), int(IN), 1.0f, xd, int(IN), A, int(IN),
              0.0f, h, int(R));
  // out (N,OUT) += scale * h (N,R) B^T
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(N), int(OUT), int(R), scale, h, int(R), B, int(R),
              1.0f, out, int(OUT));
}

void lora_backward(float* dinp, float* dA, float* dB, float* dh, const float* dout, const float* h, const float* xd,
                   const float* A, const float* B, float scale, int64_t N, int64_t IN, int64_t OUT, int64_t R) {
  // dB (OUT,R) += scale * dout^T (OUT,N) h (N,R)
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(OUT), int(R), int(N), scale, dout, int(OUT), h, int(R),
              1.0f, dB, int(R));
  // dh (N,R) = scale * dout (N,OUT) B (OUT,R)
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(N), int(R), int(OUT), scale, dout, int(OUT), B, int(R),
              0.0f, dh, int(R));
  // dA (R,IN) += dh^T (R,N) xd (N,IN)
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(R), int(IN), int(N), 1.0f, dh, int(R), xd, int(IN), 1.0f,
              dA, int(IN));
  // dinp (N,IN) += dh (N,R) A (R,IN)
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(N), int(IN), int(R), 1.0f, dh, int(R), A, int(IN),
              1.0f, dinp, int(IN));
}

namespace {

// splitmix64 of (seed, index): a stateless keep/drop decision, identical
// however often and on whichever thread it is recomputed.
bool keep(uint64_t seed, int64_t i, float p) {
  uint64_t z = seed + 0x9e3779b97f4a7c15ull * (uint64_t(i) + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  const float u = float(z >> 40) * (1.0f / 16777216.0f);  // 24 bits -> [0, 1)
  return u >= p;
}

}  // namespace

void dropout_forward(float* out, const float* inp, int64_t n, float p, uint64_t seed) {
  const float s = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = (p > 0.0f && !keep(seed, i, p)) ? 0.0f : inp[i] * s;
}

void dropout_backward_accumulate(float* dinp, const float* dout, int64_t n, float p, uint64_t seed) {
  const float s = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i)
    if (!(p > 0.0f && !keep(seed, i, p))) dinp[i] += dout[i] * s;
}

}  // namespace qlora::ops
