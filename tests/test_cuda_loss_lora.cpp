// lm_head + chunked cross entropy, the LoRA branch and dropout on the GPU
// (kernels/cuda/loss_cuda.h, kernels/cuda/lora_cuda.h) against the fp32 CPU
// ops (kernels/ops.h), on one case list per op family.
//
// LossLoraCases* (every machine): the CPU ops on these cases against double
// precision, with worst-case fp32 bounds (a sum of n terms computed in fp32 in
// any order is off by at most n * 2^-24 of the sum of their magnitudes; 2^-23
// doubles that for the exp/log ulps); plus a check that the GPU thresholds
// below admit a CPU emulation of the GPU's bf16 roundings, so the threshold
// code itself has run before a GPU ever sees it.
// CudaLossLoraArgs* (builds with CUDA): host-side validation that throws
// before any device call, so it runs without a GPU too.
// CudaLossLora* (GPU): both backends on the same bf16-representable inputs.
//
// The GPU thresholds follow from where the GPU differs from the CPU:
//  1. each bf16 output is rounded once to nearest even: at most half an ulp,
//     2^-8 |value| (8 significant bits): the term 2^-8 |cpu|;
//  2. fp32 reassociation (cuBLAS's accumulation order, thread-strided
//     partials and trees against the CPU's sequential sums), expf against
//     std::exp and FMA contraction: a few to a few hundred fp32 ulps of the
//     size of the terms, bounded by 2^-12 * sum|terms| (4096 ulps: never a
//     flake, yet a wrong index or a missing term is far outside);
//  3. the GPU rounds an intermediate to bf16 where it is the input of the next
//     GEMM (LoRA's h and dh, the dlogits of the loss): that rounding's error
//     2^-8 |intermediate| (plus its own fp32 slack) is carried through the
//     product, sum_k err_k |other factor_k|.
// lse and the losses stay fp32, so only 2. applies to them. Dropout's mask is
// integer arithmetic and its value one fp32 product (and sum), made with the
// same IEEE operations on both sides, so the GPU equals the CPU's fp32 result
// rounded to bf16 bit for bit.
//
// Outputs are poisoned (0xFF bytes: NaN in bf16 and fp32) before every GPU
// run, the op workspace too, so an unwritten element or a read of an
// unwritten intermediate fails.
#include <gtest/gtest.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "kernels/ops.h"
#include "op_cases.h"

#if QLORA_HAVE_CUDA
#include "kernels/cuda/context.h"
#include "kernels/cuda/device.h"
#include "kernels/cuda/lora_cuda.h"
#include "kernels/cuda/loss_cuda.h"
#endif

#include "cuda_testing.h"
#include "testing.h"

namespace qlora {
namespace {

using op_cases::bf16_randn;
using op_cases::uniform_ids;

using testing::sz;

constexpr double kBf16HalfUlp = 1.0 / 256;      // 2^-8: one rounding to bf16
constexpr double kFp32Slack = 1.0 / 4096;       // 2^-12 of the terms: GPU-vs-CPU fp32 differences
constexpr double kFp32Bound = 1.0 / (1 << 23);  // 2^-23: worst-case fp32 bound per term (CPU checks)
constexpr double kFp32Lse = 1.0 / (1 << 20);    // 2^-20 |lse|: the final fp32 add m + log(l), 16 ulps

double round_bf16(double v) {
  return bf16_to_f32(f32_to_bf16(static_cast<float>(v)));
}

// n fp32 Gaussian values (not rounded to bf16: the fp32 parameter gradients).
std::vector<float> f32_randn(int64_t n, unsigned seed, float sigma) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, sigma);
  std::vector<float> x(sz(n));
  for (auto& v : x) v = d(rng);
  return x;
}

// Every i: got[i] is finite and |got[i] - want[i]| <= tol[i].
template <typename Got, typename Want>
::testing::AssertionResult within(const std::vector<Got>& got, const std::vector<Want>& want,
                                  const std::vector<double>& tol) {
  if (got.size() != want.size() || got.size() != tol.size())
    return ::testing::AssertionFailure()
           << "sizes differ: got " << got.size() << ", want " << want.size() << ", tol " << tol.size();
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = double(got[i]), w = double(want[i]);
    if (!std::isfinite(g) || !(std::abs(g - w) <= tol[i]))
      return ::testing::AssertionFailure()
             << "first difference at " << i << ": got " << g << ", want " << w << ", allowed " << tol[i];
  }
  return ::testing::AssertionSuccess();
}

// C (M,Nc) = sum_k a(i,k) b(k,j) in double, with the sum of the magnitudes of
// the terms beside it (the size the fp32 error bounds scale with).
struct Product {
  std::vector<double> val, mag;
};
template <typename FA, typename FB>
Product product(int64_t M, int64_t Nc, int64_t K, FA a, FB b) {
  Product p{std::vector<double>(sz(M * Nc)), std::vector<double>(sz(M * Nc))};
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < Nc; ++j) {
      double v = 0.0, m = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        const double t = a(i, k) * b(k, j);
        v += t;
        m += std::abs(t);
      }
      p.val[sz(i * Nc + j)] = v;
      p.mag[sz(i * Nc + j)] = m;
    }
  return p;
}

// Row-major (rows, cols) matrix element accessors for product().
auto rm(const std::vector<float>& m, int64_t cols) {
  return [&m, cols](int64_t i, int64_t k) { return double(m[sz(i * cols + k)]); };
}
auto rm(const std::vector<double>& m, int64_t cols) {
  return [&m, cols](int64_t i, int64_t k) { return m[sz(i * cols + k)]; };
}
// Element (i,k) of the transpose of a row-major (rows, cols) matrix.
auto tr(const std::vector<float>& m, int64_t cols) {
  return [&m, cols](int64_t i, int64_t k) { return double(m[sz(k * cols + i)]); };
}
auto tr(const std::vector<double>& m, int64_t cols) {
  return [&m, cols](int64_t i, int64_t k) { return m[sz(k * cols + i)]; };
}

// ---- cross entropy: cases, CPU runs, double reference, thresholds ----------------------------

struct CeCase {
  int64_t N, C, V, rows, vchunk;
  float wscale;  // standard deviation of W (x has 1): logits of sqrt(C) * wscale
};
std::vector<CeCase> ce_cases() {
  return {{1, 8, 3, 1, 2, 0.5f},             // one row; V = 3 in chunks of 2 and 1
          {5, 33, 1000, 2, 300, 0.2f},       // row chunks 2, 2, 1; vocabulary chunks 300 x 3 + 100
          {77, 256, 5003, 16, 1024, 0.1f},   // 5003 = 4 x 1024 + 907; 77 = 4 x 16 + 13
          {77, 100, 5003, 256, 4096, 0.1f},  // rows clamp to N; two vocabulary chunks
          {5, 64, 1000, 8, 8192, 0.2f},      // both clamp: a single tile
          {13, 64, 777, 4, 100, 4.0f}};      // logits of +-30 and more: the running max moves between chunks
}

