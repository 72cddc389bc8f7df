// DoRA on the GPU (kernels/cuda/dora_cuda.h): the weight norm (fp32 panels of
// W + s B A, double sums of squares), the forward scaling and the backward's
// magnitude gradient (deterministic double column sums) and input scalings.
#include <algorithm>
#include <climits>
#include <cstdint>

#include "core/error.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/dora_cuda.h"
#include "plan/cuda_constants.h"

namespace qlora::cuda_ops {

using namespace cuda_detail;

namespace {

// ---- kernels ---------------------------------------------------------------------

// Sum of v over the thread block in double, returned to every thread; a fixed
// order (butterfly in each warp, then the warps in order): deterministic.
// `shared` holds one double per warp.
__device__ __forceinline__ double block_sum_f64(double v, double* shared) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < int(blockDim.x) >> 5; ++w) total += shared[w];
  __syncthreads();
  return total;
}

// One block per panel row: wnorm[row] = sqrt(sum of the row's squares), the
// squares and sum in double (a float's square is exact in double), rounded
// once to fp32 as the CPU op.
__global__ void __launch_bounds__(kThreads)
    dora_row_norm_kernel(const float* __restrict__ panel, int64_t IN, float* __restrict__ wnorm) {
  __shared__ double shared[kThreads / 32];
  const float* row = panel + int64_t(blockIdx.x) * IN;
  double ss = 0.0;
  for (int64_t i = threadIdx.x; i < IN; i += kThreads) {
    const double v = double(row[i]);
    ss += v * v;
  }
  ss = block_sum_f64(ss, shared);
  if (threadIdx.x == 0) wnorm[blockIdx.x] = float(sqrt(ss));
}

// g = m / wnorm, the CPU's fp32 division.
__device__ __forceinline__ float dora_gain(const float* m, const float* wnorm, int64_t j) {
  return __fdiv_rn(m[j], wnorm[j]);
}

// out += (g - 1) * base + g * lora, in the CPU's order, no contraction. No
// __restrict__: base may alias out (read before the write, same thread).
__global__ void __launch_bounds__(kThreads)
    dora_forward_kernel(uint16_t* out, const uint16_t* base, const uint16_t* lora, const float* m,
                        const float* wnorm, int64_t N, int64_t OUT) {
  const int64_t total = N * OUT;
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total; e += int64_t(gridDim.x) * kThreads) {
    const float g = dora_gain(m, wnorm, e % OUT);
    const float o = bf16_to_f32(out[e]), b = bf16_to_f32(base[e]), l = bf16_to_f32(lora[e]);
    out[e] = f32_to_bf16(__fadd_rn(o, __fadd_rn(__fmul_rn(__fsub_rn(g, 1.0f), b), __fmul_rn(g, l))));
  }
}

// dm: a block of 32 columns x 8 row residues. Thread (tx, ty) sums rows
// ty, ty+8, ... of column j in double (coalesced over tx), then thread ty = 0
// adds the 8 partials in order: a fixed order for every N, no atomics.
constexpr int kDmCols = 32, kDmRowSlots = kThreads / kDmCols;

__global__ void __launch_bounds__(kThreads)
    dora_dm_kernel(float* __restrict__ dm, const uint16_t* dout, const uint16_t* base, const uint16_t* lora,
                   const float* __restrict__ wnorm, int64_t N, int64_t OUT) {
  __shared__ double part[kDmRowSlots][kDmCols];
  const int tx = int(threadIdx.x) % kDmCols, ty = int(threadIdx.x) / kDmCols;
  const int64_t j = int64_t(blockIdx.x) * kDmCols + tx;
  double acc = 0.0;
  if (j < OUT)
    for (int64_t i = ty; i < N; i += kDmRowSlots) {
      const int64_t k = i * OUT + j;
      acc += double(bf16_to_f32(dout[k])) * (double(bf16_to_f32(base[k])) + double(bf16_to_f32(lora[k])));
    }
  part[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && j < OUT) {
    double sum = 0.0;
    for (int r = 0; r < kDmRowSlots; ++r) sum += part[r][tx];
    dm[j] += float(sum / double(wnorm[j]));
  }
}

// dbase = dout * (g - 1) (when dbase is non-null), dlora = dout * g. No
// __restrict__: dbase/dlora may alias base/lora, which this kernel does not read.
__global__ void __launch_bounds__(kThreads)
    dora_scale_kernel(uint16_t* dbase, uint16_t* dlora, const uint16_t* dout, const float* m, const float* wnorm,
                      int64_t N, int64_t OUT) {
  const int64_t total = N * OUT;
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total; e += int64_t(gridDim.x) * kThreads) {
    const float g = dora_gain(m, wnorm, e % OUT);
    const float d = bf16_to_f32(dout[e]);
    if (dbase != nullptr) dbase[e] = f32_to_bf16(__fmul_rn(d, __fsub_rn(g, 1.0f)));
    dlora[e] = f32_to_bf16(__fmul_rn(d, g));
  }
}

// ---- host checks -------------------------------------------------------------------

