// Quantization benchmark: prints tables, never asserts.
//
//  1. Throughput of 4-bit quantization in GB/s of input weights, the scalar
//     reference (baseline, one thread) against the multithreaded fast path,
//     measured in the same run, with the ratio.
//  2. Bits per parameter of the output for each setting.
//  3. Error (RMSE, SNR) of NF4 vs FP4, with and without double quantization,
//     on Gaussian data and on the fixture model when present.
//  4. `qlora quantize` end to end on a generated BF16 model folder: GB/s of
//     input, bits/parameter, peak resident memory against the input size; on
//     the CPU (baseline) and, when a GPU is usable, on the GPU in the same run
//     (--device cuda), with the ratio and a byte comparison of the outputs.
//
// Usage: build/bench/bench_quantize [--fixtures DIR] [--model-gb G]
#include <omp.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/dtype.h"
#include "core/mapped_file.h"
#include "core/error.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/tensor_table.h"
#include "quant/blockwise.h"
#include "tools/quantize_gpu.h"
#include "tools/quantize_model.h"

namespace fs = std::filesystem;
using namespace qlora;

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

std::vector<float> gaussian(size_t n, float sigma, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, sigma);
  std::vector<float> x(n);
  for (auto& v : x) v = d(rng);
  return x;
}

// Best of `reps` timings of f().
template <typename F>
double best_seconds(int reps, F&& f) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const double t = now();
    f();
    best = std::min(best, now() - t);
  }
  return best;
}

void throughput_table() {
  const int64_t n = int64_t(1) << 25;  // 32M values = 128 MiB fp32
  const auto x = gaussian(size_t(n), 0.02f, 1);
  std::vector<uint8_t> codes(size_t(quant4_code_bytes(n)));
  std::vector<float> absmax(size_t(quant4_num_blocks(n, 64)));
  std::printf("\n## 4-bit quantization throughput (fp32 input, %lld values, GB/s of input)\n\n",
              static_cast<long long>(n));
  std::printf("| type | block | scalar ref (1 thread) | fast path (%d threads) | ratio |\n", omp_get_max_threads());
  std::printf("|---|---|---|---|---|\n");
  for (Quant4Type t : {Quant4Type::NF4, Quant4Type::FP4}) {
    for (int64_t block : {64, 4096}) {
      const double ref = best_seconds(2, [&] { quantize4_ref(x.data(), n, block, t, codes.data(), absmax.data()); });
      const double fast = best_seconds(3, [&] { quantize4(x.data(), n, block, t, codes.data(), absmax.data()); });
      const double gb = double(n) * 4 / 1e9;
      std::printf("| %s | %lld | %.2f | %.2f | %.2fx |\n", std::string(quant4_name(t)).c_str(),
                  static_cast<long long>(block), gb / ref, gb / fast, ref / fast);
    }
  }
}

struct Err {
  double rmse, snr_db;
};

Err error_of(const std::vector<float>& x, Quant4Type t, int64_t block, bool dq) {
  const Quant4Tensor q = quantize_tensor(x.data(), {int64_t(x.size())}, t, block, dq);
  std::vector<float> y(x.size());
  dequantize_tensor(q, y.data());
  double se = 0, sp = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    se += (double(x[i]) - y[i]) * (double(x[i]) - y[i]);
    sp += double(x[i]) * x[i];
  }
  return {std::sqrt(se / double(x.size())), 10 * std::log10(sp / se)};
}

double bits_per_param(int64_t n, int64_t block, bool dq) {
  const int64_t blocks = quant4_num_blocks(n, block);
  const double bits = dq ? double(quant4_code_bytes(n) * 8 + blocks * 8 + quant4_num_blocks(blocks, 256) * 32)
                         : double(quant4_code_bytes(n) * 8 + blocks * 32);
  return bits / double(n);
}

