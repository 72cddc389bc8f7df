#include "core/cache_dir.h"

#include <cstdlib>

#include "core/error.h"

namespace qlora {

namespace fs = std::filesystem;

fs::path cache_root() {
  if (const char* c = std::getenv("QLORA_CACHE"); c && *c) return c;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return fs::path(x) / "qlora";
  if (const char* h = std::getenv("HOME"); h && *h) return fs::path(h) / ".cache" / "qlora";
  return fs::temp_directory_path() / "qlora-cache";
}

fs::path cache_subdir(std::string_view sub) {
  const fs::path dir = cache_root() / sub;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail(dir.string(), ": cannot create the cache folder: ", ec.message());
  return dir;
}

}  // namespace qlora
