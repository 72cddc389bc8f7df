// Token embedding lookup. out is (N,C); wte is (V,C).
#include <cstring>

#include "core/error.h"
#include "kernels/ops.h"

namespace qlora::ops {

void embedding_forward(float* out, const int32_t* tokens, const float* wte, int64_t N, int64_t C, int64_t V) {
  for (int64_t i = 0; i < N; ++i) {
    const int32_t t = tokens[i];
    if (t < 0 || t >= V) fail("token id ", t, " at position ", i, " is outside the vocabulary [0, ", V, ")");
    std::memcpy(out + i * C, wte + int64_t(t) * C, size_t(C) * sizeof(float));
  }
}

}  // namespace qlora::ops
