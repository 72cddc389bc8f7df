// Tokenizer throughput: MB/s of input text per core, single-threaded and with
// all cores (one shared Tokenizer, documents handed out to std::threads), on
// the fixture medical and legal datasets. Prints a table, never asserts.
//
// Text: every string field of the JSON/JSONL records (instruction, input,
// output, questions, contexts, answers, ...) and every line of the TSV files,
// one document each, as a training data pipeline would tokenize them.
//
// Usage: build/bench/bench_tokenize [--fixtures DIR] [--threads N] [--all-tokenizers]
#include <atomic>
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <ctime>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/tokenizer.h"

namespace fs = std::filesystem;
using namespace qlora;

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

void collect_strings(const nlohmann::json& j, std::vector<std::string>& out) {
  if (j.is_string()) {
    if (!j.get_ref<const std::string&>().empty()) out.push_back(j.get<std::string>());
  } else if (j.is_array() || j.is_object()) {
    for (const auto& v : j) collect_strings(v, out);
  }
}

// Documents of every .json/.jsonl/.tsv file under dir (sorted, so runs compare).
std::vector<std::string> load_docs(const fs::path& dir) {
  std::vector<fs::path> files;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file()) files.push_back(e.path());
  std::sort(files.begin(), files.end());
  std::vector<std::string> docs;
  for (const auto& f : files) {
    const std::string ext = f.extension().string();
    const std::string text = slurp(f);
    if (ext == ".json") {
      try {
        collect_strings(nlohmann::json::parse(text), docs);
        continue;
      } catch (const nlohmann::json::exception&) {
        // not one JSON document: fall through to JSON lines
      }
    }
    if (ext == ".json" || ext == ".jsonl") {
      std::istringstream lines(text);
      for (std::string line; std::getline(lines, line);) {
        try {
          collect_strings(nlohmann::json::parse(line), docs);
        } catch (const nlohmann::json::exception&) {
        }
      }
    } else if (ext == ".tsv") {
      std::istringstream lines(text);
      std::string line;
      std::getline(lines, line);  // header
      while (std::getline(lines, line))
        if (!line.empty()) docs.push_back(line);
    }
  }
  return docs;
}

size_t total_bytes(const std::vector<std::string>& docs) {
  size_t n = 0;
  for (const auto& d : docs) n += d.size();
  return n;
}

double cpu_now() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + double(ts.tv_nsec) * 1e-9;
}

struct Timing {
  double wall = 1e30, cpu = 1e30;  // seconds, best of the repetitions
  size_t tokens = 0;
};

// Encodes all docs on `threads` threads, `reps` times. CPU seconds are
// reported beside wall seconds because on a shared, busy machine wall time
// measures the other tenants as much as the tokenizer.
Timing time_encode(const Tokenizer& tk, const std::vector<std::string>& docs, unsigned threads, int reps) {
  Timing best;
  for (int r = 0; r < reps; ++r) {
    std::atomic<size_t> next{0}, count{0};
    const double t0 = now(), c0 = cpu_now();
    auto work = [&] {
      size_t local = 0;
      for (size_t i; (i = next.fetch_add(16)) < docs.size();)
        for (size_t k = i; k < std::min(docs.size(), i + 16); ++k) local += tk.encode(docs[k], false).size();
      count += local;
    };
    if (threads <= 1) {
      work();
    } else {
      std::vector<std::thread> pool;
      for (unsigned t = 0; t < threads; ++t) pool.emplace_back(work);
      for (auto& th : pool) th.join();
    }
    best.wall = std::min(best.wall, now() - t0);
    best.cpu = std::min(best.cpu, cpu_now() - c0);
    best.tokens = count;
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  fs::path fixtures = fs::path(QLORA_SOURCE_DIR) / ".." / "shared" / "fixtures";
  if (const char* env = std::getenv("QLORA_FIXTURES")) fixtures = env;
  unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  bool all = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--fixtures") && i + 1 < argc) fixtures = argv[++i];
    else if (!std::strcmp(argv[i], "--threads") && i + 1 < argc) threads = unsigned(std::atoi(argv[++i]));
    else if (!std::strcmp(argv[i], "--all-tokenizers")) all = true;
    else {
      std::fprintf(stderr, "usage: %s [--fixtures DIR] [--threads N] [--all-tokenizers]\n", argv[0]);
      return 2;
    }
  }
  if (!fs::exists(fixtures / "datasets/medical") || !fs::exists(fixtures / "tokenizers/llama3/assembled_hf")) {
    std::printf("bench_tokenize: skipped, fixtures not found at %s (pass --fixtures DIR or set QLORA_FIXTURES)\n",
                fixtures.string().c_str());
    return 0;
  }
  try {
    std::vector<std::pair<std::string, fs::path>> tokenizers = {{"Llama-3", fixtures / "tokenizers/llama3/assembled_hf"}};
    if (all) {
      tokenizers.push_back({"Llama-2 (tokenizer.json)", fixtures / "tokenizers/llama2-hf/tokenizer.json"});
      tokenizers.push_back({"Llama-2 (sentencepiece)", fixtures / "tokenizers/llama2-hf/tokenizer.model"});
      tokenizers.push_back({"SmolLM", fixtures / "tokenizers/smollm-135m-instruct"});
    }
    const std::vector<std::pair<std::string, std::vector<std::string>>> sets = {
        {"medical", load_docs(fixtures / "datasets/medical")}, {"legal", load_docs(fixtures / "datasets/legal")}};
    std::printf("\n## Tokenizer throughput (MB/s of UTF-8 input per core; %u threads for the all-cores column)\n\n",
                threads);
    std::printf("| tokenizer | dataset | docs | MB | tokens | bytes/token | 1 thread MB/s | 1 thread MB/CPU-s | "
                "all cores MB/s per core | all cores MB/CPU-s | all cores MB/s total |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (const auto& [tname, tpath] : tokenizers) {
      const double t0 = now();
      const auto tk = Tokenizer::load(tpath);
      std::fprintf(stderr, "%s loaded in %.2f s\n", tname.c_str(), now() - t0);
      for (const auto& [dname, docs] : sets) {
        const double mb = double(total_bytes(docs)) / 1e6;
        const Timing one = time_encode(*tk, docs, 1, 2);
        const Timing many = time_encode(*tk, docs, threads, 3);
        std::printf("| %s | %s | %zu | %.1f | %zu | %.2f | %.1f | %.1f | %.1f | %.1f | %.1f |\n", tname.c_str(),
                    dname.c_str(), docs.size(), mb, one.tokens, mb * 1e6 / double(std::max<size_t>(one.tokens, 1)),
                    mb / one.wall, mb / one.cpu, mb / many.wall / threads, mb / many.cpu, mb / many.wall);
        std::fflush(stdout);
      }
    }
  } catch (const Error& e) {
    std::fprintf(stderr, "bench_tokenize: %s\n", e.what());
    return 1;
  }
  return 0;
}
