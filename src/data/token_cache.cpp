#include "data/token_cache.h"

#include <cstring>
#include <fstream>
#include <iterator>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/mapped_file.h"
#include "io/gguf.h"
#include "tokenizer/gguf_vocab.h"

namespace qlora {

namespace {

// File layout (little-endian hosts, as every platform we build for):
//   "QLTOKv01" | u64 key length | key | u64 sample count |
//   per sample: u64 n | int32 ids[n] | int32 labels[n]
constexpr char kMagic[8] = {'Q', 'L', 'T', 'O', 'K', 'v', '0', '1'};

void put_u64(std::string& out, uint64_t v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof v);
}

// A bounds-checked reader over the file bytes: any overrun means damage.
struct Reader {
  std::string_view bytes;
  size_t pos = 0;
  bool ok = true;
  bool take(void* dst, size_t n) {
    if (!ok || n > bytes.size() - pos) return ok = false;
    if (n == 0) return true;  // an empty vector's data() may be null
    std::memcpy(dst, bytes.data() + pos, n);
    pos += n;
    return true;
  }
  uint64_t u64() {
    uint64_t v = 0;
    take(&v, sizeof v);
    return v;
  }
};

constexpr uint64_t kP1 = 0x9E3779B185EBCA87ull, kP2 = 0xC2B2AE3D27D4EB4Full, kP3 = 0x165667B19E3779F9ull;

uint64_t rotl(uint64_t x, int r) {
  return (x << r) | (x >> (64 - r));
}

uint64_t avalanche(uint64_t h) {
  h ^= h >> 33;
  h *= kP2;
  h ^= h >> 29;
  h *= kP3;
  return h ^ (h >> 32);
}

uint64_t load64(const uint8_t* p) {
  uint64_t w;
  std::memcpy(&w, p, 8);
  return w;
}

// 128-bit digest of a byte string: XXH64's round on four independent lanes
// (32 bytes per step), so it runs at several GB/s where ContentHash::add's
// two dependent chains manage about one. The cache key hashes the data files
// and the 9 MB Llama 3 tokenizer.json on every load, so this is the part of a
// cache hit that matters. Every byte goes into a lane, the length into both
// halves: any change of content changes the digest (with 2^-64-ish odds of a
// collision, as for any 64-bit-per-half hash).
struct Digest {
  uint64_t lo, hi;
};

Digest digest(const uint8_t* p, size_t n) {
  uint64_t v1 = kP1 + kP2, v2 = kP2, v3 = 0, v4 = 0 - kP1;
  auto round = [](uint64_t acc, uint64_t w) { return rotl(acc + w * kP2, 31) * kP1; };
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    v1 = round(v1, load64(p + i));
    v2 = round(v2, load64(p + i + 8));
    v3 = round(v3, load64(p + i + 16));
    v4 = round(v4, load64(p + i + 24));
  }
  uint8_t tail[32] = {};  // zero-padded; the length below tells "a" from "a\0"
  if (n > i) std::memcpy(tail, p + i, n - i);
  v1 = round(v1, load64(tail));
  v2 = round(v2, load64(tail + 8));
  v3 = round(v3, load64(tail + 16));
  v4 = round(v4, load64(tail + 24));
  const uint64_t len = uint64_t(n);
  return {avalanche(rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18) + len * kP3),
          avalanche(v1 ^ rotl(v2, 29) ^ rotl(v3, 41) ^ rotl(v4, 53) ^ (len * kP1))};
}

// The file's digest and size into h: reads through a memory map (no copy).
void add_file_digest(ContentHash& h, const std::filesystem::path& file) {
  std::optional<MappedFile> map;
  try {
    map.emplace(file);
  } catch (const Error& e) {
    fail("cannot read ", file.string(), " for the cache key: ", e.what());
  }
  const Digest d = digest(map->bytes().data(), map->size());
  const uint64_t words[3] = {d.lo, d.hi, uint64_t(map->size())};
  h.add(std::string_view(reinterpret_cast<const char*>(words), sizeof words));
}

}  // namespace

void ContentHash::add(std::string_view bytes) {
  // Eight bytes per step (two multiply chains run side by side): hashing the
  // data and tokenizer files dominated a cache hit when done byte by byte.
  auto mix = [this](uint64_t w) {
    a_ = (a_ ^ w) * 0x100000001b3ull;
    a_ ^= a_ >> 32;
    b_ = (b_ + w + 0x9e3779b97f4a7c15ull) * 0xff51afd7ed558ccdull;
    b_ ^= b_ >> 29;
  };
  size_t i = 0;
  for (; i + 8 <= bytes.size(); i += 8) {
    uint64_t w;
    std::memcpy(&w, bytes.data() + i, 8);
    mix(w);
  }
  uint64_t tail = 0;
  std::memcpy(&tail, bytes.data() + i, bytes.size() - i);
  mix(tail ^ (uint64_t(bytes.size() - i) << 56));  // the tail length keeps "a" and "a\0" apart
}

