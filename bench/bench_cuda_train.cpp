// The QLoRA training step on the GPU (a table, never a timed test): Llama-3.1-8B- and
// Llama-2-70B-shaped models with random weights made on the spot (no download), NF4 block 64 with
// double quantization, LoRA r 16 (alpha 16, no dropout) on q, k, v, o, gate, up, down, activation
// checkpointing, seq 2048, micro-batch 1: the settings of bench/hf_baseline.py, the transformers +
// PEFT baseline, whose shapes come from the same file (bench/shapes.json).
//
// One step is the trainer's, on the CUDA StepEngine `qlora run` uses (src/train/engine_cuda.cpp):
// zero_grad, forward, backward, the gradient norm clipped to 0.3, AdamW (paged by default, as HF's
// paged_adamw_32bit) at lr 2e-4.
//
// Reported per shape (docs/benchmarks.md, "GPU benchmarks: how to run", has the details):
//   - tokens/s = B*T / the median step time (host clock between two synchronizations of the
//     engine's streams: the whole step, host gaps included, after --warmup untimed steps);
//   - MFU = useful FLOPs / step time / the GPU's dense bf16 peak, and the same useful FLOP rate over
//     a cuBLAS bf16 GEMM (N = B*T tokens, 8192 x 8192) measured in this run: the practical ceiling.
//     Useful FLOPs per token, as hf_baseline.py counts them: 4 x the weights of every matmul (the 7
//     block linears of each layer and lm_head; forward and input gradient, the base being frozen)
//     plus causal attention, 6 matmuls (QK^T, PV; dV, dP, dQ, dK) of 2 D flops over the T(T+1)/2
//     visible pairs of each of the H heads per layer: 6 D H L (T+1) per token. LoRA's products and
//     checkpointing's recomputation are not counted;
//   - peak device memory: cudaMemGetInfo's used bytes after the model and the optimizer state are
//     allocated and after every step (the step itself allocates nothing), as is (context included)
//     and less the bytes used before this shape's context and model were made; the planner's
//     forecast for the same run (make_plan, as `qlora estimate` builds it) and its error; whether
//     it fits --budget (48 GiB: the "70B-shaped QLoRA inside a 48 GB budget").
// --layers N below the model's depth runs a shallower model and adds a full-depth extrapolation,
// labelled as such: tokens/s at the measured MFU, memory = measured + the planner's extra bytes for
// the missing layers.
//
// Usage: bench_cuda_train [--quick] [--shapes 8b,70b] [--layers N] [--seq T] [--micro-batch B]
//                         [--steps S] [--warmup W] [--json FILE] [--peak-tflops P] [--budget 48GiB]
// Without a usable GPU it says why, measures nothing and exits 0 (--json: status "skipped").
#include <cuda_runtime.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <memory>
#include <new>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "cuda_bench_util.h"
#include "io/hf_config.h"
#include "kernels/cuda/context.h"
#include "kernels/cuda/device.h"
#include "model/llama.h"
#include "model/llama_cuda.h"
#include "model/lora.h"
#include "model/random_weights.h"
#include "plan/plan.h"
#include "train/engine.h"
#include "train/optimizer.h"

#ifndef QLORA_SOURCE_DIR
#define QLORA_SOURCE_DIR "."
#endif

using namespace qlora;
using namespace qlora::bench;

