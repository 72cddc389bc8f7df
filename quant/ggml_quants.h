// Dequantization of llama.cpp (ggml) tensor types to fp32, bit for bit as
// ggml's dequantize_row_* functions compute it (the float operations in
// ggml-quants.c's order: fp16 fields converted to fp32 first, per-sub-block
// products d*scale and dmin*min rounded to fp32, then one multiply and one
// subtract per value; never an FMA: this library builds with
// -ffp-contract=off). Layouts: quant/ggml_quants_blocks.h. The golden
// reference is gguf-py (tests/reference/make_ggml_golden.py).
//
// n = number of values, a whole number of blocks of the type; src holds
// ggml_nbytes(t, n) bytes, dst n floats.
#pragma once

#include <cstdint>
#include <string>

#include "quant/ggml_types.h"

namespace qlora {

// True for F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.
bool ggml_can_dequantize(GgmlType t);
// "F32, F16, BF16, Q8_0, ...": the types above, for error messages.
std::string ggml_dequantizable_names();

// Scalar reference, one block at a time in ggml's loop order. Throws
// qlora::Error naming the type (and the supported list) for any other type,
// and for an n that is not a whole number of blocks; callers add the tensor
// and file names.
void ggml_dequantize_ref(GgmlType t, const uint8_t* src, int64_t n, float* dst);
// The same result bit for bit; blocks split over OpenMP threads.
void ggml_dequantize(GgmlType t, const uint8_t* src, int64_t n, float* dst);

// ggml's quantize_row_q8_0_ref: per block of 32, d = amax / 127 (fp32, stored
// as fp16 rounded to nearest even), q = roundf(x * (1/d)) (halves away from
// zero), all-zero blocks give d = 0 and q = 0. n: a multiple of 32; dst:
// ggml_nbytes(Q8_0, n) bytes. NaN inputs are not meaningful (as in ggml).
void ggml_quantize_q8_0(const float* src, int64_t n, uint8_t* dst);

}  // namespace qlora
