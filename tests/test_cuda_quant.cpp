// The CUDA 4-bit kernels (kernels/cuda/quant4.h) against the CPU reference
// (quant/blockwise.h), bit for bit.
//
// Why bit-exact and not a tolerance: both sides run the same sequence of IEEE
// fp32 operations, each correctly rounded to nearest even, on the same inputs:
// max |x| with fmax (order-independent: a maximum does not depend on the
// reduction order, NaN is skipped on both sides), one correctly rounded
// division 1/absmax, one multiply x * inv, the comparisons of the shared code
// book functions (quant/codebook.h), one multiply code * absmax, and for double
// quantization one multiply then one add (the kernels use __fmul_rn /
// __fadd_rn, so no FMA contraction; the CPU build has no fast math, and
// neither side flushes denormals). Identical operations on identical inputs
// give identical bits, so any difference is a bug.
//
// One exception that is not a difference of value: a NaN *produced* by an
// operation (0 * inf when a block holds an infinity) has no IEEE-specified
// sign or payload; x86 produces 0xffc00000 and NVIDIA GPUs 0x7fffffff. Where
// the CPU result is NaN, the GPU result must be NaN, of any bits.
//
// Every test skips when the build has no CUDA or the machine has no usable GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "quant/blockwise.h"
#include "quant/dynamic_map.h"

#if QLORA_HAVE_CUDA
#include "kernels/cuda/device.h"
#include "kernels/cuda/quant4.h"
#endif

#include "cuda_testing.h"

namespace qlora {
namespace {

#if QLORA_HAVE_CUDA

// ---- the cases every test runs --------------------------------------------------

struct Case {
  Quant4Type type;
  int64_t block;
  int64_t n;
  float scale;  // standard deviation of the Gaussian input
};

std::vector<Case> cases() {
  std::vector<Case> c;
  for (Quant4Type t : {Quant4Type::NF4, Quant4Type::FP4})
    for (int64_t block : {32, 64, 128, 4096})
      for (int64_t n : {1, 63, 64, 1001, 70000})
        // 1e-39: subnormal inputs and absmax (a flushing GPU would differ);
        // 3e4: large values; 0.02: typical weights.
        for (float scale : {1.0f, 0.02f, 3.0e4f, 1.0e-39f}) c.push_back({t, block, n, scale});
  return c;
}

std::string describe(const Case& c) {
  std::ostringstream os;
  os << quant4_name(c.type) << " block " << c.block << " n " << c.n << " scale " << c.scale;
  return os.str();
}

std::vector<float> input_for(const Case& c, unsigned salt) {
  std::mt19937 rng(unsigned(c.n * 131 + c.block * 7) + salt + (c.type == Quant4Type::FP4 ? 1000u : 0u));
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> x(size_t(c.n));
  for (auto& v : x) v = d(rng) * c.scale;
  return x;
}

std::vector<uint16_t> to_bf16(const std::vector<float>& x) {
  std::vector<uint16_t> h(x.size());
  for (size_t i = 0; i < x.size(); ++i) h[i] = f32_to_bf16(x[i]);
  return h;
}

std::vector<float> widen_bf16(const std::vector<uint16_t>& h) {
  std::vector<float> x(h.size());
  for (size_t i = 0; i < h.size(); ++i) x[i] = bf16_to_f32(h[i]);
  return x;
}

// ---- CPU side ---------------------------------------------------------------------

struct Quantized {
  std::vector<uint8_t> codes;
  std::vector<float> absmax;
};

Quantized cpu_quantize(const std::vector<float>& x, int64_t block, Quant4Type t) {
  const int64_t n = int64_t(x.size());
  Quantized q{std::vector<uint8_t>(size_t(quant4_code_bytes(n))),
              std::vector<float>(size_t(quant4_num_blocks(n, block)))};
  quantize4_ref(x.data(), n, block, t, q.codes.data(), q.absmax.data());
  return q;
}

std::vector<float> cpu_dequantize(const Quantized& q, int64_t n, int64_t block, Quant4Type t) {
  std::vector<float> y(static_cast<size_t>(n));
  dequantize4_ref(q.codes.data(), q.absmax.data(), n, block, t, y.data());
  return y;
}

// ---- GPU side ---------------------------------------------------------------------

class Stream {
 public:
  Stream() { QLORA_CUDA_CHECK(cudaStreamCreate(&s_)); }
  ~Stream() { (void)cudaStreamDestroy(s_); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return s_; }
  void sync() const { QLORA_CUDA_CHECK(cudaStreamSynchronize(s_)); }