namespace {

// The step's settings that are not options: those of hf_baseline.py.
constexpr double kLr = 2e-4;
constexpr double kMaxGradNorm = 0.3;
constexpr float kInitStd = 0.02f;  // random base weights, as hf_baseline's normal_(0, 0.02)
// The cuBLAS ceiling: (N tokens, 8192) x (8192, 8192)^T, a 70B q/o projection's shape.
constexpr int64_t kGemmWidth = 8192;
constexpr int kGemmWarmup = 3, kGemmReps = 20;

struct Options {
  bool quick = false;
  std::vector<std::string> shapes;  // empty: every model of the shapes file
  int64_t layers = -1;              // -1: unset (2 with --quick, else the model's own); 0: the model's own
  int64_t seq = 0;                  // 0: unset (2048; 512 with --quick)
  int64_t micro_batch = 1;
  int64_t rank = 16;  // alpha = rank, as hf_baseline.py
  int warmup = -1, steps = -1;
  std::string optimizer = "paged_adamw";
  std::string budget = "48GiB";
  double peak_tflops = 0;
  std::string shapes_file = QLORA_SOURCE_DIR "/bench/shapes.json";
  std::string json;
  uint64_t seed = 0;
  int64_t ce_rows = 0, ce_vchunk = 0;  // 0: the defaults `qlora run` uses (ops::CeChunking)
};

// ---- the shapes file -------------------------------------------------------------------

struct ShapeFile {
  std::vector<std::pair<std::string, nlohmann::json>> models;  // name -> config.json, in file order
  std::vector<std::pair<std::string, double>> peaks;           // device-name substring -> TFLOP/s
};

ShapeFile load_shape_file(const std::string& path) {
  std::ifstream f(path);
  if (!f) fail("cannot open ", path, " (the benchmark shapes: give --shapes-file bench/shapes.json)");
  nlohmann::ordered_json j;
  try {
    j = nlohmann::ordered_json::parse(f);
  } catch (const nlohmann::json::exception& e) {
    fail(path, ": not valid JSON: ", e.what());
  }
  ShapeFile s;
  if (!j.contains("models") || !j["models"].is_object() || j["models"].empty())
    fail(path, ": expected an object \"models\" of config.json objects");
  for (const auto& [name, cfg] : j["models"].items())
    s.models.emplace_back(name, nlohmann::json::parse(cfg.dump()));
  if (j.contains("gpu_peak_bf16_tflops")) {
    for (const auto& e : j["gpu_peak_bf16_tflops"]) {
      if (!e.is_array() || e.size() != 2 || !e[0].is_string() || !e[1].is_number())
        fail(path, ": gpu_peak_bf16_tflops: expected [\"name\", TFLOP/s] pairs, got ", e.dump());
      s.peaks.emplace_back(e[0].get<std::string>(), e[1].get<double>());
    }
  }
  return s;
}

// "8b" selects "llama-3.1-8b": a token names a model exactly or as its last dash-separated part(s).
std::vector<std::string> select_models(const ShapeFile& s, const std::vector<std::string>& tokens) {
  std::vector<std::string> known, out;
  for (const auto& m : s.models) known.push_back(m.first);
  if (tokens.empty()) return known;
  for (const std::string& t : tokens) {
    std::vector<std::string> hits;
    for (const std::string& name : known) {
      const std::string suffix = "-" + t;
      if (name == t || (name.size() > suffix.size() &&
                        name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0))
        hits.push_back(name);
    }
    if (hits.size() != 1) {
      std::string list;
      for (const auto& n : known) list += str(list.empty() ? "" : ", ", n);
      fail("--shapes: '", t, "' ", hits.empty() ? "matches no model" : "matches several models",
           " (known: ", list, ")");
    }
    if (std::find(out.begin(), out.end(), hits[0]) == out.end()) out.push_back(hits[0]);
  }
  return out;
}

// The planner's presets are a second copy of the same config.json values (`qlora estimate
// --preset`): say so when the two drift apart.
void warn_if_preset_differs(const std::string& name, const ModelConfig& c) {
  ModelConfig p;
  try {
    p = preset_config(name);
  } catch (const Error&) {
    return;  // no preset of that name
  }
  if (p.hidden_size != c.hidden_size || p.intermediate_size != c.intermediate_size ||
      p.num_hidden_layers != c.num_hidden_layers || p.num_attention_heads != c.num_attention_heads ||
      p.num_key_value_heads != c.num_key_value_heads || p.head_dim != c.head_dim ||
      p.vocab_size != c.vocab_size || p.max_position_embeddings != c.max_position_embeddings ||
      p.tie_word_embeddings != c.tie_word_embeddings)
    std::printf(
        "warning: %s in the shapes file differs from the planner's preset of that name "
        "(src/plan/presets.cpp)\n",
        name.c_str());
}

struct Peak {
  std::optional<double> tflops;
  std::string source;
};

Peak find_peak(const std::string& gpu, const Options& o, const ShapeFile& s) {
  if (o.peak_tflops > 0) return {o.peak_tflops, "--peak-tflops"};
  if (const char* env = std::getenv("PEAK_TFLOPS"); env != nullptr && *env != '\0') {
    char* end = nullptr;
    const double v = std::strtod(env, &end);
    if (end == env || *end != '\0' || !(v > 0))
      fail("PEAK_TFLOPS: expected a positive number, got '", env, "'");
    return {v, "PEAK_TFLOPS"};
  }
  for (const auto& [key, tflops] : s.peaks)
    if (gpu.find(key) != std::string::npos) return {tflops, str("table entry '", key, "'")};
  return {std::nullopt, "not in the table (give --peak-tflops or PEAK_TFLOPS)"};
}

// ---- FLOP accounting (the same formula as hf_baseline.py) -------------------------------

// Weights of the matmuls of one forward pass: the 7 block linears of each layer plus lm_head.
double linear_params(const ModelConfig& c) {
  const double C = double(c.hidden_size), I = double(c.intermediate_size), L = double(c.num_hidden_layers),
               V = double(c.vocab_size), q = double(c.q_dim()), kv = double(c.kv_dim());
  return L * (C * q + 2 * C * kv + q * C + 3 * C * I) + V * C;
}

double useful_flops_per_token(const ModelConfig& c, int64_t T) {
  // 6 matmuls x 2 flops x D x H x L x T(T+1)/2 pairs per sequence, divided by its T tokens.
  const double attention =
      6.0 * double(c.head_dim) * double(c.num_attention_heads) * double(c.num_hidden_layers) * double(T + 1);
  return 4.0 * linear_params(c) + attention;
}

// ---- device helpers ------------------------------------------------------------------

// Bytes in use on the device, all processes and contexts included (what a budget is held to).
size_t device_used_bytes() {
  size_t free_b = 0, total_b = 0;
  QLORA_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  return total_b - free_b;
}

struct GemmCeiling {
  int64_t M = 0, N = 0, K = 0;
  double ms = 0, tflops = 0;
};

// cuBLAS bf16 GEMM (fp32 accumulation) out (M, 8192) = x (M, 8192) W^T with M = the step's tokens:
// the rate the step's largest products could reach. Own context, freed before any model is built.
GemmCeiling measure_gemm_ceiling(int64_t tokens) {
  using cuda_ops::GemmOut;
  using cuda_ops::Trans;
  CudaContext ctx(0);
  GemmCeiling g;
  g.M = tokens;
  g.N = kGemmWidth;
  g.K = kGemmWidth;
  auto x = random_bf16(g.M * g.K, 1, 1.0f), w = random_bf16(g.N * g.K, 2, 0.0346f);
  DeviceBuffer<uint16_t> out(size_t(g.M * g.N));
  auto run = [&] {
    cuda_ops::gemm(ctx, Trans::N, Trans::T, g.M, g.N, g.K, 1.0f, x.data(), g.K, w.data(), g.K, 0.0f,
                   out.data(), GemmOut::BF16, g.N, "bench_cuda_train gemm ceiling");
  };
  for (int i = 0; i < kGemmWarmup; ++i) run();
  Event start, stop;
  std::vector<double> ms;
  for (int r = 0; r < kGemmReps; ++r) {
    QLORA_CUDA_CHECK(cudaEventRecord(start.e, ctx.stream()));
    run();
    QLORA_CUDA_CHECK(cudaEventRecord(stop.e, ctx.stream()));
    QLORA_CUDA_CHECK(cudaEventSynchronize(stop.e));
    float t = 0.0f;
    QLORA_CUDA_CHECK(cudaEventElapsedTime(&t, start.e, stop.e));
    ms.push_back(double(t));
  }
  g.ms = median(ms);
  g.tflops = 2.0 * double(g.M) * double(g.N) * double(g.K) / (g.ms * 1e-3) / 1e12;
  return g;
}

// ---- one shape -----------------------------------------------------------------------

// What `qlora estimate` would plan for this run (src/plan/from_recipe.cpp fills the same fields
// from a recipe); the run takes its weight and model options from it, as `qlora run` does.
PlanInput plan_input(const ModelConfig& cfg, const std::string& name, const Options& o, uint64_t budget) {
  PlanInput in;
  in.model = cfg;
  in.model_name = name + " (random weights)";
  in.backend = PlanBackend::cuda;
  in.quantize = true;
  in.quant_type = Quant4Type::NF4;
  in.block = kDefaultBlock4;
  in.double_quant = true;
  in.lora.rank = o.rank;
  in.lora.alpha = double(o.rank);
  in.lora.dropout = 0.0;
  in.lora.rslora = false;
  in.lora.targets.fill(true);
  in.lora.seed = o.seed;
  in.seq_len = o.seq;
  in.micro_batch = o.micro_batch;
  in.checkpointing = true;
  in.optimizer.kind = parse_optimizer_kind(o.optimizer);
  in.optimizer.weight_decay = 0.0;
  if (o.ce_rows > 0) in.ce.rows = o.ce_rows;
  if (o.ce_vchunk > 0) in.ce.vchunk = o.ce_vchunk;
  in.budget_bytes = budget;
  return in;
}

// Device bytes of the plan less its "runtime" rows (the CUDA context and the allocator reserve):
// the plan's figure for what the run itself allocates.
uint64_t plan_buffer_bytes(const MemoryPlan& p) {
  uint64_t runtime = 0;
  for (const PlanBuffer& b : p.buffers)
    if (b.place == Place::device && b.category == "runtime") runtime += b.bytes;
  return p.device_bytes - runtime;
}

struct Measured {
  double build_s = 0, upload_s = 0;
  int64_t lora_params = 0;
  std::vector<double> step_s;
  double loss_first = 0, loss_last = 0, grad_norm_last = 0;
  size_t used_before = 0, used_after_alloc = 0, peak_used = 0, qlora_buffers = 0;
};

// Builds the model of `cfg` through the CUDA step engine `qlora run` uses (train/engine.h: its own
// context, the model, the fused or paged AdamW) and times warmup + steps training steps. Throws
// qlora::Error (out of GPU memory among them) or std::bad_alloc (host memory).
Measured measure_shape(const ModelConfig& cfg, const PlanInput& in, const Options& o) {
  Measured r;
  QLORA_CUDA_CHECK(cudaDeviceSynchronize());
  r.used_before = device_used_bytes();

  // Host weights (~39 GiB for the 70B shape, 32 of them codes), uploaded and then freed: the engine
  // keeps no reference to them. The host LoRA and optimizer stay: they are the run's canonical copies.
  auto t0 = std::chrono::steady_clock::now();
  auto w =
      std::make_unique<LlamaWeights>(random_llama_weights(cfg, weight_load_options(in), o.seed, kInitStd));
  LoraWeights lora(cfg, in.lora);
  lora.init_default(o.seed + 1);
  Optimizer opt(in.optimizer, lora.flat_size());
  auto t1 = std::chrono::steady_clock::now();
  r.build_s = std::chrono::duration<double>(t1 - t0).count();
  const std::unique_ptr<StepEngine> engine =
      make_cuda_engine(*w, lora, opt, in.micro_batch, in.seq_len, llama_run_options(in));
  engine->synchronize();
  r.upload_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  w.reset();
  r.lora_params = int64_t(lora.flat_size());
  r.used_after_alloc = r.peak_used = device_used_bytes();
  r.qlora_buffers = engine->memory_bytes();

  // Random tokens, one document per row; targets = the next token (the last of a row has none),
  // as HF's labels = input_ids.
  const int64_t B = in.micro_batch, T = in.seq_len, N = B * T, V = cfg.vocab_size;
  std::vector<int32_t> tokens(static_cast<size_t>(N)), targets(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i)
    tokens[size_t(i)] = int32_t(mix64(o.seed * 0x9e37ull + uint64_t(i) + 7) % uint64_t(V));
  for (int64_t i = 0; i < N; ++i)
    targets[size_t(i)] = (i % T == T - 1) ? ops::kIgnoreIndex : tokens[size_t(i + 1)];
  LlamaBatch batch;
  batch.tokens = tokens.data();
  batch.targets = targets.data();
  batch.B = B;
  batch.T = T;

  // The trainer's step (train/trainer.cpp) with grad_accum 1, timed on the host between two
  // synchronizations of the engine's streams: what `qlora run` waits for, host gaps included.
  const int total = o.warmup + o.steps;
  for (int i = 0; i < total; ++i) {
    const auto h0 = std::chrono::steady_clock::now();
    engine->zero_grad();
    const double loss = engine->model().forward(batch);
    engine->model().backward();
    const double norm = engine->clip_grad_norm(kMaxGradNorm);
    engine->optimizer_step(kLr);
    engine->synchronize();
    const double step_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - h0).count();
    r.peak_used = std::max(r.peak_used, device_used_bytes());
    if (!std::isfinite(loss) || !std::isfinite(norm))
      fail("step ", i + 1, ": loss ", loss, ", gradient norm ", norm,
           " (not finite: the step computes garbage)");
    if (i == 0) r.loss_first = loss;
    r.loss_last = loss;
    r.grad_norm_last = norm;
    std::printf("  step %d%s: %.1f ms, loss %.4f, grad norm %.4g\n", i + 1, i < o.warmup ? " (warm-up)" : "",
                1e3 * step_s, loss, norm);
    std::fflush(stdout);
    if (i >= o.warmup) r.step_s.push_back(step_s);
  }
  return r;
}

