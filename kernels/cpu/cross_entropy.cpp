// lm_head + cross entropy over vocabulary chunks: logits exist only as one
// (rows x vchunk) tile at a time, folded into an online log-sum-exp per row.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.h"
#include "kernels/ops.h"

namespace qlora::ops {

namespace {

void check_targets(const int32_t* targets, int64_t N, int64_t V) {
  for (int64_t i = 0; i < N; ++i)
    if (targets[i] != kIgnoreIndex && (targets[i] < 0 || targets[i] >= V))
      fail("target id ", targets[i], " at position ", i, " is outside the vocabulary [0, ", V, ") and is not ",
           kIgnoreIndex);
}

// tile (rows,vc) = x[i0:i0+rows] (rows,C) W[v0:v0+vc]^T
void logits_tile(float* tile, const float* x, const float* W, int64_t i0, int64_t rows, int64_t v0, int64_t vc,
                 int64_t C) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(rows), int(vc), int(C), 1.0f, x + i0 * C, int(C),
              W + v0 * C, int(C), 0.0f, tile, int(vc));
}

}  // namespace

double lm_head_cross_entropy_forward(float* losses, float* lse, const float* x, const float* W,
                                     const int32_t* targets, float* scratch, CeChunking ch, int64_t N, int64_t C,
                                     int64_t V) {
  check_targets(targets, N, V);
  double total = 0.0;
  for (int64_t i0 = 0; i0 < N; i0 += ch.rows) {
    const int64_t rows = std::min(ch.rows, N - i0);
    // Running max in lse, running sum of exp(logit - max) in losses.
    std::fill_n(lse + i0, rows, -std::numeric_limits<float>::infinity());
    std::fill_n(losses + i0, rows, 0.0f);
    for (int64_t v0 = 0; v0 < V; v0 += ch.vchunk) {
      const int64_t vc = std::min(ch.vchunk, V - v0);
      logits_tile(scratch, x, W, i0, rows, v0, vc, C);
#pragma omp parallel for schedule(static)
      for (int64_t r = 0; r < rows; ++r) {
        const float* z = scratch + r * vc;
        float m = lse[i0 + r];
        const float tile_max = *std::max_element(z, z + vc);
        float l = losses[i0 + r];
        if (tile_max > m) {
          l *= std::exp(m - tile_max);
          m = tile_max;
        }
        for (int64_t j = 0; j < vc; ++j) l += std::exp(z[j] - m);
        lse[i0 + r] = m;
        losses[i0 + r] = l;
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      lse[i] = lse[i] + std::log(losses[i]);
      losses[i] = 0.0f;
      if (targets[i] == kIgnoreIndex) continue;
      const float* w = W + int64_t(targets[i]) * C;
      float z = 0.0f;
      for (int64_t c = 0; c < C; ++c) z += x[i * C + c] * w[c];
      losses[i] = lse[i] - z;
      total += losses[i];
    }
  }
  return total;
}

// dlogit = (softmax - onehot(target)) * grad_scale; dx = dlogits W.
void lm_head_cross_entropy_backward(float* dx, const float* x, const float* W, const float* lse,
                                    const int32_t* targets, float grad_scale, float* scratch, CeChunking ch,
                                    int64_t N, int64_t C, int64_t V) {
  check_targets(targets, N, V);
  for (int64_t i0 = 0; i0 < N; i0 += ch.rows) {
    const int64_t rows = std::min(ch.rows, N - i0);
    for (int64_t v0 = 0; v0 < V; v0 += ch.vchunk) {
      const int64_t vc = std::min(ch.vchunk, V - v0);
      logits_tile(scratch, x, W, i0, rows, v0, vc, C);
#pragma omp parallel for schedule(static)
      for (int64_t r = 0; r < rows; ++r) {
        float* z = scratch + r * vc;
        const int32_t t = targets[i0 + r];
        if (t == kIgnoreIndex) {
          std::fill_n(z, vc, 0.0f);
          continue;
        }
        const float L = lse[i0 + r];
        for (int64_t j = 0; j < vc; ++j) z[j] = std::exp(z[j] - L) * grad_scale;
        if (t >= v0 && t < v0 + vc) z[t - v0] -= grad_scale;
      }
      // dx[i0:i0+rows] (rows,C) (+)= tile (rows,vc) W[v0:v0+vc] (vc,C); the first chunk assigns.
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(rows), int(C), int(vc), 1.0f, scratch, int(vc),
                  W + v0 * C, int(C), v0 == 0 ? 0.0f : 1.0f, dx + i0 * C, int(C));
    }
  }
}

}  // namespace qlora::ops
