// Where qlora keeps what it can rebuild (the built-in demo models, tokenized
// datasets): $QLORA_CACHE, else $XDG_CACHE_HOME/qlora, else ~/.cache/qlora,
// else <tmp>/qlora-cache.
#pragma once

#include <filesystem>
#include <string_view>

namespace qlora {

std::filesystem::path cache_root();
// cache_root()/sub, created if missing (Error naming it if it cannot be).
std::filesystem::path cache_subdir(std::string_view sub);

}  // namespace qlora
