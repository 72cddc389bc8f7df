// Shapes and inputs shared by the CPU checks of the ops (OpCases*) and the
// CPU-vs-GPU parity tests (CudaOps*), both in tests/test_cuda_ops.cpp: the
// same list runs on every machine, so a case the GPU tests use is known to be
// sound on the CPU even where no GPU exists.
//
// The cases cover what a per-row or grid-stride kernel gets wrong first: N = 1,
// C odd and not a multiple of a warp (32) or of a thread block (256), a row
// wider than one thread block, D/2 odd, and values far from 1 (large ones,
// where bf16's relative precision is the same but fp32 sums grow, and small
// ones, where RMSNorm's eps matters).
//
// Every input is bf16-representable (rounded through bf16 when made), so the
// CPU (fp32) and the GPU (bf16 storage) start from the very same values and
// their difference is only the GPU's arithmetic and output rounding.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "kernels/ops.h"
#include "quant/blockwise.h"

namespace qlora::op_cases {

struct RmsnormCase {
  int64_t N, C;
  float scale;  // standard deviation of the input
  float eps;
};
inline std::vector<RmsnormCase> rmsnorm_cases() {
  return {{1, 1, 1.0f, 1e-5f},     {1, 7, 1.0f, 1e-5f},    {3, 31, 1.0f, 1e-6f},   {4, 33, 1.0f, 1e-5f},
          {2, 255, 1.0f, 1e-5f},   {5, 257, 1.0f, 1e-5f},  {1, 3001, 1.0f, 1e-6f}, {2, 4096, 1.0f, 1e-5f},
          {3, 100, 1.0e4f, 1e-5f}, {2, 50, 1.0e-3f, 1e-5f},
          // qwen3's per-head q/k norm: this op on (N*H, D) rows, D = 128 (6 tokens x 16 heads), eps 1e-6
          {96, 128, 1.0f, 1e-6f}};
}

struct SwigluCase {
  int64_t n;
  float scale;  // standard deviation of gate and up
};
inline std::vector<SwigluCase> swiglu_cases() {
  // scale 8: gates of +-30 and beyond saturate the sigmoid (exp overflows to inf on one side).
  return {{1, 1.0f}, {31, 1.0f}, {33, 1.0f}, {1000, 1.0f}, {70001, 1.0f}, {4097, 8.0f}, {513, 1.0e-3f}};
}

struct RopeCase {
  int64_t N, NH, D, P;  // P: positions the tables hold (pos < P)
  float scale;
};
inline std::vector<RopeCase> rope_cases() {
  return {{1, 1, 2, 1, 1.0f},   {2, 1, 6, 5, 1.0f},     {3, 2, 8, 16, 1.0f},
          {5, 3, 64, 40, 1.0f}, {7, 4, 128, 300, 1.0f}, {4, 2, 96, 2048, 100.0f}};
}

struct EmbeddingCase {
  int64_t N, C, V;
};
inline std::vector<EmbeddingCase> embedding_cases() {
  return {{1, 1, 1}, {5, 7, 11}, {33, 65, 100}, {64, 4096, 3}};
}

// DoRA (ops::dora_*, cuda_ops::dora_*): W (OUT,IN) dense or NF4, A (R,IN),
// B (OUT,R), scale s; N rows of products. OUT: one row, within one GPU panel
// (256 rows) and past it with a partial last panel (300, 520; the CPU's panels
// are 64); IN odd (65: 4-bit rows start mid-byte, blocks straddle rows) and
// neither a multiple of 256 (the norm kernel's stride) nor of 64; R 1..16; N
// from 1 to more than the dm kernel's 8 row slots, with a remainder (37, 300),
// and OUT not a multiple of its 32 columns.
struct DoraCase {
  int64_t N, IN, OUT, R;
  float scale;     // the LoRA scale s
  bool quantized;  // NF4, block 64, fp32 scales; else dense (bf16-representable)
};
inline std::vector<DoraCase> dora_cases() {
  return {{1, 64, 1, 1, 2.0f, false},      {3, 65, 65, 4, 0.5f, true},     {37, 128, 300, 8, 2.0f, true},
          {300, 96, 520, 16, 0.25f, true}, {5, 33, 200, 2, 1.0f, false}};
}

template <typename Case>
std::string describe(const char* op, const Case& c) {
  std::ostringstream os;
  os << op;
  if constexpr (requires { c.quantized; })
    os << " N " << c.N << " IN " << c.IN << " OUT " << c.OUT << " R " << c.R << " scale " << c.scale
       << (c.quantized ? " nf4" : " dense");
  if constexpr (requires { c.eps; })
    os << " N " << c.N << " C " << c.C << " scale " << c.scale << " eps " << c.eps;
  if constexpr (requires { c.n; }) os << " n " << c.n << " scale " << c.scale;
  if constexpr (requires { c.D; })
    os << " N " << c.N << " NH " << c.NH << " D " << c.D << " P " << c.P << " scale " << c.scale;
  if constexpr (requires { c.V; }) os << " N " << c.N << " C " << c.C << " V " << c.V;
  return os.str();
}

// n Gaussian values of standard deviation `sigma` (around `mean`), each rounded to bf16.
inline std::vector<float> bf16_randn(int64_t n, unsigned seed, float sigma, float mean = 0.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(mean, sigma);
  std::vector<float> x(static_cast<size_t>(n));
  for (auto& v : x) v = bf16_to_f32(f32_to_bf16(d(rng)));
  return x;
}

// n ids uniform in [0, hi).
inline std::vector<int32_t> uniform_ids(int64_t n, unsigned seed, int64_t hi) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int64_t> d(0, hi - 1);
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (auto& v : ids) v = static_cast<int32_t>(d(rng));
  return ids;
}

