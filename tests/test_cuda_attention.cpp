// Causal GQA attention with document masks on the GPU (kernels/cuda/attention_cuda.h)
// against the fp32 CPU op (ops::attention_forward / attention_backward), on
// one list of cases; some with a sliding window (the mask the model passes:
// doc_start raised to t - window + 1, model/llama.h window_starts).
//
// AttentionCases*: the CPU op on those cases against attention computed in
// double precision (softmax, then the analytic gradients). They run on every
// machine, so the cases the GPU tests use are known to be sound.
//
// CudaAttention*: both backends on the same bf16-representable inputs.
// Forward is compared on (q, k, v); backward on (dout, out rounded to bf16,
// the CPU's fp32 lse, q, k, v), the CPU reference being run on exactly those
// inputs, so each test isolates one pass. The thresholds follow from where the
// two sides differ:
//  1. the GPU rounds each output to bf16 once: at most 2^-8 |cpu| (as in
//     tests/test_cuda_ops.cpp). lse stays fp32 and has no such term.
//  2. before that, both compute in fp32 but not identically. A score
//     x = scale * sum_d q_d k_d is summed in another order (the CPU sums in
//     double and rounds once, the GPU chains fp32 FMAs): |dx| <= (D+1) 2^-24 A
//     with A = scale * sum_d |q_d k_d|, at most 2^-16 A for D <= 256. Since
//     p = exp(x - lse), that moves p by the relative amount dx, plus a few
//     ulps for expf and for the online-softmax rescalings. The sums over keys
//     (and over queries and the GQA group for dK, dV: at most 1600 terms
//     here) add at most n 2^-24 <= 2^-13.4 of the sum of |terms|. And dP, delta
//     are dot products, each within (D+1) 2^-24 of the sum of |their terms|.
//     So every value is within 2^-12 * terms of the CPU's, where terms is its
//     sum of absolute contributions, each weighted by (1 + A) for its score
//     error:
//       out[t,d]  sum_s P_ts |v_sd| (1 + A_ts)
//       lse[t]    1 + max_s A_ts                      (absolute: it is a log)
//       dv[s,d]   sum_(t,h) P_ts |dout_td| (1 + A_ts)
//       dq[t,d]   sum_s g_ts |k_sd|,  dk[s,d]  sum_(t,h) g_ts |q_td|,
//                 g_ts = P_ts (sum_d |dout_td v_sd| + sum_d |dout_td out_td|) scale (1 + A_ts)
//     (dS = P (dP - delta) scale cancels, so the error is relative to the
//     terms, not to the value). 2^-12 is at least 4 times the worst-case
//     bounds above, and far below what a wrong index, a missing or extra key
//     (an O(1) change of P) or a second rounding through bf16 (2^-8) does.
// The CPU checks use the same envelope against double: the CPU is one of the
// two fp32 computations the bound covers.
//
// Without a CUDA build or a usable GPU the CudaAttention tests skip.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "kernels/ops.h"
#include "model/llama.h"
#include "op_cases.h"

#if QLORA_HAVE_CUDA
#include "kernels/cuda/attention_cuda.h"
#include "kernels/cuda/context.h"
#include "kernels/cuda/device.h"
#endif

#include "cuda_testing.h"
#include "testing.h"

