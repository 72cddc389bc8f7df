#include "tools/model_folder.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace qlora {

namespace fs = std::filesystem;

std::string shard_file_name(size_t index, size_t count) {
  if (count == 1) return "model.safetensors";
  const std::string i = std::to_string(index + 1), n = std::to_string(count);
  return str("model-", std::string(5 - std::min<size_t>(5, i.size()), '0'), i, "-of-",
             std::string(5 - std::min<size_t>(5, n.size()), '0'), n, ".safetensors");
}

bool is_weight_file(const fs::path& p) {
  const std::string name = p.filename().string();
  const std::string ext = p.extension().string();
  return ext == ".safetensors" || ext == ".bin" || ext == ".pt" || ext == ".pth" || ext == ".gguf" ||
         ext == ".h5" || ext == ".msgpack" || name.find(".index.json") != std::string::npos;
}

void copy_model_side_files(const fs::path& from, const fs::path& to) {
  for (const auto& e : fs::directory_iterator(from)) {
    if (!e.is_regular_file() || is_weight_file(e.path()) || e.path().filename() == "config.json") continue;
    std::error_code ec;
    fs::copy_file(e.path(), to / e.path().filename(), ec);
    if (ec) fail(to.string(), ": cannot copy ", e.path().string(), ": ", ec.message());
  }
}

std::string read_text_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  if (!f) fail(p.string(), ": cannot read");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void tensor_range_to_f32(std::span<const uint8_t> src, DType t, int64_t begin, int64_t end, float* out) {
  const size_t es = dtype_size(t);
  const int64_t n = end - begin;
  constexpr int64_t kPiece = 1 << 16;
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < n; p += kPiece) {
    const int64_t len = std::min(kPiece, n - p);
    convert_to_f32(src.data() + size_t(begin + p) * es, t, size_t(len), out + p);
  }
}

}  // namespace qlora
