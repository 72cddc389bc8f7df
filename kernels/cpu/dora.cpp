// DoRA's weight norm and its magnitude scaling (kernels/ops.h), as PEFT 0.22
// computes them (peft/tuners/lora/dora.py: DoraLinearLayer.get_weight_norm
// and forward).
#include <cblas.h>

#include <algorithm>
#include <cmath>

#include "kernels/ops.h"

namespace qlora::ops {

void dora_weight_norm(float* wnorm, float* panel, const LinearWeight& w, const float* A, const float* B,
                      float scale, int64_t R) {
  const int64_t IN = w.in;
  for (int64_t r0 = 0; r0 < w.out; r0 += kDoraPanelRows) {
    const int64_t r1 = std::min(w.out, r0 + kDoraPanelRows);
    // panel (r1-r0, IN) = W[r0:r1] + s * B[r0:r1] (rows, R) A (R, IN)
    linear_rows_fp32(panel, w, r0, r1);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(r1 - r0), int(IN), int(R), scale, B + r0 * R, int(R),
                A, int(IN), 1.0f, panel, int(IN));
#pragma omp parallel for schedule(static)
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = panel + (r - r0) * IN;
      double ss = 0.0;
      for (int64_t i = 0; i < IN; ++i) ss += double(row[i]) * double(row[i]);
      wnorm[r] = float(std::sqrt(ss));
    }
  }
}

void dora_forward(float* out, const float* base, const float* lora, const float* m, const float* wnorm, int64_t N,
                  int64_t OUT) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < OUT; ++j) {
      // PEFT: mag_norm_scale = m / wnorm; (mag_norm_scale - 1) * base + mag_norm_scale * lora
      const float g = m[j] / wnorm[j];
      const int64_t k = i * OUT + j;
      out[k] += (g - 1.0f) * base[k] + g * lora[k];
    }
}

void dora_backward(float* dbase, float* dlora, float* dm, const float* dout, const float* base, const float* lora,
                   const float* m, const float* wnorm, int64_t N, int64_t OUT) {
  // dm first: dbase and dlora may overwrite base and lora (in place).
  // Column sums in double, rows in order: independent of the thread count.
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < OUT; ++j) {
    double acc = 0.0;
    for (int64_t i = 0; i < N; ++i)
      acc += double(dout[i * OUT + j]) * (double(base[i * OUT + j]) + double(lora[i * OUT + j]));
    dm[j] += float(acc / double(wnorm[j]));
  }
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < OUT; ++j) {
      const float g = m[j] / wnorm[j];
      const int64_t k = i * OUT + j;
      if (dbase) dbase[k] = dout[k] * (g - 1.0f);
      dlora[k] = dout[k] * g;
    }
}

}  // namespace qlora::ops