namespace qlora {
namespace {

using testing::sz;

// Used by the GPU cases only; clang warns about an unused constant without CUDA.
[[maybe_unused]] constexpr double kBf16Rounding = 1.0 / 256;  // 2^-8: one rounding to bf16 (top of the file)
constexpr double kFp32Slack = 1.0 / 4096;    // 2^-12 of the terms' size

// ---- cases ---------------------------------------------------------------------------

struct AttentionCase {
  int64_t B, T, H, KVH, D;
  // Lengths of the documents packed into each row, used in turn (row b starts
  // at entry b, so rows differ; the last one is cut at T). Empty: one document per row.
  std::vector<int64_t> docs;
  float q_sigma;  // standard deviation of q; k, v, dout have 1. Larger: a peakier softmax.
  int64_t window = 0;  // sliding window (keys s with t - s < window); 0: none
};

std::vector<AttentionCase> attention_cases() {
  return {
      {1, 1, 1, 1, 8, {}, 1.0f},                   // one token
      {2, 7, 2, 1, 16, {3, 1, 3}, 1.0f},           // GQA 2, a document of length 1
      {1, 65, 4, 1, 64, {}, 1.0f},                 // GQA 4, one past a 64-row tile
      {2, 65, 4, 2, 8, {1, 20, 44}, 1.0f},         // row 0 starts with a 1-token document
      {1, 200, 8, 1, 16, {50, 1, 100, 49}, 1.0f},  // H = 8 KVH
      {2, 200, 2, 2, 128, {70, 1, 129}, 1.0f},     // GQA 1, D = 128
      {1, 200, 4, 1, 64, {130, 70}, 4.0f},         // scores ~4: the running maximum moves across tiles
      {1, 65, 2, 1, 256, {33, 1, 31}, 1.0f},       // the largest head-dim bucket
      {2, 33, 4, 4, 40, {10, 23}, 1.0f},           // D inside a bucket (padded to 64)
      // sliding windows: inside one tile, across tile edges with documents, of one key
      {2, 65, 4, 2, 16, {40, 25}, 1.0f, 5},
      {1, 200, 4, 1, 64, {130, 1, 69}, 1.0f, 70},
      {2, 200, 2, 2, 128, {}, 1.0f, 64},
      {1, 33, 2, 1, 8, {20, 13}, 1.0f, 1},
  };
}

std::string describe(const AttentionCase& c) {
  std::ostringstream os;
  os << "attention B " << c.B << " T " << c.T << " H " << c.H << " KVH " << c.KVH << " D " << c.D
     << " docs {";
  for (size_t i = 0; i < c.docs.size(); ++i) os << (i ? "," : "") << c.docs[i];
  os << "} q_sigma " << c.q_sigma;
  if (c.window > 0) os << " window " << c.window;
  return os.str();
}

// doc_start as the model builds it: positions restart at 0 at each document, doc_start[t] = t - pos[t].
std::vector<int32_t> document_starts(const AttentionCase& c) {
  std::vector<int32_t> doc(sz(c.B * c.T));
  for (int64_t b = 0; b < c.B; ++b) {
    size_t next = sz(b);
    int64_t pos = 0, len = c.docs.empty() ? c.T : c.docs[next++ % c.docs.size()];
    for (int64_t t = 0; t < c.T; ++t, ++pos) {
      if (pos == len) {
        pos = 0;
        len = c.docs[next++ % c.docs.size()];
      }
      doc[sz(b * c.T + t)] = static_cast<int32_t>(t - pos);
    }
  }
  return doc;
}

// The mask the attention ops get: document starts, raised by the window if any.
std::vector<int32_t> doc_starts(const AttentionCase& c) {
  std::vector<int32_t> doc = document_starts(c);
  if (c.window > 0) window_starts(doc.data(), doc.data(), c.B, c.T, c.window);
  return doc;
}

// A case's inputs (bf16-representable) and the CPU op's results.
struct AttentionRun {
  std::vector<float> q, k, v, dout;     // (B,T,H,D), (B,T,KVH,D) x2, (B,T,H,D)
  std::vector<int32_t> doc;             // (B,T)
  std::vector<float> out, lse;          // CPU forward: (B,T,H,D), (B,H,T)
  std::vector<float> dq, dk, dv;        // CPU backward from the fp32 out
  std::vector<float> out_bf16;          // out rounded to bf16: the GPU backward's input
  std::vector<float> dq_r, dk_r, dv_r;  // CPU backward from out_bf16: the GPU backward's reference
};

std::vector<float> rounded_to_bf16(const std::vector<float>& x) {
  std::vector<float> r(x.size());
  for (size_t i = 0; i < x.size(); ++i) r[i] = bf16_to_f32(f32_to_bf16(x[i]));
  return r;
}

AttentionRun attention_cpu(const AttentionCase& c) {
  const int64_t nq = c.B * c.T * c.H * c.D, nkv = c.B * c.T * c.KVH * c.D;
  AttentionRun r;
  r.q = op_cases::bf16_randn(nq, 21, c.q_sigma);
  r.k = op_cases::bf16_randn(nkv, 22, 1.0f);
  r.v = op_cases::bf16_randn(nkv, 23, 1.0f);
  r.dout = op_cases::bf16_randn(nq, 24, 1.0f);
  r.doc = doc_starts(c);
  r.out.resize(sz(nq));
  r.lse.resize(sz(c.B * c.H * c.T));
  ops::attention_forward(r.out.data(), r.lse.data(), r.q.data(), r.k.data(), r.v.data(), r.doc.data(), c.B,
                         c.T, c.H, c.KVH, c.D);
  auto backward = [&](const std::vector<float>& out, std::vector<float>& dq, std::vector<float>& dk,
                      std::vector<float>& dv) {
    dq.assign(sz(nq), 0.0f);
    dk.assign(sz(nkv), 0.0f);
    dv.assign(sz(nkv), 0.0f);
    ops::attention_backward(dq.data(), dk.data(), dv.data(), r.dout.data(), out.data(), r.lse.data(),
                            r.q.data(), r.k.data(), r.v.data(), r.doc.data(), c.B, c.T, c.H, c.KVH, c.D);
  };
  backward(r.out, r.dq, r.dk, r.dv);
  r.out_bf16 = rounded_to_bf16(r.out);
  backward(r.out_bf16, r.dq_r, r.dk_r, r.dv_r);
  return r;
}

// Attention in double, with the error scales ("terms") of the top of the file.
struct ExactAttention {
  std::vector<double> out, lse, dq, dk, dv;
  std::vector<double> out_terms, lse_terms, dq_terms, dk_terms, dv_terms;
};

ExactAttention exact_attention(const AttentionCase& c, const AttentionRun& r) {
  const int64_t B = c.B, T = c.T, H = c.H, KVH = c.KVH, D = c.D, group = H / KVH;
  const double scale = double(1.0f / std::sqrt(float(D)));  // the fp32 scale both backends use
  const size_t nq = sz(B * T * H * D), nkv = sz(B * T * KVH * D), nl = sz(B * H * T);
  ExactAttention e;
  for (auto* v : {&e.out, &e.dq, &e.out_terms, &e.dq_terms}) v->assign(nq, 0.0);
  for (auto* v : {&e.dk, &e.dv, &e.dk_terms, &e.dv_terms}) v->assign(nkv, 0.0);
  for (auto* v : {&e.lse, &e.lse_terms}) v->assign(nl, 0.0);
  std::vector<double> x(sz(T)), a(sz(T)), p(sz(T)), dp(sz(T)), dp_abs(sz(T));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t kvh = h / group, s0 = r.doc[sz(b * T + t)];
        const size_t qi = sz(((b * T + t) * H + h) * D), li = sz((b * H + h) * T + t);
        auto kv_at = [&](int64_t s) { return sz(((b * T + s) * KVH + kvh) * D); };
        double m = -std::numeric_limits<double>::infinity(), a_max = 0.0;
        for (int64_t s = s0; s <= t; ++s) {
          double dot = 0.0, dot_abs = 0.0, dpv = 0.0, dpv_abs = 0.0;
          for (int64_t d = 0; d < D; ++d) {
            const double qd = r.q[qi + sz(d)], kd = r.k[kv_at(s) + sz(d)];
            const double gd = r.dout[qi + sz(d)], vd = r.v[kv_at(s) + sz(d)];
            dot += qd * kd;
            dot_abs += std::abs(qd * kd);
            dpv += gd * vd;
            dpv_abs += std::abs(gd * vd);
          }
          x[sz(s)] = dot * scale;
          a[sz(s)] = dot_abs * scale;
          dp[sz(s)] = dpv;
          dp_abs[sz(s)] = dpv_abs;
          m = std::max(m, x[sz(s)]);
          a_max = std::max(a_max, a[sz(s)]);
        }
        double l = 0.0;
        for (int64_t s = s0; s <= t; ++s) l += std::exp(x[sz(s)] - m);
        e.lse[li] = m + std::log(l);
        e.lse_terms[li] = 1.0 + a_max;
        double delta = 0.0, delta_abs = 0.0;
        for (int64_t d = 0; d < D; ++d)
          delta_abs += std::abs(double(r.dout[qi + sz(d)]) * r.out_bf16[qi + sz(d)]);
        for (int64_t s = s0; s <= t; ++s) {
          p[sz(s)] = std::exp(x[sz(s)] - m) / l;
          delta += p[sz(s)] * dp[sz(s)];
        }
        for (int64_t s = s0; s <= t; ++s) {
          const double ps = p[sz(s)], w = 1.0 + a[sz(s)];
          const double ds = ps * (dp[sz(s)] - delta) * scale;
          const double g = ps * (dp_abs[sz(s)] + delta_abs) * scale * w;
          const size_t ki = kv_at(s);
          for (int64_t d = 0; d < D; ++d) {
            const size_t iq = qi + sz(d), ik = ki + sz(d);
            e.out[iq] += ps * r.v[ik];
            e.out_terms[iq] += ps * std::abs(double(r.v[ik])) * w;
            e.dq[iq] += ds * r.k[ik];
            e.dq_terms[iq] += g * std::abs(double(r.k[ik]));
            e.dk[ik] += ds * r.q[iq];
            e.dk_terms[ik] += g * std::abs(double(r.q[iq]));
            e.dv[ik] += ps * r.dout[iq];
            e.dv_terms[ik] += ps * std::abs(double(r.dout[iq])) * w;
          }
        }
      }
  return e;
}

[[maybe_unused]] std::vector<double> widened(const std::vector<float>& v) {
  return std::vector<double>(v.begin(), v.end());
}

// |got - want| <= rel |want| + slack terms[i] for every i, and got finite.
::testing::AssertionResult close_to(const char* what, const std::vector<float>& got,
                                    const std::vector<double>& want, double rel, double slack,
                                    const std::vector<double>& terms) {
  if (got.size() != want.size() || terms.size() != want.size())
    return ::testing::AssertionFailure() << what << ": sizes differ: " << got.size() << " vs " << want.size();
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i]))
      return ::testing::AssertionFailure() << what << ": not finite at " << i << ": " << got[i];
    const double tol = rel * std::abs(want[i]) + slack * terms[i] + 1e-30;
    if (!(std::abs(double(got[i]) - want[i]) <= tol))
      return ::testing::AssertionFailure() << what << ": first difference at " << i << ": got " << got[i]
                                           << ", want " << want[i] << ", allowed " << tol;
  }
  return ::testing::AssertionSuccess();
}

