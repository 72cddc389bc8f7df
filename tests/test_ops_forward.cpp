// Forward-path checks of the ops against plain definitions: the 4-bit linear
// (NF4/FP4, every path, both directions) equals a dense product over the
// dequantized weight and does not depend on the thread count, chunked
// cross entropy equals the full softmax, cached attention equals training
// attention, document masks hide other documents, bad ids are refused.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <tuple>
#include <vector>

#include "testing.h"
#include "core/error.h"
#include "kernels/ops.h"
#include "model/llama.h"
#include "quant/blockwise.h"

namespace qlora {
namespace {

using Vec = std::vector<float>;
using testing::randn;

// Double-precision reference dot products; the fp32 results must agree within
// k u sum|terms| (k = IN terms per output, u = 2^-24), allowed 4x.
TEST(OpsForward, Nf4LinearEqualsDenseOverDequantizedWeightAcrossPanels) {
  // 300 x 4096 = 1.2M values: more than one 1M-value panel, last one short.
  // N <= 4 takes the fused dequantize-dot path, larger N the panel + sgemm
  // path; IN = 75 makes rows start on odd nibbles and mid-block.
  for (auto [OUT, IN, dq, N] : {std::tuple<int64_t, int64_t, bool, int64_t>{300, 4096, true, 3},
                                {300, 4096, true, 9}, {7, 96, false, 3}, {5, 75, false, 1}, {5, 75, true, 6}}) {
    const Vec wf = randn(OUT * IN, 1, 0.1f);
    const Quant4Tensor q = quantize_tensor(wf.data(), {OUT, IN}, Quant4Type::NF4, 64, dq);
    Vec deq(size_t(OUT * IN));
    dequantize_tensor(q, deq.data());
    const std::vector<float> scales = q.block_scales();
    ops::LinearWeight w;
    w.out = OUT;
    w.in = IN;
    w.codes = q.codes.data();
    w.absmax = scales.data();
    w.block = q.block;
    const Vec x = randn(N * IN, 2), bias = randn(OUT, 3);
    Vec y(size_t(N * OUT));
    ops::linear_forward(y.data(), x.data(), w, bias.data(), N);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t o = 0; o < OUT; ++o) {
        double ref = bias[o], mag = std::abs(bias[o]);
        for (int64_t c = 0; c < IN; ++c) {
          ref += double(x[i * IN + c]) * deq[o * IN + c];
          mag += std::abs(double(x[i * IN + c]) * deq[o * IN + c]);
        }
        ASSERT_NEAR(y[i * OUT + o], ref, 4.0 * double(IN) * 5.96e-8 * mag) << "row " << i << " out " << o;
      }
    // Backward: dinp = dout W over the same dequantized values.
    const Vec dout = randn(N * OUT, 4);
    Vec dx(size_t(N * IN));
    ops::linear_backward(dx.data(), dout.data(), w, N);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t c = 0; c < IN; c += 37) {
        double ref = 0, mag = 0;
        for (int64_t o = 0; o < OUT; ++o) {
          ref += double(dout[i * OUT + o]) * deq[o * IN + c];
          mag += std::abs(double(dout[i * OUT + o]) * deq[o * IN + c]);
        }
        ASSERT_NEAR(dx[i * IN + c], ref, 4.0 * double(OUT) * 5.96e-8 * mag);
      }
  }
}

// The 4-bit linear's parity cases: every path of the CPU kernel (fused
// dequantize-and-consume for few rows, panel + sgemm for more) and the shapes
// that stress its indexing. Kept as one table so the CUDA kernel's parity test
// runs the same list (move it to a shared header when that test lands).
struct LinearParityCase {
  int64_t N, OUT, IN;
  Quant4Type type;
  int64_t block;
  bool bias;
};
std::vector<LinearParityCase> linear_parity_cases() {
  std::vector<LinearParityCase> cases;
  // N: 1-3 fused both ways, 4 fused forward / panel backward, 5 and 17 panels.
  for (int64_t N : {1, 2, 3, 4, 5, 17}) {
    // IN = 1100 spans three dequantization stretches (512) and is no multiple
    // of 64 or 32; IN = 75 (odd) starts every other row on a low nibble and
    // mid-block; block 4096 with IN = 75 makes blocks span many rows.
    cases.push_back({N, 37, 1100, Quant4Type::NF4, 64, N % 2 == 1});
    cases.push_back({N, 29, 75, Quant4Type::FP4, 64, N % 2 == 0});
    cases.push_back({N, 23, 1100, Quant4Type::FP4, 32, true});
    cases.push_back({N, 61, 75, Quant4Type::NF4, 4096, false});
  }
  return cases;
}

