// AdamW/SGD over the flat LoRA parameters, the sum of squares of the
// gradients and their scaling (kernels/cuda/optim_cuda.h).
//
// Bit-exactness with Optimizer::step (src/train/optimizer.cpp) rests on:
//  - the fp32 constants are rounded on the host from the same doubles by the
//    same expressions (optim_constants below mirrors Optimizer::step line by
//    line; std::pow and std::sqrt are the host's libm, as for the CPU);
//  - the kernel does the CPU's fp32 operations in the CPU's order, each one an
//    explicitly rounded intrinsic, so nothing is contracted into an FMA;
//  - sqrt and division are correctly rounded on both sides (__fsqrt_rn,
//    __fdiv_rn; sqrtss, divss), and neither side flushes denormals (this file
//    must not be built with --use_fast_math or -ftz=true).
// Simple, not tuned: one thread per element, scalar (coalesced) loads. AdamW
// moves 30 bytes per parameter (reads master, grad, m, v; writes them and the
// bf16 copy), so it is bound by memory bandwidth: about 1 ms for 10^8
// parameters at 3 TB/s; 4-wide vector loads would gain little on top.
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <utility>

#include "core/error.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/optim_cuda.h"

namespace qlora::cuda_ops {

using namespace cuda_detail;

namespace {

constexpr int kSumThreads = 256;  // threads of both sum_squares kernels (the trees assume a power of two)
static_assert((kSumThreads & (kSumThreads - 1)) == 0, "the tree reductions halve kSumThreads");

// Whether global index g lies in one of the sorted ranges (binary search over
// the range starts: a few hundred ranges for a large model, ~10 steps).
__device__ __forceinline__ bool in_plus(const OptimStepParams& p, int64_t g) {
  int64_t lo = 0, hi = p.n_plus;  // find the last range with begin <= g
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (p.plus[2 * mid] <= g)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo > 0 && g < p.plus[2 * (lo - 1) + 1];
}

template <OptimKind kKind>
__global__ void __launch_bounds__(kThreads) optimizer_step_kernel(const OptimStepParams p) {
  float* __restrict__ master = p.master;
  const float* __restrict__ grad = p.grad;
  float* __restrict__ m = p.m;
  float* __restrict__ v = p.v;
  uint16_t* __restrict__ bf16 = p.param_bf16;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride) {
    const float g = grad[i];
    float w = master[i];
    const bool plus = p.plus != nullptr && in_plus(p, p.base + i);
    if constexpr (kKind == OptimKind::AdamW) {
      // torch's single-tensor AdamW, as Optimizer::step:
      //   p = p * decay
      //   m = m * beta1 + (1 - beta1) * g
      //   v = v * beta2 + ((1 - beta2) * g) * g
      //   p = p + (-step_size * m) / (sqrt(v) / bc2_sqrt + eps)
      w = __fmul_rn(w, plus ? p.decay_plus : p.decay);
      const float mi = __fadd_rn(__fmul_rn(m[i], p.beta1), __fmul_rn(p.one_minus_beta1, g));
      const float vi = __fadd_rn(__fmul_rn(v[i], p.beta2), __fmul_rn(__fmul_rn(p.one_minus_beta2, g), g));
      const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), p.bc2_sqrt), p.eps);
      w = __fadd_rn(w, __fdiv_rn(__fmul_rn(plus ? p.neg_step_size_plus : p.neg_step_size, mi), denom));
      m[i] = mi;
      v[i] = vi;
    } else {
      // torch's SGD (dampening 0, no nesterov), as Optimizer::step.
      float d = g;
      if (p.weight_decay != 0.0f) d = __fadd_rn(d, __fmul_rn(p.weight_decay, w));
      if (m != nullptr) {
        d = p.first ? d : __fadd_rn(__fmul_rn(m[i], p.momentum), d);  // the first step never reads m
        m[i] = d;
      }
      w = __fadd_rn(w, __fmul_rn(plus ? p.neg_lr_plus : p.neg_lr, d));
    }
    master[i] = w;
    if (bf16 != nullptr) bf16[i] = f32_to_bf16(w);
  }
}

// Sum of the kSumThreads values of `s` (one per thread), returned to thread 0,
// by a fixed pairwise tree. Every thread of the block must call it.
__device__ __forceinline__ double tree_sum(double* s) {
  __syncthreads();
  for (int width = kSumThreads / 2; width > 0; width >>= 1) {
    if (int(threadIdx.x) < width) s[threadIdx.x] += s[threadIdx.x + width];
    __syncthreads();
  }
  return s[0];
}