struct ShapeResult {
  std::string model, status = "ok", reason;
  int64_t layers = 0, full_layers = 0;
  nlohmann::json j;  // the JSON row (figures included when status is ok)
};

double gib(double b) {
  return b / double(uint64_t(1) << 30);
}

// Fills res (its JSON row first, so a shape that throws still says what it was).
void run_shape(ShapeResult& res, const std::string& name, const nlohmann::json& config_json, const Options& o,
               uint64_t budget, const Peak& peak, const GemmCeiling& gemm, const std::string& source) {
  res.model = name;
  ModelConfig cfg = parse_model_config(config_json, str(source, ": models.", name));
  warn_if_preset_differs(name, cfg);
  res.full_layers = cfg.num_hidden_layers;
  if (o.layers > 0) cfg.num_hidden_layers = o.layers;
  res.layers = cfg.num_hidden_layers;
  const int64_t tokens = o.micro_batch * o.seq;
  const double fpt = useful_flops_per_token(cfg, o.seq);
  res.j = {{"model", name},
           {"layers", res.layers},
           {"full_layers", res.full_layers},
           {"seq", o.seq},
           {"micro_batch", o.micro_batch},
           {"tokens_per_step", tokens},
           {"useful_flops_per_token", fpt},
           {"linear_params", linear_params(cfg)},
           {"budget_bytes", budget}};

  std::printf(
      "\n## %s: %lld of %lld layers, C %lld, I %lld, H %lld, KVH %lld, D %lld, V %lld; B %lld x T %lld\n",
      name.c_str(), (long long)res.layers, (long long)res.full_layers, (long long)cfg.hidden_size,
      (long long)cfg.intermediate_size, (long long)cfg.num_attention_heads,
      (long long)cfg.num_key_value_heads, (long long)cfg.head_dim, (long long)cfg.vocab_size,
      (long long)o.micro_batch, (long long)o.seq);
  std::fflush(stdout);

  const PlanInput in = plan_input(cfg, name, o, budget);
  const MemoryPlan plan = make_plan(in);
  const uint64_t plan_buffers = plan_buffer_bytes(plan);
  res.j["plan"] = {{"device_bytes", plan.device_bytes},
                   {"buffer_bytes", plan_buffers},
                   {"pinned_host_bytes", plan.pinned_host_bytes},
                   {"verdict", verdict_name(plan.verdict)}};

  const Measured r = measure_shape(cfg, in, o);
  const double step = median(r.step_s);
  const double tps = double(tokens) / step;
  const double tflops = fpt * tps / 1e12;
  const size_t allocated = r.peak_used - std::min(r.peak_used, r.used_before);
  const double plan_err = (double(plan.device_bytes) - double(r.peak_used)) / double(r.peak_used);
  const double plan_buf_err =
      allocated > 0 ? (double(plan_buffers) - double(allocated)) / double(allocated) : 0.0;
  nlohmann::json& j = res.j;
  j.update({{"optimizer", o.optimizer},
            {"lora_params", r.lora_params},
            {"build_s", r.build_s},
            {"upload_s", r.upload_s},
            {"step_s", r.step_s},
            {"step_s_median", step},
            {"tokens_per_s", tps},
            {"useful_tflops", tflops},
            {"mfu", peak.tflops ? nlohmann::json(tflops / *peak.tflops) : nlohmann::json(nullptr)},
            {"mfu_vs_cublas", tflops / gemm.tflops},
            {"peak_allocated_bytes", allocated},
            {"peak_device_used_bytes", r.peak_used},
            {"device_used_before_bytes", r.used_before},
            {"device_used_after_alloc_bytes", r.used_after_alloc},
            {"qlora_buffer_bytes", r.qlora_buffers},
            {"plan_error", plan_err},
            {"plan_buffer_error", plan_buf_err},
            {"fits_budget", r.peak_used <= budget},
            {"loss_first", r.loss_first},
            {"loss_last", r.loss_last},
            {"grad_norm_last", r.grad_norm_last}});

  if (res.layers < res.full_layers) {
    // Not measured: the full model's figures from this run's, by the rules stated in the JSON.
    ModelConfig full = cfg;
    full.num_hidden_layers = res.full_layers;
    PlanInput full_in = in;
    full_in.model = full;
    const MemoryPlan full_plan = make_plan(full_in);
    const double full_fpt = useful_flops_per_token(full, o.seq);
    const double ext_used = double(r.peak_used) + double(plan_buffer_bytes(full_plan)) - double(plan_buffers);
    j["extrapolated"] = {{"layers", res.full_layers},
                         {"tokens_per_s", tps * fpt / full_fpt},
                         {"peak_device_used_bytes", ext_used},
                         {"fits_budget", ext_used <= double(budget)},
                         {"plan_device_bytes", full_plan.device_bytes},
                         {"method",
                          "NOT MEASURED: tokens/s assumes the measured useful FLOP rate (MFU) holds at full "
                          "depth; memory is the measured peak plus the planner's buffer bytes of the missing "
                          "layers"}};
  }
  std::printf(
      "  %s: %.0f tokens/s, %.1f useful TFLOP/s, peak %.2f GiB used on the device (%.2f GiB by this run); "
      "plan %.2f GiB (%+.1f%%)\n",
      name.c_str(), tps, tflops, gib(double(r.peak_used)), gib(double(allocated)),
      gib(double(plan.device_bytes)), 100.0 * plan_err);
}

