// lm_head + cross entropy on the GPU, chunked over the vocabulary as the CPU
// op of kernels/ops.h (read there for the contract; dimension letters N, C, V).
//
// Storage: x and W are bf16 bits (uint16_t); losses, lse and the logits are
// fp32. The logits are made `rows` x `vchunk` at a time by cuda_ops::gemm into
// a workspace tile and folded into an online log-sum-exp, so the (N,V) logits
// never exist. chunking.rows and chunking.vchunk come from the caller (both
// positive) and are clamped to N and V.
//
// Every reduction has a fixed order (no fp32 atomics), so a run repeats bit
// for bit on one device. All pointers are device pointers; the work is queued
// on ctx.stream() and uses ctx.workspace(lm_head_ce_workspace_bytes(...)).
// Invalid dimensions or null pointers throw qlora::Error before anything is
// queued. Nothing is launched when N = 0.
//
// Host-only header: compiles with g++ (C++20) and nvcc (C++17).
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/context.h"
#include "kernels/ops.h"

namespace qlora::cuda_ops {

// Workspace bytes (ctx.workspace) for the chunked loss at N rows: enough for
// both the forward and the backward. Throws for non-positive chunk sizes.
size_t lm_head_ce_workspace_bytes(ops::CeChunking chunking, int64_t N, int64_t C, int64_t V);

// losses (N) fp32: -log p(target), 0 for kIgnoreIndex rows; lse (N) fp32
// saved (every row, ignored ones too); x (N,C) bf16; W (V,C) bf16; targets (N)
// int32. A target outside [0,V) (and != kIgnoreIndex) cannot throw from the
// device: when d_first_bad is not null the smallest such row index is
// atomicMin'ed into it (the caller presets INT32_MAX and checks it after
// synchronizing, then throws as the CPU op does), and that row's loss is 0.
// The sum of the losses is left to the caller (the CPU op returns it).
void lm_head_cross_entropy_forward(CudaContext& ctx, float* losses, float* lse, const uint16_t* x,
                                   const uint16_t* W, const int32_t* targets, ops::CeChunking chunking,
                                   int64_t N, int64_t C, int64_t V, int32_t* d_first_bad = nullptr);

// dx (N,C) bf16, assigned, for loss = sum(losses) * grad_scale; lse (N) as the
// forward saved it. Rows whose target is kIgnoreIndex, or outside [0,V) (the
// forward reported those), get dx = 0. dlogits = (softmax - onehot) *
// grad_scale are rounded to bf16 (they are the input of a bf16 GEMM); dx is
// accumulated over the vocabulary chunks in fp32 and rounded once at the end.
void lm_head_cross_entropy_backward(CudaContext& ctx, uint16_t* dx, const uint16_t* x, const uint16_t* W,
                                    const float* lse, const int32_t* targets, float grad_scale,
                                    ops::CeChunking chunking, int64_t N, int64_t C, int64_t V);

}  // namespace qlora::cuda_ops
