// Causal grouped-query attention with document masks on the GPU: the
// contract of ops::attention_forward / attention_backward (kernels/ops.h, read
// there), with bf16 storage and fp32 arithmetic.
//
// Dimension letters: B = batch, T = time (packed row length), H = query
// heads, KVH = key/value heads (H % KVH == 0; query head h reads kv head
// h / (H/KVH)), D = head dim (1..256). Token t attends to s with
// doc_start[t] <= s <= t; scores are scaled by 1/sqrt(D).
//
// Memory is O(T): flash-attention style tiles in shared memory, no (T,T)
// matrix anywhere. Forward keeps the log-sum-exp of each softmax row (lse,
// natural log); backward recomputes the probabilities from it:
//   1. delta = rowsum(dout * out) (B,H,T) fp32, in ctx.workspace;
//   2. dK, dV per key tile, summed over every query tile and every query head
//      of the GQA group in registers (no atomics);
//   3. dQ per query tile, over the key tiles.
// So every result is deterministic (fixed summation order).
//
// bf16 is passed as raw bits (uint16_t); every output is rounded once to
// nearest even. All pointers are device pointers; the work is queued on
// ctx.stream() and the buffers must stay valid until it has run. Invalid
// dimensions or null pointers throw qlora::Error before anything is queued;
// nothing is launched when B*T*H is 0.
//
// Host-only header: compiles with g++ (C++20) and nvcc (C++17).
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/context.h"

namespace qlora::cuda_ops {

// out (B,T,H,D) bf16; lse (B,H,T) fp32 saved; q (B,T,H,D), k, v (B,T,KVH,D) bf16; doc_start (B,T) int32.
void attention_forward(CudaContext& ctx, uint16_t* out, float* lse, const uint16_t* q, const uint16_t* k,
                       const uint16_t* v, const int32_t* doc_start, int64_t B, int64_t T, int64_t H,
                       int64_t KVH, int64_t D);
// Bytes of ctx.workspace attention_backward uses: delta = rowsum(dout*out), (B,H,T) fp32. (dQ has its own
// kernel, so no fp32 dq accumulator.) attention_backward asks ctx for it itself; call this at setup to size
// the workspace before a step.
size_t attention_backward_workspace_bytes(int64_t B, int64_t T, int64_t H, int64_t D);
// dq (B,T,H,D), dk, dv (B,T,KVH,D) bf16, assigned; dout, out (B,T,H,D) bf16; lse (B,H,T) fp32 (forward's).
void attention_backward(CudaContext& ctx, uint16_t* dq, uint16_t* dk, uint16_t* dv, const uint16_t* dout,
                        const uint16_t* out, const float* lse, const uint16_t* q, const uint16_t* k,
                        const uint16_t* v, const int32_t* doc_start, int64_t B, int64_t T, int64_t H,
                        int64_t KVH, int64_t D);

// ---- tile choice (tests and benchmarks) ----------------------------------------
// Auto: the largest tiles the device's shared memory per block allows (sm_80/87/90 opt into 163-227 KiB);
// Small: the tiles sized for 99 KiB (sm_86/89/120), which Auto picks there. The overloads below force a
// choice so that one GPU's parity tests cover both kernels; results agree within fp32 reassociation.
enum class AttentionTiles : uint8_t { Auto, Small };
void attention_forward(CudaContext& ctx, uint16_t* out, float* lse, const uint16_t* q, const uint16_t* k,
                       const uint16_t* v, const int32_t* doc_start, int64_t B, int64_t T, int64_t H,
                       int64_t KVH, int64_t D, AttentionTiles tiles);
void attention_backward(CudaContext& ctx, uint16_t* dq, uint16_t* dk, uint16_t* dv, const uint16_t* dout,
                        const uint16_t* out, const float* lse, const uint16_t* q, const uint16_t* k,
                        const uint16_t* v, const int32_t* doc_start, int64_t B, int64_t T, int64_t H,
                        int64_t KVH, int64_t D, AttentionTiles tiles);

}  // namespace qlora::cuda_ops