// ---- CPU op on the shared cases ------------------------------------------------------

TEST(AttentionCases, DocStartsRestartAtEachDocument) {
  for (const AttentionCase& c : attention_cases()) {
    const std::string what = describe(c);
    const auto doc = document_starts(c);
    const auto mask = doc_starts(c);
    for (int64_t i = 0; i < c.B * c.T; ++i) {
      const int64_t t = i % c.T, w = c.window > 0 ? c.window : c.T + 1;
      ASSERT_EQ(mask[sz(i)], std::max<int64_t>(doc[sz(i)], t - w + 1)) << what << " i " << i;
    }
    for (int64_t b = 0; b < c.B; ++b) {
      int64_t starts = 0, single = 0;
      for (int64_t t = 0; t < c.T; ++t) {
        const int64_t d = doc[sz(b * c.T + t)];
        ASSERT_TRUE(d >= 0 && d <= t) << what << " row " << b << " t " << t;
        // Within a document doc_start is constant; a new one starts at itself.
        if (t > 0) {
          ASSERT_TRUE(d == doc[sz(b * c.T + t - 1)] || d == t) << what << " t " << t;
        }
        if (d == t) {
          ++starts;
          if (t + 1 == c.T || doc[sz(b * c.T + t + 1)] == t + 1) ++single;
        }
      }
      if (!c.docs.empty()) {
        EXPECT_GT(starts, 1) << what << " row " << b << ": one document only";
      }
      if (std::find(c.docs.begin(), c.docs.end(), 1) != c.docs.end()) {
        EXPECT_GT(single, 0) << what << " row " << b << ": no document of length 1";
      }
    }
  }
}

