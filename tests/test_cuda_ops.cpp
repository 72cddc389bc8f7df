// The first CUDA ops (kernels/cuda/ops_cuda.h) against the fp32 CPU reference
// (kernels/ops.h), on the shared cases of tests/op_cases.h.
//
// OpCases*: the CPU ops on those cases, checked against double-precision
// mathematics (and finite differences for the backward passes). They run on
// every machine, so the cases the GPU tests use are known to be sound.
//
// CudaOps*: both backends on the same bf16-representable inputs. The GPU
// keeps activations in bf16 and computes in fp32, so it cannot match bit for
// bit; the thresholds follow from where the two differ:
//  1. the GPU rounds each output to bf16 once, to nearest even. bf16 has 8
//     significant bits, so one rounding moves a value v by at most half an
//     ulp, 2^-8 |v| (relative, over the whole normal range, which bf16 shares
//     with fp32): the term 2^-8 |cpu|.
//  2. before that rounding, both sides compute in fp32 but not identically:
//     sums in another order (thread-strided partials and a tree against the
//     CPU's sequential double sum), expf against std::exp (2 ulp), and FMA
//     contraction (nvcc contracts by default, the CPU is built with
//     -ffp-contract=off). These are a few to a few hundred fp32 ulps (2^-24
//     each) of the magnitudes involved: the term 2^-12 * scale, where scale is
//     the size of the terms that make up the value (not the value itself:
//     where terms cancel, as in RMSNorm's backward or a rotation, the error is
//     relative to the terms). 2^-12 leaves 4096 fp32 ulps of slack: loose
//     enough never to flake on a reordering, tight enough that a wrong index,
//     a missing term or a double rounding through bf16 (another 2^-8) fails.
// The embedding is a copy, so it must be bit for bit equal.
// DoRA (CudaOps.Dora*) has its own, tighter thresholds, derived there.
//
// Without a CUDA build or a usable GPU the CudaOps tests skip.
#include <gtest/gtest.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "kernels/ops.h"
#include "op_cases.h"
#include "plan/cuda_constants.h"
#include "testing.h"

#if QLORA_HAVE_CUDA
#include "kernels/cuda/context.h"
#include "kernels/cuda/device.h"
#include "kernels/cuda/dora_cuda.h"
#include "kernels/cuda/ops_cuda.h"
#endif

#include "cuda_testing.h"

