// The frozen linear on the GPU (kernels/cuda/linear_cuda.h) against the fp32
// CPU op (kernels/ops.h), on one case list.
//
// LinearCases*: the CPU op on the cases, checked against double precision (and
// the comparison below checked on simulated wrong results). Every machine.
// CudaLinearHost*: the device-free parts of the CUDA API (the Auto rule, what
// each algorithm supports, the argument checks, the workspace). CUDA builds.
// CudaLinear*: every algorithm that supports a case, forward and backward
// (accumulating or not), against the CPU. Skip without a GPU.
//
// Inputs and weights are bf16-representable; a 4-bit weight is made by the
// CPU quantizer (quantize4_ref, double_quantize), so both sides start from the
// same codes and scales, and the GPU computes the CPU's fp32 weight values bit
// for bit (code * scale, one rounding; a double-quantized scale rounded after
// its multiply and after its add).
//
// The thresholds, for one output y = sum_k x_k w_k (+ bias, or + the previous
// dinp when accumulating), with S = sum_k |x_k w_k| (+ |bias| or |prev|) the
// size of its terms and K the length of the sum:
//  1. the GPU rounds y to bf16 once: at most half an ulp, 2^-8 |y| (bf16 has 8
//     significant bits).
//  2. both sides sum in fp32, in different orders. A sum of K terms in fp32 is
//     off by at most K 2^-24 S whatever the order (Higham's gamma_K; an FMA only
//     drops roundings; tensor cores add 16 exact bf16 products per rounding),
//     so the two differ by at most K 2^-23 S, which we double for the tensor
//     cores' internal alignment of those products (truncated below the ulp of
//     the largest): slack(K) = max(2^-12, K 2^-22) of S. The floor 2^-12 is
//     the fp32 allowance of the other CUDA op tests (tests/test_cuda_ops.cpp);
//     it binds up to K = 1024.
//  3. DequantGemm and Fused feed tensor cores bf16 operands, so each weight
//     w_k (fp32) becomes bf16(w_k): |bf16(w) - w| <= 2^-8 |w|, so y moves by up
//     to 2^-8 S. The Gemv multiplies the fp32 weight: no such term.
// Check A, against the CPU op: |gpu - cpu| <= 2^-8 |cpu| + (2^-8 if the
// weight is rounded) S + slack(K) S (second-order terms, 2^-16 S, fall in the slack).
// Check B, tighter, against a double-precision sum with the weights the GPU
// multiplies (bf16(w) when rounded, else w): |gpu - ref| <= 2^-8 |ref| +
// slack(K) S. A's weight term allows any error up to 2^-8 S; B pins the
// weight rounding to round-to-nearest of the CPU's fp32 value.
// Where terms cancel, |y| << S, so the bounds scale with S, not with |y|. A
// wrong row, a dropped chunk of K or a lost bias exceeds them (tested below).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "kernels/ops.h"
#include "op_cases.h"
#include "quant/blockwise.h"
#include "quant/dynamic_map.h"

#if QLORA_HAVE_CUDA
#include "kernels/cuda/context.h"
#include "kernels/cuda/device.h"
#include "kernels/cuda/linear_cuda.h"
#endif

#include "cuda_testing.h"
#include "testing.h"

