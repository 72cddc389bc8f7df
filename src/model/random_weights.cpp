#include "model/random_weights.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "core/splitmix.h"
#include "model/tensor_table.h"
#include "model/weights_layout.h"
#include "quant/blockwise.h"

namespace qlora {

namespace weights_detail {

namespace {

uint64_t mix64(uint64_t z) { return splitmix64_mix(z); }

// Every chunk draws from its own stream, a function of (seed, tensor, chunk)
// alone: which thread fills it, and how many there are, cannot change a bit.
SplitMix64 chunk_rng(uint64_t seed, uint64_t tensor, uint64_t chunk) {
  return SplitMix64(mix64(mix64(mix64(seed) ^ (tensor + 1)) ^ ((chunk + 1) * 0x9e3779b97f4a7c15ull)));
}

// Values per chunk: a multiple of every block size (32..4096) and even, so a
// chunk owns whole blocks and whole code bytes.
constexpr int64_t kChunk = int64_t(1) << 20;

// Median of the absmax of `block` N(0,1) values: m with P(|Z| <= m)^block = 1/2,
// i.e. m = Phi^-1((1 + 2^(-1/block)) / 2), for block = 32, 64, ..., 4096
// (computed once with Python's statistics.NormalDist; constants so the bits
// never depend on a libm).
constexpr double kGaussianBlockAbsmax[8] = {2.3003581469830863, 2.550009874396225, 2.782115808134421,
                                            2.99953236863968,   3.204518254875449, 3.3988603819201364,
                                            3.5839834752070305, 3.761036005990324};

double block_absmax_median(int64_t block) {
  int k = 0;
  while ((int64_t(32) << k) < block) ++k;
  return kGaussianBlockAbsmax[k];
}

// n values of N(0, sd): Marsaglia's polar method in fp32, a pair per accepted
// point of the unit disc (both coordinates from one 64-bit draw). fp32
// log/sqrt: 2x faster than fp64, which matters for the 2 x 1G embedding
// values of a 70B shape; far more precision than random weights need.
void fill_normal(float* x, int64_t n, float sd, SplitMix64& r) {
  int64_t i = 0;
  while (i < n) {
    float u, v, s;
    do {
      const uint64_t z = r.next();
      u = float(int32_t(uint32_t(z))) * 0x1.0p-31f;
      v = float(int32_t(uint32_t(z >> 32))) * 0x1.0p-31f;
      s = u * u + v * v;
    } while (s >= 1.0f || s == 0.0f);
    const float f = sd * std::sqrt(-2.0f * std::log(s) / s);
    x[i++] = u * f;
    if (i < n) x[i++] = v * f;
  }
}

void fill_bytes(uint8_t* p, int64_t n, SplitMix64& r) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const uint64_t z = r.next();
    for (int k = 0; k < 8; ++k) p[i + k] = uint8_t(z >> (8 * k));
  }
  if (i < n) {
    const uint64_t z = r.next();
    for (int k = 0; i < n; ++i, ++k) p[i] = uint8_t(z >> (8 * k));
  }
}

// fn(0), ..., fn(count-1) on `threads` threads, items handed out in order; the
// first exception is rethrown after every thread has stopped.
void parallel_for(int threads, size_t count, const std::function<void(size_t)>& fn) {
  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::mutex mu;
  auto worker = [&] {
    for (size_t j = next.fetch_add(1); j < count; j = next.fetch_add(1)) {
      try {
        fn(j);
      } catch (...) {
        const std::lock_guard<std::mutex> lock(mu);
        if (!error) error = std::current_exception();
        next.store(count);
      }
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads && size_t(t) < count; ++t) pool.emplace_back(worker);
  worker();
  for (std::thread& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

bool is_norm(TensorKind k) {
  return k == TensorKind::AttnNorm || k == TensorKind::MlpNorm || k == TensorKind::FinalNorm ||
         k == TensorKind::QNorm || k == TensorKind::KNorm;
}

bool is_bias(TensorKind k) {
  return k == TensorKind::QBias || k == TensorKind::KBias || k == TensorKind::VBias ||
         k == TensorKind::OBias || k == TensorKind::GateBias || k == TensorKind::UpBias ||
         k == TensorKind::DownBias;
}

}  // namespace

LlamaWeights random_llama_weights_on(int threads, const ModelConfig& cfg, const WeightLoadOptions& opt,
                                     uint64_t seed, float init_std) {
  const char* fn = "random_llama_weights";
  if (threads < 1) fail(fn, ": thread count ", threads, " must be at least 1");
  if (!std::isfinite(init_std) || init_std <= 0.0f)
    fail(fn, ": init_std must be a positive finite number, got ", init_std);
  if (cfg.head_dim % 2 != 0) fail(fn, ": head_dim ", cfg.head_dim, " must be even for RoPE");
  if (opt.quantize && !valid_block4(opt.block))
    fail(fn, ": 4-bit block size ", opt.block, " is not supported (expected a power of two from 32 to 4096)");

  LlamaWeights w;
  w.cfg = cfg;
  const std::vector<TensorSlot> slots = expected_tensors(cfg);
  w.arena = Arena(base_weight_arena_bytes(cfg, opt), "base weights");
  std::vector<PlacedTensor> placed = layout_weights(w.arena, slots, opt);

  // Pass 1: every tensor in chunks of kChunk values.
  struct Chunk {
    size_t tensor;
    int64_t index;
  };
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < slots.size(); ++i) {
    const int64_t n = shape_numel(slots[i].shape);
    for (int64_t c = 0; c * kChunk < n; ++c) chunks.push_back({i, c});
  }
  const double typical_absmax = double(init_std) * (opt.quantize ? block_absmax_median(opt.block) : 0.0);
  parallel_for(threads, chunks.size(), [&](size_t j) {
    const Chunk& c = chunks[j];
    const TensorSlot& s = slots[c.tensor];
    const PlacedTensor& p = placed[c.tensor];
    const int64_t n = shape_numel(s.shape);
    const int64_t v0 = c.index * kChunk, v1 = std::min(n, v0 + kChunk);
    SplitMix64 rng = chunk_rng(seed, c.tensor, uint64_t(c.index));
    if (p.codes) {
      // Codes uniform; each block's scale spread +-15% around the median absmax
      // of a Gaussian block (the real spread of that absmax is about as wide).
      fill_bytes(p.codes + v0 / 2, quant4_code_bytes(v1) - v0 / 2, rng);
      for (int64_t b = v0 / opt.block, end = quant4_num_blocks(v1, opt.block); b < end; ++b)
        p.scales[b] = float(typical_absmax * (0.85 + 0.3 * rng.uniform()));
    } else if (is_norm(s.kind)) {
      std::fill(p.dense + v0, p.dense + v1, 1.0f);
    } else if (is_bias(s.kind)) {
      std::fill(p.dense + v0, p.dense + v1, 0.0f);
    } else {
      fill_normal(p.dense + v0, v1 - v0, init_std, rng);
    }
  });

  // Pass 2: double quantization per 4-bit tensor (each serial, so its bits
  // depend on nothing else), leaving the decoded scales as the loader does.
  if (opt.quantize && opt.double_quant) {
    std::vector<size_t> four_bit;
    for (size_t i = 0; i < slots.size(); ++i)
      if (placed[i].codes) four_bit.push_back(i);
    parallel_for(threads, four_bit.size(), [&](size_t j) {
      const size_t i = four_bit[j];
      const int64_t nblocks = quant4_num_blocks(shape_numel(slots[i].shape), opt.block);
      store_nested_scales(placed[i], nblocks, double_quantize(placed[i].scales, nblocks), slots[i].name);
    });
  }
  bind_weights(w, slots, placed, opt);
  return w;
}

}  // namespace weights_detail

LlamaWeights random_llama_weights(const ModelConfig& cfg, const WeightLoadOptions& opt, uint64_t seed,
                                  float init_std) {
  const int threads = int(std::max(1u, std::thread::hardware_concurrency()));
  return weights_detail::random_llama_weights_on(threads, cfg, opt, seed, init_std);
}

}  // namespace qlora
