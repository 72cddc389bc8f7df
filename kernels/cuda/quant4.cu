// NF4/FP4 blockwise quantization kernels. Bit-exactness with the CPU
// reference (quant/blockwise.cpp) rests on doing the same IEEE fp32
// operations in the same rounding mode:
//  - absmax = max |x| with fmaxf (NaN skipped), starting from 0; the maximum
//    of a set does not depend on the reduction order;
//  - inv = 1 / absmax with __fdiv_rn (correctly rounded, whatever -prec-div);
//  - every product is __fmul_rn, every sum __fadd_rn, so nvcc can never
//    contract a multiply and an add into one FMA (the CPU rounds twice);
//  - rounding to codes and the code values come from quant/codebook.h, the
//    functions the CPU reference calls.
// Denormals must not be flushed: the intrinsics follow -ftz, so this file must
// not be built with --use_fast_math or -ftz=true (nvcc 13 defines no macro to
// detect them; the subnormal cases of tests/test_cuda_quant.cpp would fail).
#include "kernels/cuda/quant4.h"

#include <cstdint>

#include "core/error.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/device.h"
#include "quant/codebook.h"

namespace qlora {

using namespace cuda_detail;

namespace {

constexpr int kMaxPairsPerThread = 8;  // 4096-value block / 2 / 256 threads

// Loads elements i and i+1 (or i and a 0.0f pad when i+1 is past `len`).
// `pairs` says the pair may be read as one 8-byte (fp32) / 4-byte (bf16) word.
__device__ __forceinline__ void load_pair(const float* __restrict__ x, int64_t i, bool second, bool pairs,
                                          float& a, float& b) {
  if (second && pairs) {
    const float2 v = *reinterpret_cast<const float2*>(x + i);
    a = v.x;
    b = v.y;
  } else {
    a = x[i];
    b = second ? x[i + 1] : 0.0f;
  }
}
__device__ __forceinline__ void load_pair(const uint16_t* __restrict__ x, int64_t i, bool second, bool pairs,
                                          float& a, float& b) {
  if (second && pairs) {
    const uint32_t v = *reinterpret_cast<const uint32_t*>(x + i);  // little endian: x[i] is the low half
    a = __uint_as_float(v << 16);
    b = __uint_as_float(v & 0xffff0000u);
  } else {
    a = bf16_to_f32(x[i]);
    b = second ? bf16_to_f32(x[i + 1]) : 0.0f;
  }
}

__device__ __forceinline__ void store_pair(float* __restrict__ out, int64_t i, bool second, bool pairs, float a,
                                           float b) {
  if (second && pairs) {
    *reinterpret_cast<float2*>(out + i) = make_float2(a, b);
  } else {
    out[i] = a;
    if (second) out[i + 1] = b;
  }
}
__device__ __forceinline__ void store_pair(uint16_t* __restrict__ out, int64_t i, bool second, bool pairs, float a,
                                           float b) {
  const uint16_t ha = f32_to_bf16(a);
  if (second && pairs) {
    *reinterpret_cast<uint32_t*>(out + i) = uint32_t(ha) | (uint32_t(f32_to_bf16(b)) << 16);
  } else {
    out[i] = ha;
    if (second) out[i + 1] = f32_to_bf16(b);
  }
}

// One group of G = min(256, block/2) threads per quantization block (so a
// thread block of 256 threads holds 256/G groups); each thread owns
// block/(2G) <= 8 pairs of neighbouring values, kept in registers between the
// absmax reduction and the encoding, and writes one packed byte per pair.
template <typename In, Quant4Type kType>
__global__ void __launch_bounds__(kThreads) quantize4_kernel(const Quantize4Params p) {
  __shared__ float warp_max[kThreads / 32];

  const In* __restrict__ x = static_cast<const In*>(p.x);
  const int group_size = min(kThreads, p.block / 2);  // power of two, 16..256
  const int groups = kThreads / group_size;
  const int group = int(threadIdx.x) / group_size;
  const int lane = int(threadIdx.x) % group_size;
  const int pairs_per_thread = p.block / 2 / group_size;  // 1..8

  // The loop bound is the same for every thread of the block, so all of them
  // reach the shuffles and __syncthreads below (inactive groups carry zeros).
  for (int64_t first = int64_t(blockIdx.x) * groups; first < p.nblocks; first += int64_t(gridDim.x) * groups) {
    const int64_t qb = first + group;
    const bool active = qb < p.nblocks;
    const int64_t b0 = qb * p.block;
    const int64_t len = active ? min(int64_t(p.block), p.n - b0) : 0;

    float v[kMaxPairsPerThread][2];
    float m = 0.0f;
#pragma unroll
    for (int k = 0; k < kMaxPairsPerThread; ++k) {
      v[k][0] = 0.0f;
      v[k][1] = 0.0f;
      const int64_t i = 2 * (int64_t(lane) + int64_t(k) * group_size);  // offset in the block
      if (k < pairs_per_thread && i < len) {
        load_pair(x, b0 + i, i + 1 < len, p.x_pairs_aligned, v[k][0], v[k][1]);
        // The 0.0f pad of an odd tail cannot change a max that starts at 0.
        m = fmaxf(m, fmaxf(fabsf(v[k][0]), fabsf(v[k][1])));
      }
    }

    // Max within the group: shuffles inside a warp (a group smaller than a
    // warp is an aligned power-of-two slice of it), then across its warps.
    const int width = group_size < 32 ? group_size : 32;
    for (int off = width / 2; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    if (group_size > 32) {
      if ((threadIdx.x & 31u) == 0) warp_max[threadIdx.x >> 5] = m;
      __syncthreads();
      const int w0 = (group * group_size) >> 5;
      const int nw = group_size >> 5;
      m = warp_max[w0];
      for (int w = 1; w < nw; ++w) m = fmaxf(m, warp_max[w0 + w]);
      __syncthreads();  // warp_max is rewritten by the next iteration
    }

    if (active) {
      if (lane == 0) p.absmax[qb] = m;
      const float inv = __fdiv_rn(1.0f, m);  // 1/0 = inf: an all-zero block encodes NaN (see codebook.h)
#pragma unroll
      for (int k = 0; k < kMaxPairsPerThread; ++k) {
        const int64_t i = 2 * (int64_t(lane) + int64_t(k) * group_size);
        if (k < pairs_per_thread && i < len) {
          const uint8_t hi = quant4_quantize_scaled(kType, __fmul_rn(v[k][0], inv));
          const uint8_t lo = quant4_quantize_scaled(kType, __fmul_rn(v[k][1], inv));  // pad: 0.0f * inv
          p.codes[(b0 + i) >> 1] = quant4_pack(hi, lo);
        }
      }
    }
  }
}

// One thread per packed byte (two outputs), grid-stride.
template <typename Out, Quant4Type kType>
__global__ void __launch_bounds__(kThreads) dequantize4_kernel(const Dequantize4Params p) {
  __shared__ float values[16];
  if (threadIdx.x < 16) values[threadIdx.x] = quant4_code_value(kType, uint8_t(threadIdx.x));
  __syncthreads();

  Out* __restrict__ out = static_cast<Out*>(p.out);
  const int64_t nbytes = (p.n + 1) / 2;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x; j < nbytes; j += stride) {
    const uint8_t c = p.codes[j];
    const int64_t i = 2 * j;  // both elements share a block: blocks are even
    const float s = p.absmax[i >> p.block_log2];
    const float a = __fmul_rn(values[c >> 4], s);
    const float b = __fmul_rn(values[c & 0x0f], s);
    store_pair(out, i, i + 1 < p.n, p.out_pairs_aligned, a, b);
  }
}

// absmax[i] = code8[q[i]] * nested_absmax[i / nested_block] + offset, two roundings.
__global__ void __launch_bounds__(kThreads) double_dequantize_kernel(const DoubleDequantizeParams p) {
  __shared__ float code[256];
  for (int i = int(threadIdx.x); i < 256; i += kThreads) code[i] = p.code8[i];
  __syncthreads();

  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < p.nblocks; i += stride)
    p.absmax_out[i] = __fadd_rn(__fmul_rn(code[p.codes8[i]], p.nested_absmax[i / p.nested_block]), p.offset);
}

// ---- host-side validation ----------------------------------------------------

// The rule of valid_block4 (quant/blockwise.cpp). Not called from here because
// qlora_cuda is linked below qlora_lib, which defines it.
bool block4_supported(int64_t block) { return block >= 32 && block <= 4096 && (block & (block - 1)) == 0; }

int log2_exact(int64_t v) {
  int k = 0;
  while ((int64_t(1) << k) < v) ++k;
  return k;
}

bool pairs_aligned(const void* p, size_t pair_bytes) { return reinterpret_cast<uintptr_t>(p) % pair_bytes == 0; }

void check_quant4_args(const char* fn, int64_t n, int64_t block, Quant4Type t) {
  if (n < 0) fail(fn, ": element count ", n, " is negative");
  if (!block4_supported(block))
    fail(fn, ": 4-bit block size ", block, " is not supported (expected a power of two from 32 to 4096)");
  if (t != Quant4Type::NF4 && t != Quant4Type::FP4) fail(fn, ": unknown 4-bit type ", int(t));
}

template <typename In>
void quantize4_impl(const char* fn, const In* d_x, CudaFloat x_type, int64_t n, int64_t block, Quant4Type t,
                    uint8_t* d_codes, float* d_absmax, cudaStream_t s) {
  check_quant4_args(fn, n, block, t);
  check_pointer(fn, d_x, "d_x", n);
  check_pointer(fn, d_codes, "d_codes", n);
  check_pointer(fn, d_absmax, "d_absmax", n);
  Quantize4Params p;
  p.x = d_x;
  p.x_type = x_type;
  p.x_pairs_aligned = pairs_aligned(d_x, 2 * sizeof(In));
  p.n = n;
  p.block = int(block);
  p.nblocks = (n + block - 1) / block;
  p.type = t;
  p.codes = d_codes;
  p.absmax = d_absmax;
  launch_quantize4(p, s);
}

template <typename Out>
void dequantize4_impl(const char* fn, const uint8_t* d_codes, const float* d_absmax, int64_t n, int64_t block,
                      Quant4Type t, Out* d_out, CudaFloat out_type, cudaStream_t s) {
  check_quant4_args(fn, n, block, t);
  check_pointer(fn, d_codes, "d_codes", n);
  check_pointer(fn, d_absmax, "d_absmax", n);
  check_pointer(fn, d_out, "d_out", n);
  Dequantize4Params p;
  p.codes = d_codes;
  p.absmax = d_absmax;
  p.n = n;
  p.block_log2 = log2_exact(block);
  p.type = t;
  p.out = d_out;
  p.out_type = out_type;
  p.out_pairs_aligned = pairs_aligned(d_out, 2 * sizeof(Out));
  launch_dequantize4(p, s);
}

}  // namespace

