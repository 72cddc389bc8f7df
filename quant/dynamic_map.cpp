#include "quant/dynamic_map.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace qlora {

namespace {

// torch.linspace(start, end, steps, dtype=float32) exactly as PyTorch's x86-64
// CPU kernel computes it, since bitsandbytes builds the map with it: an fp32
// step; the first half counted up from start, the second half down from end;
// runs of 16 values done as two 8-lane AVX2 vectors whose first lane is
// start + step*idx (contracted to one fused multiply-add) and whose lane j adds
// the separately rounded j*step; the tail in scalar code, also fused. Checked
// against torch by tests/reference/make_quant_golden.py (the golden test);
// other CPU builds of torch may differ in the last bit, which is why
// checkpoints store the map (nested_quant_map) and loaders use the stored one.
std::vector<float> linspace_f32(float start, float end, int steps) {
  constexpr int kLanes = 8;
  std::vector<float> v(static_cast<size_t>(steps));
  const float step = (end - start) / float(steps - 1);
  const int halfway = steps / 2;
  auto at = [&](int idx) {
    return idx < halfway ? std::fma(step, float(idx), start) : std::fma(-step, float(steps - idx - 1), end);
  };
  int i = 0;
  for (; i + 2 * kLanes <= steps; i += 2 * kLanes) {
    for (int half = 0; half < 2; ++half) {
      const int idx = i + half * kLanes;
      const float base = at(idx);
      for (int j = 0; j < kLanes; ++j) v[size_t(idx + j)] = base + float(j) * step;
    }
  }
  for (; i < steps; ++i) v[size_t(i)] = at(i);
  return v;
}

std::array<float, 256> make_dynamic_map_signed() {
  constexpr int kMaxExponentBits = 7;
  constexpr int kNonSignBits = 7;
  std::vector<float> data;
  data.reserve(256);
  // Exponent i covers magnitudes 10^(i-6) * [0.1, 1], with 2^i fraction steps
  // (each value the mean of two neighbouring linspace boundaries, in fp32).
  for (int i = 0; i < kMaxExponentBits; ++i) {
    const int fraction_items = (1 << (i + kNonSignBits - kMaxExponentBits)) + 1;
    const std::vector<float> b = linspace_f32(0.1f, 1.0f, fraction_items);
    const auto scale = static_cast<float>(std::pow(10.0, double(i - (kMaxExponentBits - 1))));
    for (size_t k = 0; k + 1 < b.size(); ++k) {
      const float mean = (b[k] + b[k + 1]) / 2.0f;
      data.push_back(scale * mean);
    }
    for (size_t k = 0; k + 1 < b.size(); ++k) {
      const float mean = (b[k] + b[k + 1]) / 2.0f;
      data.push_back(-scale * mean);
    }
  }
  data.push_back(0.0f);
  data.push_back(1.0f);
  std::sort(data.begin(), data.end());
  std::array<float, 256> out{};
  std::copy(data.begin(), data.end(), out.begin());
  return out;
}

}  // namespace

const std::array<float, 256>& dynamic_map_signed() {
  static const std::array<float, 256> kMap = make_dynamic_map_signed();
  return kMap;
}

}  // namespace qlora
