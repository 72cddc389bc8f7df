#include "tools/quantize_gpu.h"

#include "core/error.h"

#if QLORA_HAVE_CUDA
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>

#include "io/safetensors.h"
#include "kernels/cuda/context.h"
#include "kernels/cuda/device.h"
#include "kernels/cuda/quant4.h"
#include "quant/blockwise.h"
#include "tools/model_folder.h"
#endif

namespace qlora {

#if QLORA_HAVE_CUDA

namespace {

static_assert(kGpuQuantizeChunk % 4096 == 0, "a chunk must hold whole blocks of the largest block size");

// Page-locked host memory: copies from and to it run asynchronously by DMA,
// which is what lets the upload of one chunk overlap the work on another.
class PinnedBytes {
 public:
  explicit PinnedBytes(size_t n) {
    if (n > 0) QLORA_CUDA_CHECK(cudaHostAlloc(&data_, n, cudaHostAllocDefault));
  }
  ~PinnedBytes() {
    if (data_ != nullptr) (void)cudaFreeHost(data_);  // errors ignored: also runs while unwinding
  }
  PinnedBytes(const PinnedBytes&) = delete;
  PinnedBytes& operator=(const PinnedBytes&) = delete;
  uint8_t* data() const { return static_cast<uint8_t*>(data_); }

 private:
  void* data_ = nullptr;
};

class CudaEvent {
 public:
  CudaEvent() { QLORA_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming)); }
  ~CudaEvent() {
    if (event_ != nullptr) (void)cudaEventDestroy(event_);
  }
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
  cudaEvent_t get() const { return event_; }

 private:
  cudaEvent_t event_ = nullptr;
};

// One chunk in flight: its staging on both sides and where it stands.
struct Slot {
  // Room for `values` input values (fp32, the widest dtype that goes up) with
  // their codes and block scales.
  Slot(int64_t values, int64_t block)
      : host_in(size_t(values) * sizeof(float)),
        host_codes(size_t(quant4_code_bytes(values))),
        host_absmax(size_t(quant4_num_blocks(values, block)) * sizeof(float)),
        dev_in(size_t(values) * sizeof(float)),
        dev_codes(size_t(quant4_code_bytes(values))),
        dev_absmax(size_t(quant4_num_blocks(values, block))) {}

  PinnedBytes host_in, host_codes, host_absmax;
  DeviceBuffer<uint8_t> dev_in, dev_codes;
  DeviceBuffer<float> dev_absmax;
  CudaEvent uploaded;  // on the copy stream: dev_in holds the chunk
  CudaEvent done;      // on the compute stream: host_codes and host_absmax hold its results
  int64_t begin = 0;   // the chunk is values [begin, begin + len) of the tensor
  int64_t len = 0;
  uint64_t input_bytes = 0;
};

// memcpy out of the mapped input, split over the OpenMP threads: the copy is
// where the pages are faulted in from the disk, and several threads keep more
// reads in flight than one.
void parallel_copy(uint8_t* dst, const uint8_t* src, size_t n) {
  constexpr size_t kPiece = size_t(1) << 18;
  const int64_t pieces = int64_t((n + kPiece - 1) / kPiece);
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < pieces; ++p) {
    const size_t off = size_t(p) * kPiece;
    std::memcpy(dst + off, src + off, std::min(kPiece, n - off));
  }
}

}  // namespace

std::optional<std::string> gpu_quantize_unavailable_reason() {
  return cuda_unavailable_reason();
}

struct GpuQuantizer::Impl {
  Impl(Quant4Type t, int64_t b, int64_t chunk_values, int64_t capacity_values)
      : type(t),
        block(b),
        chunk(chunk_values),
        capacity(capacity_values),
        ctx(0, 0),  // no cuBLAS workspace: no GEMM here
        slots{{capacity_values, b}, {capacity_values, b}} {}

  // Work may still be queued when an error unwinds through quantize(): it
  // must finish before the buffers it reads and writes are freed.
  ~Impl() { drain(); }
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;

  void drain() noexcept {
    (void)cudaStreamSynchronize(ctx.copy_stream());
    (void)cudaStreamSynchronize(ctx.stream());
  }

  // Host: fills the slot's staging with values [begin, begin + len) of src.
  // Device: upload (copy stream), quantize, download (compute stream).
  // The slot must be free: its previous chunk collected.
  void stage(Slot& s, const GpuQuantizeSource& src, int64_t begin) {
    const int64_t len = std::min(chunk, src.n - begin);
    const size_t es = dtype_size(src.dtype);
    const auto in = src.bytes.subspan(size_t(begin) * es, size_t(len) * es);
    const bool bf16 = src.dtype == DType::BF16;
    if (bf16)
      parallel_copy(s.host_in.data(), in.data(), in.size());
    else
      tensor_range_to_f32(src.bytes, src.dtype, begin, begin + len,
                          reinterpret_cast<float*>(s.host_in.data()));
    if (src.file != nullptr) src.file->release(in);
    const size_t up_bytes = size_t(len) * (bf16 ? sizeof(uint16_t) : sizeof(float));

    QLORA_CUDA_CHECK(cudaMemcpyAsync(s.dev_in.data(), s.host_in.data(), up_bytes, cudaMemcpyHostToDevice,
                                     ctx.copy_stream()));
    QLORA_CUDA_CHECK(cudaEventRecord(s.uploaded.get(), ctx.copy_stream()));
    QLORA_CUDA_CHECK(cudaStreamWaitEvent(ctx.stream(), s.uploaded.get(), 0));
    if (bf16)
      cuda_quantize4(reinterpret_cast<const uint16_t*>(s.dev_in.data()), len, block, type, s.dev_codes.data(),
                     s.dev_absmax.data(), ctx.stream());
    else
      cuda_quantize4(reinterpret_cast<const float*>(s.dev_in.data()), len, block, type, s.dev_codes.data(),
                     s.dev_absmax.data(), ctx.stream());
    QLORA_CUDA_CHECK(cudaMemcpyAsync(s.host_codes.data(), s.dev_codes.data(), size_t(quant4_code_bytes(len)),
                                     cudaMemcpyDeviceToHost, ctx.stream()));
    QLORA_CUDA_CHECK(cudaMemcpyAsync(s.host_absmax.data(), s.dev_absmax.data(),
                                     size_t(quant4_num_blocks(len, block)) * sizeof(float),
                                     cudaMemcpyDeviceToHost, ctx.stream()));
    QLORA_CUDA_CHECK(cudaEventRecord(s.done.get(), ctx.stream()));
    s.begin = begin;
    s.len = len;
    s.input_bytes = in.size();
  }