// ---- launchers -----------------------------------------------------------------

void launch_quantize4(const Quantize4Params& p, cudaStream_t s) {
  if (p.n == 0) return;
  const int groups_per_block = kThreads / (p.block / 2 < kThreads ? p.block / 2 : kThreads);
  const int grid = grid_for(p.nblocks, groups_per_block);
  const bool nf4 = p.type == Quant4Type::NF4;
  if (p.x_type == CudaFloat::F32) {
    if (nf4) quantize4_kernel<float, Quant4Type::NF4><<<grid, kThreads, 0, s>>>(p);
    else quantize4_kernel<float, Quant4Type::FP4><<<grid, kThreads, 0, s>>>(p);
  } else {
    if (nf4) quantize4_kernel<uint16_t, Quant4Type::NF4><<<grid, kThreads, 0, s>>>(p);
    else quantize4_kernel<uint16_t, Quant4Type::FP4><<<grid, kThreads, 0, s>>>(p);
  }
  check_launch("quantize4_kernel");
}

void launch_dequantize4(const Dequantize4Params& p, cudaStream_t s) {
  if (p.n == 0) return;
  const int grid = grid_for((p.n + 1) / 2, kThreads);
  const bool nf4 = p.type == Quant4Type::NF4;
  if (p.out_type == CudaFloat::F32) {
    if (nf4) dequantize4_kernel<float, Quant4Type::NF4><<<grid, kThreads, 0, s>>>(p);
    else dequantize4_kernel<float, Quant4Type::FP4><<<grid, kThreads, 0, s>>>(p);
  } else {
    if (nf4) dequantize4_kernel<uint16_t, Quant4Type::NF4><<<grid, kThreads, 0, s>>>(p);
    else dequantize4_kernel<uint16_t, Quant4Type::FP4><<<grid, kThreads, 0, s>>>(p);
  }
  check_launch("dequantize4_kernel");
}

