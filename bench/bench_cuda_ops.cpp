// GPU op benchmarks (a table, never a timed test): every CUDA op of the
// training step at Llama-3.1-8B and Llama-2-70B training shapes, each against
// a ceiling MEASURED IN THE SAME RUN on the same device:
//   - GEMM-like ops (NF4 linear per algorithm, LoRA, lm_head + cross entropy):
//     cuBLAS bf16 GEMM (cuda_ops::gemm) on the same shapes and buffers;
//   - attention: the rate of a large square cuBLAS GEMM (no cuBLAS twin exists);
//   - memory-bound ops (NF4 GEMV at batch 1, quantize/dequantize, RMSNorm,
//     SwiGLU, RoPE, the optimizer): device-to-device cudaMemcpy bandwidth;
//   - the paged optimizer: pinned host<->device copy bandwidth.
// "of ceiling" = ceiling time / op time, so 100% means as fast as the ceiling.
// The targets are printed beside the figures they apply to.
//
// Timing: warm-up calls, then `reps` timed calls, each alone between two
// cudaEvents on the op's stream, after an L2 flush (a memset of twice the L2
// size), so no input is served from an L2 warmed by the previous call; the
// median is reported. Weights are random (a hash of the element index), the
// NF4 ones quantized on the spot with cuda_quantize4 and double-quantized.
//
// Usage: bench_cuda_ops [--quick] [--json FILE] [--reps R] [--warmup W] [--only GROUPS]
//                       [--ce-rows R] [--ce-vchunk V]
// Without a usable GPU it says why, measures nothing and exits 0 (--json: status "skipped").
#include <cuda_runtime.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "cuda_bench_util.h"
#include "kernels/cuda/attention_cuda.h"
#include "kernels/cuda/context.h"
#include "kernels/cuda/device.h"
#include "kernels/cuda/linear_cuda.h"
#include "kernels/cuda/lora_cuda.h"
#include "kernels/cuda/loss_cuda.h"
#include "kernels/cuda/ops_cuda.h"
#include "kernels/cuda/optim_cuda.h"
#include "kernels/cuda/paged_state.h"
#include "kernels/cuda/quant4.h"
#include "plan/cuda_constants.h"
#include "quant/blockwise.h"
#include "quant/dynamic_map.h"

using namespace qlora;
using namespace qlora::bench;
using cuda_ops::GemmOut;
using cuda_ops::Trans;

namespace {

// ---- shapes ------------------------------------------------------------------------
// Dimension letters as kernels/ops.h: N tokens, C hidden, I intermediate, H/KVH
// heads, D head dim, V vocabulary, R LoRA rank; T tokens per row (attention).

struct ModelShape {
  const char* name;
  int64_t C, I, H, KVH, D, V;
  int64_t layers;  // for the optimizer's parameter count
};
constexpr ModelShape kLlama8B{"llama-3.1-8b", 4096, 14336, 32, 8, 128, 128256, 32};
// Llama-2-70B, as bench/hf_baseline.py builds it (Llama-3.1-70B differs only in V = 128256).
constexpr ModelShape kLlama70B{"llama-2-70b", 8192, 28672, 64, 8, 128, 32000, 80};
constexpr ModelShape kQuick{"quick", 1024, 2816, 8, 2, 128, 32000, 2};
constexpr int64_t kRank = 16;  // LoRA rank of the training benchmarks

struct LinearShape {
  const char* name;  // the projections of the block with this (OUT, IN)
  int64_t out, in;
};
std::vector<LinearShape> linear_shapes(const ModelShape& m) {
  return {{"q,o", m.H * m.D, m.C}, {"k,v", m.KVH * m.D, m.C}, {"gate,up", m.I, m.C}, {"down", m.C, m.I}};
}
// LoRA parameters of all 7 block linears of one layer (A is (R,IN), B is (OUT,R)).
int64_t lora_params_per_layer(const ModelShape& m) {
  const int64_t q = m.H * m.D, kv = m.KVH * m.D;
  return kRank * ((m.C + q) * 2 + (m.C + kv) * 2 + 3 * (m.C + m.I));
}

// A random (OUT,IN) weight in bf16 and its NF4 form, block 64, with the
// absmax vector double-quantized as the training recipe stores it.
struct Nf4Weight {
  int64_t out = 0, in = 0, nblocks = 0;
  DeviceBuffer<uint16_t> dense;   // (OUT,IN) bf16: the cuBLAS ceiling's operand
  DeviceBuffer<uint8_t> codes;    // (OUT*IN+1)/2
  DeviceBuffer<float> absmax;     // nblocks, fp32 (single quantization)
  DeviceBuffer<uint8_t> absmax8;  // nblocks, 8-bit codes of absmax - offset
  DeviceBuffer<float> nested_absmax;
  DeviceBuffer<float> code8;  // 256 entries: dynamic_map_signed()
  float offset = 0.0f;
  int64_t nested_block = kNestedBlock;
};

Nf4Weight make_nf4_weight(int64_t out, int64_t in, uint64_t seed) {
  Nf4Weight w;
  w.out = out;
  w.in = in;
  const int64_t n = out * in;
  w.nblocks = quant4_num_blocks(n, kDefaultBlock4);
  // Uniform in [-a, a) with a = 0.02 * sqrt(3): the spread of a 0.02-sigma init.
  w.dense = random_bf16(n, seed, 0.0346f);
  w.codes = DeviceBuffer<uint8_t>(size_t(quant4_code_bytes(n)));
  w.absmax = DeviceBuffer<float>(size_t(w.nblocks));
  cuda_quantize4(w.dense.data(), n, kDefaultBlock4, Quant4Type::NF4, w.codes.data(), w.absmax.data(),
                 nullptr);
  std::vector<float> absmax(size_t(w.nblocks));
  w.absmax.download(absmax.data(), absmax.size());  // synchronizes the legacy stream the quantizer used
  const NestedAbsmax nq = double_quantize(absmax.data(), w.nblocks);
  w.absmax8 = DeviceBuffer<uint8_t>(nq.codes.size());
  w.absmax8.upload(nq.codes.data(), nq.codes.size());
  w.nested_absmax = DeviceBuffer<float>(nq.nested_absmax.size());
  w.nested_absmax.upload(nq.nested_absmax.data(), nq.nested_absmax.size());
  w.code8 = DeviceBuffer<float>(256);
  w.code8.upload(dynamic_map_signed().data(), 256);
  w.offset = nq.offset;
  w.nested_block = nq.nested_block;
  return w;
}

cuda_ops::CudaLinearWeight nf4_view(const Nf4Weight& w) {
  cuda_ops::CudaLinearWeight v;
  v.out = w.out;
  v.in = w.in;
  v.codes = w.codes.data();
  v.block = kDefaultBlock4;
  v.type = Quant4Type::NF4;
  v.absmax8 = w.absmax8.data();
  v.nested_absmax = w.nested_absmax.data();
  v.code8 = w.code8.data();
  v.offset = w.offset;
  v.nested_block = w.nested_block;
  return v;
}

// Bytes a batch-1 product reads and writes: the packed codes, the
// double-quantized scales, x and y.
double gemv_bytes(const Nf4Weight& w) {
  const double nested = double((w.nblocks + w.nested_block - 1) / w.nested_block);
  return double(w.out * w.in) / 2 + double(w.nblocks) + 4 * nested + 4 * 256 + 2.0 * double(w.in + w.out);
}

// ---- timing ------------------------------------------------------------------------


class Timer {
 public:
  Timer(CudaContext& ctx, int warmup, int reps) : ctx_(ctx), warmup_(warmup), reps_(reps) {
    int l2 = 0;
    QLORA_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, ctx.device()));
    flush_ = DeviceBuffer<uint8_t>(std::max<size_t>(2 * size_t(l2), size_t(8) << 20));
  }

  // Median milliseconds of one call of fn, which queues its work on ctx.stream().
  double median_ms(const std::function<void()>& fn) {
    for (int i = 0; i < warmup_; ++i) fn();
    QLORA_CUDA_CHECK(cudaStreamSynchronize(ctx_.stream()));
    std::vector<float> ms;
    for (int r = 0; r < reps_; ++r) {
      QLORA_CUDA_CHECK(cudaMemsetAsync(flush_.data(), r & 0xff, flush_.bytes(), ctx_.stream()));
      QLORA_CUDA_CHECK(cudaEventRecord(start_.e, ctx_.stream()));
      fn();
      QLORA_CUDA_CHECK(cudaEventRecord(stop_.e, ctx_.stream()));
      QLORA_CUDA_CHECK(cudaEventSynchronize(stop_.e));
      float t = 0.0f;
      QLORA_CUDA_CHECK(cudaEventElapsedTime(&t, start_.e, stop_.e));
      ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    const size_t k = ms.size() / 2;
    return ms.size() % 2 == 1 ? double(ms[k]) : 0.5 * (double(ms[k - 1]) + double(ms[k]));
  }

 private:
  CudaContext& ctx_;
  int warmup_, reps_;
  DeviceBuffer<uint8_t> flush_;
  Event start_, stop_;
};

