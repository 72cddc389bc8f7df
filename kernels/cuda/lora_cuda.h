// The LoRA branch and its counter-based dropout on the GPU, with the
// contracts of kernels/ops.h (read there; dimension letters N, IN, OUT, R).
//
// Storage: activations, h, dh and the adapter weights A, B are bf16 bits
// (uint16_t); the parameter gradients dA, dB are fp32 (they feed the fp32
// master copies of the optimizer). Products go through cuda_ops::gemm (fp32
// accumulation); a bf16 result is rounded once, to nearest even. h and dh are
// stored in bf16 because they are the inputs of the next GEMM: that is one
// rounding more than the fp32 CPU op makes (the parity tests account for it).
//
// All pointers are device pointers. The LoRA products are queued on
// ctx.stream(); dropout on the stream given. Invalid dimensions or null
// pointers throw qlora::Error before anything is queued; nothing is launched
// when there is no element.
//
// Host-only header: compiles with g++ (C++20) and nvcc (C++17).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/context.h"

namespace qlora::cuda_ops {

// out (N,OUT) bf16 += scale * (xd A^T) B^T; h = xd A^T (N,R) bf16, saved;
// xd (N,IN), A (R,IN), B (OUT,R) bf16. IN, OUT and R must be positive.
void lora_forward(CudaContext& ctx, uint16_t* out, uint16_t* h, const uint16_t* xd, const uint16_t* A,
                  const uint16_t* B, float scale, int64_t N, int64_t IN, int64_t OUT, int64_t R);

// dA (R,IN), dB (OUT,R) fp32 accumulate (+=); dinp (N,IN) bf16 accumulates
// (+=, the branch beside the base linear); dh (N,R) bf16 scratch (assigned).
// dout (N,OUT), h (N,R), xd (N,IN), A, B bf16.
void lora_backward(CudaContext& ctx, uint16_t* dinp, float* dA, float* dB, uint16_t* dh, const uint16_t* dout,
                   const uint16_t* h, const uint16_t* xd, const uint16_t* A, const uint16_t* B, float scale,
                   int64_t N, int64_t IN, int64_t OUT, int64_t R);

// As ops::dropout_forward / ops::dropout_backward_accumulate, bf16 storage,
// the same masks: the keep decision is the same integer hash of (seed, index)
// as the CPU op, so both backends drop the very same elements. p in [0, 1).
// out, inp (n): out = inp * keep / (1-p), rounded once.
void dropout_forward(uint16_t* out, const uint16_t* inp, int64_t n, float p, uint64_t seed, cudaStream_t s);
// dinp, dout (n): dinp += dout * keep / (1-p) where kept; dropped elements of
// dinp are left untouched.
void dropout_backward_accumulate(uint16_t* dinp, const uint16_t* dout, int64_t n, float p, uint64_t seed,
                                 cudaStream_t s);

}  // namespace qlora::cuda_ops
