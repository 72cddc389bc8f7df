// The state every CUDA op runs against, owned by one object (no globals):
// the device, the compute stream, a side stream for host<->device paging, the
// cuBLAS handle with its workspace, and an op workspace. Plus the one GEMM
// entry point (row-major, bf16 inputs, fp32 accumulation) that the linear,
// LoRA and loss ops share.
//
// Host-only header: compiles with g++ (C++20) and nvcc (C++17).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/device.h"

namespace qlora {

// Throws qlora::Error("<file>:<line>: <expr> failed: <cublas status string>").
void cublas_check(cublasStatus_t status, const char* expr, const char* file, int line);

}  // namespace qlora

#define QLORA_CUBLAS_CHECK(call) ::qlora::cublas_check((call), #call, __FILE__, __LINE__)

namespace qlora {

class CudaContext {
 public:
  // Selects `device`, creates the streams and the cuBLAS handle (its
  // workspace: cublas_workspace_bytes, see plan/cuda_constants.h). Throws
  // qlora::Error with cuda_unavailable_reason() when the device cannot run
  // qlora's kernels.
  explicit CudaContext(int device = 0, size_t cublas_workspace_bytes = size_t(32) << 20);
  ~CudaContext();
  CudaContext(const CudaContext&) = delete;
  CudaContext& operator=(const CudaContext&) = delete;

  int device() const { return device_; }
  const CudaDeviceInfo& info() const { return info_; }
  // Compute capability as 10*major + minor (80, 86, 89, 90, ...).
  int arch() const { return info_.cc_major * 10 + info_.cc_minor; }
  cudaStream_t stream() const { return stream_; }
  // Copies that overlap compute (the paged optimizer's page-ins and -outs).
  cudaStream_t copy_stream() const { return copy_stream_; }
  cublasHandle_t cublas() const { return cublas_; }

  // Device scratch of at least `bytes`, valid until the next call that asks
  // for more (ops ask at setup for their largest need, so a training step
  // never allocates). Work queued on stream() may still use the old buffer
  // when it grows: growing synchronizes the stream first.
  void* workspace(size_t bytes);
  size_t workspace_bytes() const { return workspace_.bytes(); }

  // Waits for everything queued on both streams; throws on an execution error.
  void synchronize();

 private:
  int device_ = 0;
  CudaDeviceInfo info_;
  cudaStream_t stream_ = nullptr;
  cudaStream_t copy_stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  DeviceBuffer<uint8_t> cublas_workspace_;
  DeviceBuffer<uint8_t> workspace_;
};

namespace cuda_ops {

enum class Trans : uint8_t { N, T };
enum class GemmOut : uint8_t { BF16, F32 };

// Row-major C (M,Nc) = alpha * op(A) (M,K) * op(B) (K,Nc) + beta * C, on
// ctx.stream(). A is stored (M,K) when ta == N, (K,M) when ta == T, with row
// stride lda (B likewise); A and B are bf16 bits, C is bf16 or fp32 (`c_type`)
// with row stride ldc. fp32 accumulation (CUBLAS_COMPUTE_32F); beta = 1 with a
// bf16 C reads, adds and rounds once. `op` names the caller in errors.
void gemm(CudaContext& ctx, Trans ta, Trans tb, int64_t M, int64_t Nc, int64_t K, float alpha, const uint16_t* A,
          int64_t lda, const uint16_t* B, int64_t ldb, float beta, void* C, GemmOut c_type, int64_t ldc,
          const char* op);

}  // namespace cuda_ops
}  // namespace qlora
