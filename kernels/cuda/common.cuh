// Helpers shared by the .cu files (nvcc only): exact bf16 <-> fp32
// conversions, a thread-block sum, grid sizing and the host-side checks every
// entry point runs before it queues work.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/error.h"

namespace qlora::cuda_detail {

inline constexpr int kThreads = 256;                   // default threads per block
inline constexpr int64_t kMaxGrid = int64_t(1) << 20;  // thread blocks; kernels loop beyond

// bf16 bits widened exactly to fp32.
__device__ __forceinline__ float bf16_to_f32(uint16_t h) { return __uint_as_float(uint32_t(h) << 16); }

// Round to nearest even; a NaN stays a quiet NaN with its sign and top payload
// bits. The same integer arithmetic as f32_to_bf16 in src/core/dtype.h
// (__float2bfloat16_rn would return a canonical NaN instead).
__device__ __forceinline__ uint16_t f32_to_bf16(float f) {
  uint32_t b = __float_as_uint(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return uint16_t((b >> 16) | 0x0040u);
  b += 0x7fffu + ((b >> 16) & 1u);
  return uint16_t(b >> 16);
}

// Sum of v over the thread block, returned to every thread. `shared` holds one
// float per warp; the trailing barrier lets the caller reuse it at once. The
// order of the additions is fixed, so the result is deterministic.
__device__ __forceinline__ float block_sum(float v, float* shared) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;
  const int warps = int(blockDim.x) >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < warps; ++w) total += shared[w];  // same order in every thread: one value for all
  __syncthreads();
  return total;
}

// ---- host side ----------------------------------------------------------------

inline int grid_for(int64_t work_items, int64_t items_per_block) {
  const int64_t blocks = (work_items + items_per_block - 1) / items_per_block;
  return int(blocks < kMaxGrid ? blocks : kMaxGrid);
}

// After a launch: throws qlora::Error naming the kernel when it failed to start.
inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    fail("CUDA launch of ", kernel, " failed: ", cudaGetErrorString(err), " (", cudaGetErrorName(err), ")");
}

inline void check_dims(const char* fn, const char* name, int64_t v) {
  if (v < 0) fail(fn, ": dimension ", name, " = ", v, " is negative");
}

inline void check_pointer(const char* fn, const void* p, const char* name, int64_t n) {
  if (n > 0 && p == nullptr) fail(fn, ": ", name, " is null (", n, " elements requested)");
}

}  // namespace qlora::cuda_detail