// ---- results -------------------------------------------------------------------------

struct Row {
  std::string group, op, shape, algo;
  double ms = 0;
  bool flops = true;  // amount is FLOPs (rate in TFLOP/s) or bytes (GB/s)
  double amount = 0;
  std::string ceiling;
  double ceiling_ms = 0;         // the ceiling's time for the same work
  std::optional<double> target;  // the target for ceiling_ms / ms
  std::string error;             // the op threw: no figures
  double rate() const { return amount / (ms * 1e-3) / (flops ? 1e12 : 1e9); }
  double ratio() const { return ceiling_ms / ms; }
};

Row row(std::string group, std::string op, std::string shape, std::string algo, bool flops, double amount,
        std::string ceiling, std::optional<double> target = std::nullopt) {
  Row r;
  r.group = std::move(group);
  r.op = std::move(op);
  r.shape = std::move(shape);
  r.algo = std::move(algo);
  r.flops = flops;
  r.amount = amount;
  r.ceiling = std::move(ceiling);
  r.target = target;
  return r;
}

struct Options {
  bool quick = false;
  std::string json;
  int reps = 20, warmup = 3;
  std::vector<std::string> only;  // groups to run; empty = all
  int64_t ce_rows = 0;            // 0 = all N rows in one chunk
  int64_t ce_vchunk = plan_cuda::kCeVocabChunk;
};

class Bench {
 public:
  Bench(CudaContext& ctx, const Options& opt) : ctx_(ctx), opt_(opt), timer_(ctx, opt.warmup, opt.reps) {}

  bool wants(const std::string& group) const {
    return opt_.only.empty() || std::find(opt_.only.begin(), opt_.only.end(), group) != opt_.only.end();
  }

  void measure_ceilings();
  void run_model(const ModelShape& m, const std::vector<int64_t>& tokens, int64_t T);
  nlohmann::json to_json() const;
  int failures() const {
    return int(std::count_if(rows_.begin(), rows_.end(), [](const Row& r) { return !r.error.empty(); }));
  }

 private:
  // Times fn and records the row; an op that throws a qlora::Error (say, a
  // shape it rejects) becomes a row with the message, and the run goes on,
  // unless the device itself has failed (a sticky error): then it stops.
  void add(Row r, const std::function<void()>& fn, const std::function<double()>& ceiling_ms);
  void print_header(const std::string& title);
  void print_row(const Row& r);

  // Median ms of cuda_ops::gemm on row-major C (M,Nc) = op(A) op(B), memoized
  // by shape (buffers of the same shape run at the same speed).
  double gemm_ms(Trans ta, Trans tb, int64_t M, int64_t Nc, int64_t K, const uint16_t* A, const uint16_t* B,
                 void* Cm, GemmOut ct, float beta);
  double copy_ms(double bytes) const { return bytes / (copy_gbps_ * 1e9) * 1e3; }

  void bench_linear(const ModelShape& m, const std::vector<int64_t>& tokens);
  void bench_gemv(const ModelShape& m);
  void bench_lora(const ModelShape& m, int64_t N, const std::string& group);
  void bench_attention(const ModelShape& m, int64_t N, int64_t T, const std::string& group);
  void bench_loss(const ModelShape& m, int64_t N, const std::string& group);
  void bench_elementwise(const ModelShape& m, int64_t N, const std::string& group);
  void bench_quant(const ModelShape& m, const std::string& group);
  void bench_optimizer(const ModelShape& m, const std::string& group);