// Every output against a double-precision dot product over the dequantized
// weight. Bound: an fp32 sum of K products (K = IN terms and the bias
// forward, OUT terms backward), in any association, errs by at most
// gamma_K sum|terms| ~ K u sum|terms| (u = 2^-24, the product roundings add
// one u each); allowed 2x. A wrong element, block or scale is off by O(|terms|).
TEST(OpsForward, LinearFourBitMatchesDenseReferenceOnEveryPath) {
  constexpr double kU = 5.960464477539063e-08;
  for (const LinearParityCase& c : linear_parity_cases()) {
    SCOPED_TRACE(::testing::Message() << "N " << c.N << " OUT " << c.OUT << " IN " << c.IN << " "
                                      << (c.type == Quant4Type::NF4 ? "nf4" : "fp4") << " block " << c.block
                                      << (c.bias ? " bias" : ""));
    const Vec wf = randn(c.OUT * c.IN, 11, 0.1f);
    const Quant4Tensor q = quantize_tensor(wf.data(), {c.OUT, c.IN}, c.type, c.block, false);
    Vec deq(size_t(c.OUT * c.IN));
    dequantize_tensor(q, deq.data());
    ops::LinearWeight w;
    w.out = c.OUT;
    w.in = c.IN;
    w.codes = q.codes.data();
    w.absmax = q.absmax.data();
    w.block = c.block;
    w.type = c.type;
    const Vec x = randn(c.N * c.IN, 12), bias = randn(c.OUT, 13), dout = randn(c.N * c.OUT, 14);
    Vec y(size_t(c.N * c.OUT), 77.0f), dx(size_t(c.N * c.IN), 77.0f);  // junk: both are assigned
    ops::linear_forward(y.data(), x.data(), w, c.bias ? bias.data() : nullptr, c.N);
    ops::linear_backward(dx.data(), dout.data(), w, c.N);
    for (int64_t n = 0; n < c.N; ++n) {
      for (int64_t o = 0; o < c.OUT; ++o) {
        double ref = c.bias ? bias[o] : 0.0, mag = std::abs(ref);
        for (int64_t k = 0; k < c.IN; ++k) {
          const double term = double(x[n * c.IN + k]) * deq[o * c.IN + k];
          ref += term;
          mag += std::abs(term);
        }
        ASSERT_NEAR(y[n * c.OUT + o], ref, 2.0 * double(c.IN + 2) * kU * mag) << "y row " << n << " out " << o;
      }
      for (int64_t k = 0; k < c.IN; ++k) {
        double ref = 0, mag = 0;
        for (int64_t o = 0; o < c.OUT; ++o) {
          const double term = double(dout[n * c.OUT + o]) * deq[o * c.IN + k];
          ref += term;
          mag += std::abs(term);
        }
        ASSERT_NEAR(dx[n * c.IN + k], ref, 2.0 * double(c.OUT + 1) * kU * mag) << "dx row " << n << " col " << k;
      }
    }
  }
}

// The 4-bit paths split work over output rows (forward) or input columns
// (backward), never over a sum, so the thread count cannot change a bit.
TEST(OpsForward, LinearFourBitIsIndependentOfThreadCount) {
  const int64_t OUT = 300, IN = 1100;
  const Vec wf = randn(OUT * IN, 21, 0.1f);
  const Quant4Tensor q = quantize_tensor(wf.data(), {OUT, IN}, Quant4Type::NF4, 64, true);
  const std::vector<float> scales = q.block_scales();
  ops::LinearWeight w;
  w.out = OUT;
  w.in = IN;
  w.codes = q.codes.data();
  w.absmax = scales.data();
  const int threads = omp_get_max_threads();
  for (int64_t N : {1, 3, 4, 9}) {
    const Vec x = randn(N * IN, 22), dout = randn(N * OUT, 23);
    Vec y[2], dx[2];
    for (int t = 0; t < 2; ++t) {
      omp_set_num_threads(t == 0 ? 1 : 3);  // 3: uneven splits even on a 2-core machine
      y[t].resize(size_t(N * OUT));
      dx[t].resize(size_t(N * IN));
      ops::linear_forward(y[t].data(), x.data(), w, nullptr, N);
      ops::linear_backward(dx[t].data(), dout.data(), w, N);
    }
    omp_set_num_threads(threads);
    EXPECT_EQ(y[0], y[1]) << "N " << N;
    EXPECT_EQ(dx[0], dx[1]) << "N " << N;
  }
}