// ---- output --------------------------------------------------------------------------

std::string fmt(const char* f, double v) {
  char b[64];
  std::snprintf(b, sizeof b, f, v);
  return b;
}

std::string pct(const nlohmann::json& v) {
  return v.is_number() ? fmt("%.1f%%", 100.0 * v.get<double>()) : std::string("n/a");
}

void print_tables(const std::vector<ShapeResult>& results, uint64_t budget, const Peak& peak,
                  const GemmCeiling& gemm, const std::string& gpu) {
  std::printf("\n### QLoRA training step (%s)\n\n", gpu.c_str());
  std::printf(
      "MFU: useful FLOPs / step time / %s TFLOP/s dense bf16 peak (%s); of cuBLAS: useful FLOP rate / "
      "%.1f TFLOP/s, cuBLAS bf16 GEMM %lldx%lldx%lld in this run\n\n",
      peak.tflops ? fmt("%.1f", *peak.tflops).c_str() : "unknown", peak.source.c_str(), gemm.tflops,
      (long long)gemm.M, (long long)gemm.N, (long long)gemm.K);
  const std::string budget_col = fmt("fits %.1f GiB", gib(double(budget)));
  std::printf(
      "| model | layers | B x T | step ms | tokens/s | TFLOP/s | MFU | of cuBLAS | peak used GiB | by the "
      "run GiB "
      "| plan GiB | plan error | %s |\n",
      budget_col.c_str());
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const ShapeResult& r : results) {
    const nlohmann::json& j = r.j;
    if (r.status != "ok") {
      std::printf("| %s | %lld | %s: %s |\n", r.model.c_str(), (long long)r.layers, r.status.c_str(),
                  r.reason.c_str());
      continue;
    }
    std::printf(
        "| %s | %lld | %lld x %lld | %.1f | %.0f | %.1f | %s | %s | %.2f | %.2f | %.2f | %+.1f%% | %s |\n",
        r.model.c_str(), (long long)r.layers, (long long)j["micro_batch"].get<int64_t>(),
        (long long)j["seq"].get<int64_t>(), 1e3 * j["step_s_median"].get<double>(),
        j["tokens_per_s"].get<double>(), j["useful_tflops"].get<double>(), pct(j["mfu"]).c_str(),
        pct(j["mfu_vs_cublas"]).c_str(), gib(j["peak_device_used_bytes"].get<double>()),
        gib(j["peak_allocated_bytes"].get<double>()), gib(j["plan"]["device_bytes"].get<double>()),
        100.0 * j["plan_error"].get<double>(), j["fits_budget"].get<bool>() ? "yes" : "NO");
  }
  bool any_ext = false;
  for (const ShapeResult& r : results)
    any_ext = any_ext || (r.status == "ok" && r.j.contains("extrapolated"));
  if (any_ext) {
    std::printf(
        "\nFull-depth EXTRAPOLATION (not measured; --layers ran fewer layers): tokens/s at the measured "
        "MFU, memory = measured peak + the planner's bytes of the missing layers\n\n");
    std::printf(
        "| model | layers measured -> full | tokens/s (extrapolated) | peak used GiB (extrapolated) | %s |\n",
        budget_col.c_str());
    std::printf("|---|---|---|---|---|\n");
    for (const ShapeResult& r : results) {
      if (r.status != "ok" || !r.j.contains("extrapolated")) continue;
      const nlohmann::json& e = r.j["extrapolated"];
      std::printf("| %s | %lld -> %lld | %.0f | %.2f | %s |\n", r.model.c_str(), (long long)r.layers,
                  (long long)r.full_layers, e["tokens_per_s"].get<double>(),
                  gib(e["peak_device_used_bytes"].get<double>()),
                  e["fits_budget"].get<bool>() ? "yes" : "NO");
    }
  }
  std::printf(
      "\npeak used: cudaMemGetInfo total - free, context included; by the run: peak used less the bytes "
      "used before this shape's context was made; plan: `qlora estimate`'s device total (context "
      "included); plan error = (plan - peak used) / peak used.\n");
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "The QLoRA training step on the GPU at Llama-3.1-8B and Llama-2-70B shapes with random weights: "
      "tokens/s, "
      "MFU, peak memory against the planner's forecast"};
  Options o;
  app.add_flag("--quick", o.quick,
               "smoke run: 2 layers, seq 512, 1 warm-up and 2 timed steps (each unless given)");
  app.add_option("--shapes", o.shapes, "models to run, comma-separated (8b, 70b or full names; default: all)")
      ->delimiter(',');
  app.add_option("--layers", o.layers,
                 "decoder layers to build (0 = the model's own); fewer adds an extrapolation")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--seq", o.seq, "tokens per row (default 2048; 512 with --quick)")
      ->check(CLI::Range(2, 1 << 20));
  app.add_option("--micro-batch", o.micro_batch, "rows per step")->check(CLI::Range(1, 4096));
  app.add_option("--rank", o.rank, "LoRA rank (alpha = rank)")->check(CLI::Range(1, 4096));
  app.add_option("--warmup", o.warmup, "untimed steps first (default 3; 1 with --quick)")
      ->check(CLI::Range(0, 1000));
  app.add_option("--steps", o.steps, "timed steps (default 10; 2 with --quick)")
      ->check(CLI::Range(1, 100000));
  app.add_option("--optimizer", o.optimizer, "paged_adamw (default, as HF's paged_adamw_32bit) or adamw")
      ->check(CLI::IsMember({"paged_adamw", "adamw"}));
  app.add_option("--budget", o.budget,
                 "memory budget the peak is held to: a size or a GPU name (default 48GiB)");
  app.add_option("--peak-tflops", o.peak_tflops,
                 "dense bf16 peak of the GPU for MFU (default: PEAK_TFLOPS, then "
                 "the table in the shapes file)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--shapes-file", o.shapes_file, "the models and GPU peaks (default: the source tree's)");
  app.add_option("--json", o.json, "also write the results as JSON to this file");
  app.add_option("--seed", o.seed, "seed of the random weights, LoRA init and tokens");
  app.add_option("--ce-rows", o.ce_rows, "cross entropy: token rows per chunk (0 = the run's default)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--ce-vchunk", o.ce_vchunk,
                 "cross entropy: vocabulary entries per chunk (0 = the run's default)")
      ->check(CLI::NonNegativeNumber);
  CLI11_PARSE(app, argc, argv);
  if (o.seq == 0) o.seq = o.quick ? 512 : 2048;
  if (o.warmup < 0) o.warmup = o.quick ? 1 : 3;
  if (o.steps < 0) o.steps = o.quick ? 2 : 10;
  if (o.layers < 0) o.layers = o.quick ? 2 : 0;

  if (const auto why = cuda_unavailable_reason()) {
    // Not an error: a machine without a GPU (a dry run, CI) measures nothing and says why; the JSON,
    // when asked for, says the same (status "skipped", no results).
    std::printf("bench_cuda_train: no usable GPU, nothing measured: %s\n", why->c_str());
    if (!o.json.empty()) {
      std::ofstream f(o.json);
      f << nlohmann::json{{"tool", "bench_cuda_train"},
                          {"status", "skipped"},
                          {"reason", "no usable GPU: " + *why},
                          {"results", nlohmann::json::array()}}
               .dump(1)
        << "\n";
      if (!f) {
        std::fprintf(stderr, "bench_cuda_train: cannot write %s\n", o.json.c_str());
        return 1;
      }
    }
    return 0;
  }
  try {
    const ShapeFile shapes = load_shape_file(o.shapes_file);
    const std::vector<std::string> names = select_models(shapes, o.shapes);
    const uint64_t budget = gpu_memory_bytes(o.budget);
    const CudaDeviceInfo info = cuda_device_info(0);
    const Peak peak = find_peak(info.name, o, shapes);
    const std::time_t now = std::time(nullptr);
    char date[64];
    std::strftime(date, sizeof date, "%Y-%m-%d %H:%M:%S UTC", std::gmtime(&now));
    std::printf(
        "bench_cuda_train, %s: %s (compute capability %d.%d, %d SMs, %.1f GiB); dense bf16 peak %s (%s)\n",
        date, info.name.c_str(), info.cc_major, info.cc_minor, info.sm_count, gib(double(info.total_bytes)),
        peak.tflops ? fmt("%.1f TFLOP/s", *peak.tflops).c_str() : "unknown", peak.source.c_str());
    std::printf(
        "step: NF4 (block 64, double quant) base, LoRA r %lld alpha %lld on q,k,v,o,gate,up,down, "
        "checkpointing, %s lr %g, clip %g; %d warm-up + %d timed steps; budget %.1f GiB\n",
        (long long)o.rank, (long long)o.rank, o.optimizer.c_str(), kLr, kMaxGradNorm, o.warmup, o.steps,
        gib(double(budget)));

    const GemmCeiling gemm = measure_gemm_ceiling(o.micro_batch * o.seq);
    std::printf("cuBLAS bf16 GEMM %lldx%lldx%lld: %.3f ms, %.1f TFLOP/s (the practical ceiling)\n",
                (long long)gemm.M, (long long)gemm.N, (long long)gemm.K, gemm.ms, gemm.tflops);

    std::vector<ShapeResult> results;
    std::string device_failed;  // set when an error left the device unusable
    for (const std::string& name : names) {
      ShapeResult r;
      r.model = name;
      const nlohmann::json* cfg = nullptr;
      for (const auto& m : shapes.models)
        if (m.first == name) cfg = &m.second;
      r.layers = o.layers > 0 ? o.layers : cfg->value("num_hidden_layers", int64_t(0));
      if (!device_failed.empty()) {
        r.status = "skipped";
        r.reason = "the device failed on an earlier shape: " + device_failed;
      } else {
        try {
          run_shape(r, name, *cfg, o, budget, peak, gemm, o.shapes_file);
        } catch (const std::bad_alloc&) {
          r.status = "oom";
          r.reason = "out of host memory while making or uploading the weights";
        } catch (const std::exception& e) {
          const std::string msg = e.what();
          // cuda_malloc's message, or a runtime call (cudaHostAlloc, cuBLAS) that ran out.
          const bool oom = msg.find("out of GPU memory") != std::string::npos ||
                           msg.find("out of memory") != std::string::npos;
          r.status = oom ? "oom" : "failed";
          r.reason = msg;
          // An allocation failure leaves the device usable; an execution error is sticky.
          const cudaError_t err = cudaDeviceSynchronize();
          if (err != cudaSuccess) device_failed = cudaGetErrorString(err);
        }
        if (r.status != "ok") std::printf("  %s: %s: %s\n", name.c_str(), r.status.c_str(), r.reason.c_str());
      }
      if (r.j.is_null()) r.j = {{"model", name}};
      r.j["status"] = r.status;
      if (!r.reason.empty()) r.j["reason"] = r.reason;
      if (!r.j.contains("layers")) r.j["layers"] = r.layers;
      if (!r.j.contains("seq")) r.j["seq"] = o.seq;
      results.push_back(std::move(r));
    }

    print_tables(results, budget, peak, gemm, info.name);
    if (!o.json.empty()) {
      nlohmann::json rows = nlohmann::json::array();
      for (const ShapeResult& r : results) rows.push_back(r.j);
      const nlohmann::json j = {
          {"tool", "bench_cuda_train"},
          {"date", date},
          {"gpu", info.name},
          {"compute_capability", info.cc_major * 10 + info.cc_minor},
          {"sm_count", info.sm_count},
          {"device_total_bytes", info.total_bytes},
          {"peak_bf16_tflops", peak.tflops ? nlohmann::json(*peak.tflops) : nlohmann::json(nullptr)},
          {"peak_source", peak.source},
          {"budget_bytes", budget},
          {"cublas_gemm",
           {{"m", gemm.M}, {"n", gemm.N}, {"k", gemm.K}, {"ms", gemm.ms}, {"tflops", gemm.tflops}}},
          {"settings",
           {{"quick", o.quick},
            {"seq", o.seq},
            {"micro_batch", o.micro_batch},
            {"rank", o.rank},
            {"alpha", o.rank},
            {"lora_dropout", 0.0},
            {"targets", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}},
            {"checkpointing", true},
            {"base", "nf4 block 64, double quant"},
            {"optimizer", o.optimizer},
            {"lr", kLr},
            {"max_grad_norm", kMaxGradNorm},
            {"warmup", o.warmup},
            {"steps", o.steps},
            {"budget", o.budget}}},
          {"results", rows}};
      std::ofstream f(o.json);
      f << j.dump(1) << "\n";
      if (!f) fail("cannot write ", o.json);
      std::printf("wrote %s\n", o.json.c_str());
    }
    const bool failed = std::any_of(results.begin(), results.end(), [](const ShapeResult& r) {
      return r.status == "failed" || r.status == "skipped";
    });
    return failed ? 1 : 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_train: %s\n", e.what());
    return 1;
  }
}
