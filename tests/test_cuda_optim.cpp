// The CUDA optimizer step, gradient sum of squares, clipping scale and paged
// AdamW state (kernels/cuda/optim_cuda.h, kernels/cuda/paged_state.h) against
// the CPU Optimizer (src/train/optimizer.h).
//
// OptimCases*: the CPU side on the shared cases, checked against the torch
// formulas evaluated in double. They run on every machine, so the cases the GPU
// tests use are known to be sound.
//
// CudaOptim*: the GPU on the same cases. Thresholds:
//  - master, m, v (and the SGD momentum buffer): BIT-identical to the CPU. Both
//    sides do the same fp32 operations in the same order on the same fp32
//    constants (rounded on the host from the same doubles); every operation is
//    a correctly rounded IEEE one (the GPU's explicit __fmul_rn/__fadd_rn/
//    __fdiv_rn/__fsqrt_rn, the CPU's built with -ffp-contract=off), and neither
//    side flushes denormals. Equal operations on equal inputs give equal bits,
//    so any difference is a bug, not rounding.
//  - the bf16 copy: exactly f32_to_bf16 of the master (the same integer rounding).
//  - the paged state: the update is elementwise, so paging cannot change a bit:
//    equal to the device-resident run, and its host m, v equal to the CPU's.
//  - sum_squares: both sides add the same exact terms (a float squared has at
//    most 48 significant bits, exact in double) in double, in different orders.
//    A sum of n non-negative terms in any order is within (n-1) u S of the exact
//    sum S (u = 2^-53, to first order; the standard bound for recursive and tree
//    summation alike), so the two differ by at most 2 (n-1) u S; we allow 2 n u S.
//    (Far tighter than n 2^-24, the bound of an fp32 accumulation.)
//  - scale_inplace: one fp32 multiply, bit for bit clip_grad_norm's.
//
// Without a CUDA build or a usable GPU the CudaOptim tests skip.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "train/optimizer.h"

#if QLORA_HAVE_CUDA
#include "kernels/cuda/context.h"
#include "kernels/cuda/device.h"
#include "kernels/cuda/optim_cuda.h"
#include "kernels/cuda/paged_state.h"
#endif

#include "cuda_testing.h"
#include "testing.h"

