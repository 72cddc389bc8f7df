#include "tools/merge_model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>
#include <vector>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/progress.h"
#include "io/gguf_writer.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/gguf_names.h"
#include "model/lora.h"
#include "model/tensor_table.h"
#include "quant/bnb_layout.h"
#include "quant/ggml_quants.h"
#include "tools/gguf_metadata.h"
#include "tools/model_folder.h"
#include "tools/model_input.h"

namespace qlora {

namespace fs = std::filesystem;

namespace {

// Values converted per step (64 MiB of fp32 scratch): a multiple of every
// 4-bit block size, so a chunk never splits a quantization block.
constexpr int64_t kChunk = int64_t(1) << 24;

// How one tensor is written: its element type and, for GGUF, the row order.
struct Encoding {
  DType dtype = DType::BF16;  // F32, F16 or BF16 values...
  bool q8_0 = false;          // ...or Q8_0 blocks (GGUF; rows a multiple of 32)
  int64_t qk_heads = 0;       // > 0: rows interleaved per head as llama.cpp stores q/k (GGUF)
};

struct Planned {
  const TensorSlot* slot;
  size_t index;                       // into ModelInput::slots()
  bool is_4bit;                       // a bitsandbytes weight: dequantized first
  std::optional<LoraTarget> adapted;  // set when W + scale * B A
  Encoding enc;
  uint64_t out_bytes = 0;  // in the output file
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

// DoRA (PEFT's merge): rows [0, rows) of w (rows, IN), already W + s B A,
// each scaled by m[o0 + row] / ||row||: the magnitude over the norm of the
// merged row, as DoraLinearVariant.merge_safe computes it.
void apply_dora_rows(float* w, int64_t o0, int64_t rows, int64_t IN, const float* m) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    float* row = w + r * IN;
    double ss = 0.0;
    for (int64_t i = 0; i < IN; ++i) ss += double(row[i]) * double(row[i]);
    const float factor = m[o0 + r] / float(std::sqrt(ss));
    for (int64_t i = 0; i < IN; ++i) row[i] *= factor;
  }
}

// Streams each planned tensor into a SafetensorsWriter or a GgufWriter (both
// take bytes in declaration order).
class TensorStreamer {
 public:
  TensorStreamer(const LoraWeights& lora, std::vector<float>& buf, Progress& bar)
      : lora_(lora), buf_(buf), bar_(bar) {}

  template <typename Writer>
  void write(Writer& w, const ModelInput& m, const Planned& t) {
    const Encoding& enc = t.enc;
    const int64_t n = shape_numel(t.slot->shape);
    const int64_t cols = t.slot->shape.size() == 2 ? t.slot->shape[1] : 1;
    // Holds this tensor only (a GGUF tensor dequantized); empty for a 4-bit one.
    const StoredTensor in = t.is_4bit ? StoredTensor{} : m.tensor(t.index);
    const DType src_dt = in.dtype;
    const auto src = in.bytes;
    // Already in the output dtype and unchanged: the bytes themselves.
    if (!t.is_4bit && !t.adapted && !enc.q8_0 && enc.qk_heads == 0 && src_dt == enc.dtype) {
      const size_t step = size_t(kChunk) * dtype_size(enc.dtype);
      for (size_t off = 0; off < src.size(); off += step) {
        const auto piece = src.subspan(off, std::min(step, src.size() - off));
        w.write(piece);
        in.release(piece);
        advance(piece.size());
      }
      return;
    }
    std::optional<Quant4Tensor> q;
    std::vector<float> scales;
    if (t.is_4bit) {
      q = load_bnb_weight(*m.safetensors(), t.slot->name);
      scales = q->block_scales();
    }
    // Chunks never split a 4-bit block (kChunk is a multiple of every block
    // size) and, when q/k rows are reordered, hold whole heads.
    int64_t chunk = kChunk;
    int64_t head_rows = 0;
    if (enc.qk_heads > 0) {
      head_rows = t.slot->shape[0] / enc.qk_heads;
      const int64_t unit = std::lcm(head_rows * cols, q ? q->block : int64_t(1));
      chunk = std::max(unit, kChunk / unit * unit);
      if (buf_.size() < size_t(std::min(chunk, n))) buf_.resize(size_t(std::min(chunk, n)));
    }
    // DoRA scales whole rows by their norm: chunks of whole rows (and blocks).
    const bool dora = t.adapted && lora_.config().dora;
    if (dora && head_rows == 0) {
      const int64_t unit = std::lcm(cols, q ? q->block : int64_t(1));
      chunk = std::max(unit, kChunk / unit * unit);
      if (buf_.size() < size_t(std::min(chunk, n))) buf_.resize(size_t(std::min(chunk, n)));
    }
    for (int64_t c = 0; c < n; c += chunk) {
      const int64_t len = std::min(chunk, n - c);
      if (q) {
        dequantize4(q->codes.data() + c / 2, scales.data() + c / q->block, len, q->block, q->type,
                    buf_.data());
      } else {
        tensor_range_to_f32(src, src_dt, c, c + len, buf_.data());
        in.release(src.subspan(size_t(c) * dtype_size(src_dt), size_t(len) * dtype_size(src_dt)));
      }
      if (t.adapted) {
        const LoraTarget tg = *t.adapted;
        add_lora_delta(buf_.data(), c, len, cols, lora_.A(t.slot->layer, tg), lora_.B(t.slot->layer, tg),
                       lora_.rank(t.slot->layer, tg), lora_.scale(t.slot->layer, tg));
        if (dora) apply_dora_rows(buf_.data(), c / cols, len / cols, cols, lora_.M(t.slot->layer, tg));
      }
      if (head_rows > 0) {
        const int64_t rows = len / cols;
        qk_rows_to_gguf(buf_.data(), rows, cols, rows / head_rows);
      }
      if (enc.q8_0) {
        out_.resize(size_t(*ggml_nbytes(GgmlType::Q8_0, len)));
        ggml_quantize_q8_0(buf_.data(), len, out_.data());
      } else {
        out_.resize(size_t(len) * dtype_size(enc.dtype));
        convert_from_f32(buf_.data(), size_t(len), enc.dtype, out_.data());
      }
      w.write(out_.data(), out_.size());
      advance(out_.size());
    }
  }