// Llama-style RoPE tables (theta 10000) for P positions, as the model builds them.
struct RopeTables {
  std::vector<float> inv_freq, cos, sin;  // (D/2), (P, D/2), (P, D/2)
};
inline RopeTables rope_tables_for(int64_t P, int64_t D) {
  RopeTables t;
  const auto half = static_cast<size_t>(D / 2);
  t.inv_freq.resize(half);
  t.cos.resize(static_cast<size_t>(P) * half);
  t.sin.resize(static_cast<size_t>(P) * half);
  ops::rope_inv_freq(t.inv_freq.data(), ops::RopeParams{}, D);
  ops::rope_tables(t.cos.data(), t.sin.data(), t.inv_freq.data(), P, D);
  return t;
}

// A case's inputs and the CPU reference outputs, made once for both the CPU
// checks and the GPU parity tests, so the two always test the same thing.
struct RmsnormRun {
  std::vector<float> x, w, dy;     // (N,C), (C), (N,C)
  std::vector<float> out, rstd, dx;  // CPU forward and backward
};
inline RmsnormRun rmsnorm_cpu(const RmsnormCase& c) {
  const auto nc = static_cast<size_t>(c.N * c.C);
  RmsnormRun r{bf16_randn(c.N * c.C, 3, c.scale), bf16_randn(c.C, 4, 0.1f, 1.0f), bf16_randn(c.N * c.C, 5, 1.0f),
               std::vector<float>(nc), std::vector<float>(static_cast<size_t>(c.N)), std::vector<float>(nc)};
  ops::rmsnorm_forward(r.out.data(), r.rstd.data(), r.x.data(), r.w.data(), c.N, c.C, c.eps);
  ops::rmsnorm_backward(r.dx.data(), r.dy.data(), r.x.data(), r.w.data(), r.rstd.data(), c.N, c.C);
  return r;
}

struct SwigluRun {
  std::vector<float> g, u, dy;     // (n) each
  std::vector<float> out, dg, du;  // CPU forward and backward
};
inline SwigluRun swiglu_cpu(const SwigluCase& c) {
  const auto n = static_cast<size_t>(c.n);
  SwigluRun r{bf16_randn(c.n, 6, c.scale), bf16_randn(c.n, 7, c.scale), bf16_randn(c.n, 8, 1.0f),
              std::vector<float>(n), std::vector<float>(n), std::vector<float>(n)};
  ops::swiglu_forward(r.out.data(), r.g.data(), r.u.data(), c.n);
  ops::swiglu_backward(r.dg.data(), r.du.data(), r.dy.data(), r.g.data(), r.u.data(), c.n);
  return r;
}

