// The fused 4-bit linear (LinearAlgo::Fused, kernels/cuda/linear_cuda.h):
// C (M,ncols) = A (M,K) op(W) on tensor cores, W dequantized tile by tile in
// shared memory and never written to global memory.
//
// One thread block of 4 warps computes a 64x64 tile of C, walking K in steps
// of 64: it stages A[m0:+64, k0:+64] and the matching 64x64 tile of W
// (dequantized: code value * block scale in fp32, rounded to bf16) in shared
// memory, then each warp multiplies its 32x32 quarter with
// mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32 fed by ldmatrix.
//   forward  (C = X W^T): the W tile is W[n0:+64, k0:+64]; its rows are the
//            columns n of B, k contiguous: B's "col" layout as stored, ldmatrix.
//   backward (C = dY W):  the W tile is W[k0:+64, n0:+64]; its rows are k, so
//            B's fragments come from ldmatrix.trans.
// Both passes stage the same W[row0:+64, col0:+64] rectangle with one loader.
// Tiles past M, K or ncols are zero-filled in shared memory (A and W both, so
// no 0 * garbage NaN enters a sum) and their C elements are not written.
//
// Correctness first; not yet tuned (measure before changing): one shared
// buffer, so loads and tensor-core work of a block do not overlap (no cp.async
// double-buffering; several blocks per SM hide some latency), a 64-row M tile
// re-dequantizes each W tile once per 64 rows of A, and sm_90 runs the same
// mma.sync path: wgmma needs sm_90a, which the build (sm_90) does not target.
#include <cstdint>

#include "core/error.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/linear_cuda.h"

namespace qlora::cuda_ops {

using namespace cuda_detail;

namespace {

constexpr int kTile = 64;           // BM = BN = BK
constexpr int kLds = kTile + 8;     // shared row stride in bf16: 144 bytes (see ldmatrix below)
constexpr int kFusedThreads = 128;  // 4 warps as 2x2, each 32x32 of the tile

static_assert(kTile * 2 == kFusedThreads, "the vector W loader gives each thread one 32-value chunk");
static_assert((kLds * 2) % 16 == 0, "ldmatrix and the uint4 stores need 16-byte aligned shared rows");

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800

// Four 8x8 bf16 matrices; thread t gives the address of row t%8 of matrix
// t/8 and receives, in r[j], row t/4 and columns 2(t%4), 2(t%4)+1 of matrix j
// (.trans: column t/4 and rows 2(t%4), 2(t%4)+1). A 144-byte row stride puts
// the 8 rows of each matrix in 8 distinct groups of 4 banks: no conflicts.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(p)));
}

// d (16x8 fp32) += a (16x16 bf16, row) * b (16x8 bf16, col).
__device__ __forceinline__ void mma_bf16_16x8x16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                 uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#endif

// A[m0:+64, k0:+64] of a (M,K) bf16 matrix into tile (64 x kLds), zeros past M or K.
__device__ __forceinline__ void load_a_tile(uint16_t* tile, const uint16_t* __restrict__ a, int64_t M,
                                            int64_t K, int64_t m0, int64_t k0, bool vec16) {
  if (vec16) {
    // K % 8 == 0: a chunk of 8 starting inside a row lies inside it.
    for (int c = int(threadIdx.x); c < kTile * kTile / 8; c += kFusedThreads) {
      const int r = c >> 3, col = (c & 7) * 8;
      const int64_t row = m0 + r, k = k0 + col;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (row < M && k < K) v = *reinterpret_cast<const uint4*>(a + row * K + k);
      *reinterpret_cast<uint4*>(tile + r * kLds + col) = v;
    }
  } else {
    for (int e = int(threadIdx.x); e < kTile * kTile; e += kFusedThreads) {
      const int r = e >> 6, col = e & (kTile - 1);
      const int64_t row = m0 + r, k = k0 + col;
      tile[r * kLds + col] = (row < M && k < K) ? a[row * K + k] : uint16_t(0);
    }
  }
}

// Two dequantized values as bf16 bits, the first (high nibble, lower address) in the low half.
__device__ __forceinline__ uint32_t dequant_byte(const float* code_value, uint32_t byte, float scale) {
  const uint16_t first = f32_to_bf16(__fmul_rn(code_value[byte >> 4], scale));
  const uint16_t second = f32_to_bf16(__fmul_rn(code_value[byte & 0x0fu], scale));
  return uint32_t(first) | (uint32_t(second) << 16);
}

// W[row0:+64, col0:+64] dequantized to bf16 into tile (64 x kLds), zeros past OUT or IN.
__device__ __forceinline__ void load_w_tile(uint16_t* tile, const Quant4WeightParams& w,
                                            const float* code_value, int64_t row0, int64_t col0, bool vec16) {
  if (vec16) {
    // IN % 32 == 0 and col0 % 64 == 0: each 32-value chunk is 16 aligned bytes
    // of codes at a flattened index that is a multiple of 32, so inside one
    // block (blocks are >= 32 values and aligned): one scale per chunk.
    for (int c = int(threadIdx.x); c < kTile * 2; c += kFusedThreads) {
      const int r = c >> 1, col = (c & 1) * 32;
      const int64_t o = row0 + r, i = col0 + col;
      uint32_t v[16];
      if (o < w.out && i < w.in) {
        const int64_t flat = o * w.in + i;
        const uint4 q = *reinterpret_cast<const uint4*>(w.codes + (flat >> 1));
        const float s = quant4_block_scale(w, flat >> w.block_log2);
        const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int b = 0; b < 4; ++b)
            v[4 * j + b] = dequant_byte(code_value, (words[j] >> (8 * b)) & 0xffu, s);
      } else {
#pragma unroll
        for (int j = 0; j < 16; ++j) v[j] = 0u;
      }
      uint4* dst = reinterpret_cast<uint4*>(tile + r * kLds + col);
#pragma unroll
      for (int j = 0; j < 4; ++j) dst[j] = make_uint4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
    }
  } else {
    // IN even: value pairs (even flattened index) are one byte and one block.
    for (int e = int(threadIdx.x); e < kTile * kTile / 2; e += kFusedThreads) {
      const int r = e >> 5, col = (e & 31) * 2;
      const int64_t o = row0 + r, i = col0 + col;
      uint32_t v = 0u;
      if (o < w.out && i < w.in) {
        const int64_t flat = o * w.in + i;
        v = dequant_byte(code_value, w.codes[flat >> 1], quant4_block_scale(w, flat >> w.block_log2));
      }
      *reinterpret_cast<uint32_t*>(tile + r * kLds + col) = v;
    }
  }
}