std::string describe(const CeCase& c) {
  std::ostringstream os;
  os << "cross entropy N " << c.N << " C " << c.C << " V " << c.V << " rows " << c.rows << " vchunk "
     << c.vchunk << " wscale " << c.wscale;
  return os.str();
}

ops::CeChunking chunking_of(const CeCase& c) {
  ops::CeChunking ch;
  ch.rows = c.rows;
  ch.vchunk = c.vchunk;
  return ch;
}

// Uniform targets; every 4th row (from row 2) ignored; the last vocabulary
// entry, the first one and the first of the second chunk appear.
std::vector<int32_t> ce_targets(const CeCase& c) {
  auto t = uniform_ids(c.N, 23, c.V);
  for (int64_t i = 2; i < c.N; i += 4) t[sz(i)] = ops::kIgnoreIndex;
  t[0] = static_cast<int32_t>(c.V - 1);
  if (c.N > 3) t[sz(c.N - 1)] = 0;
  if (c.N > 5 && c.vchunk < c.V) t[5] = static_cast<int32_t>(c.vchunk);
  return t;
}

struct CeRun {
  int64_t N = 0, C = 0, V = 0;
  ops::CeChunking chunking;
  std::vector<float> x, W;             // (N,C), (V,C): bf16-representable
  std::vector<int32_t> t;              // (N)
  float grad_scale = 0.0f;             // 1 / (number of counted targets)
  std::vector<float> losses, lse, dx;  // CPU op
  double total = 0.0;                  // what the CPU forward returned
};

// Runs the CPU forward and backward on the run's inputs.
void ce_cpu(CeRun& r) {
  int64_t counted = 0;
  for (int32_t v : r.t) counted += (v >= 0 && v < r.V) ? 1 : 0;
  r.grad_scale = 1.0f / static_cast<float>(std::max<int64_t>(counted, 1));
  std::vector<float> scratch(sz(r.chunking.scratch_floats()));
  r.losses.assign(sz(r.N), 0.0f);
  r.lse.assign(sz(r.N), 0.0f);
  r.dx.assign(sz(r.N * r.C), 0.0f);
  r.total = ops::lm_head_cross_entropy_forward(r.losses.data(), r.lse.data(), r.x.data(), r.W.data(),
                                               r.t.data(), scratch.data(), r.chunking, r.N, r.C, r.V);
  ops::lm_head_cross_entropy_backward(r.dx.data(), r.x.data(), r.W.data(), r.lse.data(), r.t.data(),
                                      r.grad_scale, scratch.data(), r.chunking, r.N, r.C, r.V);
}

CeRun ce_run(const CeCase& c) {
  CeRun r;
  r.N = c.N;
  r.C = c.C;
  r.V = c.V;
  r.chunking = chunking_of(c);
  r.x = bf16_randn(c.N * c.C, 21, 1.0f);
  r.W = bf16_randn(c.V * c.C, 22, c.wscale);
  r.t = ce_targets(c);
  ce_cpu(r);
  return r;
}

// The exact (double) log-softmax of every row and the sizes the bounds need.
struct CeRef {
  std::vector<double> lse, loss;  // (N)
  std::vector<double> max_s;      // (N): max over v of S_v = sum_c |x_c W_vc|, the size of logit v's terms
  std::vector<double> s_t;        // (N): S of the target (0 when not counted)
  std::vector<double> dx;         // (N,C): sum_v g_v W_vc, g_v = (p_v - [v = t]) grad_scale
  std::vector<double> dx_mag;     // (N,C): sum_v |g_v W_vc|
  std::vector<double> dx_p;       // (N,C): sum_v |W_vc| grad_scale p_v
  std::vector<double> dx_ps;      // (N,C): sum_v |W_vc| grad_scale p_v S_v
  std::vector<double> dx_emul;    // (N,C): a GPU emulated: g_v rounded to bf16, exact sum, rounded to bf16
};
CeRef ce_reference(const CeRun& r) {
  const int64_t N = r.N, C = r.C, V = r.V;
  CeRef ref;
  ref.lse.assign(sz(N), 0.0);
  ref.loss.assign(sz(N), 0.0);
  ref.max_s.assign(sz(N), 0.0);
  ref.s_t.assign(sz(N), 0.0);
  for (auto* v : {&ref.dx, &ref.dx_mag, &ref.dx_p, &ref.dx_ps, &ref.dx_emul}) v->assign(sz(N * C), 0.0);
  std::vector<double> z(sz(V)), S(sz(V));
  const double gs = r.grad_scale;
  for (int64_t i = 0; i < N; ++i) {
    const float* xi = r.x.data() + i * C;
    for (int64_t v = 0; v < V; ++v) {
      const float* w = r.W.data() + v * C;
      double a = 0.0, m = 0.0;
      for (int64_t k = 0; k < C; ++k) {
        const double p = double(xi[k]) * w[k];
        a += p;
        m += std::abs(p);
      }
      z[sz(v)] = a;
      S[sz(v)] = m;
    }
    const double zmax = *std::max_element(z.begin(), z.end());
    double sum = 0.0;
    for (double v : z) sum += std::exp(v - zmax);
    const double lse = zmax + std::log(sum);
    ref.lse[sz(i)] = lse;
    ref.max_s[sz(i)] = *std::max_element(S.begin(), S.end());
    const int32_t t = r.t[sz(i)];
    if (t < 0 || t >= V) continue;  // ignored: loss 0, dx row 0
    ref.loss[sz(i)] = lse - z[sz(t)];
    ref.s_t[sz(i)] = S[sz(t)];
    double* dx = ref.dx.data() + i * C;
    double* mag = ref.dx_mag.data() + i * C;
    double* dp = ref.dx_p.data() + i * C;
    double* dps = ref.dx_ps.data() + i * C;
    double* em = ref.dx_emul.data() + i * C;
    for (int64_t v = 0; v < V; ++v) {
      const double p = std::exp(z[sz(v)] - lse);
      const double g = (p - (v == t ? 1.0 : 0.0)) * gs;
      const double gb = round_bf16(g);
      const double gp = gs * p, gps = gs * p * S[sz(v)];
      const float* w = r.W.data() + v * C;
      for (int64_t k = 0; k < C; ++k) {
        const double wk = w[k];
        dx[k] += g * wk;
        mag[k] += std::abs(g * wk);
        dp[k] += std::abs(wk) * gp;
        dps[k] += std::abs(wk) * gps;
        em[k] += gb * wk;
      }
    }
    for (int64_t k = 0; k < C; ++k) em[k] = round_bf16(em[k]);
  }
  return ref;
}

