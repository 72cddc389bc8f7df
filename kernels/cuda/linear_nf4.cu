// The frozen linear on the GPU (kernels/cuda/linear_cuda.h): host API,
// argument checks, the registry of algorithms, and DequantGemm (panels of W
// dequantized to bf16 in the workspace + cuBLAS). The fused tensor-core kernel
// is in linear_fused.cu, the batch-1 GEMV in linear_gemv.cu.
#include <algorithm>
#include <climits>
#include <cstdint>

#include "core/error.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/context.h"
#include "kernels/cuda/linear_cuda.h"

namespace qlora::cuda_ops {

using namespace cuda_detail;

namespace {

// ---- DequantGemm kernels ---------------------------------------------------------

// One thread per code byte (kPairs: IN, c0 and the panel width even, so every
// pair of the panel is one byte and one 4-byte store) or per value (any shape,
// e.g. IN odd, where a row starts mid-byte). Grid-stride.
template <bool kPairs>
__global__ void __launch_bounds__(kThreads) dequant_panel_kernel(const DequantPanelParams p) {
  __shared__ float code_value[16];
  if (threadIdx.x < 16) code_value[threadIdx.x] = quant4_code_value(p.w.type, uint8_t(threadIdx.x));
  __syncthreads();

  const int64_t width = p.c1 - p.c0;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  if (kPairs) {
    const int64_t half = width / 2;
    const int64_t total = (p.r1 - p.r0) * half;
    for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total; e += stride) {
      const int64_t r = e / half, cp = e - r * half;
      const int64_t flat =
          (p.r0 + r) * p.w.in + p.c0 + 2 * cp;  // even: both values in one byte and one block
      const uint8_t byte = p.w.codes[flat >> 1];
      const float s = quant4_block_scale(p.w, flat >> p.w.block_log2);
      const uint16_t hi = f32_to_bf16(__fmul_rn(code_value[byte >> 4], s));
      const uint16_t lo = f32_to_bf16(__fmul_rn(code_value[byte & 0x0f], s));
      *reinterpret_cast<uint32_t*>(p.dst + r * width + 2 * cp) = uint32_t(hi) | (uint32_t(lo) << 16);
    }
  } else {
    const int64_t total = (p.r1 - p.r0) * width;
    for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total; e += stride) {
      const int64_t r = e / width, c = e - r * width;
      const int64_t flat = (p.r0 + r) * p.w.in + p.c0 + c;
      const float s = quant4_block_scale(p.w, flat >> p.w.block_log2);
      p.dst[e] = f32_to_bf16(__fmul_rn(code_value[quant4_unpack(p.w.codes, flat)], s));
    }
  }
}

// Rows of W in fp32 (linear_rows_f32): one value per thread, grid-stride.
// dense non-null: its bf16 widened; else code * scale with __fmul_rn (one
// rounding, no FMA), the CPU's fp32 value.
__global__ void __launch_bounds__(kThreads)
    rows_f32_kernel(const Quant4WeightParams w, const uint16_t* dense, int64_t r0, int64_t r1, float* dst) {
  __shared__ float code_value[16];
  if (threadIdx.x < 16) code_value[threadIdx.x] = quant4_code_value(w.type, uint8_t(threadIdx.x));
  __syncthreads();
  const int64_t begin = r0 * w.in, total = (r1 - r0) * w.in;
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total; e += int64_t(gridDim.x) * kThreads) {
    const int64_t flat = begin + e;
    dst[e] = dense != nullptr ? bf16_to_f32(dense[flat])
                              : __fmul_rn(code_value[quant4_unpack(w.codes, flat)],
                                          quant4_block_scale(w, flat >> w.block_log2));
  }
}

// out (N,OUT) = bias broadcast over the rows: the GEMM then adds its product
// with beta = 1, in fp32, rounding once.
__global__ void __launch_bounds__(kThreads)
    bias_fill_kernel(uint16_t* __restrict__ out, const uint16_t* __restrict__ bias, int64_t N, int64_t OUT) {
  const int64_t total = N * OUT;
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * kThreads)
    out[e] = bias[e % OUT];
}

// ---- argument checks ---------------------------------------------------------------

const char* op_name(LinearPass pass) {
  return pass == LinearPass::Forward ? "cuda_ops::linear_forward" : "cuda_ops::linear_backward";
}