TEST(OpsForward, ChunkedCrossEntropyEqualsFullSoftmax) {
  const int64_t N = 6, C = 8, V = 37;
  const Vec x = randn(N * C, 1), W = randn(V * C, 2);
  const std::vector<int32_t> targets = {3, ops::kIgnoreIndex, 36, 0, 17, 17};
  Vec losses(N), lse(N), scratch(4 * 5);
  const double sum = ops::lm_head_cross_entropy_forward(losses.data(), lse.data(), x.data(), W.data(),
                                                        targets.data(), scratch.data(), {4, 5}, N, C, V);
  double ref_sum = 0;
  for (int64_t i = 0; i < N; ++i) {
    std::vector<double> z(V);
    double m = -1e300;
    for (int64_t v = 0; v < V; ++v) {
      for (int64_t c = 0; c < C; ++c) z[v] += double(x[i * C + c]) * W[v * C + c];
      m = std::max(m, z[v]);
    }
    double s = 0;
    for (double zv : z) s += std::exp(zv - m);
    const double L = m + std::log(s);
    EXPECT_NEAR(lse[i], L, 1e-5 * std::abs(L) + 1e-5);
    if (targets[i] == ops::kIgnoreIndex) {
      EXPECT_EQ(losses[i], 0.0f);
      continue;
    }
    EXPECT_NEAR(losses[i], L - z[targets[i]], 1e-4);
    ref_sum += L - z[targets[i]];
  }
  EXPECT_NEAR(sum, ref_sum, 1e-4);
}

TEST(OpsForward, CachedAttentionEqualsCausalAttention) {
  const int64_t T = 9, H = 4, KVH = 2, D = 8;
  const Vec q = randn(T * H * D, 1), k = randn(T * KVH * D, 2), v = randn(T * KVH * D, 3);
  const std::vector<int32_t> doc(T, 0);
  Vec out(q.size()), lse(H * T);
  ops::attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), doc.data(), 1, T, H, KVH, D);
  // Prefill 5 tokens, then decode the remaining 4 one at a time.
  Vec cached(q.size());
  ops::attention_cached_forward(cached.data(), q.data(), k.data(), v.data(), 0, 5, H, KVH, D);
  for (int64_t t = 5; t < T; ++t)
    ops::attention_cached_forward(cached.data() + t * H * D, q.data() + t * H * D, k.data(), v.data(), t, 1, H, KVH,
                                  D);
  for (size_t i = 0; i < out.size(); ++i) EXPECT_NEAR(cached[i], out[i], 1e-6) << i;
}

// A sliding-window layer at generation: the cache attended from p - window + 1
// on, as the training op with window_starts.
TEST(OpsForward, CachedAttentionWithWindowEqualsWindowedAttention) {
  const int64_t T = 11, H = 4, KVH = 2, D = 8, W = 3;
  const Vec q = randn(T * H * D, 1), k = randn(T * KVH * D, 2), v = randn(T * KVH * D, 3);
  std::vector<int32_t> doc(T, 0);
  window_starts(doc.data(), doc.data(), 1, T, W);
  EXPECT_EQ(doc[10], 8);
  Vec out(q.size()), lse(H * T), full(q.size());
  ops::attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), doc.data(), 1, T, H, KVH, D);
  const std::vector<int32_t> zero(T, 0);
  ops::attention_forward(full.data(), lse.data(), q.data(), k.data(), v.data(), zero.data(), 1, T, H, KVH, D);
  Vec cached(q.size());
  ops::attention_cached_forward(cached.data(), q.data(), k.data(), v.data(), 0, 6, H, KVH, D, W);
  for (int64_t t = 6; t < T; ++t)
    ops::attention_cached_forward(cached.data() + t * H * D, q.data() + t * H * D, k.data(), v.data(), t, 1, H, KVH,
                                  D, W);
  for (size_t i = 0; i < out.size(); ++i) EXPECT_NEAR(cached[i], out[i], 1e-6) << i;
  // The first W tokens see their whole past either way; later ones do not.
  for (int64_t i = 0; i < W * H * D; ++i) EXPECT_EQ(out[size_t(i)], full[size_t(i)]);
  double diff = 0;
  for (size_t i = size_t(W * H * D); i < out.size(); ++i) diff = std::max(diff, double(std::abs(out[i] - full[i])));
  EXPECT_GT(diff, 1e-3);
}