struct CeTolerance {
  std::vector<double> lse, loss, dx;
};

// CPU op against the double reference, worst-case fp32 bounds (2^-23 per term):
//  - logit v is a sum of C products: off by C 2^-23 S_v;
//  - lse moves by at most the largest logit error (its gradient, the softmax,
//    sums to 1); the sum of V exps (rescaled once per chunk) is off by
//    (V + 2 chunks) 2^-23 relative, i.e. that much in the log; the add m + log l
//    by 2^-23 |lse|;
//  - the loss adds the CPU's own sequential dot for the target: C 2^-23 S_t;
//  - dx: the dlogits carry p_v (logit error + lse error) relative, then sgemm
//    sums V products: V 2^-23 sum|g W|.
CeTolerance ce_cpu_tolerance(const CeRun& r, const CeRef& ref) {
  CeTolerance tol{std::vector<double>(sz(r.N)), std::vector<double>(sz(r.N)),
                  std::vector<double>(sz(r.N * r.C))};
  const int64_t vc = std::min(r.chunking.vchunk, r.V);
  const double chunks = double((r.V + vc - 1) / vc);
  for (int64_t i = 0; i < r.N; ++i) {
    const double l = kFp32Bound * (double(r.C) * ref.max_s[sz(i)] + double(r.V) + 2 * chunks +
                                   std::abs(ref.lse[sz(i)]) + 2);
    tol.lse[sz(i)] = l;
    const bool counted = r.t[sz(i)] >= 0 && r.t[sz(i)] < r.V;
    tol.loss[sz(i)] = counted ? l + kFp32Bound * double(r.C) * ref.s_t[sz(i)] : 0.0;
    for (int64_t k = 0; k < r.C; ++k) {
      const size_t e = sz(i * r.C + k);
      tol.dx[e] = kFp32Bound * (double(r.V) * ref.dx_mag[e] + double(r.C) * ref.dx_ps[e]) +
                  (l + kFp32Bound) * ref.dx_p[e];
    }
  }
  return tol;
}

// GPU against the CPU op (see the top of the file):
//  - lse: logits off by 2^-12 S_v (2.), so lse by 2^-12 max S; the sum of
//    exps by 2^-12 relative, 2^-12 in the log; the final add 2^-20 |lse|;
//  - loss: lse's bound plus the target logit's 2^-12 S_t; exactly 0 when not
//    counted;
//  - dx (the backward is given the CPU's lse): the dlogits are off by
//    g_p (2^-12 S_v) from the logits and 2^-12 p_v from expf (2.), then
//    rounded to bf16, 2^-8 |g_v| (3.); the GEMM adds 2^-12 sum|g W| (2.); the
//    output rounding 2^-8 |dx| (1.). Uncounted rows are exactly 0.
CeTolerance ce_gpu_tolerance(const CeRun& r, const CeRef& ref) {
  CeTolerance tol{std::vector<double>(sz(r.N)), std::vector<double>(sz(r.N)),
                  std::vector<double>(sz(r.N * r.C))};
  for (int64_t i = 0; i < r.N; ++i) {
    const double l = kFp32Slack * (1.0 + ref.max_s[sz(i)]) + kFp32Lse * std::abs(r.lse[sz(i)]);
    tol.lse[sz(i)] = l;
    const bool counted = r.t[sz(i)] >= 0 && r.t[sz(i)] < r.V;
    tol.loss[sz(i)] = counted ? l + kFp32Slack * ref.s_t[sz(i)] : 0.0;
    for (int64_t k = 0; k < r.C; ++k) {
      const size_t e = sz(i * r.C + k);
      tol.dx[e] = kBf16HalfUlp * std::abs(double(r.dx[e])) + (kBf16HalfUlp + kFp32Slack) * ref.dx_mag[e] +
                  kFp32Slack * (ref.dx_ps[e] + ref.dx_p[e]);
    }
  }
  return tol;
}

// A structured case where every logit is exact and every vocabulary entry
// changes the result by far more than the bounds: C = M one-hot rows x_k = e_k,
// W[cols[k]] = 4 e_k (all other W rows 0), plus three all-zero rows. Row k's
// logits are 4 at cols[k] and 0 elsewhere; a zero row's are all 0, so its lse
// is log V. Dropping or double-counting any entry moves lse by >= 1/(e^4 + V)
// = 2.2e-3, the dominant one by 0.1 or more; the bound is 2^-22 (V + |lse| +
// 8) ~ 1e-4. cols sit on the chunk boundaries (vchunk 50, V 403 = 8 x 50 + 3),
// so the running max is rescaled across chunks (a 4 after 0s).
CeRun ce_coverage_run() {
  const std::vector<int32_t> cols = {0, 49, 50, 99, 100, 249, 250, 399, 400, 402};
  CeRun r;
  const int64_t M = static_cast<int64_t>(cols.size());
  r.N = M + 3;
  r.C = M;
  r.V = 403;
  r.chunking.rows = 3;  // row chunks 3, 3, 3, 3, 1
  r.chunking.vchunk = 50;
  r.x.assign(sz(r.N * r.C), 0.0f);
  r.W.assign(sz(r.V * r.C), 0.0f);
  r.t.assign(sz(r.N), 0);
  for (int64_t k = 0; k < M; ++k) {
    // The zero rows sit at 1, 6 and 11 (between chunks of one-hot rows).
    const int64_t i = k + (k >= 1) + (k >= 5) + (k >= 9);
    r.x[sz(i * r.C + k)] = 1.0f;
    r.W[sz(cols[sz(k)] * r.C + k)] = 4.0f;
    // Even k: the dominant entry is the target; odd k: another boundary column.
    r.t[sz(i)] = k % 2 == 0 ? cols[sz(k)] : cols[sz((k + 1) % M)];
  }
  r.t[1] = 0;
  r.t[6] = static_cast<int32_t>(r.V - 1);
  r.t[11] = ops::kIgnoreIndex;
  ce_cpu(r);
  return r;
}

