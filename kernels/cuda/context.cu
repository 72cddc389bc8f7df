#include "kernels/cuda/context.h"

#include <algorithm>
#include <climits>

#include "core/error.h"

namespace qlora {

void cublas_check(cublasStatus_t status, const char* expr, const char* file, int line) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  fail(file, ":", line, ": ", expr, " failed: ", cublasGetStatusString(status), " (cuBLAS status ", int(status),
       ")");
}

CudaContext::CudaContext(int device, size_t cublas_workspace_bytes) : device_(device) {
  QLORA_CUDA_CHECK(cudaSetDevice(device));
  if (const auto why = cuda_unavailable_reason()) fail("cannot use the GPU: ", *why);
  info_ = cuda_device_info(device);
  QLORA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  QLORA_CUDA_CHECK(cudaStreamCreateWithFlags(&copy_stream_, cudaStreamNonBlocking));
  QLORA_CUBLAS_CHECK(cublasCreate(&cublas_));
  QLORA_CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
  cublas_workspace_ = DeviceBuffer<uint8_t>(cublas_workspace_bytes);
  if (cublas_workspace_bytes > 0)
    QLORA_CUBLAS_CHECK(cublasSetWorkspace(cublas_, cublas_workspace_.data(), cublas_workspace_bytes));
}

CudaContext::~CudaContext() {
  // Errors are ignored: a destructor must not throw, and a failed step has
  // already reported its error.
  if (stream_ != nullptr) (void)cudaStreamSynchronize(stream_);
  if (copy_stream_ != nullptr) (void)cudaStreamSynchronize(copy_stream_);
  if (cublas_ != nullptr) (void)cublasDestroy(cublas_);
  if (copy_stream_ != nullptr) (void)cudaStreamDestroy(copy_stream_);
  if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
}

void* CudaContext::workspace(size_t bytes) {
  if (bytes > workspace_.bytes()) {
    QLORA_CUDA_CHECK(cudaStreamSynchronize(stream_));
    workspace_ = DeviceBuffer<uint8_t>(bytes);
  }
  return workspace_.data();
}

void CudaContext::synchronize() {
  QLORA_CUDA_CHECK(cudaStreamSynchronize(copy_stream_));
  QLORA_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

namespace cuda_ops {

namespace {

int as_int(const char* op, const char* name, int64_t v) {
  if (v < 0 || v > INT_MAX) fail(op, ": GEMM dimension ", name, " = ", v, " is outside [0, ", INT_MAX, "]");
  return int(v);
}

cublasOperation_t op_of(Trans t) { return t == Trans::N ? CUBLAS_OP_N : CUBLAS_OP_T; }

}  // namespace

void gemm(CudaContext& ctx, Trans ta, Trans tb, int64_t M, int64_t Nc, int64_t K, float alpha, const uint16_t* A,
          int64_t lda, const uint16_t* B, int64_t ldb, float beta, void* C, GemmOut c_type, int64_t ldc,
          const char* op) {
  const int m = as_int(op, "M", M), n = as_int(op, "N", Nc), k = as_int(op, "K", K);
  if (m == 0 || n == 0) return;
  // Row stride must cover a row of each stored matrix.
  const int64_t a_cols = ta == Trans::N ? K : M, b_cols = tb == Trans::N ? Nc : K;
  if (lda < std::max<int64_t>(a_cols, 1) || ldb < std::max<int64_t>(b_cols, 1) || ldc < std::max<int64_t>(Nc, 1))
    fail(op, ": GEMM row strides (", lda, ", ", ldb, ", ", ldc, ") shorter than the rows (", a_cols, ", ", b_cols,
         ", ", Nc, ")");
  if ((K > 0 && (A == nullptr || B == nullptr)) || C == nullptr) fail(op, ": GEMM operand is null");
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: cuBLAS
  // sees B first, with the same transposition flags.
  const cudaDataType_t ct = c_type == GemmOut::BF16 ? CUDA_R_16BF : CUDA_R_32F;
  const cublasStatus_t st =
      cublasGemmEx(ctx.cublas(), op_of(tb), op_of(ta), n, m, k, &alpha, B, CUDA_R_16BF, as_int(op, "ldb", ldb), A,
                   CUDA_R_16BF, as_int(op, "lda", lda), &beta, C, ct, as_int(op, "ldc", ldc), CUBLAS_COMPUTE_32F,
                   CUBLAS_GEMM_DEFAULT);
  if (st != CUBLAS_STATUS_SUCCESS)
    fail(op, ": cublasGemmEx (", M, "x", Nc, "x", K, ") failed: ", cublasGetStatusString(st));
}

}  // namespace cuda_ops
}  // namespace qlora
