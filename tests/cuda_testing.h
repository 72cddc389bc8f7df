// QLORA_REQUIRE_GPU(): skips a CUDA test with the reason when this build has
// no CUDA backend or the machine has no usable GPU (the CUDA parity suites).
#pragma once

#include <gtest/gtest.h>

#if QLORA_HAVE_CUDA
#include <cstdint>
#include <vector>

#include "core/dtype.h"
#include "kernels/cuda/device.h"
#define QLORA_REQUIRE_GPU()                                           \
  do {                                                                \
    if (const auto qlora_no_gpu = ::qlora::cuda_unavailable_reason()) \
      GTEST_SKIP() << "no GPU: " << *qlora_no_gpu;                    \
  } while (0)
#else
#define QLORA_REQUIRE_GPU() GTEST_SKIP() << "built without CUDA (nvcc not found at configure time)"
#endif

#if QLORA_HAVE_CUDA
// Host <-> device for the parity suites. DeviceBuffer's copies are fully
// synchronous (kernels/cuda/device.h): an upload has landed before any stream
// reads it, a download sees all queued work.
namespace qlora::testing {

// bf16 bits of x, rounded to nearest even (the CPU's f32_to_bf16).
inline std::vector<uint16_t> to_bits(const std::vector<float>& x) {
  std::vector<uint16_t> h(x.size());
  for (size_t i = 0; i < x.size(); ++i) h[i] = f32_to_bf16(x[i]);
  return h;
}

template <typename T>
DeviceBuffer<T> upload(const std::vector<T>& h) {
  DeviceBuffer<T> d(h.size());
  d.upload(h.data(), h.size());
  return d;
}

template <typename T>
std::vector<T> download(const DeviceBuffer<T>& d) {
  std::vector<T> h(d.size());
  d.download(h.data(), h.size());
  return h;
}

// bf16 bits from the device, widened (exactly) to fp32.
inline std::vector<float> download_bf16(const DeviceBuffer<uint16_t>& d) {
  const std::vector<uint16_t> h = download(d);
  std::vector<float> f(h.size());
  for (size_t i = 0; i < h.size(); ++i) f[i] = bf16_to_f32(h[i]);
  return f;
}

// 0xFF bytes: NaN as bf16, fp32 and fp64, so an element no kernel writes
// fails the comparison. The memset (legacy stream) is complete on return, so
// it cannot land after a kernel on a non-blocking stream has written.
inline void poison_bytes(void* p, size_t bytes) {
  if (bytes == 0) return;
  QLORA_CUDA_CHECK(cudaMemset(p, 0xff, bytes));
  QLORA_CUDA_CHECK(cudaDeviceSynchronize());
}
template <typename T>
void poison(DeviceBuffer<T>& d) {
  poison_bytes(d.data(), d.bytes());
}
template <typename T>
DeviceBuffer<T> poisoned(size_t n) {
  DeviceBuffer<T> d(n);
  poison(d);
  return d;
}

}  // namespace qlora::testing
#endif
