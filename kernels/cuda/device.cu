#include "kernels/cuda/device.h"

#include "core/error.h"

namespace qlora {

namespace {

// Does nothing; asking the runtime for its attributes tells whether this
// binary holds code (SASS or PTX) that the device can run.
__global__ void probe_kernel() {}

}  // namespace

void cuda_check(cudaError_t err, const char* expr, const char* file, int line) {
  if (err == cudaSuccess) return;
  fail(file, ":", line, ": ", expr, " failed: ", cudaGetErrorString(err), " (", cudaGetErrorName(err), ")");
}

void* cuda_malloc(size_t bytes) {
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, bytes);
  if (err == cudaSuccess) return p;
  if (err != cudaErrorMemoryAllocation) cuda_check(err, "cudaMalloc", __FILE__, __LINE__);
  (void)cudaGetLastError();  // an allocation failure is not sticky: clear it for the caller's cleanup
  size_t free_bytes = 0, total_bytes = 0;
  (void)cudaMemGetInfo(&free_bytes, &total_bytes);
  const auto mib = [](size_t b) { return (b + (size_t(1) << 20) - 1) >> 20; };
  fail("out of GPU memory: could not allocate ", mib(bytes), " MiB (", mib(free_bytes), " MiB free of ",
       mib(total_bytes),
       " MiB). `qlora estimate RECIPE --gpu SIZE` forecasts what a recipe needs; lower train.micro_batch or "
       "data.seq_len, keep train.checkpointing on, use train.optimizer: paged_adamw, or free the GPU of "
       "other processes");
}

void cuda_buffer_overflow(const char* what, size_t n, size_t size) {
  fail("DeviceBuffer ", what, " of ", n, " elements exceeds its size of ", size, " elements");
}

std::optional<std::string> cuda_unavailable_reason() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaErrorInsufficientDriver) {
    (void)cudaGetLastError();
    int driver = 0, runtime = 0;
    (void)cudaDriverGetVersion(&driver);
    (void)cudaRuntimeGetVersion(&runtime);
    // Version 0: no driver at all (a machine without an NVIDIA GPU).
    if (driver == 0) return std::string("no CUDA device found (no NVIDIA driver is installed)");
    return str("the NVIDIA driver is too old: it supports CUDA ", driver / 1000, ".", driver % 1000 / 10,
               ", this build needs CUDA ", runtime / 1000, ".", runtime % 1000 / 10, "; update the driver");
  }
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear the (non-sticky) error for later calls
    return str("no CUDA device found (cudaGetDeviceCount: ", cudaGetErrorString(err), ")");
  }
  if (count <= 0) return std::string("no CUDA device found (cudaGetDeviceCount: 0 devices)");

  int device = 0;
  if (const cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) {
    (void)cudaGetLastError();
    return str("CUDA device unusable (cudaGetDevice: ", cudaGetErrorString(e), ")");
  }
  cudaDeviceProp prop{};
  if (const cudaError_t e = cudaGetDeviceProperties(&prop, device); e != cudaSuccess) {
    (void)cudaGetLastError();
    return str("CUDA device ", device, " unusable (cudaGetDeviceProperties: ", cudaGetErrorString(e), ")");
  }
  // bf16 tensor cores (mma.sync m16n8k16 bf16) start with Ampere.
  if (prop.major < 8)
    return str("CUDA device ", device, " (", prop.name, ", compute capability ", prop.major, ".", prop.minor,
               ") is too old: qlora needs compute capability 8.0 or newer (Ampere, Ada, Hopper)");
  // Creates the context and looks for an image of our kernels for this
  // architecture (the build targets QLORA_CUDA_ARCHS, 8.0+ by default).
  cudaFuncAttributes attr{};
  if (const cudaError_t e = cudaFuncGetAttributes(&attr, probe_kernel); e != cudaSuccess) {
    (void)cudaGetLastError();
    return str("CUDA device ", device, " (", prop.name, ", compute capability ", prop.major, ".", prop.minor,
               ") cannot run qlora's kernels: ", cudaGetErrorString(e));
  }
  return std::nullopt;
}

CudaDeviceInfo cuda_device_info(int device) {
  int count = 0;
  QLORA_CUDA_CHECK(cudaGetDeviceCount(&count));
  if (device < 0 || device >= count)
    fail("CUDA device ", device, " does not exist (", count, " device", count == 1 ? "" : "s", " found)");

  cudaDeviceProp prop{};
  QLORA_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  CudaDeviceInfo info;
  info.name = prop.name;
  info.cc_major = prop.major;
  info.cc_minor = prop.minor;
  info.sm_count = prop.multiProcessorCount;
  info.total_bytes = prop.totalGlobalMem;

  // cudaMemGetInfo reports on the current device: switch to `device` and back.
  int previous = 0;
  QLORA_CUDA_CHECK(cudaGetDevice(&previous));
  if (previous != device) QLORA_CUDA_CHECK(cudaSetDevice(device));
  size_t free_bytes = 0, total_bytes = 0;
  const cudaError_t err = cudaMemGetInfo(&free_bytes, &total_bytes);
  if (previous != device) QLORA_CUDA_CHECK(cudaSetDevice(previous));
  cuda_check(err, "cudaMemGetInfo(&free_bytes, &total_bytes)", __FILE__, __LINE__);
  info.free_bytes = free_bytes;
  return info;
}

}  // namespace qlora
