// Blockwise 4-bit (NF4/FP4) quantization on the GPU, bit for bit equal to the
// CPU reference of quant/blockwise.h (quantize4_ref, dequantize4_ref,
// double_dequantize); the format is described there.
//
// Three layers, as flash-attention arranges its kernels:
//   1. the functions below validate their arguments on the host (throwing
//      qlora::Error) and fill a params struct;
//   2. a launcher (launch_*) picks the grid and the kernel instantiation;
//   3. the kernel (quant4.cu) does the work.
// Everything is asynchronous on the given stream: pointers are device
// pointers and must stay valid until the stream has run the work; a kernel
// launch error is reported (qlora::Error) before the function returns, an
// execution error by the next synchronizing CUDA call.
//
// Host-only header: compiles with g++ (C++20) and nvcc (C++17).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "quant/codebook.h"

namespace qlora {

// ---- 1. validated entry points ----------------------------------------------

// d_codes: quant4_code_bytes(n) = (n+1)/2 bytes; d_absmax: ceil(n/block) floats.
// block: a power of two from 32 to 4096. Same results as quantize4_ref.
void cuda_quantize4(const float* d_x, int64_t n, int64_t block, Quant4Type t, uint8_t* d_codes, float* d_absmax,
                    cudaStream_t s);
// bf16 input (raw bits); each value is widened exactly (bits << 16) to fp32
// first, so the result equals quantize4_ref of the widened values.
void cuda_quantize4(const uint16_t* d_x_bf16, int64_t n, int64_t block, Quant4Type t, uint8_t* d_codes,
                    float* d_absmax, cudaStream_t s);

// d_out[i] = code value * d_absmax[i / block] in fp32 (as dequantize4_ref).
void cuda_dequantize4(const uint8_t* d_codes, const float* d_absmax, int64_t n, int64_t block, Quant4Type t,
                      float* d_out, cudaStream_t s);
// The same fp32 value rounded to bf16 bits (nearest even; NaN stays a quiet
// NaN), as f32_to_bf16 of src/core/dtype.h rounds it.
void cuda_dequantize4(const uint8_t* d_codes, const float* d_absmax, int64_t n, int64_t block, Quant4Type t,
                      uint16_t* d_out_bf16, cudaStream_t s);

// Undoes double quantization of the absmax vector (see NestedAbsmax):
// d_absmax_out[i] = d_code8[d_codes8[i]] * d_nested_absmax[i / nested_block] + offset,
// rounded after the multiply and after the add (as double_dequantize).
// d_code8: the 256-entry code book (dynamic_map_signed()).
void cuda_double_dequantize(const uint8_t* d_codes8, const float* d_nested_absmax, const float* d_code8,
                            float offset, int64_t nblocks, int64_t nested_block, float* d_absmax_out,
                            cudaStream_t s);

// ---- 2. params and launchers (no validation: callers use layer 1) ----------

enum class CudaFloat : uint8_t { F32, BF16 };

struct Quantize4Params {
  const void* x = nullptr;          // n values of x_type
  CudaFloat x_type = CudaFloat::F32;
  bool x_pairs_aligned = false;     // x may be read two elements at a time
  int64_t n = 0;
  int block = 0;                    // 32..4096, power of two
  int64_t nblocks = 0;              // ceil(n / block)
  Quant4Type type = Quant4Type::NF4;
  uint8_t* codes = nullptr;         // (n+1)/2 bytes
  float* absmax = nullptr;          // nblocks floats
};

struct Dequantize4Params {
  const uint8_t* codes = nullptr;   // (n+1)/2 bytes
  const float* absmax = nullptr;    // ceil(n / block) floats
  int64_t n = 0;
  int block_log2 = 0;               // block = 1 << block_log2
  Quant4Type type = Quant4Type::NF4;
  void* out = nullptr;              // n values of out_type
  CudaFloat out_type = CudaFloat::F32;
  bool out_pairs_aligned = false;   // out may be written two elements at a time
};

struct DoubleDequantizeParams {
  const uint8_t* codes8 = nullptr;        // nblocks bytes
  const float* nested_absmax = nullptr;   // ceil(nblocks / nested_block) floats
  const float* code8 = nullptr;           // 256 floats
  float offset = 0.0f;
  int64_t nblocks = 0;
  int64_t nested_block = 0;
  float* absmax_out = nullptr;            // nblocks floats
};

// Each launches nothing when there is no element.
void launch_quantize4(const Quantize4Params& p, cudaStream_t s);
void launch_dequantize4(const Dequantize4Params& p, cudaStream_t s);
void launch_double_dequantize(const DoubleDequantizeParams& p, cudaStream_t s);

}  // namespace qlora
