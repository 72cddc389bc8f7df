// Every op's backward against central finite differences of its forward.
//
// Method: for an op with fp32 output Y(X), take the scalar L = sum_i w_i Y_i
// with fixed random weights w, accumulated in double. The analytic gradient
// is the op's backward with dout = w; the numeric one is
// (L(X + h e_j) - L(X - h e_j)) / 2h for a sample of indices j.
//
// Tolerance, derived from fp32 precision (u = 2^-24 ~ 6e-8):
// - rounding: each output is a sum of at most k terms, so its forward error is
//   at most about k u |Y_i| (the standard gamma_k bound, with |Y| standing for
//   the magnitude of its terms). Outputs that do not depend on x_j are
//   recomputed bit-identically and cancel, so only the outputs that changed
//   count: the error of L(+) - L(-) is <= 2 k u A_j with
//   A_j = sum over changed i of |w_i| max(|Y+_i|, |Y-_i|), and after dividing
//   by 2h the gradient error is <= k u A_j / h. We allow 4x that bound.
// - truncation: central differences err by h^2/6 |f'''|. The ops are smooth
//   with O(1) derivatives on O(1) inputs, so with h = 1e-2 this is ~2e-5
//   relative; we allow 1e-3 relative (a wrong backward is off by O(1)).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "testing.h"
#include "kernels/ops.h"
#include "model/llama.h"
#include "quant/blockwise.h"