 private:
  void advance(uint64_t b) { bar_.advance(done_ += b); }

  const LoraWeights& lora_;
  std::vector<float>& buf_;
  Progress& bar_;
  std::vector<uint8_t> out_;
  uint64_t done_ = 0;
};

GgmlType ggml_type_of(const Encoding& e) {
  if (e.q8_0) return GgmlType::Q8_0;
  switch (e.dtype) {
    case DType::F32:
      return GgmlType::F32;
    case DType::F16:
      return GgmlType::F16;
    case DType::BF16:
      return GgmlType::BF16;
    default:
      fail("internal: no GGUF type for ", dtype_name(e.dtype));
  }
}

// The plan's tensors as one safetensors file or several shards + index.
void write_hf_folder(const ModelInput& m, const std::vector<Planned>& plan, TensorStreamer& streamer,
                     const fs::path& output, const MergeOptions& opt, MergeReport& rep) {
  uint64_t total_bytes = 0;
  std::vector<Shard> shards(1);
  for (const Planned& p : plan) {
    total_bytes += p.out_bytes;
    if (!shards.back().tensors.empty() && shards.back().bytes + p.out_bytes > opt.max_shard_bytes)
      shards.emplace_back();
    shards.back().tensors.push_back(&p);
    shards.back().bytes += p.out_bytes;
  }
  rep.shards = int64_t(shards.size());

  AtomicDir out(output, opt.overwrite);
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
  nlohmann::ordered_json cj = m.config_json();
  cj.erase("quantization_config");
  cj["torch_dtype"] = std::string(torch_dtype_name(opt.dtype));
  write_file_atomic(out.path() / "config.json", cj.dump(2) + "\n");
  m.write_side_files(out.path());
  out.commit();
}

// The plan's tensors as one GGUF file: metadata (general.*, the <arch>.*
// hyperparameters, the tokenizer), rope_freqs for Llama 3 scaling, then the
// tensors in model order under llama.cpp's names.
void write_gguf(const ModelInput& m, const std::vector<Planned>& plan, TensorStreamer& streamer,
                const fs::path& output, const MergeOptions& opt, MergeReport& rep) {
  const ModelConfig& cfg = m.config();
  // Gathered before the file is opened: a tokenizer llama.cpp cannot take fails first.
  const GgufKeyValues model_kv = gguf_model_metadata(cfg);
  const GgufKeyValues tok_kv =
      m.is_gguf() ? gguf_tokenizer_metadata(GgufFile(m.path())) : gguf_tokenizer_metadata(m.path(), cfg);
  const std::vector<float> rope_freqs = gguf_rope_freqs(cfg);

  GgufWriter w(output);
  w.add(model_kv.front().first, model_kv.front().second);  // general.architecture first, as llama.cpp writes
  w.add_string("general.type", "model");
  w.add_string("general.name", output.stem().string());
  w.add_u32("general.alignment", kGgufDefaultAlignment);
  w.add_u32("general.file_type", gguf_file_type(ggml_type_of({opt.dtype, opt.q8_0, 0})));
  w.add_u32("general.quantization_version", 2);  // ggml's QK8_0 layout version, as gguf-py writes
  for (size_t i = 1; i < model_kv.size(); ++i) w.add(model_kv[i].first, model_kv[i].second);
  for (const auto& [key, value] : tok_kv) w.add(key, value);

  if (!rope_freqs.empty()) w.add_tensor(kGgufRopeFreqsTensor, {int64_t(rope_freqs.size())}, GgmlType::F32);
  for (const Planned& p : plan) {
    std::vector<int64_t> ne(p.slot->shape.rbegin(), p.slot->shape.rend());  // ggml order: ne[0] = in
    w.add_tensor(gguf_tensor_name(*p.slot), std::move(ne), ggml_type_of(p.enc));
  }
  if (!rope_freqs.empty()) w.write(rope_freqs.data(), rope_freqs.size() * sizeof(float));
  for (const Planned& p : plan) streamer.write(w, m, p);
  w.commit();
  rep.shards = 1;
  rep.output_bytes = fs::file_size(output);
}

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

MergeFormat merge_format_from_name(std::string_view name) {
  if (name == "hf" || name == "safetensors") return MergeFormat::HfFolder;
  if (name == "gguf") return MergeFormat::Gguf;
  fail("--format \"", name, "\": expected hf or gguf");
}

void set_merge_dtype(MergeOptions& opt, std::string_view name) {
  if (name == "q8_0" || name == "Q8_0") {
    opt.q8_0 = true;
    return;
  }
  opt.q8_0 = false;
  opt.dtype = merge_dtype_from_name(name);
}

MergeReport merge_model(const fs::path& model, const fs::path& adapter, const fs::path& output,
                        const MergeOptions& opt) {
  const auto t0 = std::chrono::steady_clock::now();
  const bool gguf = opt.format == MergeFormat::Gguf;
  if (opt.dtype != DType::BF16 && opt.dtype != DType::F16 && opt.dtype != DType::F32)
    fail("merge: output dtype ", dtype_name(opt.dtype), " is not supported (expected BF16, F16 or F32)");
  if (opt.q8_0 && !gguf) fail("merge: q8_0 is a GGUF type; add --format gguf (or choose bf16, f16 or f32)");
  if (!fs::is_directory(adapter))
    fail(adapter.string(),
         ": not an adapter folder (expected adapter_config.json + adapter_model.safetensors)");
  if (same_folder(output, model) || same_folder(output, adapter))
    fail(output.string(), ": the output must differ from the model and the adapter");
  if (fs::exists(output) && !opt.overwrite)
    fail(output.string(), " already exists (pass --overwrite to replace it)");
  if (gguf && fs::is_directory(output))
    fail(output.string(), " is a folder; a GGUF model is one file (name it e.g. merged.gguf)");

  // Checks the files against the architecture's table before writing anything.
  const ModelInput m(model);
  const ModelConfig& cfg = m.config();
  const LoraWeights lora = LoraWeights::load_peft(adapter, cfg);
  const std::vector<TensorSlot>& slots = m.slots();

  // Plan: the table's tensors in model order (a tied model's stray lm_head
  // copy and ignorable buffers are dropped, as quantize does), each with the
  // encoding the output format gives it.
  MergeReport rep;
  std::vector<Planned> plan;
  plan.reserve(slots.size());
  uint64_t total_bytes = 0;
  int64_t largest = 1;
  for (size_t i = 0; i < slots.size(); ++i) {
    const TensorSlot& s = slots[i];
    Planned p{&s, i, m.is_bnb(i), std::nullopt, {opt.dtype, false, 0}};
    rep.from_4bit = rep.from_4bit || p.is_4bit;
    const auto tg = lora_target_of(s.kind);
    if (s.is_block_linear && tg && lora.has(*tg)) p.adapted = tg;
    ++(p.adapted ? rep.merged_tensors : rep.copied_tensors);
    const int64_t n = shape_numel(s.shape);
    if (gguf) {
      // llama.cpp keeps norms and biases in F32; Q8_0 blocks run along rows.
      p.enc.qk_heads = gguf_qk_heads(cfg, s.kind);
      if (s.shape.size() == 1) {
        p.enc.dtype = DType::F32;
      } else if (opt.q8_0 && s.shape.back() % 32 == 0) {
        p.enc.q8_0 = true;
      } else if (opt.q8_0) {
        p.enc.dtype = DType::F16;
        rep.q8_0_fallbacks.push_back(gguf_tensor_name(s));
      }
      p.out_bytes = *ggml_nbytes(ggml_type_of(p.enc), n);
    } else {
      p.out_bytes = uint64_t(n) * dtype_size(opt.dtype);
    }
    plan.push_back(p);
    total_bytes += p.out_bytes;
    largest = std::max(largest, n);
  }

  Progress bar("merge", total_bytes, "B", opt.progress);
  std::vector<float> buf(size_t(std::min(largest, kChunk)));
  TensorStreamer streamer(lora, buf, bar);
  if (gguf)
    write_gguf(m, plan, streamer, output, opt, rep);
  else
    write_hf_folder(m, plan, streamer, output, opt, rep);
  bar.finish();
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return rep;
}

}  // namespace qlora
