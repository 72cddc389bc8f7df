// The figures of the CUDA plan that are not sizes of our own buffers. The
// first group must be MEASURED on a GPU and is to be calibrated on a device
// (procedure: docs/memory.md, "Calibration"; results go to docs/benchmarks.md);
// until then they are conservative guesses. The second group are assumptions
// about the kernels the GPU backend will have (DESIGN.md); change them with
// those kernels. Nothing else in src/plan hard-codes a CUDA figure.
#pragma once

#include <cstdint>

namespace qlora::plan_cuda {

inline constexpr uint64_t kMiB = uint64_t(1) << 20;

// ---- To be calibrated on a device ----
// CUDA context + our modules + cuBLAS handle, as nvidia-smi sees it before the
// first allocation (CUDA 12 lazy loading; typically 300-600 MiB on Ampere and
// Hopper).
inline constexpr uint64_t kContextBytes = 600 * kMiB;
// The caching allocator's reserve and fragmentation on top of the buffers: a
// share of the planned device bytes plus a floor. Arenas are allocated once,
// so this stays small.
inline constexpr double kAllocatorReserveFraction = 0.02;
inline constexpr uint64_t kAllocatorReserveMinBytes = 128 * kMiB;

// ---- Assumptions of the planned kernels ----
// Fused NF4 GEMM: each SM dequantizes one bf16 weight tile in shared memory
// and a global staging tile of kDequantTileBytes; kAssumedSms is the largest
// SM count among the supported cards (H100/H200 SXM: 132).
inline constexpr uint64_t kAssumedSms = 132;
inline constexpr uint64_t kDequantTileBytes = 128 * 256 * 2;  // 128 x 256 bf16
// cuBLAS workspace (NVIDIA's recommendation for Hopper; 4 MiB suffices before).
inline constexpr uint64_t kCublasWorkspaceBytes = 32 * kMiB;
// Vocabulary columns of one fp32 logits tile of the chunked cross entropy.
inline constexpr int64_t kCeVocabChunk = 8192;
// Values per chunk of the streaming quantizer's pinned staging (as quantize_model).
inline constexpr uint64_t kQuantStreamValues = uint64_t(16) << 20;

// ---- Shared with the GPU code (one definition for the plan and the allocation) ----
// The paged optimizer (kernels/cuda/paged_state.h, PagedAdamState) moves AdamW's
// m and v between pinned host memory and the device in pages of this many
// parameters (4 MiB of m and 4 MiB of v per page).
inline constexpr int64_t kPagedOptimizerPageParams = int64_t(1) << 20;
// Its device bytes for `params` parameters: two page slots (double buffering:
// one page updates while the next copies in), each holding m and v, fp32, of
// min(page, params) parameters. PagedAdamState::device_bytes() equals this.
inline constexpr uint64_t paged_optimizer_device_bytes(int64_t params,
                                                       int64_t page_params = kPagedOptimizerPageParams) {
  const int64_t slot = params < page_params ? params : page_params;
  return slot <= 0 ? 0 : 2 * 2 * uint64_t(slot) * sizeof(float);
}
// DoRA's weight norm on the GPU (kernels/cuda/dora_cuda.h) builds W + s B A
// in fp32 panels of this many rows (the model's panel: kDoraPanelRows x
// max(C, I, H x D) floats). More rows than the CPU's 64 (ops::kDoraPanelRows):
// each panel costs three launches, and a 70B layer has 84K rows; 256 rows of
// the widest 70B input (28672) are 28 MiB. Not measured yet.
inline constexpr int64_t kDoraPanelRows = 256;

}  // namespace qlora::plan_cuda