// The coverage case's bounds, against the double reference (both backends):
// logits exact, so lse and the loss are off only by the sum of V exps and the
// log (2^-22 (V + |lse| + 8), twice the worst case); dx = 4 g exactly but for
// g's own error (grad_scale times p's error, bounded by the lse bound, twice
// for both lse's) and, on the GPU, one bf16 rounding of g (2^-8 |dx|).
CeTolerance ce_coverage_tolerance(const CeRun& r, const CeRef& ref) {
  CeTolerance tol{std::vector<double>(sz(r.N)), std::vector<double>(sz(r.N)),
                  std::vector<double>(sz(r.N * r.C))};
  for (int64_t i = 0; i < r.N; ++i) {
    const double l = 2 * kFp32Bound * (double(r.V) + std::abs(ref.lse[sz(i)]) + 8);
    tol.lse[sz(i)] = l;
    tol.loss[sz(i)] = r.t[sz(i)] >= 0 ? l : 0.0;
    for (int64_t k = 0; k < r.C; ++k) {
      const size_t e = sz(i * r.C + k);
      tol.dx[e] = r.t[sz(i)] >= 0
                      ? kBf16HalfUlp * std::abs(ref.dx[e]) + 4.0 * r.grad_scale * (2 * l + kFp32Bound)
                      : 0.0;
    }
  }
  return tol;
}

// ---- LoRA: cases, CPU runs, thresholds -----------------------------------------------------

struct LoraCase {
  int64_t N, IN, OUT, R;
  float scale;
};
std::vector<LoraCase> lora_cases() {
  return {{1, 7, 5, 1, 2.0f}, {5, 33, 17, 8, 0.5f}, {77, 129, 95, 16, 2.0f}, {64, 255, 301, 8, 0.25f}};
}

std::string describe(const LoraCase& c) {
  std::ostringstream os;
  os << "lora N " << c.N << " IN " << c.IN << " OUT " << c.OUT << " R " << c.R << " scale " << c.scale;
  return os.str();
}

struct LoraRun {
  std::vector<float> xd, A, B, out0;  // (N,IN), (R,IN), (OUT,R), (N,OUT): bf16-representable
  std::vector<float> h, out;          // CPU forward: (N,R), (N,OUT)
  std::vector<float> hb, dout, dinp0, dA0,
      dB0;                              // backward inputs: h in bf16, (N,OUT), (N,IN), fp32 (R,IN), (OUT,R)
  std::vector<float> dinp, dA, dB, dh;  // CPU backward
};
LoraRun lora_run(const LoraCase& c) {
  LoraRun r;
  r.xd = bf16_randn(c.N * c.IN, 31, 1.0f);
  r.A = bf16_randn(c.R * c.IN, 32, 1.0f / std::sqrt(static_cast<float>(c.IN)));
  r.B = bf16_randn(c.OUT * c.R, 33, 0.1f);
  r.out0 = bf16_randn(c.N * c.OUT, 34, 1.0f);
  r.h.assign(sz(c.N * c.R), 0.0f);
  r.out = r.out0;
  ops::lora_forward(r.out.data(), r.h.data(), r.xd.data(), r.A.data(), r.B.data(), c.scale, c.N, c.IN, c.OUT,
                    c.R);
  // The backward is tested on its own: both sides get the same bf16 h.
  r.hb.resize(r.h.size());
  for (size_t i = 0; i < r.h.size(); ++i) r.hb[i] = static_cast<float>(round_bf16(r.h[i]));
  r.dout = bf16_randn(c.N * c.OUT, 35, 1.0f);
  r.dinp0 = bf16_randn(c.N * c.IN, 36, 1.0f);
  r.dA0 = f32_randn(c.R * c.IN, 37, 0.01f);
  r.dB0 = f32_randn(c.OUT * c.R, 38, 0.01f);
  r.dinp = r.dinp0;
  r.dA = r.dA0;
  r.dB = r.dB0;
  r.dh.assign(sz(c.N * c.R), 0.0f);
  ops::lora_backward(r.dinp.data(), r.dA.data(), r.dB.data(), r.dh.data(), r.dout.data(), r.hb.data(),
                     r.xd.data(), r.A.data(), r.B.data(), c.scale, c.N, c.IN, c.OUT, c.R);
  return r;
}

struct LoraTolerance {
  std::vector<double> h, out, dB, dh, dA, dinp;
};

// GPU against the CPU op (see the top of the file; "mag" = sum of |terms|):
//  h   = bf16(xd A^T):                 2^-8 |h| + 2^-12 mag(xd A^T)
//  out = bf16(out0 + s h_bf16 B^T):    2^-8 |out| + 2^-12 (|out0| + |s| mag(h B^T)) + |s| sum_r tol_h |B|
//  dB  = dB0 + s dout^T h (fp32):       2^-12 (|dB0| + |s| mag(dout^T h))
//  dh  = bf16(s dout B):               2^-8 |dh| + 2^-12 |s| mag(dout B)
//  dA  = dA0 + dh_bf16^T xd (fp32):     2^-12 (|dA0| + mag(dh^T xd)) + sum_n tol_dh |xd|
//  dinp = bf16(dinp0 + dh_bf16 A):     2^-8 |dinp| + 2^-12 (|dinp0| + mag(dh A)) + sum_r tol_dh |A|
LoraTolerance lora_gpu_tolerance(const LoraCase& c, const LoraRun& r) {
  const int64_t N = c.N, IN = c.IN, OUT = c.OUT, R = c.R;
  const double s = std::abs(double(c.scale));
  LoraTolerance tol;
  const Product xa = product(N, R, IN, rm(r.xd, IN), tr(r.A, IN));
  tol.h.resize(r.h.size());
  for (size_t e = 0; e < tol.h.size(); ++e)
    tol.h[e] = kBf16HalfUlp * std::abs(double(r.h[e])) + kFp32Slack * xa.mag[e];
  const Product hb = product(N, OUT, R, rm(r.h, R), tr(r.B, R));
  const Product carry_h = product(N, OUT, R, rm(tol.h, R), tr(r.B, R));
  tol.out.resize(r.out.size());
  for (size_t e = 0; e < tol.out.size(); ++e)
    tol.out[e] = kBf16HalfUlp * std::abs(double(r.out[e])) +
                 kFp32Slack * (std::abs(double(r.out0[e])) + s * hb.mag[e]) + s * carry_h.mag[e];

  const Product dbm = product(OUT, R, N, tr(r.dout, OUT), rm(r.hb, R));
  tol.dB.resize(r.dB.size());
  for (size_t e = 0; e < tol.dB.size(); ++e)
    tol.dB[e] = kFp32Slack * (std::abs(double(r.dB0[e])) + s * dbm.mag[e]);
  const Product dhm = product(N, R, OUT, rm(r.dout, OUT), rm(r.B, R));
  tol.dh.resize(r.dh.size());
  for (size_t e = 0; e < tol.dh.size(); ++e)
    tol.dh[e] = kBf16HalfUlp * std::abs(double(r.dh[e])) + kFp32Slack * s * dhm.mag[e];
  const Product dam = product(R, IN, N, tr(r.dh, R), rm(r.xd, IN));
  const Product carry_da = product(R, IN, N, tr(tol.dh, R), rm(r.xd, IN));
  tol.dA.resize(r.dA.size());
  for (size_t e = 0; e < tol.dA.size(); ++e)
    tol.dA[e] = kFp32Slack * (std::abs(double(r.dA0[e])) + dam.mag[e]) + carry_da.mag[e];
  const Product dim = product(N, IN, R, rm(r.dh, R), rm(r.A, IN));
  const Product carry_di = product(N, IN, R, rm(tol.dh, R), rm(r.A, IN));
  tol.dinp.resize(r.dinp.size());
  for (size_t e = 0; e < tol.dinp.size(); ++e)
    tol.dinp[e] = kBf16HalfUlp * std::abs(double(r.dinp[e])) +
                  kFp32Slack * (std::abs(double(r.dinp0[e])) + dim.mag[e]) + carry_di.mag[e];
  return tol;
}