void ContentHash::add_file(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) fail("cannot read ", file.string(), " for the cache key");
  std::string buf(1 << 20, '\0');
  uint64_t size = 0;
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    const size_t got = static_cast<size_t>(in.gcount());
    add(std::string_view(buf.data(), got));
    size += got;
  }
  if (in.bad()) fail("read error on ", file.string(), " while hashing it");
  add(std::string_view(reinterpret_cast<const char*>(&size), sizeof size));
}

std::string ContentHash::hex() const {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string s;
  for (uint64_t v : {a_, b_})
    for (int shift = 60; shift >= 0; shift -= 4) s += kDigits[(v >> shift) & 0xF];
  return s;
}

std::string tokenized_cache_key(const std::vector<std::filesystem::path>& data_files,
                                const std::filesystem::path& tokenizer_dir, std::string_view settings) {
  ContentHash h;
  h.add("qlora tokenized v2\n");
  for (const auto& f : data_files) add_file_digest(h, f);
  h.add("\ntokenizer\n");
  if (is_gguf_file(tokenizer_dir)) {
    // The tokenizer a GGUF model's metadata describes, not the whole (weights) file.
    const GgufTokenizerFiles t = gguf_tokenizer_files(GgufFile(tokenizer_dir));
    h.add(t.tokenizer_json.dump());
    h.add(t.spm_model);
    h.add(t.tokenizer_config.dump());
  }
  for (const char* name : {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"}) {
    const auto p = std::filesystem::is_directory(tokenizer_dir) ? tokenizer_dir / name : tokenizer_dir;
    h.add(name);
    if (std::filesystem::is_regular_file(p) && !is_gguf_file(p)) add_file_digest(h, p);
  }
  h.add("\nsettings\n");
  h.add(settings);
  return h.hex();
}

void save_tokenized(const std::filesystem::path& file, std::string_view key,
                    const std::vector<TokenizedSample>& samples) {
  AtomicFile out(file);
  std::string head(kMagic, sizeof kMagic);
  put_u64(head, key.size());
  head += key;
  put_u64(head, samples.size());
  out.write(head);
  for (const auto& s : samples) {
    if (s.labels.size() != s.input_ids.size())
      fail("save_tokenized: a sample's labels and ids differ in length");
    std::string n;
    put_u64(n, s.input_ids.size());
    out.write(n);
    out.write(s.input_ids.data(), s.input_ids.size() * sizeof(TokenId));
    out.write(s.labels.data(), s.labels.size() * sizeof(int32_t));
  }
  out.commit();
}

std::optional<std::vector<TokenizedSample>> load_tokenized(const std::filesystem::path& file,
                                                           std::string_view key) {
  // Read through a memory map: no copy of the whole file before the samples
  // are filled (cache files are only ever replaced by rename, never
  // rewritten in place, so the mapping cannot shrink under us).
  std::error_code ec;
  if (!std::filesystem::is_regular_file(file, ec)) return std::nullopt;
  std::optional<MappedFile> map;
  try {
    map.emplace(file);
  } catch (const Error&) {
    return std::nullopt;
  }
  const std::string_view bytes(reinterpret_cast<const char*>(map->bytes().data()), map->size());
  Reader r{bytes};
  char magic[sizeof kMagic];
  if (!r.take(magic, sizeof magic) || std::memcmp(magic, kMagic, sizeof magic) != 0) return std::nullopt;
  const uint64_t klen = r.u64();
  if (!r.ok || klen != key.size() || bytes.compare(r.pos, klen, key) != 0) return std::nullopt;
  r.pos += klen;
  const uint64_t count = r.u64();
  // Each sample takes at least its 8-byte length: bounds count before reserving.
  if (!r.ok || count > (bytes.size() - r.pos) / 8) return std::nullopt;
  std::vector<TokenizedSample> out(count);
  for (auto& s : out) {
    const uint64_t n = r.u64();
    if (!r.ok || n > (bytes.size() - r.pos) / 8) return std::nullopt;
    s.input_ids.resize(n);
    s.labels.resize(n);
    r.take(s.input_ids.data(), n * sizeof(TokenId));
    r.take(s.labels.data(), n * sizeof(int32_t));
  }
  if (!r.ok || r.pos != bytes.size()) return std::nullopt;
  return out;
}

}  // namespace qlora
