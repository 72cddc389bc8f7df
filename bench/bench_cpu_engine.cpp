// CPU reference engine benchmarks (tables, never timed tests):
// 1. the NF4 linear against sgemm over the same weights in fp32, forward and
//    input-gradient, per shape (target <= 1.3x): up to 8 rows the fused
//    dequantize-and-consume paths, training shapes the panel + sgemm path;
// 2. forward+backward tokens/s of a few random Llama shapes with LoRA on all
//    block linears, with and without activation checkpointing.
// 3. for bench/cpu_vs_hf.sh, one measurement per process (peak RSS is the
//    process's), printed as one JSON line: --train MODEL (a training step of
//    random weights of a real config from bench/shapes.json "cpu_models", the
//    trainer's step through make_cpu_engine, with the memory plan's figure),
//    --generate FILE (batch-1 greedy tokens/s), --gemm-ceiling (sgemm GFLOP/s
//    through the same OpenBLAS).
// Usage: bench_cpu_engine [--quick] [--linear-only] [--reps R]
//        bench_cpu_engine --train MODEL --seq T [--batch B] [--steps N] [--warmup W] [--no-checkpointing]
//        bench_cpu_engine --generate MODEL_PATH [--tokens N]
//        bench_cpu_engine --gemm-ceiling [--size N]
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

#include <cblas.h>
#include <nlohmann/json.hpp>
#include <omp.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <fstream>

#include "core/error.h"
#include "io/safetensors.h"
#include "kernels/ops.h"
#include "model/llama.h"
#include "model/llama_generate.h"
#include "model/random_weights.h"
#include "plan/plan.h"
#include "quant/blockwise.h"
#include "train/engine.h"
#include "train/optimizer.h"

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

// ---- one measurement per process, for bench/cpu_vs_hf.sh -------------------------------

uint64_t peak_rss_bytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return uint64_t(u.ru_maxrss) * 1024;  // KiB on Linux
}

// CPU time of all of the process's threads (user + system): on a machine
// shared with other jobs, a steadier measure of the work than wall time.
double process_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

// A config.json of bench/shapes.json's "cpu_models" (the published configs of
// the models bench/cpu_vs_hf.sh compares on).
ModelConfig shape_config(const std::string& file, const std::string& name) {
  std::ifstream f(file);
  if (!f) fail("cannot open ", file, " (give --shapes-file bench/shapes.json)");
  const nlohmann::json j = nlohmann::json::parse(f, nullptr, false);
  if (j.is_discarded() || !j.contains("cpu_models") || !j["cpu_models"].is_object())
    fail(file, ": expected an object \"cpu_models\" of config.json objects");
  if (!j["cpu_models"].contains(name)) {
    std::string known;
    for (const auto& [k, v] : j["cpu_models"].items()) known += str(known.empty() ? "" : ", ", k);
    fail(file, ": no cpu_models entry '", name, "' (known: ", known, ")");
  }
  return parse_model_config(j["cpu_models"][name], str(file, ": cpu_models.", name));
}

struct TrainOptions {
  std::string model, shapes_file;
  int64_t seq = 256, batch = 2, steps = 2, warmup = 1;
  bool checkpointing = true;
};

// The trainer's step (forward, backward, clip 1.0, AdamW) on random NF4
// weights of the config, objects built with the plan's options so the plan's
// arenas are the allocated ones.
void bench_train(const TrainOptions& o) {
  PlanInput in;
  in.model = shape_config(o.shapes_file, o.model);
  in.model_name = o.model;
  in.seq_len = o.seq;
  in.micro_batch = o.batch;
  in.checkpointing = o.checkpointing;
  in.lora.rank = 16;
  in.lora.alpha = 16.0;
  const MemoryPlan plan = make_plan(in);
  const LlamaWeights w = random_llama_weights(in.model, weight_load_options(in), 1);
  LoraWeights lora(in.model, in.lora);
  lora.init_default(1);
  Optimizer opt(in.optimizer, lora.flat_size());
  auto engine = make_cpu_engine(w, lora, opt, o.batch, o.seq, llama_run_options(in));
  const int64_t n = o.batch * o.seq, V = in.model.vocab_size;
  std::vector<int32_t> tokens(static_cast<size_t>(n)), targets(tokens.size());
  std::mt19937 rng(7);
  for (auto& t : tokens) t = int32_t(rng() % uint32_t(V));
  for (size_t i = 0; i < tokens.size(); ++i) targets[i] = tokens[(i + 1) % tokens.size()];
  const LlamaBatch batch{tokens.data(), targets.data(), nullptr, o.batch, o.seq};
  std::vector<double> times, cpu_times, losses;
  for (int64_t s = 0; s < o.warmup + o.steps; ++s) {
    const auto t0 = Clock::now();
    const double c0 = process_cpu_seconds();
    engine->zero_grad();
    losses.push_back(engine->model().forward(batch));
    engine->model().backward();
    engine->clip_grad_norm(1.0);
    engine->optimizer_step(1e-4);
    if (s >= o.warmup) {
      times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
      cpu_times.push_back(process_cpu_seconds() - c0);
    }
  }
  std::sort(times.begin(), times.end());
  std::sort(cpu_times.begin(), cpu_times.end());
  const double median = times[times.size() / 2];
  const nlohmann::json j = {{"side", "qlora"},
                            {"model", o.model},
                            {"seq", o.seq},
                            {"micro_batch", o.batch},
                            {"threads", omp_get_max_threads()},
                            {"checkpointing", o.checkpointing},
                            {"steps", o.steps},
                            {"step_s_median", median},
                            {"tokens_per_s", double(n) / median},
                            {"cpu_s_median", cpu_times[cpu_times.size() / 2]},
                            {"peak_rss_bytes", peak_rss_bytes()},
                            {"planned_bytes", plan.device_bytes},
                            {"planned_arenas_bytes", plan.arenas.total()},
                            {"loss_first", losses.front()},
                            {"loss_last", losses.back()}};
  std::printf("%s\n", j.dump().c_str());
}