  CudaContext& ctx_;
  Options opt_;
  Timer timer_;
  std::vector<Row> rows_;
  std::map<std::tuple<int, int, int64_t, int64_t, int64_t, int>, double> gemm_memo_;
  double copy_gbps_ = 0, h2d_gbps_ = 0, d2h_gbps_ = 0;
  double ref_gemm_tflops_ = 0;   // a large square cuBLAS GEMM: the attention ceiling
  double best_gemm_tflops_ = 0;  // the fastest cuBLAS GEMM of the run (information)
};

void Bench::print_header(const std::string& title) {
  std::printf("\n### %s\n\n", title.c_str());
  std::printf("| op | shape | algo | ms | rate | ceiling | ceiling ms | of ceiling | target |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|\n");
  std::fflush(stdout);
}

void Bench::print_row(const Row& r) {
  if (!r.error.empty()) {
    std::printf("| %s | %s | %s | error: %s |\n", r.op.c_str(), r.shape.c_str(), r.algo.c_str(),
                r.error.c_str());
  } else {
    std::string target = "";
    if (r.target)
      target = str(">= ", int(*r.target * 100 + 0.5), "%: ", r.ratio() >= *r.target ? "met" : "MISSED");
    std::printf("| %s | %s | %s | %.4f | %.1f %s | %s | %.4f | %.1f%% | %s |\n", r.op.c_str(),
                r.shape.c_str(), r.algo.c_str(), r.ms, r.rate(), r.flops ? "TFLOP/s" : "GB/s",
                r.ceiling.c_str(), r.ceiling_ms, 100.0 * r.ratio(), target.c_str());
  }
  std::fflush(stdout);
}

void Bench::add(Row r, const std::function<void()>& fn, const std::function<double()>& ceiling_ms) {
  try {
    r.ms = timer_.median_ms(fn);
    r.ceiling_ms = ceiling_ms();
  } catch (const Error& e) {
    r.error = e.what();
    // A launch or argument error leaves the context usable; an execution
    // error (illegal address, ...) is sticky and fails every later call.
    const cudaError_t err = cudaDeviceSynchronize();
    if (err != cudaSuccess) {
      rows_.push_back(r);
      print_row(r);
      fail("the device failed after ", r.op, " ", r.shape, " (", cudaGetErrorString(err), "): stopping");
    }
  }
  rows_.push_back(r);
  print_row(rows_.back());
}

double Bench::gemm_ms(Trans ta, Trans tb, int64_t M, int64_t Nc, int64_t K, const uint16_t* A,
                      const uint16_t* B, void* Cm, GemmOut ct, float beta) {
  const auto key = std::make_tuple(int(ta), int(tb), M, Nc, K, int(ct) * 2 + (beta != 0.0f ? 1 : 0));
  if (const auto it = gemm_memo_.find(key); it != gemm_memo_.end()) return it->second;
  const int64_t lda = ta == Trans::N ? K : M, ldb = tb == Trans::N ? Nc : K;
  const double ms = timer_.median_ms(
      [&] { cuda_ops::gemm(ctx_, ta, tb, M, Nc, K, 1.0f, A, lda, B, ldb, beta, Cm, ct, Nc, "bench gemm"); });
  best_gemm_tflops_ =
      std::max(best_gemm_tflops_, 2.0 * double(M) * double(Nc) * double(K) / (ms * 1e-3) / 1e12);
  gemm_memo_[key] = ms;
  return ms;
}

// ---- ceilings ------------------------------------------------------------------------

void Bench::measure_ceilings() {
  print_header(str("ceilings (", ctx_.info().name, ")"));
  // Device copy: reads and writes each byte, so 2 bytes of traffic per byte copied.
  const size_t bytes = opt_.quick ? size_t(256) << 20 : size_t(2) << 30;
  DeviceBuffer<uint8_t> a(bytes), b(bytes);
  QLORA_CUDA_CHECK(cudaMemset(a.data(), 1, bytes));
  QLORA_CUDA_CHECK(cudaDeviceSynchronize());
  Row r = row("ceilings", "device copy (cudaMemcpyAsync D2D)", str(bytes >> 20, " MiB"), "", false,
              2.0 * double(bytes), "itself");
  r.ms = timer_.median_ms([&] {
    QLORA_CUDA_CHECK(cudaMemcpyAsync(b.data(), a.data(), bytes, cudaMemcpyDeviceToDevice, ctx_.stream()));
  });
  r.ceiling_ms = r.ms;
  copy_gbps_ = r.rate();
  rows_.push_back(r);
  print_row(r);

  // Pinned host memory <-> device, one direction at a time (the paged
  // optimizer's pages move on one copy stream).
  const size_t hbytes = size_t(256) << 20;
  void* host = nullptr;
  QLORA_CUDA_CHECK(cudaHostAlloc(&host, hbytes, cudaHostAllocDefault));
  std::unique_ptr<void, void (*)(void*)> host_guard(host, [](void* p) { (void)cudaFreeHost(p); });
  for (const bool to_device : {true, false}) {
    Row h = row("ceilings", to_device ? "pinned host -> device" : "device -> pinned host",
                str(hbytes >> 20, " MiB"), "", false, double(hbytes), "itself");
    h.ms = timer_.median_ms([&] {
      QLORA_CUDA_CHECK(to_device
                           ? cudaMemcpyAsync(a.data(), host, hbytes, cudaMemcpyHostToDevice, ctx_.stream())
                           : cudaMemcpyAsync(host, a.data(), hbytes, cudaMemcpyDeviceToHost, ctx_.stream()));
    });
    h.ceiling_ms = h.ms;
    (to_device ? h2d_gbps_ : d2h_gbps_) = h.rate();
    rows_.push_back(h);
    print_row(h);
  }

  // A large square GEMM: the tensor-core rate the attention kernels are held to.
  const int64_t S = opt_.quick ? 2048 : 8192;
  auto A = random_bf16(S * S, 1, 1.0f), B = random_bf16(S * S, 2, 1.0f);
  DeviceBuffer<uint16_t> Cm{size_t(S * S)};
  Row g = row("ceilings", "cuBLAS bf16 GEMM (fp32 accumulate)", str(S, "x", S, "x", S), "", true,
              2.0 * double(S) * double(S) * double(S), "itself");
  g.ms = gemm_ms(Trans::N, Trans::T, S, S, S, A.data(), B.data(), Cm.data(), GemmOut::BF16, 0.0f);
  g.ceiling_ms = g.ms;
  ref_gemm_tflops_ = g.rate();
  rows_.push_back(g);
  print_row(g);
}

