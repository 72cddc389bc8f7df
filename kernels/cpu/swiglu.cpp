// SwiGLU: out = silu(gate) * up, silu(g) = g * sigmoid(g).
#include <cmath>

#include "kernels/ops.h"

namespace qlora::ops {

void swiglu_forward(float* out, const float* gate, const float* up, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    const float s = 1.0f / (1.0f + std::exp(-g));
    out[i] = (g * s) * up[i];
  }
}

// d silu(g)/dg = s * (1 + g * (1 - s)).
void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate, const float* up, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    const float s = 1.0f / (1.0f + std::exp(-g));
    dup[i] = dout[i] * g * s;
    dgate[i] = dout[i] * up[i] * s * (1.0f + g * (1.0f - s));
  }
}

}  // namespace qlora::ops
