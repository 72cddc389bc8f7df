#include "tools/quantize_model.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <nlohmann/json.hpp>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/progress.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/tensor_table.h"
#include "plan/cuda_constants.h"
#include "quant/bnb_layout.h"
#include "tools/model_folder.h"
#include "tools/model_input.h"
#include "tools/quantize_gpu.h"

namespace qlora {

namespace fs = std::filesystem;

namespace {

// Values converted per step: 16M floats = 64 MiB of scratch, a multiple of
// every block size, so quantization blocks never straddle chunks.
constexpr int64_t kChunk = int64_t(1) << 24;
// The GPU path cuts tensors the same way (not needed for equal bytes, any
// multiple of the block would do, but the staging is planned with this size).
static_assert(kChunk == kGpuQuantizeChunk && kChunk == int64_t(plan_cuda::kQuantStreamValues));
// The quant state JSON is about 200 bytes; its exact length is known only
// after quantizing (the offset's digits), so planning assumes this bound.
constexpr int64_t kMaxStateBytes = 999;

struct PlannedTensor {
  const TensorSlot* slot;
  size_t index;  // into ModelInput::slots()
  bool quantize;
};

struct Shard {
  std::vector<PlannedTensor> tensors;
  uint64_t bytes = 0;
};

uint64_t output_bytes_of(const PlannedTensor& t, const QuantizeOptions& opt) {
  if (!t.quantize) return uint64_t(shape_numel(t.slot->shape)) * 2;
  uint64_t b = kMaxStateBytes;
  for (const TensorSpec& s :
       bnb_tensor_specs_before_state(t.slot->name, t.slot->shape, opt.type, opt.block, opt.double_quant))
    b += s.nbytes();
  return b;
}

// A safetensors file whose header is written last: the data section starts
// after a reserved header region, the quant state tensors (whose sizes are
// known only at the end) come last in the data section, and the final
// header, padded with spaces to the reserved size, is written over the
// reserved region before the file is renamed into place.
class ShardWriter {
 public:
  ShardWriter(const fs::path& dest, std::vector<TensorSpec> body, std::vector<std::string> state_names,
              std::map<std::string, std::string> metadata)
      : file_(dest),
        body_(std::move(body)),
        state_names_(std::move(state_names)),
        metadata_(std::move(metadata)) {
    // Worst case: every state tensor at its maximum size.
    std::vector<TensorSpec> worst = body_;
    for (const auto& n : state_names_) worst.push_back({n, DType::U8, {kMaxStateBytes}});
    reserved_ = 8 + safetensors_header_json(worst, metadata_).size();
    reserved_ = (reserved_ + 7) / 8 * 8;
    const std::vector<uint8_t> zeros(reserved_, 0);
    file_.write(zeros.data(), zeros.size());
  }

  void write(const void* p, size_t n) { file_.write(p, n); }

  void add_state(std::string json) {
    if (int64_t(json.size()) > kMaxStateBytes)
      fail("quant state JSON longer than ", kMaxStateBytes, " bytes");
    states_.push_back(std::move(json));
  }

  uint64_t commit() {
    if (states_.size() != state_names_.size())
      fail(file_.dest().string(), ": internal error: quant states missing");
    std::vector<TensorSpec> all = body_;
    for (size_t i = 0; i < states_.size(); ++i) {
      all.push_back({state_names_[i], DType::U8, {int64_t(states_[i].size())}});
      file_.write(states_[i]);
    }
    std::string header = safetensors_header_json(all, metadata_);
    if (8 + header.size() > reserved_)
      fail(file_.dest().string(), ": internal error: header outgrew its reserve");
    header.append(reserved_ - 8 - header.size(), ' ');
    uint8_t len[8];
    const uint64_t n = header.size();
    for (int i = 0; i < 8; ++i) len[i] = uint8_t(n >> (8 * i));
    file_.overwrite(0, len, 8);
    file_.overwrite(8, header.data(), header.size());
    const uint64_t total = file_.bytes_written();
    file_.commit();
    return total;
  }

