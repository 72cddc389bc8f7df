// lm_head + cross entropy over vocabulary chunks (kernels/cuda/loss_cuda.h).
//
// Per (row chunk, vocabulary chunk) the logits tile (r, vc) fp32 is one
// cuda_ops::gemm into the workspace; small kernels then use it:
//  - forward, ce_fold_kernel: one thread block per row folds the tile into the
//    row's running (max, sum of exp(z - max)), exactly the online log-sum-exp
//    of the CPU op, picks the target's logit from the tile when the chunk holds
//    it (so loss = lse - z_target uses the very value inside lse), and on the
//    last chunk writes lse and the loss;
//  - backward, ce_dlogits_kernel: dlogits = (exp(z - lse) - onehot) *
//    grad_scale rounded to bf16 into a second tile, then a second gemm adds
//    dlogits W into an fp32 (r, C) accumulator (beta = 0 on the first chunk,
//    1 after), rounded to dx by ce_store_dx_kernel once the row chunk is done.
// Reductions are a fixed thread-strided order plus a fixed tree (block_sum),
// so nothing depends on scheduling: no fp32 atomics.
//
// Slow parts, kept simple on purpose: the fold reads each tile row twice (max,
// then sum), one block per row means little parallelism when a row chunk is
// small, and the backward recomputes the logits GEMM (as the CPU op does).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <utility>

#include "core/error.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/loss_cuda.h"

namespace qlora::cuda_ops {

using namespace cuda_detail;

namespace {

// ---- workspace layout --------------------------------------------------------------

// Byte offsets into ctx.workspace. The fp32 tile comes first; the forward's
// per-row state and the backward's buffers share the space after it.
struct CeLayout {
  int64_t rows = 0, vc = 0;  // clamped chunk sizes
  size_t tile = 0;           // (rows, vc) fp32 logits
  size_t run_max = 0;        // (rows) fp32, forward: running max
  size_t run_sum = 0;        // (rows) fp32, forward: running sum of exp(z - max)
  size_t target_logit = 0;   // (rows) fp32, forward: the target's logit, once seen
  size_t dlogits = 0;        // (rows, vc) bf16, backward
  size_t dx_acc = 0;         // (rows, C) fp32, backward
  size_t total = 0;
};

size_t align256(size_t bytes) {
  return (bytes + 255) / 256 * 256;
}

void check_ce_args(const char* fn, ops::CeChunking ch, int64_t N, int64_t C, int64_t V) {
  check_dims(fn, "N", N);
  if (C <= 0) fail(fn, ": channel count C = ", C, " must be positive");
  if (V <= 0) fail(fn, ": vocabulary size V = ", V, " must be positive");
  if (ch.rows <= 0 || ch.vchunk <= 0)
    fail(fn, ": chunk sizes (rows ", ch.rows, ", vchunk ", ch.vchunk, ") must be positive");
}

CeLayout ce_layout(ops::CeChunking ch, int64_t N, int64_t C, int64_t V) {
  CeLayout l;
  l.rows = std::min(ch.rows, N);
  l.vc = std::min(ch.vchunk, V);
  if (l.rows == 0) return l;
  const auto rows = size_t(l.rows), vc = size_t(l.vc);
  l.tile = 0;
  const size_t after_tile = align256(rows * vc * sizeof(float));
  l.run_max = after_tile;
  l.run_sum = l.run_max + align256(rows * sizeof(float));
  l.target_logit = l.run_sum + align256(rows * sizeof(float));
  const size_t forward_end = l.target_logit + align256(rows * sizeof(float));
  l.dlogits = after_tile;
  l.dx_acc = l.dlogits + align256(rows * vc * sizeof(uint16_t));
  const size_t backward_end = l.dx_acc + align256(rows * size_t(C) * sizeof(float));
  l.total = std::max(forward_end, backward_end);
  return l;
}

// ---- params ----------------------------------------------------------------------------

struct CeFoldParams {
  const float* tile = nullptr;  // (rows, vc) logits of vocabulary entries v0..v0+vc-1, row stride vc
  int64_t rows = 0, vc = 0;
  int64_t i0 = 0;  // batch row of tile row 0
  int64_t v0 = 0;
  int64_t V = 0;
  bool first = false, last = false;  // first / last vocabulary chunk of this row chunk
  const int32_t* targets = nullptr;  // (N)
  float* run_max = nullptr;          // (rows) workspace
  float* run_sum = nullptr;          // (rows) workspace
  float* target_logit = nullptr;     // (rows) workspace
  float* losses = nullptr;           // (N), written on the last chunk
  float* lse = nullptr;              // (N), written on the last chunk
  int32_t* first_bad = nullptr;      // optional
};

struct CeDlogitsParams {
  const float* tile = nullptr;  // (rows, vc) logits, row stride vc
  uint16_t* dlogits = nullptr;  // (rows, vc) bf16, row stride vc
  int64_t rows = 0, vc = 0;
  int64_t i0 = 0, v0 = 0, V = 0;
  const int32_t* targets = nullptr;  // (N)
  const float* lse = nullptr;        // (N)
  float grad_scale = 0.0f;
};

struct CeStoreDxParams {
  const float* acc = nullptr;  // (rows, C) fp32
  uint16_t* dx = nullptr;      // (rows, C) bf16: dx + i0*C
  int64_t n = 0;               // rows * C
};

// ---- kernels ---------------------------------------------------------------------------

// Max of v over the thread block, returned to every thread; `shared` holds
// one float per warp and may be reused at once (trailing barrier).
__device__ __forceinline__ float block_max(float v, float* shared) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;
  const int warps = int(blockDim.x) >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float m = shared[0];
  for (int w = 1; w < warps; ++w) m = fmaxf(m, shared[w]);
  __syncthreads();
  return m;
}

// One block per tile row (grid-stride over rows; the bound is uniform across
// the block, so every thread reaches the barriers inside block_max/block_sum).
__global__ void __launch_bounds__(kThreads) ce_fold_kernel(const CeFoldParams p) {
  __shared__ float partial[kThreads / 32];
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const float* z = p.tile + r * p.vc;
    float tile_max = -INFINITY;
    for (int64_t j = threadIdx.x; j < p.vc; j += blockDim.x) tile_max = fmaxf(tile_max, z[j]);
    tile_max = block_max(tile_max, partial);
    // Every thread reads the running state before block_sum's barriers;
    // thread 0 writes it only after them.
    float m = p.first ? -INFINITY : p.run_max[r];
    float l = p.first ? 0.0f : p.run_sum[r];
    if (tile_max > m) {  // the same for every thread
      l *= expf(m - tile_max);
      m = tile_max;
    }
    float s = 0.0f;
    for (int64_t j = threadIdx.x; j < p.vc; j += blockDim.x) s += expf(z[j] - m);
    s = block_sum(s, partial);
    if (threadIdx.x == 0) {
      l += s;
      const int64_t i = p.i0 + r;
      const int32_t t = p.targets[i];
      // Thread 0 both writes and (on the last chunk) reads target_logit[r]:
      // program order makes the value visible even within one launch.
      if (t >= p.v0 && t < p.v0 + p.vc) p.target_logit[r] = z[t - p.v0];
      if (p.last) {
        const float lse = m + logf(l);
        float loss = 0.0f;
        if (t != ops::kIgnoreIndex) {
          if (t < 0 || t >= p.V) {
            if (p.first_bad != nullptr) atomicMin(p.first_bad, int32_t(i < INT32_MAX ? i : INT32_MAX));
          } else {
            loss = lse - p.target_logit[r];
          }
        }
        p.lse[i] = lse;
        p.losses[i] = loss;
      } else {
        p.run_max[r] = m;
        p.run_sum[r] = l;
      }
    }
  }
}