// A DoRA case's inputs and the CPU ops' results. The products (out0, base,
// lora, dout) are bf16-representable, as the GPU stores them; W is too (dense)
// or is the NF4 dequantization (code * scale in fp32, which the GPU computes
// bit for bit); A, B, m and dm0 are fp32 (the GPU reads them from its fp32
// master and gradient arrays).
struct DoraRun {
  std::vector<float> w;        // (OUT,IN): W's fp32 values
  std::vector<uint8_t> codes;  // NF4 only: the codes and their fp32 scales
  std::vector<float> absmax;
  std::vector<float> A, B, m;                      // (R,IN), (OUT,R), (OUT)
  std::vector<float> out0, base, lora, dout, dm0;  // (N,OUT) x 4, (OUT): out and dm before the ops
  std::vector<float> wnorm, out, dm, dbase, dlora;  // ops::dora_weight_norm, dora_forward, dora_backward
  ops::LinearWeight weight(const DoraCase& c) const {
    ops::LinearWeight lw;
    lw.out = c.OUT;
    lw.in = c.IN;
    if (c.quantized) {
      lw.codes = codes.data();
      lw.absmax = absmax.data();
      lw.block = kDoraBlock;
    } else {
      lw.dense = w.data();
    }
    return lw;
  }
  static constexpr int64_t kDoraBlock = 64;
};
inline DoraRun dora_cpu(const DoraCase& c) {
  const auto seed = static_cast<unsigned>(c.N * 3 + c.IN * 7 + c.OUT * 11 + c.R);
  const int64_t n = c.OUT * c.IN;
  DoraRun r;
  r.w = bf16_randn(n, seed, 0.05f);
  if (c.quantized) {
    r.codes.resize(static_cast<size_t>(quant4_code_bytes(n)));
    r.absmax.resize(static_cast<size_t>(quant4_num_blocks(n, DoraRun::kDoraBlock)));
    quantize4_ref(r.w.data(), n, DoraRun::kDoraBlock, Quant4Type::NF4, r.codes.data(), r.absmax.data());
    dequantize4_ref(r.codes.data(), r.absmax.data(), n, DoraRun::kDoraBlock, Quant4Type::NF4, r.w.data());
  }
  // s B A of the size of W's rows, so both shape the norm.
  r.A = bf16_randn(c.R * c.IN, seed + 1, 0.5f);
  r.B = bf16_randn(c.OUT * c.R, seed + 2, 0.1f);
  r.wnorm.resize(static_cast<size_t>(c.OUT));
  std::vector<float> panel(static_cast<size_t>(ops::kDoraPanelRows * c.IN));
  ops::dora_weight_norm(r.wnorm.data(), panel.data(), r.weight(c), r.A.data(), r.B.data(), c.scale, c.R);
  // m away from the norms (g = m / wnorm from about 0.4 to 1.6), as after training.
  r.m = bf16_randn(c.OUT, seed + 3, 0.2f, 1.0f);
  for (size_t j = 0; j < r.m.size(); ++j) r.m[j] *= r.wnorm[j];
  r.out0 = bf16_randn(c.N * c.OUT, seed + 4, 1.0f);
  r.base = bf16_randn(c.N * c.OUT, seed + 5, 1.0f);
  r.lora = bf16_randn(c.N * c.OUT, seed + 6, 0.5f);
  r.dout = bf16_randn(c.N * c.OUT, seed + 7, 1.0f);
  r.dm0 = bf16_randn(c.OUT, seed + 8, 0.5f);
  r.out = r.out0;
  ops::dora_forward(r.out.data(), r.base.data(), r.lora.data(), r.m.data(), r.wnorm.data(), c.N, c.OUT);
  r.dm = r.dm0;
  r.dbase.resize(r.out.size());
  r.dlora.resize(r.out.size());
  ops::dora_backward(r.dbase.data(), r.dlora.data(), r.dm.data(), r.dout.data(), r.base.data(), r.lora.data(),
                     r.m.data(), r.wnorm.data(), c.N, c.OUT);
  return r;
}

// The size of the terms of each row norm of W + s B A: ||T_j|| with
// T_jc = |W_jc| + |s| sum_r |B_jr A_rc| (double). Rounding errors of the
// row's fp32 values are relative to these terms, not to the (possibly
// cancelling) values.
inline std::vector<double> dora_norm_terms(const DoraCase& c, const DoraRun& r) {
  std::vector<double> t(static_cast<size_t>(c.OUT));
  for (int64_t j = 0; j < c.OUT; ++j) {
    double ss = 0.0;
    for (int64_t i = 0; i < c.IN; ++i) {
      double v = std::abs(double(r.w[static_cast<size_t>(j * c.IN + i)]));
      for (int64_t k = 0; k < c.R; ++k)
        v += std::abs(double(c.scale) * r.B[static_cast<size_t>(j * c.R + k)] * r.A[static_cast<size_t>(k * c.IN + i)]);
      ss += v * v;
    }
    t[static_cast<size_t>(j)] = std::sqrt(ss);
  }
  return t;
}

}  // namespace qlora::op_cases