void error_table(const char* what, const std::vector<float>& x) {
  std::printf("\n## Quantization error: %s (%zu values)\n\n", what, x.size());
  std::printf("| type | block | double quant | bits/param | RMSE | SNR (dB) |\n|---|---|---|---|---|---|\n");
  for (Quant4Type t : {Quant4Type::NF4, Quant4Type::FP4})
    for (int64_t block : {64, 256})
      for (bool dq : {false, true}) {
        const Err e = error_of(x, t, block, dq);
        std::printf("| %s | %lld | %s | %.3f | %.4g | %.2f |\n", std::string(quant4_name(t)).c_str(),
                    static_cast<long long>(block), dq ? "yes" : "no", bits_per_param(int64_t(x.size()), block, dq),
                    e.rmse, e.snr_db);
      }
}

std::vector<float> fixture_linear_weights(const fs::path& fixtures) {
  const fs::path dir = fixtures / "models" / "stories260K" / "hf";
  if (!fs::exists(dir / "model.safetensors")) return {};
  const ModelConfig cfg = load_model_config(dir);
  const SafetensorsModel m(dir);
  std::vector<float> all;
  for (const TensorSlot& s : expected_tensors(cfg)) {
    if (!s.is_block_linear) continue;
    const auto& e = m.at(s.name);
    const size_t n = size_t(e.info->numel());
    const size_t at = all.size();
    all.resize(at + n);
    convert_to_f32(e.file->data(*e.info).data(), e.info->dtype, n, all.data() + at);
  }
  return all;
}

// A Llama-shaped BF16 folder of about `gb` GB, random weights.
void write_model(const fs::path& dir, double gb) {
  const int64_t hidden = 2048, inter = 5632, vocab = 32000, heads = 16, kv = 4;
  const double per_layer = double(hidden * hidden * 2 + hidden * hidden / 4 * 2 + 3 * hidden * inter) * 2;
  const int64_t layers = std::max<int64_t>(1, int64_t((gb * 1e9 - double(vocab * hidden * 4)) / per_layer));
  fs::create_directories(dir);
  const std::string cfg = str("{\"model_type\": \"llama\", \"vocab_size\": ", vocab, ", \"hidden_size\": ", hidden,
                              ", \"intermediate_size\": ", inter, ", \"num_hidden_layers\": ", layers,
                              ", \"num_attention_heads\": ", heads, ", \"num_key_value_heads\": ", kv,
                              ", \"torch_dtype\": \"bfloat16\"}");
  FILE* f = std::fopen((dir / "config.json").c_str(), "w");
  std::fputs(cfg.c_str(), f);
  std::fclose(f);
  const ModelConfig c = parse_model_config(nlohmann::json::parse(cfg), "bench");
  std::vector<TensorSpec> specs;
  for (const TensorSlot& s : expected_tensors(c)) specs.push_back({s.name, DType::BF16, s.shape});
  SafetensorsWriter w(dir / "model.safetensors", specs);
  std::mt19937 rng(2);
  std::vector<uint16_t> chunk(1 << 20);
  for (auto& v : chunk) v = f32_to_bf16(std::normal_distribution<float>(0, 0.02f)(rng));
  for (const TensorSpec& s : specs) {
    uint64_t left = s.nbytes();
    while (left) {
      const uint64_t b = std::min<uint64_t>(left, chunk.size() * 2);
      w.write(chunk.data(), b);
      left -= b;
    }
  }
  w.commit();
}

// Whether two output folders hold the same files with the same bytes.
bool same_folder(const fs::path& a, const fs::path& b) {
  std::vector<fs::path> fa, fb;
  for (const auto& e : fs::directory_iterator(a)) fa.push_back(e.path().filename());
  for (const auto& e : fs::directory_iterator(b)) fb.push_back(e.path().filename());
  std::sort(fa.begin(), fa.end());
  std::sort(fb.begin(), fb.end());
  if (fa != fb) return false;
  for (const auto& name : fa) {
    if (fs::file_size(a / name) != fs::file_size(b / name)) return false;
    const MappedFile x(a / name), y(b / name);
    if (!std::equal(x.bytes().begin(), x.bytes().end(), y.bytes().begin())) return false;
  }
  return true;
}

