#include "tools/merge_model.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <vector>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/progress.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/lora.h"
#include "model/tensor_table.h"
#include "quant/bnb_layout.h"
#include "tools/model_folder.h"

namespace qlora {

namespace fs = std::filesystem;

namespace {

// Values converted per step (64 MiB of fp32 scratch): a multiple of every
// 4-bit block size, so a chunk never splits a quantization block.
constexpr int64_t kChunk = int64_t(1) << 24;

struct Planned {
  const TensorSlot* slot;
  const SafetensorsModel::Entry* src;
  bool is_4bit;                       // a bitsandbytes weight: dequantized first
  std::optional<LoraTarget> adapted;  // set when W + scale * B A
};

struct Shard {
  std::vector<const Planned*> tensors;
  uint64_t bytes = 0;
};

// out[e - c] += scale * (B A)[e] for the flat elements e in [c, c + len) of a
// (OUT, IN) weight: whole rows in the middle, partial rows at the edges.
void add_lora_delta(float* out, int64_t c, int64_t len, int64_t IN, const float* A, const float* B, int64_t R,
                    float scale) {
  const int64_t o0 = c / IN, o1 = (c + len - 1) / IN;
#pragma omp parallel for schedule(static)
  for (int64_t o = o0; o <= o1; ++o) {
    const int64_t i0 = std::max<int64_t>(0, c - o * IN), i1 = std::min<int64_t>(IN, c + len - o * IN);
    const float* b = B + o * R;
    float* y = out + (o * IN - c);
    for (int64_t i = i0; i < i1; ++i) {
      float d = 0.0f;
      for (int64_t r = 0; r < R; ++r) d += b[r] * A[r * IN + i];
      y[i] += scale * d;
    }
  }
}

class TensorStreamer {
 public:
  TensorStreamer(const LoraWeights& lora, DType dtype, std::vector<float>& buf, Progress& bar)
      : lora_(lora), dtype_(dtype), buf_(buf), bar_(bar) {}

  void write(SafetensorsWriter& w, const SafetensorsModel& m, const Planned& t) {
    const int64_t n = shape_numel(t.slot->shape);
    const DType src_dt = t.src->info->dtype;
    const auto src = t.src->file->data(*t.src->info);
    // Already in the output dtype and unchanged: the bytes themselves.
    if (!t.is_4bit && !t.adapted && src_dt == dtype_) {
      const size_t step = size_t(kChunk) * dtype_size(dtype_);
      for (size_t off = 0; off < src.size(); off += step) {
        const auto piece = src.subspan(off, std::min(step, src.size() - off));
        w.write(piece);
        t.src->file->release(piece);
        advance(piece.size());
      }
      return;
    }
    std::optional<Quant4Tensor> q;
    std::vector<float> scales;
    if (t.is_4bit) {
      q = load_bnb_weight(m, t.slot->name);
      scales = q->block_scales();
    }
    for (int64_t c = 0; c < n; c += kChunk) {
      const int64_t len = std::min(kChunk, n - c);
      if (q) {
        dequantize4(q->codes.data() + c / 2, scales.data() + c / q->block, len, q->block, q->type,
                    buf_.data());
      } else {
        tensor_range_to_f32(src, src_dt, c, c + len, buf_.data());
        t.src->file->release(src.subspan(size_t(c) * dtype_size(src_dt), size_t(len) * dtype_size(src_dt)));
      }
      if (t.adapted) {
        const LoraTarget tg = *t.adapted;
        add_lora_delta(buf_.data(), c, len, t.slot->shape[1], lora_.A(t.slot->layer, tg),
                       lora_.B(t.slot->layer, tg), lora_.config().rank, lora_.config().scale());
      }
      out_.resize(size_t(len) * dtype_size(dtype_));
      convert_from_f32(buf_.data(), size_t(len), dtype_, out_.data());
      w.write(out_.data(), out_.size());
      advance(out_.size());
    }
  }

 private:
  void advance(uint64_t b) { bar_.advance(done_ += b); }