// ---- NF4 linear (training shapes) ------------------------------------------------

std::string algo_label(const CudaContext& ctx, cuda_ops::LinearAlgo a, const cuda_ops::CudaLinearWeight& w,
                       int64_t N, cuda_ops::LinearPass pass) {
  if (a != cuda_ops::LinearAlgo::Auto) return cuda_ops::linear_algo_name(a);
  return str("auto (", cuda_ops::linear_algo_name(cuda_ops::linear_auto_algo(ctx.arch(), w, N, pass)), ")");
}

void Bench::bench_linear(const ModelShape& m, const std::vector<int64_t>& tokens) {
  using cuda_ops::LinearAlgo;
  using cuda_ops::LinearPass;
  const int64_t Nmax = *std::max_element(tokens.begin(), tokens.end());
  uint64_t seed = 100;
  for (const LinearShape& s : linear_shapes(m)) {
    const Nf4Weight w = make_nf4_weight(s.out, s.in, ++seed);
    const cuda_ops::CudaLinearWeight wv = nf4_view(w);
    auto x = random_bf16(Nmax * s.in, ++seed, 1.0f), dout = random_bf16(Nmax * s.out, ++seed, 1.0f);
    DeviceBuffer<uint16_t> out{size_t(Nmax * s.out)}, dinp{size_t(Nmax * s.in)};
    ctx_.workspace(cuda_ops::linear_workspace_bytes(wv, Nmax));  // grown once, outside the timing
    for (const int64_t N : tokens) {
      const std::string group = str(m.name, " N", N);
      const std::string shape = str(s.name, " N", N, " ", s.out, "x", s.in);
      const double flops = 2.0 * double(N) * double(s.out) * double(s.in);
      for (const LinearPass pass : {LinearPass::Forward, LinearPass::Backward}) {
        const bool fwd = pass == LinearPass::Forward;
        for (const LinearAlgo a : {LinearAlgo::Auto, LinearAlgo::Fused, LinearAlgo::DequantGemm}) {
          if (!cuda_ops::linear_algo_supports(ctx_.arch(), a, wv, N, pass)) continue;
          // The target: the fused NF4 GEMM at >= 90% of cuBLAS bf16 on the same shape.
          const bool held = a != LinearAlgo::DequantGemm &&
                            (a == LinearAlgo::Fused ||
                             cuda_ops::linear_auto_algo(ctx_.arch(), wv, N, pass) == LinearAlgo::Fused);
          const Row r = row(group, fwd ? "nf4 linear fwd" : "nf4 linear bwd (dinp)", shape,
                            algo_label(ctx_, a, wv, N, pass), true, flops, "cuBLAS bf16 GEMM",
                            held ? std::optional<double>(0.9) : std::nullopt);
          add(
              r,
              [&] {
                if (fwd)
                  cuda_ops::linear_forward(ctx_, out.data(), x.data(), wv, nullptr, N, a);
                else
                  cuda_ops::linear_backward(ctx_, dinp.data(), dout.data(), wv, N, false, a);
              },
              [&] {
                // forward: out (N,OUT) = x W^T; backward: dinp (N,IN) = dout W.
                return fwd ? gemm_ms(Trans::N, Trans::T, N, s.out, s.in, x.data(), w.dense.data(), out.data(),
                                     GemmOut::BF16, 0.0f)
                           : gemm_ms(Trans::N, Trans::N, N, s.in, s.out, dout.data(), w.dense.data(),
                                     dinp.data(), GemmOut::BF16, 0.0f);
              });
        }
      }
    }
  }
}

// ---- NF4 GEMV (batch 1, generation) --------------------------------------------------

void Bench::bench_gemv(const ModelShape& m) {
  using cuda_ops::LinearAlgo;
  using cuda_ops::LinearPass;
  uint64_t seed = 200;
  for (const LinearShape& s : linear_shapes(m)) {
    const Nf4Weight w = make_nf4_weight(s.out, s.in, ++seed);
    const cuda_ops::CudaLinearWeight wv = nf4_view(w);
    auto x = random_bf16(s.in, ++seed, 1.0f), dout = random_bf16(s.out, ++seed, 1.0f);
    DeviceBuffer<uint16_t> out{size_t(s.out)}, dinp{size_t(s.in)};
    ctx_.workspace(cuda_ops::linear_workspace_bytes(wv, 1));
    const std::string shape = str(s.name, " N1 ", s.out, "x", s.in);
    const double bytes = gemv_bytes(w);  // codes + double-quantized scales + x + y
    for (const LinearPass pass : {LinearPass::Forward, LinearPass::Backward}) {
      const bool fwd = pass == LinearPass::Forward;
      for (const LinearAlgo a :
           {LinearAlgo::Auto, LinearAlgo::Gemv, LinearAlgo::Fused, LinearAlgo::DequantGemm}) {
        if (!cuda_ops::linear_algo_supports(ctx_.arch(), a, wv, 1, pass)) continue;
        // The target: NF4 GEMV at batch 1 at >= 80% of memory bandwidth (forward).
        const bool held = fwd && (a == LinearAlgo::Gemv ||
                                  (a == LinearAlgo::Auto &&
                                   cuda_ops::linear_auto_algo(ctx_.arch(), wv, 1, pass) == LinearAlgo::Gemv));
        const Row r = row(str(m.name, " N1"), fwd ? "nf4 gemv fwd" : "nf4 gemv bwd (dinp)", shape,
                          algo_label(ctx_, a, wv, 1, pass), false, bytes, "device copy BW",
                          held ? std::optional<double>(0.8) : std::nullopt);
        add(
            r,
            [&] {
              if (fwd)
                cuda_ops::linear_forward(ctx_, out.data(), x.data(), wv, nullptr, 1, a);
              else
                cuda_ops::linear_backward(ctx_, dinp.data(), dout.data(), wv, 1, false, a);
            },
            [&] { return copy_ms(bytes); });
      }
    }
  }
}

