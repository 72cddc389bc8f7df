// Random base weights for a Llama-family config, made on the spot with no
// files: for benchmarks on 8B/70B shapes (bench/bench_cuda_train) and for
// tests that need a model of a given shape.
//
// Same arena layout as load_llama_weights (base_weight_arena_bytes gives its
// size) and the same WeightLoadOptions. Block linears 4-bit: codes uniform
// random bytes; block scales spread +-15% around the median absmax of
// `block` N(0, init_std) values (2.55 init_std at block 64), double-quantized
// with quant/blockwise's double_quantize when opt.double_quant, so absmax is
// the decoded form exactly as the loader keeps it. Uniform codes are wider
// than a real Gaussian block's: the dequantized weights have std ~1.3
// init_std at block 64 (NF4 values have rms 0.517). Dense block linears
// (quantize = false), embeddings and lm_head N(0, init_std) (lm_head = embed
// when tied); norms 1; biases 0.
//
// Deterministic: each chunk of 1M values draws from splitmix64 seeded by
// (seed, tensor index, chunk index), so the bytes never depend on the thread
// count; codes and scales use integer and basic fp64 arithmetic only (the
// same on every platform); the Gaussian tensors call log and sqrt (libm's
// log may differ in the last bit across platforms). Filled on all hardware
// threads: a 70B shape is ~48 GB (34 GB of codes, fp32 embeddings).
#pragma once

#include <cstdint>

#include "io/hf_config.h"
#include "model/weights.h"

namespace qlora {

LlamaWeights random_llama_weights(const ModelConfig& cfg, const WeightLoadOptions& opt, uint64_t seed,
                                  float init_std = 0.02f);

}  // namespace qlora