  const LoraWeights& lora_;
  DType dtype_;
  std::vector<float>& buf_;
  Progress& bar_;
  std::vector<uint8_t> out_;
  uint64_t done_ = 0;
};

bool same_folder(const fs::path& a, const fs::path& b) {
  std::error_code ec;
  return fs::exists(a) && fs::exists(b) && fs::equivalent(a, b, ec);
}

}  // namespace

DType merge_dtype_from_name(std::string_view name) {
  if (name == "bf16" || name == "bfloat16") return DType::BF16;
  if (name == "f16" || name == "fp16" || name == "float16") return DType::F16;
  if (name == "f32" || name == "fp32" || name == "float32") return DType::F32;
  fail("--dtype \"", name, "\": expected bf16, f16 or f32");
}

MergeReport merge_model(const fs::path& model, const fs::path& adapter, const fs::path& output,
                        const MergeOptions& opt) {
  const auto t0 = std::chrono::steady_clock::now();
  if (opt.dtype != DType::BF16 && opt.dtype != DType::F16 && opt.dtype != DType::F32)
    fail("merge: output dtype ", dtype_name(opt.dtype), " is not supported (expected BF16, F16 or F32)");
  if (!fs::is_directory(model))
    fail(model.string(), ": not a model folder (expected config.json + *.safetensors)");
  if (!fs::is_directory(adapter))
    fail(adapter.string(),
         ": not an adapter folder (expected adapter_config.json + adapter_model.safetensors)");
  if (same_folder(output, model) || same_folder(output, adapter))
    fail(output.string(), ": the output folder must differ from the model and adapter folders");
  if (fs::exists(output) && !opt.overwrite)
    fail(output.string(), " already exists (pass --overwrite to replace it)");

  const ModelConfig cfg = load_model_config(model);
  const SafetensorsModel m(model);
  const LoraWeights lora = LoraWeights::load_peft(adapter, cfg);

  // Check the files against the architecture's table before writing anything;
  // a 4-bit weight counts with the logical shape of its quant state.
  const std::vector<std::string> bnb = bnb_quantized_weights(m);
  const auto is_bnb = [&](const std::string& n) { return std::binary_search(bnb.begin(), bnb.end(), n); };
  std::vector<PresentTensor> present;
  for (const auto& name : m.names()) {
    if (is_bnb_companion(name) || is_ignorable_tensor(name)) continue;
    present.push_back({name, is_bnb(name) ? check_bnb_weight(m, name).shape : m.at(name).info->shape});
  }
  const std::vector<TensorSlot> slots = expected_tensors(cfg);
  const TensorCheck check = check_tensors(slots, present);
  if (!check.ok())
    fail(m.source().string(), " does not match ", model.string(), "/config.json:\n", check.report());

  // Plan: the table's tensors in model order (a tied model's stray lm_head
  // copy and ignorable buffers are dropped, as quantize does), cut into shards.
  MergeReport rep;
  rep.from_4bit = !bnb.empty();
  std::vector<Planned> plan;
  plan.reserve(slots.size());
  uint64_t total_bytes = 0;
  int64_t largest = 1;
  for (const TensorSlot& s : slots) {
    Planned p{&s, &m.at(s.name), is_bnb(s.name), std::nullopt};
    if (!p.is_4bit && !dtype_is_float(p.src->info->dtype))
      fail(p.src->file->path().string(), ": tensor ", s.name, " has dtype ", dtype_name(p.src->info->dtype),
           ", expected a floating point type");
    const auto tg = lora_target_of(s.kind);
    if (s.is_block_linear && tg && lora.has(*tg)) p.adapted = tg;
    ++(p.adapted ? rep.merged_tensors : rep.copied_tensors);
    plan.push_back(p);
    total_bytes += uint64_t(shape_numel(s.shape)) * dtype_size(opt.dtype);
    largest = std::max(largest, shape_numel(s.shape));
  }
  std::vector<Shard> shards(1);
  for (const Planned& p : plan) {
    const uint64_t b = uint64_t(shape_numel(p.slot->shape)) * dtype_size(opt.dtype);
    if (!shards.back().tensors.empty() && shards.back().bytes + b > opt.max_shard_bytes)
      shards.emplace_back();
    shards.back().tensors.push_back(&p);
    shards.back().bytes += b;
  }
  rep.shards = int64_t(shards.size());

  AtomicDir out(output, opt.overwrite);
  Progress bar("merge", total_bytes, "B", opt.progress);
  std::vector<float> buf(size_t(std::min(largest, kChunk)));
  TensorStreamer streamer(lora, opt.dtype, buf, bar);
  std::map<std::string, std::string> weight_map;
  for (size_t si = 0; si < shards.size(); ++si) {
    const std::string fname = shard_file_name(si, shards.size());
    std::vector<TensorSpec> specs;
    for (const Planned* p : shards[si].tensors) {
      specs.push_back({p->slot->name, opt.dtype, p->slot->shape});
      weight_map[p->slot->name] = fname;
    }
    SafetensorsWriter w(out.path() / fname, std::move(specs), {{"format", "pt"}});
    for (const Planned* p : shards[si].tensors) streamer.write(w, m, *p);
    w.commit();
    rep.output_bytes += fs::file_size(out.path() / fname);
  }
  // total_size as transformers writes it: the tensors' bytes, without headers.
  if (shards.size() > 1)
    write_safetensors_index(out.path() / "model.safetensors.index.json", total_bytes, weight_map);

  // config.json: the model's, now a plain (unquantized) model of the output dtype.
  nlohmann::ordered_json cj;
  try {
    cj = nlohmann::ordered_json::parse(read_text_file(model / "config.json"));
  } catch (const nlohmann::json::exception& e) {
    fail(model.string(), "/config.json: invalid JSON: ", e.what());
  }
  cj.erase("quantization_config");
  cj["torch_dtype"] = std::string(torch_dtype_name(opt.dtype));
  write_file_atomic(out.path() / "config.json", cj.dump(2) + "\n");
  copy_model_side_files(model, out.path());
  out.commit();
  bar.finish();
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return rep;
}

}  // namespace qlora