// ---- LoRA ------------------------------------------------------------------------------

void Bench::bench_lora(const ModelShape& m, int64_t N, const std::string& group) {
  for (const LinearShape& s : linear_shapes(m)) {
    const int64_t IN = s.in, OUT = s.out, R = kRank;
    auto x = random_bf16(N * IN, 11, 1.0f), dout = random_bf16(N * OUT, 12, 1.0f);
    auto A = random_bf16(R * IN, 13, 0.01f), B = random_bf16(OUT * R, 14, 0.01f);
    DeviceBuffer<uint16_t> out{size_t(N * OUT)}, h{size_t(N * R)}, dh{size_t(N * R)}, dinp{size_t(N * IN)};
    DeviceBuffer<float> dA{size_t(R * IN)}, dB{size_t(OUT * R)};
    QLORA_CUDA_CHECK(cudaMemset(out.data(), 0, out.bytes()));
    QLORA_CUDA_CHECK(cudaMemset(dinp.data(), 0, dinp.bytes()));
    QLORA_CUDA_CHECK(cudaMemset(dA.data(), 0, dA.bytes()));
    QLORA_CUDA_CHECK(cudaMemset(dB.data(), 0, dB.bytes()));
    QLORA_CUDA_CHECK(cudaDeviceSynchronize());  // the memsets ran on the legacy stream, the ops do not
    const std::string shape = str(s.name, " N", N, " ", OUT, "x", IN, " r", R);
    const double fwd_flops = 2.0 * double(N) * double(R) * double(IN + OUT);
    // out is accumulated (+=) on every call: values grow but stay finite over
    // the few dozen calls of a measurement (scale 1/R, A and B ~0.01).
    add(
        row(group, "lora fwd", shape, "", true, fwd_flops, "cuBLAS bf16 GEMM"),
        [&] {
          cuda_ops::lora_forward(ctx_, out.data(), h.data(), x.data(), A.data(), B.data(), 1.0f / float(R), N,
                                 IN, OUT, R);
        },
        [&] {
          return gemm_ms(Trans::N, Trans::T, N, R, IN, x.data(), A.data(), h.data(), GemmOut::BF16, 0.0f) +
                 gemm_ms(Trans::N, Trans::T, N, OUT, R, h.data(), B.data(), out.data(), GemmOut::BF16, 1.0f);
        });
    add(
        row(group, "lora bwd", shape, "", true, 2.0 * fwd_flops, "cuBLAS bf16 GEMM"),
        [&] {
          cuda_ops::lora_backward(ctx_, dinp.data(), dA.data(), dB.data(), dh.data(), dout.data(), h.data(),
                                  x.data(), A.data(), B.data(), 1.0f / float(R), N, IN, OUT, R);
        },
        [&] {
          // dh = dout B; dB += dout^T h; dA += dh^T x; dinp += dh A.
          return gemm_ms(Trans::N, Trans::N, N, R, OUT, dout.data(), B.data(), dh.data(), GemmOut::BF16,
                         0.0f) +
                 gemm_ms(Trans::T, Trans::N, OUT, R, N, dout.data(), h.data(), dB.data(), GemmOut::F32,
                         1.0f) +
                 gemm_ms(Trans::T, Trans::N, R, IN, N, dh.data(), x.data(), dA.data(), GemmOut::F32, 1.0f) +
                 gemm_ms(Trans::N, Trans::N, N, IN, R, dh.data(), A.data(), dinp.data(), GemmOut::BF16, 1.0f);
        });
  }
}

// ---- attention -------------------------------------------------------------------------

void Bench::bench_attention(const ModelShape& m, int64_t N, int64_t T, const std::string& group) {
  const int64_t B = N / T, H = m.H, KVH = m.KVH, D = m.D;
  if (B < 1 || B * T != N) fail("attention: N = ", N, " is not a multiple of T = ", T);
  auto q = random_bf16(N * H * D, 61, 1.0f), k = random_bf16(N * KVH * D, 62, 1.0f);
  auto v = random_bf16(N * KVH * D, 63, 1.0f), dout = random_bf16(N * H * D, 64, 1.0f);
  DeviceBuffer<uint16_t> out{size_t(N * H * D)}, dq{size_t(N * H * D)}, dk{size_t(N * KVH * D)},
      dv{size_t(N * KVH * D)};
  DeviceBuffer<float> lse{size_t(B * H * T)};
  DeviceBuffer<int32_t> doc_start{size_t(N)};
  // One document per row: fully causal. The memset runs on the legacy stream, the ops do not.
  QLORA_CUDA_CHECK(cudaMemset(doc_start.data(), 0, doc_start.bytes()));
  QLORA_CUDA_CHECK(cudaDeviceSynchronize());
  ctx_.workspace(cuda_ops::attention_backward_workspace_bytes(B, T, H, D));
  // Useful FLOPs: each matmul covers the T(T+1)/2 causal (query, key) pairs of
  // a head, D multiply-adds each; forward QK^T, PV; backward dV, dP, dQ, dK.
  const double matmul = double(B) * double(H) * double(D) * double(T) * double(T + 1);
  const std::string shape = str("B", B, " T", T, " H", H, " KVH", KVH, " D", D, " causal");
  const std::string ceiling = "cuBLAS GEMM rate (square)";
  for (const auto tiles : {cuda_ops::AttentionTiles::Auto, cuda_ops::AttentionTiles::Small}) {
    const char* algo = tiles == cuda_ops::AttentionTiles::Auto ? "auto tiles" : "small tiles";
    // Forward first: backward reads its out and lse.
    add(
        row(group, "attention fwd", shape, algo, true, 2 * matmul, ceiling),
        [&] {
          cuda_ops::attention_forward(ctx_, out.data(), lse.data(), q.data(), k.data(), v.data(),
                                      doc_start.data(), B, T, H, KVH, D, tiles);
        },
        [&] { return 2 * matmul / (ref_gemm_tflops_ * 1e12) * 1e3; });
    add(
        row(group, "attention bwd", shape, algo, true, 4 * matmul, ceiling),
        [&] {
          cuda_ops::attention_backward(ctx_, dq.data(), dk.data(), dv.data(), dout.data(), out.data(),
                                       lse.data(), q.data(), k.data(), v.data(), doc_start.data(), B, T, H,
                                       KVH, D, tiles);
        },
        [&] { return 4 * matmul / (ref_gemm_tflops_ * 1e12) * 1e3; });
  }
}

