// tokenizer.json pre-tokenizers: cut normalized text into the words BPE
// merges within. Supported: Sequence, Split (String or Regex pattern;
// Isolated, Removed, MergedWithPrevious, MergedWithNext), ByteLevel (with or
// without the GPT-2 regex, add_prefix_space), Digits, Metaspace. Anything else
// is refused by name.
//
// Pieces are spans over one text buffer so a whole segment is pre-tokenized
// without a string allocation per word; only stages that rewrite text
// (Metaspace, ByteLevel's prefix space) rebuild the buffer.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace qlora::tok {

struct Pieces {
  std::string text;
  std::vector<std::pair<size_t, size_t>> spans;  // [begin, end) into text, in order
};

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  // first: this segment starts the input (Metaspace's prepend_scheme "first").
  virtual void apply(Pieces& p, bool first) const = 0;
  // True if a ByteLevel stage is present: the model then sees raw bytes.
  virtual bool byte_level() const { return false; }
};

// nullptr for a JSON null (the whole segment is one word).
std::unique_ptr<PreTokenizer> parse_pre_tokenizer(const nlohmann::json& j, const std::string& file);

}  // namespace qlora::tok
