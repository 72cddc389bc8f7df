// DoRA (weight-decomposed LoRA, as PEFT 0.22's DoraLinearLayer) on the GPU:
// the CUDA twins of ops::dora_weight_norm / dora_forward / dora_backward, with
// their contracts (read kernels/ops.h; dimension letters N, IN, OUT, R).
//
// Storage: the products base, lora, out and their gradients are bf16 bits
// (uint16_t), as the LoRA ops keep them; the magnitude m, its gradient dm and
// the norms wnorm are fp32 (m and dm live in the fp32 master and gradient
// arrays). The norm reads the fp32 masters of A and B, not their bf16 copies.
//
// Precision:
//  - dora_weight_norm: each panel row of W + s B A is built in fp32 (W's fp32
//    values, exactly the CPU's for a 4-bit weight; s B A by cuBLAS in pedantic
//    fp32, no TF32), and its sum of squares is accumulated in double (a row
//    of up to 28672 squares of mixed sizes: fp32 would lose ~log2(IN) bits),
//    then rounded once to fp32, as the CPU op. Only the order of the fp32
//    products over R and of the double sum differ from the CPU.
//  - dora_forward / the elementwise part of dora_backward: g = m / wnorm and
//    the CPU's expression in the CPU's order with __fdiv_rn / __fmul_rn /
//    __fadd_rn (no FMA contraction), so the fp32 result equals the CPU op's on
//    the same inputs bit for bit before its one rounding to bf16.
//  - dm: column sums over the N rows in double, in a fixed order (a thread per
//    column and row residue, then the residues in order): deterministic, no
//    atomics; it differs from the CPU's sequential double sum by reordering
//    only (~N 2^-53 of the terms), then the same division and fp32 rounding.
//
// All pointers are device pointers; work is queued on ctx.stream() (the norm:
// kernels and a cuBLAS product) or on the stream given. Invalid dimensions or
// null pointers throw qlora::Error naming the op before anything is queued;
// with N = 0 nothing is checked beyond the dimensions, and nothing runs.
//
// Host-only header: compiles with g++ (C++20) and nvcc (C++17).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/context.h"
#include "kernels/cuda/linear_cuda.h"

namespace qlora::cuda_ops {

// wnorm (OUT) fp32 = the row norms of W + scale * B A, built in panels of
// plan_cuda::kDoraPanelRows rows in `panel` (fp32, kDoraPanelRows x IN at
// least, or OUT x IN when OUT is smaller). A (R,IN), B (OUT,R) fp32.
void dora_weight_norm(CudaContext& ctx, float* wnorm, float* panel, const CudaLinearWeight& w, const float* A,
                      const float* B, float scale, int64_t R);

// out (N,OUT) bf16 += (g - 1) * base + g * lora, g = m / wnorm; base, lora
// (N,OUT) bf16; m, wnorm (OUT) fp32. base may alias out (each element is read
// before it is written).
void dora_forward(uint16_t* out, const uint16_t* base, const uint16_t* lora, const float* m, const float* wnorm,
                  int64_t N, int64_t OUT, cudaStream_t s);

// dm (OUT) fp32 += sum_i dout_ij (base_ij + lora_ij) / wnorm_j   (accumulates)
// dbase (N,OUT) = dout * (g - 1), dlora (N,OUT) = dout * g, bf16 (assigned).
// dbase may be null; dbase may alias base and dlora lora (dm is summed first).
void dora_backward(uint16_t* dbase, uint16_t* dlora, float* dm, const uint16_t* dout, const uint16_t* base,
                   const uint16_t* lora, const float* m, const float* wnorm, int64_t N, int64_t OUT,
                   cudaStream_t s);

}  // namespace qlora::cuda_ops