template <bool kBackward>
__global__ void __launch_bounds__(kFusedThreads) linear_fused_kernel(const LinearFusedParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  __shared__ __align__(16) uint16_t a_tile[kTile * kLds];
  __shared__ __align__(16) uint16_t w_tile[kTile * kLds];
  __shared__ float code_value[16];

  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5;
  const int wm = warp >> 1, wn = warp & 1;  // this warp's 32x32 quarter: rows wm*32, columns wn*32
  const int64_t m0 = int64_t(blockIdx.x) * kTile;
  const int64_t n0 = int64_t(blockIdx.y) * kTile;
  const int64_t K = kBackward ? p.w.out : p.w.in;
  const int64_t ncols = kBackward ? p.w.in : p.w.out;

  if (threadIdx.x < 16) code_value[threadIdx.x] = quant4_code_value(p.w.type, uint8_t(threadIdx.x));
  __syncthreads();  // the W loader reads the table

  // acc[mi][ni]: the 16x8 C fragment at rows wm*32 + mi*16, columns wn*32 + ni*8.
  float acc[2][4][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[mi][ni][j] = 0.0f;

  // ldmatrix row/column offsets of this lane: it addresses row lane%8 of
  // matrix lane/8 of each x4 load.
  const int lrow = lane & 7, lmat_lo = (lane >> 3) & 1, lmat_hi = lane >> 4;

  for (int64_t k0 = 0; k0 < K; k0 += kTile) {
    load_a_tile(a_tile, p.a, p.M, K, m0, k0, p.a_vec16);
    if (kBackward) {
      load_w_tile(w_tile, p.w, code_value, k0, n0, p.w_vec16);
    } else {
      load_w_tile(w_tile, p.w, code_value, n0, k0, p.w_vec16);
    }
    __syncthreads();  // tiles complete before any warp reads them

#pragma unroll
    for (int kk = 0; kk < kTile; kk += 16) {
      // A 16x16 at (wm*32 + mi*16, kk): matrices (rows +0, k +0), (+8, +0), (+0, +8), (+8, +8)
      // = the a0..a3 registers of the m16n8k16 A fragment.
      uint32_t a[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
        ldmatrix_x4(a[mi], a_tile + (wm * 32 + mi * 16 + lrow + lmat_lo * 8) * kLds + kk + lmat_hi * 8);
      // B for two n8 tiles per x4 load: matrices (n +0, k +0), (n +0, k +8),
      // (n +8, k +0), (n +8, k +8) = b0, b1 of tile 2nj, then of tile 2nj+1.
      uint32_t b[4][2];
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        uint32_t r[4];
        if (kBackward) {
          // w_tile is [k][n]: matrix j covers rows k = kk + (j&1)*8, columns n + (j>>1)*8, transposed.
          ldmatrix_x4_trans(r, w_tile + (kk + lrow + lmat_lo * 8) * kLds + wn * 32 + nj * 16 + lmat_hi * 8);
        } else {
          // w_tile is [n][k]: matrix j covers rows n + (j>>1)*8, columns k = kk + (j&1)*8.
          ldmatrix_x4(r, w_tile + (wn * 32 + nj * 16 + lrow + lmat_hi * 8) * kLds + kk + lmat_lo * 8);
        }
        b[2 * nj][0] = r[0];
        b[2 * nj][1] = r[1];
        b[2 * nj + 1][0] = r[2];
        b[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_bf16_16x8x16(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
    }
    __syncthreads();  // every warp is done with the tiles before they are overwritten
  }

  // C fragment: c0, c1 at (row g, columns 2t, 2t+1), c2, c3 at (row g+8, same columns).
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = m0 + wm * 32 + mi * 16 + g + h * 8;
        const int64_t col = n0 + wn * 32 + ni * 8 + 2 * t;
        if (row >= p.M || col >= ncols) continue;
        const bool second = col + 1 < ncols;
        uint16_t* dst = p.c + row * ncols + col;
        float v0 = acc[mi][ni][2 * h], v1 = acc[mi][ni][2 * h + 1];
        if (!kBackward && p.bias != nullptr) {
          v0 += bf16_to_f32(p.bias[col]);
          if (second) v1 += bf16_to_f32(p.bias[col + 1]);
        }
        if (kBackward && p.accumulate) {
          v0 += bf16_to_f32(dst[0]);
          if (second) v1 += bf16_to_f32(dst[1]);
        }
        if (second && p.c_pairs) {
          // ncols even and col even: 4-byte aligned.
          *reinterpret_cast<uint32_t*>(dst) = uint32_t(f32_to_bf16(v0)) | (uint32_t(f32_to_bf16(v1)) << 16);
        } else {
          dst[0] = f32_to_bf16(v0);
          if (second) dst[1] = f32_to_bf16(v1);
        }
      }
#else
  // Below sm_80 there is no bf16 mma.sync; linear_algo_supports keeps such devices away.
  __trap();
#endif
}

}  // namespace

void launch_linear_fused(const LinearFusedParams& p, int arch, cudaStream_t s) {
  const int64_t ncols = p.backward ? p.w.in : p.w.out;
  if (p.M == 0 || ncols == 0) return;
  if (arch < 80) fail("launch_linear_fused: the fused linear needs sm_80 or newer, the device is sm_", arch);
  // One tile shape on every architecture for now (sm_80..sm_90); a per-arch
  // choice belongs here once it is measured.
  const dim3 grid(unsigned((p.M + kTile - 1) / kTile), unsigned((ncols + kTile - 1) / kTile));
  if (p.backward) {
    linear_fused_kernel<true><<<grid, kFusedThreads, 0, s>>>(p);
  } else {
    linear_fused_kernel<false><<<grid, kFusedThreads, 0, s>>>(p);
  }
  check_launch("linear_fused_kernel");
}

}  // namespace qlora::cuda_ops
