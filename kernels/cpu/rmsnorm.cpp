// RMSNorm (Llama) and the residual add.
#include <cmath>

#include "kernels/ops.h"

namespace qlora::ops {

void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N, int64_t C,
                     float eps) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const float* x = inp + i * C;
    float* o = out + i * C;
    // Sum in double: the reference should carry less error than any backend
    // checked against it.
    double ss = 0.0;
    for (int64_t c = 0; c < C; ++c) ss += double(x[c]) * double(x[c]);
    const float r = 1.0f / std::sqrt(float(ss / double(C)) + eps);
    for (int64_t c = 0; c < C; ++c) o[c] = weight[c] * (x[c] * r);
    rstd[i] = r;
  }
}

// With xhat = x * rstd and y = w * xhat:
//   dx = rstd * (w*dy - xhat * mean(w*dy * xhat))
void rmsnorm_backward(float* dinp, const float* dout, const float* inp, const float* weight, const float* rstd,
                      int64_t N, int64_t C) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const float* x = inp + i * C;
    const float* dy = dout + i * C;
    float* dx = dinp + i * C;
    const float r = rstd[i];
    double dot = 0.0;
    for (int64_t c = 0; c < C; ++c) dot += double(weight[c] * dy[c]) * double(x[c] * r);
    const float m = float(dot / double(C));
    for (int64_t c = 0; c < C; ++c) dx[c] = r * (weight[c] * dy[c] - x[c] * r * m);
  }
}

void residual_forward(float* out, const float* a, const float* b, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

}  // namespace qlora::ops