// One block per tile row: dlogit = (exp(z - lse) - [v == target]) * grad_scale,
// as the CPU op orders it (scale, then subtract); 0 for an ignored or
// out-of-range target.
__global__ void __launch_bounds__(kThreads) ce_dlogits_kernel(const CeDlogitsParams p) {
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const float* z = p.tile + r * p.vc;
    uint16_t* d = p.dlogits + r * p.vc;
    const int32_t t = p.targets[p.i0 + r];
    const bool counted = t >= 0 && t < p.V;
    const float L = p.lse[p.i0 + r];
    const int64_t tj = int64_t(t) - p.v0;  // the target's column in this tile, if in [0, vc)
    for (int64_t j = threadIdx.x; j < p.vc; j += blockDim.x) {
      float g = 0.0f;
      if (counted) {
        g = expf(z[j] - L) * p.grad_scale;
        if (j == tj) g -= p.grad_scale;
      }
      d[j] = f32_to_bf16(g);
    }
  }
}

__global__ void __launch_bounds__(kThreads) ce_store_dx_kernel(const CeStoreDxParams p) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < p.n;
       e += int64_t(gridDim.x) * blockDim.x)
    p.dx[e] = f32_to_bf16(p.acc[e]);
}

// ---- launchers -------------------------------------------------------------------------
// 256 threads on every supported architecture (80..90): the kernels are
// memory-bound passes over a tile the GEMM has just written (mostly still in
// L2); no measurement has yet asked for a per-architecture choice.

void launch_ce_fold(const CeFoldParams& p, cudaStream_t s) {
  if (p.rows == 0) return;
  ce_fold_kernel<<<grid_for(p.rows, 1), kThreads, 0, s>>>(p);
  check_launch("ce_fold_kernel");
}

void launch_ce_dlogits(const CeDlogitsParams& p, cudaStream_t s) {
  if (p.rows == 0) return;
  ce_dlogits_kernel<<<grid_for(p.rows, 1), kThreads, 0, s>>>(p);
  check_launch("ce_dlogits_kernel");
}

void launch_ce_store_dx(const CeStoreDxParams& p, cudaStream_t s) {
  if (p.n == 0) return;
  ce_store_dx_kernel<<<grid_for(p.n, kThreads), kThreads, 0, s>>>(p);
  check_launch("ce_store_dx_kernel");
}

template <typename T>
T* at(void* base, size_t offset) {
  return reinterpret_cast<T*>(static_cast<char*>(base) + offset);
}

}  // namespace