void check_out(const char* fn, int64_t N, int64_t OUT) {
  check_dims(fn, "N", N);
  if (OUT <= 0) fail(fn, ": dimension OUT = ", OUT, " must be positive");
}

}  // namespace

// ---- the API ----------------------------------------------------------------------

void dora_weight_norm(CudaContext& ctx, float* wnorm, float* panel, const CudaLinearWeight& w, const float* A,
                      const float* B, float scale, int64_t R) {
  const char* fn = "cuda_ops::dora_weight_norm";
  const int64_t OUT = w.out, IN = w.in, P = std::min<int64_t>(plan_cuda::kDoraPanelRows, OUT);
  if (OUT <= 0 || IN <= 0 || OUT > INT_MAX || IN > INT_MAX)
    fail(fn, ": weight shape [", OUT, ", ", IN, "] must be positive and at most ", INT_MAX, " per side");
  if (R <= 0 || R > INT_MAX) fail(fn, ": rank R = ", R, " must be positive");
  check_pointer(fn, wnorm, "wnorm", OUT);
  check_pointer(fn, panel, "panel", P * IN);
  check_pointer(fn, A, "A", R * IN);
  check_pointer(fn, B, "B", OUT * R);
  const float one = 1.0f;
  for (int64_t r0 = 0; r0 < OUT; r0 += P) {
    const int64_t r1 = std::min(OUT, r0 + P), rows = r1 - r0;
    // panel (rows,IN) = W[r0:r1] in fp32
    linear_rows_f32(ctx, panel, w, r0, r1);
    // panel += scale * B[r0:r1] (rows,R) A (R,IN). Row-major panel is the
    // column-major (IN,rows) panel^T = A^T (IN,R) B[r0:r1]^T (R,rows): A is
    // column-major (IN,R) with ld IN, B's rows column-major (R,rows) with ld R.
    // Pedantic fp32: never TF32, whatever the handle's math mode.
    const cublasStatus_t st =
        cublasGemmEx(ctx.cublas(), CUBLAS_OP_N, CUBLAS_OP_N, int(IN), int(rows), int(R), &scale, A, CUDA_R_32F,
                     int(IN), B + r0 * R, CUDA_R_32F, int(R), &one, panel, CUDA_R_32F, int(IN),
                     CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS)
      fail(fn, ": cublasGemmEx (", rows, "x", IN, "x", R, ") failed: ", cublasGetStatusString(st));
    // wnorm[r0:r1]; the next panel overwrites this one only after (one stream).
    dora_row_norm_kernel<<<int(rows), kThreads, 0, ctx.stream()>>>(panel, IN, wnorm + r0);
    check_launch("dora_row_norm_kernel");
  }
}

void dora_forward(uint16_t* out, const uint16_t* base, const uint16_t* lora, const float* m, const float* wnorm,
                  int64_t N, int64_t OUT, cudaStream_t s) {
  const char* fn = "cuda_ops::dora_forward";
  check_out(fn, N, OUT);
  if (N == 0) return;  // nothing to do: null pointers are fine
  check_pointer(fn, out, "out", N * OUT);
  check_pointer(fn, base, "base", N * OUT);
  check_pointer(fn, lora, "lora", N * OUT);
  check_pointer(fn, m, "m", OUT);
  check_pointer(fn, wnorm, "wnorm", OUT);
  dora_forward_kernel<<<grid_for(N * OUT, kThreads), kThreads, 0, s>>>(out, base, lora, m, wnorm, N, OUT);
  check_launch("dora_forward_kernel");
}

void dora_backward(uint16_t* dbase, uint16_t* dlora, float* dm, const uint16_t* dout, const uint16_t* base,
                   const uint16_t* lora, const float* m, const float* wnorm, int64_t N, int64_t OUT,
                   cudaStream_t s) {
  const char* fn = "cuda_ops::dora_backward";
  check_out(fn, N, OUT);
  if (N == 0) return;  // dm would add zero; null pointers are fine
  check_pointer(fn, dlora, "dlora", N * OUT);
  check_pointer(fn, dm, "dm", OUT);
  check_pointer(fn, dout, "dout", N * OUT);
  check_pointer(fn, base, "base", N * OUT);
  check_pointer(fn, lora, "lora", N * OUT);
  check_pointer(fn, m, "m", OUT);
  check_pointer(fn, wnorm, "wnorm", OUT);
  // dm first: the scaling below may overwrite base and lora (in place).
  const int64_t col_blocks = (OUT + kDmCols - 1) / kDmCols;
  if (col_blocks > INT_MAX) fail(fn, ": OUT = ", OUT, " is too large");
  dora_dm_kernel<<<int(col_blocks), kThreads, 0, s>>>(dm, dout, base, lora, wnorm, N, OUT);
  check_launch("dora_dm_kernel");
  dora_scale_kernel<<<grid_for(N * OUT, kThreads), kThreads, 0, s>>>(dbase, dlora, dout, m, wnorm, N, OUT);
  check_launch("dora_scale_kernel");
}

}  // namespace qlora::cuda_ops