void launch_double_dequantize(const DoubleDequantizeParams& p, cudaStream_t s) {
  if (p.nblocks == 0) return;
  double_dequantize_kernel<<<grid_for(p.nblocks, kThreads), kThreads, 0, s>>>(p);
  check_launch("double_dequantize_kernel");
}

// ---- validated entry points ------------------------------------------------------

void cuda_quantize4(const float* d_x, int64_t n, int64_t block, Quant4Type t, uint8_t* d_codes, float* d_absmax,
                    cudaStream_t s) {
  quantize4_impl("cuda_quantize4 (fp32)", d_x, CudaFloat::F32, n, block, t, d_codes, d_absmax, s);
}

void cuda_quantize4(const uint16_t* d_x_bf16, int64_t n, int64_t block, Quant4Type t, uint8_t* d_codes,
                    float* d_absmax, cudaStream_t s) {
  quantize4_impl("cuda_quantize4 (bf16)", d_x_bf16, CudaFloat::BF16, n, block, t, d_codes, d_absmax, s);
}

void cuda_dequantize4(const uint8_t* d_codes, const float* d_absmax, int64_t n, int64_t block, Quant4Type t,
                      float* d_out, cudaStream_t s) {
  dequantize4_impl("cuda_dequantize4 (fp32)", d_codes, d_absmax, n, block, t, d_out, CudaFloat::F32, s);
}

