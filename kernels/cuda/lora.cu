// The LoRA branch (kernels/cuda/lora_cuda.h): cuBLAS products through
// cuda_ops::gemm (two forward, four backward) and the counter-based dropout kernel.
//
// Dropout must drop exactly the elements the CPU op drops (a run may switch
// backends, and the parity tests compare masks), so the keep decision is pure
// integer arithmetic plus an exact conversion; the kept values are scaled with
// __fmul_rn/__fadd_rn so that no FMA contraction changes the fp32 result, which
// then equals the CPU's bit for bit before the one rounding to bf16.
#include <cstdint>
#include <initializer_list>
#include <utility>

#include "core/error.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/lora_cuda.h"

namespace qlora::cuda_ops {

using namespace cuda_detail;

namespace {

// ---- dropout: params, kernel, launcher ------------------------------------------

struct DropoutParams {
  uint16_t* out = nullptr;       // (n) bf16: dropout output, or dinp when accumulating
  const uint16_t* in = nullptr;  // (n) bf16: inp, or dout when accumulating
  int64_t n = 0;
  float p = 0.0f;         // drop probability, [0, 1)
  float inv_keep = 1.0f;  // 1/(1-p), computed on the host as the CPU op does
  uint64_t seed = 0;
};

// splitmix64 of (seed, index), the keep() of kernels/cpu/lora.cpp: the top 24
// bits of the hash, converted exactly (they fit a float's significand) and
// scaled by 2^-24 (exact), compared with p.
__device__ __forceinline__ bool dropout_keep(uint64_t seed, int64_t i, float p) {
  uint64_t z = seed + 0x9e3779b97f4a7c15ull * (uint64_t(i) + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  const float u = float(uint32_t(z >> 40)) * (1.0f / 16777216.0f);
  return u >= p;
}

// kAccumulate = false: out = keep ? in * inv_keep : 0 (every element written).
// kAccumulate = true:  out += in * inv_keep where kept; dropped ones untouched.
template <bool kAccumulate>
__global__ void __launch_bounds__(kThreads) dropout_kernel(const DropoutParams p) {
  const bool drops = p.p > 0.0f;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const bool kept = !(drops && !dropout_keep(p.seed, i, p.p));
    const float v = __fmul_rn(bf16_to_f32(p.in[i]), p.inv_keep);
    if constexpr (kAccumulate) {
      if (kept) p.out[i] = f32_to_bf16(__fadd_rn(bf16_to_f32(p.out[i]), v));
    } else {
      p.out[i] = kept ? f32_to_bf16(v) : uint16_t(0);
    }
  }
}

// One element per thread, grid-stride: the same on every architecture (a
// memory-bound pass; no measurement has asked for wider loads yet).
void launch_dropout(const DropoutParams& p, bool accumulate, cudaStream_t s) {
  if (p.n == 0) return;
  const int grid = grid_for(p.n, kThreads);
  if (accumulate) {
    dropout_kernel<true><<<grid, kThreads, 0, s>>>(p);
    check_launch("dropout_kernel<accumulate>");
  } else {
    dropout_kernel<false><<<grid, kThreads, 0, s>>>(p);
    check_launch("dropout_kernel");
  }
}

DropoutParams dropout_params(const char* fn, uint16_t* out, const char* out_name, const uint16_t* in,
                             const char* in_name, int64_t n, float p, uint64_t seed) {
  check_dims(fn, "n", n);
  if (!(p >= 0.0f && p < 1.0f)) fail(fn, ": dropout probability p = ", p, " is outside [0, 1)");
  check_pointer(fn, out, out_name, n);
  check_pointer(fn, in, in_name, n);
  DropoutParams d;
  d.out = out;
  d.in = in;
  d.n = n;
  d.p = p;
  d.inv_keep = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;  // the CPU op's expression, in fp32
  d.seed = seed;
  return d;
}

void check_lora_dims(const char* fn, int64_t N, int64_t IN, int64_t OUT, int64_t R) {
  check_dims(fn, "N", N);
  for (auto [v, name] : {std::pair<int64_t, const char*>{IN, "IN"}, {OUT, "OUT"}, {R, "R"}})
    if (v <= 0) fail(fn, ": dimension ", name, " = ", v, " must be positive");
}

}  // namespace

// ---- LoRA ------------------------------------------------------------------------

void lora_forward(CudaContext& ctx, uint16_t* out, uint16_t* h, const uint16_t* xd, const uint16_t* A,
                  const uint16_t* B, float scale, int64_t N, int64_t IN, int64_t OUT, int64_t R) {
  const char* fn = "cuda_ops::lora_forward";
  check_lora_dims(fn, N, IN, OUT, R);
  check_pointer(fn, out, "out", N * OUT);
  check_pointer(fn, h, "h", N * R);
  check_pointer(fn, xd, "xd", N * IN);
  check_pointer(fn, A, "A", R * IN);
  check_pointer(fn, B, "B", OUT * R);
  if (N == 0) return;
  // h (N,R) = xd (N,IN) A^T, rounded to bf16: it is saved and is the next product's input.
  gemm(ctx, Trans::N, Trans::T, N, R, IN, 1.0f, xd, IN, A, IN, 0.0f, h, GemmOut::BF16, R, fn);
  // out (N,OUT) += scale * h (N,R) B^T: cuBLAS reads out, adds in fp32 and rounds once.
  gemm(ctx, Trans::N, Trans::T, N, OUT, R, scale, h, R, B, R, 1.0f, out, GemmOut::BF16, OUT, fn);
}

void lora_backward(CudaContext& ctx, uint16_t* dinp, float* dA, float* dB, uint16_t* dh, const uint16_t* dout,
                   const uint16_t* h, const uint16_t* xd, const uint16_t* A, const uint16_t* B, float scale,
                   int64_t N, int64_t IN, int64_t OUT, int64_t R) {
  const char* fn = "cuda_ops::lora_backward";
  check_lora_dims(fn, N, IN, OUT, R);
  check_pointer(fn, dinp, "dinp", N * IN);
  check_pointer(fn, dA, "dA", R * IN);
  check_pointer(fn, dB, "dB", OUT * R);
  check_pointer(fn, dh, "dh", N * R);
  check_pointer(fn, dout, "dout", N * OUT);
  check_pointer(fn, h, "h", N * R);
  check_pointer(fn, xd, "xd", N * IN);
  check_pointer(fn, A, "A", R * IN);
  check_pointer(fn, B, "B", OUT * R);
  if (N == 0) return;  // every gradient below would add zero
  // dB (OUT,R) += scale * dout^T (OUT,N) h (N,R), fp32.
  gemm(ctx, Trans::T, Trans::N, OUT, R, N, scale, dout, OUT, h, R, 1.0f, dB, GemmOut::F32, R, fn);
  // dh (N,R) = scale * dout (N,OUT) B (OUT,R), rounded to bf16: the input of the two products below.
  gemm(ctx, Trans::N, Trans::N, N, R, OUT, scale, dout, OUT, B, R, 0.0f, dh, GemmOut::BF16, R, fn);
  // dA (R,IN) += dh^T (R,N) xd (N,IN), fp32.
  gemm(ctx, Trans::T, Trans::N, R, IN, N, 1.0f, dh, R, xd, IN, 1.0f, dA, GemmOut::F32, IN, fn);
  // dinp (N,IN) += dh (N,R) A (R,IN): read, added in fp32, rounded once.
  gemm(ctx, Trans::N, Trans::N, N, IN, R, 1.0f, dh, R, A, IN, 1.0f, dinp, GemmOut::BF16, IN, fn);
}

// ---- dropout -----------------------------------------------------------------------

void dropout_forward(uint16_t* out, const uint16_t* inp, int64_t n, float p, uint64_t seed, cudaStream_t s) {
  launch_dropout(dropout_params("cuda_ops::dropout_forward", out, "out", inp, "inp", n, p, seed), false, s);
}

void dropout_backward_accumulate(uint16_t* dinp, const uint16_t* dout, int64_t n, float p, uint64_t seed,
                                 cudaStream_t s) {
  launch_dropout(
      dropout_params("cuda_ops::dropout_backward_accumulate", dinp, "dinp", dout, "dout", n, p, seed), true,
      s);
}

}  // namespace qlora::cuda_ops