// ---- lm_head + cross entropy ---------------------------------------------------------

void Bench::bench_loss(const ModelShape& m, int64_t N, const std::string& group) {
  const int64_t C = m.C, V = m.V;
  auto x = random_bf16(N * C, 21, 1.0f), W = random_bf16(V * C, 22, 0.0346f);
  DeviceBuffer<int32_t> targets{size_t(N)};
  fill(targets.data(), N, [&](int64_t i) { return int32_t(mix64(uint64_t(i) + 23) % uint64_t(V)); });
  DeviceBuffer<float> losses{size_t(N)}, lse{size_t(N)};
  DeviceBuffer<uint16_t> dx{size_t(N * C)};
  ops::CeChunking ch;
  ch.rows = opt_.ce_rows > 0 ? std::min(opt_.ce_rows, N) : N;
  ch.vchunk = std::min(opt_.ce_vchunk, V);
  ctx_.workspace(cuda_ops::lm_head_ce_workspace_bytes(ch, N, C, V));  // grown once, outside the timing
  const std::string shape = str("N", N, " C", C, " V", V, " (", ch.rows, "x", ch.vchunk, " chunks)");
  const double gemm_flops = 2.0 * double(N) * double(C) * double(V);
  // The ceiling's logits: (N,V) bf16, the whole vocabulary at once.
  DeviceBuffer<uint16_t> logits{size_t(N * V)};
  add(
      row(group, "lm_head+CE fwd", shape, "", true, gemm_flops, "cuBLAS bf16 GEMM"),
      [&] {
        cuda_ops::lm_head_cross_entropy_forward(ctx_, losses.data(), lse.data(), x.data(), W.data(),
                                                targets.data(), ch, N, C, V);
      },
      [&] {
        return gemm_ms(Trans::N, Trans::T, N, V, C, x.data(), W.data(), logits.data(), GemmOut::BF16, 0.f);
      });
  // Backward recomputes the logits and multiplies dlogits (N,V) by W (V,C).
  add(
      row(group, "lm_head+CE bwd", shape, "", true, 2.0 * gemm_flops, "cuBLAS bf16 GEMM"),
      [&] {
        cuda_ops::lm_head_cross_entropy_backward(ctx_, dx.data(), x.data(), W.data(), lse.data(),
                                                 targets.data(), 1.0f / float(N), ch, N, C, V);
      },
      [&] {
        return gemm_ms(Trans::N, Trans::T, N, V, C, x.data(), W.data(), logits.data(), GemmOut::BF16, 0.f) +
               gemm_ms(Trans::N, Trans::N, N, C, V, logits.data(), W.data(), dx.data(), GemmOut::BF16, 0.f);
      });
}

// ---- elementwise and normalization ------------------------------------------------

void Bench::bench_elementwise(const ModelShape& m, int64_t N, const std::string& group) {
  const std::string bw = "device copy BW";
  {
    const int64_t C = m.C;
    auto x = random_bf16(N * C, 31, 1.0f), w = random_bf16(C, 32, 1.0f), dout = random_bf16(N * C, 33, 1.0f);
    DeviceBuffer<uint16_t> out{size_t(N * C)}, dx{size_t(N * C)};
    DeviceBuffer<float> rstd{size_t(N)};
    const std::string shape = str("N", N, " C", C);
    const double nc2 = 2.0 * double(N) * double(C), side = 2.0 * double(C) + 4.0 * double(N);
    add(
        row(group, "rmsnorm fwd", shape, "", false, 2 * nc2 + side, bw),
        [&] {
          cuda_ops::rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), N, C, 1e-5f, ctx_.stream());
        },
        [&] { return copy_ms(2 * nc2 + side); });
    add(
        row(group, "rmsnorm bwd", shape, "", false, 3 * nc2 + side, bw),
        [&] {
          cuda_ops::rmsnorm_backward(dx.data(), dout.data(), x.data(), w.data(), rstd.data(), N, C,
                                     ctx_.stream());
        },
        [&] { return copy_ms(3 * nc2 + side); });
  }
  {
    const int64_t n = N * m.I;
    auto gate = random_bf16(n, 34, 2.0f), up = random_bf16(n, 35, 1.0f), dout = random_bf16(n, 36, 1.0f);
    DeviceBuffer<uint16_t> out{size_t(n)}, dgate{size_t(n)}, dup{size_t(n)};
    const std::string shape = str("N", N, " I", m.I);
    const double e2 = 2.0 * double(n);
    add(
        row(group, "swiglu fwd", shape, "", false, 3 * e2, bw),
        [&] { cuda_ops::swiglu_forward(out.data(), gate.data(), up.data(), n, ctx_.stream()); },
        [&] { return copy_ms(3 * e2); });
    add(
        row(group, "swiglu bwd", shape, "", false, 5 * e2, bw),
        [&] {
          cuda_ops::swiglu_backward(dgate.data(), dup.data(), dout.data(), gate.data(), up.data(), n,
                                    ctx_.stream());
        },
        [&] { return copy_ms(5 * e2); });
  }
  {
    // RoPE on q (N,H,D) in place, positions 0..T-1 per row of 2048.
    const int64_t H = m.H, D = m.D, P = 4096;
    auto q = random_bf16(N * H * D, 37, 1.0f);
    DeviceBuffer<int32_t> pos{size_t(N)};
    fill(pos.data(), N, [](int64_t i) { return int32_t(i % 2048); });
    auto cos = random_f32(P * D / 2, 38, 1.0f), sin = random_f32(P * D / 2, 39, 1.0f);
    const std::string shape = str("q: N", N, " H", H, " D", D);
    // x read and written; pos; the table rows the positions touch (2048 of them).
    const double bytes =
        4.0 * double(N * H * D) + 4.0 * double(N) + 2.0 * 4.0 * double(std::min<int64_t>(N, 2048) * D / 2);
    add(
        row(group, "rope fwd", shape, "", false, bytes, bw),
        [&] { cuda_ops::rope_forward(q.data(), pos.data(), cos.data(), sin.data(), N, H, D, ctx_.stream()); },
        [&] { return copy_ms(bytes); });
    add(
        row(group, "rope bwd", shape, "", false, bytes, bw),
        [&] {
          cuda_ops::rope_backward(q.data(), pos.data(), cos.data(), sin.data(), N, H, D, ctx_.stream());
        },
        [&] { return copy_ms(bytes); });
  }
}