 private:
  AtomicFile file_;
  std::vector<TensorSpec> body_;
  std::vector<std::string> state_names_;
  std::map<std::string, std::string> metadata_;
  std::vector<std::string> states_;
  uint64_t reserved_ = 0;
};

// gpu: null for the CPU path.
void write_quantized(ShardWriter& w, const PlannedTensor& t, const StoredTensor& in,
                     const QuantizeOptions& opt, std::vector<float>& buf, GpuQuantizer* gpu,
                     const std::function<void(uint64_t)>& progressed) {
  const auto src = in.bytes;
  const DType dt = in.dtype;
  const int64_t n = shape_numel(t.slot->shape);
  Quant4Tensor q;
  q.type = opt.type;
  q.block = opt.block;
  q.shape = t.slot->shape;
  q.absmax.resize(size_t(quant4_num_blocks(n, opt.block)));
  if (gpu != nullptr) {
    gpu->quantize({src, dt, n, in.file}, q.absmax.data(),
                  [&](std::span<const uint8_t> codes, uint64_t in_bytes) {
                    w.write(codes.data(), codes.size());
                    progressed(in_bytes);
                  });
  } else {
    std::vector<uint8_t> codes;
    for (int64_t c = 0; c < n; c += kChunk) {
      const int64_t len = std::min(kChunk, n - c);
      tensor_range_to_f32(src, dt, c, c + len, buf.data());
      in.release(src.subspan(size_t(c) * dtype_size(dt), size_t(len) * dtype_size(dt)));
      codes.resize(size_t(quant4_code_bytes(len)));
      quantize4(buf.data(), len, opt.block, opt.type, codes.data(), q.absmax.data() + c / opt.block);
      w.write(codes.data(), codes.size());
      progressed(uint64_t(len) * dtype_size(dt));
    }
  }
  if (opt.double_quant) {
    q.nested = double_quantize(q.absmax.data(), int64_t(q.absmax.size()));
    q.absmax.clear();
  }
  // Everything after the codes, from the same code that writes in-memory
  // tensors (bnb_tensors), so the two layouts cannot drift apart.
  std::vector<OwnedTensor> parts = bnb_tensors(t.slot->name, q, DType::BF16);
  for (size_t i = 1; i + 1 < parts.size(); ++i) w.write(parts[i].bytes.data(), parts[i].bytes.size());
  w.add_state(std::string(parts.back().bytes.begin(), parts.back().bytes.end()));
}

void write_kept(ShardWriter& w, const PlannedTensor& t, const StoredTensor& in, std::vector<float>& buf,
                const std::function<void(uint64_t)>& progressed) {
  const auto src = in.bytes;
  const DType dt = in.dtype;
  if (dt == DType::BF16) {  // already in the output dtype: straight from the mapping
    const size_t step = size_t(kChunk) * 2;
    for (size_t off = 0; off < src.size(); off += step) {
      const auto piece = src.subspan(off, std::min(step, src.size() - off));
      w.write(piece.data(), piece.size());
      in.release(piece);
      progressed(piece.size());
    }
    return;
  }
  const int64_t n = shape_numel(t.slot->shape);
  std::vector<uint16_t> out;
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t len = std::min(kChunk, n - c);
    tensor_range_to_f32(src, dt, c, c + len, buf.data());
    in.release(src.subspan(size_t(c) * dtype_size(dt), size_t(len) * dtype_size(dt)));
    out.resize(size_t(len));
    convert_from_f32(buf.data(), size_t(len), DType::BF16, out.data());
    w.write(out.data(), out.size() * 2);
    progressed(uint64_t(len) * dtype_size(dt));
  }
}

// The GPU quantizer that opt.device asks for, or null for the CPU; fills the
// device fields of rep. max_values: the largest tensor to quantize.
std::unique_ptr<GpuQuantizer> open_quantize_device(const QuantizeOptions& opt, int64_t max_values,
                                                   QuantizeReport& rep) {
  rep.device = QuantDevice::cpu;
  rep.device_name = "CPU";
  if (opt.device == QuantDevice::cpu) return nullptr;
  if (const auto why = gpu_quantize_unavailable_reason()) {
    if (opt.device == QuantDevice::cuda) fail("--device cuda: ", *why);
    return nullptr;  // automatic: the CPU writes the same bytes
  }
  std::unique_ptr<GpuQuantizer> gpu;
  try {
    gpu = std::make_unique<GpuQuantizer>(opt.type, opt.block, max_values);
  } catch (const Error& e) {
    if (opt.device == QuantDevice::cuda) fail("--device cuda: ", e.what());
    // A usable GPU whose memory is taken (another job): quantizing still
    // works on the CPU, which is what the default promises.
    rep.device_note = str("GPU not used: ", e.what());
    return nullptr;
  }
  rep.device = QuantDevice::cuda;
  rep.device_name = gpu->device_name();
  return gpu;
}

}  // namespace

std::string bnb_quantization_config_json(const QuantizeOptions& opt) {
  nlohmann::ordered_json q = {
      {"_load_in_4bit", true},
      {"_load_in_8bit", false},
      {"bnb_4bit_compute_dtype", "bfloat16"},
      {"bnb_4bit_quant_storage", "uint8"},
      {"bnb_4bit_quant_type", std::string(quant4_name(opt.type))},
      {"bnb_4bit_use_double_quant", opt.double_quant},
      {"llm_int8_enable_fp32_cpu_offload", false},
      {"llm_int8_has_fp16_weight", false},
      {"llm_int8_skip_modules", nullptr},
      {"llm_int8_threshold", 6.0},
      {"load_in_4bit", true},
      {"load_in_8bit", false},
      {"quant_method", "bitsandbytes"},
  };
  return q.dump();
}