namespace qlora {
namespace {

using testing::sz;

// ---- the cases ------------------------------------------------------------------------

struct LinearCase {
  int64_t N, IN, OUT, block;
  Quant4Type type;
  bool double_quant, dense, bias;
};

constexpr Quant4Type kNF4 = Quant4Type::NF4, kFP4 = Quant4Type::FP4;

// Tiles of the fused kernel are 64x64x64 and the GEMV takes up to 4 rows, so:
// N odd, across 1..4 and past whole 64-row tiles; OUT not a multiple of 64 or
// even of 8; IN a multiple of 64, or not (96, 200: flattened blocks straddle
// rows; 200 is not a multiple of 32, so no 16-byte code loads; 65 is odd, so
// rows start mid-byte and only DequantGemm and Gemv apply).
std::vector<LinearCase> linear_cases() {
  return {
      //  N,   IN,  OUT, block, type, dq,   dense, bias
      {1, 64, 200, 64, kNF4, true, false, true},
      {3, 128, 72, 64, kFP4, false, false, false},
      {17, 256, 1000, 128, kNF4, true, false, true},
      {130, 512, 200, 64, kNF4, true, false, false},  // 1600 blocks: 7 nested blocks
      {130, 192, 72, 32, kFP4, true, false, true},
      {4, 96, 72, 64, kNF4, false, false, true},
      {17, 200, 72, 128, kNF4, true, false, false},
      {5, 65, 33, 64, kNF4, false, false, true},
      {3, 65, 33, 32, kFP4, true, false, false},
      {2, 448, 136, 4096, kFP4, true, false, true},  // a block longer than a row
      {17, 320, 200, 64, kNF4, false, true, true},   // dense bf16 weights
      {1, 64, 1000, 64, kNF4, false, true, false},
      // 33.6M values > the 32M of one DequantGemm panel: two row panels (8192 + 8
      // rows) forward, two column panels (4088 + 8 columns) backward.
      {3, 4096, 8200, 64, kNF4, true, false, true},
  };
}

std::string describe(const LinearCase& c) {
  std::ostringstream os;
  os << "N " << c.N << " IN " << c.IN << " OUT " << c.OUT;
  if (c.dense) {
    os << " dense";
  } else {
    os << " " << quant4_name(c.type) << " block " << c.block << (c.double_quant ? " double-quant" : "");
  }
  if (c.bias) os << " bias";
  return os.str();
}

// A case's inputs, its weight (4-bit and dequantized) and the CPU op's outputs.
struct LinearRun {
  std::vector<float> x, dy, bias, prev;  // (N,IN), (N,OUT), (OUT) or empty, (N,IN): dinp before accumulating
  std::vector<float> w;                  // (OUT,IN): the fp32 values the op multiplies
  std::vector<uint8_t> codes;            // 4-bit only
  std::vector<float> absmax;             // plain scales (not double-quantized)
  std::optional<NestedAbsmax> nested;    // double-quantized scales
  std::vector<float> scales;             // fp32 scale per block either way
  std::vector<float> out, dinp;          // ops::linear_forward, ops::linear_backward
};

ops::LinearWeight cpu_weight(const LinearCase& c, const LinearRun& r) {
  ops::LinearWeight lw;
  lw.out = c.OUT;
  lw.in = c.IN;
  if (c.dense) {
    lw.dense = r.w.data();
  } else {
    lw.codes = r.codes.data();
    lw.absmax = r.scales.data();
    lw.block = c.block;
    lw.type = c.type;
  }
  return lw;
}

LinearRun linear_cpu(const LinearCase& c) {
  using op_cases::bf16_randn;
  const unsigned seed = unsigned(c.N * 7 + c.IN * 131 + c.OUT * 17);
  LinearRun r;
  r.x = bf16_randn(c.N * c.IN, seed, 1.0f);
  r.dy = bf16_randn(c.N * c.OUT, seed + 1, 1.0f);
  if (c.bias) r.bias = bf16_randn(c.OUT, seed + 2, 0.5f);
  r.prev = bf16_randn(c.N * c.IN, seed + 3, 0.5f);
  const int64_t n = c.OUT * c.IN;
  std::vector<float> raw = bf16_randn(n, seed + 4, 0.05f);
  if (c.dense) {
    r.w = std::move(raw);
  } else {
    const int64_t nblocks = quant4_num_blocks(n, c.block);
    r.codes.resize(sz(quant4_code_bytes(n)));
    std::vector<float> absmax(sz(nblocks));
    quantize4_ref(raw.data(), n, c.block, c.type, r.codes.data(), absmax.data());
    if (c.double_quant) {
      r.nested = double_quantize(absmax.data(), nblocks);
      r.scales.resize(sz(nblocks));
      double_dequantize(*r.nested, r.scales.data());
    } else {
      r.absmax = absmax;
      r.scales = absmax;
    }
    r.w.resize(sz(n));
    dequantize4_ref(r.codes.data(), r.scales.data(), n, c.block, c.type, r.w.data());
  }
  const ops::LinearWeight lw = cpu_weight(c, r);
  r.out.resize(sz(c.N * c.OUT));
  r.dinp.resize(sz(c.N * c.IN));
  ops::linear_forward(r.out.data(), r.x.data(), lw, c.bias ? r.bias.data() : nullptr, c.N);
  ops::linear_backward(r.dinp.data(), r.dy.data(), lw, c.N);
  return r;
}

// Double-precision sums for every output of a pass (see the top of the file).
struct Reference {
  std::vector<double> exact;    // with the fp32 weights
  std::vector<double> exact16;  // with each weight rounded to bf16
  std::vector<double> terms;    // S: sum of |x w| (+ |bias| or |prev|)
  int64_t K = 0;                // length of the sums
};

double bf16_round(float v) {
  return double(bf16_to_f32(f32_to_bf16(v)));
}

Reference forward_reference(const LinearCase& c, const LinearRun& r) {
  Reference ref{std::vector<double>(sz(c.N * c.OUT)), std::vector<double>(sz(c.N * c.OUT)),
                std::vector<double>(sz(c.N * c.OUT)), c.IN};
  for (int64_t i = 0; i < c.N; ++i)
    for (int64_t o = 0; o < c.OUT; ++o) {
      const float* x = r.x.data() + i * c.IN;
      const float* w = r.w.data() + o * c.IN;
      double s = 0.0, s16 = 0.0, t = 0.0;
      for (int64_t k = 0; k < c.IN; ++k) {
        s += double(x[k]) * w[k];
        s16 += double(x[k]) * bf16_round(w[k]);
        t += std::abs(double(x[k]) * w[k]);
      }
      const double b = c.bias ? double(r.bias[sz(o)]) : 0.0;
      const size_t e = sz(i * c.OUT + o);
      ref.exact[e] = s + b;
      ref.exact16[e] = s16 + b;
      ref.terms[e] = t + std::abs(b);
    }
  return ref;
}

// dinp = dout W (+ prev when accumulating).
Reference backward_reference(const LinearCase& c, const LinearRun& r, bool accumulate) {
  Reference ref{std::vector<double>(sz(c.N * c.IN)), std::vector<double>(sz(c.N * c.IN)),
                std::vector<double>(sz(c.N * c.IN)), c.OUT};
  for (int64_t i = 0; i < c.N; ++i) {
    double* s = ref.exact.data() + i * c.IN;
    double* s16 = ref.exact16.data() + i * c.IN;
    double* t = ref.terms.data() + i * c.IN;
    for (int64_t o = 0; o < c.OUT; ++o) {
      const double a = r.dy[sz(i * c.OUT + o)];
      const float* w = r.w.data() + o * c.IN;
      for (int64_t k = 0; k < c.IN; ++k) {
        s[k] += a * w[k];
        s16[k] += a * bf16_round(w[k]);
        t[k] += std::abs(a * w[k]);
      }
    }
    if (accumulate)
      for (int64_t k = 0; k < c.IN; ++k) {
        const double p = r.prev[sz(i * c.IN + k)];
        s[k] += p;
        s16[k] += p;
        t[k] += std::abs(p);
      }
  }
  return ref;
}

// ---- the comparison of a GPU result ------------------------------------------------------

constexpr double kBf16HalfUlp = 1.0 / 256;  // 2^-8: one rounding to bf16, relative

double fp32_slack(int64_t K) {
  return std::max(1.0 / 4096, double(K) * std::ldexp(1.0, -22));
}

// Checks A and B of the top of the file on every element (NaN fails both).
// `cpu` is the CPU op's result (plus prev when accumulating).
::testing::AssertionResult matches_within_bf16(const std::vector<float>& gpu, const std::vector<double>& cpu,
                                               const Reference& ref, bool weight_rounded) {
  if (gpu.size() != cpu.size() || gpu.size() != ref.exact.size())
    return ::testing::AssertionFailure() << "sizes differ: gpu " << gpu.size() << ", cpu " << cpu.size();
  const double slack = fp32_slack(ref.K);
  const std::vector<double>& tight = weight_rounded ? ref.exact16 : ref.exact;
  for (size_t i = 0; i < gpu.size(); ++i) {
    const double g = gpu[i], S = ref.terms[i];
    const double tol_a =
        kBf16HalfUlp * std::abs(cpu[i]) + (weight_rounded ? kBf16HalfUlp : 0.0) * S + slack * S;
    const double tol_b = kBf16HalfUlp * std::abs(tight[i]) + slack * S;
    if (!std::isfinite(g) || !(std::abs(g - cpu[i]) <= tol_a + 1e-37) ||
        !(std::abs(g - tight[i]) <= tol_b + 1e-37))
      return ::testing::AssertionFailure()
             << "first difference at " << i << ": gpu " << g << ", cpu " << cpu[i] << " (allowed " << tol_a
             << "), double with the multiplied weights " << tight[i] << " (allowed " << tol_b << ")";
  }
  return ::testing::AssertionSuccess();
}

std::vector<double> widen(const std::vector<float>& v) {
  return std::vector<double>(v.begin(), v.end());
}

// What a correct GPU would return: the tight reference rounded to bf16.
std::vector<float> rounded(const std::vector<double>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = bf16_to_f32(f32_to_bf16(float(v[i])));
  return out;
}

// ---- CPU side (every machine) ------------------------------------------------------------

// |cpu - exact| <= gamma_{K+1} S: the CPU's fp32 sums of K products plus the
// bias, in any order (sgemm blocks, the fused loop's 8 lanes).
TEST(LinearCases, CpuForwardAndBackwardMatchDouble) {
  for (const LinearCase& c : linear_cases()) {
    const std::string what = describe(c);
    const LinearRun r = linear_cpu(c);
    const Reference fwd = forward_reference(c, r);
    for (size_t i = 0; i < r.out.size(); ++i)
      ASSERT_NEAR(r.out[i], fwd.exact[i], double(c.IN + 2) * std::ldexp(fwd.terms[i], -24) + 1e-37)
          << what << " forward at " << i;
    const Reference bwd = backward_reference(c, r, false);
    for (size_t i = 0; i < r.dinp.size(); ++i)
      ASSERT_NEAR(r.dinp[i], bwd.exact[i], double(c.OUT + 2) * std::ldexp(bwd.terms[i], -24) + 1e-37)
          << what << " backward at " << i;
  }
}

// The op's own dequantization (what it multiplies) is the quantizer's, bit for bit.
TEST(LinearCases, CpuWeightRowsEqualTheReferenceDequantization) {
  for (const LinearCase& c : linear_cases()) {
    if (c.dense) continue;
    const LinearRun r = linear_cpu(c);
    std::vector<float> rows(r.w.size());
    ops::linear_rows_fp32(rows.data(), cpu_weight(c, r), 0, c.OUT);
    ASSERT_EQ(0, std::memcmp(rows.data(), r.w.data(), rows.size() * sizeof(float))) << describe(c);
  }
}

// The GPU comparison accepts what a correct kernel returns and rejects the
// mistakes a kernel makes first.
TEST(LinearCases, ComparisonAcceptsCorrectAndRejectsWrongResults) {
  for (const LinearCase& c : linear_cases()) {
    if (c.OUT * c.IN > (int64_t(1) << 20)) continue;  // the small cases are enough here
    const std::string what = describe(c);
    const LinearRun r = linear_cpu(c);
    const Reference fwd = forward_reference(c, r);
    const std::vector<double> cpu = widen(r.out);
    EXPECT_TRUE(matches_within_bf16(rounded(fwd.exact16), cpu, fwd, true)) << what;
    EXPECT_TRUE(matches_within_bf16(rounded(fwd.exact), cpu, fwd, false)) << what;

    // The neighbouring weight row: every output of row o computed with row o+1.
    std::vector<double> shifted(fwd.exact16.size());
    for (int64_t i = 0; i < c.N; ++i)
      for (int64_t o = 0; o < c.OUT; ++o)
        shifted[sz(i * c.OUT + o)] = fwd.exact16[sz(i * c.OUT + (o + 1) % c.OUT)];
    EXPECT_FALSE(matches_within_bf16(rounded(shifted), cpu, fwd, true)) << what << " wrong row";

    // One 32-value chunk of K dropped (a vector load that was skipped).
    std::vector<double> dropped = fwd.exact16;
    for (int64_t i = 0; i < c.N; ++i)
      for (int64_t o = 0; o < c.OUT; ++o)
        for (int64_t k = 0; k < std::min<int64_t>(32, c.IN); ++k)
          dropped[sz(i * c.OUT + o)] -= double(r.x[sz(i * c.IN + k)]) * bf16_round(r.w[sz(o * c.IN + k)]);
    EXPECT_FALSE(matches_within_bf16(rounded(dropped), cpu, fwd, true)) << what << " dropped chunk";

    if (c.bias) {
      std::vector<double> no_bias = fwd.exact16;
      for (size_t e = 0; e < no_bias.size(); ++e) no_bias[e] -= r.bias[e % sz(c.OUT)];
      EXPECT_FALSE(matches_within_bf16(rounded(no_bias), cpu, fwd, true)) << what << " bias lost";
    }

    // A NaN left in an unwritten element.
    std::vector<float> hole = rounded(fwd.exact16);
    hole.back() = std::nanf("");
    EXPECT_FALSE(matches_within_bf16(hole, cpu, fwd, true)) << what << " unwritten element";
  }
}

#if QLORA_HAVE_CUDA

using cuda_ops::CudaLinearWeight;
using cuda_ops::LinearAlgo;
using cuda_ops::LinearPass;

// ---- device-free parts of the CUDA API (every CUDA build) -----------------------------------

// A weight whose pointers are valid-looking host addresses: the checks and
// rules below never dereference them.
struct FakeWeight {
  uint16_t dense_bits[4] = {};
  uint8_t codes[4] = {};
  float absmax[4] = {};
  uint8_t absmax8[4] = {};
  float nested[4] = {};
  float code8[4] = {};