void pipeline_table(double gb) {
  const fs::path root = fs::temp_directory_path() / "qlora-bench-quantize";
  fs::remove_all(root);
  write_model(root / "hf", gb);
  QuantizeOptions cpu_opt;
  cpu_opt.device = QuantDevice::cpu;
  struct rusage before {};
  getrusage(RUSAGE_SELF, &before);
  const QuantizeReport r = quantize_model(root / "hf", root / "nf4", cpu_opt);
  struct rusage after {};
  getrusage(RUSAGE_SELF, &after);
  // Includes the mapped input pages still resident (quantize_model drops each
  // tensor's pages when done with it). Measured on the CPU run, which comes
  // first: peak RSS is a lifetime maximum (and pinned staging would count).
  const double rss = double(after.ru_maxrss) * 1024;

  // GPU: best of two runs, against the best of two CPU runs (the first CPU
  // run above and one more after the GPU runs, so the page cache is as warm).
  const auto gpu_missing = gpu_quantize_unavailable_reason();
  double cpu_s = r.seconds, gpu_s = 0;
  bool identical = false;
  std::string gpu_name;
  if (!gpu_missing) {
    QuantizeOptions gpu_opt;
    gpu_opt.device = QuantDevice::cuda;
    gpu_opt.force = true;
    for (int rep = 0; rep < 2; ++rep) {
      const QuantizeReport g = quantize_model(root / "hf", root / "nf4-gpu", gpu_opt);
      gpu_s = rep == 0 ? g.seconds : std::min(gpu_s, g.seconds);
      gpu_name = g.device_name;
    }
    cpu_opt.force = true;
    cpu_s = std::min(cpu_s, quantize_model(root / "hf", root / "nf4", cpu_opt).seconds);
    identical = same_folder(root / "nf4", root / "nf4-gpu");
  }

  std::printf("\n## `qlora quantize` end to end (generated BF16 Llama-shaped folder)\n\n");
  std::printf("| input | output | bits/param | CPU seconds | CPU GB/s of input | peak RSS (CPU run) | peak RSS / input "
              "| GPU seconds | GPU GB/s of input | GPU / CPU |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
  const double in_gb = double(r.input_bytes) / 1e9;
  std::printf("| %.2f GB | %.2f GB | %.3f | %.2f | %.2f | %.0f MiB | %.2f |", in_gb, double(r.output_bytes) / 1e9,
              r.bits_per_param(), cpu_s, in_gb / cpu_s, rss / 1048576, rss / double(r.input_bytes));
  if (gpu_missing) std::printf(" - | - | - |\n\n(no GPU column: %s)\n", gpu_missing->c_str());
  else
    std::printf(" %.2f | %.2f | %.2fx |\n\nGPU: %s; output byte-identical to the CPU's: %s\n", gpu_s,
                in_gb / gpu_s, cpu_s / gpu_s, gpu_name.c_str(), identical ? "yes" : "NO");
  fs::remove_all(root);
}

}  // namespace

int main(int argc, char** argv) {
  fs::path fixtures = fs::path(QLORA_SOURCE_DIR).parent_path() / "shared" / "fixtures";
  if (const char* e = std::getenv("QLORA_FIXTURES")) fixtures = e;
  double model_gb = 1.0;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--fixtures") == 0) fixtures = argv[i + 1];
    if (std::strcmp(argv[i], "--model-gb") == 0) model_gb = std::atof(argv[i + 1]);
  }
  std::printf("# bench_quantize\n");
  pipeline_table(model_gb);  // first: peak RSS is a lifetime maximum
  throughput_table();
  error_table("Gaussian N(0, 1)", gaussian(size_t(1) << 22, 1.0f, 7));
  const auto fx = fixture_linear_weights(fixtures);
  if (fx.empty()) std::printf("\n(fixture model not found under %s: skipping its error table)\n", fixtures.c_str());
  else error_table("stories260K linear weights", fx);
  return 0;
}