TEST(AttentionCases, CpuMatchesDoubleAttention) {
  for (const AttentionCase& c : attention_cases()) {
    const std::string what = describe(c);
    const AttentionRun r = attention_cpu(c);
    const ExactAttention e = exact_attention(c, r);
    EXPECT_TRUE(close_to("out", r.out, e.out, 0.0, kFp32Slack, e.out_terms)) << what;
    EXPECT_TRUE(close_to("lse", r.lse, e.lse, 0.0, kFp32Slack, e.lse_terms)) << what;
    EXPECT_TRUE(close_to("dq", r.dq, e.dq, 0.0, kFp32Slack, e.dq_terms)) << what;
    EXPECT_TRUE(close_to("dk", r.dk, e.dk, 0.0, kFp32Slack, e.dk_terms)) << what;
    EXPECT_TRUE(close_to("dv", r.dv, e.dv, 0.0, kFp32Slack, e.dv_terms)) << what;
  }
}

// A token that starts a document sees only itself: p = 1, so out is its own v exactly.
TEST(AttentionCases, DocumentStartSeesOnlyItself) {
  for (const AttentionCase& c : attention_cases()) {
    const std::string what = describe(c);
    const AttentionRun r = attention_cpu(c);
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t t = 0; t < c.T; ++t) {
        if (r.doc[sz(b * c.T + t)] != t) continue;
        for (int64_t h = 0; h < c.H; ++h) {
          const size_t qi = sz(((b * c.T + t) * c.H + h) * c.D);
          const size_t ki = sz(((b * c.T + t) * c.KVH + h / (c.H / c.KVH)) * c.D);
          for (int64_t d = 0; d < c.D; ++d)
            ASSERT_EQ(r.out[qi + sz(d)], r.v[ki + sz(d)]) << what << " b " << b << " t " << t << " h " << h;
        }
      }
  }
}

