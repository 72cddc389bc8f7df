// Bounded input (docs/reliability.md): a file that claims huge sizes, a
// multi-gigabyte dataset line or document, deep nesting: a clear error within
// bounded memory and time, never an allocation of what the file claims. Each
// case runs in a child under RLIMIT_AS (address space) and a time limit; the
// files are sparse, so no gigabytes are written. Under AddressSanitizer
// (which reserves terabytes of address space) the limit is left off and only
// the error is checked.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <functional>
#include <string>

#include "data/dataset_reader.h"
#include "io/gguf.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/lora.h"
#include "testing.h"
#include "tokenizer/gguf_vocab.h"
#include "tokenizer/tokenizer.h"

#if defined(__SANITIZE_ADDRESS__)
#define QLORA_UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define QLORA_UNDER_ASAN 1
#endif
#endif

namespace qlora {
namespace {

namespace fs = std::filesystem;
using testing::ScratchDir;

constexpr uint64_t kGiB = uint64_t(1) << 30;

// Runs f in a child limited to `address_space` bytes and 60 s (600 under ASan). Passes when f
// throws a qlora::Error containing `want`, and, where given, its peak
// resident memory grew by at most `max_growth` bytes (getrusage ru_maxrss)
// and it took at most `max_seconds`; the message otherwise says what happened.
// Under ASan no address-space limit is set, so `address_space` goes unused
// there, and the memory and time bounds are not checked: ASan's shadow
// memory and its quarantine of freed blocks (256 MiB by default) grow the
// peak RSS, and instrumented code runs several times slower, so there they
// would measure the sanitizer, not the reader. The normal build checks them.
void expect_bounded_error(const std::function<void()>& f, const std::string& want,
                          [[maybe_unused]] uint64_t address_space, uint64_t max_growth = 0,
                          double max_seconds = 0) {
#ifdef QLORA_UNDER_ASAN
  max_growth = 0;
  max_seconds = 0;
  constexpr unsigned kAlarmSeconds = 600;
#else
  constexpr unsigned kAlarmSeconds = 60;
#endif
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(fds[0]);
#ifndef QLORA_UNDER_ASAN
    rlimit l{address_space, address_space};
    ::setrlimit(RLIMIT_AS, &l);
#endif
    ::alarm(kAlarmSeconds);
    std::string what = "no error";
    int code = 1;
    rusage before{}, after{};
    ::getrusage(RUSAGE_SELF, &before);
    const auto start = std::chrono::steady_clock::now();
    try {
      f();
    } catch (const Error& e) {
      what = e.what();
      code = what.find(want) != std::string::npos ? 0 : 1;
    } catch (const std::bad_alloc&) {
      what = "std::bad_alloc: it allocated what the file claims";
    } catch (const std::exception& e) {
      what = std::string("not a qlora::Error: ") + e.what();
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    ::getrusage(RUSAGE_SELF, &after);
    const uint64_t growth = uint64_t(std::max<long>(0, after.ru_maxrss - before.ru_maxrss)) * 1024;
    if (code == 0 && max_growth > 0 && growth > max_growth) {
      code = 1;
      what = str("peak memory grew by ", growth >> 20, " MiB (limit ", max_growth >> 20, " MiB): ", what);
    }
    if (code == 0 && max_seconds > 0 && seconds > max_seconds) {
      code = 1;
      what = str("took ", seconds, " s (limit ", max_seconds, " s): ", what);
    }
    (void)!::write(fds[1], what.data(), what.size());
    ::_exit(code);
  }
  ::close(fds[1]);
  std::string what;
  char buf[4096];
  for (ssize_t n; (n = ::read(fds[0], buf, sizeof buf)) > 0;) what.append(buf, size_t(n));
  ::close(fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << "wanted an error with \"" << want << "\"; got " << (WIFSIGNALED(status) ? "a signal " : "")
      << (WIFSIGNALED(status) ? std::to_string(WTERMSIG(status)) : std::string()) << " " << what.substr(0, 300);
}

// A sparse file: `head`, then zeros up to `size` bytes (a hole, not written).
void sparse_file(const fs::path& p, const std::string& head, uint64_t size) {
  { std::ofstream(p, std::ios::binary) << head; }
  fs::resize_file(p, size);
}

TEST(BoundedInput, AMultiGigabyteJsonlLineIsABadRecordNotGigabytesOfMemory) {
  ScratchDir d;
  const fs::path file = d / "huge.jsonl";
  sparse_file(file, "{\"text\": \"ok\"}\n{\"text\": \"", 3 * kGiB);
  ReadOptions o;
  o.format = DataFormat::text;
  // The old reader copied the file twice (6 GiB); mapping it takes 3 GiB of
  // address space and no memory.
  expect_bounded_error([&] { read_dataset(file, o); }, ":2: the line is 3221225457 bytes; a record may have at most 64 MiB",
                       4 * kGiB + kGiB / 2);
  // With on_bad_record: skip, the good first line survives.
  o.on_bad_record = OnBadRecord::skip;
  const pid_t pid = ::fork();
  if (pid == 0) {
    const ReadResult r = read_dataset(file, o);
    ::_exit(r.samples.size() == 1 && r.skipped == 1 ? 0 : 1);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

TEST(BoundedInput, AJsonDocumentOverOneGibibyteIsRefusedUnparsed) {
  ScratchDir d;
  const fs::path file = d / "huge.json";
  sparse_file(file, "[{\"text\": \"", 2 * kGiB);
  ReadOptions o;
  o.format = DataFormat::text;
  expect_bounded_error([&] { read_dataset(file, o); }, "files over 1 GiB must be JSONL", 3 * kGiB);
}

TEST(BoundedInput, HeadersClaimingHugeSizesAreRefusedWithoutAllocating) {
  ScratchDir d;
  // safetensors: a header length of 1 TiB in a 10-byte file.
  std::string st(8, '\0');
  const uint64_t claim = uint64_t(1) << 40;
  std::memcpy(st.data(), &claim, 8);
  st += "{}";
  testing::write_bytes(d / "a.safetensors", st);
  expect_bounded_error([&] { SafetensorsFile f(d / "a.safetensors"); }, "a.safetensors", kGiB);

  // GGUF: one key whose string array claims 2^40 elements.
  std::string g = "GGUF";
  auto u32 = [&](uint32_t v) { g.append(reinterpret_cast<const char*>(&v), 4); };
  auto u64 = [&](uint64_t v) { g.append(reinterpret_cast<const char*>(&v), 8); };
  u32(3);          // version
  u64(0);          // tensors
  u64(1);          // keys
  u64(1);          // key length
  g += "a";        // key
  u32(9);          // array
  u32(8);          // of strings
  u64(claim);      // count
  u64(claim);      // the first string's length
  testing::write_bytes(d / "a.gguf", g);
  expect_bounded_error([&] { GgufFile f(d / "a.gguf"); }, "a.gguf", kGiB);
}

// Two million levels (4 MB) took 8.3 s and 370 MB before the nesting limit
// (core/json_parse.h); now the file is refused at level 513, having cost
// about its own size. Limits here are an order of magnitude above what it
// takes (milliseconds, a few MB).
TEST(BoundedInput, DeeplyNestedJsonIsRefusedFastInBoundedMemory) {
  ScratchDir d;
  const size_t depth = 2000000;
  const std::string deep = std::string(depth, '[') + std::string(depth, ']');
  const std::string want = ":1: JSON nested deeper than 512 levels (at byte 513)";
  const uint64_t mib = uint64_t(1) << 20;
  fs::create_directories(d / "m");
  testing::write_bytes(d / "m" / "config.json", deep);
  expect_bounded_error([&] { load_model_config(d / "m"); }, "config.json" + want, kGiB, 64 * mib, 3.0);
  testing::write_bytes(d / "m" / "tokenizer.json", "{\"model\": " + deep + "}");
  expect_bounded_error([&] { Tokenizer::load(d / "m"); }, "tokenizer.json:1: JSON nested deeper than 512",
                       kGiB, 64 * mib, 3.0);
  ReadOptions o;
  o.format = DataFormat::text;
  testing::write_bytes(d / "data.json", deep);
  expect_bounded_error([&] { read_dataset(d / "data.json", o); }, "data.json" + want, kGiB, 64 * mib, 3.0);
  testing::write_bytes(d / "data.jsonl", "{\"text\": \"ok\"}\n" + deep + "\n");
  expect_bounded_error([&] { read_dataset(d / "data.jsonl", o); },
                       "data.jsonl:2: JSON nested deeper than 512 levels (at byte 513)", kGiB, 64 * mib, 3.0);
  fs::create_directories(d / "a");
  testing::write_bytes(d / "a" / "adapter_config.json", deep);
  expect_bounded_error([&] { LoraWeights::load_peft(d / "a", ModelConfig{}); }, "adapter_config.json" + want,
                       kGiB, 64 * mib, 3.0);
  // 512 levels are JSON like any other (here: not a config).
  testing::write_bytes(d / "m" / "config.json", std::string(512, '[') + std::string(512, ']'));
  const std::string e = testing::error_of([&] { load_model_config(d / "m"); });
  EXPECT_EQ(e.find("nested deeper"), std::string::npos) << e;
}

// A vocabulary over kMaxVocabSize (2^22 tokens; real ones have at most
// 262,144) is refused by name in every tokenizer format, before anything is
// built for its entries: tokenizer.json by counting the vocab object's
// members while checking the text (a parsed tree of 4 million entries would
// take over a gigabyte), tokenizer.model by counting the pieces in the
// protobuf, GGUF by the token array's length.
TEST(BoundedInput, VocabulariesOverTheMaximumAreRefusedByName) {
  ScratchDir d;
  const uint64_t mib = uint64_t(1) << 20;
  const size_t n = size_t(kMaxVocabSize) + 1;
  {
    std::string t = R"({"model": {"type": "BPE", "merges": [], "vocab": {)";
    t.reserve(n * 16);
    char buf[32];
    for (size_t i = 0; i < n; ++i) {
      const int len = std::snprintf(buf, sizeof buf, "%s\"%zx\":%zu", i ? "," : "", i, i);
      t.append(buf, size_t(len));
    }
    t += "}}}";
    fs::create_directories(d / "j");
    testing::write_bytes(d / "j" / "tokenizer.json", t);
  }
  // The text itself (~70 MB) is read whole; nothing is built for the entries.
  expect_bounded_error([&] { Tokenizer::load(d / "j"); },
                       "tokenizer.json:1: a JSON object with more than 4194304 members (a tokenizer's "
                       "vocabulary has at most 4194304 entries)",
                       2 * kGiB, 256 * mib);

  {  // tokenizer.model: ModelProto field 1 (a piece) n times, each piece "a".
    std::string m;
    m.reserve(n * 5);
    for (size_t i = 0; i < n; ++i) m += std::string("\x0a\x03\x0a\x01\x61", 5);
    testing::write_bytes(d / "tokenizer.model", m);
  }
  expect_bounded_error([&] { Tokenizer::load(d / "tokenizer.model"); },
                       "tokenizer.model: the model has 4194305 pieces; a vocabulary has at most 4194304",
                       kGiB, 64 * mib);

  {  // GGUF: tokenizer.ggml.model "llama" and n tokens "a".
    std::string g = "GGUF";
    auto u32 = [&](uint32_t v) { g.append(reinterpret_cast<const char*>(&v), 4); };
    auto u64 = [&](uint64_t v) { g.append(reinterpret_cast<const char*>(&v), 8); };
    auto text = [&](const std::string& s) {
      u64(s.size());
      g += s;
    };
    u32(3);  // version
    u64(0);  // tensors
    u64(2);  // keys
    text("tokenizer.ggml.model");
    u32(8);  // a string
    text("llama");
    text("tokenizer.ggml.tokens");
    u32(9);  // an array
    u32(8);  // of strings
    u64(n);
    g.reserve(g.size() + n * 9);
    for (size_t i = 0; i < n; ++i) text("a");
    testing::write_bytes(d / "v.gguf", g);
  }
  // Each metadata value is held (~48 bytes; kGgufMaxArrayElements caps an
  // array), then the count is refused before the strings are copied.
  expect_bounded_error(
      [&] { load_gguf_tokenizer(GgufFile(d / "v.gguf")); },
      "v.gguf: key tokenizer.ggml.tokens has 4194305 tokens; a vocabulary has at most 4194304", 2 * kGiB,
      512 * mib);
}

TEST(BoundedInput, AGgufMetadataArrayOverItsLimitIsRefusedBeforeItsElements) {
  ScratchDir d;
  std::string g = "GGUF";
  auto u32 = [&](uint32_t v) { g.append(reinterpret_cast<const char*>(&v), 4); };
  auto u64 = [&](uint64_t v) { g.append(reinterpret_cast<const char*>(&v), 8); };
  u32(3);  // version
  u64(0);  // tensors
  u64(1);  // keys
  u64(1);  // key length
  g += "a";
  u32(9);  // an array
  u32(0);  // of u8
  u64(kGgufMaxArrayElements + 1);
  // A sparse file big enough for the count: only the limit refuses it.
  sparse_file(d / "a.gguf", g, g.size() + kGgufMaxArrayElements + 1);
  expect_bounded_error([&] { GgufFile f(d / "a.gguf"); },
                       "a.gguf: key a: array of 33554433 values; a metadata array may have at most 33554432",
                       kGiB, 64 * (uint64_t(1) << 20));
}

}  // namespace
}  // namespace qlora