QuantizeReport quantize_model(const fs::path& input, const fs::path& output, const QuantizeOptions& opt) {
  const auto t0 = std::chrono::steady_clock::now();
  if (opt.quantize && !valid_block4(opt.block))
    fail("--block-size ", opt.block, " is not supported (expected a power of two from 32 to 4096)");
  // Checks the files against the architecture's table before writing anything.
  const ModelInput model(input);
  const ModelConfig& cfg = model.config();
  if (cfg.quantization)
    fail(input.string(), ": the model is already quantized (config.json has a quantization_config)");
  const std::vector<TensorSlot>& slots = model.slots();

  // Plan: tensors in model order, cut into shards.
  std::vector<Shard> shards(1);
  QuantizeReport rep;
  for (size_t i = 0; i < slots.size(); ++i) {
    const TensorSlot& s = slots[i];
    PlannedTensor t{&s, i, opt.quantize && s.is_block_linear};
    if (const SafetensorsModel* st = model.safetensors()) {
      const auto& e = st->at(s.name);
      const DType dt = e.info->dtype;
      if (dt == DType::F64 || dt == DType::F8_E4M3 || dt == DType::F8_E5M2)
        fail(e.file->path().string(), ": tensor ", s.name, " has dtype ", dtype_name(dt),
             ", expected F32, F16 or BF16");
    }
    const uint64_t b = output_bytes_of(t, opt);
    if (!shards.back().tensors.empty() && shards.back().bytes + b > opt.max_shard_bytes)
      shards.emplace_back();
    shards.back().tensors.push_back(t);
    shards.back().bytes += b;
    rep.input_bytes += model.stored_bytes(i);
    rep.params += shape_numel(s.shape);
    if (t.quantize)
      rep.quantized_params += shape_numel(s.shape), ++rep.quantized_tensors;
    else
      ++rep.kept_tensors;
  }
  // A tied model that also ships an lm_head.weight copy (check_tensors accepts
  // it) loses the copy: the table of a tied model has no lm_head.
  rep.shards = int64_t(shards.size());

  int64_t largest_quantized = 0;
  for (const TensorSlot& s : slots)
    if (opt.quantize && s.is_block_linear)
      largest_quantized = std::max(largest_quantized, shape_numel(s.shape));
  // Before the output folder is touched: --device cuda without a GPU fails here.
  const std::unique_ptr<GpuQuantizer> gpu =
      largest_quantized > 0 ? open_quantize_device(opt, largest_quantized, rep) : nullptr;

  AtomicDir out(output, opt.force);
  Progress bar("quantize", rep.input_bytes, "B", opt.progress);
  uint64_t done = 0;
  const auto progressed = [&](uint64_t b) { bar.advance(done += b); };
  int64_t largest = 0;
  for (const TensorSlot& s : slots) largest = std::max(largest, shape_numel(s.shape));
  std::vector<float> buf(size_t(std::min(largest, kChunk)));
  std::map<std::string, std::string> weight_map;

  for (size_t si = 0; si < shards.size(); ++si) {
    const std::string fname = shard_file_name(si, shards.size());
    std::vector<TensorSpec> body;
    std::vector<std::string> state_names;
    for (const PlannedTensor& t : shards[si].tensors) {
      if (t.quantize) {
        for (auto& sp : bnb_tensor_specs_before_state(t.slot->name, t.slot->shape, opt.type, opt.block,
                                                      opt.double_quant))
          body.push_back(std::move(sp));
        state_names.push_back(bnb_names(t.slot->name, opt.type).quant_state);
      } else {
        body.push_back({t.slot->name, DType::BF16, t.slot->shape});
      }
    }
    for (const auto& sp : body) weight_map[sp.name] = fname;
    for (const auto& n : state_names) weight_map[n] = fname;
    ShardWriter w(out.path() / fname, std::move(body), std::move(state_names), {{"format", "pt"}});
    for (const PlannedTensor& t : shards[si].tensors) {
      // Holds this tensor only (a GGUF tensor dequantized), freed before the next.
      const StoredTensor in = model.tensor(t.index);
      if (t.quantize)
        write_quantized(w, t, in, opt, buf, gpu.get(), progressed);
      else
        write_kept(w, t, in, buf, progressed);
    }
    rep.output_bytes += w.commit();
  }
  if (shards.size() > 1) {
    uint64_t total = 0;
    for (const auto& e : fs::directory_iterator(out.path())) total += fs::file_size(e.path());
    write_safetensors_index(out.path() / "model.safetensors.index.json", total, weight_map);
  }

  // config.json: the input's (or the GGUF metadata's), with quantization_config and the BF16 dtype.
  auto cj = model.config_json();
  if (opt.quantize)
    cj["quantization_config"] = nlohmann::ordered_json::parse(bnb_quantization_config_json(opt));
  cj["torch_dtype"] = "bfloat16";
  write_file_atomic(out.path() / "config.json", cj.dump(2) + "\n");
  // Tokenizer, generation config, chat template, licence: every other plain file.
  model.write_side_files(out.path());
  out.commit();
  bar.finish();
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return rep;
}

}  // namespace qlora