// ---- quantization ------------------------------------------------------------------

void Bench::bench_quant(const ModelShape& m, const std::string& group) {
  const int64_t n = m.I * m.C, nb = quant4_num_blocks(n, kDefaultBlock4);
  auto x = random_bf16(n, 41, 0.0346f);
  DeviceBuffer<uint8_t> codes{size_t(quant4_code_bytes(n))};
  DeviceBuffer<float> absmax{size_t(nb)};
  DeviceBuffer<uint16_t> y{size_t(n)};
  const std::string shape = str("gate ", m.I, "x", m.C, " block 64");
  const double packed = double(quant4_code_bytes(n)) + 4.0 * double(nb), dense = 2.0 * double(n);
  const std::string bw = "device copy BW";
  add(
      row(group, "quantize nf4 (bf16 in)", shape, "", false, dense + packed, bw),
      [&] {
        cuda_quantize4(x.data(), n, kDefaultBlock4, Quant4Type::NF4, codes.data(), absmax.data(),
                       ctx_.stream());
      },
      [&] { return copy_ms(dense + packed); });
  add(
      row(group, "dequantize nf4 (bf16 out)", shape, "", false, dense + packed, bw),
      [&] {
        cuda_dequantize4(codes.data(), absmax.data(), n, kDefaultBlock4, Quant4Type::NF4, y.data(),
                         ctx_.stream());
      },
      [&] { return copy_ms(dense + packed); });
}

// ---- optimizer ----------------------------------------------------------------------

void Bench::bench_optimizer(const ModelShape& m, const std::string& group) {
  // The flat LoRA parameters of the whole model (r = 16 on all 7 block linears).
  const int64_t n = lora_params_per_layer(m) * m.layers;
  auto master = random_f32(n, 51, 0.01f), grad = random_f32(n, 52, 1e-3f);
  auto mom = constant_f32(n, 0.0f), var = constant_f32(n, 0.0f);
  DeviceBuffer<uint16_t> param{size_t(n)};
  cuda_ops::OptimStep st;
  st.kind = 0;
  st.t = 1;
  st.lr = 2e-4;
  const std::string shape = str(n, " LoRA params (r", kRank, ", ", m.layers, " layers)");
  const std::string bw = "device copy BW";
  // master, m, v read and written (fp32), grad read (fp32), bf16 copy written.
  const double adam_bytes = 30.0 * double(n);
  add(
      row(group, "adamw step", shape, "", false, adam_bytes, bw),
      [&] {
        cuda_ops::optimizer_step(master.data(), param.data(), grad.data(), mom.data(), var.data(), n, st,
                                 ctx_.stream());
      },
      [&] { return copy_ms(adam_bytes); });
  DeviceBuffer<double> sum(1);
  DeviceBuffer<uint8_t> ws(std::max<size_t>(cuda_ops::sum_squares_workspace_bytes(n), 8));
  add(
      row(group, "grad sum of squares", shape, "", false, 4.0 * double(n), bw),
      [&] { cuda_ops::sum_squares(grad.data(), n, sum.data(), ws.data(), ctx_.stream()); },
      [&] { return copy_ms(4.0 * double(n)); });
  // Paged: m and v (8 bytes per param) page in and out over PCIe/NVLink-C2C.
  PagedAdamState paged(ctx_, n);
  Event begin, end;
  const double host_bytes = 8.0 * double(n);
  add(
      row(group, "paged adamw step", shape, "", false, 2.0 * host_bytes, "pinned copy BW (in + out)"),
      [&] {
        // The copy stream starts after the timer's start event and the compute
        // stream waits for the last page-out, so the timed window is the whole step.
        QLORA_CUDA_CHECK(cudaEventRecord(begin.e, ctx_.stream()));
        QLORA_CUDA_CHECK(cudaStreamWaitEvent(ctx_.copy_stream(), begin.e, 0));
        paged.step(master.data(), param.data(), grad.data(), st);
        QLORA_CUDA_CHECK(cudaEventRecord(end.e, ctx_.copy_stream()));
        QLORA_CUDA_CHECK(cudaStreamWaitEvent(ctx_.stream(), end.e, 0));
      },
      [&] { return host_bytes / (h2d_gbps_ * 1e9) * 1e3 + host_bytes / (d2h_gbps_ * 1e9) * 1e3; });
  ctx_.synchronize();  // the paged state's copies finish before it is destroyed
}

// ---- one model -------------------------------------------------------------------------

