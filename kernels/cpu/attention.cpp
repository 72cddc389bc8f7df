// Causal grouped-query attention with document masks for packed rows.
// Forward keeps only the log-sum-exp of each softmax row; backward recomputes
// the probabilities from it (memory O(B*H*T) plus two kQueryTile x T score
// tiles per thread, instead of O(B*H*T*T)).
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

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

// Training attention runs in tiles of queries: for each (row, head) and each
// tile of up to kQueryTile queries, the scores against the keys the tile can
// see are one sgemm, the softmax a pass over the tile, the output a second
// sgemm (backward: five). The per-pair loop before it (dot products in double,
// one pair at a time) took 35% of a SmolLM2 training step at seq 256 for 5% of
// its FLOPs (docs/benchmarks.md). Keys before the tile's first document start
// and after its last query are never touched; inside the tile's key range the
// causal and document masks zero the probabilities, so the wasted work is the
// upper triangle of each diagonal block (about kQueryTile/2 keys per query).
constexpr int64_t kQueryTile = 64;

// The calling thread's score tiles: kQueryTile x T floats each, grown once.
float* tile_buffer(int64_t floats, int which) {
  thread_local std::vector<float> buf[2];
  if (int64_t(buf[which].size()) < floats) buf[which].resize(size_t(floats));
  return buf[which].data();
}

// The parallel loops below call sgemm from every OpenMP thread on tiles that
// fit in cache: OpenBLAS must run each call on its caller's thread (its own
// pool would queue the calls behind one lock and spin beside the OpenMP
// threads), so it is set to one thread for the loop and restored after.
class SerialBlas {
 public:
  SerialBlas() : saved_(openblas_get_num_threads()) { openblas_set_num_threads(1); }
  ~SerialBlas() { openblas_set_num_threads(saved_); }
  SerialBlas(const SerialBlas&) = delete;
  SerialBlas& operator=(const SerialBlas&) = delete;

 private:
  int saved_;
};

// The first key any query of [t0, t1) of a row may see.
int64_t first_key(const int32_t* doc_row, int64_t t0, int64_t t1) {
  int64_t s0 = t1 - 1;
  for (int64_t t = t0; t < t1; ++t) s0 = std::min<int64_t>(s0, doc_row[t]);
  return s0;
}

}  // namespace

int64_t attention_scratch_floats(int64_t T) { return kQueryTile * T; }

void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       const int32_t* doc_start, int64_t B, int64_t T, int64_t H, int64_t KVH, int64_t D) {
  const int64_t group = H / KVH, ldq = H * D, ldk = KVH * D;
  const float scale = 1.0f / std::sqrt(float(D));
  const SerialBlas serial;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int32_t* doc = doc_start + b * T;
      const float* kb = k + (b * T * KVH + h / group) * D;  // key of position s at kb + s*ldk
      const float* vb = v + (b * T * KVH + h / group) * D;
      float* S = tile_buffer(attention_scratch_floats(T), 0);
      for (int64_t t0 = 0; t0 < T; t0 += kQueryTile) {
        const int64_t t1 = std::min(T, t0 + kQueryTile), nq = t1 - t0, s0 = first_key(doc, t0, t1), nk = t1 - s0;
        const float* qt = q + ((b * T + t0) * H + h) * D;
        // S (nq, nk) = scale Q[t0:t1] K[s0:t1]^T
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(nq), int(nk), int(D), scale, qt, int(ldq),
                    kb + s0 * ldk, int(ldk), 0.0f, S, int(nk));
        for (int64_t i = 0; i < nq; ++i) {
          const int64_t t = t0 + i, lo = doc[t] - s0, hi = t - s0;  // visible keys [lo, hi]
          float* row = S + i * nk;
          float m = row[lo];
          for (int64_t j = lo + 1; j <= hi; ++j) m = std::max(m, row[j]);
          float l = 0.0f;
          for (int64_t j = lo; j <= hi; ++j) l += row[j] = std::exp(row[j] - m);
          const float inv = 1.0f / l;
          std::fill(row, row + lo, 0.0f);
          for (int64_t j = lo; j <= hi; ++j) row[j] *= inv;
          std::fill(row + hi + 1, row + nk, 0.0f);
          lse[(b * H + h) * T + t] = m + std::log(l);
        }
        // out[t0:t1] (nq, D) = P V[s0:t1]
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(nq), int(D), int(nk), 1.0f, S, int(nk),
                    vb + s0 * ldk, int(ldk), 0.0f, out + ((b * T + t0) * H + h) * D, int(ldq));
      }
    }
}