// Squares of floats are exact in double (24 x 24 significant bits < 53), so
// each term is exact and only the additions round (an FMA that nvcc may form
// from acc + g*g rounds the same sum once, the same value). Chunk c holds
// elements [c*kSumSquaresChunk, min(n, (c+1)*kSumSquaresChunk)); thread t adds
// its strided elements in order, then the tree adds the threads: the order
// depends on n only, not on the grid size.
__global__ void __launch_bounds__(kSumThreads) sum_squares_partial_kernel(const SumSquaresParams p) {
  __shared__ double s[kSumThreads];
  // c depends on blockIdx only: every thread of a block runs the same
  // iterations and reaches the barriers of tree_sum together.
  for (int64_t c = blockIdx.x; c < p.chunks; c += gridDim.x) {
    const int64_t lo = c * kSumSquaresChunk;
    const int64_t hi = lo + kSumSquaresChunk < p.n ? lo + kSumSquaresChunk : p.n;
    double acc = 0.0;
    for (int64_t i = lo + threadIdx.x; i < hi; i += kSumThreads) {
      const double g = p.x[i];
      acc += g * g;
    }
    s[threadIdx.x] = acc;
    const double total = tree_sum(s);
    if (threadIdx.x == 0) p.partial[c] = total;
    __syncthreads();  // s[0] is read before the next chunk overwrites s
  }
}

// One block: thread t adds partials t, t + kSumThreads, ... in order, then the tree.
__global__ void __launch_bounds__(kSumThreads) sum_squares_final_kernel(const SumSquaresParams p) {
  __shared__ double s[kSumThreads];
  double acc = 0.0;
  for (int64_t c = threadIdx.x; c < p.chunks; c += kSumThreads) acc += p.partial[c];
  s[threadIdx.x] = acc;
  const double total = tree_sum(s);
  if (threadIdx.x == 0) *p.out = total;
}

__global__ void __launch_bounds__(kThreads) scale_kernel(float* __restrict__ x, int64_t n, float factor) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    x[i] = __fmul_rn(x[i], factor);
}

// ---- host side ----------------------------------------------------------------

// a * b in double, rounded before anything is added to it: a volatile store
// keeps the host compiler from contracting `1.0 - lr * wd` into an FMA (GCC
// contracts by default where the target has FMA, e.g. aarch64; the CPU
// library is built with -ffp-contract=off and rounds the product).
double product_rounded(double a, double b) {
  volatile double p = a * b;
  return p;
}

// The constants of Optimizer::step, by its expressions in its order.
void optim_constants(const OptimStep& st, OptimStepParams& p) {
  const double t = double(st.t);
  if (st.kind == 1) {
    p.kind = OptimKind::Sgd;
    p.weight_decay = float(st.weight_decay);
    p.momentum = float(st.momentum);
    p.neg_lr = float(-st.lr);
    p.first = st.t == 1;
  } else {
    p.kind = OptimKind::AdamW;
    const double bias_correction1 = 1.0 - std::pow(st.beta1, t);
    const double bias_correction2 = 1.0 - std::pow(st.beta2, t);
    p.decay = float(1.0 - product_rounded(st.lr, st.weight_decay));
    p.beta1 = float(st.beta1);
    p.one_minus_beta1 = float(1.0 - st.beta1);
    p.beta2 = float(st.beta2);
    p.one_minus_beta2 = float(1.0 - st.beta2);
    p.neg_step_size = float(-(st.lr / bias_correction1));
    p.bc2_sqrt = float(std::sqrt(bias_correction2));
    p.eps = float(st.eps);
  }
  // LoRA+: the same expressions at lr * ratio (Optimizer::step computes that
  // product in double once, as here).
  if (st.plus_lr_ratio != 1.0 && st.n_plus > 0) {
    const double lr_b = st.lr * st.plus_lr_ratio;
    p.plus = st.plus;
    p.n_plus = st.n_plus;
    p.base = st.base;
    p.neg_lr_plus = float(-lr_b);
    if (st.kind != 1) {
      p.decay_plus = float(1.0 - product_rounded(lr_b, st.weight_decay));
      p.neg_step_size_plus = float(-(lr_b / (1.0 - std::pow(st.beta1, t))));
    }
  }
}

