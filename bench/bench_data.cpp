// Data pipeline benchmark: `prepare_dataset` on the fixture medical datasets
// with the Llama 3 tokenizer, cold (read + tokenize + pack, cache written)
// against warm (tokenized samples from the on-disk cache + pack), measured in
// the same run, with the ratio (target: warm at least 10x faster).
//
// Usage: build/bench/bench_data [--fixtures DIR]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "data/pipeline.h"

namespace fs = std::filesystem;
using namespace qlora;

int main(int argc, char** argv) {
  fs::path fx = fs::path(QLORA_SOURCE_DIR).parent_path() / "shared" / "fixtures";
  if (const char* e = std::getenv("QLORA_FIXTURES")) fx = e;
  for (int i = 1; i + 1 < argc; i += 2)
    if (std::strcmp(argv[i], "--fixtures") == 0) fx = argv[i + 1];
  const fs::path tok_dir = fx / "tokenizers" / "llama3" / "assembled_hf";
  const fs::path data = fx / "datasets" / "medical";
  if (!fs::exists(tok_dir) || !fs::exists(data)) {
    std::printf("fixtures not found under %s: nothing to measure\n", fx.c_str());
    return 0;
  }
  const auto tok = Tokenizer::load(tok_dir);
  const fs::path cache = fs::temp_directory_path() / "qlora-bench-data-cache";
  fs::remove_all(cache);

  std::printf("# bench_data\n\n| dataset | MB | samples | rows (seq 2048) | cold s | warm s | warm speedup |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  for (const char* name : {"chatdoctor_genmedgpt5k.json", "medalpaca_medical_meadow_small.json"}) {
    DataSpec spec;
    spec.train_files = {data / name};
    spec.read.format = DataFormat::alpaca;
    spec.chat_template = "llama3";
    spec.cache_dir = cache;
    auto timed = [&](bool* hit) {
      const auto t0 = std::chrono::steady_clock::now();
      const PreparedData d = prepare_dataset(*tok, tok_dir, spec);
      *hit = d.from_cache;
      return std::make_pair(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), d);
    };
    bool hit1 = false, hit2 = false;
    const auto [cold, d] = timed(&hit1);
    const auto [warm, d2] = timed(&hit2);
    std::printf("| %s | %.1f | %zu | %zu | %.3f%s | %.3f%s | %.1fx |\n", name,
                double(fs::file_size(data / name)) / 1e6, d.train_samples, d.train.rows.size(), cold,
                hit1 ? " (hit!)" : "", warm, hit2 ? "" : " (miss!)", cold / warm);
  }
  fs::remove_all(cache);
  return 0;
}