namespace qlora {
namespace {

using Vec = std::vector<float>;
using testing::randn;
using Inputs = std::vector<Vec>;

// An op under test: differentiable inputs, forward to one flat output, and the
// gradients of sum(dout * forward) with respect to each input.
struct Problem {
  Inputs inputs;
  std::function<Vec(const Inputs&)> forward;
  std::function<Inputs(const Inputs&, const Vec& dout)> backward;
  double k = 1;  // longest fp32 accumulation inside the op (see the header comment)
};
struct OpCase {
  std::string name;
  std::function<Problem()> make;
};
std::ostream& operator<<(std::ostream& os, const OpCase& c) { return os << c.name; }

constexpr double kU = 5.960464477539063e-08;  // 2^-24
constexpr float kH = 1e-2f;

double weighted(const Vec& y, const Vec& w) {
  double s = 0;
  for (size_t i = 0; i < y.size(); ++i) s += double(w[i]) * double(y[i]);
  return s;
}

class OpsGrad : public ::testing::TestWithParam<OpCase> {};

TEST_P(OpsGrad, BackwardMatchesFiniteDifferences) {
  Problem p = GetParam().make();
  const Vec y0 = p.forward(p.inputs);
  for (float v : y0) ASSERT_TRUE(std::isfinite(v));
  const Vec w = randn(int64_t(y0.size()), 99);
  const Inputs grads = p.backward(p.inputs, w);
  ASSERT_EQ(grads.size(), p.inputs.size());
  std::mt19937 rng(7);
  for (size_t a = 0; a < p.inputs.size(); ++a) {
    ASSERT_EQ(grads[a].size(), p.inputs[a].size()) << "input " << a;
    const size_t n = p.inputs[a].size();
    std::vector<size_t> idx = {0, n - 1};
    for (int s = 0; s < 14; ++s) idx.push_back(std::uniform_int_distribution<size_t>(0, n - 1)(rng));
    for (size_t j : idx) {
      Inputs xp = p.inputs, xm = p.inputs;
      xp[a][j] += kH;
      xm[a][j] -= kH;
      const float h2 = xp[a][j] - xm[a][j];  // the step actually taken in fp32
      const Vec yp = p.forward(xp), ym = p.forward(xm);
      double changed = 0;
      for (size_t i = 0; i < yp.size(); ++i)
        if (yp[i] != ym[i]) changed += std::abs(double(w[i])) * std::max(std::abs(yp[i]), std::abs(ym[i]));
      const double fd = (weighted(yp, w) - weighted(ym, w)) / double(h2);
      const double g = grads[a][j];
      const double tol = 4.0 * p.k * kU * changed / (double(h2) / 2) + 1e-3 * std::abs(g) + 1e-6;
      EXPECT_NEAR(g, fd, tol) << "input " << a << " index " << j;
    }
  }
}

std::string case_name(const ::testing::TestParamInfo<OpCase>& info) { return info.param.name; }

// ---- RMSNorm ----
std::vector<OpCase> rmsnorm_cases() {
  std::vector<OpCase> out;
  // {12, 16}: qwen3's q/k norm, which is this op on (N*H, D) rows (3 tokens x 4 heads of 16).
  for (const auto& nc : {std::pair<int64_t, int64_t>{1, 8}, {3, 16}, {4, 64}, {12, 16}}) {
    // Plain variables, not a structured binding: clang 14 cannot capture one.
    const int64_t N = nc.first, C = nc.second;
    out.push_back({"N" + std::to_string(N) + "_C" + std::to_string(C), [N, C] {
                     auto weight = std::make_shared<Vec>(randn(C, 5));
                     Problem p;
                     p.inputs = {randn(N * C, 1)};
                     p.k = double(C);
                     p.forward = [=](const Inputs& in) {
                       Vec y(size_t(N * C)), r(static_cast<size_t>(N));
                       ops::rmsnorm_forward(y.data(), r.data(), in[0].data(), weight->data(), N, C, 1e-5f);
                       return y;
                     };
                     p.backward = [=](const Inputs& in, const Vec& dout) {
                       Vec y(size_t(N * C)), r(static_cast<size_t>(N)), dx(size_t(N * C));
                       ops::rmsnorm_forward(y.data(), r.data(), in[0].data(), weight->data(), N, C, 1e-5f);
                       ops::rmsnorm_backward(dx.data(), dout.data(), in[0].data(), weight->data(), r.data(), N, C);
                       return Inputs{dx};
                     };
                     return p;
                   }});
  }
  return out;
}
INSTANTIATE_TEST_SUITE_P(OpsRmsnorm, OpsGrad, ::testing::ValuesIn(rmsnorm_cases()), case_name);

// ---- frozen linear: input gradient only, dense and NF4, with and without bias ----
std::vector<OpCase> linear_cases() {
  std::vector<OpCase> out;
  struct S {
    int64_t N, IN, OUT;
    bool nf4, bias;
  };
  // N = 1 and 2 take the fused 4-bit paths both ways, N = 4 fused forward and
  // the panel backward, N = 5 panels both ways; IN = 75 starts rows mid-byte.
  for (S s : {S{2, 16, 8, false, false}, S{3, 64, 24, true, false}, S{2, 128, 40, true, true},
              S{1, 75, 9, true, true}, S{4, 75, 6, true, false}, S{5, 96, 7, true, true}}) {
    out.push_back({std::string(s.nf4 ? "nf4" : "dense") + "_N" + std::to_string(s.N) + "_IN" +
                       std::to_string(s.IN) + "_OUT" + std::to_string(s.OUT) + (s.bias ? "_bias" : ""),
                   [s] {
                     const Vec wf = randn(s.OUT * s.IN, 3, 0.2f);
                     auto q = std::make_shared<Quant4Tensor>(
                         quantize_tensor(wf.data(), {s.OUT, s.IN}, Quant4Type::NF4, 64, false));
                     auto dense = std::make_shared<Vec>(wf);
                     auto bias = std::make_shared<Vec>(randn(s.OUT, 4));
                     auto weight = [=] {
                       ops::LinearWeight w;
                       w.out = s.OUT;
                       w.in = s.IN;
                       if (s.nf4) {
                         w.codes = q->codes.data();
                         w.absmax = q->absmax.data();
                         w.block = q->block;
                       } else {
                         w.dense = dense->data();
                       }
                       return w;
                     };
                     Problem p;
                     p.inputs = {randn(s.N * s.IN, 1)};
                     p.k = double(s.IN);
                     p.forward = [=](const Inputs& in) {
                       Vec y(size_t(s.N * s.OUT));
                       ops::linear_forward(y.data(), in[0].data(), weight(), s.bias ? bias->data() : nullptr, s.N);
                       return y;
                     };
                     p.backward = [=](const Inputs&, const Vec& dout) {
                       Vec dx(size_t(s.N * s.IN), 123.0f);  // assigned: the junk must vanish
                       ops::linear_backward(dx.data(), dout.data(), weight(), s.N);
                       return Inputs{dx};
                     };
                     return p;
                   }});
  }
  return out;
}
INSTANTIATE_TEST_SUITE_P(OpsLinear, OpsGrad, ::testing::ValuesIn(linear_cases()), case_name);

// ---- LoRA: gradients for x, A and B, with dropout on and off ----
std::vector<OpCase> lora_cases() {
  std::vector<OpCase> out;
  struct S {
    int64_t N, IN, OUT, R;
    float scale, p;
  };
  for (S s : {S{2, 8, 6, 2, 2.0f, 0.0f}, S{3, 32, 16, 4, 0.5f, 0.0f}, S{4, 16, 12, 8, 1.5f, 0.25f}}) {
    out.push_back(
        {"N" + std::to_string(s.N) + "_IN" + std::to_string(s.IN) + "_OUT" + std::to_string(s.OUT) + "_R" +
             std::to_string(s.R) + (s.p > 0 ? "_dropout" : ""),
         [s] {
           Problem p;
           p.inputs = {randn(s.N * s.IN, 1), randn(s.R * s.IN, 2, 0.5f), randn(s.OUT * s.R, 3, 0.5f)};
           p.k = double(s.IN + s.R);
           auto fwd = [s](const Inputs& in, Vec& h, Vec& xd) {
             Vec y(size_t(s.N * s.OUT), 0.0f);
             ops::dropout_forward(xd.data(), in[0].data(), s.N * s.IN, s.p, 42);
             ops::lora_forward(y.data(), h.data(), xd.data(), in[1].data(), in[2].data(), s.scale, s.N, s.IN, s.OUT,
                               s.R);
             return y;
           };
           p.forward = [=](const Inputs& in) {
             Vec h(size_t(s.N * s.R)), xd(size_t(s.N * s.IN));
             return fwd(in, h, xd);
           };
           p.backward = [=](const Inputs& in, const Vec& dout) {
             Vec h(size_t(s.N * s.R)), xd(size_t(s.N * s.IN)), dh(size_t(s.N * s.R));
             fwd(in, h, xd);
             Vec dxd(size_t(s.N * s.IN), 0.0f), dx(size_t(s.N * s.IN), 0.0f), dA(in[1].size(), 0.0f),
                 dB(in[2].size(), 0.0f);
             ops::lora_backward(dxd.data(), dA.data(), dB.data(), dh.data(), dout.data(), h.data(), xd.data(),
                                in[1].data(), in[2].data(), s.scale, s.N, s.IN, s.OUT, s.R);
             ops::dropout_backward_accumulate(dx.data(), dxd.data(), s.N * s.IN, s.p, 42);
             return Inputs{dx, dA, dB};
           };
           return p;
         }});
  }
  return out;
}
INSTANTIATE_TEST_SUITE_P(OpsLora, OpsGrad, ::testing::ValuesIn(lora_cases()), case_name);

// ---- RoPE ----
std::vector<OpCase> rope_cases() {
  std::vector<OpCase> out;
  struct S {
    const char* name;
    ops::RopeKind kind;
  };
  for (S s : {S{"none", ops::RopeKind::None}, S{"linear", ops::RopeKind::Linear}, S{"llama3", ops::RopeKind::Llama3}}) {
    out.push_back({std::string(s.name) + "_N5_NH3_D8", [s] {
                     constexpr int64_t N = 5, NH = 3, D = 8, P = 16;
                     ops::RopeParams rp;
                     rp.theta = 100.0;
                     rp.kind = s.kind;
                     rp.factor = 4.0;
                     rp.original_max_positions = 16;
                     auto cos = std::make_shared<Vec>(P * D / 2), sin = std::make_shared<Vec>(P * D / 2);
                     Vec inv(D / 2);
                     ops::rope_inv_freq(inv.data(), rp, D);
                     ops::rope_tables(cos->data(), sin->data(), inv.data(), P, D);
                     auto pos = std::make_shared<std::vector<int32_t>>(std::vector<int32_t>{0, 1, 2, 0, 9});
                     Problem p;
                     p.inputs = {randn(N * NH * D, 1)};
                     p.k = 2;
                     p.forward = [=](const Inputs& in) {
                       Vec y = in[0];
                       ops::rope_forward(y.data(), pos->data(), cos->data(), sin->data(), N, NH, D);
                       return y;
                     };
                     p.backward = [=](const Inputs&, const Vec& dout) {
                       Vec dx = dout;
                       ops::rope_backward(dx.data(), pos->data(), cos->data(), sin->data(), N, NH, D);
                       return Inputs{dx};
                     };
                     return p;
                   }});
  }
  return out;
}
INSTANTIATE_TEST_SUITE_P(OpsRope, OpsGrad, ::testing::ValuesIn(rope_cases()), case_name);

// ---- attention: causal, GQA, packed documents ----
std::vector<OpCase> attention_cases() {
  std::vector<OpCase> out;
  struct S {
    int64_t B, T, H, KVH, D;
    bool packed;
    int64_t window;  // sliding window (0: none), applied as the model does (window_starts)
  };
  // T = 150: three tiles of 64 queries (kernels/cpu/attention.cpp), the second
  // document starting inside the second tile; with a window of 40, tiles whose
  // queries start at different keys.
  for (S s : {S{1, 4, 2, 2, 4, false, 0}, S{2, 6, 4, 2, 8, true, 0}, S{1, 7, 6, 1, 4, true, 0},
              S{1, 9, 2, 1, 4, false, 3}, S{2, 12, 4, 2, 8, true, 4}, S{2, 150, 4, 2, 8, true, 0},
              S{1, 150, 2, 1, 4, true, 40}}) {
    out.push_back({"B" + std::to_string(s.B) + "_T" + std::to_string(s.T) + "_H" + std::to_string(s.H) + "_KVH" +
                       std::to_string(s.KVH) + "_D" + std::to_string(s.D) + (s.packed ? "_packed" : "") +
                       (s.window ? "_window" + std::to_string(s.window) : ""),
                   [s] {
                     // Packed rows: a second document starts at T/2 (its tokens see only it).
                     auto doc = std::make_shared<std::vector<int32_t>>();
                     for (int64_t b = 0; b < s.B; ++b)
                       for (int64_t t = 0; t < s.T; ++t)
                         doc->push_back(int32_t(s.packed && t >= s.T / 2 ? s.T / 2 : 0));
                     if (s.window > 0) window_starts(doc->data(), doc->data(), s.B, s.T, s.window);
                     const int64_t nq = s.B * s.T * s.H * s.D, nk = s.B * s.T * s.KVH * s.D;
                     Problem p;
                     p.inputs = {randn(nq, 1), randn(nk, 2), randn(nk, 3)};
                     p.k = double(s.D + s.T);
                     auto fwd = [s, doc](const Inputs& in, Vec& lse) {
                       Vec y(in[0].size());
                       ops::attention_forward(y.data(), lse.data(), in[0].data(), in[1].data(), in[2].data(),
                                              doc->data(), s.B, s.T, s.H, s.KVH, s.D);
                       return y;
                     };
                     p.forward = [=](const Inputs& in) {
                       Vec lse(size_t(s.B * s.H * s.T));
                       return fwd(in, lse);
                     };
                     p.backward = [=](const Inputs& in, const Vec& dout) {
                       Vec lse(size_t(s.B * s.H * s.T));
                       const Vec y = fwd(in, lse);
                       Vec dq(in[0].size(), 7.0f), dk(in[1].size(), 7.0f), dv(in[2].size(), 7.0f);
                       ops::attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), y.data(), lse.data(),
                                               in[0].data(), in[1].data(), in[2].data(), doc->data(), s.B, s.T,
                                               s.H, s.KVH, s.D);
                       return Inputs{dq, dk, dv};
                     };
                     return p;
                   }});
  }
  return out;
}
INSTANTIATE_TEST_SUITE_P(OpsAttention, OpsGrad, ::testing::ValuesIn(attention_cases()), case_name);

