#include "data/token_cache.h"

#include <cstring>
#include <fstream>
#include <iterator>

#include "core/atomic_file.h"
#include "core/error.h"

namespace qlora {

namespace {

// File layout (little-endian hosts, as every platform we build for):
//   "QLTOKv01" | u64 key length | key | u64 sample count |
//   per sample: u64 n | int32 ids[n] | int32 labels[n]
constexpr char kMagic[8] = {'Q', 'L', 'T', 'O', 'K', 'v', '0', '1'};

void put_u64(std::string& out, uint64_t v) { out.append(reinterpret_cast<const char*>(&v), sizeof v); }

// A bounds-checked reader over the file bytes: any overrun means damage.
struct Reader {
  const std::string& bytes;
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
  h.add("qlora tokenized v1\n");
  for (const auto& f : data_files) h.add_file(f);
  h.add("\ntokenizer\n");
  for (const char* name : {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"}) {
    const auto p = std::filesystem::is_directory(tokenizer_dir) ? tokenizer_dir / name : tokenizer_dir;
    h.add(name);
    if (std::filesystem::is_regular_file(p)) h.add_file(p);
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
    if (s.labels.size() != s.input_ids.size()) fail("save_tokenized: a sample's labels and ids differ in length");
    std::string n;
    put_u64(n, s.input_ids.size());
    out.write(n);
    out.write(s.input_ids.data(), s.input_ids.size() * sizeof(TokenId));
    out.write(s.labels.data(), s.labels.size() * sizeof(int32_t));
  }
  out.commit();
}

std::optional<std::vector<TokenizedSample>> load_tokenized(const std::filesystem::path& file, std::string_view key) {
  std::ifstream in(file, std::ios::binary);
  if (!in) return std::nullopt;
  // One read of the whole file (istreambuf_iterator goes byte by byte and
  // dominated a cache hit).
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  if (size < 0) return std::nullopt;
  in.seekg(0, std::ios::beg);
  std::string bytes(static_cast<size_t>(size), '\0');
  if (!in.read(bytes.data(), size)) return std::nullopt;
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
