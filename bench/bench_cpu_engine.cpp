// CPU reference engine benchmarks (tables, never timed tests):
// 1. the NF4 linear against sgemm over the same weights in fp32, forward and
//    input-gradient, per shape (target <= 1.3x): up to 8 rows the fused
//    dequantize-and-consume paths, training shapes the panel + sgemm path;
// 2. forward+backward tokens/s of a few random Llama shapes with LoRA on all
//    block linears, with and without activation checkpointing.
// Usage: bench_cpu_engine [--quick] [--linear-only] [--reps R]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <unistd.h>

#include "io/safetensors.h"
#include "kernels/ops.h"
#include "model/llama.h"
#include "quant/blockwise.h"

using namespace qlora;
using Clock = std::chrono::steady_clock;

namespace {

std::vector<float> randn(int64_t n, unsigned seed, float sigma) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, sigma);
  std::vector<float> x(static_cast<size_t>(n));
  for (auto& v : x) v = d(rng);
  return x;
}

template <typename F>
double best_seconds(F&& f, int reps) {
  f();  // warm-up (grows the panel buffer, spins up threads)
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return best;
}

double seconds(const std::function<void()>& f) {
  const auto t0 = Clock::now();
  f();
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

void bench_linear(bool quick, int reps) {
  // Load from other processes only ever adds time, so each side's best run is
  // the steadiest estimate of its cost; runs alternate between the variants
  // so a burst of load hits both. Small shapes are cheap: 5x the runs.
  std::printf("NF4 linear vs sgemm on the same weights (fp32), best of %d interleaved runs (%d for N <= 8)\n", reps,
              5 * reps);
  std::printf("%6s %6s %6s | %10s %10s %6s | %10s %10s %6s\n", "N", "OUT", "IN", "fwd nf4 ms", "fwd f32 ms", "ratio",
              "bwd nf4 ms", "bwd f32 ms", "ratio");
  struct S {
    int64_t N, OUT, IN;
  };
  // N <= 8: generation and the fused paths (N = 8 is their largest); N >= 512: training.
  std::vector<S> shapes = {{1, 2048, 2048},   {2, 2048, 2048},   {4, 2048, 2048},  {8, 2048, 2048},
                           {1, 5632, 2048},   {1, 2048, 5632},   {512, 2048, 2048}, {512, 5632, 2048},
                           {2048, 4096, 4096}};
  if (quick) shapes = {{1, 2048, 2048}, {4, 2048, 2048}, {512, 2048, 2048}};
  for (S s : shapes) {
    const auto w = randn(s.OUT * s.IN, 1, 0.02f);
    const Quant4Tensor q = quantize_tensor(w.data(), {s.OUT, s.IN}, Quant4Type::NF4, 64, true);
    const std::vector<float> scales = q.block_scales();
    std::vector<float> deq(w.size());
    dequantize_tensor(q, deq.data());
    ops::LinearWeight wq, wd;
    wq.out = wd.out = s.OUT;
    wq.in = wd.in = s.IN;
    wq.codes = q.codes.data();
    wq.absmax = scales.data();
    wd.dense = deq.data();
    const auto x = randn(s.N * s.IN, 2, 1.0f), dy = randn(s.N * s.OUT, 3, 1.0f);
    std::vector<float> y(size_t(s.N * s.OUT)), dx(size_t(s.N * s.IN));
    const std::function<void()> runs[4] = {[&] { ops::linear_forward(y.data(), x.data(), wq, nullptr, s.N); },
                                            [&] { ops::linear_forward(y.data(), x.data(), wd, nullptr, s.N); },
                                            [&] { ops::linear_backward(dx.data(), dy.data(), wq, s.N); },
                                            [&] { ops::linear_backward(dx.data(), dy.data(), wd, s.N); }};
    // Warm-up (grows the panel buffer, spins up threads), then the four
    // variants in turn, so a burst of load from elsewhere hits both sides.
    for (const auto& f : runs) f();
    double t[4] = {1e30, 1e30, 1e30, 1e30};
    for (int r = 0; r < (s.N <= 8 ? 5 * reps : reps); ++r)
      for (int i = 0; i < 4; ++i) t[i] = std::min(t[i], seconds(runs[i]));
    const double fq = t[0], fd = t[1], bq = t[2], bd = t[3];
    std::printf("%6lld %6lld %6lld | %10.3f %10.3f %5.2fx | %10.3f %10.3f %5.2fx\n", (long long)s.N,
                (long long)s.OUT, (long long)s.IN, fq * 1e3, fd * 1e3, fq / fd, bq * 1e3, bd * 1e3, bq / bd);
    std::fflush(stdout);
  }
}

struct ModelShape {
  const char* name;
  int64_t C, I, L, H, KVH, V, B, T;
};

// A random model written as an HF folder (BF16) and loaded quantized to NF4.
std::filesystem::path write_random_model(const ModelShape& m, const std::filesystem::path& dir) {
  std::filesystem::create_directories(dir);
  nlohmann::json cfg = {{"model_type", "llama"},          {"vocab_size", m.V},
                        {"hidden_size", m.C},             {"intermediate_size", m.I},
                        {"num_hidden_layers", m.L},       {"num_attention_heads", m.H},
                        {"num_key_value_heads", m.KVH},   {"max_position_embeddings", 4096},
                        {"rms_norm_eps", 1e-5},           {"tie_word_embeddings", false}};
  { std::FILE* f = std::fopen((dir / "config.json").c_str(), "w"); std::fputs(cfg.dump().c_str(), f); std::fclose(f); }
  std::vector<OwnedTensor> ts;
  const int64_t D = m.C / m.H;
  auto add = [&](const std::string& name, Shape shape, float sigma, float mean = 0.0f) {
    auto v = randn(shape_numel(shape), unsigned(ts.size() + 1), sigma);
    for (auto& x : v) x += mean;
    OwnedTensor t{name, DType::F32, shape, std::vector<uint8_t>(v.size() * 4)};
    std::memcpy(t.bytes.data(), v.data(), t.bytes.size());
    ts.push_back(std::move(t));
  };
  add("model.embed_tokens.weight", {m.V, m.C}, 1.0f);
  for (int64_t l = 0; l < m.L; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {m.C}, 0.0f, 1.0f);
    add(p + "post_attention_layernorm.weight", {m.C}, 0.0f, 1.0f);
    add(p + "self_attn.q_proj.weight", {m.H * D, m.C}, 0.02f);
    add(p + "self_attn.k_proj.weight", {m.KVH * D, m.C}, 0.02f);
    add(p + "self_attn.v_proj.weight", {m.KVH * D, m.C}, 0.02f);
    add(p + "self_attn.o_proj.weight", {m.C, m.H * D}, 0.02f);
    add(p + "mlp.gate_proj.weight", {m.I, m.C}, 0.02f);
    add(p + "mlp.up_proj.weight", {m.I, m.C}, 0.02f);
    add(p + "mlp.down_proj.weight", {m.C, m.I}, 0.02f);
  }
  add("model.norm.weight", {m.C}, 0.0f, 1.0f);
  add("lm_head.weight", {m.V, m.C}, 0.02f);
  save_safetensors(dir / "model.safetensors", ts);
  return dir;
}