// ---- GPU against CPU -------------------------------------------------------------------

#if QLORA_HAVE_CUDA

using testing::download;
using testing::download_bf16;
using testing::poisoned;
using testing::to_bits;
using testing::upload;

const char* tiles_name(cuda_ops::AttentionTiles t) {
  return t == cuda_ops::AttentionTiles::Auto ? " tiles auto" : " tiles small";
}

constexpr cuda_ops::AttentionTiles kBothTiles[] = {cuda_ops::AttentionTiles::Auto,
                                                   cuda_ops::AttentionTiles::Small};

// The uploads and the poisoning run on the legacy default stream, the kernels
// on ctx.stream() (non-blocking): synchronize the device between them.
TEST(CudaAttention, ForwardMatchesCpuWithinBf16) {
  QLORA_REQUIRE_GPU();
  CudaContext ctx;
  for (const AttentionCase& c : attention_cases()) {
    const AttentionRun r = attention_cpu(c);
    const ExactAttention e = exact_attention(c, r);
    auto d_q = upload(to_bits(r.q)), d_k = upload(to_bits(r.k)), d_v = upload(to_bits(r.v));
    auto d_doc = upload(r.doc);
    for (cuda_ops::AttentionTiles tiles : kBothTiles) {
      const std::string what = describe(c) + tiles_name(tiles);
      auto d_out = poisoned<uint16_t>(r.out.size());
      auto d_lse = poisoned<float>(r.lse.size());
      QLORA_CUDA_CHECK(cudaDeviceSynchronize());
      cuda_ops::attention_forward(ctx, d_out.data(), d_lse.data(), d_q.data(), d_k.data(), d_v.data(),
                                  d_doc.data(), c.B, c.T, c.H, c.KVH, c.D, tiles);
      ctx.synchronize();
      const auto out = download_bf16(d_out);
      EXPECT_TRUE(close_to("out", out, widened(r.out), kBf16Rounding, kFp32Slack, e.out_terms)) << what;
      EXPECT_TRUE(close_to("lse", download(d_lse), widened(r.lse), 0.0, kFp32Slack, e.lse_terms)) << what;
      // A document's first token: p = expf(0) = 1 exactly, so out is its v bit for bit.
      for (int64_t b = 0; b < c.B; ++b)
        for (int64_t t = 0; t < c.T; ++t) {
          if (r.doc[sz(b * c.T + t)] != t) continue;
          for (int64_t h = 0; h < c.H; ++h)
            for (int64_t d = 0; d < c.D; ++d)
              ASSERT_EQ(out[sz(((b * c.T + t) * c.H + h) * c.D + d)],
                        r.v[sz(((b * c.T + t) * c.KVH + h / (c.H / c.KVH)) * c.D + d)])
                  << what << " b " << b << " t " << t << " h " << h;
        }
    }
  }
}