TEST(OpsForward, DocumentMaskHidesOtherDocuments) {
  // Row of two documents [0,3) and [3,6): changing document 1's keys/values
  // must not change document 2's outputs, and document 2's first token
  // attends only to itself (out = its own v).
  const int64_t T = 6, H = 2, KVH = 1, D = 4;
  const Vec q = randn(T * H * D, 1);
  Vec k = randn(T * KVH * D, 2), v = randn(T * KVH * D, 3);
  const std::vector<int32_t> doc = {0, 0, 0, 3, 3, 3};
  Vec a(q.size()), b(q.size()), lse(H * T);
  ops::attention_forward(a.data(), lse.data(), q.data(), k.data(), v.data(), doc.data(), 1, T, H, KVH, D);
  for (int64_t i = 0; i < 3 * KVH * D; ++i) k[i] += 1.0f, v[i] -= 2.0f;
  ops::attention_forward(b.data(), lse.data(), q.data(), k.data(), v.data(), doc.data(), 1, T, H, KVH, D);
  for (int64_t i = 3 * H * D; i < T * H * D; ++i) EXPECT_EQ(a[i], b[i]);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t d = 0; d < D; ++d) EXPECT_NEAR(a[(3 * H + h) * D + d], v[3 * D + d], 1e-6);
}

TEST(OpsForward, RopeLlama3ScalesOnlyLongWavelengths) {
  // theta 100, D 8: inv_freq = 1, 0.316, 0.1, 0.0316; wavelengths 6.3, 19.9,
  // 62.8, 199. With original context 64, low 1, high 4: wavelength < 16 kept,
  // > 64 divided by the factor, between interpolated.
  ops::RopeParams p;
  p.theta = 100.0;
  p.kind = ops::RopeKind::Llama3;
  p.factor = 8.0;
  p.original_max_positions = 64;
  float base[4], scaled[4];
  ops::RopeParams none = p;
  none.kind = ops::RopeKind::None;
  ops::rope_inv_freq(base, none, 8);
  ops::rope_inv_freq(scaled, p, 8);
  EXPECT_EQ(scaled[0], base[0]);
  EXPECT_NEAR(scaled[3], base[3] / 8.0f, 1e-9);
  const double wl = 2 * M_PI / base[1], smooth = (64.0 / wl - 1.0) / 3.0;
  EXPECT_NEAR(scaled[1], (1 - smooth) * base[1] / 8 + smooth * base[1], 1e-6);
  EXPECT_NEAR(scaled[2], (1 - (64.0 / (2 * M_PI / base[2]) - 1.0) / 3.0) * base[2] / 8 +
                             (64.0 / (2 * M_PI / base[2]) - 1.0) / 3.0 * base[2],
              1e-6);
}

TEST(OpsForward, OutOfRangeIdsAreRefused) {
  const Vec wte = randn(4 * 2, 1);
  Vec out(4);
  const std::vector<int32_t> bad = {1, 4};
  EXPECT_THROW(ops::embedding_forward(out.data(), bad.data(), wte.data(), 2, 2, 4), Error);
  Vec losses(2), lse(2), scratch(8);
  const std::vector<int32_t> bad_t = {0, -5};
  EXPECT_THROW(ops::lm_head_cross_entropy_forward(losses.data(), lse.data(), out.data(), wte.data(), bad_t.data(),
                                                  scratch.data(), {2, 4}, 2, 2, 4),
               Error);
}

}  // namespace
}  // namespace qlora