  CudaLinearWeight quantized(int64_t out, int64_t in, bool double_quant = false) const {
    CudaLinearWeight w;
    w.out = out;
    w.in = in;
    w.codes = codes;
    if (double_quant) {
      w.absmax8 = absmax8;
      w.nested_absmax = nested;
      w.code8 = code8;
    } else {
      w.absmax = absmax;
    }
    return w;
  }
  CudaLinearWeight dense(int64_t out, int64_t in) const {
    CudaLinearWeight w;
    w.out = out;
    w.in = in;
    w.dense = dense_bits;
    return w;
  }
};

TEST(CudaLinearHost, AutoPicksGemvThenFusedThenDequantGemm) {
  using cuda_ops::linear_algo_supports;
  using cuda_ops::linear_auto_algo;
  const FakeWeight f;
  const CudaLinearWeight q = f.quantized(4096, 4096, true), odd = f.quantized(4096, 4095),
                         d = f.dense(64, 64);
  for (int arch : {80, 86, 89, 90}) {
    EXPECT_EQ(linear_auto_algo(arch, q, 1, LinearPass::Forward), LinearAlgo::Gemv);
    EXPECT_EQ(linear_auto_algo(arch, q, 4, LinearPass::Forward), LinearAlgo::Gemv);
    EXPECT_EQ(linear_auto_algo(arch, q, 5, LinearPass::Forward), LinearAlgo::Fused);
    EXPECT_EQ(linear_auto_algo(arch, q, 1, LinearPass::Backward), LinearAlgo::Fused);
    EXPECT_EQ(linear_auto_algo(arch, q, 4096, LinearPass::Backward), LinearAlgo::Fused);
    EXPECT_EQ(linear_auto_algo(arch, odd, 5, LinearPass::Forward), LinearAlgo::DequantGemm);
    EXPECT_EQ(linear_auto_algo(arch, odd, 3, LinearPass::Forward), LinearAlgo::Gemv);
    EXPECT_EQ(linear_auto_algo(arch, d, 1, LinearPass::Forward), LinearAlgo::DequantGemm);
    EXPECT_EQ(linear_auto_algo(arch, d, 100, LinearPass::Backward), LinearAlgo::DequantGemm);
  }
  // No bf16 mma.sync below sm_80.
  EXPECT_EQ(linear_auto_algo(75, q, 100, LinearPass::Forward), LinearAlgo::DequantGemm);
  EXPECT_FALSE(linear_algo_supports(75, LinearAlgo::Fused, q, 100, LinearPass::Forward));

  for (LinearPass pass : {LinearPass::Forward, LinearPass::Backward}) {
    EXPECT_TRUE(linear_algo_supports(90, LinearAlgo::Auto, d, 7, pass));
    EXPECT_TRUE(linear_algo_supports(90, LinearAlgo::DequantGemm, odd, 7, pass));
    EXPECT_FALSE(linear_algo_supports(90, LinearAlgo::Fused, odd, 7, pass));
    EXPECT_FALSE(linear_algo_supports(90, LinearAlgo::Fused, d, 7, pass));
    EXPECT_FALSE(linear_algo_supports(90, LinearAlgo::Gemv, d, 1, pass));
  }
  EXPECT_FALSE(linear_algo_supports(90, LinearAlgo::Gemv, q, 1, LinearPass::Backward));
  EXPECT_FALSE(linear_algo_supports(90, LinearAlgo::Gemv, q, 5, LinearPass::Forward));
  // Column tiles of C go to gridDim.y (<= 65535 tiles of 64).
  EXPECT_FALSE(
      linear_algo_supports(90, LinearAlgo::Fused, f.quantized(65535 * 64 + 1, 64), 7, LinearPass::Forward));
  EXPECT_TRUE(
      linear_algo_supports(90, LinearAlgo::Fused, f.quantized(65535 * 64 + 1, 64), 7, LinearPass::Backward));

  EXPECT_STREQ(cuda_ops::linear_algo_name(LinearAlgo::Auto), "auto");
  EXPECT_STREQ(cuda_ops::linear_algo_name(LinearAlgo::DequantGemm), "dequant_gemm");
  EXPECT_STREQ(cuda_ops::linear_algo_name(LinearAlgo::Fused), "fused");
  EXPECT_STREQ(cuda_ops::linear_algo_name(LinearAlgo::Gemv), "gemv");
}

TEST(CudaLinearHost, WorkspaceIsOneBf16PanelOfAtMost64MiB) {
  const FakeWeight f;
  EXPECT_EQ(cuda_ops::linear_workspace_bytes(f.dense(4096, 4096), 512), 0u);
  // A small layer: the whole of W.
  EXPECT_EQ(cuda_ops::linear_workspace_bytes(f.quantized(200, 64), 17), size_t(200 * 64 * 2));
  const size_t cap = size_t(64) << 20;
  for (auto [out, in] : {std::pair<int64_t, int64_t>{4096, 4096},
                         {8200, 4096},
                         {28672, 8192},
                         {8192, 28672},
                         {128256, 8192}}) {
    const size_t bytes = cuda_ops::linear_workspace_bytes(f.quantized(out, in, true), 4096);
    EXPECT_LE(bytes, cap) << out << " x " << in;
    EXPECT_GE(bytes, std::min(cap, size_t(out * in * 2)) - size_t(2 * std::max(out, in) * 8))
        << out << " x " << in;
  }
}

// Every check runs on the host before the device is touched.
TEST(CudaLinearHost, ChecksArgumentsWithoutTheDevice) {
  using cuda_ops::linear_check_args;
  const FakeWeight f;
  uint16_t buf[4] = {};
  const CudaLinearWeight q = f.quantized(72, 64), dq = f.quantized(72, 64, true);
  for (LinearPass pass : {LinearPass::Forward, LinearPass::Backward}) {
    const std::string op =
        pass == LinearPass::Forward ? "cuda_ops::linear_forward" : "cuda_ops::linear_backward";
    auto throws_naming_op = [&](const CudaLinearWeight& w, const void* dst, const void* src, int64_t N,
                                const char* what) {
      try {
        linear_check_args(pass, dst, src, w, N);
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find(op), std::string::npos) << what << ": " << e.what();
        EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << what << ": " << e.what();
        return;
      }
      ADD_FAILURE() << op << " accepted " << what;
    };
    EXPECT_NO_THROW(linear_check_args(pass, buf, buf, q, 3));
    EXPECT_NO_THROW(linear_check_args(pass, buf, buf, dq, 3));
    EXPECT_NO_THROW(linear_check_args(pass, buf, buf, f.dense(72, 64), 3));
    EXPECT_NO_THROW(linear_check_args(pass, nullptr, nullptr, q, 0));  // nothing to do

    throws_naming_op(q, buf, buf, -1, "N");
    CudaLinearWeight bad = q;
    bad.out = 0;
    throws_naming_op(bad, buf, buf, 3, "shape");
    bad = q;
    bad.in = -64;
    throws_naming_op(bad, buf, buf, 3, "shape");
    bad = q;
    bad.block = 48;
    throws_naming_op(bad, buf, buf, 3, "block size 48");
    bad = q;
    bad.block = 8192;
    throws_naming_op(bad, buf, buf, 3, "block size 8192");
    bad = q;
    bad.type = static_cast<Quant4Type>(7);
    throws_naming_op(bad, buf, buf, 3, "type");
    bad = dq;
    bad.nested_block = 0;
    throws_naming_op(bad, buf, buf, 3, "nested block");
    bad = q;
    bad.codes = nullptr;
    throws_naming_op(bad, buf, buf, 3, "w.codes");
    bad = q;
    bad.absmax = nullptr;
    throws_naming_op(bad, buf, buf, 3, "w.absmax");
    bad = dq;
    bad.code8 = nullptr;
    throws_naming_op(bad, buf, buf, 3, "w.code8");
    bad = dq;
    bad.nested_absmax = nullptr;
    throws_naming_op(bad, buf, buf, 3, "w.nested_absmax");
    throws_naming_op(q, nullptr, buf, 3, pass == LinearPass::Forward ? "out" : "dinp");
    throws_naming_op(q, buf, nullptr, 3, pass == LinearPass::Forward ? "inp" : "dout");
  }
}

// ---- GPU against CPU -------------------------------------------------------------------------

constexpr size_t kSentinel = 64;  // poisoned elements after each output: an overrun writes them

using testing::to_bits;
using testing::upload;

// The weight of a case on the device, and the CudaLinearWeight that views it.
struct DeviceWeight {
  DeviceBuffer<uint16_t> dense;
  DeviceBuffer<uint8_t> codes, absmax8;
  DeviceBuffer<float> absmax, nested, code8;
  CudaLinearWeight view;
};

DeviceWeight upload_weight(const LinearCase& c, const LinearRun& r) {
  DeviceWeight d;
  d.view.out = c.OUT;
  d.view.in = c.IN;
  if (c.dense) {
    d.dense = upload(to_bits(r.w));
    d.view.dense = d.dense.data();
    return d;
  }
  d.codes = upload(r.codes);
  d.view.codes = d.codes.data();
  d.view.block = c.block;
  d.view.type = c.type;
  if (r.nested) {
    const auto& map = dynamic_map_signed();
    d.absmax8 = upload(r.nested->codes);
    d.nested = upload(r.nested->nested_absmax);
    d.code8 = upload(r.nested->code8.empty() ? std::vector<float>(map.begin(), map.end()) : r.nested->code8);
    d.view.absmax8 = d.absmax8.data();
    d.view.nested_absmax = d.nested.data();
    d.view.code8 = d.code8.data();
    d.view.offset = r.nested->offset;
    d.view.nested_block = r.nested->nested_block;
  } else {
    d.absmax = upload(r.absmax);
    d.view.absmax = d.absmax.data();
  }
  return d;
}

// An output buffer of n bf16 values plus the sentinel, all NaN (0xffff), or
// holding `init` (bits) before the sentinel.
DeviceBuffer<uint16_t> output_buffer(size_t n, const std::vector<uint16_t>* init = nullptr) {
  DeviceBuffer<uint16_t> d(n + kSentinel);
  QLORA_CUDA_CHECK(cudaMemset(d.data(), 0xff, d.bytes()));
  if (init != nullptr) d.upload(init->data(), init->size());
  return d;
}

// Downloads n values (widened exactly); fails the test if the sentinel was written.
std::vector<float> download_output(CudaContext& ctx, const DeviceBuffer<uint16_t>& d, size_t n,
                                   const std::string& what) {
  ctx.synchronize();
  std::vector<uint16_t> h(d.size());
  d.download(h.data(), h.size());
  for (size_t i = n; i < h.size(); ++i) EXPECT_EQ(h[i], 0xffffu) << what << ": write past the end at " << i;
  std::vector<float> f(n);
  for (size_t i = 0; i < n; ++i) f[i] = bf16_to_f32(h[i]);
  return f;
}

constexpr LinearAlgo kAllAlgos[] = {LinearAlgo::Auto, LinearAlgo::DequantGemm, LinearAlgo::Fused,
                                    LinearAlgo::Gemv};

TEST(CudaLinear, ForwardMatchesCpuWithinBf16) {
  QLORA_REQUIRE_GPU();
  CudaContext ctx;
  int ran[4] = {};
  for (const LinearCase& c : linear_cases()) {
    const LinearRun r = linear_cpu(c);
    const Reference ref = forward_reference(c, r);
    const std::vector<double> cpu = widen(r.out);
    DeviceWeight dw = upload_weight(c, r);
    auto d_x = upload(to_bits(r.x));
    DeviceBuffer<uint16_t> d_bias;
    if (c.bias) d_bias = upload(to_bits(r.bias));
    ctx.workspace(cuda_ops::linear_workspace_bytes(dw.view, c.N));  // sized up front, as a run does
    for (LinearAlgo algo : kAllAlgos) {
      if (!cuda_ops::linear_algo_supports(ctx, algo, dw.view, c.N)) continue;
      const LinearAlgo runs = algo == LinearAlgo::Auto
                                  ? cuda_ops::linear_auto_algo(ctx.arch(), dw.view, c.N, LinearPass::Forward)
                                  : algo;
      const std::string what = describe(c) + " forward " + cuda_ops::linear_algo_name(algo);
      auto d_out = output_buffer(r.out.size());
      cuda_ops::linear_forward(ctx, d_out.data(), d_x.data(), dw.view, c.bias ? d_bias.data() : nullptr, c.N,
                               algo);
      const auto got = download_output(ctx, d_out, r.out.size(), what);
      EXPECT_TRUE(matches_within_bf16(got, cpu, ref, runs != LinearAlgo::Gemv)) << what;
      ++ran[int(algo)];
    }
  }
  // Every algorithm met several cases (Gemv: N <= 4 on a 4-bit weight).
  for (LinearAlgo algo : kAllAlgos) EXPECT_GE(ran[int(algo)], 5) << cuda_ops::linear_algo_name(algo);
}

TEST(CudaLinear, BackwardMatchesCpuWithinBf16) {
  QLORA_REQUIRE_GPU();
  CudaContext ctx;
  int ran[4] = {};
  for (const LinearCase& c : linear_cases()) {
    const LinearRun r = linear_cpu(c);
    DeviceWeight dw = upload_weight(c, r);
    auto d_dy = upload(to_bits(r.dy));
    const std::vector<uint16_t> prev_bits = to_bits(r.prev);
    ctx.workspace(cuda_ops::linear_workspace_bytes(dw.view, c.N));
    for (bool accumulate : {false, true}) {
      const Reference ref = backward_reference(c, r, accumulate);
      std::vector<double> cpu = widen(r.dinp);
      if (accumulate)
        for (size_t i = 0; i < cpu.size(); ++i) cpu[i] += r.prev[i];
      for (LinearAlgo algo : kAllAlgos) {
        if (!cuda_ops::linear_algo_supports(ctx.arch(), algo, dw.view, c.N, LinearPass::Backward)) continue;
        const std::string what =
            describe(c) + " backward " + cuda_ops::linear_algo_name(algo) + (accumulate ? " accumulate" : "");
        auto d_dinp = output_buffer(r.dinp.size(), accumulate ? &prev_bits : nullptr);
        cuda_ops::linear_backward(ctx, d_dinp.data(), d_dy.data(), dw.view, c.N, accumulate, algo);
        const auto got = download_output(ctx, d_dinp, r.dinp.size(), what);
        // No backward algorithm multiplies fp32 weights: all round them to bf16.
        EXPECT_TRUE(matches_within_bf16(got, cpu, ref, true)) << what;
        ++ran[int(algo)];
      }
    }
  }
  EXPECT_GE(ran[int(LinearAlgo::Auto)], 20);
  EXPECT_GE(ran[int(LinearAlgo::DequantGemm)], 20);
  EXPECT_GE(ran[int(LinearAlgo::Fused)], 10);
  EXPECT_EQ(ran[int(LinearAlgo::Gemv)], 0);
}

TEST(CudaLinear, RejectsUnsupportedAlgorithmsAndBadArguments) {
  QLORA_REQUIRE_GPU();
  CudaContext ctx;
  auto expect_error = [](auto&& call, const char* part) {
    try {
      call();
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
      return;
    }
    ADD_FAILURE() << "no error mentioning " << part;
  };
  for (const LinearCase& c : {LinearCase{5, 65, 33, 64, kNF4, false, false, true},
                              LinearCase{17, 320, 200, 64, kNF4, false, true, true}}) {
    const LinearRun r = linear_cpu(c);
    DeviceWeight dw = upload_weight(c, r);
    DeviceBuffer<uint16_t> x(r.x.size()), y(r.out.size() + r.dinp.size());
    // Fused: needs a 4-bit weight with IN even. Gemv: forward only, N <= 4, 4-bit.
    expect_error(
        [&] { cuda_ops::linear_forward(ctx, y.data(), x.data(), dw.view, nullptr, c.N, LinearAlgo::Fused); },
        "fused");
    expect_error(
        [&] { cuda_ops::linear_backward(ctx, y.data(), x.data(), dw.view, c.N, false, LinearAlgo::Fused); },
        "fused");
    expect_error(
        [&] { cuda_ops::linear_forward(ctx, y.data(), x.data(), dw.view, nullptr, c.N, LinearAlgo::Gemv); },
        "gemv");
    expect_error(
        [&] { cuda_ops::linear_backward(ctx, y.data(), x.data(), dw.view, 1, false, LinearAlgo::Gemv); },
        "gemv");
    expect_error([&] { cuda_ops::linear_forward(ctx, y.data(), nullptr, dw.view, nullptr, c.N); },
                 "cuda_ops::linear_forward");
    expect_error([&] { cuda_ops::linear_backward(ctx, nullptr, x.data(), dw.view, c.N); },
                 "cuda_ops::linear_backward");
    EXPECT_NO_THROW(cuda_ops::linear_forward(ctx, nullptr, nullptr, dw.view, nullptr, 0));
    EXPECT_NO_THROW(cuda_ops::linear_backward(ctx, nullptr, nullptr, dw.view, 0, true));
  }
  ctx.synchronize();
}

#else  // !QLORA_HAVE_CUDA: the same test names, skipping, so a CPU-only build reports them.

TEST(CudaLinearHost, AutoPicksGemvThenFusedThenDequantGemm) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaLinearHost, WorkspaceIsOneBf16PanelOfAtMost64MiB) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaLinearHost, ChecksArgumentsWithoutTheDevice) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaLinear, ForwardMatchesCpuWithinBf16) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaLinear, BackwardMatchesCpuWithinBf16) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaLinear, RejectsUnsupportedAlgorithmsAndBadArguments) {
  QLORA_REQUIRE_GPU();
}

#endif

}  // namespace
}  // namespace qlora
