// The frozen linear on the GPU: out = inp W^T (+ bias) and its input gradient
// dinp = dout W, for a dense bf16 weight or a 4-bit (NF4/FP4) one with plain
// or double-quantized block scales. The CUDA twin of ops::linear_forward /
// linear_backward (kernels/ops.h): same contracts, bf16 storage, fp32 math.
//
// Dimension letters as kernels/ops.h: N = token rows, IN/OUT = the weight's
// input/output features; W is (OUT,IN) row-major, 4-bit codes packed two per
// byte over the flattened OUT*IN values, HIGH nibble first (quant/blockwise.h).
//
// Several algorithms compute the same product, behind one registry
// (linear_nf4.cu); `LinearAlgo::Auto` picks one by the rule below, the others
// force a choice (tests, benchmarks):
//   DequantGemm  dequantizes panels of W to bf16 into ctx.workspace (at most
//                64 MiB at a time: row panels forward, column panels for the
//                input gradient, so each output element is one GEMM and one
//                rounding) and multiplies them with cuBLAS (cuda_ops::gemm).
//                A dense weight goes to cuBLAS directly. Any shape, any arch.
//   Fused        one kernel: 4-bit tiles of W dequantized in shared memory to
//                bf16 and fed to tensor cores (mma.sync m16n8k16, fp32
//                accumulation); W never exists dequantized in global memory.
//                Both passes. Needs a 4-bit weight, IN even, sm_80+.
//   Gemv         batch <= 4 forward for generation: a warp per output row
//                multiplies the fp32 dequantized weight (not rounded to
//                bf16) with fp32 accumulation. Forward only, 4-bit only.
// Auto: a dense weight -> DequantGemm (cuBLAS); a 4-bit forward with N <= 4
// -> Gemv; otherwise Fused when it supports the weight, else DequantGemm.
//
// Precision: inputs are bf16, every product and sum is fp32, each output is
// rounded to bf16 once (bias, or the previous dinp when accumulating, added in
// fp32 before that rounding). DequantGemm and Fused also round each
// dequantized weight (code * absmax, fp32) to bf16 for the tensor cores.
//
// All data pointers are device pointers; work is queued on ctx.stream() and
// the buffers must stay valid until it has run. out/dinp must not overlap the
// inputs. Invalid arguments throw qlora::Error naming the op before anything
// is queued; a launch error throws before the function returns; an execution
// error shows at the next synchronizing call. Nothing runs when N = 0.
//
// Host-only header (g++ C++20 and nvcc C++17), except for one device helper
// at the end that only nvcc sees.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/context.h"
#include "quant/codebook.h"