 private:
  cudaStream_t s_ = nullptr;
};

// A device copy of `host` starting `offset` elements into its buffer, so that
// an odd offset exercises the kernels' unaligned (element-wise) path.
template <typename T>
DeviceBuffer<T> upload_at(const std::vector<T>& host, size_t offset) {
  std::vector<T> padded(offset, T{});
  padded.insert(padded.end(), host.begin(), host.end());
  DeviceBuffer<T> d(padded.size());
  d.upload(padded.data(), padded.size());
  return d;
}

using testing::download;

// Quantizes fp32 or bf16 input on the GPU. `fill` is memset into the outputs
// first: running with 0x00 and 0xff shows that every output byte is written.
template <typename In>
Quantized gpu_quantize(const std::vector<In>& x, int64_t block, Quant4Type t, size_t offset, int fill,
                       const Stream& s) {
  const int64_t n = int64_t(x.size());
  DeviceBuffer<In> dx = upload_at(x, offset);
  DeviceBuffer<uint8_t> dcodes(size_t(quant4_code_bytes(n)));
  DeviceBuffer<float> dabsmax(size_t(quant4_num_blocks(n, block)));
  QLORA_CUDA_CHECK(cudaMemset(dcodes.data(), fill, dcodes.bytes()));
  QLORA_CUDA_CHECK(cudaMemset(dabsmax.data(), fill, dabsmax.bytes()));
  cuda_quantize4(dx.data() + offset, n, block, t, dcodes.data(), dabsmax.data(), s.get());
  s.sync();
  return {download(dcodes), download(dabsmax)};
}

// Dequantizes on the GPU into fp32 (Out = float) or bf16 bits (Out = uint16_t),
// writing at `offset` elements into the output buffer.
template <typename Out>
std::vector<Out> gpu_dequantize(const Quantized& q, int64_t n, int64_t block, Quant4Type t, size_t offset,
                                const Stream& s) {
  DeviceBuffer<uint8_t> dcodes = upload_at(q.codes, 0);
  DeviceBuffer<float> dabsmax = upload_at(q.absmax, 0);
  DeviceBuffer<Out> dout(size_t(n) + offset);
  QLORA_CUDA_CHECK(cudaMemset(dout.data(), 0xff, dout.bytes()));
  cuda_dequantize4(dcodes.data(), dabsmax.data(), n, block, t, dout.data() + offset, s.get());
  s.sync();
  std::vector<Out> all = download(dout);
  return std::vector<Out>(all.begin() + std::ptrdiff_t(offset), all.end());
}

std::vector<float> gpu_double_dequantize(const NestedAbsmax& nq, const Stream& s) {
  const int64_t nblocks = int64_t(nq.codes.size());
  const auto& map = dynamic_map_signed();
  DeviceBuffer<uint8_t> dq = upload_at(nq.codes, 0);
  DeviceBuffer<float> dnested = upload_at(nq.nested_absmax, 0);
  DeviceBuffer<float> dmap = upload_at(std::vector<float>(map.begin(), map.end()), 0);
  DeviceBuffer<float> dout(static_cast<size_t>(nblocks));
  QLORA_CUDA_CHECK(cudaMemset(dout.data(), 0xff, dout.bytes()));
  cuda_double_dequantize(dq.data(), dnested.data(), dmap.data(), nq.offset, nblocks, nq.nested_block,
                         dout.data(), s.get());
  s.sync();
  return download(dout);
}

// ---- comparisons ------------------------------------------------------------------

bool same(uint8_t a, uint8_t b) { return a == b; }
bool same(float a, float b) { return f32_bits(a) == f32_bits(b) || (std::isnan(a) && std::isnan(b)); }
bool bf16_is_nan(uint16_t h) { return (h & 0x7fffu) > 0x7f80u; }
bool same_bf16(uint16_t a, uint16_t b) { return a == b || (bf16_is_nan(a) && bf16_is_nan(b)); }

std::string show(uint8_t v) {
  std::ostringstream os;
  os << "0x" << std::hex << int(v);
  return os.str();
}
std::string show(float v) {
  std::ostringstream os;
  os.precision(9);
  os << v << " (0x" << std::hex << f32_bits(v) << ")";
  return os.str();
}

template <typename T>
::testing::AssertionResult bit_identical(const std::vector<T>& cpu, const std::vector<T>& gpu) {
  if (cpu.size() != gpu.size())
    return ::testing::AssertionFailure() << "sizes differ: cpu " << cpu.size() << ", gpu " << gpu.size();
  size_t mismatches = 0, first = 0;
  for (size_t i = 0; i < cpu.size(); ++i)
    if (!same(cpu[i], gpu[i]) && mismatches++ == 0) first = i;
  if (mismatches == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << mismatches << " of " << cpu.size() << " differ; first at " << first
                                       << ": cpu " << show(cpu[first]) << ", gpu " << show(gpu[first]);
}

::testing::AssertionResult bf16_identical(const std::vector<uint16_t>& cpu, const std::vector<uint16_t>& gpu) {
  if (cpu.size() != gpu.size())
    return ::testing::AssertionFailure() << "sizes differ: cpu " << cpu.size() << ", gpu " << gpu.size();
  for (size_t i = 0; i < cpu.size(); ++i)
    if (!same_bf16(cpu[i], gpu[i]))
      return ::testing::AssertionFailure() << "first difference at " << i << ": cpu 0x" << std::hex << cpu[i]
                                           << ", gpu 0x" << gpu[i];
  return ::testing::AssertionSuccess();
}

// ---- special inputs ---------------------------------------------------------------

// Blocks of 32 values (so that every tested block size sees them, alone or
// merged): zeros, negative zeros, NaNs, infinities, the code values and the
// midpoints between them (ties), subnormals, FLT_MAX (whose reciprocal is
// subnormal); then an odd tail.
std::vector<float> special_input(Quant4Type t) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float big = std::numeric_limits<float>::max();
  const float tiny = std::numeric_limits<float>::denorm_min();
  std::mt19937 rng(17);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> x;
  auto block_of = [&](auto make) {
    for (int i = 0; i < 32; ++i) x.push_back(make(i));
  };
  block_of([](int) { return 0.0f; });
  block_of([](int) { return -0.0f; });
  block_of([&](int i) { return i == 5 ? nan : d(rng); });
  block_of([&](int) { return nan; });
  block_of([&](int i) { return i == 9 ? inf : d(rng); });
  block_of([&](int i) { return i == 3 ? -inf : i == 4 ? nan : d(rng); });
  // Code values and neighbouring midpoints, absmax exactly 1: ties on pivots.
  std::vector<float> v;
  for (int c = 0; c < 16; ++c) v.push_back(quant4_code_value(t, uint8_t(c)));
  block_of([&](int i) {
    if (i < 16) return v[size_t(i)];
    const float a = v[size_t(i - 16)], b = v[size_t((i - 15) % 16)];
    return (a + b) * 0.5f;
  });
  block_of([&](int i) {  // just above and below the midpoints
    const float m = (v[size_t(i % 16)] + v[size_t((i + 1) % 16)]) * 0.5f;
    return std::nextafter(m, i < 16 ? 2.0f : -2.0f);
  });
  block_of([&](int i) { return float(i - 16) * tiny * 1000.0f; });  // subnormals only
  block_of([&](int i) { return i % 3 == 0 ? big : i % 3 == 1 ? -big : d(rng) * 1e30f; });
  block_of([&](int i) { return i == 0 ? 1e-38f : float(i) * tiny; });  // normal absmax, subnormal rest
  for (int i = 0; i < 5; ++i) x.push_back(d(rng) * 0.02f);               // odd tail
  return x;
}

#endif  // QLORA_HAVE_CUDA

// ---- tests ------------------------------------------------------------------------

TEST(CudaQuant, QuantizeFp32EqualsCpuBitForBit) {
  QLORA_REQUIRE_GPU();
#if QLORA_HAVE_CUDA
  Stream s;
  for (const Case& c : cases()) {
    const auto x = input_for(c, 0);
    const Quantized want = cpu_quantize(x, c.block, c.type);
    for (size_t offset : {0, 1}) {
      const Quantized got = gpu_quantize(x, c.block, c.type, offset, offset == 0 ? 0x00 : 0xff, s);
      ASSERT_TRUE(bit_identical(want.absmax, got.absmax)) << "absmax, " << describe(c) << " offset " << offset;
      ASSERT_TRUE(bit_identical(want.codes, got.codes)) << "codes, " << describe(c) << " offset " << offset;
    }
  }
#endif
}

TEST(CudaQuant, QuantizeBf16EqualsCpuOfWidenedValues) {
  QLORA_REQUIRE_GPU();
#if QLORA_HAVE_CUDA
  Stream s;
  for (const Case& c : cases()) {
    const auto h = to_bf16(input_for(c, 1));
    const Quantized want = cpu_quantize(widen_bf16(h), c.block, c.type);
    for (size_t offset : {0, 1}) {
      const Quantized got = gpu_quantize(h, c.block, c.type, offset, offset == 0 ? 0x00 : 0xff, s);
      ASSERT_TRUE(bit_identical(want.absmax, got.absmax)) << "absmax, " << describe(c) << " offset " << offset;
      ASSERT_TRUE(bit_identical(want.codes, got.codes)) << "codes, " << describe(c) << " offset " << offset;
    }
  }
#endif
}

TEST(CudaQuant, DequantizeFp32EqualsCpuBitForBit) {
  QLORA_REQUIRE_GPU();
#if QLORA_HAVE_CUDA
  Stream s;
  for (const Case& c : cases()) {
    const Quantized q = cpu_quantize(input_for(c, 2), c.block, c.type);
    const std::vector<float> want = cpu_dequantize(q, c.n, c.block, c.type);
    for (size_t offset : {0, 1})
      ASSERT_TRUE(bit_identical(want, gpu_dequantize<float>(q, c.n, c.block, c.type, offset, s)))
          << describe(c) << " offset " << offset;
  }
#endif
}

TEST(CudaQuant, DequantizeBf16EqualsCpuRoundedToBf16) {
  QLORA_REQUIRE_GPU();
#if QLORA_HAVE_CUDA
  Stream s;
  for (const Case& c : cases()) {
    const Quantized q = cpu_quantize(input_for(c, 3), c.block, c.type);
    const std::vector<uint16_t> want = to_bf16(cpu_dequantize(q, c.n, c.block, c.type));
    for (size_t offset : {0, 1})
      ASSERT_TRUE(bf16_identical(want, gpu_dequantize<uint16_t>(q, c.n, c.block, c.type, offset, s)))
          << describe(c) << " offset " << offset;
  }
#endif
}

TEST(CudaQuant, DoubleDequantizeEqualsCpuBitForBit) {
  QLORA_REQUIRE_GPU();
#if QLORA_HAVE_CUDA
  Stream s;
  for (const Case& c : cases()) {
    const Quantized q = cpu_quantize(input_for(c, 4), c.block, c.type);
    const NestedAbsmax nq = double_quantize(q.absmax.data(), int64_t(q.absmax.size()));
    std::vector<float> want(q.absmax.size());
    double_dequantize(nq, want.data());
    ASSERT_TRUE(bit_identical(want, gpu_double_dequantize(nq, s))) << describe(c);
  }
  // Many nested blocks, a short last one: absmax-like values spread over a decade.
  std::mt19937 rng(23);
  std::uniform_real_distribution<float> u(0.01f, 0.1f);
  std::vector<float> absmax(100003);
  for (auto& v : absmax) v = u(rng);
  const NestedAbsmax nq = double_quantize(absmax.data(), int64_t(absmax.size()));
  std::vector<float> want(absmax.size());
  double_dequantize(nq, want.data());
  ASSERT_TRUE(bit_identical(want, gpu_double_dequantize(nq, s))) << "100003 uniform absmax values";
#endif
}

TEST(CudaQuant, NanZeroInfTieAndSubnormalBlocks) {
  QLORA_REQUIRE_GPU();
#if QLORA_HAVE_CUDA
  Stream s;
  for (Quant4Type t : {Quant4Type::NF4, Quant4Type::FP4}) {
    const std::vector<float> x = special_input(t);
    const int64_t n = int64_t(x.size());
    const std::vector<uint16_t> h = to_bf16(x);
    for (int64_t block : {32, 64, 128, 4096}) {
      const std::string what = std::string(quant4_name(t)) + " block " + std::to_string(block);
      const Quantized want = cpu_quantize(x, block, t);
      const Quantized got = gpu_quantize(x, block, t, 0, 0x00, s);
      ASSERT_TRUE(bit_identical(want.absmax, got.absmax)) << "absmax, " << what;
      ASSERT_TRUE(bit_identical(want.codes, got.codes)) << "codes, " << what;

      const std::vector<float> y = cpu_dequantize(want, n, block, t);
      ASSERT_TRUE(bit_identical(y, gpu_dequantize<float>(want, n, block, t, 0, s))) << "dequantize, " << what;
      ASSERT_TRUE(bf16_identical(to_bf16(y), gpu_dequantize<uint16_t>(want, n, block, t, 0, s)))
          << "dequantize to bf16, " << what;

      const Quantized want_bf16 = cpu_quantize(widen_bf16(h), block, t);
      const Quantized got_bf16 = gpu_quantize(h, block, t, 1, 0xff, s);
      ASSERT_TRUE(bit_identical(want_bf16.absmax, got_bf16.absmax)) << "bf16 absmax, " << what;
      ASSERT_TRUE(bit_identical(want_bf16.codes, got_bf16.codes)) << "bf16 codes, " << what;

      const NestedAbsmax nq = double_quantize(want.absmax.data(), int64_t(want.absmax.size()));
      std::vector<float> a(want.absmax.size());
      double_dequantize(nq, a.data());
      ASSERT_TRUE(bit_identical(a, gpu_double_dequantize(nq, s))) << "double dequantize, " << what;
    }
  }
#endif
}

TEST(CudaQuant, RejectsInvalidArguments) {
  QLORA_REQUIRE_GPU();
#if QLORA_HAVE_CUDA
  DeviceBuffer<float> x(256), absmax(16), out(256), map(256);
  DeviceBuffer<uint16_t> h(256);
  DeviceBuffer<uint8_t> codes(128);
  const auto nf4 = Quant4Type::NF4;
  for (int64_t b : {0, 16, 48, 8192}) {
    EXPECT_THROW(cuda_quantize4(x.data(), 256, b, nf4, codes.data(), absmax.data(), nullptr), Error) << b;
    EXPECT_THROW(cuda_quantize4(h.data(), 256, b, nf4, codes.data(), absmax.data(), nullptr), Error) << b;
    EXPECT_THROW(cuda_dequantize4(codes.data(), absmax.data(), 256, b, nf4, out.data(), nullptr), Error) << b;
  }
  EXPECT_THROW(cuda_quantize4(x.data(), -1, 64, nf4, codes.data(), absmax.data(), nullptr), Error);
  EXPECT_THROW(cuda_quantize4(x.data(), 256, 64, Quant4Type(7), codes.data(), absmax.data(), nullptr), Error);
  EXPECT_THROW(cuda_quantize4(static_cast<const float*>(nullptr), 256, 64, nf4, codes.data(), absmax.data(), nullptr),
               Error);
  EXPECT_THROW(cuda_quantize4(x.data(), 256, 64, nf4, nullptr, absmax.data(), nullptr), Error);
  EXPECT_THROW(cuda_dequantize4(codes.data(), nullptr, 256, 64, nf4, out.data(), nullptr), Error);
  EXPECT_THROW(cuda_dequantize4(codes.data(), absmax.data(), 256, 64, nf4, static_cast<float*>(nullptr), nullptr),
               Error);
  EXPECT_THROW(cuda_double_dequantize(codes.data(), absmax.data(), map.data(), 0.0f, 16, 0, out.data(), nullptr),
               Error);
  EXPECT_THROW(cuda_double_dequantize(codes.data(), absmax.data(), nullptr, 0.0f, 16, 256, out.data(), nullptr),
               Error);
  EXPECT_THROW(cuda_double_dequantize(codes.data(), absmax.data(), map.data(), 0.0f, -1, 256, out.data(), nullptr),
               Error);
  // Nothing to do is not an error, null pointers included.
  EXPECT_NO_THROW(cuda_quantize4(static_cast<const float*>(nullptr), 0, 64, nf4, nullptr, nullptr, nullptr));
  EXPECT_NO_THROW(cuda_dequantize4(nullptr, nullptr, 0, 64, nf4, static_cast<float*>(nullptr), nullptr));
  EXPECT_NO_THROW(cuda_double_dequantize(nullptr, nullptr, nullptr, 0.0f, 0, 256, nullptr, nullptr));
  QLORA_CUDA_CHECK(cudaDeviceSynchronize());
#endif
}

TEST(CudaQuant, DeviceInfoAndBuffers) {
  QLORA_REQUIRE_GPU();
#if QLORA_HAVE_CUDA
  const CudaDeviceInfo info = cuda_device_info(0);
  EXPECT_FALSE(info.name.empty());
  EXPECT_GT(info.cc_major, 0);
  EXPECT_GT(info.sm_count, 0);
  EXPECT_GT(info.total_bytes, 0u);
  EXPECT_LE(info.free_bytes, info.total_bytes);
  EXPECT_THROW(cuda_device_info(-1), Error);
  EXPECT_THROW(cuda_device_info(1 << 20), Error);

  const std::vector<float> v = {1.0f, -2.5f, 3.25f};
  DeviceBuffer<float> a(3);
  a.upload(v.data(), v.size());
  DeviceBuffer<float> b = std::move(a);
  EXPECT_EQ(a.data(), nullptr);
  EXPECT_EQ(a.size(), 0u);
  EXPECT_EQ(b.size(), 3u);
  std::vector<float> back(3);
  b.download(back.data(), back.size());
  EXPECT_EQ(back, v);
  EXPECT_THROW(b.upload(v.data(), 4), Error);
  EXPECT_THROW(b.download(back.data(), 4), Error);
  DeviceBuffer<float> empty(0);
  EXPECT_EQ(empty.data(), nullptr);

  // Errors name the call, the file and CUDA's message.
  try {
    QLORA_CUDA_CHECK(cudaErrorInvalidValue);
    FAIL() << "QLORA_CUDA_CHECK did not throw";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("test_cuda_quant.cpp:"), std::string::npos) << msg;
    EXPECT_NE(msg.find("cudaErrorInvalidValue"), std::string::npos) << msg;
    EXPECT_NE(msg.find(cudaGetErrorString(cudaErrorInvalidValue)), std::string::npos) << msg;
  }
#endif
}

}  // namespace
}  // namespace qlora
