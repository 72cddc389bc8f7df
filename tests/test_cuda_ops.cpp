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
#include "testing.h"

#if QLORA_HAVE_CUDA
#include "kernels/cuda/device.h"
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

#endif  // QLORA_HAVE_CUDA

}  // namespace
}  // namespace qlora