void Bench::run_model(const ModelShape& m, const std::vector<int64_t>& tokens, int64_t T) {
  std::printf("\n## %s: C %lld, I %lld, H %lld, KVH %lld, D %lld, V %lld\n", m.name, (long long)m.C,
              (long long)m.I, (long long)m.H, (long long)m.KVH, (long long)m.D, (long long)m.V);
  if (wants("linear")) {
    print_header(str(m.name, ": NF4 linear (block 64, double-quantized scales) vs cuBLAS bf16"));
    bench_linear(m, tokens);
  }
  if (wants("gemv")) {
    print_header(str(m.name, ": NF4 GEMV at batch 1 vs device copy bandwidth"));
    bench_gemv(m);
  }
  for (const int64_t N : tokens) {
    const std::string g = str(m.name, " N", N);
    if (wants("attention")) {
      print_header(str(g, ": attention (rows of T = ", T, ")"));
      bench_attention(m, N, T, g);
    }
    if (wants("lora")) {
      print_header(str(g, ": LoRA r", kRank));
      bench_lora(m, N, g);
    }
    if (wants("loss")) {
      print_header(str(g, ": lm_head + cross entropy"));
      bench_loss(m, N, g);
    }
    if (wants("elementwise")) {
      print_header(str(g, ": memory-bound ops"));
      bench_elementwise(m, N, g);
    }
  }
  if (wants("quant")) {
    print_header(str(m.name, ": quantization"));
    bench_quant(m, m.name);
  }
  if (wants("optimizer")) {
    print_header(str(m.name, ": optimizer"));
    bench_optimizer(m, m.name);
  }
}

nlohmann::json Bench::to_json() const {
  nlohmann::json rows = nlohmann::json::array();
  for (const Row& r : rows_) {
    nlohmann::json j = {{"group", r.group}, {"op", r.op}, {"shape", r.shape}, {"algo", r.algo}};
    if (!r.error.empty()) {
      j["error"] = r.error;
    } else {
      j.update({{"ms", r.ms},
                {"kind", r.flops ? "flops" : "bytes"},
                {"amount", r.amount},
                {"rate", r.rate()},
                {"unit", r.flops ? "TFLOP/s" : "GB/s"},
                {"ceiling", r.ceiling},
                {"ceiling_ms", r.ceiling_ms},
                {"ratio", r.ratio()}});
    }
    j["target"] = r.target ? nlohmann::json(*r.target) : nlohmann::json(nullptr);
    rows.push_back(j);
  }
  const CudaDeviceInfo& info = ctx_.info();
  return {{"tool", "bench_cuda_ops"},
          {"gpu", info.name},
          {"compute_capability", ctx_.arch()},
          {"sm_count", info.sm_count},
          {"quick", opt_.quick},
          {"reps", opt_.reps},
          {"warmup", opt_.warmup},
          {"ceilings",
           {{"copy_gbps", copy_gbps_},
            {"h2d_gbps", h2d_gbps_},
            {"d2h_gbps", d2h_gbps_},
            {"ref_gemm_tflops", ref_gemm_tflops_},
            {"best_gemm_tflops", best_gemm_tflops_}}},
          {"rows", rows}};
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "GPU op benchmarks at Llama training shapes, against cuBLAS and copy-bandwidth ceilings "
      "measured in the same run"};
  Options opt;
  app.add_flag("--quick", opt.quick, "small shapes, a smoke run");
  app.add_option("--json", opt.json, "also write the results as JSON to this file");
  app.add_option("--reps", opt.reps, "timed calls per measurement (median reported)")
      ->check(CLI::Range(1, 1000));
  app.add_option("--warmup", opt.warmup, "untimed calls first")->check(CLI::Range(0, 100));
  app.add_option("--only", opt.only,
                 "run only these groups (comma-separated): linear, gemv, attention, lora, loss, elementwise, "
                 "quant, optimizer")
      ->delimiter(',')
      ->check(CLI::IsMember(
          {"linear", "gemv", "attention", "lora", "loss", "elementwise", "quant", "optimizer"}));
  app.add_option("--ce-rows", opt.ce_rows, "cross entropy: token rows per chunk (0 = all)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--ce-vchunk", opt.ce_vchunk, "cross entropy: vocabulary entries per chunk")
      ->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);

  if (const auto why = cuda_unavailable_reason()) {
    // Not an error: a machine without a GPU (a dry run, CI) measures nothing and says why; the JSON,
    // when asked for, says the same (status "skipped", no rows).
    std::printf("bench_cuda_ops: no usable GPU, nothing measured: %s\n", why->c_str());
    if (!opt.json.empty()) {
      std::ofstream f(opt.json);
      f << nlohmann::json{{"tool", "bench_cuda_ops"},
                          {"status", "skipped"},
                          {"reason", "no usable GPU: " + *why},
                          {"rows", nlohmann::json::array()}}
               .dump(1)
        << "\n";
      if (!f) {
        std::fprintf(stderr, "bench_cuda_ops: cannot write %s\n", opt.json.c_str());
        return 1;
      }
    }
    return 0;
  }
  try {
    CudaContext ctx(0);
    const std::time_t now = std::time(nullptr);
    char date[64];
    std::strftime(date, sizeof date, "%Y-%m-%d %H:%M:%S UTC", std::gmtime(&now));
    std::printf(
        "bench_cuda_ops, %s: %s (compute capability %d, %d SMs, %.1f GiB), median of %d after %d "
        "warm-up calls, L2 flushed before each\n",
        date, ctx.info().name.c_str(), ctx.arch(), ctx.info().sm_count,
        double(ctx.info().total_bytes) / double(1 << 30), opt.reps, opt.warmup);
    Bench bench(ctx, opt);
    int rc = 0;
    try {
      bench.measure_ceilings();
      if (opt.quick) {
        bench.run_model(kQuick, {512}, 512);
      } else {
        bench.run_model(kLlama8B, {2048, 4096}, 2048);
        bench.run_model(kLlama70B, {2048, 4096}, 2048);
      }
    } catch (const std::exception& e) {
      // Keep what was measured: the JSON below holds the rows up to here.
      std::fprintf(stderr, "bench_cuda_ops: %s\n", e.what());
      rc = 1;
    }
    if (!opt.json.empty()) {
      nlohmann::json j = bench.to_json();
      j["date"] = date;
      j["complete"] = rc == 0;
      std::ofstream f(opt.json);
      f << j.dump(1) << "\n";
      if (!f) fail("cannot write ", opt.json);
      std::printf("\nwrote %s\n", opt.json.c_str());
    }
    if (const int n = bench.failures()) {
      std::fprintf(stderr, "bench_cuda_ops: %d measurement%s failed (rows marked error)\n", n,
                   n == 1 ? "" : "s");
      rc = 1;
    }
    return rc;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_ops: %s\n", e.what());
    return 1;
  }
}
