// Causal grouped-query attention with document masks for packed rows.
// Forward keeps only the log-sum-exp of each softmax row; backward recomputes
// the probabilities from it (memory O(B*H*T) instead of O(B*H*T*T)).
#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/ops.h"

namespace qlora::ops {

namespace {

// Accumulated in double: the score differences dp - sum(p dp) in backward
// cancel, and fp32 sums there put the golden gradients past 1e-4.
double dotd(const float* a, const float* b, int64_t D) {
  double s = 0.0;
  for (int64_t d = 0; d < D; ++d) s += double(a[d]) * double(b[d]);
  return s;
}
float dot(const float* a, const float* b, int64_t D) { return float(dotd(a, b, D)); }

// One query against keys/values [s0, s1] (strides in floats between
// consecutive positions), online softmax: o = sum p_s v_s, returns lse.
float attend(float* o, const float* q, const float* k, const float* v, int64_t s0, int64_t s1, int64_t stride,
             int64_t D, float scale) {
  float m = -std::numeric_limits<float>::infinity(), l = 0.0f;
  std::fill(o, o + D, 0.0f);
  for (int64_t s = s0; s <= s1; ++s) {
    const float sc = dot(q, k + s * stride, D) * scale;
    if (sc > m) {
      // A new maximum: rescale what was accumulated against the old one.
      const float r = std::exp(m - sc);
      l *= r;
      for (int64_t d = 0; d < D; ++d) o[d] *= r;
      m = sc;
    }
    const float p = std::exp(sc - m);
    l += p;
    const float* vs = v + s * stride;
    for (int64_t d = 0; d < D; ++d) o[d] += p * vs[d];
  }
  for (int64_t d = 0; d < D; ++d) o[d] /= l;
  return m + std::log(l);
}

}  // namespace

void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       const int32_t* doc_start, int64_t B, int64_t T, int64_t H, int64_t KVH, int64_t D) {
  const int64_t group = H / KVH;
  const float scale = 1.0f / std::sqrt(float(D));
#pragma omp parallel for collapse(3) schedule(static)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t kvh = h / group;
        const float* qt = q + ((b * T + t) * H + h) * D;
        const float* kb = k + (b * T * KVH + kvh) * D;  // key of position s at kb + s*KVH*D
        const float* vb = v + (b * T * KVH + kvh) * D;
        float* o = out + ((b * T + t) * H + h) * D;
        lse[(b * H + h) * T + t] = attend(o, qt, kb, vb, doc_start[b * T + t], t, KVH * D, D, scale);
      }
}

// With p_s = exp(score_s - lse) and dp_s = dout . v_s:
//   dscore_s = p_s (dp_s - sum_s' p_s' dp_s') and sum_s' p_s' dp_s' = dout . out.
void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* out, const float* lse,
                        const float* q, const float* k, const float* v, const int32_t* doc_start, int64_t B,
                        int64_t T, int64_t H, int64_t KVH, int64_t D) {
  const int64_t group = H / KVH;
  const float scale = 1.0f / std::sqrt(float(D));
  // One thread owns one (row, kv head): every dk/dv it writes is its own.
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t kvh = 0; kvh < KVH; ++kvh) {
      for (int64_t t = 0; t < T; ++t) {
        std::fill_n(dk + ((b * T + t) * KVH + kvh) * D, D, 0.0f);
        std::fill_n(dv + ((b * T + t) * KVH + kvh) * D, D, 0.0f);
      }
      for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h)
        for (int64_t t = 0; t < T; ++t) {
          const int64_t qi = ((b * T + t) * H + h) * D;
          const float* qt = q + qi;
          const float* dot_ = dout + qi;
          float* dqt = dq + qi;
          std::fill_n(dqt, D, 0.0f);
          const float L = lse[(b * H + h) * T + t];
          const double Dt = dotd(dot_, out + qi, D);
          for (int64_t s = doc_start[b * T + t]; s <= t; ++s) {
            const int64_t ki = ((b * T + s) * KVH + kvh) * D;
            const float p = std::exp(dot(qt, k + ki, D) * scale - L);
            const float ds = float(double(p) * (dotd(dot_, v + ki, D) - Dt)) * scale;
            for (int64_t d = 0; d < D; ++d) {
              dqt[d] += ds * k[ki + d];
              dk[ki + d] += ds * qt[d];
              dv[ki + d] += p * dot_[d];
            }
          }
        }
    }
}

void attention_cached_forward(float* out, const float* q, const float* kcache, const float* vcache, int64_t past,
                              int64_t T, int64_t H, int64_t KVH, int64_t D, int64_t window) {
  const int64_t group = H / KVH;
  const float scale = 1.0f / std::sqrt(float(D));
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t kvh = h / group;
      const int64_t first = window > 0 ? std::max<int64_t>(0, past + t - window + 1) : 0;
      attend(out + (t * H + h) * D, q + (t * H + h) * D, kcache + kvh * D, vcache + kvh * D, first, past + t,
             KVH * D, D, scale);
    }
}

}  // namespace qlora::ops