  // Waits for the slot's chunk and hands its results over; the slot is free afterwards.
  void collect(const Slot& s, float* absmax, const CodesSink& sink) {
    QLORA_CUDA_CHECK(cudaEventSynchronize(s.done.get()));
    // begin is a multiple of the chunk, hence of the block.
    std::memcpy(absmax + s.begin / block, s.host_absmax.data(),
                size_t(quant4_num_blocks(s.len, block)) * sizeof(float));
    sink(std::span<const uint8_t>(s.host_codes.data(), size_t(quant4_code_bytes(s.len))), s.input_bytes);
  }

  Quant4Type type;
  int64_t block;
  int64_t chunk;     // values per chunk, a multiple of block
  int64_t capacity;  // values a slot holds: min(chunk, the largest tensor)
  CudaContext ctx;   // before the slots: they are allocated on its device
  Slot slots[2];
};

GpuQuantizer::GpuQuantizer(Quant4Type type, int64_t block, int64_t max_tensor_values, int64_t chunk_values) {
  const char* fn = "GPU quantization";
  if (!valid_block4(block))
    fail(fn, ": 4-bit block size ", block, " is not supported (expected a power of two from 32 to 4096)");
  if (type != Quant4Type::NF4 && type != Quant4Type::FP4) fail(fn, ": unknown 4-bit type ", int(type));
  if (chunk_values <= 0 || chunk_values % block != 0)
    fail(fn, ": chunk of ", chunk_values, " values is not a positive multiple of the block size ", block);
  if (max_tensor_values < 0) fail(fn, ": largest tensor of ", max_tensor_values, " values is negative");
  const int64_t capacity = std::max<int64_t>(1, std::min(chunk_values, max_tensor_values));
  impl_ = std::make_unique<Impl>(type, block, chunk_values, capacity);
  device_name_ = str(impl_->ctx.info().name, " (GPU ", impl_->ctx.device(), ")");
}

GpuQuantizer::~GpuQuantizer() = default;

void GpuQuantizer::quantize(const GpuQuantizeSource& src, float* absmax, const CodesSink& sink) {
  Impl& m = *impl_;
  const char* fn = "GPU quantization";
  if (src.dtype != DType::F32 && src.dtype != DType::F16 && src.dtype != DType::BF16)
    fail(fn, ": input dtype ", dtype_name(src.dtype), " is not F32, F16 or BF16");
  if (src.n < 0) fail(fn, ": element count ", src.n, " is negative");
  if (src.bytes.size() != size_t(src.n) * dtype_size(src.dtype))
    fail(fn, ": ", src.bytes.size(), " bytes given for ", src.n, " values of ", dtype_name(src.dtype));
  if (std::min(m.chunk, src.n) > m.capacity)
    fail(fn, ": a tensor of ", src.n, " values is larger than the staging was sized for (", m.capacity,
         " values)");
  if (src.n > 0 && absmax == nullptr) fail(fn, ": absmax is null");

  // Chunk c goes up while the host writes out chunk c-1; the slots alternate.
  const int64_t chunks = (src.n + m.chunk - 1) / m.chunk;
  try {
    for (int64_t c = 0; c < chunks; ++c) {
      m.stage(m.slots[c % 2], src, c * m.chunk);
      if (c > 0) m.collect(m.slots[(c - 1) % 2], absmax, sink);
    }
    if (chunks > 0) m.collect(m.slots[(chunks - 1) % 2], absmax, sink);
  } catch (...) {
    m.drain();  // nothing stays in flight into slots a later call would reuse
    throw;
  }
}

#else  // !QLORA_HAVE_CUDA

std::optional<std::string> gpu_quantize_unavailable_reason() {
  return std::string("this build has no CUDA backend");
}

struct GpuQuantizer::Impl {};

GpuQuantizer::GpuQuantizer(Quant4Type, int64_t, int64_t, int64_t) {
  fail("GPU quantization: this build has no CUDA backend");
}

GpuQuantizer::~GpuQuantizer() = default;

void GpuQuantizer::quantize(const GpuQuantizeSource&, float*, const CodesSink&) {
  fail("GPU quantization: this build has no CUDA backend");
}

#endif  // QLORA_HAVE_CUDA

}  // namespace qlora
