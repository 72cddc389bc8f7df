// The whole data path of a run, as one call: data files -> samples ->
// tokenized, masked samples (cached on disk by content hash) -> train/val
// split -> packed rows of seq_len -> shuffled with the seed.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "data/chat_template.h"
#include "data/dataset_reader.h"
#include "data/packing.h"
#include "data/tokenize_sample.h"
#include "tokenizer/tokenizer.h"

namespace qlora {

struct DataSpec {
  std::vector<std::filesystem::path> train_files;
  std::vector<std::filesystem::path> val_files;  // when empty, val_fraction of the train samples
  double val_fraction = 0.0;
  ReadOptions read;
  std::string chat_template = "auto";
  TemplateOptions template_options;
  TokenizeOptions tokenize;
  PackOptions pack;
  uint64_t seed = 42;
  std::optional<std::filesystem::path> cache_dir;  // none: always tokenize
  unsigned threads = 0;                            // 0: all cores
};

struct PreparedData {
  PackResult train, val;
  std::string template_name;
  size_t train_samples = 0, val_samples = 0;  // tokenized samples before packing
  size_t skipped_records = 0;                 // on_bad_record: skip (0 when loaded from the cache)
  bool from_cache = false;
  std::string cache_key;
};

// `tokenizer_dir` is hashed into the cache key with the data files and every
// setting that changes the tokens; packing settings are not (packing is cheap
// and done after the cache).
PreparedData prepare_dataset(const Tokenizer& tok, const std::filesystem::path& tokenizer_dir,
                             const DataSpec& spec);

// The statistics printed before training: samples, tokens, share of trained
// tokens, truncated and dropped counts, packing efficiency.
std::string data_statistics_text(const PreparedData& d);

}  // namespace qlora