// ---- dropout cases -------------------------------------------------------------------------

struct DropoutCase {
  int64_t n;
  float p;
  uint64_t seed;
};
std::vector<DropoutCase> dropout_cases() {
  return {
      {1, 0.1f, 1}, {1000, 0.05f, 42}, {70001, 0.5f, 7}, {4097, 0.0f, 3}, {333, 0.9f, 0xfedcba9876543210ull}};
}

std::string describe(const DropoutCase& c) {
  std::ostringstream os;
  os << "dropout n " << c.n << " p " << c.p << " seed " << c.seed;
  return os.str();
}

// bf16 Gaussian values with no zero, so a zero output means a drop.
std::vector<float> nonzero_randn(int64_t n, unsigned seed) {
  auto v = bf16_randn(n, seed, 1.0f);
  for (auto& x : v)
    if (x == 0.0f) x = 1.0f;
  return v;
}

// ---- CPU side: runs on every machine -------------------------------------------------------

TEST(LossLoraCases, CrossEntropyCpuMatchesDoubleLogSoftmax) {
  for (const CeCase& c : ce_cases()) {
    const std::string what = describe(c);
    const CeRun r = ce_run(c);
    const CeRef ref = ce_reference(r);
    const CeTolerance tol = ce_cpu_tolerance(r, ref);
    EXPECT_TRUE(within(r.lse, ref.lse, tol.lse)) << what << " lse";
    EXPECT_TRUE(within(r.losses, ref.loss, tol.loss)) << what << " losses";
    EXPECT_TRUE(within(r.dx, ref.dx, tol.dx)) << what << " dx";
    double sum = 0.0;
    for (float l : r.losses) sum += l;
    EXPECT_NEAR(r.total, sum, 1e-12 * std::max(1.0, std::abs(sum))) << what;
  }
}

TEST(LossLoraCases, CrossEntropyCpuCountsEveryVocabularyEntryOnce) {
  const CeRun r = ce_coverage_run();
  const CeRef ref = ce_reference(r);
  const CeTolerance tol = ce_coverage_tolerance(r, ref);
  EXPECT_NEAR(ref.lse[1], std::log(double(r.V)), 1e-12);  // a zero row: all logits 0
  EXPECT_TRUE(within(r.lse, ref.lse, tol.lse)) << "coverage lse";
  EXPECT_TRUE(within(r.losses, ref.loss, tol.loss)) << "coverage losses";
  EXPECT_TRUE(within(r.dx, ref.dx, tol.dx)) << "coverage dx";
}

// The GPU thresholds must admit a GPU that rounds exactly where the real one
// does (here emulated: the bf16 roundings on exact sums). This also runs the
// threshold code on machines without a GPU.
TEST(LossLoraCases, GpuThresholdsAdmitAnEmulatedBf16Gpu) {
  for (const CeCase& c : ce_cases()) {
    const CeRun r = ce_run(c);
    const CeRef ref = ce_reference(r);
    const CeTolerance tol = ce_gpu_tolerance(r, ref);
    EXPECT_TRUE(within(ref.lse, r.lse, tol.lse)) << describe(c) << " lse";
    EXPECT_TRUE(within(ref.loss, r.losses, tol.loss)) << describe(c) << " losses";
    EXPECT_TRUE(within(ref.dx_emul, r.dx, tol.dx)) << describe(c) << " dx";
  }
  {
    const CeRun r = ce_coverage_run();
    const CeRef ref = ce_reference(r);
    EXPECT_TRUE(within(ref.dx_emul, ref.dx, ce_coverage_tolerance(r, ref).dx)) << "coverage dx";
  }
  for (const LoraCase& c : lora_cases()) {
    const std::string what = describe(c);
    const LoraRun r = lora_run(c);
    const LoraTolerance tol = lora_gpu_tolerance(c, r);
    // The emulated GPU: fp32 results rounded where the GPU stores bf16, and
    // the products after a bf16 intermediate taken exactly from it.
    std::vector<double> h(r.h.size()), dh(r.dh.size());
    for (size_t e = 0; e < h.size(); ++e) h[e] = round_bf16(r.h[e]);
    for (size_t e = 0; e < dh.size(); ++e) dh[e] = round_bf16(r.dh[e]);
    const Product hb = product(c.N, c.OUT, c.R, rm(h, c.R), tr(r.B, c.R));
    std::vector<double> out(r.out.size());
    for (size_t e = 0; e < out.size(); ++e)
      out[e] = round_bf16(double(r.out0[e]) + double(c.scale) * hb.val[e]);
    const Product da = product(c.R, c.IN, c.N, tr(dh, c.R), rm(r.xd, c.IN));
    std::vector<double> dA(r.dA.size());
    for (size_t e = 0; e < dA.size(); ++e) dA[e] = double(static_cast<float>(double(r.dA0[e]) + da.val[e]));
    const Product di = product(c.N, c.IN, c.R, rm(dh, c.R), rm(r.A, c.IN));
    std::vector<double> dinp(r.dinp.size());
    for (size_t e = 0; e < dinp.size(); ++e) dinp[e] = round_bf16(double(r.dinp0[e]) + di.val[e]);
    EXPECT_TRUE(within(h, r.h, tol.h)) << what << " h";
    EXPECT_TRUE(within(out, r.out, tol.out)) << what << " out";
    EXPECT_TRUE(within(r.dB, r.dB, tol.dB)) << what << " dB";
    EXPECT_TRUE(within(dh, r.dh, tol.dh)) << what << " dh";
    EXPECT_TRUE(within(dA, r.dA, tol.dA)) << what << " dA";
    EXPECT_TRUE(within(dinp, r.dinp, tol.dinp)) << what << " dinp";
  }
}