TEST(CudaAttention, BackwardMatchesCpuWithinBf16AndIsDeterministic) {
  QLORA_REQUIRE_GPU();
  CudaContext ctx;
  for (const AttentionCase& c : attention_cases()) {
    const AttentionRun r = attention_cpu(c);
    const ExactAttention e = exact_attention(c, r);
    auto d_q = upload(to_bits(r.q)), d_k = upload(to_bits(r.k)), d_v = upload(to_bits(r.v));
    auto d_dout = upload(to_bits(r.dout)), d_out = upload(to_bits(r.out_bf16));
    auto d_lse = upload(r.lse);  // the CPU's fp32 lse: this test isolates the backward
    auto d_doc = upload(r.doc);
    const size_t ws = cuda_ops::attention_backward_workspace_bytes(c.B, c.T, c.H, c.D);
    for (cuda_ops::AttentionTiles tiles : kBothTiles) {
      const std::string what = describe(c) + tiles_name(tiles);
      std::vector<float> first_dq, first_dk, first_dv;
      for (int run = 0; run < 2; ++run) {
        auto d_dq = poisoned<uint16_t>(r.dq_r.size());
        auto d_dk = poisoned<uint16_t>(r.dk_r.size());
        auto d_dv = poisoned<uint16_t>(r.dv_r.size());
        QLORA_CUDA_CHECK(cudaMemset(ctx.workspace(ws), 0xff, ws));  // delta must be written before it is read
        QLORA_CUDA_CHECK(cudaDeviceSynchronize());
        cuda_ops::attention_backward(ctx, d_dq.data(), d_dk.data(), d_dv.data(), d_dout.data(), d_out.data(),
                                     d_lse.data(), d_q.data(), d_k.data(), d_v.data(), d_doc.data(), c.B, c.T,
                                     c.H, c.KVH, c.D, tiles);
        ctx.synchronize();
        const auto dq = download_bf16(d_dq), dk = download_bf16(d_dk), dv = download_bf16(d_dv);
        if (run == 0) {
          EXPECT_TRUE(close_to("dq", dq, widened(r.dq_r), kBf16Rounding, kFp32Slack, e.dq_terms)) << what;
          EXPECT_TRUE(close_to("dk", dk, widened(r.dk_r), kBf16Rounding, kFp32Slack, e.dk_terms)) << what;
          EXPECT_TRUE(close_to("dv", dv, widened(r.dv_r), kBf16Rounding, kFp32Slack, e.dv_terms)) << what;
          first_dq = dq;
          first_dk = dk;
          first_dv = dv;
        } else {
          // No atomics, fixed summation orders: a second run is bit for bit the first.
          EXPECT_TRUE(first_dq == dq && first_dk == dk && first_dv == dv) << what << ": not deterministic";
        }
      }
    }
  }
}

// The GPU forward's own out and lse feed the GPU backward as they will in
// training; the reference is the CPU backward on those same values.
TEST(CudaAttention, BackwardFromGpuForwardMatchesCpu) {
  QLORA_REQUIRE_GPU();
  CudaContext ctx;
  for (const AttentionCase& c : attention_cases()) {
    const std::string what = describe(c);
    const AttentionRun r = attention_cpu(c);
    auto d_q = upload(to_bits(r.q)), d_k = upload(to_bits(r.k)), d_v = upload(to_bits(r.v));
    auto d_dout = upload(to_bits(r.dout));
    auto d_doc = upload(r.doc);
    auto d_out = poisoned<uint16_t>(r.out.size());
    auto d_lse = poisoned<float>(r.lse.size());
    auto d_dq = poisoned<uint16_t>(r.dq.size());
    auto d_dk = poisoned<uint16_t>(r.dk.size());
    auto d_dv = poisoned<uint16_t>(r.dv.size());
    QLORA_CUDA_CHECK(cudaDeviceSynchronize());
    cuda_ops::attention_forward(ctx, d_out.data(), d_lse.data(), d_q.data(), d_k.data(), d_v.data(),
                                d_doc.data(), c.B, c.T, c.H, c.KVH, c.D);
    cuda_ops::attention_backward(ctx, d_dq.data(), d_dk.data(), d_dv.data(), d_dout.data(), d_out.data(),
                                 d_lse.data(), d_q.data(), d_k.data(), d_v.data(), d_doc.data(), c.B, c.T,
                                 c.H, c.KVH, c.D);
    ctx.synchronize();
    AttentionRun g = r;
    g.out_bf16 = download_bf16(d_out);
    const std::vector<float> gpu_lse = download(d_lse);
    std::vector<float> dq(r.dq.size()), dk(r.dk.size()), dv(r.dv.size());
    ops::attention_backward(dq.data(), dk.data(), dv.data(), r.dout.data(), g.out_bf16.data(), gpu_lse.data(),
                            r.q.data(), r.k.data(), r.v.data(), r.doc.data(), c.B, c.T, c.H, c.KVH, c.D);
    const ExactAttention e = exact_attention(c, g);  // delta's terms from the GPU's out
    EXPECT_TRUE(close_to("dq", download_bf16(d_dq), widened(dq), kBf16Rounding, kFp32Slack, e.dq_terms))
        << what;
    EXPECT_TRUE(close_to("dk", download_bf16(d_dk), widened(dk), kBf16Rounding, kFp32Slack, e.dk_terms))
        << what;
    EXPECT_TRUE(close_to("dv", download_bf16(d_dv), widened(dv), kBf16Rounding, kFp32Slack, e.dv_terms))
        << what;
  }
}

