// The first ops of the CUDA backend: embedding, RMSNorm, SwiGLU and RoPE, with
// the contracts, argument order and dimension letters of kernels/ops.h (read
// there); only the storage type of the activations differs.
//
// Storage: activations and frozen weights are bf16, passed as raw bits
// (uint16_t, little-endian, as cuda_quantize4 and src/core/dtype.h use them);
// rstd and the RoPE cos/sin tables are fp32. Every kernel widens bf16 to fp32
// exactly, does all arithmetic (and every reduction) in fp32, and rounds its
// outputs to bf16 once, to nearest even (as f32_to_bf16 of src/core/dtype.h).
//
// All pointers are device pointers. Everything is asynchronous on `s`: the
// buffers must stay valid until the stream has run the work. Invalid
// dimensions or null pointers throw qlora::Error before anything is queued; a
// launch error throws before the function returns; an execution error shows
// at the next synchronizing CUDA call. Nothing is launched when there is no
// element.
//
// Host-only header: compiles with g++ (C++20) and nvcc (C++17).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace qlora::cuda_ops {

// ---- embedding ---------------------------------------------------------------
// out (N,C) bf16; tokens (N) int32; wte (V,C) bf16. A copy: bit for bit the
// row of wte. A token outside [0, V) cannot throw from the device: its row of
// out is written as zeros and, when d_first_bad is not null, the smallest such
// position is folded into *d_first_bad with atomicMin (the caller sets it to
// INT32_MAX first and checks it after synchronizing, then throws as the CPU
// op does).
void embedding_forward(uint16_t* out, const int32_t* tokens, const uint16_t* wte, int64_t N, int64_t C,
                       int64_t V, int32_t* d_first_bad = nullptr, cudaStream_t s = 0);

// ---- RMSNorm -----------------------------------------------------------------
// out (N,C) bf16; rstd (N) fp32, saved; inp (N,C) bf16; weight (C) bf16.
// out = weight * (inp * rstd), rstd = 1/sqrt(mean(inp^2) + eps).
void rmsnorm_forward(uint16_t* out, float* rstd, const uint16_t* inp, const uint16_t* weight, int64_t N,
                     int64_t C, float eps, cudaStream_t s = 0);
// dinp (N,C) bf16, assigned; dout, inp (N,C) bf16; weight (C) bf16; rstd (N) fp32.
void rmsnorm_backward(uint16_t* dinp, const uint16_t* dout, const uint16_t* inp, const uint16_t* weight,
                      const float* rstd, int64_t N, int64_t C, cudaStream_t s = 0);

// ---- SwiGLU ------------------------------------------------------------------
// out, gate, up (n) bf16: out = silu(gate) * up.
void swiglu_forward(uint16_t* out, const uint16_t* gate, const uint16_t* up, int64_t n, cudaStream_t s = 0);
// dgate, dup (n) bf16, assigned; dout, gate, up (n) bf16.
void swiglu_backward(uint16_t* dgate, uint16_t* dup, const uint16_t* dout, const uint16_t* gate,
                     const uint16_t* up, int64_t n, cudaStream_t s = 0);

// ---- RoPE (HF rotate-half layout) ---------------------------------------------
// In place on x (N,NH,D) bf16; pos (N) int32, each < P; cos, sin (P, D/2)
// fp32, the tables ops::rope_tables computes (upload them once). D is even.
// A position outside [0, P) is not checked on the device (it would cost a
// synchronization): the caller's positions come from the packing, which
// bounds them by the sequence length the tables were built for.
void rope_forward(uint16_t* x, const int32_t* pos, const float* cos, const float* sin, int64_t N, int64_t NH,
                  int64_t D, cudaStream_t s = 0);
// In place on dx (N,NH,D) bf16: the transpose rotation.
void rope_backward(uint16_t* dx, const int32_t* pos, const float* cos, const float* sin, int64_t N,
                   int64_t NH, int64_t D, cudaStream_t s = 0);

// ---- residual stream and precision changes -----------------------------------
// out = a + b (n) bf16, rounded once; out may alias a (ops::residual_forward).
void residual_forward(uint16_t* out, const uint16_t* a, const uint16_t* b, int64_t n, cudaStream_t s = 0);
// acc (n) fp32 += x (n) bf16: the fp32 residual gradient collects each branch.
void add_bf16_to_f32(float* acc, const uint16_t* x, int64_t n, cudaStream_t s = 0);
// out (n) bf16 = in (n) fp32 rounded to nearest even.
void round_to_bf16(uint16_t* out, const float* in, int64_t n, cudaStream_t s = 0);

}  // namespace qlora::cuda_ops
