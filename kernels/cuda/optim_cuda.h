// The optimizer step of the CUDA backend over the flat LoRA parameters
// (LoraWeights::flat_params): on the GPU they live as an fp32 master copy (n),
// the bf16 copy the kernels read (n) and fp32 gradients (n). Plus the pieces of
// gradient-norm clipping: a deterministic sum of squares and an in-place scale.
//
// The CPU twin is qlora::Optimizer (src/train/optimizer.h): the update does the
// same IEEE fp32 operations in the same order on the same fp32 constants
// (rounded once on the host, from doubles, by the same expressions), with
// __fmul_rn/__fadd_rn/__fdiv_rn/__fsqrt_rn so nvcc cannot contract a multiply
// and an add into one FMA (the CPU library is built with -ffp-contract=off).
// Every such operation is correctly rounded on both sides, so the GPU master,
// m and v are bit for bit the CPU's. This holds only while denormals are kept
// (no --use_fast_math, no -ftz=true for this file).
//
// Layers, as kernels/cuda/quant4.h: 1. the validated entry points; 2. one
// params struct per kernel and its launcher (no validation); 3. the kernels
// (optim.cu). All pointers are device pointers; everything is asynchronous on
// `s` (buffers must stay valid until the stream has run the work); invalid
// arguments throw qlora::Error before anything is queued, a launch error before
// the function returns, an execution error at the next synchronizing call.
//
// Host-only header: compiles with g++ (C++20) and nvcc (C++17).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/context.h"

namespace qlora::cuda_ops {

// ---- 1. validated entry points ----------------------------------------------

struct OptimStep {  // one update, values as the CPU Optimizer derives them from its config
  int kind = 0;     // 0 adamw (also paged_adamw), 1 sgd
  int64_t t = 1;    // step number after increment (torch)
  double lr = 0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0, momentum = 0;
  // LoRA+ (OptimizerConfig::plus_lr_ratio): elements whose index base + i lies
  // in one of the n_plus ranges [plus[2k], plus[2k+1]) (device memory, sorted,
  // disjoint) step at lr * plus_lr_ratio. base: the index of element 0 in the
  // whole flat array (a page of the paged state starts past 0).
  double plus_lr_ratio = 1.0;
  const int64_t* plus = nullptr;
  int64_t n_plus = 0;
  int64_t base = 0;
};

// master (n) fp32 updated in place from grad (n) fp32 (already clipped/scaled by the caller);
// m, v (n) fp32 state (v unused by sgd; m is the momentum buffer, may be null when momentum == 0);
// param_bf16 (n), when not null, receives the updated master rounded to bf16. One fused launch.
// The arrays must not overlap. sgd with momentum != 0 at t == 1 writes m without reading it
// (torch initialises the buffer with the first gradient); adamw needs m = v = 0 before t == 1.
// The config is checked as the CPU Optimizer checks it (betas in [0, 1), eps, weight_decay,
// momentum >= 0), and t >= 1.
void optimizer_step(float* master, uint16_t* param_bf16, const float* grad, float* m, float* v, int64_t n,
                    const OptimStep& st, cudaStream_t s);

// sum of grad[i]^2 over n, in double, deterministic (fixed-order tree), written to *d_out (device).
// The order depends on n only (not on the GPU), so equal inputs give equal bits everywhere. n == 0
// writes 0. `workspace`: device memory of sum_squares_workspace_bytes(n) bytes, 8-byte aligned
// (null when that is 0), not used by other work until the stream has run this.
size_t sum_squares_workspace_bytes(int64_t n);
void sum_squares(const float* grad, int64_t n, double* d_out, void* workspace, cudaStream_t s);

// grad[i] *= factor (clipping); one fp32 multiply, as clip_grad_norm on the CPU.
void scale_inplace(float* x, int64_t n, float factor, cudaStream_t s);

// ---- 2. params and launchers (no validation: callers use layer 1) ----------

enum class OptimKind : uint8_t { AdamW, Sgd };

// The fp32 constants are those Optimizer::step rounds from its doubles.
struct OptimStepParams {
  float* master = nullptr;         // n, in place
  uint16_t* param_bf16 = nullptr;  // n or null
  const float* grad = nullptr;     // n
  float* m = nullptr;              // n: exp_avg (adamw), momentum buffer or null (sgd)
  float* v = nullptr;              // n: exp_avg_sq (adamw), unused (sgd)
  int64_t n = 0;
  OptimKind kind = OptimKind::AdamW;
  // adamw: p = p*decay; m = m*beta1 + omb1*g; v = v*beta2 + (omb2*g)*g;
  //        p = p + (neg_step_size*m) / (sqrt(v)/bc2_sqrt + eps)
  float decay = 1.0f, beta1 = 0.0f, one_minus_beta1 = 0.0f, beta2 = 0.0f, one_minus_beta2 = 0.0f;
  float neg_step_size = 0.0f, bc2_sqrt = 1.0f, eps = 0.0f;
  // sgd: d = g (+ weight_decay*p when weight_decay != 0); with a buffer m:
  //      m = first ? d : m*momentum + d, d = m; p = p + neg_lr*d
  float weight_decay = 0.0f, momentum = 0.0f, neg_lr = 0.0f;
  bool first = false;  // t == 1
  // LoRA+: inside the ranges, decay / neg_step_size / neg_lr are replaced by
  // these (the same expressions at lr * ratio). plus == null: none.
  const int64_t* plus = nullptr;  // 2 * n_plus, sorted [begin, end) pairs of global indices
  int64_t n_plus = 0, base = 0;
  float decay_plus = 1.0f, neg_step_size_plus = 0.0f, neg_lr_plus = 0.0f;
};

struct SumSquaresParams {
  const float* x = nullptr;  // n
  int64_t n = 0;
  int64_t chunks = 0;         // ceil(n / kSumSquaresChunk): one partial sum each
  double* partial = nullptr;  // chunks doubles (the workspace)
  double* out = nullptr;      // 1 double
};

// Elements per partial sum of sum_squares: a fixed constant, so the order of
// the additions depends on n alone.
inline constexpr int64_t kSumSquaresChunk = 8192;

// Each launches nothing when there is no element (launch_sum_squares then
// writes 0 to *out with a memset on the stream).
void launch_optimizer_step(const OptimStepParams& p, cudaStream_t s);
void launch_sum_squares(const SumSquaresParams& p, cudaStream_t s);

}  // namespace qlora::cuda_ops