// The masks the GPU must reproduce: about p of the elements dropped (within
// 6 binomial standard deviations), p = 0 a copy, and the backward adding
// exactly where the forward kept.
TEST(LossLoraCases, DropoutCpuMasksDropAboutPAndBackwardFollowsThem) {
  for (const DropoutCase& c : dropout_cases()) {
    const std::string what = describe(c);
    const auto inp = nonzero_randn(c.n, 41);
    std::vector<float> out(sz(c.n));
    ops::dropout_forward(out.data(), inp.data(), c.n, c.p, c.seed);
    const auto drops = std::count(out.begin(), out.end(), 0.0f);
    if (c.p == 0.0f) {
      EXPECT_EQ(out, inp) << what;
    } else if (c.n >= 1000) {
      const double n = double(c.n), p = c.p;
      EXPECT_NEAR(double(drops), n * p, 6 * std::sqrt(n * p * (1 - p)) + 1) << what;
    }
    std::vector<float> dinp(sz(c.n), 0.0f);
    const std::vector<float> dout(sz(c.n), 1.0f);
    ops::dropout_backward_accumulate(dinp.data(), dout.data(), c.n, c.p, c.seed);
    for (size_t i = 0; i < dinp.size(); ++i)
      ASSERT_EQ(dinp[i] != 0.0f, out[i] != 0.0f) << what << " at " << i;
  }
}

// ---- host-side validation of the CUDA entry points (no GPU needed) ---------------------------

#if QLORA_HAVE_CUDA

TEST(CudaLossLoraArgs, DropoutRejectsInvalidArgumentsBeforeAnyDeviceCall) {
  uint16_t host[8] = {};  // never dereferenced: every call below throws first or has nothing to do
  EXPECT_THROW(cuda_ops::dropout_forward(nullptr, host, 8, 0.1f, 1, nullptr), Error);
  EXPECT_THROW(cuda_ops::dropout_forward(host, nullptr, 8, 0.1f, 1, nullptr), Error);
  EXPECT_THROW(cuda_ops::dropout_forward(host, host, -1, 0.1f, 1, nullptr), Error);
  EXPECT_THROW(cuda_ops::dropout_forward(host, host, 8, 1.0f, 1, nullptr), Error);
  EXPECT_THROW(cuda_ops::dropout_forward(host, host, 8, -0.25f, 1, nullptr), Error);
  EXPECT_THROW(cuda_ops::dropout_forward(host, host, 8, std::numeric_limits<float>::quiet_NaN(), 1, nullptr),
               Error);
  EXPECT_THROW(cuda_ops::dropout_backward_accumulate(nullptr, host, 8, 0.1f, 1, nullptr), Error);
  EXPECT_THROW(cuda_ops::dropout_backward_accumulate(host, host, 8, 1.5f, 1, nullptr), Error);
  EXPECT_NO_THROW(cuda_ops::dropout_forward(nullptr, nullptr, 0, 0.1f, 1, nullptr));
  EXPECT_NO_THROW(cuda_ops::dropout_backward_accumulate(nullptr, nullptr, 0, 0.0f, 1, nullptr));
}

TEST(CudaLossLoraArgs, CrossEntropyWorkspaceHoldsTheTilesAndClampsTheChunks) {
  ops::CeChunking ch;
  ch.rows = 16;
  ch.vchunk = 1024;
  // The backward's fp32 tile, bf16 dlogits tile and fp32 dx accumulator; the forward's tile and row state.
  const size_t bytes = cuda_ops::lm_head_ce_workspace_bytes(ch, 77, 256, 5003);
  EXPECT_GE(bytes, sz(16 * 1024 * 4 + 16 * 1024 * 2 + 16 * 256 * 4));
  EXPECT_GE(bytes, sz(16 * 1024 * 4 + 3 * 16 * 4));
  ops::CeChunking big;
  big.rows = 256;
  big.vchunk = 8192;
  ops::CeChunking exact;
  exact.rows = 5;
  exact.vchunk = 1000;
  EXPECT_EQ(cuda_ops::lm_head_ce_workspace_bytes(big, 5, 64, 1000),
            cuda_ops::lm_head_ce_workspace_bytes(exact, 5, 64, 1000));
  EXPECT_EQ(cuda_ops::lm_head_ce_workspace_bytes(ch, 0, 64, 1000), 0u);
  ops::CeChunking zero_rows = ch;
  zero_rows.rows = 0;
  EXPECT_THROW(cuda_ops::lm_head_ce_workspace_bytes(zero_rows, 5, 64, 1000), Error);
  ops::CeChunking neg_vchunk = ch;
  neg_vchunk.vchunk = -1;
  EXPECT_THROW(cuda_ops::lm_head_ce_workspace_bytes(neg_vchunk, 5, 64, 1000), Error);
  EXPECT_THROW(cuda_ops::lm_head_ce_workspace_bytes(ch, 5, 0, 1000), Error);
  EXPECT_THROW(cuda_ops::lm_head_ce_workspace_bytes(ch, 5, 64, 0), Error);
  EXPECT_THROW(cuda_ops::lm_head_ce_workspace_bytes(ch, -1, 64, 1000), Error);
}

// ---- GPU against CPU -------------------------------------------------------------------------

using testing::download;
using testing::poison;
using testing::to_bits;
using testing::upload;

std::vector<float> widen(const std::vector<uint16_t>& h) {
  std::vector<float> f(h.size());
  for (size_t i = 0; i < h.size(); ++i) f[i] = bf16_to_f32(h[i]);
  return f;
}

// Uploads and memsets run on the legacy default stream, the ops on the
// context's non-blocking stream: wait for the former before queueing the latter.
void settle() {
  QLORA_CUDA_CHECK(cudaDeviceSynchronize());
}

void poison_ce_workspace(CudaContext& ctx, const CeRun& r) {
  const size_t bytes = cuda_ops::lm_head_ce_workspace_bytes(r.chunking, r.N, r.C, r.V);
  testing::poison_bytes(ctx.workspace(bytes), bytes);
}

struct CeDevice {
  DeviceBuffer<uint16_t> x, W;
  DeviceBuffer<int32_t> t;
};
CeDevice ce_device(const CeRun& r) {
  return {upload(to_bits(r.x)), upload(to_bits(r.W)), upload(r.t)};
}

