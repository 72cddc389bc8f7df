// Embedding, RMSNorm, SwiGLU and RoPE on the GPU (kernels/cuda/ops_cuda.h).
// Simple first, no tuning: one thread block per row for RMSNorm (fp32
// warp-shuffle + shared-memory reduction), grid-stride loops for the rest.
// bf16 is read as raw bits and widened exactly; outputs are rounded once to
// nearest even with the integer arithmetic of f32_to_bf16 (src/core/dtype.h),
// so a value the CPU computes exactly rounds to the same bits here.
#include <cstdint>
#include <initializer_list>
#include <utility>

#include "core/error.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/ops_cuda.h"

namespace qlora::cuda_ops {

using namespace cuda_detail;

namespace {

__global__ void __launch_bounds__(kThreads)
    embedding_kernel(uint16_t* __restrict__ out, const int32_t* __restrict__ tokens,
                     const uint16_t* __restrict__ wte, int64_t N, int64_t C, int64_t V, int32_t* first_bad) {
  const int64_t total = N * C;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e / C, c = e - i * C;
    const int32_t t = tokens[i];
    if (t < 0 || t >= V) {
      out[e] = 0;
      if (c == 0 && first_bad != nullptr) atomicMin(first_bad, int32_t(i < INT32_MAX ? i : INT32_MAX));
    } else {
      out[e] = wte[int64_t(t) * C + c];
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    rmsnorm_forward_kernel(uint16_t* __restrict__ out, float* __restrict__ rstd,
                           const uint16_t* __restrict__ inp, const uint16_t* __restrict__ weight, int64_t N,
                           int64_t C, float eps) {
  __shared__ float partial[kThreads / 32];
  for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
    const uint16_t* x = inp + i * C;
    float ss = 0.0f;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const float v = bf16_to_f32(x[c]);
      ss += v * v;
    }
    ss = block_sum(ss, partial);
    const float r = 1.0f / sqrtf(ss / float(C) + eps);
    uint16_t* o = out + i * C;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
      o[c] = f32_to_bf16(bf16_to_f32(weight[c]) * (bf16_to_f32(x[c]) * r));
    if (threadIdx.x == 0) rstd[i] = r;
  }
}

// dx = rstd * (w*dy - xhat * mean(w*dy * xhat)), xhat = x * rstd (as the CPU).
__global__ void __launch_bounds__(kThreads)
    rmsnorm_backward_kernel(uint16_t* __restrict__ dinp, const uint16_t* __restrict__ dout,
                            const uint16_t* __restrict__ inp, const uint16_t* __restrict__ weight,
                            const float* __restrict__ rstd, int64_t N, int64_t C) {
  __shared__ float partial[kThreads / 32];
  for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
    const uint16_t* x = inp + i * C;
    const uint16_t* dy = dout + i * C;
    const float r = rstd[i];
    float dot = 0.0f;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
      dot += (bf16_to_f32(weight[c]) * bf16_to_f32(dy[c])) * (bf16_to_f32(x[c]) * r);
    const float m = block_sum(dot, partial) / float(C);
    uint16_t* dx = dinp + i * C;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const float wdy = bf16_to_f32(weight[c]) * bf16_to_f32(dy[c]);
      dx[c] = f32_to_bf16(r * (wdy - bf16_to_f32(x[c]) * r * m));
    }
  }
}

__device__ __forceinline__ float sigmoid(float g) {
  return 1.0f / (1.0f + expf(-g));
}

__global__ void __launch_bounds__(kThreads)
    swiglu_forward_kernel(uint16_t* __restrict__ out, const uint16_t* __restrict__ gate,
                          const uint16_t* __restrict__ up, int64_t n) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += int64_t(gridDim.x) * blockDim.x) {
    const float g = bf16_to_f32(gate[e]);
    out[e] = f32_to_bf16((g * sigmoid(g)) * bf16_to_f32(up[e]));
  }
}

// d silu(g)/dg = s * (1 + g * (1 - s)), s = sigmoid(g).
__global__ void __launch_bounds__(kThreads)
    swiglu_backward_kernel(uint16_t* __restrict__ dgate, uint16_t* __restrict__ dup,
                           const uint16_t* __restrict__ dout, const uint16_t* __restrict__ gate,
                           const uint16_t* __restrict__ up, int64_t n) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += int64_t(gridDim.x) * blockDim.x) {
    const float g = bf16_to_f32(gate[e]), dy = bf16_to_f32(dout[e]);
    const float s = sigmoid(g);
    dup[e] = f32_to_bf16(dy * g * s);
    dgate[e] = f32_to_bf16(dy * bf16_to_f32(up[e]) * s * (1.0f + g * (1.0f - s)));
  }
}