// The rule of valid_block4 (quant/blockwise.cpp), which qlora_cuda cannot call:
// it is linked below qlora_lib.
bool block4_supported(int64_t block) {
  return block >= 32 && block <= 4096 && (block & (block - 1)) == 0;
}

int log2_exact(int64_t v) {
  int k = 0;
  while ((int64_t(1) << k) < v) ++k;
  return k;
}

bool aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

Quant4WeightParams weight_params(const CudaLinearWeight& w) {
  Quant4WeightParams q;
  q.codes = w.codes;
  q.out = w.out;
  q.in = w.in;
  q.block_log2 = log2_exact(w.block);
  q.type = w.type;
  if (w.double_quant()) {
    q.absmax8 = w.absmax8;
    q.nested_absmax = w.nested_absmax;
    q.code8 = w.code8;
    q.offset = w.offset;
    q.nested_block = w.nested_block;
  } else {
    q.absmax = w.absmax;
  }
  return q;
}

// ---- DequantGemm -------------------------------------------------------------------

// bf16 values per dequantized panel: 64 MiB. Big enough that each panel's GEMM
// is a full-size cuBLAS call (a 4096-wide layer is one panel), small next to a
// 70B layer (8192 x 28672 = 235M values), whose panels it bounds.
constexpr int64_t kPanelValues = int64_t(32) << 20;
// Column panels are a multiple of this many values wide: every panel starts on
// an even column (the panel kernel's pairwise path) and, when IN % 8 == 0, on
// a 16-byte boundary of dinp's rows (cuBLAS's vectorized paths).
constexpr int64_t kPanelColumnGrain = 8;

// Forward: rows [r0, r0+P) of W, the full width.
int64_t row_panel_rows(const CudaLinearWeight& w) {
  return std::clamp<int64_t>(kPanelValues / w.in, 1, w.out);
}
// Input gradient: columns [c0, c0+Wc) of W, all rows, so each dinp element is
// one GEMM over all of OUT (one rounding, also when accumulating).
int64_t column_panel_cols(const CudaLinearWeight& w) {
  const int64_t wc = kPanelValues / w.out / kPanelColumnGrain * kPanelColumnGrain;
  return std::min(w.in, std::max(wc, kPanelColumnGrain));
}
size_t panel_bytes(const CudaLinearWeight& w) {
  const int64_t values = std::max(row_panel_rows(w) * w.in, w.out * column_panel_cols(w));
  return size_t(values) * sizeof(uint16_t);
}

void dequant_panel(CudaContext& ctx, const CudaLinearWeight& w, uint16_t* dst, int64_t r0, int64_t r1,
                   int64_t c0, int64_t c1) {
  DequantPanelParams p;
  p.w = weight_params(w);
  p.r0 = r0;
  p.r1 = r1;
  p.c0 = c0;
  p.c1 = c1;
  p.dst = dst;
  launch_dequant_panel(p, ctx.stream());
}

struct ForwardArgs {
  uint16_t* out;
  const uint16_t* inp;
  const uint16_t* bias;
  int64_t N;
};
struct BackwardArgs {
  uint16_t* dinp;
  const uint16_t* dout;
  int64_t N;
  bool accumulate;
};

bool dequant_gemm_supports(int, const CudaLinearWeight&, int64_t, LinearPass) {
  return true;
}

void dequant_gemm_forward(CudaContext& ctx, const CudaLinearWeight& w, const ForwardArgs& a) {
  const char* fn = "cuda_ops::linear_forward (dequant_gemm)";
  float beta = 0.0f;
  if (a.bias != nullptr) {
    bias_fill_kernel<<<grid_for(a.N * w.out, kThreads), kThreads, 0, ctx.stream()>>>(a.out, a.bias, a.N,
                                                                                     w.out);
    check_launch("bias_fill_kernel");
    beta = 1.0f;
  }
  if (!w.quantized()) {
    // out (N,OUT) = inp (N,IN) W^T
    gemm(ctx, Trans::N, Trans::T, a.N, w.out, w.in, 1.0f, a.inp, w.in, w.dense, w.in, beta, a.out,
         GemmOut::BF16, w.out, fn);
    return;
  }
  auto* panel = static_cast<uint16_t*>(ctx.workspace(panel_bytes(w)));
  const int64_t P = row_panel_rows(w);
  for (int64_t r0 = 0; r0 < w.out; r0 += P) {
    const int64_t r1 = std::min(w.out, r0 + P);
    dequant_panel(ctx, w, panel, r0, r1, 0, w.in);
    // out[:, r0:r1] (N,r1-r0) = inp (N,IN) panel^T; the panel is reused only after this GEMM (one stream).
    gemm(ctx, Trans::N, Trans::T, a.N, r1 - r0, w.in, 1.0f, a.inp, w.in, panel, w.in, beta, a.out + r0,
         GemmOut::BF16, w.out, fn);
  }
}