struct CeGpuOut {
  std::vector<float> losses, lse, dx;
  int32_t first_bad = 0;
};
// The GPU forward, then the backward from `lse_in` (the CPU's, to test it on its own).
CeGpuOut ce_gpu(CudaContext& ctx, const CeRun& r, const CeDevice& d, const std::vector<float>& lse_in) {
  DeviceBuffer<float> losses(sz(r.N)), lse(sz(r.N));
  DeviceBuffer<uint16_t> dx(sz(r.N * r.C));
  DeviceBuffer<int32_t> bad(1);
  const int32_t none = INT32_MAX;
  bad.upload(&none, 1);
  poison(losses);
  poison(lse);
  poison_ce_workspace(ctx, r);
  settle();
  cuda_ops::lm_head_cross_entropy_forward(ctx, losses.data(), lse.data(), d.x.data(), d.W.data(), d.t.data(),
                                          r.chunking, r.N, r.C, r.V, bad.data());
  ctx.synchronize();
  CeGpuOut o{download(losses), download(lse), {}, 0};
  bad.download(&o.first_bad, 1);

  auto lse_cpu = upload(lse_in);
  poison(dx);
  poison_ce_workspace(ctx, r);
  settle();
  cuda_ops::lm_head_cross_entropy_backward(ctx, dx.data(), d.x.data(), d.W.data(), lse_cpu.data(), d.t.data(),
                                           r.grad_scale, r.chunking, r.N, r.C, r.V);
  ctx.synchronize();
  o.dx = widen(download(dx));
  return o;
}

TEST(CudaLossLora, CrossEntropyMatchesCpuWithinBf16Bounds) {
  QLORA_REQUIRE_GPU();
  CudaContext ctx;
  for (const CeCase& c : ce_cases()) {
    const std::string what = describe(c);
    const CeRun r = ce_run(c);
    const CeRef ref = ce_reference(r);
    const CeTolerance tol = ce_gpu_tolerance(r, ref);
    const CeDevice d = ce_device(r);
    const CeGpuOut g = ce_gpu(ctx, r, d, r.lse);
    EXPECT_TRUE(within(g.lse, r.lse, tol.lse)) << what << " lse";
    EXPECT_TRUE(within(g.losses, r.losses, tol.loss)) << what << " losses";
    EXPECT_EQ(g.first_bad, INT32_MAX) << what << ": ignored targets (-100) are not bad ones";
    EXPECT_TRUE(within(g.dx, r.dx, tol.dx)) << what << " dx";
    // Fixed-order reductions: a second run repeats every bit.
    const CeGpuOut again = ce_gpu(ctx, r, d, r.lse);
    EXPECT_EQ(again.losses, g.losses) << what;
    EXPECT_EQ(again.lse, g.lse) << what;
    EXPECT_EQ(again.dx, g.dx) << what;
  }
}

TEST(CudaLossLora, CrossEntropyCountsEveryVocabularyEntryOnce) {
  QLORA_REQUIRE_GPU();
  CudaContext ctx;
  const CeRun r = ce_coverage_run();
  const CeRef ref = ce_reference(r);
  const CeTolerance tol = ce_coverage_tolerance(r, ref);
  const CeDevice d = ce_device(r);
  const CeGpuOut g = ce_gpu(ctx, r, d, r.lse);
  EXPECT_TRUE(within(g.lse, ref.lse, tol.lse)) << "coverage lse";
  EXPECT_TRUE(within(g.losses, ref.loss, tol.loss)) << "coverage losses";
  EXPECT_TRUE(within(g.dx, ref.dx, tol.dx)) << "coverage dx";
}

// Targets -7 and V cannot throw from the device: the first of their rows is
// reported, their losses are 0, their dx rows 0, and no other row changes.
TEST(CudaLossLora, CrossEntropyReportsTheFirstBadTarget) {
  QLORA_REQUIRE_GPU();
  CudaContext ctx;
  for (const CeCase& c : ce_cases()) {
    if (c.N < 3) continue;
    const std::string what = describe(c);
    const CeRun r = ce_run(c);
    const CeTolerance tol = ce_gpu_tolerance(r, ce_reference(r));
    CeRun bad = r;
    bad.t[1] = -7;
    bad.t[sz(c.N - 1)] = static_cast<int32_t>(c.V);
    const CeGpuOut g = ce_gpu(ctx, bad, ce_device(bad), r.lse);
    EXPECT_EQ(g.first_bad, 1) << what;
    for (int64_t i = 0; i < c.N; ++i) {
      const size_t ui = sz(i);
      const bool is_bad = i == 1 || i == c.N - 1;
      if (is_bad) {
        EXPECT_EQ(g.losses[ui], 0.0f) << what << " row " << i;
      } else {
        EXPECT_NEAR(g.losses[ui], r.losses[ui], tol.loss[ui]) << what << " row " << i;
      }
      EXPECT_NEAR(g.lse[ui], r.lse[ui], tol.lse[ui]) << what << " row " << i;
      for (int64_t k = 0; k < c.C; ++k) {
        const size_t e = sz(i * c.C + k);
        if (is_bad) {
          ASSERT_EQ(g.dx[e], 0.0f) << what << " row " << i;
        } else {
          // The bad rows' dlogits are 0 instead of theirs: no other row's dx changes.
          ASSERT_NEAR(g.dx[e], r.dx[e], tol.dx[e]) << what << " row " << i << " channel " << k;
        }
      }
    }
  }
}

TEST(CudaLossLora, LoraMatchesCpuWithinBf16Bounds) {
  QLORA_REQUIRE_GPU();
  CudaContext ctx;
  for (const LoraCase& c : lora_cases()) {
    const std::string what = describe(c);
    const LoraRun r = lora_run(c);
    const LoraTolerance tol = lora_gpu_tolerance(c, r);
    auto xd = upload(to_bits(r.xd)), A = upload(to_bits(r.A)), B = upload(to_bits(r.B));

    auto out = upload(to_bits(r.out0));  // accumulated into: starts from out0, cannot be poisoned
    DeviceBuffer<uint16_t> h(r.h.size());
    poison(h);
    settle();
    cuda_ops::lora_forward(ctx, out.data(), h.data(), xd.data(), A.data(), B.data(), c.scale, c.N, c.IN,
                           c.OUT, c.R);
    ctx.synchronize();
    EXPECT_TRUE(within(widen(download(h)), r.h, tol.h)) << what << " h";
    EXPECT_TRUE(within(widen(download(out)), r.out, tol.out)) << what << " out";

    auto dinp = upload(to_bits(r.dinp0));
    auto dA = upload(r.dA0), dB = upload(r.dB0);
    auto dout = upload(to_bits(r.dout)), hb = upload(to_bits(r.hb));
    DeviceBuffer<uint16_t> dh(r.dh.size());
    poison(dh);
    settle();
    cuda_ops::lora_backward(ctx, dinp.data(), dA.data(), dB.data(), dh.data(), dout.data(), hb.data(),
                            xd.data(), A.data(), B.data(), c.scale, c.N, c.IN, c.OUT, c.R);
    ctx.synchronize();
    EXPECT_TRUE(within(download(dB), r.dB, tol.dB)) << what << " dB";
    EXPECT_TRUE(within(widen(download(dh)), r.dh, tol.dh)) << what << " dh";
    EXPECT_TRUE(within(download(dA), r.dA, tol.dA)) << what << " dA";
    EXPECT_TRUE(within(widen(download(dinp)), r.dinp, tol.dinp)) << what << " dinp";
  }
}