TEST(CudaAttention, RejectsInvalidArguments) {
  QLORA_REQUIRE_GPU();
  CudaContext ctx;
  DeviceBuffer<uint16_t> a(4096), o(4096);
  DeviceBuffer<float> f(256);
  DeviceBuffer<int32_t> doc(64);
  auto fwd = [&](int64_t B, int64_t T, int64_t H, int64_t KVH, int64_t D) {
    cuda_ops::attention_forward(ctx, o.data(), f.data(), a.data(), a.data(), a.data(), doc.data(), B, T, H,
                                KVH, D);
  };
  auto bwd = [&](int64_t B, int64_t T, int64_t H, int64_t KVH, int64_t D) {
    cuda_ops::attention_backward(ctx, o.data(), o.data(), o.data(), a.data(), a.data(), f.data(), a.data(),
                                 a.data(), a.data(), doc.data(), B, T, H, KVH, D);
  };
  EXPECT_THROW(fwd(1, 4, 3, 2, 8), Error);    // H not a multiple of KVH
  EXPECT_THROW(fwd(1, 4, 2, 0, 8), Error);    // no kv head
  EXPECT_THROW(fwd(1, 4, 2, 1, 0), Error);    // D = 0
  EXPECT_THROW(fwd(1, 4, 2, 1, 258), Error);  // D past 256
  EXPECT_THROW(fwd(-1, 4, 2, 1, 8), Error);
  EXPECT_THROW(bwd(1, 4, 4, 3, 8), Error);
  EXPECT_THROW(bwd(1, -4, 2, 1, 8), Error);
  EXPECT_THROW(bwd(1, 4, 2, 1, 300), Error);
  EXPECT_THROW(cuda_ops::attention_forward(ctx, o.data(), f.data(), a.data(), nullptr, a.data(), doc.data(),
                                           1, 4, 2, 1, 8),
               Error);
  EXPECT_THROW(cuda_ops::attention_backward(ctx, o.data(), o.data(), o.data(), a.data(), a.data(), f.data(),
                                            a.data(), a.data(), a.data(), nullptr, 1, 4, 2, 1, 8),
               Error);
  EXPECT_THROW(cuda_ops::attention_backward_workspace_bytes(1, -1, 2, 8), Error);
  // Nothing to do is not an error, null pointers included.
  EXPECT_NO_THROW(
      cuda_ops::attention_forward(ctx, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 4, 2, 1, 8));
  EXPECT_NO_THROW(cuda_ops::attention_backward(ctx, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                               nullptr, nullptr, nullptr, nullptr, 2, 0, 2, 1, 8));
  ctx.synchronize();
}

// Host arithmetic only: runs wherever the CUDA backend is built, GPU or not.
TEST(CudaAttention, WorkspaceHoldsDeltaOnly) {
  EXPECT_EQ(cuda_ops::attention_backward_workspace_bytes(2, 200, 8, 128),
            size_t(2 * 8 * 200) * sizeof(float));
  EXPECT_EQ(cuda_ops::attention_backward_workspace_bytes(0, 200, 8, 128), size_t(0));
}

#else  // !QLORA_HAVE_CUDA: the same test names, skipping, so a CPU-only build reports them.

TEST(CudaAttention, ForwardMatchesCpuWithinBf16) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaAttention, BackwardMatchesCpuWithinBf16AndIsDeterministic) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaAttention, BackwardFromGpuForwardMatchesCpu) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaAttention, RejectsInvalidArguments) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaAttention, WorkspaceHoldsDeltaOnly) {
  QLORA_REQUIRE_GPU();
}

#endif  // QLORA_HAVE_CUDA

}  // namespace
}  // namespace qlora