void dequant_gemm_backward(CudaContext& ctx, const CudaLinearWeight& w, const BackwardArgs& a) {
  const char* fn = "cuda_ops::linear_backward (dequant_gemm)";
  const float beta = a.accumulate ? 1.0f : 0.0f;
  if (!w.quantized()) {
    // dinp (N,IN) (+)= dout (N,OUT) W (OUT,IN)
    gemm(ctx, Trans::N, Trans::N, a.N, w.in, w.out, 1.0f, a.dout, w.out, w.dense, w.in, beta, a.dinp,
         GemmOut::BF16, w.in, fn);
    return;
  }
  auto* panel = static_cast<uint16_t*>(ctx.workspace(panel_bytes(w)));
  const int64_t Wc = column_panel_cols(w);
  for (int64_t c0 = 0; c0 < w.in; c0 += Wc) {
    const int64_t c1 = std::min(w.in, c0 + Wc);
    dequant_panel(ctx, w, panel, 0, w.out, c0, c1);
    // dinp[:, c0:c1] (N,c1-c0) (+)= dout (N,OUT) panel (OUT,c1-c0)
    gemm(ctx, Trans::N, Trans::N, a.N, c1 - c0, w.out, 1.0f, a.dout, w.out, panel, c1 - c0, beta, a.dinp + c0,
         GemmOut::BF16, w.in, fn);
  }
}

// ---- Fused -------------------------------------------------------------------------

// Tile edge of the fused kernel (linear_fused.cu); the column tiles of C go to
// gridDim.y, whose limit is 65535.
constexpr int64_t kFusedTile = 64;
constexpr int64_t kMaxGridY = 65535;

bool fused_supports(int arch, const CudaLinearWeight& w, int64_t N, LinearPass pass) {
  const int64_t ncols = pass == LinearPass::Forward ? w.out : w.in;
  // mma.sync with bf16 operands is sm_80+. IN even: every row of W starts on a
  // byte, so a pair of neighbouring values is one byte of codes.
  return w.quantized() && arch >= 80 && w.in % 2 == 0 && (ncols + kFusedTile - 1) / kFusedTile <= kMaxGridY &&
         (N + kFusedTile - 1) / kFusedTile <= INT_MAX;
}

LinearFusedParams fused_params(const CudaLinearWeight& w, const uint16_t* a, uint16_t* c, int64_t N,
                               bool backward) {
  const int64_t K = backward ? w.out : w.in, ncols = backward ? w.in : w.out;
  LinearFusedParams p;
  p.w = weight_params(w);
  p.a = a;
  p.c = c;
  p.M = N;
  p.backward = backward;
  p.a_vec16 = K % 8 == 0 && aligned(a, 16);
  p.w_vec16 = w.in % 32 == 0 && aligned(w.codes, 16);
  p.c_pairs = ncols % 2 == 0 && aligned(c, 4);
  return p;
}

void fused_forward(CudaContext& ctx, const CudaLinearWeight& w, const ForwardArgs& a) {
  LinearFusedParams p = fused_params(w, a.inp, a.out, a.N, false);
  p.bias = a.bias;
  launch_linear_fused(p, ctx.arch(), ctx.stream());
}

void fused_backward(CudaContext& ctx, const CudaLinearWeight& w, const BackwardArgs& a) {
  LinearFusedParams p = fused_params(w, a.dout, a.dinp, a.N, true);
  p.accumulate = a.accumulate;
  launch_linear_fused(p, ctx.arch(), ctx.stream());
}

// ---- Gemv --------------------------------------------------------------------------

bool gemv_supports(int, const CudaLinearWeight& w, int64_t N, LinearPass pass) {
  return w.quantized() && pass == LinearPass::Forward && N <= kLinearGemvMaxRows;
}

void gemv_forward(CudaContext& ctx, const CudaLinearWeight& w, const ForwardArgs& a) {
  LinearGemvParams p;
  p.w = weight_params(w);
  p.inp = a.inp;
  p.bias = a.bias;
  p.out = a.out;
  p.rows = int(a.N);
  p.vec16 = w.in % 32 == 0 && aligned(w.codes, 16) && aligned(a.inp, 16);
  launch_linear_gemv(p, ctx.stream());
}

