// tokenizer.json decoders: turn the pieces of a token sequence back into
// text. Supported: Sequence, ByteLevel, Replace (String pattern),
// ByteFallback, Fuse, Strip, Metaspace. Anything else is refused by name.
//
// One deliberate difference from HF: byte tokens (<0xNN> and byte-level
// pieces) decode to their raw bytes even when these do not form valid UTF-8,
// where HF substitutes U+FFFD. decode(encode(s)) == s then holds for any byte
// string, and a caller decoding a prefix of a stream sees the real bytes.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace qlora::tok {

class Decoder {
 public:
  virtual ~Decoder() = default;
  // Rewrites the pieces in place (stages may fuse them into fewer strings).
  virtual void decode(std::vector<std::string>& pieces) const = 0;
};

// nullptr for a JSON null (pieces are then joined with spaces, as HF does).
std::unique_ptr<Decoder> parse_decoder(const nlohmann::json& j, const std::string& file);

}  // namespace qlora::tok