__global__ void __launch_bounds__(kThreads)
    residual_kernel(uint16_t* out, const uint16_t* a, const uint16_t* __restrict__ b, int64_t n) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x)
    out[e] = f32_to_bf16(bf16_to_f32(a[e]) + bf16_to_f32(b[e]));
}

__global__ void __launch_bounds__(kThreads)
    add_bf16_to_f32_kernel(float* __restrict__ acc, const uint16_t* __restrict__ x, int64_t n) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x)
    acc[e] += bf16_to_f32(x[e]);
}

__global__ void __launch_bounds__(kThreads)
    round_to_bf16_kernel(uint16_t* __restrict__ out, const float* __restrict__ in, int64_t n) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x)
    out[e] = f32_to_bf16(in[e]);
}

// One thread per rotated pair (x1[j], x2[j]) of each (token, head): the two
// halves of a head are D/2 apart, so neighbouring threads read neighbouring j.
// sign = +1 rotates by +angle (forward), -1 by -angle (backward).
__global__ void __launch_bounds__(kThreads)
    rope_kernel(uint16_t* __restrict__ x, const int32_t* __restrict__ pos, const float* __restrict__ cos_t,
                const float* __restrict__ sin_t, int64_t N, int64_t NH, int64_t D, float sign) {
  const int64_t half = D / 2;
  const int64_t total = N * NH * half;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = e % half;
    const int64_t row = e / half;  // token * NH + head
    const int64_t i = row / NH;
    const int64_t p = pos[i];
    const float c = cos_t[p * half + j], sn = sign * sin_t[p * half + j];
    uint16_t* v = x + row * D;
    const float x1 = bf16_to_f32(v[j]), x2 = bf16_to_f32(v[j + half]);
    v[j] = f32_to_bf16(x1 * c - x2 * sn);
    v[j + half] = f32_to_bf16(x2 * c + x1 * sn);
  }
}

// ---- host side ----------------------------------------------------------------

}  // namespace

void embedding_forward(uint16_t* out, const int32_t* tokens, const uint16_t* wte, int64_t N, int64_t C,
                       int64_t V, int32_t* d_first_bad, cudaStream_t s) {
  const char* fn = "cuda_ops::embedding_forward";
  check_dims(fn, "N", N);
  check_dims(fn, "C", C);
  check_dims(fn, "V", V);
  const int64_t n = N * C;
  check_pointer(fn, out, "out", n);
  check_pointer(fn, tokens, "tokens", n);
  if (n == 0) return;
  if (V > 0) check_pointer(fn, wte, "wte", n);
  embedding_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(out, tokens, wte, N, C, V, d_first_bad);
  check_launch("embedding_kernel");
}

void rmsnorm_forward(uint16_t* out, float* rstd, const uint16_t* inp, const uint16_t* weight, int64_t N,
                     int64_t C, float eps, cudaStream_t s) {
  const char* fn = "cuda_ops::rmsnorm_forward";
  check_dims(fn, "N", N);
  if (N > 0 && C <= 0) fail(fn, ": channel count C = ", C, " must be positive");
  for (auto [p, name] :
       {std::pair<const void*, const char*>{out, "out"}, {rstd, "rstd"}, {inp, "inp"}, {weight, "weight"}})
    check_pointer(fn, p, name, N * C);
  if (N == 0) return;
  rmsnorm_forward_kernel<<<grid_for(N, 1), kThreads, 0, s>>>(out, rstd, inp, weight, N, C, eps);
  check_launch("rmsnorm_forward_kernel");
}

void rmsnorm_backward(uint16_t* dinp, const uint16_t* dout, const uint16_t* inp, const uint16_t* weight,
                      const float* rstd, int64_t N, int64_t C, cudaStream_t s) {
  const char* fn = "cuda_ops::rmsnorm_backward";
  check_dims(fn, "N", N);
  if (N > 0 && C <= 0) fail(fn, ": channel count C = ", C, " must be positive");
  for (auto [p, name] : {std::pair<const void*, const char*>{dinp, "dinp"},
                         {dout, "dout"},
                         {inp, "inp"},
                         {weight, "weight"},
                         {rstd, "rstd"}})
    check_pointer(fn, p, name, N * C);
  if (N == 0) return;
  rmsnorm_backward_kernel<<<grid_for(N, 1), kThreads, 0, s>>>(dinp, dout, inp, weight, rstd, N, C);
  check_launch("rmsnorm_backward_kernel");
}