namespace qlora {
namespace {

using namespace op_cases;

using testing::sz;

// ---- CPU reference on the shared cases ---------------------------------------------

TEST(OpCases, RmsnormForwardHasUnitRmsBeforeTheWeight) {
  for (const RmsnormCase& c : rmsnorm_cases()) {
    const std::string what = describe("rmsnorm", c);
    const auto [x, w, dy, out, rstd, dx] = rmsnorm_cpu(c);
    for (int64_t i = 0; i < c.N; ++i) {
      double ms = 0.0;
      for (int64_t j = 0; j < c.C; ++j) ms += double(x[sz(i * c.C + j)]) * x[sz(i * c.C + j)];
      ms /= double(c.C);
      const double r = 1.0 / std::sqrt(ms + double(c.eps));
      ASSERT_NEAR(rstd[sz(i)], r, 1e-6 * r) << what << " row " << i;
      // out / weight = x * rstd, whose RMS is sqrt(ms / (ms + eps)): 1 but for eps.
      double ms_hat = 0.0;
      for (int64_t j = 0; j < c.C; ++j) {
        const double xhat = double(out[sz(i * c.C + j)]) / w[sz(j)];
        ASSERT_NEAR(xhat, x[sz(i * c.C + j)] * r, 1e-6 * std::abs(x[sz(i * c.C + j)] * r) + 1e-30) << what;
        ms_hat += xhat * xhat;
      }
      ASSERT_NEAR(std::sqrt(ms_hat / double(c.C)), std::sqrt(ms / (ms + double(c.eps))), 1e-5) << what;
    }
  }
}

// Central differences of L = sum(dout * rmsnorm(x)) in double.
TEST(OpCases, RmsnormBackwardMatchesFiniteDifferences) {
  for (const RmsnormCase& c : rmsnorm_cases()) {
    const std::string what = describe("rmsnorm backward", c);
    const auto [x, w, dy, out, rstd, dx] = rmsnorm_cpu(c);
    for (int64_t i = 0; i < c.N; ++i) {
      std::vector<double> xr(x.begin() + i * c.C, x.begin() + (i + 1) * c.C);
      // The bindings by init-capture: clang 14 cannot capture a structured binding.
      auto loss = [&, &dyv = dy, &wv = w] {
        double ms = 0.0;
        for (double v : xr) ms += v * v;
        const double r = 1.0 / std::sqrt(ms / double(c.C) + double(c.eps));
        double l = 0.0;
        for (int64_t j = 0; j < c.C; ++j) l += double(dyv[sz(i * c.C + j)]) * wv[sz(j)] * xr[sz(j)] * r;
        return l;
      };
      // dx = r (w dy - xhat m) cancels (fully for C = 1): the fp32 result is
      // good to a few ulps of its terms, r max|w dy|, not of itself.
      double gmax = 0.0, terms = 0.0;
      for (int64_t j = 0; j < c.C; ++j) {
        gmax = std::max(gmax, double(std::abs(dx[sz(i * c.C + j)])));
        terms = std::max(terms, std::abs(double(w[sz(j)]) * dy[sz(i * c.C + j)]) * rstd[sz(i)]);
      }
      // A handful of channels per row: the first, the last and a stride between.
      for (int64_t j = 0; j < c.C; j += std::max<int64_t>(1, c.C / 7)) {
        for (int64_t jj : {j, c.C - 1}) {
          const double h = 1e-4 * std::max(1e-3, std::abs(xr[sz(jj)]));
          const double x0 = xr[sz(jj)];
          xr[sz(jj)] = x0 + h;
          const double lp = loss();
          xr[sz(jj)] = x0 - h;
          const double lm = loss();
          xr[sz(jj)] = x0;
          ASSERT_NEAR(dx[sz(i * c.C + jj)], (lp - lm) / (2 * h), 1e-4 * gmax + 1e-5 * terms)
              << what << " row " << i << " channel " << jj;
        }
      }
    }
  }
}

double silu(double g) {
  return g / (1.0 + std::exp(-g));
}

TEST(OpCases, SwigluMatchesDoubleAndFiniteDifferences) {
  for (const SwigluCase& c : swiglu_cases()) {
    const std::string what = describe("swiglu", c);
    const auto [g, u, dy, out, dg, du] = swiglu_cpu(c);
    for (size_t i = 0; i < sz(c.n); ++i) {
      const double want = silu(g[i]) * u[i];
      ASSERT_NEAR(out[i], want, 1e-6 * std::abs(want) + 1e-37) << what << " at " << i;
      ASSERT_NEAR(du[i], dy[i] * silu(g[i]), 1e-6 * std::abs(dy[i] * silu(g[i])) + 1e-37)
          << what << " at " << i;
      const double h = 1e-5 * std::max(1.0, std::abs(double(g[i])));
      const double fd = dy[i] * u[i] * (silu(g[i] + h) - silu(g[i] - h)) / (2 * h);
      // The derivative's terms, s and g*s*(1-s), are at most ~1.1 + |g|/4 in size.
      ASSERT_NEAR(dg[i], fd, 1e-5 * std::abs(double(dy[i]) * u[i]) * (1.0 + std::abs(g[i])))
          << what << " at " << i;
    }
  }
}

TEST(OpCases, RopeRotatesPairsAndBackwardInvertsIt) {
  for (const RopeCase& c : rope_cases()) {
    const std::string what = describe("rope", c);
    const RopeTables t = rope_tables_for(c.P, c.D);
    const int64_t half = c.D / 2, n = c.N * c.NH * c.D;
    const auto x = bf16_randn(n, 9, c.scale);
    auto pos = uniform_ids(c.N, 10, c.P);
    pos.back() = static_cast<int32_t>(c.P - 1);  // the last table row is reached
    std::vector<float> y = x;
    ops::rope_forward(y.data(), pos.data(), t.cos.data(), t.sin.data(), c.N, c.NH, c.D);
    for (int64_t i = 0; i < c.N; ++i)
      for (int64_t h = 0; h < c.NH; ++h)
        for (int64_t j = 0; j < half; ++j) {
          const size_t a = sz((i * c.NH + h) * c.D + j), b = a + sz(half);
          // The table entry is cos/sin of float(p) * inv_freq in fp32 (a few ulps off double).
          const double ang = double(float(pos[sz(i)]) * t.inv_freq[sz(j)]);
          const double co = std::cos(ang), si = std::sin(ang);
          const double mag = std::abs(x[a]) + std::abs(x[b]);
          ASSERT_NEAR(y[a], x[a] * co - x[b] * si, 1e-5 * mag + 1e-30)
              << what << " token " << i << " j " << j;
          ASSERT_NEAR(y[b], x[b] * co + x[a] * si, 1e-5 * mag + 1e-30)
              << what << " token " << i << " j " << j;
        }
    std::vector<float> back = y;
    ops::rope_backward(back.data(), pos.data(), t.cos.data(), t.sin.data(), c.N, c.NH, c.D);
    for (size_t k = 0; k < x.size(); ++k) ASSERT_NEAR(back[k], x[k], 1e-5 * c.scale) << what << " at " << k;
  }
}

TEST(OpCases, EmbeddingCopiesRowsAndRejectsOutOfRangeTokens) {
  for (const EmbeddingCase& c : embedding_cases()) {
    const std::string what = describe("embedding", c);
    const auto wte = bf16_randn(c.V * c.C, 11, 1.0f);
    const auto tok = uniform_ids(c.N, 12, c.V);
    std::vector<float> out(sz(c.N * c.C));
    ops::embedding_forward(out.data(), tok.data(), wte.data(), c.N, c.C, c.V);
    for (int64_t i = 0; i < c.N; ++i)
      ASSERT_TRUE(
          std::equal(out.begin() + i * c.C, out.begin() + (i + 1) * c.C, wte.begin() + tok[sz(i)] * c.C))
          << what << " row " << i;
    auto bad = tok;
    bad.back() = static_cast<int32_t>(c.V);
    EXPECT_THROW(ops::embedding_forward(out.data(), bad.data(), wte.data(), c.N, c.C, c.V), Error) << what;
  }
}

// ---- GPU against CPU ---------------------------------------------------------------

#if QLORA_HAVE_CUDA

using testing::download_bf16;
using testing::poisoned;
using testing::to_bits;
using testing::upload;

constexpr double kBf16HalfUlp = 1.0 / 256;  // 2^-8: one rounding to bf16 (see the top of the file)
constexpr double kFp32Slack = 1.0 / 4096;   // 2^-12 of the terms' size: fp32 order/FMA/expf differences

// |gpu - cpu| <= 2^-8 |cpu| + 2^-12 scale[i] for every i.
::testing::AssertionResult within_bf16(const std::vector<float>& cpu, const std::vector<float>& gpu,
                                       const std::vector<double>& scale) {
  if (cpu.size() != gpu.size())
    return ::testing::AssertionFailure() << "sizes differ: cpu " << cpu.size() << ", gpu " << gpu.size();
  for (size_t i = 0; i < cpu.size(); ++i) {
    const double tol = kBf16HalfUlp * std::abs(double(cpu[i])) + kFp32Slack * scale[i] + 1e-37;
    if (!(std::abs(double(gpu[i]) - cpu[i]) <= tol))
      return ::testing::AssertionFailure() << "first difference at " << i << ": cpu " << cpu[i] << ", gpu "
                                           << gpu[i] << ", allowed " << tol;
  }
  return ::testing::AssertionSuccess();
}

std::vector<double> abs_of(const std::vector<float>& v) {
  std::vector<double> a(v.size());
  for (size_t i = 0; i < v.size(); ++i) a[i] = std::abs(double(v[i]));
  return a;
}

TEST(CudaOps, RmsnormForwardMatchesCpuWithinBf16) {
  QLORA_REQUIRE_GPU();
  for (const RmsnormCase& c : rmsnorm_cases()) {
    const std::string what = describe("rmsnorm", c);
    const auto [x, w, dy, out, rstd, grad] = rmsnorm_cpu(c);

    auto dx = upload(to_bits(x)), dw = upload(to_bits(w));
    auto dout = poisoned<uint16_t>(sz(c.N * c.C));
    auto drstd = poisoned<float>(sz(c.N));
    cuda_ops::rmsnorm_forward(dout.data(), drstd.data(), dx.data(), dw.data(), c.N, c.C, c.eps);
    // out = w * x * rstd has no cancellation: the fp32 differences are relative to out itself.
    EXPECT_TRUE(within_bf16(out, download_bf16(dout), abs_of(out))) << what;
    std::vector<float> grstd(sz(c.N));
    drstd.download(grstd.data(), grstd.size());
    // rstd stays fp32 on both sides: only the order of the sum of squares differs.
    for (size_t i = 0; i < grstd.size(); ++i)
      EXPECT_NEAR(grstd[i], rstd[i], std::ldexp(rstd[i], -16)) << what;
  }
}

TEST(CudaOps, RmsnormBackwardMatchesCpuWithinBf16) {
  QLORA_REQUIRE_GPU();
  for (const RmsnormCase& c : rmsnorm_cases()) {
    const std::string what = describe("rmsnorm backward", c);
    const auto [x, w, dy, out, rstd, dx] = rmsnorm_cpu(c);

    // dx = r (w dy - xhat m) cancels: scale each element by its terms, r (|w dy| + |xhat| mean|w dy xhat|).
    std::vector<double> scale(dx.size());
    for (int64_t i = 0; i < c.N; ++i) {
      const double r = rstd[sz(i)];
      double mabs = 0.0;
      for (int64_t j = 0; j < c.C; ++j)
        mabs += std::abs(double(w[sz(j)]) * dy[sz(i * c.C + j)] * x[sz(i * c.C + j)] * r);
      mabs /= double(c.C);
      for (int64_t j = 0; j < c.C; ++j) {
        const size_t k = sz(i * c.C + j);
        scale[k] = r * (std::abs(double(w[sz(j)]) * dy[k]) + std::abs(x[k] * r) * mabs);
      }
    }
    auto d_x = upload(to_bits(x)), d_w = upload(to_bits(w)), d_dy = upload(to_bits(dy));
    auto d_rstd = upload(rstd);  // the CPU's saved rstd: this test isolates the backward
    auto d_dx = poisoned<uint16_t>(dx.size());
    cuda_ops::rmsnorm_backward(d_dx.data(), d_dy.data(), d_x.data(), d_w.data(), d_rstd.data(), c.N, c.C);
    EXPECT_TRUE(within_bf16(dx, download_bf16(d_dx), scale)) << what;
  }
}

TEST(CudaOps, SwigluMatchesCpuWithinBf16) {
  QLORA_REQUIRE_GPU();
  for (const SwigluCase& c : swiglu_cases()) {
    const std::string what = describe("swiglu", c);
    const auto [g, u, dy, out, dg, du] = swiglu_cpu(c);

    auto d_g = upload(to_bits(g)), d_u = upload(to_bits(u)), d_dy = upload(to_bits(dy));
    auto d_out = poisoned<uint16_t>(sz(c.n)), d_dg = poisoned<uint16_t>(sz(c.n)), d_du = poisoned<uint16_t>(sz(c.n));
    cuda_ops::swiglu_forward(d_out.data(), d_g.data(), d_u.data(), c.n);
    cuda_ops::swiglu_backward(d_dg.data(), d_du.data(), d_dy.data(), d_g.data(), d_u.data(), c.n);
    EXPECT_TRUE(within_bf16(out, download_bf16(d_out), abs_of(out))) << what << " out";
    EXPECT_TRUE(within_bf16(du, download_bf16(d_du), abs_of(du))) << what << " dup";
    // dgate = dy u s (1 + g (1 - s)): the bracket cancels near g = -1.28.
    std::vector<double> scale(dg.size());
    for (size_t i = 0; i < scale.size(); ++i) {
      const double s = 1.0 / (1.0 + std::exp(-double(g[i])));
      scale[i] = std::abs(double(dy[i]) * u[i] * s) * (1.0 + std::abs(g[i]) * (1.0 - s));
    }
    EXPECT_TRUE(within_bf16(dg, download_bf16(d_dg), scale)) << what << " dgate";
  }
}

TEST(CudaOps, RopeForwardAndBackwardMatchCpuWithinBf16) {
  QLORA_REQUIRE_GPU();
  for (const RopeCase& c : rope_cases()) {
    const std::string what = describe("rope", c);
    const RopeTables t = rope_tables_for(c.P, c.D);
    const int64_t half = c.D / 2, n = c.N * c.NH * c.D;
    const auto x = bf16_randn(n, 9, c.scale);
    auto pos = uniform_ids(c.N, 10, c.P);
    pos.back() = static_cast<int32_t>(c.P - 1);
    // A rotated value is x1 cos -+ x2 sin: its terms are at most |x1| + |x2| of its pair.
    std::vector<double> scale(x.size());
    for (int64_t r = 0; r < c.N * c.NH; ++r)
      for (int64_t j = 0; j < half; ++j) {
        const size_t a = sz(r * c.D + j), b = a + sz(half);
        scale[a] = scale[b] = std::abs(double(x[a])) + std::abs(double(x[b]));
      }
    auto d_pos = upload(pos);
    auto d_cos = upload(t.cos), d_sin = upload(t.sin);
    for (bool forward : {true, false}) {
      std::vector<float> want = x;
      auto d_x = upload(to_bits(x));
      if (forward) {
        ops::rope_forward(want.data(), pos.data(), t.cos.data(), t.sin.data(), c.N, c.NH, c.D);
        cuda_ops::rope_forward(d_x.data(), d_pos.data(), d_cos.data(), d_sin.data(), c.N, c.NH, c.D);
      } else {
        ops::rope_backward(want.data(), pos.data(), t.cos.data(), t.sin.data(), c.N, c.NH, c.D);
        cuda_ops::rope_backward(d_x.data(), d_pos.data(), d_cos.data(), d_sin.data(), c.N, c.NH, c.D);
      }
      EXPECT_TRUE(within_bf16(want, download_bf16(d_x), scale))
          << what << (forward ? " forward" : " backward");
    }
  }
}

TEST(CudaOps, EmbeddingEqualsCpuBitForBitAndReportsBadTokens) {
  QLORA_REQUIRE_GPU();
  for (const EmbeddingCase& c : embedding_cases()) {
    const std::string what = describe("embedding", c);
    const auto wte = bf16_randn(c.V * c.C, 11, 1.0f);
    auto tok = uniform_ids(c.N, 12, c.V);
    std::vector<float> out(sz(c.N * c.C));
    ops::embedding_forward(out.data(), tok.data(), wte.data(), c.N, c.C, c.V);

    auto d_wte = upload(to_bits(wte));
    auto d_tok = upload(tok);
    DeviceBuffer<uint16_t> d_out(out.size());
    QLORA_CUDA_CHECK(cudaMemset(d_out.data(), 0xff, d_out.bytes()));
    DeviceBuffer<int32_t> d_bad(1);
    const int32_t none = INT32_MAX;
    d_bad.upload(&none, 1);
    cuda_ops::embedding_forward(d_out.data(), d_tok.data(), d_wte.data(), c.N, c.C, c.V, d_bad.data());
    const auto got = download_bf16(d_out);
    ASSERT_EQ(got.size(), out.size());
    for (size_t i = 0; i < got.size(); ++i)
      ASSERT_EQ(f32_to_bf16(got[i]), f32_to_bf16(out[i])) << what << " at " << i;
    int32_t bad = 0;
    d_bad.download(&bad, 1);
    EXPECT_EQ(bad, INT32_MAX) << what;

    // Tokens V and -1 at the last positions: zeros there, the first of them reported.
    tok.back() = static_cast<int32_t>(c.V);
    if (c.N > 1) tok[sz(c.N - 2)] = -1;
    d_tok.upload(tok.data(), tok.size());
    d_bad.upload(&none, 1);
    cuda_ops::embedding_forward(d_out.data(), d_tok.data(), d_wte.data(), c.N, c.C, c.V, d_bad.data());
    const auto got_bad = download_bf16(d_out);
    d_bad.download(&bad, 1);
    EXPECT_EQ(bad, c.N > 1 ? c.N - 2 : 0) << what;
    for (int64_t j = 0; j < c.C; ++j) EXPECT_EQ(got_bad[sz((c.N - 1) * c.C + j)], 0.0f) << what;
  }
}

// The residual add rounds once (the bound of the file, relative to |a| + |b|
// since the terms may cancel); the fp32 accumulation and the rounding to bf16
// are single IEEE operations on both sides, so they must agree bit for bit.
TEST(CudaOps, ResidualAndPrecisionChangesMatchCpu) {
  QLORA_REQUIRE_GPU();
  for (const SwigluCase& c : swiglu_cases()) {
    const std::string what = describe("residual", c);
    const auto a = bf16_randn(c.n, 11, 1.0f), b = bf16_randn(c.n, 12, 0.5f);
    std::vector<float> sum(sz(c.n));
    ops::residual_forward(sum.data(), a.data(), b.data(), c.n);
    std::vector<double> scale(sz(c.n));
    for (size_t i = 0; i < scale.size(); ++i) scale[i] = std::abs(double(a[i])) + std::abs(double(b[i]));
    auto d_a = upload(to_bits(a)), d_b = upload(to_bits(b));
    auto d_out = poisoned<uint16_t>(sz(c.n));
    cuda_ops::residual_forward(d_out.data(), d_a.data(), d_b.data(), c.n);
    EXPECT_TRUE(within_bf16(sum, download_bf16(d_out), scale)) << what;

    const auto acc0 = testing::randn(c.n, 13);  // fp32 values, not bf16-representable
    auto d_acc = upload(acc0);
    cuda_ops::add_bf16_to_f32(d_acc.data(), d_b.data(), c.n);
    testing::poison(d_out);  // the rounding must write every element again
    cuda_ops::round_to_bf16(d_out.data(), d_acc.data(), c.n);
    QLORA_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<float> acc(sz(c.n));
    d_acc.download(acc.data(), acc.size());
    std::vector<uint16_t> rounded(sz(c.n));
    d_out.download(rounded.data(), rounded.size());
    for (size_t i = 0; i < acc.size(); ++i) {
      ASSERT_EQ(acc[i], acc0[i] + b[i]) << what << " add at " << i;
      ASSERT_EQ(rounded[i], f32_to_bf16(acc[i])) << what << " round at " << i;
    }
  }
}

TEST(CudaOps, RejectsInvalidArguments) {
  QLORA_REQUIRE_GPU();
  DeviceBuffer<uint16_t> a(64), b(64), o(64);
  DeviceBuffer<float> f(64);
  DeviceBuffer<int32_t> ids(8);
  EXPECT_THROW(cuda_ops::rmsnorm_forward(o.data(), f.data(), a.data(), b.data(), 2, 0, 1e-5f), Error);
  EXPECT_THROW(cuda_ops::rmsnorm_forward(o.data(), nullptr, a.data(), b.data(), 2, 8, 1e-5f), Error);
  EXPECT_THROW(cuda_ops::rmsnorm_backward(o.data(), a.data(), a.data(), b.data(), f.data(), -1, 8), Error);
  EXPECT_THROW(cuda_ops::swiglu_forward(o.data(), a.data(), nullptr, 8), Error);
  EXPECT_THROW(cuda_ops::swiglu_backward(o.data(), o.data(), a.data(), a.data(), a.data(), -3), Error);
  EXPECT_THROW(cuda_ops::rope_forward(a.data(), ids.data(), f.data(), f.data(), 2, 2, 7), Error);
  EXPECT_THROW(cuda_ops::rope_backward(a.data(), nullptr, f.data(), f.data(), 2, 2, 8), Error);
  EXPECT_THROW(cuda_ops::embedding_forward(o.data(), ids.data(), a.data(), 2, -1, 4), Error);
  // Nothing to do is not an error, null pointers included.
  EXPECT_NO_THROW(cuda_ops::rmsnorm_forward(nullptr, nullptr, nullptr, nullptr, 0, 8, 1e-5f));
  EXPECT_NO_THROW(cuda_ops::swiglu_forward(nullptr, nullptr, nullptr, 0));
  EXPECT_NO_THROW(cuda_ops::rope_forward(nullptr, nullptr, nullptr, nullptr, 0, 4, 8));
  EXPECT_NO_THROW(cuda_ops::embedding_forward(nullptr, nullptr, nullptr, 0, 8, 4));
  QLORA_CUDA_CHECK(cudaDeviceSynchronize());
}

// ---- DoRA (kernels/cuda/dora_cuda.h) -------------------------------------------------
//
// Thresholds, u = 2^-24:
//  - wnorm: both sides build each row of W + s B A in fp32 from the same fp32
//    W values (the GPU computes the 4-bit ones bit for bit) and differ only in
//    the order of the R products (cuBLAS in pedantic fp32, no TF32) and of the
//    double sum of squares: each is within (R + 3) u ||T_j|| of the exact norm
//    (derivation in test_dora.cpp, DoraCases), so they differ by at most twice
//    that; doubled again for slack: 4 (R + 3) u ||T_j||.
//  - out, dbase, dlora: the GPU evaluates the CPU's fp32 expression in the
//    CPU's order with correctly rounded operations and no FMA, on the same
//    inputs (the CPU's wnorm is uploaded), then rounds once to bf16: its
//    result must equal f32_to_bf16(cpu) bit for bit.
//  - dm: the same double terms summed in another order (at most N 2^-50 of
//    their sizes apart), the same division, fp32 rounding and fp32 add to
//    dm0: 4 u (|dm0| + |cpu|) + N 2^-50 sum |terms| / wnorm. Run twice it
//    must be identical (fixed order, no atomics).

struct DoraDevice {
  DeviceBuffer<uint16_t> dense;
  DeviceBuffer<uint8_t> codes;
  DeviceBuffer<float> absmax;
  cuda_ops::CudaLinearWeight view;
};
DoraDevice upload_dora_weight(const DoraCase& c, const DoraRun& r) {
  DoraDevice d;
  d.view.out = c.OUT;
  d.view.in = c.IN;
  if (!c.quantized) {
    d.dense = testing::upload(testing::to_bits(r.w));  // bf16-representable: exact
    d.view.dense = d.dense.data();
    return d;
  }
  d.codes = testing::upload(r.codes);
  d.absmax = testing::upload(r.absmax);
  d.view.codes = d.codes.data();
  d.view.absmax = d.absmax.data();
  d.view.block = DoraRun::kDoraBlock;
  d.view.type = Quant4Type::NF4;
  return d;
}

// bf16 bits the GPU must produce for each CPU fp32 value.
std::vector<uint16_t> rounded(const std::vector<float>& cpu) { return testing::to_bits(cpu); }

::testing::AssertionResult same_bits(const std::vector<uint16_t>& want, const std::vector<uint16_t>& got) {
  if (want.size() != got.size()) return ::testing::AssertionFailure() << "sizes differ";
  for (size_t i = 0; i < want.size(); ++i)
    if (want[i] != got[i])
      return ::testing::AssertionFailure() << "first difference at " << i << ": want bf16 " << bf16_to_f32(want[i])
                                           << " (0x" << std::hex << want[i] << "), got " << bf16_to_f32(got[i])
                                           << " (0x" << got[i] << std::dec << ")";
  return ::testing::AssertionSuccess();
}

TEST(CudaOps, DoraWeightNormMatchesCpuWithinFp32Bounds) {
  QLORA_REQUIRE_GPU();
  CudaContext ctx;
  const double u = std::ldexp(1.0, -24);
  for (const DoraCase& c : dora_cases()) {
    const std::string what = describe("dora_weight_norm", c);
    const DoraRun r = dora_cpu(c);
    const std::vector<double> terms = dora_norm_terms(c, r);
    DoraDevice w = upload_dora_weight(c, r);
    DeviceBuffer<float> A = testing::upload(r.A), B = testing::upload(r.B);
    const int64_t rows = std::min<int64_t>(plan_cuda::kDoraPanelRows, c.OUT);
    auto panel = testing::poisoned<float>(sz(rows * c.IN));  // exactly the documented size
    auto wnorm = testing::poisoned<float>(sz(c.OUT) + 16);   // 16 sentinels
    cuda_ops::dora_weight_norm(ctx, wnorm.data(), panel.data(), w.view, A.data(), B.data(), c.scale, c.R);
    ctx.synchronize();
    const std::vector<float> got = testing::download(wnorm);
    for (int64_t j = 0; j < c.OUT; ++j)
      ASSERT_NEAR(got[sz(j)], r.wnorm[sz(j)], 4 * double(c.R + 3) * u * terms[sz(j)]) << what << " row " << j;
    for (size_t j = sz(c.OUT); j < got.size(); ++j) ASSERT_TRUE(std::isnan(got[j])) << what << ": wrote past OUT";
  }
}

TEST(CudaOps, DoraForwardAndBackwardEqualCpuRoundedOnce) {
  QLORA_REQUIRE_GPU();
  const double u = std::ldexp(1.0, -24);
  for (const DoraCase& c : dora_cases()) {
    const std::string what = describe("dora", c);
    const DoraRun r = dora_cpu(c);
    const auto base_bits = testing::to_bits(r.base), lora_bits = testing::to_bits(r.lora);
    DeviceBuffer<uint16_t> base = testing::upload(base_bits), lora = testing::upload(lora_bits);
    DeviceBuffer<uint16_t> dout = testing::upload(testing::to_bits(r.dout));
    DeviceBuffer<float> m = testing::upload(r.m), wnorm = testing::upload(r.wnorm);
    const int64_t N = c.N, OUT = c.OUT;

    // Forward, out of place, then in place over base (as CudaLlamaModel without dropout and bias).
    DeviceBuffer<uint16_t> out = testing::upload(testing::to_bits(r.out0));
    cuda_ops::dora_forward(out.data(), base.data(), lora.data(), m.data(), wnorm.data(), N, OUT, 0);
    EXPECT_TRUE(same_bits(rounded(r.out), testing::download(out))) << what << " forward";
    std::vector<float> in_place = r.out0;
    ops::dora_forward(in_place.data(), r.out0.data(), r.lora.data(), r.m.data(), r.wnorm.data(), N, OUT);
    DeviceBuffer<uint16_t> alias = testing::upload(testing::to_bits(r.out0));
    cuda_ops::dora_forward(alias.data(), alias.data(), lora.data(), m.data(), wnorm.data(), N, OUT, 0);
    EXPECT_TRUE(same_bits(rounded(in_place), testing::download(alias))) << what << " forward over base";

    // Backward, out of place, twice into the same dm0: the same bits (no atomics).
    std::vector<float> dm_runs[2];
    for (std::vector<float>& dm_got : dm_runs) {
      DeviceBuffer<float> dm = testing::upload(r.dm0);
      auto dbase = testing::poisoned<uint16_t>(sz(N * OUT)), dlora = testing::poisoned<uint16_t>(sz(N * OUT));
      cuda_ops::dora_backward(dbase.data(), dlora.data(), dm.data(), dout.data(), base.data(), lora.data(), m.data(),
                              wnorm.data(), N, OUT, 0);
      EXPECT_TRUE(same_bits(rounded(r.dbase), testing::download(dbase))) << what << " dbase";
      EXPECT_TRUE(same_bits(rounded(r.dlora), testing::download(dlora))) << what << " dlora";
      dm_got = testing::download(dm);
    }
    EXPECT_EQ(dm_runs[0], dm_runs[1]) << what << ": dm is not deterministic";
    for (int64_t j = 0; j < OUT; ++j) {
      double size = 0.0;
      for (int64_t i = 0; i < N; ++i) {
        const size_t k = sz(i * OUT + j);
        size += std::abs(double(r.dout[k])) * (std::abs(double(r.base[k])) + std::abs(double(r.lora[k])));
      }
      const double tol = 4 * u * (std::abs(double(r.dm0[sz(j)])) + std::abs(double(r.dm[sz(j)]))) +
                         double(N) * std::ldexp(size / r.wnorm[sz(j)], -50);
      ASSERT_NEAR(dm_runs[0][sz(j)], r.dm[sz(j)], tol) << what << " dm " << j;
    }

    // In place (dbase over base, dlora over lora), as the model calls it; and
    // without dbase (the model's no-dropout path): dlora alone, dm the same.
    DeviceBuffer<float> dm = testing::upload(r.dm0);
    cuda_ops::dora_backward(base.data(), lora.data(), dm.data(), dout.data(), base.data(), lora.data(), m.data(),
                            wnorm.data(), N, OUT, 0);
    EXPECT_TRUE(same_bits(rounded(r.dbase), testing::download(base))) << what << " dbase in place";
    EXPECT_TRUE(same_bits(rounded(r.dlora), testing::download(lora))) << what << " dlora in place";
    EXPECT_EQ(testing::download(dm), dm_runs[0]) << what << " dm in place";
    base.upload(base_bits.data(), base_bits.size());
    lora.upload(lora_bits.data(), lora_bits.size());
    dm.upload(r.dm0.data(), r.dm0.size());
    cuda_ops::dora_backward(nullptr, lora.data(), dm.data(), dout.data(), base.data(), lora.data(), m.data(),
                            wnorm.data(), N, OUT, 0);
    EXPECT_TRUE(same_bits(rounded(r.dlora), testing::download(lora))) << what << " dlora without dbase";
    EXPECT_TRUE(same_bits(base_bits, testing::download(base))) << what << ": base written without dbase";
    EXPECT_EQ(testing::download(dm), dm_runs[0]) << what << " dm without dbase";
  }
}

// Host checks only: they throw before any device call, so they run in every
// CUDA build, GPU or not.
TEST(CudaDoraArgs, RejectInvalidArgumentsBeforeAnyDeviceCall) {
  auto* p16 = reinterpret_cast<uint16_t*>(uintptr_t(256));  // never dereferenced: the checks throw first
  auto* p32 = reinterpret_cast<float*>(uintptr_t(256));
  auto names = [](auto&& f, const char* op, const char* what) {
    const std::string e = testing::error_of(f);
    EXPECT_NE(e.find(op), std::string::npos) << e;
    EXPECT_NE(e.find(what), std::string::npos) << e;
  };
  names([&] { cuda_ops::dora_forward(p16, p16, p16, p32, p32, 2, 0, 0); }, "cuda_ops::dora_forward", "OUT = 0");
  names([&] { cuda_ops::dora_forward(p16, p16, nullptr, p32, p32, 2, 8, 0); }, "cuda_ops::dora_forward", "lora");
  names([&] { cuda_ops::dora_forward(p16, p16, p16, p32, p32, -1, 8, 0); }, "cuda_ops::dora_forward", "N = -1");
  names([&] { cuda_ops::dora_backward(p16, p16, nullptr, p16, p16, p16, p32, p32, 2, 8, 0); },
        "cuda_ops::dora_backward", "dm");
  names([&] { cuda_ops::dora_backward(nullptr, nullptr, p32, p16, p16, p16, p32, p32, 2, 8, 0); },
        "cuda_ops::dora_backward", "dlora");
  // Nothing to do is not an error (and queues nothing), null pointers included.
  EXPECT_NO_THROW(cuda_ops::dora_forward(nullptr, nullptr, nullptr, nullptr, nullptr, 0, 8, 0));
  EXPECT_NO_THROW(cuda_ops::dora_backward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0,
                                          8, 0));
}

#else  // !QLORA_HAVE_CUDA: the same test names, skipping, so a CPU-only build reports them.

TEST(CudaOps, RmsnormForwardMatchesCpuWithinBf16) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaOps, RmsnormBackwardMatchesCpuWithinBf16) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaOps, SwigluMatchesCpuWithinBf16) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaOps, RopeForwardAndBackwardMatchCpuWithinBf16) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaOps, EmbeddingEqualsCpuBitForBitAndReportsBadTokens) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaOps, RejectsInvalidArguments) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaOps, ResidualAndPrecisionChangesMatchCpu) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaOps, DoraWeightNormMatchesCpuWithinFp32Bounds) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaOps, DoraForwardAndBackwardEqualCpuRoundedOnce) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaDoraArgs, RejectInvalidArgumentsBeforeAnyDeviceCall) {
  QLORA_REQUIRE_GPU();
}

#endif  // QLORA_HAVE_CUDA

}  // namespace
}  // namespace qlora
