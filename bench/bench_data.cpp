// Data pipeline benchmark: `prepare_dataset` on the fixture medical datasets
// with the Llama 3 tokenizer, cold (read + tokenize + pack, cache written)
// against warm (tokenized samples from the on-disk cache + pack), measured in
// the same run, with the ratio (target: warm at least 10x faster). The cache
// key alone (hashing the data and tokenizer files) is timed too: it is the
// part of a warm load that does not shrink with the data. Each number is the
// median of --reps runs (default 5): the machine is shared.
//
// Usage: build/bench/bench_data [--fixtures DIR] [--reps N]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <vector>

#include "data/pipeline.h"
#include "data/token_cache.h"

namespace fs = std::filesystem;
using namespace qlora;

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  fs::path fx = fs::path(QLORA_SOURCE_DIR).parent_path() / "shared" / "fixtures";
  if (const char* e = std::getenv("QLORA_FIXTURES")) fx = e;
  int reps = 5;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--fixtures") == 0) fx = argv[i + 1];
    if (std::strcmp(argv[i], "--reps") == 0) reps = std::max(1, std::atoi(argv[i + 1]));
  }
  const fs::path tok_dir = fx / "tokenizers" / "llama3" / "assembled_hf";
  const fs::path data = fx / "datasets" / "medical";
  if (!fs::exists(tok_dir) || !fs::exists(data)) {
    std::printf("fixtures not found under %s: nothing to measure\n", fx.c_str());
    return 0;
  }
  const auto tok = Tokenizer::load(tok_dir);
  const fs::path cache = fs::temp_directory_path() / "qlora-bench-data-cache";

  std::printf("# bench_data (median of %d)\n\n| dataset | MB | samples | rows (seq 2048) | cold s | warm s | key ms | "
              "warm speedup |\n|---|---|---|---|---|---|---|---|\n", reps);
  for (const char* name : {"chatdoctor_genmedgpt5k.json", "medalpaca_medical_meadow_small.json"}) {
    DataSpec spec;
    spec.train_files = {data / name};
    spec.read.format = DataFormat::alpaca;
    spec.chat_template = "llama3";
    spec.cache_dir = cache;
    std::vector<double> cold, warm, key;
    size_t samples = 0, rows = 0;
    bool all_hit = true, no_cold_hit = true;
    for (int r = 0; r < reps; ++r) {
      fs::remove_all(cache);
      auto t0 = std::chrono::steady_clock::now();
      const PreparedData d = prepare_dataset(*tok, tok_dir, spec);
      cold.push_back(seconds_since(t0));
      no_cold_hit = no_cold_hit && !d.from_cache;
      samples = d.train_samples;
      rows = d.train.rows.size();
      t0 = std::chrono::steady_clock::now();
      const PreparedData w = prepare_dataset(*tok, tok_dir, spec);
      warm.push_back(seconds_since(t0));
      all_hit = all_hit && w.from_cache;
      t0 = std::chrono::steady_clock::now();
      (void)tokenized_cache_key(spec.train_files, tok_dir, "settings");
      key.push_back(seconds_since(t0) * 1e3);
    }
    std::printf("| %s | %.1f | %zu | %zu | %.3f%s | %.3f%s | %.1f | %.1fx |\n", name,
                double(fs::file_size(data / name)) / 1e6, samples, rows, median(cold), no_cold_hit ? "" : " (hit!)",
                median(warm), all_hit ? "" : " (miss!)", median(key), median(cold) / median(warm));
  }
  fs::remove_all(cache);
  return 0;
}
