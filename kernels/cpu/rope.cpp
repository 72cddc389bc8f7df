// Rotary position embedding in the HF rotate-half layout: a head vector is
// split into halves [x1, x2] and pair (x1[j], x2[j]) turns by p * inv_freq[j].
// Frequencies and tables are computed in fp32 the way transformers does, so
// the reference matches torch to the last few ulps.
#include <cmath>
#include <numbers>

#include "kernels/ops.h"

namespace qlora::ops {

void rope_inv_freq(float* inv_freq, const RopeParams& p, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t j = 0; j < half; ++j) {
    // 1 / theta^(2j/D), every step in fp32 (torch: base ** (arange(0, D, 2).float() / D)).
    const float e = float(2 * j) / float(D);
    inv_freq[j] = 1.0f / std::pow(float(p.theta), e);
  }
  if (p.kind == RopeKind::Linear) {
    for (int64_t j = 0; j < half; ++j) inv_freq[j] = inv_freq[j] / float(p.factor);
  } else if (p.kind == RopeKind::Llama3) {
    // transformers' _compute_llama3_parameters: long wavelengths are slowed by
    // `factor`, short ones kept, the band between interpolated smoothly.
    const float factor = float(p.factor), lo = float(p.low_freq_factor), hi = float(p.high_freq_factor);
    const float old_ctx = float(p.original_max_positions);
    const float low_freq_wavelen = old_ctx / lo, high_freq_wavelen = old_ctx / hi;
    for (int64_t j = 0; j < half; ++j) {
      const float f = inv_freq[j];
      const float wavelen = 2.0f * std::numbers::pi_v<float> / f;
      const float scaled = wavelen > low_freq_wavelen ? f / factor : f;
      const float smooth = (old_ctx / wavelen - lo) / (hi - lo);
      const float smoothed = (1.0f - smooth) * scaled / factor + smooth * scaled;
      const bool medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
      inv_freq[j] = medium ? smoothed : scaled;
    }
  }
}

void rope_tables(float* cos, float* sin, const float* inv_freq, int64_t P, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t p = 0; p < P; ++p)
    for (int64_t j = 0; j < half; ++j) {
      const float a = float(p) * inv_freq[j];
      cos[p * half + j] = std::cos(a);
      sin[p * half + j] = std::sin(a);
    }
}

namespace {

// sign = +1 rotates forward, -1 applies the transpose (backward).
void rotate(float* x, const int32_t* pos, const float* cos, const float* sin, int64_t N, int64_t NH, int64_t D,
            float sign) {
  const int64_t half = D / 2;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const float* c = cos + int64_t(pos[i]) * half;
    const float* s = sin + int64_t(pos[i]) * half;
    for (int64_t h = 0; h < NH; ++h) {
      float* v = x + (i * NH + h) * D;
      for (int64_t j = 0; j < half; ++j) {
        const float x1 = v[j], x2 = v[j + half], sn = sign * s[j];
        v[j] = x1 * c[j] - x2 * sn;
        v[j + half] = x2 * c[j] + x1 * sn;
      }
    }
  }
}

}  // namespace

void rope_forward(float* x, const int32_t* pos, const float* cos, const float* sin, int64_t N, int64_t NH,
                  int64_t D) {
  rotate(x, pos, cos, sin, N, NH, D, 1.0f);
}

void rope_backward(float* dx, const int32_t* pos, const float* cos, const float* sin, int64_t N, int64_t NH,
                   int64_t D) {
  rotate(dx, pos, cos, sin, N, NH, D, -1.0f);
}

}  // namespace qlora::ops
