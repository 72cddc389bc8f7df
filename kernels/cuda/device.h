// The CUDA runtime seen from the host: is a device usable, what is it, error
// checking that throws qlora::Error, and an owning device buffer.
//
// Host-only on purpose: this header is included by g++-compiled C++20 files
// (under `#if QLORA_HAVE_CUDA`) as well as by nvcc-compiled .cu files, so it
// holds no device code and no CUDA language extensions; it only needs the
// runtime API declarations of <cuda_runtime.h>.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>

namespace qlora {

// nullopt when the current device can run qlora's kernels (a device exists, a
// context can be created and the binary holds code for its architecture);
// otherwise a message saying why not, e.g.
// "no CUDA device found (cudaGetDeviceCount: no CUDA-capable device is detected)".
std::optional<std::string> cuda_unavailable_reason();

struct CudaDeviceInfo {
  std::string name;
  int cc_major = 0;
  int cc_minor = 0;
  size_t total_bytes = 0;
  size_t free_bytes = 0;
  int sm_count = 0;
};
// Properties and current free memory of one device; throws qlora::Error for a
// device index that does not exist.
CudaDeviceInfo cuda_device_info(int device = 0);

// Throws qlora::Error("<file>:<line>: <expr> failed: <cudaGetErrorString> (<name>)")
// unless err == cudaSuccess.
void cuda_check(cudaError_t err, const char* expr, const char* file, int line);

}  // namespace qlora

// QLORA_CUDA_CHECK(cudaMemcpy(...)); throws qlora::Error naming the call.
#define QLORA_CUDA_CHECK(call) ::qlora::cuda_check((call), #call, __FILE__, __LINE__)

namespace qlora {

// cudaMalloc of `bytes`. Out of memory throws qlora::Error saying how much was
// asked, how much the device has free, and what in a recipe lowers the need,
// instead of the runtime's bare code; other errors as QLORA_CUDA_CHECK.
void* cuda_malloc(size_t bytes);

// n elements of T in device memory (plain cudaMalloc, never managed memory),
// freed when the buffer dies. Move-only. The copies are fully synchronous,
// whatever stream the data is used on: CudaContext's streams are non-blocking,
// so they neither wait for the legacy stream that cudaMemcpy uses nor are
// waited for by it, and a pageable host-to-device cudaMemcpy may return before
// its DMA has landed. upload returns when the data is on the device; download
// first waits for all work queued on the device, so it sees every result.
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) {
    if (n == 0) return;
    data_ = static_cast<T*>(cuda_malloc(n * sizeof(T)));
    size_ = n;
  }
  ~DeviceBuffer() { reset(); }

  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      reset();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }

  T* data() { return data_; }
  const T* data() const { return data_; }
  size_t size() const { return size_; }
  size_t bytes() const { return size_ * sizeof(T); }

  // Copies n elements from host memory into the first n elements; they are
  // on the device when it returns.
  void upload(const T* host, size_t n) {
    check_count(n, "upload");
    if (n == 0) return;
    QLORA_CUDA_CHECK(cudaMemcpy(data_, host, n * sizeof(T), cudaMemcpyHostToDevice));
    QLORA_CUDA_CHECK(cudaStreamSynchronize(cudaStreamLegacy));
  }
  // Copies the first n elements into host memory, after all queued work.
  void download(T* host, size_t n) const {
    check_count(n, "download");
    if (n == 0) return;
    QLORA_CUDA_CHECK(cudaDeviceSynchronize());
    QLORA_CUDA_CHECK(cudaMemcpy(host, data_, n * sizeof(T), cudaMemcpyDeviceToHost));
  }

  // Frees the memory now (errors are ignored: this also runs in destructors).
  void reset() noexcept {
    if (data_ != nullptr) (void)cudaFree(data_);
    data_ = nullptr;
    size_ = 0;
  }

 private:
  void check_count(size_t n, const char* what) const;

  T* data_ = nullptr;
  size_t size_ = 0;
};

// Out of line so that the header needs no <sstream>: the messages are built in device.cu.
[[noreturn]] void cuda_buffer_overflow(const char* what, size_t n, size_t size);

template <typename T>
void DeviceBuffer<T>::check_count(size_t n, const char* what) const {
  if (n > size_) cuda_buffer_overflow(what, n, size_);
}

}  // namespace qlora
