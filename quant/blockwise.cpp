#include "quant/blockwise.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "quant/dynamic_map.h"

namespace qlora {

std::string_view quant4_name(Quant4Type t) { return t == Quant4Type::NF4 ? "nf4" : "fp4"; }

std::optional<Quant4Type> quant4_from_name(std::string_view s) {
  if (s == "nf4") return Quant4Type::NF4;
  if (s == "fp4") return Quant4Type::FP4;
  return std::nullopt;
}

bool valid_block4(int64_t block) {
  return block >= 32 && block <= 4096 && (block & (block - 1)) == 0;
}

namespace {

// max |x| over a block, as bitsandbytes' reduction does it: fmaxf skips NaN.
float block_absmax(const float* x, int64_t len) {
  float m = 0.0f;
  for (int64_t i = 0; i < len; ++i) m = std::fmax(m, std::fabs(x[i]));
  return m;
}

// Quantizes the values [begin, end) of x, where begin is a multiple of block
// (so whole blocks and whole bytes belong to one call).
void quantize4_range(const float* x, int64_t n, int64_t begin, int64_t end, int64_t block, Quant4Type t,
                     uint8_t* codes, float* absmax) {
  for (int64_t b0 = begin; b0 < end; b0 += block) {
    const int64_t len = std::min(block, n - b0);
    const float amax = block_absmax(x + b0, len);
    absmax[b0 / block] = amax;
    const float inv = 1.0f / amax;
    // Pairs never straddle blocks: block sizes are even. The element past the
    // end of an odd n is a zero, as bitsandbytes' padded load makes it.
    for (int64_t i = 0; i < len; i += 2) {
      const float a = x[b0 + i];
      const float b = (i + 1 < len) ? x[b0 + i + 1] : 0.0f;
      codes[(b0 + i) / 2] = quant4_pack(quant4_quantize_scaled(t, a * inv), quant4_quantize_scaled(t, b * inv));
    }
  }
}

void check_block(int64_t block) {
  if (!valid_block4(block))
    fail("4-bit block size ", block, " is not supported (expected a power of two from 32 to 4096)");
}

}  // namespace

void quantize4_ref(const float* x, int64_t n, int64_t block, Quant4Type t, uint8_t* codes, float* absmax) {
  check_block(block);
  quantize4_range(x, n, 0, n, block, t, codes, absmax);
}

// The fast path counts pivots instead of walking the tree: the tree is a
// binary search with strict ">" over sorted pivots, so its code equals the
// number of pivots strictly below x (and NaN, below none, gives 0 as the tree
// does). Counting is branch-free and vectorizes; the tree mispredicts on
// every other value. One block at a time through a small scaled buffer.
namespace {

constexpr int64_t kMaxBlock = 4096;

void quantize4_block_fast(const float* x, int64_t len, Quant4Type t, uint8_t* codes, float* absmax) {
  // (m < a ? a : m) skips NaN exactly as fmaxf does (the accumulator is never
  // NaN), and unlike std::fmax it vectorizes to maxps.
  float amax = 0.0f;
  for (int64_t i = 0; i < len; ++i) {
    const float a = std::fabs(x[i]);
    amax = amax < a ? a : amax;
  }
  *absmax = amax;
  const float inv = 1.0f / amax;
  // int32 counters: a float compare yields a 32-bit lane mask, so counting in
  // 32-bit lanes vectorizes without repacking (measured 1.3x over uint8).
  alignas(64) float s[kMaxBlock + 1];
  alignas(64) int32_t q[kMaxBlock + 1];
  const int64_t padded = len + (len & 1);
  for (int64_t i = 0; i < len; ++i) s[i] = x[i] * inv;
  if (padded != len) s[len] = 0.0f * inv;  // bitsandbytes' zero padding
  if (t == Quant4Type::NF4) {
    for (int64_t i = 0; i < padded; ++i) q[i] = 0;
    for (int p = 0; p < 15; ++p) {
      const float piv = nf4_pivot(p);
      for (int64_t i = 0; i < padded; ++i) q[i] += s[i] > piv ? 1 : 0;
    }
  } else {
    alignas(64) int32_t rank[kMaxBlock + 1];
    for (int64_t i = 0; i < padded; ++i) rank[i] = 0;
    alignas(64) float mag[kMaxBlock + 1];
    for (int64_t i = 0; i < padded; ++i) mag[i] = std::fabs(s[i]);
    for (int p = 0; p < 7; ++p) {
      const float piv = fp4_pivot(p);
      for (int64_t i = 0; i < padded; ++i) rank[i] += mag[i] > piv ? 1 : 0;
    }
    for (int64_t i = 0; i < padded; ++i)
      q[i] = fp4_magnitude_bits(rank[i]) + (s[i] < 0 ? 0b1000 : 0);
  }
  for (int64_t i = 0; i < padded; i += 2) codes[i / 2] = quant4_pack(uint8_t(q[i]), uint8_t(q[i + 1]));
}

}  // namespace

void quantize4(const float* x, int64_t n, int64_t block, Quant4Type t, uint8_t* codes, float* absmax) {
  check_block(block);
  const int64_t nblocks = quant4_num_blocks(n, block);
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t b0 = b * block;
    quantize4_block_fast(x + b0, std::min(block, n - b0), t, codes + b0 / 2, absmax + b);
  }
}