// ---- the registry --------------------------------------------------------------------

struct AlgoEntry {
  LinearAlgo algo;
  const char* name;
  bool (*supports)(int arch, const CudaLinearWeight& w, int64_t N, LinearPass pass);
  void (*forward)(CudaContext& ctx, const CudaLinearWeight& w, const ForwardArgs& a);
  void (*backward)(CudaContext& ctx, const CudaLinearWeight& w, const BackwardArgs& a);  // null: none
};

constexpr AlgoEntry kAlgos[] = {
    {LinearAlgo::DequantGemm, "dequant_gemm", &dequant_gemm_supports, &dequant_gemm_forward,
     &dequant_gemm_backward},
    {LinearAlgo::Fused, "fused", &fused_supports, &fused_forward, &fused_backward},
    {LinearAlgo::Gemv, "gemv", &gemv_supports, &gemv_forward, nullptr},
};

const AlgoEntry* find_algo(LinearAlgo a) {
  for (const AlgoEntry& e : kAlgos)
    if (e.algo == a) return &e;
  return nullptr;
}

bool entry_supports(const AlgoEntry& e, int arch, const CudaLinearWeight& w, int64_t N, LinearPass pass) {
  if (pass == LinearPass::Backward && e.backward == nullptr) return false;
  return e.supports(arch, w, N, pass);
}

// The algorithm to run, after the arguments have been checked.
const AlgoEntry& resolve(int arch, LinearAlgo requested, const CudaLinearWeight& w, int64_t N,
                         LinearPass pass) {
  const char* fn = op_name(pass);
  const LinearAlgo a = requested == LinearAlgo::Auto ? linear_auto_algo(arch, w, N, pass) : requested;
  const AlgoEntry* e = find_algo(a);
  if (e == nullptr) fail(fn, ": unknown algorithm ", int(a));
  if (!entry_supports(*e, arch, w, N, pass))
    fail(fn, ": algorithm ", e->name, " does not support a ", w.quantized() ? "4-bit" : "dense", " [", w.out,
         ", ", w.in, "] weight at N = ", N, " on sm_", arch);
  return *e;
}

}  // namespace

// ---- launcher of the panel kernel ----------------------------------------------------

void launch_dequant_panel(const DequantPanelParams& p, cudaStream_t s) {
  const int64_t width = p.c1 - p.c0, rows = p.r1 - p.r0;
  if (width <= 0 || rows <= 0) return;
  const bool pairs = p.w.in % 2 == 0 && p.c0 % 2 == 0 && width % 2 == 0 && aligned(p.dst, 4);
  if (pairs) {
    dequant_panel_kernel<true><<<grid_for(rows * (width / 2), kThreads), kThreads, 0, s>>>(p);
  } else {
    dequant_panel_kernel<false><<<grid_for(rows * width, kThreads), kThreads, 0, s>>>(p);
  }
  check_launch("dequant_panel_kernel");
}

// ---- the device-free API ---------------------------------------------------------------

const char* linear_algo_name(LinearAlgo a) {
  if (a == LinearAlgo::Auto) return "auto";
  const AlgoEntry* e = find_algo(a);
  return e != nullptr ? e->name : "unknown";
}

bool linear_algo_supports(int arch, LinearAlgo a, const CudaLinearWeight& w, int64_t N, LinearPass pass) {
  if (a == LinearAlgo::Auto) return true;
  const AlgoEntry* e = find_algo(a);
  return e != nullptr && entry_supports(*e, arch, w, N, pass);
}

LinearAlgo linear_auto_algo(int arch, const CudaLinearWeight& w, int64_t N, LinearPass pass) {
  // A dense weight is cuBLAS's job; the 4-bit kernels only exist for 4-bit weights.
  if (!w.quantized()) return LinearAlgo::DequantGemm;
  // Few rows: the product is a stream over W's codes, and a GEMM tile of 64
  // rows would be mostly padding.
  if (linear_algo_supports(arch, LinearAlgo::Gemv, w, N, pass)) return LinearAlgo::Gemv;
  // W is read as 4 bits and never written back dequantized.
  if (linear_algo_supports(arch, LinearAlgo::Fused, w, N, pass)) return LinearAlgo::Fused;
  return LinearAlgo::DequantGemm;
}

