// The bitsandbytes 4-bit checkpoint layout (what transformers writes for a
// model loaded with BitsAndBytesConfig(load_in_4bit=True) and saved, e.g. the
// "*-bnb-4bit" models on the hub). One quantized Linear weight W becomes:
//
//   W                                   U8  [(n+1)/2, 1]  packed codes (high nibble first)
//   W.absmax                            U8  [blocks]      double quant: 8-bit codes of absmax - offset
//                                       F32 [blocks]      otherwise: the absmax itself
//   W.quant_map                         F32 [16]          the 4-bit code book
//   W.nested_absmax                     F32 [ceil(blocks/256)]   double quant only
//   W.nested_quant_map                  F32 [256]                double quant only
//   W.quant_state.bitsandbytes__nf4     U8  [len]         json.dumps of {quant_type, blocksize,
//                                                           dtype, shape, nested_blocksize,
//                                                           nested_dtype, nested_offset}
//   (bitsandbytes' QuantState.as_dict(packed=True) and utils.pack_dict_to_tensor)
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/dtype.h"
#include "io/safetensors.h"
#include "quant/blockwise.h"

namespace qlora {

struct BnbNames {
  std::string weight, absmax, quant_map, nested_absmax, nested_quant_map, quant_state;
};
BnbNames bnb_names(const std::string& weight_name, Quant4Type t);

// The packed JSON quant state, byte for byte as Python's json.dumps writes it.
// `dtype` is the dtype the weight had (and dequantizes back to).
std::string bnb_quant_state_json(const Quant4Tensor& q, DType dtype);

// The tensors one quantized weight becomes, in the order listed above.
std::vector<OwnedTensor> bnb_tensors(const std::string& weight_name, const Quant4Tensor& q, DType dtype);
// Their specs, all but the quant_state one (whose length depends on the
// offset's digits), computable before quantizing: for planning a file.
std::vector<TensorSpec> bnb_tensor_specs_before_state(const std::string& weight_name, const Shape& shape,
                                                      Quant4Type t, int64_t block, bool double_quant);

// Python's repr() of a float (shortest round-trip digits, exponent form
// below 1e-4 and from 1e16 on), as json.dumps writes floats.
std::string python_float_repr(double v);

struct BnbQuantState {
  Quant4Type type = Quant4Type::NF4;
  int64_t block = kDefaultBlock4;
  DType dtype = DType::BF16;
  Shape shape;
  bool nested = false;
  int64_t nested_block = kNestedBlock;
  float nested_offset = 0.0f;
};
// Parses the packed JSON; `where` names the tensor in errors.
BnbQuantState parse_bnb_quant_state(std::span<const uint8_t> json, const std::string& where);

// Names of the weights in a model stored in this layout (those with a
// "<name>.quant_state.bitsandbytes__nf4|fp4" companion), sorted.
std::vector<std::string> bnb_quantized_weights(const SafetensorsModel& m);
// True for a companion tensor (W.absmax, W.quant_map, ...) of a quantized W.
bool is_bnb_companion(std::string_view name);

// Checks one quantized weight without copying it: the quant state parses, and
// every companion is present with the dtype and size the state implies; the
// code book is the standard one. Errors name the file and tensor.
BnbQuantState check_bnb_weight(const SafetensorsModel& m, const std::string& weight_name);
// check_bnb_weight, then copies codes and scales out of the files.
Quant4Tensor load_bnb_weight(const SafetensorsModel& m, const std::string& weight_name, DType* dtype = nullptr);

// torch dtype names as bitsandbytes writes them ("bfloat16", "float16", "float32").
std::string_view torch_dtype_name(DType t);
DType dtype_from_torch_name(std::string_view s, const std::string& where);

}  // namespace qlora
