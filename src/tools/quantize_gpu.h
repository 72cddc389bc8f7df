// The chunk loop of `qlora quantize` (src/tools/quantize_model.cpp) with the
// 4-bit quantization on the GPU: input values -> packed codes + fp32 absmax,
// byte for byte what the CPU loop produces, at the speed of the disk and PCIe.
//
// Why the bytes are the CPU's: the chunks are the same (a multiple of every
// block size, so no quantization block straddles two chunks and every absmax
// covers the same values); the values are the same fp32 numbers (BF16 goes up
// as BF16 and is widened exactly on the device, F32 goes up as is, F16 is
// widened on the host by the CPU path's own function); and the kernels of
// kernels/cuda/quant4.h equal quantize4 bit for bit. Double quantization of
// the absmax (1/64 of the data) stays on the CPU, in quantize_model.
//
// Pipeline: two slots, each a pinned host staging buffer and its device
// twins. While the device uploads, quantizes and downloads chunk i (upload on
// the copy stream, kernel + download on the compute stream), the host fills
// the other slot with chunk i+1 from the mapped input and writes out the codes
// of chunk i-1.
//
// Plain C++ header (no CUDA types): quantize_gpu.cpp holds the pipeline when
// the build has the CUDA backend (QLORA_HAVE_CUDA) and stubs that refuse
// otherwise, so callers need no #if.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "core/dtype.h"
#include "plan/cuda_constants.h"
#include "quant/codebook.h"

namespace qlora {

class SafetensorsFile;

// Values per chunk (as the CPU loop: 16M, 64 MiB of fp32 staging per slot).
inline constexpr int64_t kGpuQuantizeChunk = int64_t(plan_cuda::kQuantStreamValues);

// nullopt when quantization can run on the GPU; otherwise why not: "this build
// has no CUDA backend", or cuda_unavailable_reason()'s message ("no CUDA
// device found (...)").
std::optional<std::string> gpu_quantize_unavailable_reason();

// One tensor to quantize: n values of `dtype` (F32, F16 or BF16) in `bytes`.
struct GpuQuantizeSource {
  std::span<const uint8_t> bytes;
  DType dtype = DType::F32;
  int64_t n = 0;
  const SafetensorsFile* file = nullptr;  // holds `bytes`: its pages are released as consumed; may be null
};

class GpuQuantizer {
 public:
  // Opens device 0 and allocates the two slots for chunks of `chunk_values`
  // values (a positive multiple of `block`), sized for tensors of at most
  // `max_tensor_values` values: staging = min(chunk, max) values per slot.
  // Throws qlora::Error when the GPU is unusable, memory is short, or (always)
  // in a build without CUDA.
  GpuQuantizer(Quant4Type type, int64_t block, int64_t max_tensor_values,
               int64_t chunk_values = kGpuQuantizeChunk);
  ~GpuQuantizer();
  GpuQuantizer(const GpuQuantizer&) = delete;
  GpuQuantizer& operator=(const GpuQuantizer&) = delete;

  // "NVIDIA H200 (GPU 0)".
  const std::string& device_name() const { return device_name_; }

  // Called once per chunk, in order: the chunk's packed codes
  // (quant4_code_bytes(len) bytes, valid during the call only) and the input
  // bytes the chunk consumed (for a progress bar).
  using CodesSink = std::function<void(std::span<const uint8_t> codes, uint64_t input_bytes)>;

  // Quantizes src (n <= max_tensor_values) and returns when every chunk has
  // been handed to `sink`; absmax: quant4_num_blocks(n, block) floats, filled.
  // The concatenated codes and the absmax equal quantize4 of the fp32 values.
  void quantize(const GpuQuantizeSource& src, float* absmax, const CodesSink& sink);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string device_name_;
};

}  // namespace qlora
