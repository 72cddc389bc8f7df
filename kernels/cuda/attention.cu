// Causal GQA attention with document masks on the GPU (kernels/cuda/attention_cuda.h):
// forward with an online softmax over key tiles, backward from the saved lse.
//
// Plain fp32 FMA on tiles in shared memory, no tensor cores yet (correctness
// first). Every kernel runs 256 threads as a 16 x 16 grid: ty = threadIdx.x / 16
// owns rows ty*RM .. ty*RM + RM-1 of a tile, tx = threadIdx.x % 16 owns the
// columns tx, tx+16, tx+32, ... The 16 threads of one ty are one half of a
// warp, so a reduction along a tile row is an xor shuffle over offsets 8..1,
// which never leaves that half (and gives every lane the same bits: each step
// adds the same two values, in either order).
//
// Shared-memory tiles whose rows are read by the 16 different tx at once (K in
// Q K^T, Q in K Q^T, ...) have an odd row stride kD+1, so those rows fall on 16
// different banks. The head dim is padded to a bucket kD (32, 64, 128, 256)
// with zeros in shared memory: zeros add nothing to a dot product, and padded
// columns are never stored.
//
// Masks: (t, s) is allowed when t < T (not a padding row), s <= t (causal,
// which also keeps s < T) and s >= doc_start[t] (same document). Key tiles
// before the smallest doc_start of a query tile, and after its last row, are
// skipped; doc_start need not be monotone (only in [0, t], as ops.h says).
//
// Summation orders are fixed and nothing is atomic: the results are
// deterministic.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <tuple>
#include <utility>

#include "core/error.h"
#include "kernels/cuda/attention_cuda.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/device.h"