// ---- SwiGLU ----
std::vector<OpCase> swiglu_cases() {
  std::vector<OpCase> out;
  for (int64_t n : {1, 17, 200}) {
    out.push_back({"n" + std::to_string(n), [n] {
                     Problem p;
                     p.inputs = {randn(n, 1, 2.0f), randn(n, 2)};
                     p.k = 4;
                     p.forward = [=](const Inputs& in) {
                       Vec y(static_cast<size_t>(n));
                       ops::swiglu_forward(y.data(), in[0].data(), in[1].data(), n);
                       return y;
                     };
                     p.backward = [=](const Inputs& in, const Vec& dout) {
                       Vec dg(static_cast<size_t>(n)), du(static_cast<size_t>(n));
                       ops::swiglu_backward(dg.data(), du.data(), dout.data(), in[0].data(), in[1].data(), n);
                       return Inputs{dg, du};
                     };
                     return p;
                   }});
  }
  return out;
}
INSTANTIATE_TEST_SUITE_P(OpsSwiglu, OpsGrad, ::testing::ValuesIn(swiglu_cases()), case_name);

// ---- lm_head + chunked cross entropy (ignored targets, chunks not dividing V) ----
std::vector<OpCase> cross_entropy_cases() {
  std::vector<OpCase> out;
  struct S {
    int64_t N, C, V, rows, vchunk;
  };
  for (S s : {S{3, 8, 11, 256, 4096}, S{7, 16, 50, 3, 7}, S{5, 4, 9, 2, 1}}) {
    out.push_back({"N" + std::to_string(s.N) + "_C" + std::to_string(s.C) + "_V" + std::to_string(s.V) + "_rows" +
                       std::to_string(s.rows) + "_vchunk" + std::to_string(s.vchunk),
                   [s] {
                     auto W = std::make_shared<Vec>(randn(s.V * s.C, 2, 0.5f));
                     auto targets = std::make_shared<std::vector<int32_t>>();
                     for (int64_t i = 0; i < s.N; ++i)
                       targets->push_back(i % 3 == 1 ? ops::kIgnoreIndex : int32_t((i * 7) % s.V));
                     const ops::CeChunking ch{s.rows, s.vchunk};
                     const float grad_scale = 1.0f / 3.0f;
                     Problem p;
                     p.inputs = {randn(s.N * s.C, 1)};
                     p.k = double(s.C + s.V);
                     p.forward = [=](const Inputs& in) {
                       Vec losses(static_cast<size_t>(s.N)), lse(static_cast<size_t>(s.N)), scratch(size_t(ch.scratch_floats()));
                       const double sum = ops::lm_head_cross_entropy_forward(
                           losses.data(), lse.data(), in[0].data(), W->data(), targets->data(), scratch.data(), ch,
                           s.N, s.C, s.V);
                       return Vec{float(sum * grad_scale)};
                     };
                     p.backward = [=](const Inputs& in, const Vec& dout) {
                       Vec losses(static_cast<size_t>(s.N)), lse(static_cast<size_t>(s.N)), scratch(size_t(ch.scratch_floats()));
                       Vec dx(in[0].size(), 5.0f);
                       ops::lm_head_cross_entropy_forward(losses.data(), lse.data(), in[0].data(), W->data(),
                                                          targets->data(), scratch.data(), ch, s.N, s.C, s.V);
                       ops::lm_head_cross_entropy_backward(dx.data(), in[0].data(), W->data(), lse.data(),
                                                           targets->data(), grad_scale * dout[0], scratch.data(), ch,
                                                           s.N, s.C, s.V);
                       return Inputs{dx};
                     };
                     return p;
                   }});
  }
  return out;
}
INSTANTIATE_TEST_SUITE_P(OpsCrossEntropy, OpsGrad, ::testing::ValuesIn(cross_entropy_cases()), case_name);

}  // namespace
}  // namespace qlora