// The checks of the CPU Optimizer's config (check_config in optimizer.cpp), plus the step's own.
void check_step(const char* fn, const OptimStep& st) {
  if (st.kind != 0 && st.kind != 1) fail(fn, ": unknown optimizer kind ", st.kind, " (0 adamw, 1 sgd)");
  if (st.t < 1) fail(fn, ": step number t = ", st.t, " must be >= 1 (torch counts from 1)");
  const bool adam = st.kind == 0;
  if (adam && !(st.beta1 >= 0.0 && st.beta1 < 1.0)) fail(fn, ": beta1 must be in [0, 1), got ", st.beta1);
  if (adam && !(st.beta2 >= 0.0 && st.beta2 < 1.0)) fail(fn, ": beta2 must be in [0, 1), got ", st.beta2);
  if (adam && !(st.eps >= 0.0)) fail(fn, ": eps must be >= 0, got ", st.eps);
  if (!(st.weight_decay >= 0.0)) fail(fn, ": weight_decay must be >= 0, got ", st.weight_decay);
  if (!(st.momentum >= 0.0)) fail(fn, ": momentum must be >= 0, got ", st.momentum);
  if (!(st.plus_lr_ratio > 0.0) || !std::isfinite(st.plus_lr_ratio))
    fail(fn, ": plus_lr_ratio must be > 0, got ", st.plus_lr_ratio);
  if (st.n_plus < 0 || (st.n_plus > 0 && st.plus == nullptr) || st.base < 0)
    fail(fn, ": n_plus = ", st.n_plus, " LoRA+ ranges need a device pointer, and base = ", st.base, " must be >= 0");
}

int64_t sum_squares_chunks(int64_t n) {
  return (n + kSumSquaresChunk - 1) / kSumSquaresChunk;
}

}  // namespace

void optimizer_step(float* master, uint16_t* param_bf16, const float* grad, float* m, float* v, int64_t n,
                    const OptimStep& st, cudaStream_t s) {
  const char* fn = "cuda_ops::optimizer_step";
  check_dims(fn, "n", n);
  check_step(fn, st);
  const bool adam = st.kind == 0;
  // As the CPU: sgd keeps a momentum buffer exactly when momentum != 0 (a
  // buffer passed with momentum 0 is left alone).
  const bool buffer = !adam && st.momentum != 0.0;
  for (auto [p, name] : {std::pair<const void*, const char*>{master, "master"}, {grad, "grad"}})
    check_pointer(fn, p, name, n);
  if (adam || buffer) check_pointer(fn, m, adam ? "m (exp_avg)" : "m (momentum buffer)", n);
  if (adam) check_pointer(fn, v, "v (exp_avg_sq)", n);
  OptimStepParams p;
  p.master = master;
  p.param_bf16 = param_bf16;
  p.grad = grad;
  p.m = adam || buffer ? m : nullptr;
  p.v = adam ? v : nullptr;
  p.n = n;
  optim_constants(st, p);
  launch_optimizer_step(p, s);
}

size_t sum_squares_workspace_bytes(int64_t n) {
  check_dims("cuda_ops::sum_squares_workspace_bytes", "n", n);
  return size_t(sum_squares_chunks(n)) * sizeof(double);
}

void sum_squares(const float* grad, int64_t n, double* d_out, void* workspace, cudaStream_t s) {
  const char* fn = "cuda_ops::sum_squares";
  check_dims(fn, "n", n);
  check_pointer(fn, grad, "grad", n);
  check_pointer(fn, d_out, "d_out", 1);
  const int64_t chunks = sum_squares_chunks(n);
  check_pointer(fn, workspace, "workspace", chunks);
  if (reinterpret_cast<uintptr_t>(workspace) % alignof(double) != 0)
    fail(fn, ": workspace is not ", alignof(double), "-byte aligned");
  SumSquaresParams p;
  p.x = grad;
  p.n = n;
  p.chunks = chunks;
  p.partial = static_cast<double*>(workspace);
  p.out = d_out;
  launch_sum_squares(p, s);
}

void scale_inplace(float* x, int64_t n, float factor, cudaStream_t s) {
  const char* fn = "cuda_ops::scale_inplace";
  check_dims(fn, "n", n);
  check_pointer(fn, x, "x", n);
  if (n == 0) return;
  scale_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(x, n, factor);
  check_launch("scale_kernel");
}

// ---- launchers -----------------------------------------------------------------

void launch_optimizer_step(const OptimStepParams& p, cudaStream_t s) {
  if (p.n == 0) return;
  const int grid = grid_for(p.n, kThreads);
  if (p.kind == OptimKind::AdamW) {
    optimizer_step_kernel<OptimKind::AdamW><<<grid, kThreads, 0, s>>>(p);
  } else {
    optimizer_step_kernel<OptimKind::Sgd><<<grid, kThreads, 0, s>>>(p);
  }
  check_launch("optimizer_step_kernel");
}

void launch_sum_squares(const SumSquaresParams& p, cudaStream_t s) {
  if (p.n == 0) {
    QLORA_CUDA_CHECK(cudaMemsetAsync(p.out, 0, sizeof(double), s));  // +0.0 is all zero bits
    return;
  }
  sum_squares_partial_kernel<<<grid_for(p.chunks, 1), kSumThreads, 0, s>>>(p);
  check_launch("sum_squares_partial_kernel");
  sum_squares_final_kernel<<<1, kSumThreads, 0, s>>>(p);
  check_launch("sum_squares_final_kernel");
}

}  // namespace qlora::cuda_ops