void dequantize4_ref(const uint8_t* codes, const float* absmax, int64_t n, int64_t block, Quant4Type t,
                     float* out) {
  check_block(block);
  for (int64_t i = 0; i < n; ++i) out[i] = quant4_code_value(t, quant4_unpack(codes, i)) * absmax[i / block];
}

void dequantize4(const uint8_t* codes, const float* absmax, int64_t n, int64_t block, Quant4Type t,
                 float* out) {
  check_block(block);
  const int64_t nblocks = quant4_num_blocks(n, block);
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t end = std::min(n, (b + 1) * block);
    const float s = absmax[b];
    for (int64_t i = b * block; i < end; ++i) out[i] = quant4_code_value(t, quant4_unpack(codes, i)) * s;
  }
}

void quantize8_ref(const float* x, int64_t n, int64_t block, const float* code, uint8_t* q, float* absmax) {
  for (int64_t b0 = 0; b0 < n; b0 += block) {
    const int64_t len = std::min(block, n - b0);
    const float amax = block_absmax(x + b0, len);
    absmax[b0 / block] = amax;
    const float inv = 1.0f / amax;
    for (int64_t i = 0; i < len; ++i) q[b0 + i] = code8_quantize_scaled(code, x[b0 + i] * inv);
  }
}

void dequantize8_ref(const uint8_t* q, const float* absmax, int64_t n, int64_t block, const float* code,
                     float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = code[q[i]] * absmax[i / block];
}

NestedAbsmax double_quantize(const float* absmax, int64_t nblocks) {
  NestedAbsmax nq;
  double sum = 0.0;
  for (int64_t i = 0; i < nblocks; ++i) sum += absmax[i];
  nq.offset = nblocks > 0 ? static_cast<float>(sum / double(nblocks)) : 0.0f;
  std::vector<float> centered(static_cast<size_t>(nblocks));
  for (int64_t i = 0; i < nblocks; ++i) centered[size_t(i)] = absmax[i] - nq.offset;
  nq.codes.resize(size_t(nblocks));
  nq.nested_absmax.resize(size_t(quant4_num_blocks(nblocks, kNestedBlock)));
  quantize8_ref(centered.data(), nblocks, kNestedBlock, dynamic_map_signed().data(), nq.codes.data(),
                nq.nested_absmax.data());
  return nq;
}

// Two fp32 roundings, multiply then add, never one FMA (this library is built
// with -ffp-contract=off). The GPU decodes the same way with __fmul_rn and
// __fadd_rn (quant4_block_scale in kernels/cuda/linear_cuda.h, every linear
// kernel; double_dequantize_kernel in kernels/cuda/quant4.cu), so a model
// holding only the double-quantized form reads these scales bit for bit.
void double_dequantize(const NestedAbsmax& nq, float* absmax) {
  const int64_t n = int64_t(nq.codes.size());
  const float* code = nq.code8.empty() ? dynamic_map_signed().data() : nq.code8.data();
  dequantize8_ref(nq.codes.data(), nq.nested_absmax.data(), n, nq.nested_block, code, absmax);
  for (int64_t i = 0; i < n; ++i) absmax[i] += nq.offset;
}

int64_t Quant4Tensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::vector<float> Quant4Tensor::block_scales() const {
  if (!nested) return absmax;
  std::vector<float> s(nested->codes.size());
  double_dequantize(*nested, s.data());
  return s;
}

Quant4Tensor quantize_tensor(const float* x, std::vector<int64_t> shape, Quant4Type t, int64_t block,
                             bool double_quant) {
  Quant4Tensor q;
  q.type = t;
  q.block = block;
  q.shape = std::move(shape);
  const int64_t n = q.numel();
  q.codes.resize(size_t(quant4_code_bytes(n)));
  q.absmax.resize(size_t(quant4_num_blocks(n, block)));
  quantize4(x, n, block, t, q.codes.data(), q.absmax.data());
  if (double_quant) {
    q.nested = double_quantize(q.absmax.data(), int64_t(q.absmax.size()));
    q.absmax.clear();
    q.absmax.shrink_to_fit();
  }
  return q;
}

void dequantize_tensor(const Quant4Tensor& q, float* out) {
  const std::vector<float> scales = q.block_scales();
  dequantize4(q.codes.data(), scales.data(), q.numel(), q.block, q.type, out);
}

}  // namespace qlora
