// The batch-1..4 4-bit linear for generation (LinearAlgo::Gemv,
// kernels/cuda/linear_cuda.h): out (rows,OUT) = inp (rows,IN) W^T (+ bias).
//
// At a handful of rows the product is a stream over W's codes (4 bits per
// multiply-add per row), so the kernel is about reading them at full width:
// one warp per output row, each lane taking 16-byte chunks of codes (32
// values) strided by the warp, so a warp reads 512 contiguous bytes per step.
// Each weight is dequantized in fp32 (code value * block scale, exactly the
// CPU's value; it is not rounded to bf16, as nothing here needs bf16
// operands) and multiplied with the rows' inputs in fp32; the lanes' partial
// sums meet in a warp shuffle reduction.
//
// Not yet tuned (no measurement yet): the inputs are re-read from L1/L2 for
// every output row, and a row is one warp whatever IN is.
#include <cstdint>

#include "core/error.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/linear_cuda.h"

namespace qlora::cuda_ops {

using namespace cuda_detail;

namespace {

constexpr int kWarpsPerBlock = kThreads / 32;

// Adds 8 bf16 inputs (one 16-byte word) times w[0..7] to acc.
__device__ __forceinline__ float dot8(const uint4 x, const float* w, float acc) {
  const uint32_t words[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    acc = fmaf(__uint_as_float(words[j] << 16), w[2 * j], acc);              // element 2j: the low half
    acc = fmaf(__uint_as_float(words[j] & 0xffff0000u), w[2 * j + 1], acc);  // element 2j+1
  }
  return acc;
}

template <int kRows>
__global__ void __launch_bounds__(kThreads) linear_gemv_kernel(const LinearGemvParams p) {
  __shared__ float code_value[16];
  if (threadIdx.x < 16) code_value[threadIdx.x] = quant4_code_value(p.w.type, uint8_t(threadIdx.x));
  __syncthreads();

  const int lane = int(threadIdx.x) & 31;
  const int64_t IN = p.w.in, OUT = p.w.out;
  const int64_t warp_stride = int64_t(gridDim.x) * kWarpsPerBlock;
  // o is the same for the whole warp, so every lane reaches the shuffles.
  for (int64_t o = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5); o < OUT; o += warp_stride) {
    float acc[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;

    if (p.vec16) {
      // IN % 32 == 0: chunk c of the row is 16 aligned bytes of codes, inside one block.
      for (int64_t c = lane; c < IN / 32; c += 32) {
        const int64_t i = c * 32;
        const int64_t flat = o * IN + i;
        const uint4 q = *reinterpret_cast<const uint4*>(p.w.codes + (flat >> 1));
        const float s = quant4_block_scale(p.w, flat >> p.w.block_log2);
        const uint32_t words[4] = {q.x, q.y, q.z, q.w};
        float wv[32];
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          const uint32_t byte = (words[j >> 2] >> (8 * (j & 3))) & 0xffu;
          wv[2 * j] = __fmul_rn(code_value[byte >> 4], s);
          wv[2 * j + 1] = __fmul_rn(code_value[byte & 0x0fu], s);
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const uint4* x = reinterpret_cast<const uint4*>(p.inp + r * IN + i);
#pragma unroll
          for (int v = 0; v < 4; ++v) acc[r] = dot8(x[v], wv + 8 * v, acc[r]);
        }
      }
    } else {
      // Any IN (odd included: a row may start on a low nibble): value by value.
      for (int64_t i = lane; i < IN; i += 32) {
        const int64_t flat = o * IN + i;
        const float wv = __fmul_rn(code_value[quant4_unpack(p.w.codes, flat)],
                                   quant4_block_scale(p.w, flat >> p.w.block_log2));
#pragma unroll
        for (int r = 0; r < kRows; ++r) acc[r] = fmaf(bf16_to_f32(p.inp[r * IN + i]), wv, acc[r]);
      }
    }

#pragma unroll
    for (int r = 0; r < kRows; ++r)
      for (int off = 16; off > 0; off >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], off);
    if (lane == 0) {
      const float b = p.bias != nullptr ? bf16_to_f32(p.bias[o]) : 0.0f;
#pragma unroll
      for (int r = 0; r < kRows; ++r) p.out[r * OUT + o] = f32_to_bf16(acc[r] + b);
    }
  }
}

}  // namespace

void launch_linear_gemv(const LinearGemvParams& p, cudaStream_t s) {
  if (p.w.out == 0) return;
  const int grid = grid_for(p.w.out, kWarpsPerBlock);
  switch (p.rows) {
    case 1:
      linear_gemv_kernel<1><<<grid, kThreads, 0, s>>>(p);
      break;
    case 2:
      linear_gemv_kernel<2><<<grid, kThreads, 0, s>>>(p);
      break;
    case 3:
      linear_gemv_kernel<3><<<grid, kThreads, 0, s>>>(p);
      break;
    case 4:
      linear_gemv_kernel<4><<<grid, kThreads, 0, s>>>(p);
      break;
    default:
      fail("launch_linear_gemv: ", p.rows, " rows (expected 1 to ", kLinearGemvMaxRows, ")");
  }
  check_launch("linear_gemv_kernel");
}

}  // namespace qlora::cuda_ops