void swiglu_forward(uint16_t* out, const uint16_t* gate, const uint16_t* up, int64_t n, cudaStream_t s) {
  const char* fn = "cuda_ops::swiglu_forward";
  check_dims(fn, "n", n);
  for (auto [p, name] : {std::pair<const void*, const char*>{out, "out"}, {gate, "gate"}, {up, "up"}})
    check_pointer(fn, p, name, n);
  if (n == 0) return;
  swiglu_forward_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(out, gate, up, n);
  check_launch("swiglu_forward_kernel");
}

void swiglu_backward(uint16_t* dgate, uint16_t* dup, const uint16_t* dout, const uint16_t* gate,
                     const uint16_t* up, int64_t n, cudaStream_t s) {
  const char* fn = "cuda_ops::swiglu_backward";
  check_dims(fn, "n", n);
  for (auto [p, name] : {std::pair<const void*, const char*>{dgate, "dgate"},
                         {dup, "dup"},
                         {dout, "dout"},
                         {gate, "gate"},
                         {up, "up"}})
    check_pointer(fn, p, name, n);
  if (n == 0) return;
  swiglu_backward_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(dgate, dup, dout, gate, up, n);
  check_launch("swiglu_backward_kernel");
}

namespace {

void rope_impl(const char* fn, uint16_t* x, const int32_t* pos, const float* cos_t, const float* sin_t,
               int64_t N, int64_t NH, int64_t D, float sign, cudaStream_t s) {
  check_dims(fn, "N", N);
  check_dims(fn, "NH", NH);
  check_dims(fn, "D", D);
  if (D % 2 != 0) fail(fn, ": head dim D = ", D, " must be even (rotate-half pairs its halves)");
  const int64_t pairs = N * NH * (D / 2);
  for (auto [p, name] :
       {std::pair<const void*, const char*>{x, "x"}, {pos, "pos"}, {cos_t, "cos"}, {sin_t, "sin"}})
    check_pointer(fn, p, name, pairs);
  if (pairs == 0) return;
  rope_kernel<<<grid_for(pairs, kThreads), kThreads, 0, s>>>(x, pos, cos_t, sin_t, N, NH, D, sign);
  check_launch("rope_kernel");
}

}  // namespace

void rope_forward(uint16_t* x, const int32_t* pos, const float* cos, const float* sin, int64_t N, int64_t NH,
                  int64_t D, cudaStream_t s) {
  rope_impl("cuda_ops::rope_forward", x, pos, cos, sin, N, NH, D, 1.0f, s);
}

void rope_backward(uint16_t* dx, const int32_t* pos, const float* cos, const float* sin, int64_t N,
                   int64_t NH, int64_t D, cudaStream_t s) {
  rope_impl("cuda_ops::rope_backward", dx, pos, cos, sin, N, NH, D, -1.0f, s);
}

void residual_forward(uint16_t* out, const uint16_t* a, const uint16_t* b, int64_t n, cudaStream_t s) {
  const char* fn = "cuda_ops::residual_forward";
  check_dims(fn, "n", n);
  for (auto [p, name] : {std::pair<const void*, const char*>{out, "out"}, {a, "a"}, {b, "b"}})
    check_pointer(fn, p, name, n);
  if (n == 0) return;
  residual_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(out, a, b, n);
  check_launch("residual_kernel");
}

void add_bf16_to_f32(float* acc, const uint16_t* x, int64_t n, cudaStream_t s) {
  const char* fn = "cuda_ops::add_bf16_to_f32";
  check_dims(fn, "n", n);
  check_pointer(fn, acc, "acc", n);
  check_pointer(fn, x, "x", n);
  if (n == 0) return;
  add_bf16_to_f32_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(acc, x, n);
  check_launch("add_bf16_to_f32_kernel");
}

void round_to_bf16(uint16_t* out, const float* in, int64_t n, cudaStream_t s) {
  const char* fn = "cuda_ops::round_to_bf16";
  check_dims(fn, "n", n);
  check_pointer(fn, out, "out", n);
  check_pointer(fn, in, "in", n);
  if (n == 0) return;
  round_to_bf16_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(out, in, n);
  check_launch("round_to_bf16_kernel");
}

}  // namespace qlora::cuda_ops