namespace qlora::cuda_ops {

// ---- 1. the public API -------------------------------------------------------

struct CudaLinearWeight {
  int64_t out = 0, in = 0;
  const uint16_t* dense = nullptr;  // bf16 (OUT,IN) row-major; null for 4-bit
  const uint8_t* codes = nullptr;   // (OUT*IN+1)/2 bytes, high nibble first
  int64_t block = 64;               // values per scale (power of two 32..4096)
  Quant4Type type = Quant4Type::NF4;
  const float* absmax = nullptr;  // fp32 per block, OR (double quant) the four below:
  const uint8_t* absmax8 = nullptr;
  const float* nested_absmax = nullptr;
  const float* code8 = nullptr;  // 256 entries
  float offset = 0.0f;
  int64_t nested_block = 256;
  bool quantized() const { return dense == nullptr; }
  bool double_quant() const { return absmax8 != nullptr; }
};
enum class LinearAlgo : uint8_t { Auto, DequantGemm, Fused, Gemv };
const char* linear_algo_name(LinearAlgo a);
// Whether `a` can run this weight at N rows on ctx's device (Auto always can).
// This asks about the forward; the overload below asks about either pass.
bool linear_algo_supports(const CudaContext& ctx, LinearAlgo a, const CudaLinearWeight& w, int64_t N);
// Workspace bytes (ctx.workspace) the linear needs for w at up to N rows, max over algos Auto may pick.
// 0 for a dense weight. For a 4-bit one, the DequantGemm panel (at most min(OUT*IN, 32M) bf16 values:
// at most 64 MiB for any layer under 4M rows) whatever the device: Auto falls back to DequantGemm
// where Fused cannot run (IN odd, below sm_80), and a workspace sized by this never grows in a step.
size_t linear_workspace_bytes(const CudaLinearWeight& w, int64_t N);
// out (N,OUT) bf16 = inp (N,IN) W^T (+ bias (OUT) bf16, may be null); assigned.
void linear_forward(CudaContext& ctx, uint16_t* out, const uint16_t* inp, const CudaLinearWeight& w,
                    const uint16_t* bias, int64_t N, LinearAlgo algo = LinearAlgo::Auto);
// dinp (N,IN) bf16 = dout (N,OUT) W; assigned, or added (+=, one rounding) when accumulate.
void linear_backward(CudaContext& ctx, uint16_t* dinp, const uint16_t* dout, const CudaLinearWeight& w,
                     int64_t N, bool accumulate = false, LinearAlgo algo = LinearAlgo::Auto);

// Rows [r0, r1) of W as fp32 into dst ((r1-r0),IN), queued on ctx.stream():
// a 4-bit value is code * scale in fp32, not rounded to bf16 (bit for bit the
// CPU's ops::linear_rows_fp32); a dense weight's bf16 values widened exactly.
// For DoRA's weight norm (kernels/cuda/dora_cuda.h).
void linear_rows_f32(CudaContext& ctx, float* dst, const CudaLinearWeight& w, int64_t r0, int64_t r1);

// ---- device-free parts of the API (what the above decide, testable without a GPU) ----

enum class LinearPass : uint8_t { Forward, Backward };
// Whether `a` runs `pass` of w at N rows on a device of compute capability
// `arch` (10*major + minor). Auto: always true.
bool linear_algo_supports(int arch, LinearAlgo a, const CudaLinearWeight& w, int64_t N, LinearPass pass);
// What Auto runs (the rule at the top of this file); never Auto.
LinearAlgo linear_auto_algo(int arch, const CudaLinearWeight& w, int64_t N, LinearPass pass);
// The host checks linear_forward (dst = out, src = inp) and linear_backward
// (dst = dinp, src = dout) run first: dimensions, the weight's format and, when
// N > 0, every pointer. Throws qlora::Error naming the op
// ("cuda_ops::linear_forward" / "cuda_ops::linear_backward").
void linear_check_args(LinearPass pass, const void* dst, const void* src, const CudaLinearWeight& w,
                       int64_t N);

// ---- 2. params and launchers (no validation: callers use layer 1) ----------

// A 4-bit weight as the kernels read it. The scale of flattened block b is
// absmax[b], or with double quantization
// code8[absmax8[b]] * nested_absmax[b / nested_block] + offset, rounded after
// the multiply and after the add (as double_dequantize / cuda_double_dequantize).
struct Quant4WeightParams {
  const uint8_t* codes = nullptr;  // (out*in+1)/2 bytes
  int64_t out = 0, in = 0;
  int block_log2 = 6;  // block = 1 << block_log2, 5..12
  Quant4Type type = Quant4Type::NF4;
  const float* absmax = nullptr;     // ceil(out*in / block) floats, or null with double quant
  const uint8_t* absmax8 = nullptr;  // ceil(out*in / block) bytes (double quant)
  const float* nested_absmax = nullptr;
  const float* code8 = nullptr;  // 256 floats
  float offset = 0.0f;
  int64_t nested_block = 256;
};

// The fused tensor-core kernel, both passes. C (M,ncols) = A (M,K) op(W) with
//   forward:  A = inp (N,IN),  C = out (N,OUT),  op(W) = W^T, K = IN,  ncols = OUT;
//   backward: A = dout (N,OUT), C = dinp (N,IN), op(W) = W,   K = OUT, ncols = IN.
struct LinearFusedParams {
  Quant4WeightParams w;
  const uint16_t* a = nullptr;     // (M,K) bf16, row stride K
  uint16_t* c = nullptr;           // (M,ncols) bf16, row stride ncols
  const uint16_t* bias = nullptr;  // forward only: (OUT) bf16 or null
  int64_t M = 0;
  bool backward = false;
  bool accumulate = false;  // backward: C += (read, add in fp32, round once)
  bool a_vec16 = false;     // A's rows may be read 8 values (16 bytes) at a time
  bool w_vec16 = false;     // the codes may be read 32 values (16 bytes) at a time
  bool c_pairs = false;     // C may be written 2 values (4 bytes) at a time
};
// Requires w.in even and the column tiles within gridDim.y (see linear_nf4.cu).
void launch_linear_fused(const LinearFusedParams& p, int arch, cudaStream_t s);

// Batch-`rows` GEMV: out (rows,OUT) = inp (rows,IN) W^T (+ bias).
inline constexpr int64_t kLinearGemvMaxRows = 4;
struct LinearGemvParams {
  Quant4WeightParams w;
  const uint16_t* inp = nullptr;   // (rows,IN) bf16
  const uint16_t* bias = nullptr;  // (OUT) bf16 or null
  uint16_t* out = nullptr;         // (rows,OUT) bf16
  int rows = 1;                    // 1..kLinearGemvMaxRows
  bool vec16 = false;              // codes and inp rows may be read 16 bytes at a time (IN % 32 == 0)
};
void launch_linear_gemv(const LinearGemvParams& p, cudaStream_t s);

// W[r0:r1, c0:c1] dequantized (code * scale in fp32, then rounded to bf16)
// into dst, (r1-r0, c1-c0) row-major with row stride c1-c0.
struct DequantPanelParams {
  Quant4WeightParams w;
  int64_t r0 = 0, r1 = 0, c0 = 0, c1 = 0;
  uint16_t* dst = nullptr;
};
void launch_dequant_panel(const DequantPanelParams& p, cudaStream_t s);

}  // namespace qlora::cuda_ops

#if defined(__CUDACC__)
namespace qlora::cuda_ops {

// The fp32 scale of flattened block b. __fmul_rn/__fadd_rn: two roundings, as
// the CPU (built with -ffp-contract=off) computes it, never one FMA.
__device__ __forceinline__ float quant4_block_scale(const Quant4WeightParams& w, int64_t b) {
  if (w.absmax8 == nullptr) return w.absmax[b];
  return __fadd_rn(__fmul_rn(w.code8[w.absmax8[b]], w.nested_absmax[b / w.nested_block]), w.offset);
}

}  // namespace qlora::cuda_ops
#endif
