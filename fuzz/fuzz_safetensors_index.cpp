// model.safetensors.index.json of a sharded model, beside two valid shards.
#include "fuzz_util.h"
#include "io/safetensors.h"

namespace {

const std::filesystem::path& model_dir() {
  static const std::filesystem::path dir = [] {
    using namespace qlora;
    const auto d = fuzz::scratch() / "sharded";
    std::filesystem::create_directories(d);
    save_safetensors(d / "model-00001-of-00002.safetensors",
                     {{"a.weight", DType::F32, {2, 2}, std::vector<uint8_t>(16, 1)}});
    save_safetensors(d / "model-00002-of-00002.safetensors",
                     {{"b.weight", DType::BF16, {3}, std::vector<uint8_t>(6, 2)}});
    return d;
  }();
  return dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qlora;
  const auto& dir = model_dir();
  fuzz::put(dir / "model.safetensors.index.json", fuzz::as_text(data, size));
  fuzz::expect_only_qlora_errors([&] {
    const SafetensorsModel m(dir);
    volatile uint64_t sum = m.total_bytes();
    for (const auto& n : m.names()) sum = sum + m.data(n).size();
  });
  return 0;
}
