// tokenizer.json normalizers: the text rewrites applied before
// pre-tokenization (and to the patterns of "normalized" added tokens).
// Supported: Sequence, Prepend, Replace, Strip, NFC (through ICU). Anything
// else is refused by name.
#pragma once

#include <memory>
#include <string>

#include <nlohmann/json_fwd.hpp>

namespace qlora::tok {

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual void normalize(std::string& s) const = 0;
};

// nullptr for a JSON null (no normalizer). `file` names the tokenizer.json in
// errors.
std::unique_ptr<Normalizer> parse_normalizer(const nlohmann::json& j, const std::string& file);

}  // namespace qlora::tok
