// Helpers shared by the GPU benchmarks (bench_cuda_ops, bench_cuda_train):
// random device data that is the same on every run and platform, CUDA events,
// medians. Benchmark code only (header-only; not part of the library).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "core/dtype.h"
#include "core/splitmix.h"
#include "kernels/cuda/device.h"

namespace qlora::bench {

// ---- random device data --------------------------------------------------------------

inline uint64_t mix64(uint64_t x) { return SplitMix64(x).next(); }  // one splitmix64 step from state x
inline float uniform_pm1(uint64_t seed, int64_t i) {  // in [-1, 1)
  return float(int64_t(mix64(seed * 0x632be59bd9b4e019ull + uint64_t(i)) >> 40) - (int64_t(1) << 23)) /
         float(int64_t(1) << 23);
}

// n elements made by f(i) on the host for the first 4M, then tiled on the
// device: the values repeat, which changes no timing, and setup stays fast.
template <typename T, typename F>
void fill(T* d, int64_t n, F f) {
  if (n <= 0) return;
  const int64_t chunk = std::min<int64_t>(n, int64_t(1) << 22);
  std::vector<T> host(static_cast<size_t>(chunk));
  for (int64_t i = 0; i < chunk; ++i) host[size_t(i)] = f(i);
  QLORA_CUDA_CHECK(cudaMemcpy(d, host.data(), size_t(chunk) * sizeof(T), cudaMemcpyHostToDevice));
  for (int64_t done = chunk; done < n;) {
    const int64_t c = std::min(done, n - done);
    QLORA_CUDA_CHECK(cudaMemcpy(d + done, d, size_t(c) * sizeof(T), cudaMemcpyDeviceToDevice));
    done += c;
  }
  QLORA_CUDA_CHECK(cudaDeviceSynchronize());  // device-to-device cudaMemcpy may return early
}

inline DeviceBuffer<uint16_t> random_bf16(int64_t n, uint64_t seed, float scale) {
  DeviceBuffer<uint16_t> b(static_cast<size_t>(n));
  fill(b.data(), n, [&](int64_t i) { return f32_to_bf16(scale * uniform_pm1(seed, i)); });
  return b;
}
inline DeviceBuffer<float> random_f32(int64_t n, uint64_t seed, float scale) {
  DeviceBuffer<float> b(static_cast<size_t>(n));
  fill(b.data(), n, [&](int64_t i) { return scale * uniform_pm1(seed, i); });
  return b;
}
inline DeviceBuffer<float> constant_f32(int64_t n, float v) {
  DeviceBuffer<float> b(static_cast<size_t>(n));
  fill(b.data(), n, [&](int64_t) { return v; });
  return b;
}

// A CUDA event, destroyed with its owner.
struct Event {
  cudaEvent_t e = nullptr;
  Event() { QLORA_CUDA_CHECK(cudaEventCreate(&e)); }
  ~Event() { (void)cudaEventDestroy(e); }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
};

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t k = v.size() / 2;
  return v.size() % 2 == 1 ? v[k] : 0.5 * (v[k - 1] + v[k]);
}

}  // namespace qlora::bench