void cuda_dequantize4(const uint8_t* d_codes, const float* d_absmax, int64_t n, int64_t block, Quant4Type t,
                      uint16_t* d_out_bf16, cudaStream_t s) {
  dequantize4_impl("cuda_dequantize4 (bf16)", d_codes, d_absmax, n, block, t, d_out_bf16, CudaFloat::BF16, s);
}

void cuda_double_dequantize(const uint8_t* d_codes8, const float* d_nested_absmax, const float* d_code8,
                            float offset, int64_t nblocks, int64_t nested_block, float* d_absmax_out,
                            cudaStream_t s) {
  const char* fn = "cuda_double_dequantize";
  if (nblocks < 0) fail(fn, ": block count ", nblocks, " is negative");
  if (nested_block <= 0) fail(fn, ": nested block size ", nested_block, " must be positive");
  check_pointer(fn, d_codes8, "d_codes8", nblocks);
  check_pointer(fn, d_nested_absmax, "d_nested_absmax", nblocks);
  check_pointer(fn, d_code8, "d_code8", nblocks);
  check_pointer(fn, d_absmax_out, "d_absmax_out", nblocks);
  DoubleDequantizeParams p;
  p.codes8 = d_codes8;
  p.nested_absmax = d_nested_absmax;
  p.code8 = d_code8;
  p.offset = offset;
  p.nblocks = nblocks;
  p.nested_block = nested_block;
  p.absmax_out = d_absmax_out;
  launch_double_dequantize(p, s);
}

}  // namespace qlora