// With p_s = exp(score_s - lse) and dp_s = dout . v_s:
//   dscore_s = p_s (dp_s - sum_s' p_s' dp_s') and sum_s' p_s' dp_s' = dout . out.
void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* out, const float* lse,
                        const float* q, const float* k, const float* v, const int32_t* doc_start, int64_t B,
                        int64_t T, int64_t H, int64_t KVH, int64_t D) {
  const int64_t group = H / KVH, ldq = H * D, ldk = KVH * D;
  const float scale = 1.0f / std::sqrt(float(D));
  const SerialBlas serial;
  // One thread owns one (row, kv head): every dk/dv it writes is its own, and
  // the heads of its group add into them in order.
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t kvh = 0; kvh < KVH; ++kvh) {
      const int32_t* doc = doc_start + b * T;
      const int64_t kvo = (b * T * KVH + kvh) * D;  // key of position s at kvo + s*ldk
      for (int64_t t = 0; t < T; ++t) {
        std::fill_n(dk + kvo + t * ldk, D, 0.0f);
        std::fill_n(dv + kvo + t * ldk, D, 0.0f);
      }
      float* P = tile_buffer(attention_scratch_floats(T), 0);
      float* dS = tile_buffer(attention_scratch_floats(T), 1);
      for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h)
        for (int64_t t0 = 0; t0 < T; t0 += kQueryTile) {
          const int64_t t1 = std::min(T, t0 + kQueryTile), nq = t1 - t0, s0 = first_key(doc, t0, t1),
                        nk = t1 - s0, qo = ((b * T + t0) * H + h) * D;
          // P = exp(scale Q K^T - lse), masked; dS first holds dP = dO V^T.
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(nq), int(nk), int(D), scale, q + qo, int(ldq),
                      k + kvo + s0 * ldk, int(ldk), 0.0f, P, int(nk));
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(nq), int(nk), int(D), 1.0f, dout + qo,
                      int(ldq), v + kvo + s0 * ldk, int(ldk), 0.0f, dS, int(nk));
          for (int64_t i = 0; i < nq; ++i) {
            const int64_t t = t0 + i, lo = doc[t] - s0, hi = t - s0;
            const float L = lse[(b * H + h) * T + t];
            // In double: dp_s - dout.out cancels where p_s is large.
            const double Dt = dotd(dout + qo + i * ldq, out + qo + i * ldq, D);
            float* p = P + i * nk;
            float* ds = dS + i * nk;
            std::fill(p, p + lo, 0.0f);
            std::fill(ds, ds + lo, 0.0f);
            for (int64_t j = lo; j <= hi; ++j) {
              p[j] = std::exp(p[j] - L);
              ds[j] = float(double(p[j]) * (double(ds[j]) - Dt)) * scale;
            }
            std::fill(p + hi + 1, p + nk, 0.0f);
            std::fill(ds + hi + 1, ds + nk, 0.0f);
          }
          // dQ[t0:t1] = dS K[s0:t1]; dK[s0:t1] += dS^T Q[t0:t1]; dV[s0:t1] += P^T dO[t0:t1]
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(nq), int(D), int(nk), 1.0f, dS, int(nk),
                      k + kvo + s0 * ldk, int(ldk), 0.0f, dq + qo, int(ldq));
          cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(nk), int(D), int(nq), 1.0f, dS, int(nk), q + qo,
                      int(ldq), 1.0f, dk + kvo + s0 * ldk, int(ldk));
          cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(nk), int(D), int(nq), 1.0f, P, int(nk),
                      dout + qo, int(ldq), 1.0f, dv + kvo + s0 * ldk, int(ldk));
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
