// On-disk cache of tokenized samples, so a second run over the same data
// starts at once. The key is a hash of everything the result depends on: the
// bytes of the data files and of the tokenizer files, and a settings string
// (template name and options, format, field names, train_on_inputs, ...)
// built by the caller. A cache file whose key, version or structure does not
// match is ignored (and rebuilt by the caller), never trusted.
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "data/tokenize_sample.h"

namespace qlora {

// 128-bit content hash as 32 hex digits (two independent 64-bit lanes; a
// cache key, not a cryptographic hash). Files are hashed with their size,
// so moving bytes between two files changes the key.
class ContentHash {
 public:
  void add(std::string_view bytes);
  void add_file(const std::filesystem::path& file);  // Error naming the file if unreadable
  std::string hex() const;

 private:
  uint64_t a_ = 0xcbf29ce484222325ull;  // FNV-1a 64 offset basis
  uint64_t b_ = 0x9e3779b97f4a7c15ull;
};

// Key for data files + tokenizer folder (tokenizer.json, tokenizer.model,
// tokenizer_config.json, whichever exist) + settings. Files are hashed by
// content (a fast 4-lane digest over a memory map), never by metadata: see
// docs/data.md, "Cache".
std::string tokenized_cache_key(const std::vector<std::filesystem::path>& data_files,
                                const std::filesystem::path& tokenizer_dir, std::string_view settings);

// Writes atomically (temporary file + rename).
void save_tokenized(const std::filesystem::path& file, std::string_view key,
                    const std::vector<TokenizedSample>& samples);
// nullopt when the file is absent, from another key or format version, or
// damaged.
std::optional<std::vector<TokenizedSample>> load_tokenized(const std::filesystem::path& file, std::string_view key);

}  // namespace qlora