void linear_check_args(LinearPass pass, const void* dst, const void* src, const CudaLinearWeight& w,
                       int64_t N) {
  const char* fn = op_name(pass);
  check_dims(fn, "N", N);
  if (w.out <= 0 || w.in <= 0 || w.out > INT_MAX || w.in > INT_MAX)
    fail(fn, ": weight shape [", w.out, ", ", w.in, "] must be positive and at most ", INT_MAX, " per side");
  if (w.quantized()) {
    if (!block4_supported(w.block))
      fail(fn, ": 4-bit block size ", w.block, " is not supported (expected a power of two from 32 to 4096)");
    if (w.type != Quant4Type::NF4 && w.type != Quant4Type::FP4)
      fail(fn, ": unknown 4-bit type ", int(w.type));
    if (w.double_quant() && w.nested_block <= 0)
      fail(fn, ": nested block size ", w.nested_block, " must be positive");
  }
  if (N == 0) return;  // nothing to do: null pointers are fine
  const bool fwd = pass == LinearPass::Forward;
  const int64_t nblocks = (w.out * w.in + w.block - 1) / w.block;
  check_pointer(fn, dst, fwd ? "out" : "dinp", N * (fwd ? w.out : w.in));
  check_pointer(fn, src, fwd ? "inp" : "dout", N * (fwd ? w.in : w.out));
  if (!w.quantized()) return;
  check_pointer(fn, w.codes, "w.codes", w.out * w.in);
  if (w.double_quant()) {
    check_pointer(fn, w.nested_absmax, "w.nested_absmax", nblocks);
    check_pointer(fn, w.code8, "w.code8", 256);
  } else {
    check_pointer(fn, w.absmax, "w.absmax", nblocks);
  }
}

// ---- the public API ----------------------------------------------------------------------

void linear_rows_f32(CudaContext& ctx, float* dst, const CudaLinearWeight& w, int64_t r0, int64_t r1) {
  const char* fn = "cuda_ops::linear_rows_f32";
  linear_check_args(LinearPass::Forward, dst, dst, w, 0);  // the weight's shape and format (no rows)
  if (r0 < 0 || r1 < r0 || r1 > w.out) fail(fn, ": rows [", r0, ", ", r1, ") are outside [0, ", w.out, "]");
  const int64_t n = (r1 - r0) * w.in;
  if (n == 0) return;
  check_pointer(fn, dst, "dst", n);
  if (w.quantized()) {
    check_pointer(fn, w.codes, "w.codes", n);
    check_pointer(fn, w.double_quant() ? static_cast<const void*>(w.nested_absmax) : w.absmax,
                  w.double_quant() ? "w.nested_absmax" : "w.absmax", n);
  } else {
    check_pointer(fn, w.dense, "w.dense", n);
  }
  rows_f32_kernel<<<grid_for(n, kThreads), kThreads, 0, ctx.stream()>>>(weight_params(w), w.dense, r0, r1, dst);
  check_launch("rows_f32_kernel");
}

bool linear_algo_supports(const CudaContext& ctx, LinearAlgo a, const CudaLinearWeight& w, int64_t N) {
  return linear_algo_supports(ctx.arch(), a, w, N, LinearPass::Forward);
}

size_t linear_workspace_bytes(const CudaLinearWeight& w, int64_t /*N*/) {
  if (!w.quantized() || w.out <= 0 || w.in <= 0) return 0;
  return panel_bytes(w);
}

void linear_forward(CudaContext& ctx, uint16_t* out, const uint16_t* inp, const CudaLinearWeight& w,
                    const uint16_t* bias, int64_t N, LinearAlgo algo) {
  linear_check_args(LinearPass::Forward, out, inp, w, N);
  if (N == 0) return;
  const AlgoEntry& e = resolve(ctx.arch(), algo, w, N, LinearPass::Forward);
  e.forward(ctx, w, ForwardArgs{out, inp, bias, N});
}

void linear_backward(CudaContext& ctx, uint16_t* dinp, const uint16_t* dout, const CudaLinearWeight& w,
                     int64_t N, bool accumulate, LinearAlgo algo) {
  linear_check_args(LinearPass::Backward, dinp, dout, w, N);
  if (N == 0) return;
  const AlgoEntry& e = resolve(ctx.arch(), algo, w, N, LinearPass::Backward);
  e.backward(ctx, w, BackwardArgs{dinp, dout, N, accumulate});
}

}  // namespace qlora::cuda_ops
