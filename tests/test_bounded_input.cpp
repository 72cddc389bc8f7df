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

#include <cstdint>
#include <cstring>
#include <fstream>
#include <functional>
#include <string>

#include "data/dataset_reader.h"
#include "io/gguf.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "testing.h"

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

// Runs f in a child limited to `address_space` bytes and 60 s. Passes when f
// throws a qlora::Error containing `want`; the message otherwise says what happened.
// Under ASan no limit is set, so `address_space` goes unused there.
void expect_bounded_error(const std::function<void()>& f, const std::string& want,
                          [[maybe_unused]] uint64_t address_space) {
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(fds[0]);
#ifndef QLORA_UNDER_ASAN
    rlimit l{address_space, address_space};
    ::setrlimit(RLIMIT_AS, &l);
#endif
    ::alarm(60);
    std::string what = "no error";
    int code = 1;
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

TEST(BoundedInput, DeeplyNestedJsonIsAnErrorInBoundedMemory) {
  ScratchDir d;
  fs::create_directories(d / "m");
  const size_t depth = 200000;
  testing::write_bytes(d / "m" / "config.json", std::string(depth, '[') + std::string(depth, ']'));
  expect_bounded_error([&] { load_model_config(d / "m"); }, "config.json", kGiB);
}

}  // namespace
}  // namespace qlora