// ---- host API ------------------------------------------------------------------------

size_t lm_head_ce_workspace_bytes(ops::CeChunking chunking, int64_t N, int64_t C, int64_t V) {
  check_ce_args("cuda_ops::lm_head_ce_workspace_bytes", chunking, N, C, V);
  return ce_layout(chunking, N, C, V).total;
}

void lm_head_cross_entropy_forward(CudaContext& ctx, float* losses, float* lse, const uint16_t* x,
                                   const uint16_t* W, const int32_t* targets, ops::CeChunking chunking,
                                   int64_t N, int64_t C, int64_t V, int32_t* d_first_bad) {
  const char* fn = "cuda_ops::lm_head_cross_entropy_forward";
  check_ce_args(fn, chunking, N, C, V);
  for (auto [p, name] :
       {std::pair<const void*, const char*>{losses, "losses"}, {lse, "lse"}, {targets, "targets"}})
    check_pointer(fn, p, name, N);
  check_pointer(fn, x, "x", N * C);
  check_pointer(fn, W, "W", V * C);
  if (N == 0) return;

  const CeLayout lay = ce_layout(chunking, N, C, V);
  void* ws = ctx.workspace(lay.total);
  float* tile = at<float>(ws, lay.tile);
  CeFoldParams p;
  p.V = V;
  p.targets = targets;
  p.run_max = at<float>(ws, lay.run_max);
  p.run_sum = at<float>(ws, lay.run_sum);
  p.target_logit = at<float>(ws, lay.target_logit);
  p.losses = losses;
  p.lse = lse;
  p.first_bad = d_first_bad;
  for (int64_t i0 = 0; i0 < N; i0 += lay.rows) {
    const int64_t r = std::min(lay.rows, N - i0);
    for (int64_t v0 = 0; v0 < V; v0 += lay.vc) {
      const int64_t vc = std::min(lay.vc, V - v0);
      // tile (r,vc) = x[i0:i0+r] (r,C) W[v0:v0+vc]^T, fp32, row stride vc.
      gemm(ctx, Trans::N, Trans::T, r, vc, C, 1.0f, x + i0 * C, C, W + v0 * C, C, 0.0f, tile, GemmOut::F32,
           vc, fn);
      p.tile = tile;
      p.rows = r;
      p.vc = vc;
      p.i0 = i0;
      p.v0 = v0;
      p.first = v0 == 0;
      p.last = v0 + vc == V;
      launch_ce_fold(p, ctx.stream());
    }
  }
}

void lm_head_cross_entropy_backward(CudaContext& ctx, uint16_t* dx, const uint16_t* x, const uint16_t* W,
                                    const float* lse, const int32_t* targets, float grad_scale,
                                    ops::CeChunking chunking, int64_t N, int64_t C, int64_t V) {
  const char* fn = "cuda_ops::lm_head_cross_entropy_backward";
  check_ce_args(fn, chunking, N, C, V);
  for (auto [p, name] : {std::pair<const void*, const char*>{dx, "dx"}, {x, "x"}})
    check_pointer(fn, p, name, N * C);
  for (auto [p, name] : {std::pair<const void*, const char*>{lse, "lse"}, {targets, "targets"}})
    check_pointer(fn, p, name, N);
  check_pointer(fn, W, "W", V * C);
  if (N == 0) return;

  const CeLayout lay = ce_layout(chunking, N, C, V);
  void* ws = ctx.workspace(lay.total);
  float* tile = at<float>(ws, lay.tile);
  uint16_t* dlogits = at<uint16_t>(ws, lay.dlogits);
  float* acc = at<float>(ws, lay.dx_acc);
  CeDlogitsParams d;
  d.tile = tile;
  d.dlogits = dlogits;
  d.V = V;
  d.targets = targets;
  d.lse = lse;
  d.grad_scale = grad_scale;
  for (int64_t i0 = 0; i0 < N; i0 += lay.rows) {
    const int64_t r = std::min(lay.rows, N - i0);
    for (int64_t v0 = 0; v0 < V; v0 += lay.vc) {
      const int64_t vc = std::min(lay.vc, V - v0);
      gemm(ctx, Trans::N, Trans::T, r, vc, C, 1.0f, x + i0 * C, C, W + v0 * C, C, 0.0f, tile, GemmOut::F32,
           vc, fn);
      d.rows = r;
      d.vc = vc;
      d.i0 = i0;
      d.v0 = v0;
      launch_ce_dlogits(d, ctx.stream());
      // acc (r,C) (+)= dlogits (r,vc) W[v0:v0+vc] (vc,C); beta = 0 does not read acc.
      gemm(ctx, Trans::N, Trans::N, r, C, vc, 1.0f, dlogits, vc, W + v0 * C, C, v0 == 0 ? 0.0f : 1.0f, acc,
           GemmOut::F32, C, fn);
    }
    CeStoreDxParams st;
    st.acc = acc;
    st.dx = dx + i0 * C;
    st.n = r * C;
    launch_ce_store_dx(st, ctx.stream());
  }
}

}  // namespace qlora::cuda_ops