// Same masks, and the same values: the keep decision is integer arithmetic
// and the kept value one fp32 product (plus one fp32 add when accumulating)
// on both sides, so the GPU's bf16 is the CPU's fp32 result rounded once.
TEST(CudaLossLora, DropoutEqualsCpuMasksAndRoundedValuesBitForBit) {
  QLORA_REQUIRE_GPU();
  for (const DropoutCase& c : dropout_cases()) {
    const std::string what = describe(c);
    const auto inp = nonzero_randn(c.n, 41);
    std::vector<float> out(sz(c.n));
    ops::dropout_forward(out.data(), inp.data(), c.n, c.p, c.seed);
    auto d_inp = upload(to_bits(inp));
    DeviceBuffer<uint16_t> d_out(sz(c.n));
    poison(d_out);
    cuda_ops::dropout_forward(d_out.data(), d_inp.data(), c.n, c.p, c.seed, nullptr);
    settle();
    const auto got = download(d_out);
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_EQ(got[i] == 0, out[i] == 0.0f) << what << ": masks differ at " << i;
      ASSERT_EQ(got[i], f32_to_bf16(out[i])) << what << " at " << i;
    }

    const auto dout = bf16_randn(c.n, 42, 1.0f);
    const auto dinp0 = bf16_randn(c.n, 43, 1.0f);
    std::vector<float> dinp = dinp0;
    ops::dropout_backward_accumulate(dinp.data(), dout.data(), c.n, c.p, c.seed);
    auto d_dinp = upload(to_bits(dinp0));
    auto d_dout = upload(to_bits(dout));
    settle();
    cuda_ops::dropout_backward_accumulate(d_dinp.data(), d_dout.data(), c.n, c.p, c.seed, nullptr);
    settle();
    const auto got_b = download(d_dinp);
    for (size_t i = 0; i < got_b.size(); ++i)
      ASSERT_EQ(got_b[i], f32_to_bf16(dinp[i])) << what << " at " << i;
  }
}

TEST(CudaLossLora, RejectsInvalidArgumentsAndDoesNothingForNoRows) {
  QLORA_REQUIRE_GPU();
  CudaContext ctx;
  DeviceBuffer<uint16_t> a(64), b(64), o(64);
  DeviceBuffer<float> f(64), g(64);
  DeviceBuffer<int32_t> t(8);
  ops::CeChunking ch;
  ch.rows = 2;
  ch.vchunk = 4;
  EXPECT_THROW(
      cuda_ops::lora_forward(ctx, o.data(), b.data(), a.data(), a.data(), a.data(), 1.0f, 2, 4, 4, 0), Error);
  EXPECT_THROW(cuda_ops::lora_forward(ctx, o.data(), nullptr, a.data(), a.data(), a.data(), 1.0f, 2, 4, 4, 2),
               Error);
  EXPECT_THROW(cuda_ops::lora_backward(ctx, o.data(), f.data(), g.data(), b.data(), a.data(), a.data(),
                                       a.data(), a.data(), nullptr, 1.0f, 2, 4, 4, 2),
               Error);
  EXPECT_THROW(cuda_ops::lora_backward(ctx, o.data(), f.data(), g.data(), b.data(), a.data(), a.data(),
                                       a.data(), a.data(), a.data(), 1.0f, -1, 4, 4, 2),
               Error);
  EXPECT_THROW(cuda_ops::lm_head_cross_entropy_forward(ctx, f.data(), g.data(), a.data(), nullptr, t.data(),
                                                       ch, 2, 4, 8),
               Error);
  ops::CeChunking bad = ch;
  bad.vchunk = 0;
  EXPECT_THROW(cuda_ops::lm_head_cross_entropy_forward(ctx, f.data(), g.data(), a.data(), a.data(), t.data(),
                                                       bad, 2, 4, 8),
               Error);
  EXPECT_THROW(cuda_ops::lm_head_cross_entropy_backward(ctx, o.data(), a.data(), a.data(), f.data(), t.data(),
                                                        1.0f, ch, 2, 0, 8),
               Error);
  // No rows: nothing to do, null pointers included.
  EXPECT_NO_THROW(
      cuda_ops::lora_forward(ctx, nullptr, nullptr, nullptr, a.data(), a.data(), 1.0f, 0, 4, 4, 2));
  EXPECT_NO_THROW(cuda_ops::lora_backward(ctx, nullptr, f.data(), g.data(), nullptr, nullptr, nullptr,
                                          nullptr, a.data(), a.data(), 1.0f, 0, 4, 4, 2));
  EXPECT_NO_THROW(cuda_ops::lm_head_cross_entropy_forward(ctx, nullptr, nullptr, nullptr, a.data(), nullptr,
                                                          ch, 0, 4, 8));
  EXPECT_NO_THROW(cuda_ops::lm_head_cross_entropy_backward(ctx, nullptr, nullptr, a.data(), nullptr, nullptr,
                                                           1.0f, ch, 0, 4, 8));
  ctx.synchronize();
}

#else  // !QLORA_HAVE_CUDA: the same test names, skipping, so a CPU-only build reports them.

TEST(CudaLossLoraArgs, DropoutRejectsInvalidArgumentsBeforeAnyDeviceCall) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaLossLoraArgs, CrossEntropyWorkspaceHoldsTheTilesAndClampsTheChunks) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaLossLora, CrossEntropyMatchesCpuWithinBf16Bounds) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaLossLora, CrossEntropyCountsEveryVocabularyEntryOnce) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaLossLora, CrossEntropyReportsTheFirstBadTarget) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaLossLora, LoraMatchesCpuWithinBf16Bounds) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaLossLora, DropoutEqualsCpuMasksAndRoundedValuesBitForBit) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaLossLora, RejectsInvalidArgumentsAndDoesNothingForNoRows) {
  QLORA_REQUIRE_GPU();
}

#endif  // QLORA_HAVE_CUDA

}  // namespace
}  // namespace qlora