namespace qlora::cuda_ops {

using namespace cuda_detail;

namespace {

constexpr int kTx = 16;              // threads along a tile row (columns tx + 16 j)
constexpr int kTy = kThreads / kTx;  // thread rows
static_assert(kThreads == 256 && kTx * kTy == kThreads, "the tile layouts below assume 16 x 16 threads");
constexpr int kMaxHeadDim = 256;
// What the Small tiles must fit: the opt-in shared memory per block of sm_86, sm_89 and sm_120.
constexpr size_t kSmallTileSmem = size_t(99) << 10;

// Everything the kernels read, as one struct passed by value. A (B,T,N,D)
// tensor holds head n of position t of row b at ((b*T + t)*N + n)*D: the
// strides below are the elements between consecutive positions of one head.
struct AttentionParams {
  const uint16_t* q = nullptr;          // (B,T,H,D) bf16
  const uint16_t* k = nullptr;          // (B,T,KVH,D) bf16
  const uint16_t* v = nullptr;          // (B,T,KVH,D) bf16
  const int32_t* doc_start = nullptr;   // (B,T)
  uint16_t* out = nullptr;              // (B,T,H,D) bf16: forward's output
  float* lse_out = nullptr;             // (B,H,T): forward's output
  const uint16_t* dout = nullptr;       // (B,T,H,D) bf16: backward's input
  const uint16_t* out_saved = nullptr;  // (B,T,H,D) bf16: forward's out, backward's input
  const float* lse = nullptr;           // (B,H,T): forward's lse, backward's input
  float* delta = nullptr;               // (B,H,T) workspace: rowsum(dout * out)
  uint16_t* dq = nullptr;               // (B,T,H,D) bf16
  uint16_t* dk = nullptr;               // (B,T,KVH,D) bf16
  uint16_t* dv = nullptr;               // (B,T,KVH,D) bf16
  int64_t B = 0, T = 0, H = 0, KVH = 0, D = 0;
  int64_t group = 1;      // H / KVH: query heads per kv head
  int64_t q_stride = 0;   // H*D: q, out, dout, dq
  int64_t kv_stride = 0;  // KVH*D: k, v, dk, dv
  float scale = 1.0f;     // 1/sqrt(D)
};

// ---- device helpers ---------------------------------------------------------------

// Rows [t0, t0 + kRows) of one head (head0 points at position 0 of it) into
// tile (kRows x kD, row stride ld) as fp32; rows past T and columns past D are 0.
template <int kRows, int kD>
__device__ __forceinline__ void load_tile(float* __restrict__ tile, int ld,
                                          const uint16_t* __restrict__ head0, int64_t stride, int64_t t0,
                                          int64_t T, int D) {
  for (int e = int(threadIdx.x); e < kRows * kD; e += kThreads) {
    const int r = e / kD, d = e % kD;
    const int64_t t = t0 + r;
    tile[r * ld + d] = (t < T && d < D) ? bf16_to_f32(head0[t * stride + d]) : 0.0f;
  }
}

// doc_start of rows [t0, t0 + kRows) of one batch row; INT_MAX (sees nothing) past T.
template <int kRows>
__device__ __forceinline__ void load_docs(int* __restrict__ docs, const int32_t* __restrict__ row_docs,
                                          int64_t t0, int64_t T) {
  for (int r = int(threadIdx.x); r < kRows; r += kThreads) docs[r] = t0 + r < T ? row_docs[t0 + r] : INT_MAX;
}

// fp32 values of one row of (B,H,T) for rows [t0, t0 + kRows); 0 past T.
template <int kRows>
__device__ __forceinline__ void load_row_values(float* __restrict__ dst, const float* __restrict__ src,
                                                int64_t t0, int64_t T) {
  for (int r = int(threadIdx.x); r < kRows; r += kThreads) dst[r] = t0 + r < T ? src[t0 + r] : 0.0f;
}

// The smallest key a tile's rows may attend to (docs as load_docs wrote them).
template <int kRows>
__device__ __forceinline__ int64_t first_key(const int* __restrict__ docs) {
  int lo = INT_MAX;
  for (int r = 0; r < kRows; ++r) lo = min(lo, max(docs[r], 0));
  return lo;
}

__device__ __forceinline__ bool allowed(int64_t t, int64_t s, int doc, int64_t T) {
  return t < T && s <= t && s >= doc;
}

// acc[i][j] += sum_k A[ty*kRM + i][k] * Bm[tx + 16 j][k]   (A Bm^T; rows of both are contiguous in k)
template <int kRM, int kRN, int kK>
__device__ __forceinline__ void tile_abt(float (&acc)[kRM][kRN], const float* __restrict__ A, int lda,
                                         const float* __restrict__ Bm, int ldb, int ty, int tx) {
#pragma unroll 4
  for (int k = 0; k < kK; ++k) {
    float a[kRM], b[kRN];
#pragma unroll
    for (int i = 0; i < kRM; ++i) a[i] = A[(ty * kRM + i) * lda + k];
#pragma unroll
    for (int j = 0; j < kRN; ++j) b[j] = Bm[(tx + kTx * j) * ldb + k];
#pragma unroll
    for (int i = 0; i < kRM; ++i)
#pragma unroll
      for (int j = 0; j < kRN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
  }
}

// acc[i][j] += sum_k A[ty*kRM + i][k] * Bm[k][tx + 16 j]   (A Bm)
template <int kRM, int kRN, int kK>
__device__ __forceinline__ void tile_ab(float (&acc)[kRM][kRN], const float* __restrict__ A, int lda,
                                        const float* __restrict__ Bm, int ldb, int ty, int tx) {
#pragma unroll 4
  for (int k = 0; k < kK; ++k) {
    float a[kRM], b[kRN];
#pragma unroll
    for (int i = 0; i < kRM; ++i) a[i] = A[(ty * kRM + i) * lda + k];
#pragma unroll
    for (int j = 0; j < kRN; ++j) b[j] = Bm[k * ldb + tx + kTx * j];
#pragma unroll
    for (int i = 0; i < kRM; ++i)
#pragma unroll
      for (int j = 0; j < kRN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
  }
}

// Max and sum over the 16 lanes of a half warp (the threads of one tile row).
__device__ __forceinline__ float row_max16(float v) {
#pragma unroll
  for (int off = kTx / 2; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ float row_sum16(float v) {
#pragma unroll
  for (int off = kTx / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// ---- forward ----------------------------------------------------------------------

// Shared memory of the forward kernel, in 4-byte words: Q (kBq x kD), K (kBk x kD),
// V (kBk x kD), P (kBq x kBk) in fp32, then the query rows' doc_start (int32).
template <int kD, int kBq, int kBk>
struct ForwardTiles {
  static_assert(kD % kTx == 0 && kBq % kTy == 0 && kBk % kTx == 0, "tiles must split over 16 x 16 threads");
  static constexpr int kRM = kBq / kTy, kSN = kBk / kTx, kON = kD / kTx;
  static constexpr int ldq = kD + 1, ldk = kD + 1, ldv = kD, ldp = kBk + 1;
  static constexpr int q_at = 0, k_at = q_at + kBq * ldq, v_at = k_at + kBk * ldk, p_at = v_at + kBk * ldv,
                       doc_at = p_at + kBq * ldp;
  static constexpr size_t bytes = size_t(doc_at + kBq) * 4;
};

// One block per (query tile, head, batch row). For each key tile: S = Q K^T
// scaled and masked, the running row maximum m and partial sums l (each
// thread's l covers its own columns, summed over the row at the end), P =
// exp(S - m) through shared memory, O += P V.
template <int kD, int kBq, int kBk>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(const AttentionParams p) {
  using L = ForwardTiles<kD, kBq, kBk>;
  constexpr int kRM = L::kRM, kSN = L::kSN, kON = L::kON;
  extern __shared__ float smem[];
  float* Qs = smem + L::q_at;
  float* Ks = smem + L::k_at;
  float* Vs = smem + L::v_at;
  float* Ps = smem + L::p_at;
  int* docs = reinterpret_cast<int*>(smem + L::doc_at);

  const int tx = int(threadIdx.x) % kTx, ty = int(threadIdx.x) / kTx;
  const int64_t T = p.T, b = blockIdx.z, h = blockIdx.y, q0 = int64_t(blockIdx.x) * kBq;
  const int64_t kvh = h / p.group;
  const int D = int(p.D);
  const uint16_t* q_head = p.q + b * T * p.q_stride + h * p.D;
  const uint16_t* k_head = p.k + b * T * p.kv_stride + kvh * p.D;
  const uint16_t* v_head = p.v + b * T * p.kv_stride + kvh * p.D;

  load_tile<kBq, kD>(Qs, L::ldq, q_head, p.q_stride, q0, T, D);
  load_docs<kBq>(docs, p.doc_start + b * T, q0, T);
  __syncthreads();
  const int64_t q_end = min(q0 + kBq, T);  // rows [q0, q_end); causal: keys < q_end
  const int64_t s_begin = first_key<kBq>(docs);

  float m[kRM], l[kRM], o[kRM][kON];
#pragma unroll
  for (int i = 0; i < kRM; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
#pragma unroll
    for (int j = 0; j < kON; ++j) o[i][j] = 0.0f;
  }

  for (int64_t s0 = (s_begin / kBk) * kBk; s0 < q_end; s0 += kBk) {
    __syncthreads();  // the previous tile's readers of Ks, Vs, Ps are done
    load_tile<kBk, kD>(Ks, L::ldk, k_head, p.kv_stride, s0, T, D);
    load_tile<kBk, kD>(Vs, L::ldv, v_head, p.kv_stride, s0, T, D);
    __syncthreads();

    float sc[kRM][kSN] = {};
    tile_abt<kRM, kSN, kD>(sc, Qs, L::ldq, Ks, L::ldk, ty, tx);
#pragma unroll
    for (int i = 0; i < kRM; ++i) {
      const int r = ty * kRM + i;
      const int64_t t = q0 + r;
      const int doc = docs[r];
      float tile_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < kSN; ++j) {
        const int64_t s = s0 + tx + kTx * j;
        sc[i][j] = allowed(t, s, doc, T) ? sc[i][j] * p.scale : -INFINITY;
        tile_max = fmaxf(tile_max, sc[i][j]);
      }
      const float m_new = fmaxf(m[i], row_max16(tile_max));
      // While every score so far is masked, m_new is -inf: exponents against 0
      // instead keep exp(-inf - -inf) = NaN out (every p and alpha is then 0).
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = expf(m[i] - m_use);
      m[i] = m_new;
      l[i] *= alpha;
#pragma unroll
      for (int j = 0; j < kON; ++j) o[i][j] *= alpha;
#pragma unroll
      for (int j = 0; j < kSN; ++j) {
        const float pj = expf(sc[i][j] - m_use);
        l[i] += pj;
        Ps[r * L::ldp + tx + kTx * j] = pj;
      }
    }
    __syncthreads();
    tile_ab<kRM, kON, kBk>(o, Ps, L::ldp, Vs, L::ldv, ty, tx);
  }

  // A row that sees no key cannot come from a valid doc_start (s = t is always
  // allowed); it gets out = 0 and lse = -inf instead of NaN.
  uint16_t* out_head = p.out + b * T * p.q_stride + h * p.D;
  float* lse_row = p.lse_out + (b * p.H + h) * T;
#pragma unroll
  for (int i = 0; i < kRM; ++i) {
    const float l_row = row_sum16(l[i]);  // every lane: the shuffles need the whole warp
    const int64_t t = q0 + ty * kRM + i;
    if (t >= T) continue;
#pragma unroll
    for (int j = 0; j < kON; ++j) {
      const int d = tx + kTx * j;
      if (d < D) out_head[t * p.q_stride + d] = f32_to_bf16(l_row > 0.0f ? o[i][j] / l_row : 0.0f);
    }
    if (tx == 0) lse_row[t] = l_row > 0.0f ? m[i] + logf(l_row) : -INFINITY;
  }
}

// ---- backward -----------------------------------------------------------------

// delta (B,H,T) = sum_d dout * out, one warp per (b, t, h).
__global__ void __launch_bounds__(kThreads) attention_delta_kernel(const AttentionParams p) {
  const int64_t rows = p.B * p.T * p.H;
  const int lane = int(threadIdx.x) & 31;
  const int64_t warps_per_block = kThreads / 32;
  for (int64_t row = int64_t(blockIdx.x) * warps_per_block + int64_t(threadIdx.x) / 32; row < rows;
       row += int64_t(gridDim.x) * warps_per_block) {
    const uint16_t* dy = p.dout + row * p.D;
    const uint16_t* y = p.out_saved + row * p.D;
    float sum = 0.0f;
    for (int64_t d = lane; d < p.D; d += 32) sum += bf16_to_f32(dy[d]) * bf16_to_f32(y[d]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) {
      const int64_t h = row % p.H, bt = row / p.H;
      const int64_t t = bt % p.T, b = bt / p.T;
      p.delta[(b * p.H + h) * p.T + t] = sum;
    }
  }
}

// Shared memory of the dK/dV kernel, in 4-byte words: K, V (kBk x kD), Q, dO
// (kBq x kD), P^T and dS^T (kBk x kBq), the query rows' lse and delta (fp32)
// and doc_start (int32).
template <int kD, int kBk, int kBq>
struct DkvTiles {
  static_assert(kD % kTx == 0 && kBk % kTy == 0 && kBq % kTx == 0, "tiles must split over 16 x 16 threads");
  static constexpr int kRK = kBk / kTy, kQN = kBq / kTx, kON = kD / kTx;
  static constexpr int ld = kD + 1, ldp = kBq + 1;
  static constexpr int k_at = 0, v_at = k_at + kBk * ld, q_at = v_at + kBk * ld, do_at = q_at + kBq * ld,
                       p_at = do_at + kBq * ld, ds_at = p_at + kBk * ldp, lse_at = ds_at + kBk * ldp,
                       delta_at = lse_at + kBq, doc_at = delta_at + kBq;
  static constexpr size_t bytes = size_t(doc_at + kBq) * 4;
};

// One block per (key tile, kv head, batch row); dK and dV of its keys stay in
// registers while it walks every query tile that can see them and, inside
// each, every query head of the GQA group:
//   P^T = exp(K Q^T * scale - lse), dP^T = V dO^T, dS^T = P^T (dP^T - delta) * scale,
//   dV += P^T dO, dK += dS^T Q.
template <int kD, int kBk, int kBq>
__global__ void __launch_bounds__(kThreads) attention_backward_dkv_kernel(const AttentionParams p) {
  using L = DkvTiles<kD, kBk, kBq>;
  constexpr int kRK = L::kRK, kQN = L::kQN, kON = L::kON;
  extern __shared__ float smem[];
  float* Ks = smem + L::k_at;
  float* Vs = smem + L::v_at;
  float* Qs = smem + L::q_at;
  float* dOs = smem + L::do_at;
  float* Pt = smem + L::p_at;
  float* dSt = smem + L::ds_at;
  float* lse_s = smem + L::lse_at;
  float* delta_s = smem + L::delta_at;
  int* docs = reinterpret_cast<int*>(smem + L::doc_at);

  const int tx = int(threadIdx.x) % kTx, ty = int(threadIdx.x) / kTx;
  const int64_t T = p.T, b = blockIdx.z, kvh = blockIdx.y, k0 = int64_t(blockIdx.x) * kBk;
  const int64_t k_end = min(k0 + kBk, T);  // keys [k0, k_end)
  const int D = int(p.D);
  load_tile<kBk, kD>(Ks, L::ld, p.k + b * T * p.kv_stride + kvh * p.D, p.kv_stride, k0, T, D);
  load_tile<kBk, kD>(Vs, L::ld, p.v + b * T * p.kv_stride + kvh * p.D, p.kv_stride, k0, T, D);

  float dk[kRK][kON] = {}, dv[kRK][kON] = {};
  // Causal: only rows t >= k0 see these keys.
  for (int64_t q0 = (k0 / kBq) * kBq; q0 < T; q0 += kBq) {
    __syncthreads();  // the previous tile's readers of docs (and the K/V loads) are done
    load_docs<kBq>(docs, p.doc_start + b * T, q0, T);
    __syncthreads();
    // Row t sees a key of [k0, k_end) iff max(doc_start[t], k0) <= min(t, k_end - 1).
    // Every thread reads the same docs, so the skip is uniform over the block.
    bool seen = false;
    for (int r = 0; r < kBq; ++r) {
      const int64_t t = q0 + r;
      seen = seen || (t < T && max(int64_t(docs[r]), k0) <= min(t, k_end - 1));
    }
    if (!seen) continue;

    for (int64_t h = kvh * p.group; h < (kvh + 1) * p.group; ++h) {
      __syncthreads();  // the previous head's readers of Qs, dOs, Pt, dSt, lse_s, delta_s are done
      load_tile<kBq, kD>(Qs, L::ld, p.q + b * T * p.q_stride + h * p.D, p.q_stride, q0, T, D);
      load_tile<kBq, kD>(dOs, L::ld, p.dout + b * T * p.q_stride + h * p.D, p.q_stride, q0, T, D);
      load_row_values<kBq>(lse_s, p.lse + (b * p.H + h) * T, q0, T);
      load_row_values<kBq>(delta_s, p.delta + (b * p.H + h) * T, q0, T);
      __syncthreads();

      float st[kRK][kQN] = {}, dpt[kRK][kQN] = {};
      tile_abt<kRK, kQN, kD>(st, Ks, L::ld, Qs, L::ld, ty, tx);
      tile_abt<kRK, kQN, kD>(dpt, Vs, L::ld, dOs, L::ld, ty, tx);
#pragma unroll
      for (int i = 0; i < kRK; ++i) {
        const int kr = ty * kRK + i;
        const int64_t s = k0 + kr;
#pragma unroll
        for (int j = 0; j < kQN; ++j) {
          const int qc = tx + kTx * j;
          const int64_t t = q0 + qc;
          const float pt = allowed(t, s, docs[qc], T) ? expf(st[i][j] * p.scale - lse_s[qc]) : 0.0f;
          Pt[kr * L::ldp + qc] = pt;
          dSt[kr * L::ldp + qc] = pt * (dpt[i][j] - delta_s[qc]) * p.scale;
        }
      }
      __syncthreads();
      tile_ab<kRK, kON, kBq>(dv, Pt, L::ldp, dOs, L::ld, ty, tx);
      tile_ab<kRK, kON, kBq>(dk, dSt, L::ldp, Qs, L::ld, ty, tx);
    }
  }

  uint16_t* dk_head = p.dk + b * T * p.kv_stride + kvh * p.D;
  uint16_t* dv_head = p.dv + b * T * p.kv_stride + kvh * p.D;
#pragma unroll
  for (int i = 0; i < kRK; ++i) {
    const int64_t s = k0 + ty * kRK + i;
    if (s >= T) continue;
#pragma unroll
    for (int j = 0; j < kON; ++j) {
      const int d = tx + kTx * j;
      if (d < D) {
        dk_head[s * p.kv_stride + d] = f32_to_bf16(dk[i][j]);
        dv_head[s * p.kv_stride + d] = f32_to_bf16(dv[i][j]);
      }
    }
  }
}

// Shared memory of the dQ kernel, in 4-byte words: Q, dO (kBq x kD), K, V
// (kBk x kD), dS (kBq x kBk), the query rows' lse and delta (fp32) and
// doc_start (int32).
template <int kD, int kBq, int kBk>
struct DqTiles {
  static_assert(kD % kTx == 0 && kBq % kTy == 0 && kBk % kTx == 0, "tiles must split over 16 x 16 threads");
  static constexpr int kRM = kBq / kTy, kSN = kBk / kTx, kON = kD / kTx;
  static constexpr int ld = kD + 1, lds = kBk + 1;
  static constexpr int q_at = 0, do_at = q_at + kBq * ld, k_at = do_at + kBq * ld, v_at = k_at + kBk * ld,
                       ds_at = v_at + kBk * ld, lse_at = ds_at + kBq * lds, delta_at = lse_at + kBq,
                       doc_at = delta_at + kBq;
  static constexpr size_t bytes = size_t(doc_at + kBq) * 4;
};

// One block per (query tile, head, batch row), over the key tiles it sees:
//   P = exp(Q K^T * scale - lse), dP = dO V^T, dS = P (dP - delta) * scale, dQ += dS K.
template <int kD, int kBq, int kBk>
__global__ void __launch_bounds__(kThreads) attention_backward_dq_kernel(const AttentionParams p) {
  using L = DqTiles<kD, kBq, kBk>;
  constexpr int kRM = L::kRM, kSN = L::kSN, kON = L::kON;
  extern __shared__ float smem[];
  float* Qs = smem + L::q_at;
  float* dOs = smem + L::do_at;
  float* Ks = smem + L::k_at;
  float* Vs = smem + L::v_at;
  float* dSs = smem + L::ds_at;
  float* lse_s = smem + L::lse_at;
  float* delta_s = smem + L::delta_at;
  int* docs = reinterpret_cast<int*>(smem + L::doc_at);

  const int tx = int(threadIdx.x) % kTx, ty = int(threadIdx.x) / kTx;
  const int64_t T = p.T, b = blockIdx.z, h = blockIdx.y, q0 = int64_t(blockIdx.x) * kBq;
  const int64_t kvh = h / p.group;
  const int D = int(p.D);
  const uint16_t* k_head = p.k + b * T * p.kv_stride + kvh * p.D;
  const uint16_t* v_head = p.v + b * T * p.kv_stride + kvh * p.D;

  load_tile<kBq, kD>(Qs, L::ld, p.q + b * T * p.q_stride + h * p.D, p.q_stride, q0, T, D);
  load_tile<kBq, kD>(dOs, L::ld, p.dout + b * T * p.q_stride + h * p.D, p.q_stride, q0, T, D);
  load_row_values<kBq>(lse_s, p.lse + (b * p.H + h) * T, q0, T);
  load_row_values<kBq>(delta_s, p.delta + (b * p.H + h) * T, q0, T);
  load_docs<kBq>(docs, p.doc_start + b * T, q0, T);
  __syncthreads();
  const int64_t q_end = min(q0 + kBq, T);
  const int64_t s_begin = first_key<kBq>(docs);

  float dq[kRM][kON] = {};
  for (int64_t s0 = (s_begin / kBk) * kBk; s0 < q_end; s0 += kBk) {
    __syncthreads();  // the previous tile's readers of Ks, Vs, dSs are done
    load_tile<kBk, kD>(Ks, L::ld, k_head, p.kv_stride, s0, T, D);
    load_tile<kBk, kD>(Vs, L::ld, v_head, p.kv_stride, s0, T, D);
    __syncthreads();

    float sc[kRM][kSN] = {}, dp[kRM][kSN] = {};
    tile_abt<kRM, kSN, kD>(sc, Qs, L::ld, Ks, L::ld, ty, tx);
    tile_abt<kRM, kSN, kD>(dp, dOs, L::ld, Vs, L::ld, ty, tx);
#pragma unroll
    for (int i = 0; i < kRM; ++i) {
      const int r = ty * kRM + i;
      const int64_t t = q0 + r;
#pragma unroll
      for (int j = 0; j < kSN; ++j) {
        const int kc = tx + kTx * j;
        const float pij = allowed(t, s0 + kc, docs[r], T) ? expf(sc[i][j] * p.scale - lse_s[r]) : 0.0f;
        dSs[r * L::lds + kc] = pij * (dp[i][j] - delta_s[r]) * p.scale;
      }
    }
    __syncthreads();
    tile_ab<kRM, kON, kBk>(dq, dSs, L::lds, Ks, L::ld, ty, tx);
  }

  uint16_t* dq_head = p.dq + b * T * p.q_stride + h * p.D;
#pragma unroll
  for (int i = 0; i < kRM; ++i) {
    const int64_t t = q0 + ty * kRM + i;
    if (t >= T) continue;
#pragma unroll
    for (int j = 0; j < kON; ++j) {
      const int d = tx + kTx * j;
      if (d < D) dq_head[t * p.q_stride + d] = f32_to_bf16(dq[i][j]);
    }
  }
}

// ---- launchers -------------------------------------------------------------------
//
// Per head-dim bucket a large and a small tile configuration; the launcher
// takes the first whose shared memory fits the device's opt-in limit per
// block (`smem_limit`), which is what differs between architectures: the
// large ones need sm_80/87/90 (163-227 KiB), the small ones fit the 99 KiB of
// sm_86/89/120. Larger tiles read fewer shared-memory words per FMA (RM + RN
// loads feed RM * RN FMAs); not yet measured on a GPU.

// Sizes of the Small configurations (bytes), checked against kSmallTileSmem.
static_assert(ForwardTiles<64, 64, 64>::bytes <= kSmallTileSmem &&
                  ForwardTiles<128, 64, 32>::bytes <= kSmallTileSmem &&
                  ForwardTiles<256, 32, 16>::bytes <= kSmallTileSmem,
              "forward small tiles exceed 99 KiB");
static_assert(DkvTiles<64, 64, 32>::bytes <= kSmallTileSmem &&
                  DkvTiles<128, 32, 32>::bytes <= kSmallTileSmem &&
                  DkvTiles<256, 16, 16>::bytes <= kSmallTileSmem,
              "dK/dV small tiles exceed 99 KiB");
static_assert(DqTiles<64, 64, 64>::bytes <= kSmallTileSmem && DqTiles<128, 32, 32>::bytes <= kSmallTileSmem &&
                  DqTiles<256, 16, 16>::bytes <= kSmallTileSmem,
              "dQ small tiles exceed 99 KiB");

unsigned tiles_over(int64_t n, int tile) {
  return unsigned((n + tile - 1) / tile);
}

// Launches `kernel` with `bytes` of dynamic shared memory when that fits; false otherwise.
bool launch_if_fits(void (*kernel)(AttentionParams), size_t bytes, dim3 grid, const AttentionParams& p,
                    cudaStream_t s, size_t smem_limit, const char* name) {
  if (bytes > smem_limit) return false;
  QLORA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  kernel<<<grid, kThreads, bytes, s>>>(p);
  check_launch(name);
  return true;
}

template <int kD, int kBq, int kBk>
bool forward_if_fits(const AttentionParams& p, cudaStream_t s, size_t smem_limit) {
  const dim3 grid(tiles_over(p.T, kBq), unsigned(p.H), unsigned(p.B));
  return launch_if_fits(attention_forward_kernel<kD, kBq, kBk>, ForwardTiles<kD, kBq, kBk>::bytes, grid, p, s,
                        smem_limit, "attention_forward_kernel");
}

template <int kD, int kBk, int kBq>
bool dkv_if_fits(const AttentionParams& p, cudaStream_t s, size_t smem_limit) {
  const dim3 grid(tiles_over(p.T, kBk), unsigned(p.KVH), unsigned(p.B));
  return launch_if_fits(attention_backward_dkv_kernel<kD, kBk, kBq>, DkvTiles<kD, kBk, kBq>::bytes, grid, p,
                        s, smem_limit, "attention_backward_dkv_kernel");
}

template <int kD, int kBq, int kBk>
bool dq_if_fits(const AttentionParams& p, cudaStream_t s, size_t smem_limit) {
  const dim3 grid(tiles_over(p.T, kBq), unsigned(p.H), unsigned(p.B));
  return launch_if_fits(attention_backward_dq_kernel<kD, kBq, kBk>, DqTiles<kD, kBq, kBk>::bytes, grid, p, s,
                        smem_limit, "attention_backward_dq_kernel");
}

[[noreturn]] void no_tiles_fit(const char* fn, int64_t D, size_t smem_limit) {
  fail(fn, ": no tile configuration for head dim ", D, " fits the device's ", smem_limit,
       " bytes of shared memory per block (", kSmallTileSmem, " needed)");
}

void launch_attention_forward(const AttentionParams& p, cudaStream_t s, size_t smem_limit) {
  bool ok = false;
  if (p.D <= 32)
    ok = forward_if_fits<32, 64, 64>(p, s, smem_limit);
  else if (p.D <= 64)
    ok = forward_if_fits<64, 64, 64>(p, s, smem_limit);
  else if (p.D <= 128)
    ok = forward_if_fits<128, 64, 64>(p, s, smem_limit) || forward_if_fits<128, 64, 32>(p, s, smem_limit);
  else
    ok = forward_if_fits<256, 64, 32>(p, s, smem_limit) || forward_if_fits<256, 32, 16>(p, s, smem_limit);
  if (!ok) no_tiles_fit("cuda_ops::attention_forward", p.D, smem_limit);
}

void launch_attention_backward(const AttentionParams& p, cudaStream_t s, size_t smem_limit) {
  const char* fn = "cuda_ops::attention_backward";
  const int64_t rows = p.B * p.T * p.H;
  attention_delta_kernel<<<grid_for(rows, kThreads / 32), kThreads, 0, s>>>(p);
  check_launch("attention_delta_kernel");

  bool ok = false;
  if (p.D <= 32)
    ok = dkv_if_fits<32, 64, 64>(p, s, smem_limit);
  else if (p.D <= 64)
    ok = dkv_if_fits<64, 64, 32>(p, s, smem_limit);
  else if (p.D <= 128)
    ok = dkv_if_fits<128, 64, 32>(p, s, smem_limit) || dkv_if_fits<128, 32, 32>(p, s, smem_limit);
  else
    ok = dkv_if_fits<256, 32, 32>(p, s, smem_limit) || dkv_if_fits<256, 16, 16>(p, s, smem_limit);
  if (!ok) no_tiles_fit(fn, p.D, smem_limit);

  if (p.D <= 32)
    ok = dq_if_fits<32, 64, 64>(p, s, smem_limit);
  else if (p.D <= 64)
    ok = dq_if_fits<64, 64, 64>(p, s, smem_limit);
  else if (p.D <= 128)
    ok = dq_if_fits<128, 64, 32>(p, s, smem_limit) || dq_if_fits<128, 32, 32>(p, s, smem_limit);
  else
    ok = dq_if_fits<256, 32, 32>(p, s, smem_limit) || dq_if_fits<256, 16, 16>(p, s, smem_limit);
  if (!ok) no_tiles_fit(fn, p.D, smem_limit);
}

// ---- host API ----------------------------------------------------------------------

// Throws unless the dimensions describe work the kernels can do; false when there is none.
bool check_attention_dims(const char* fn, int64_t B, int64_t T, int64_t H, int64_t KVH, int64_t D) {
  for (auto [v, name] : {std::pair<int64_t, const char*>{B, "B"}, {T, "T"}, {H, "H"}, {KVH, "KVH"}, {D, "D"}})
    check_dims(fn, name, v);
  if (B == 0 || T == 0 || H == 0) return false;
  if (KVH == 0 || H % KVH != 0)
    fail(fn, ": query heads H = ", H, " must be a multiple of the key/value heads KVH = ", KVH);
  if (D < 1 || D > kMaxHeadDim) fail(fn, ": head dim D = ", D, " is outside [1, ", kMaxHeadDim, "]");
  if (T > INT32_MAX) fail(fn, ": sequence length T = ", T, " exceeds the int32 range of doc_start");
  // Heads and batch rows are grid dimensions y and z.
  if (H > 65535 || B > 65535) fail(fn, ": H = ", H, " and B = ", B, " must each be at most 65535");
  return true;
}

AttentionParams make_params(int64_t B, int64_t T, int64_t H, int64_t KVH, int64_t D) {
  AttentionParams p;
  p.B = B;
  p.T = T;
  p.H = H;
  p.KVH = KVH;
  p.D = D;
  p.group = H / KVH;
  p.q_stride = H * D;
  p.kv_stride = KVH * D;
  p.scale = 1.0f / std::sqrt(float(D));  // as the CPU op: in fp32
  return p;
}

size_t smem_limit_for(const CudaContext& ctx, AttentionTiles tiles) {
  int optin = 0;
  QLORA_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, ctx.device()));
  const size_t limit = size_t(optin > 0 ? optin : 0);
  return tiles == AttentionTiles::Small ? std::min(limit, kSmallTileSmem) : limit;
}

}  // namespace

void attention_forward(CudaContext& ctx, uint16_t* out, float* lse, const uint16_t* q, const uint16_t* k,
                       const uint16_t* v, const int32_t* doc_start, int64_t B, int64_t T, int64_t H,
                       int64_t KVH, int64_t D, AttentionTiles tiles) {
  const char* fn = "cuda_ops::attention_forward";
  if (!check_attention_dims(fn, B, T, H, KVH, D)) return;
  const int64_t nq = B * T * H * D, nkv = B * T * KVH * D;
  for (auto [ptr, name, n] : {std::tuple<const void*, const char*, int64_t>{out, "out", nq},
                              {lse, "lse", B * H * T},
                              {q, "q", nq},
                              {k, "k", nkv},
                              {v, "v", nkv},
                              {doc_start, "doc_start", B * T}})
    check_pointer(fn, ptr, name, n);
  AttentionParams p = make_params(B, T, H, KVH, D);
  p.q = q;
  p.k = k;
  p.v = v;
  p.doc_start = doc_start;
  p.out = out;
  p.lse_out = lse;
  launch_attention_forward(p, ctx.stream(), smem_limit_for(ctx, tiles));
}

void attention_forward(CudaContext& ctx, uint16_t* out, float* lse, const uint16_t* q, const uint16_t* k,
                       const uint16_t* v, const int32_t* doc_start, int64_t B, int64_t T, int64_t H,
                       int64_t KVH, int64_t D) {
  attention_forward(ctx, out, lse, q, k, v, doc_start, B, T, H, KVH, D, AttentionTiles::Auto);
}

size_t attention_backward_workspace_bytes(int64_t B, int64_t T, int64_t H, int64_t D) {
  const char* fn = "cuda_ops::attention_backward_workspace_bytes";
  for (auto [v, name] : {std::pair<int64_t, const char*>{B, "B"}, {T, "T"}, {H, "H"}, {D, "D"}})
    check_dims(fn, name, v);
  return size_t(B) * size_t(H) * size_t(T) * sizeof(float);  // delta; D does not enter
}

void attention_backward(CudaContext& ctx, uint16_t* dq, uint16_t* dk, uint16_t* dv, const uint16_t* dout,
                        const uint16_t* out, const float* lse, const uint16_t* q, const uint16_t* k,
                        const uint16_t* v, const int32_t* doc_start, int64_t B, int64_t T, int64_t H,
                        int64_t KVH, int64_t D, AttentionTiles tiles) {
  const char* fn = "cuda_ops::attention_backward";
  if (!check_attention_dims(fn, B, T, H, KVH, D)) return;
  const int64_t nq = B * T * H * D, nkv = B * T * KVH * D;
  for (auto [ptr, name, n] : {std::tuple<const void*, const char*, int64_t>{dq, "dq", nq},
                              {dk, "dk", nkv},
                              {dv, "dv", nkv},
                              {dout, "dout", nq},
                              {out, "out", nq},
                              {lse, "lse", B * H * T},
                              {q, "q", nq},
                              {k, "k", nkv},
                              {v, "v", nkv},
                              {doc_start, "doc_start", B * T}})
    check_pointer(fn, ptr, name, n);
  AttentionParams p = make_params(B, T, H, KVH, D);
  p.q = q;
  p.k = k;
  p.v = v;
  p.doc_start = doc_start;
  p.dout = dout;
  p.out_saved = out;
  p.lse = lse;
  p.dq = dq;
  p.dk = dk;
  p.dv = dv;
  // Growing the workspace synchronizes the stream first (CudaContext::workspace), so
  // work still queued against the old buffer is safe.
  p.delta = static_cast<float*>(ctx.workspace(attention_backward_workspace_bytes(B, T, H, D)));
  launch_attention_backward(p, ctx.stream(), smem_limit_for(ctx, tiles));
}

void attention_backward(CudaContext& ctx, uint16_t* dq, uint16_t* dk, uint16_t* dv, const uint16_t* dout,
                        const uint16_t* out, const float* lse, const uint16_t* q, const uint16_t* k,
                        const uint16_t* v, const int32_t* doc_start, int64_t B, int64_t T, int64_t H,
                        int64_t KVH, int64_t D) {
  attention_backward(ctx, dq, dk, dv, dout, out, lse, q, k, v, doc_start, B, T, H, KVH, D,
                     AttentionTiles::Auto);
}

}  // namespace qlora::cuda_ops