void bench_model(bool quick) {
  std::printf("\nforward+backward, NF4 base, LoRA r=16 on all block linears\n");
  std::printf("%-8s %5s %5s %3s %4s %6s %4s %5s | %12s %12s | %8s\n", "model", "C", "I", "L", "KVH", "V", "B", "T",
              "tok/s", "tok/s ckpt", "act MiB");
  std::vector<ModelShape> shapes = {{"tiny", 64, 172, 5, 8, 4, 512, 4, 128},
                                    {"small", 256, 688, 4, 8, 4, 4096, 2, 256},
                                    {"medium", 512, 1376, 4, 8, 2, 8192, 2, 256}};
  if (quick) shapes.resize(1);
  const auto root = std::filesystem::temp_directory_path() / ("qlora-bench-" + std::to_string(getpid()));
  for (const ModelShape& m : shapes) {
    const LlamaWeights w = load_llama_weights(write_random_model(m, root / m.name));
    LoraConfig lc;
    lc.rank = 16;
    LoraWeights lora(w.cfg, lc);
    lora.init_default(1);
    std::vector<int32_t> tokens(size_t(m.B * m.T)), targets(tokens.size());
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = int32_t((i * 7919) % size_t(m.V));
    for (size_t i = 0; i < tokens.size(); ++i) targets[i] = tokens[(i + 1) % tokens.size()];
    const LlamaBatch batch{tokens.data(), targets.data(), nullptr, m.B, m.T};
    double tps[2];
    size_t act = 0;
    for (int ck = 0; ck < 2; ++ck) {
      LlamaRunOptions ro;
      ro.checkpointing = ck == 1;
      LlamaModel model(w, &lora, m.B, m.T, ro);
      const double s = best_seconds([&] { model.forward(batch); model.backward(); }, 2);
      tps[ck] = double(m.B * m.T) / s;
      if (ck == 0) act = model.activation_bytes();
    }
    std::printf("%-8s %5lld %5lld %3lld %4lld %6lld %4lld %5lld | %12.0f %12.0f | %8.1f\n", m.name, (long long)m.C,
                (long long)m.I, (long long)m.L, (long long)m.KVH, (long long)m.V, (long long)m.B, (long long)m.T,
                tps[0], tps[1], double(act) / (1 << 20));
  }
  std::filesystem::remove_all(root);
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false, linear_only = false;
  int reps = 5;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else if (std::strcmp(argv[i], "--linear-only") == 0) {
      linear_only = true;
    } else if (std::strcmp(argv[i], "--reps") == 0 && i + 1 < argc) {
      reps = std::max(1, std::atoi(argv[++i]));
    } else {
      std::fprintf(stderr, "usage: bench_cpu_engine [--quick] [--linear-only] [--reps R]\n");
      return 2;
    }
  }
  // libgomp threads spin after each parallel region and then fight OpenBLAS's
  // own threads for the cores: measured 2-9x slower on 2 cores (docs/engine.md).
  // libgomp reads the variable before main, so it can only be advised here.
  if (!std::getenv("OMP_WAIT_POLICY"))
    std::printf("note: OMP_WAIT_POLICY is unset; run with OMP_WAIT_POLICY=passive for representative numbers\n\n");
  try {
    bench_linear(quick, reps);
    if (!linear_only) bench_model(quick);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cpu_engine: %s\n", e.what());
    return 1;
  }
  return 0;
}