// Batch-1 greedy generation: an 8-token prompt, then `tokens` tokens one at a
// time (the time of those alone), as `qlora generate` runs it.
void bench_generate(const std::string& path, int64_t tokens) {
  WeightLoadOptions opt;
  opt.quantize = true;
  const LlamaWeights w = load_llama_weights(path, opt);
  const int64_t V = w.cfg.vocab_size;
  LlamaGenerator gen(w, nullptr, 8 + tokens + 1);
  std::vector<int32_t> prompt(8);
  for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = int32_t((i * 7919 + 13) % size_t(V));
  std::vector<float> logits(static_cast<size_t>(V));
  gen.feed(prompt.data(), int64_t(prompt.size()), logits.data());
  const auto t0 = Clock::now();
  const double c0 = process_cpu_seconds();
  for (int64_t s = 0; s < tokens; ++s) {
    const int32_t id = int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
    gen.feed(&id, 1, logits.data());
  }
  const double sec = std::chrono::duration<double>(Clock::now() - t0).count(), cpu = process_cpu_seconds() - c0;
  const nlohmann::json j = {{"side", "qlora"},       {"generate", path},
                            {"tokens", tokens},      {"threads", omp_get_max_threads()},
                            {"tokens_per_s", double(tokens) / sec}, {"cpu_s", cpu},
                            {"peak_rss_bytes", peak_rss_bytes()}};
  std::printf("%s\n", j.dump().c_str());
}

// The fp32 GEMM ceiling of this machine through this OpenBLAS: the best of a
// few square sgemms.
void bench_gemm_ceiling(int64_t size) {
  const int n = int(size);
  const auto a = randn(size * size, 1, 1.0f), b = randn(size * size, 2, 1.0f);
  std::vector<float> c(size_t(size * size));
  double best_cpu = 1e30;
  const double s = best_seconds(
      [&] {
        const double c0 = process_cpu_seconds();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f,
                    c.data(), n);
        best_cpu = std::min(best_cpu, process_cpu_seconds() - c0);
      },
      5);
  const double flop = 2.0 * double(size) * size * size;
  const nlohmann::json j = {{"side", "qlora"}, {"gemm", "openblas sgemm"}, {"size", size},
                            {"threads", omp_get_max_threads()}, {"gflops", flop / s / 1e9},
                            {"gflop_per_cpu_s", flop / best_cpu / 1e9}};
  std::printf("%s\n", j.dump().c_str());
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false, linear_only = false, gemm = false;
  int reps = 5;
  TrainOptions train;
  train.shapes_file = QLORA_SOURCE_DIR "/bench/shapes.json";
  std::string generate;
  int64_t gen_tokens = 32, gemm_size = 2048;
  const auto usage = [] {
    std::fprintf(stderr,
                 "usage: bench_cpu_engine [--quick] [--linear-only] [--reps R]\n"
                 "       bench_cpu_engine --train MODEL --seq T [--batch B] [--steps N] [--warmup W] "
                 "[--no-checkpointing] [--shapes-file F]\n"
                 "       bench_cpu_engine --generate MODEL_PATH [--tokens N]\n"
                 "       bench_cpu_engine --gemm-ceiling [--size N]\n");
    return 2;
  };
  const auto num = [&](int& i, int64_t lo) {
    const long long v = std::atoll(argv[++i]);
    if (v < lo) throw std::invalid_argument(argv[i - 1]);
    return int64_t(v);
  };
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      const bool has = i + 1 < argc;
      if (a == "--quick") {
        quick = true;
      } else if (a == "--linear-only") {
        linear_only = true;
      } else if (a == "--reps" && has) {
        reps = int(num(i, 1));
      } else if (a == "--train" && has) {
        train.model = argv[++i];
      } else if (a == "--seq" && has) {
        train.seq = num(i, 2);
      } else if (a == "--batch" && has) {
        train.batch = num(i, 1);
      } else if (a == "--steps" && has) {
        train.steps = num(i, 1);
      } else if (a == "--warmup" && has) {
        train.warmup = num(i, 0);
      } else if (a == "--no-checkpointing") {
        train.checkpointing = false;
      } else if (a == "--shapes-file" && has) {
        train.shapes_file = argv[++i];
      } else if (a == "--generate" && has) {
        generate = argv[++i];
      } else if (a == "--tokens" && has) {
        gen_tokens = num(i, 1);
      } else if (a == "--gemm-ceiling") {
        gemm = true;
      } else if (a == "--size" && has) {
        gemm_size = num(i, 64);
      } else {
        return usage();
      }
    }
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "bench_cpu_engine: %s: expected a larger number\n", e.what());
    return usage();
  }
  if (!train.model.empty() || !generate.empty() || gemm) {
    try {
      if (gemm) bench_gemm_ceiling(gemm_size);
      if (!train.model.empty()) bench_train(train);
      if (!generate.empty()) bench_generate(generate, gen_tokens);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "bench_cpu_engine: %s\n", e.what());
      return 1;
    }
    return 0;
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