namespace qlora {
namespace {

using testing::sz;

// ---- the cases -----------------------------------------------------------------

struct OptimCase {
  OptimizerConfig cfg;
  int64_t n = 0;
  int64_t page = 0;  // page size of the paged state (adamw kinds)
  int64_t steps = 0;
};

std::string describe(const OptimCase& c) {
  std::ostringstream os;
  os << optimizer_kind_name(c.cfg.kind) << " wd " << c.cfg.weight_decay;
  if (c.cfg.kind == OptimizerKind::sgd) os << " momentum " << c.cfg.momentum;
  if (c.cfg.plus_lr_ratio != 1.0) os << " LoRA+ ratio " << c.cfg.plus_lr_ratio;
  os << " n " << c.n << " page " << c.page << " steps " << c.steps;
  return os.str();
}

// LoRA+ ranges of a case: [50k + 10, 50k + 30) clipped to n, so ranges start
// and end inside pages of every size above and straddle page edges.
std::vector<FlatRange> plus_ranges_for(const OptimCase& c) {
  std::vector<FlatRange> r;
  if (c.cfg.plus_lr_ratio == 1.0) return r;
  for (int64_t b = 10; b < c.n; b += 50) r.push_back({size_t(b), size_t(std::min(c.n, b + 20))});
  return r;
}
bool in_plus(const OptimCase& c, size_t i) {
  return c.cfg.plus_lr_ratio != 1.0 && i % 50 >= 10 && i % 50 < 30;
}

// n = 1 and 7 (under a warp; 7 in one page of INT64_MAX params, whose page
// count must not overflow), 197 = 3 pages of 64 + 5, 1000 (several thread
// blocks; 7 pages of 128 + 104), 70001 (many blocks; pages of 2^14 + a tail).
std::vector<OptimCase> optim_cases() {
  struct Size {
    int64_t n, page;
  };
  const Size sizes[] = {{1, int64_t(1) << 20}, {7, INT64_MAX}, {197, 64}, {1000, 128}, {70001, 16384}};
  std::vector<OptimizerConfig> cfgs(6);
  cfgs[0].kind = OptimizerKind::adamw;
  cfgs[1].kind = OptimizerKind::paged_adamw;
  cfgs[1].weight_decay = 0.01;
  cfgs[2].kind = OptimizerKind::sgd;
  cfgs[3].kind = OptimizerKind::sgd;
  cfgs[3].momentum = 0.9;
  cfgs[3].weight_decay = 0.01;
  // LoRA+ (lora.plus_lr_ratio): the ranges of plus_ranges_for at lr x 4.
  cfgs[4] = cfgs[1];
  cfgs[4].plus_lr_ratio = 4.0;
  cfgs[5] = cfgs[3];
  cfgs[5].plus_lr_ratio = 4.0;
  std::vector<OptimCase> cases;
  for (const Size& s : sizes)
    for (const OptimizerConfig& cfg : cfgs)
      for (int64_t steps : {1, 5}) cases.push_back({cfg, s.n, s.page, steps});
  return cases;
}

bool is_sgd(const OptimCase& c) {
  return c.cfg.kind == OptimizerKind::sgd;
}

// A learning rate that changes every step, as a schedule's does.
double lr_at(const OptimCase& c, int64_t step) {
  return (is_sgd(c) ? 0.05 : 1e-3) * (1.0 + 0.25 * double(step));
}

// LoRA-sized parameters (0.02), with exact zeros and subnormals (1e-40: kept,
// not flushed, by both sides).
std::vector<float> params_for(const OptimCase& c) {
  std::mt19937 rng(unsigned(c.n * 31 + c.steps));
  std::normal_distribution<float> d(0.0f, 0.02f);
  std::vector<float> p(sz(c.n));
  for (size_t i = 0; i < p.size(); ++i) {
    p[i] = d(rng);
    if (i % 101 == 11) p[i] = 1.0e-40f;
    if (i % 103 == 13) p[i] = 0.0f;
  }
  return p;
}

// steps x n gradients (0.01), with exact zeros (AdamW: v = 0, denom = eps),
// tiny ones (1e-30: g*g underflows to 0 in fp32) and large ones (10).
std::vector<float> grads_for(const OptimCase& c) {
  std::mt19937 rng(unsigned(c.n * 17 + c.steps * 5 + 1));
  std::normal_distribution<float> d(0.0f, 0.01f);
  std::vector<float> g(sz(c.steps * c.n));
  for (size_t k = 0; k < g.size(); ++k) {
    const size_t i = k % sz(c.n);
    g[k] = d(rng);
    if (i % 97 == 3) g[k] = 0.0f;
    if (i % 89 == 5) g[k] = 1.0e-30f;
    if (i % 83 == 7) g[k] = (k / sz(c.n)) % 2 == 0 ? 10.0f : -10.0f;
  }
  return g;
}

struct CpuRun {
  std::vector<float> params;  // after the last step
  std::vector<float> m, v;    // exp_avg / exp_avg_sq, or momentum_buffer in m (empty when absent)
};

CpuRun run_cpu(const OptimCase& c) {
  CpuRun r;
  r.params = params_for(c);
  const std::vector<float> g = grads_for(c);
  Optimizer opt(c.cfg, sz(c.n), plus_ranges_for(c));
  for (int64_t s = 0; s < c.steps; ++s) opt.step(r.params.data(), g.data() + s * c.n, lr_at(c, s));
  for (const auto& st : opt.state()) {
    std::vector<float> a(st.data, st.data + st.n);
    if (st.name == "exp_avg_sq")
      r.v = std::move(a);
    else
      r.m = std::move(a);
  }
  return r;
}

// ---- sum of squares cases ------------------------------------------------------------

struct SumCase {
  int64_t n;
  float scale;
};
// 8192 = one chunk of sum_squares exactly, 8193 one more element; 2100001 has
// 257 chunks (the final pass's threads each add more than one partial).
std::vector<SumCase> sum_cases() {
  return {{0, 1.0f},       {1, 1.0f},      {7, 3.0e4f},      {1000, 1.0f},   {8192, 1.0f},
          {8193, 1.0e-3f}, {100003, 1.0f}, {100003, 3.0e4f}, {2100001, 1.0f}};
}

std::vector<float> sum_input(const SumCase& c) {
  std::mt19937 rng(unsigned(c.n + 7));
  std::normal_distribution<float> d(0.0f, c.scale);
  std::vector<float> x(sz(c.n));
  for (auto& v : x) v = d(rng);
  return x;
}

double sequential_sum_squares(const std::vector<float>& x) {
  double s = 0.0;
  for (float v : x) s += double(v) * double(v);
  return s;
}

constexpr double kDoubleUnit = 1.0 / 9007199254740992.0;  // u = 2^-53

// ---- CPU side: the cases are sound --------------------------------------------------

// The torch formulas in double, with the double hyperparameters: the CPU fp32
// result differs from it by its own roundings (and its fp32 constants), each at
// most 2^-24 of a quantity involved. Per element i, over the run: the
// parameter (at most pmax_i), the update lr x R_i (AdamW: |m^| / (sqrt(v^) +
// eps) is about 3 at most for these betas, R = 10 leaves room for m's
// cancellation; SGD: |buf| <= steps (gmax_i + wd pmax_i)), and for the state
// gmax_i (m) and gmax_i^2 (v). About ten roundings per step: 64 units per step
// never flakes, while a wrong formula (a missing bias correction, a sign, a
// swapped beta) is off by a large fraction of the update.
TEST(OptimCases, CpuOptimizerMatchesTorchFormulasInDouble) {
  constexpr double kUnits = 64.0 / 16777216.0;  // 64 x 2^-24
  for (const OptimCase& c : optim_cases()) {
    SCOPED_TRACE(describe(c));
    const CpuRun cpu = run_cpu(c);
    const std::vector<float> p0 = params_for(c), g = grads_for(c);
    const size_t n = sz(c.n);
    std::vector<double> p(p0.begin(), p0.end()), m(n, 0.0), v(n, 0.0), gmax(n, 0.0), pmax(n, 0.0);
    const double wd = c.cfg.weight_decay;
    double max_lr = 0.0;
    for (int64_t s = 0; s < c.steps; ++s) {
      const double t = double(s + 1);
      max_lr = std::max(max_lr, lr_at(c, s) * c.cfg.plus_lr_ratio);
      for (size_t i = 0; i < n; ++i) {
        const double lr = lr_at(c, s) * (in_plus(c, i) ? c.cfg.plus_lr_ratio : 1.0);
        const double gi = g[sz(s) * n + i];
        gmax[i] = std::max(gmax[i], std::abs(gi));
        pmax[i] = std::max(pmax[i], std::abs(p[i]));
        if (is_sgd(c)) {
          double d = gi + wd * p[i];
          if (c.cfg.momentum != 0.0) d = m[i] = s == 0 ? d : m[i] * c.cfg.momentum + d;
          p[i] -= lr * d;
        } else {
          p[i] *= 1.0 - lr * wd;
          m[i] = c.cfg.beta1 * m[i] + (1.0 - c.cfg.beta1) * gi;
          v[i] = c.cfg.beta2 * v[i] + (1.0 - c.cfg.beta2) * gi * gi;
          const double mhat = m[i] / (1.0 - std::pow(c.cfg.beta1, t));
          const double vhat = v[i] / (1.0 - std::pow(c.cfg.beta2, t));
          p[i] -= lr * mhat / (std::sqrt(vhat) + c.cfg.eps);
        }
        pmax[i] = std::max(pmax[i], std::abs(p[i]));
      }
    }
    const double steps = double(c.steps);
    for (size_t i = 0; i < n; ++i) {
      ASSERT_TRUE(std::isfinite(cpu.params[i])) << "at " << i;
      const double buf = steps * (gmax[i] + wd * pmax[i]);  // SGD: bounds |buf| and |d|
      const double ratio = is_sgd(c) ? buf : 10.0;
      ASSERT_NEAR(cpu.params[i], p[i], kUnits * steps * (pmax[i] + max_lr * ratio) + 1e-44) << "param " << i;
      if (!cpu.m.empty()) {
        ASSERT_NEAR(cpu.m[i], m[i], kUnits * steps * (is_sgd(c) ? buf : gmax[i]) + 1e-44) << "m " << i;
      }
      if (!cpu.v.empty()) {
        ASSERT_NEAR(cpu.v[i], v[i], kUnits * steps * gmax[i] * gmax[i] + 1e-44) << "v " << i;
      }
    }
    // The state torch keeps, no more.
    EXPECT_EQ(cpu.m.size(), !is_sgd(c) || c.cfg.momentum != 0.0 ? n : 0);
    EXPECT_EQ(cpu.v.size(), is_sgd(c) ? 0 : n);
    // The step does something: parameters move.
    size_t moved = 0;
    for (size_t i = 0; i < n; ++i) moved += cpu.params[i] != p0[i];
    EXPECT_GT(moved, 0u);
  }
}

// Our sequential double sum against the CPU grad_norm (fixed 2^16 blocks):
// two orders, each within (n-1) u S of the exact sum; grad_norm's sqrt and our
// square of it add a few u more.
TEST(OptimCases, SumOfSquaresAgreesWithCpuGradNorm) {
  for (const SumCase& c : sum_cases()) {
    SCOPED_TRACE(str("n ", c.n, " scale ", c.scale));
    const std::vector<float> x = sum_input(c);
    const double s = sequential_sum_squares(x);
    const double norm = grad_norm(x.data(), x.size());
    EXPECT_NEAR(norm * norm, s, (2.0 * double(c.n) + 8.0) * kDoubleUnit * s);
    EXPECT_EQ(s > 0.0, c.n > 0);
  }
}

// ---- GPU against CPU -----------------------------------------------------------------

#if QLORA_HAVE_CUDA

// plus: the case's LoRA+ ranges on the device ([begin, end) int64 pairs), or empty.
cuda_ops::OptimStep step_for(const OptimizerConfig& cfg, int64_t t, double lr,
                             const DeviceBuffer<int64_t>* plus = nullptr) {
  cuda_ops::OptimStep st;
  st.plus_lr_ratio = cfg.plus_lr_ratio;
  if (plus != nullptr && plus->size() > 0) {
    st.plus = plus->data();
    st.n_plus = int64_t(plus->size() / 2);
  }
  st.kind = cfg.kind == OptimizerKind::sgd ? 1 : 0;
  st.t = t;
  st.lr = lr;
  st.beta1 = cfg.beta1;
  st.beta2 = cfg.beta2;
  st.eps = cfg.eps;
  st.weight_decay = cfg.weight_decay;
  st.momentum = cfg.momentum;
  return st;
}

using testing::download;
using testing::poison;
using testing::upload;

uint32_t bits_of(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

// Every element bit for bit; reports the first few differences and how many.
::testing::AssertionResult same_bits(const float* want, const float* got, size_t n) {
  size_t bad = 0;
  std::ostringstream os;
  for (size_t i = 0; i < n; ++i)
    if (bits_of(want[i]) != bits_of(got[i]) && bad++ < 5)
      os << " [" << i << "] want " << want[i] << " (0x" << std::hex << bits_of(want[i]) << ") got " << got[i]
         << " (0x" << bits_of(got[i]) << std::dec << ")";
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << n << " elements differ:" << os.str();
}

::testing::AssertionResult same_bits(const std::vector<float>& want, const std::vector<float>& got) {
  if (want.size() != got.size())
    return ::testing::AssertionFailure() << "sizes differ: " << want.size() << " vs " << got.size();
  return same_bits(want.data(), got.data(), want.size());
}

// The bf16 copy is f32_to_bf16 of the master, and never NaN/Inf (the masters are finite).
::testing::AssertionResult bf16_of(const std::vector<float>& master, const std::vector<uint16_t>& got) {
  if (master.size() != got.size()) return ::testing::AssertionFailure() << "sizes differ";
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(bf16_to_f32(got[i])))
      return ::testing::AssertionFailure() << "[" << i << "] bf16 is not finite: 0x" << std::hex << got[i];
    if (got[i] != f32_to_bf16(master[i]))
      return ::testing::AssertionFailure()
             << "[" << i << "] bf16 0x" << std::hex << got[i] << ", want 0x" << f32_to_bf16(master[i]);
  }
  return ::testing::AssertionSuccess();
}

DeviceBuffer<int64_t> upload_plus(const OptimCase& c) {
  std::vector<int64_t> r;
  for (const FlatRange& f : plus_ranges_for(c)) {
    r.push_back(int64_t(f.begin));
    r.push_back(int64_t(f.end));
  }
  DeviceBuffer<int64_t> d(r.size());
  d.upload(r.data(), r.size());
  return d;
}

// Device-resident state, one optimizer_step per step on `s`.
struct GpuRun {
  DeviceBuffer<float> master, m, v;
  DeviceBuffer<uint16_t> bf16;
};

GpuRun run_gpu(const OptimCase& c, const DeviceBuffer<float>& d_grads, cudaStream_t s) {
  GpuRun r;
  r.master = upload(params_for(c));
  r.bf16 = DeviceBuffer<uint16_t>(sz(c.n));
  poison(r.bf16);
  const bool adam = !is_sgd(c), buffer = is_sgd(c) && c.cfg.momentum != 0.0;
  if (adam || buffer) r.m = DeviceBuffer<float>(sz(c.n));
  if (adam) r.v = DeviceBuffer<float>(sz(c.n));
  if (adam) {
    QLORA_CUDA_CHECK(cudaMemset(r.m.data(), 0, r.m.bytes()));
    QLORA_CUDA_CHECK(cudaMemset(r.v.data(), 0, r.v.bytes()));
  } else {
    poison(r.m);  // torch's first SGD step sets the buffer: it must not be read
  }
  QLORA_CUDA_CHECK(cudaDeviceSynchronize());  // the memsets (legacy stream) before work on `s`
  const DeviceBuffer<int64_t> plus = upload_plus(c);
  for (int64_t k = 0; k < c.steps; ++k)
    cuda_ops::optimizer_step(r.master.data(), r.bf16.data(), d_grads.data() + k * c.n, r.m.data(), r.v.data(),
                             c.n, step_for(c.cfg, k + 1, lr_at(c, k), &plus), s);
  QLORA_CUDA_CHECK(cudaStreamSynchronize(s));
  return r;
}

TEST(CudaOptim, StepEqualsCpuOptimizerBitForBit) {
  QLORA_REQUIRE_GPU();
  for (const OptimCase& c : optim_cases()) {
    SCOPED_TRACE(describe(c));
    const CpuRun cpu = run_cpu(c);
    const auto d_grads = upload(grads_for(c));
    const GpuRun gpu = run_gpu(c, d_grads, nullptr);
    const std::vector<float> master = download(gpu.master);
    EXPECT_TRUE(same_bits(cpu.params, master)) << "master";
    EXPECT_TRUE(bf16_of(master, download(gpu.bf16))) << "bf16 copy";
    if (!cpu.m.empty()) {
      EXPECT_TRUE(same_bits(cpu.m, download(gpu.m))) << "m";
    }
    if (!cpu.v.empty()) {
      EXPECT_TRUE(same_bits(cpu.v, download(gpu.v))) << "v";
    }
  }
}

// A null bf16 copy is allowed (the master alone is updated), and momentum 0
// ignores a buffer it is given.
TEST(CudaOptim, OptionalOutputsAreOptional) {
  QLORA_REQUIRE_GPU();
  OptimCase c;
  c.cfg.kind = OptimizerKind::sgd;
  c.n = 1000;
  c.page = 128;
  c.steps = 1;
  const CpuRun cpu = run_cpu(c);
  auto d_grads = upload(grads_for(c));
  auto master = upload(params_for(c));
  DeviceBuffer<float> buf(sz(c.n));
  poison(buf);
  QLORA_CUDA_CHECK(cudaDeviceSynchronize());
  cuda_ops::optimizer_step(master.data(), nullptr, d_grads.data(), buf.data(), nullptr, c.n,
                           step_for(c.cfg, 1, lr_at(c, 0)), nullptr);
  EXPECT_TRUE(same_bits(cpu.params, download(master)));
  for (float x : download(buf)) ASSERT_EQ(bits_of(x), 0xffffffffu) << "momentum 0 wrote its buffer";
}

TEST(CudaOptim, SumSquaresIsDeterministicAndWithinDoubleRounding) {
  QLORA_REQUIRE_GPU();
  for (const SumCase& c : sum_cases()) {
    SCOPED_TRACE(str("n ", c.n, " scale ", c.scale));
    const std::vector<float> x = sum_input(c);
    const double want = sequential_sum_squares(x);
    const auto d_x = upload(x);
    const size_t ws_bytes = cuda_ops::sum_squares_workspace_bytes(c.n);
    EXPECT_EQ(ws_bytes,
              sz((c.n + cuda_ops::kSumSquaresChunk - 1) / cuda_ops::kSumSquaresChunk) * sizeof(double));
    DeviceBuffer<uint8_t> ws(ws_bytes);
    DeviceBuffer<double> out(2);
    poison(ws);
    poison(out);
    QLORA_CUDA_CHECK(cudaDeviceSynchronize());
    cuda_ops::sum_squares(d_x.data(), c.n, out.data(), ws.data(), nullptr);
    poison(ws);  // a second run may not depend on the first one's partials
    cuda_ops::sum_squares(d_x.data(), c.n, out.data() + 1, ws.data(), nullptr);
    const std::vector<double> got = download(out);
    ASSERT_TRUE(std::isfinite(got[0])) << got[0];
    EXPECT_EQ(std::memcmp(&got[0], &got[1], sizeof(double)), 0) << got[0] << " then " << got[1];
    EXPECT_NEAR(got[0], want, 2.0 * double(c.n) * kDoubleUnit * want) << "cpu " << want;
  }
}

// The clipping scale as clip_grad_norm applies it (the factor from the CPU's
// norm, so both sides multiply by the same float).
TEST(CudaOptim, ScaleInplaceEqualsCpuClipBitForBit) {
  QLORA_REQUIRE_GPU();
  for (const SumCase& c : sum_cases()) {
    if (c.n == 0) continue;
    SCOPED_TRACE(str("n ", c.n, " scale ", c.scale));
    std::vector<float> x = sum_input(c);
    auto d_x = upload(x);
    const double norm = grad_norm(x.data(), x.size());
    const double max_norm = 0.3 * norm;
    const float factor = float(max_norm / (norm + 1e-6));  // clip_grad_norm's coefficient
    EXPECT_EQ(clip_grad_norm(x.data(), x.size(), max_norm), norm);
    cuda_ops::scale_inplace(d_x.data(), c.n, factor, nullptr);
    EXPECT_TRUE(same_bits(x, download(d_x)));
  }
}

TEST(CudaOptim, PagedStateEqualsDeviceStateAndCpuBitForBit) {
  QLORA_REQUIRE_GPU();
  CudaContext ctx;
  for (const OptimCase& c : optim_cases()) {
    if (is_sgd(c)) continue;
    SCOPED_TRACE(describe(c));
    const CpuRun cpu = run_cpu(c);
    const auto d_grads = upload(grads_for(c));
    const GpuRun ref = run_gpu(c, d_grads, ctx.stream());

    PagedAdamState paged(ctx, c.n, c.page);
    EXPECT_EQ(paged.size(), c.n);
    EXPECT_EQ(paged.device_bytes(), 2 * 2 * sz(std::min(c.page, c.n)) * sizeof(float));
    EXPECT_EQ(paged.device_bytes(), plan_cuda::paged_optimizer_device_bytes(c.n, c.page)) << "what the plan counts";
    cudaPointerAttributes attr{};
    QLORA_CUDA_CHECK(cudaPointerGetAttributes(&attr, paged.host_m()));
    EXPECT_EQ(attr.type, cudaMemoryTypeHost) << "the state must be pinned host memory, not managed";
    auto master = upload(params_for(c));
    DeviceBuffer<uint16_t> bf16(sz(c.n));
    poison(bf16);
    QLORA_CUDA_CHECK(cudaDeviceSynchronize());
    const DeviceBuffer<int64_t> plus = upload_plus(c);
    for (int64_t k = 0; k < c.steps; ++k)
      paged.step(master.data(), bf16.data(), d_grads.data() + k * c.n, step_for(c.cfg, k + 1, lr_at(c, k), &plus));
    ctx.synchronize();

    const std::vector<float> got = download(master);
    EXPECT_TRUE(same_bits(download(ref.master), got)) << "master vs device-resident state";
    EXPECT_TRUE(same_bits(cpu.params, got)) << "master vs cpu";
    EXPECT_TRUE(bf16_of(got, download(bf16))) << "bf16 copy";
    EXPECT_TRUE(same_bits(cpu.m.data(), paged.host_m(), sz(c.n))) << "host m vs cpu exp_avg";
    EXPECT_TRUE(same_bits(cpu.v.data(), paged.host_v(), sz(c.n))) << "host v vs cpu exp_avg_sq";
    EXPECT_TRUE(same_bits(download(ref.m).data(), paged.host_m(), sz(c.n))) << "host m vs device m";
    EXPECT_TRUE(same_bits(download(ref.v).data(), paged.host_v(), sz(c.n))) << "host v vs device v";
  }
}

// A state restored from a checkpoint (written into the host views) continues as
// the CPU Optimizer does from the same state.
TEST(CudaOptim, PagedStateContinuesFromRestoredHostState) {
  QLORA_REQUIRE_GPU();
  CudaContext ctx;
  OptimCase c;
  c.cfg.kind = OptimizerKind::paged_adamw;
  c.cfg.weight_decay = 0.01;
  c.n = 197;
  c.page = 64;
  c.steps = 5;
  const std::vector<float> g = grads_for(c);
  std::vector<float> p = params_for(c);
  Optimizer opt(c.cfg, sz(c.n));
  for (int64_t s = 0; s < 3; ++s) opt.step(p.data(), g.data() + s * c.n, lr_at(c, s));
  PagedAdamState paged(ctx, c.n, c.page);
  const auto st = opt.state();
  std::memcpy(paged.host_m(), st[0].data, sz(c.n) * sizeof(float));
  std::memcpy(paged.host_v(), st[1].data, sz(c.n) * sizeof(float));
  auto master = upload(p);
  const auto d_grads = upload(g);
  QLORA_CUDA_CHECK(cudaDeviceSynchronize());  // the uploads (legacy stream) before ctx's streams
  for (int64_t s = 3; s < c.steps; ++s) {
    opt.step(p.data(), g.data() + s * c.n, lr_at(c, s));
    paged.step(master.data(), nullptr, d_grads.data() + s * c.n, step_for(c.cfg, s + 1, lr_at(c, s)));
  }
  ctx.synchronize();
  EXPECT_TRUE(same_bits(p, download(master)));
  EXPECT_TRUE(same_bits(st[0].data, paged.host_m(), sz(c.n)));
  EXPECT_TRUE(same_bits(st[1].data, paged.host_v(), sz(c.n)));
}

TEST(CudaOptim, RejectsInvalidArguments) {
  QLORA_REQUIRE_GPU();
  DeviceBuffer<float> a(64), b(64), m(64), v(64);
  DeviceBuffer<uint8_t> ws(64);
  DeviceBuffer<double> out(1);
  cuda_ops::OptimStep ok;
  ok.lr = 1e-3;
  auto with = [&](auto change) {
    cuda_ops::OptimStep st = ok;
    change(st);
    return st;
  };
  EXPECT_NO_THROW(cuda_ops::optimizer_step(a.data(), nullptr, b.data(), m.data(), v.data(), 64, ok, nullptr));
  const auto step = [&](const cuda_ops::OptimStep& st) {
    cuda_ops::optimizer_step(a.data(), nullptr, b.data(), m.data(), v.data(), 64, st, nullptr);
  };
  EXPECT_THROW(step(with([](auto& s) { s.kind = 2; })), Error);
  EXPECT_THROW(step(with([](auto& s) { s.t = 0; })), Error);
  EXPECT_THROW(step(with([](auto& s) { s.beta1 = 1.0; })), Error);
  EXPECT_THROW(step(with([](auto& s) { s.beta2 = -0.1; })), Error);
  EXPECT_THROW(step(with([](auto& s) { s.eps = std::nan(""); })), Error);
  EXPECT_THROW(step(with([](auto& s) { s.weight_decay = -1.0; })), Error);
  EXPECT_THROW(cuda_ops::optimizer_step(a.data(), nullptr, b.data(), m.data(), nullptr, 64, ok, nullptr),
               Error);
  EXPECT_THROW(cuda_ops::optimizer_step(a.data(), nullptr, nullptr, m.data(), v.data(), 64, ok, nullptr),
               Error);
  EXPECT_THROW(cuda_ops::optimizer_step(a.data(), nullptr, b.data(), m.data(), v.data(), -1, ok, nullptr),
               Error);
  const auto sgd_momentum = with([](auto& s) {
    s.kind = 1;
    s.momentum = 0.9;
  });
  EXPECT_THROW(
      cuda_ops::optimizer_step(a.data(), nullptr, b.data(), nullptr, nullptr, 64, sgd_momentum, nullptr),
      Error);
  EXPECT_THROW(cuda_ops::sum_squares(a.data(), 64, out.data(), nullptr, nullptr), Error);
  EXPECT_THROW(cuda_ops::sum_squares(a.data(), 64, out.data(), ws.data() + 1, nullptr), Error);
  EXPECT_THROW(cuda_ops::sum_squares(a.data(), 64, nullptr, ws.data(), nullptr), Error);
  EXPECT_THROW(cuda_ops::scale_inplace(nullptr, 64, 0.5f, nullptr), Error);
  EXPECT_THROW(cuda_ops::sum_squares_workspace_bytes(-1), Error);
  // Nothing to do is not an error, null pointers included.
  EXPECT_NO_THROW(cuda_ops::optimizer_step(nullptr, nullptr, nullptr, nullptr, nullptr, 0, ok, nullptr));
  EXPECT_NO_THROW(cuda_ops::scale_inplace(nullptr, 0, 0.5f, nullptr));
  EXPECT_EQ(cuda_ops::sum_squares_workspace_bytes(0), 0u);
  EXPECT_NO_THROW(cuda_ops::sum_squares(nullptr, 0, out.data(), nullptr, nullptr));

  CudaContext ctx;
  EXPECT_THROW(PagedAdamState(ctx, -1), Error);
  EXPECT_THROW(PagedAdamState(ctx, 64, 0), Error);
  PagedAdamState paged(ctx, 64, 16);
  EXPECT_THROW(paged.step(a.data(), nullptr, b.data(), with([](auto& s) { s.kind = 1; })), Error);
  EXPECT_THROW(paged.step(a.data(), nullptr, nullptr, ok), Error);
  EXPECT_THROW(paged.step(a.data(), nullptr, b.data(), with([](auto& s) { s.t = 0; })), Error);
  PagedAdamState empty(ctx, 0);
  EXPECT_EQ(empty.device_bytes(), 0u);
  EXPECT_NO_THROW(empty.step(nullptr, nullptr, nullptr, ok));
  ctx.synchronize();
  QLORA_CUDA_CHECK(cudaDeviceSynchronize());
}

#else  // !QLORA_HAVE_CUDA: the same test names, skipping, so a CPU-only build reports them.

TEST(CudaOptim, StepEqualsCpuOptimizerBitForBit) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaOptim, OptionalOutputsAreOptional) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaOptim, SumSquaresIsDeterministicAndWithinDoubleRounding) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaOptim, ScaleInplaceEqualsCpuClipBitForBit) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaOptim, PagedStateEqualsDeviceStateAndCpuBitForBit) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaOptim, PagedStateContinuesFromRestoredHostState) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaOptim, RejectsInvalidArguments) {
  QLORA_REQUIRE_GPU();
}

#endif  // QLORA_HAVE_CUDA

}  // namespace
}  // namespace qlora
