#include "train/checkpoint.h"

#include <algorithm>
#include <charconv>
#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/json_integer.h"
#include "core/json_parse.h"
#include "data/token_cache.h"
#include "io/gguf.h"
#include "io/safetensors.h"
#include "train/peft_adapter.h"

namespace qlora {

namespace fs = std::filesystem;

namespace {

constexpr const char* kStepPrefix = "step-";
constexpr const char* kOptimizerFile = "optimizer.safetensors";
constexpr const char* kStateFile = "state.json";
constexpr const char* kAdapterDir = "adapter";
constexpr const char* kOptimizerFormat = "qlora-optimizer";

// The step of a "step-<digits>" folder name; nullopt for anything else
// (temporary folders are "step-<digits>.tmp-<pid>-<n>").
std::optional<int64_t> step_of(const std::string& name) {
  const size_t p = std::strlen(kStepPrefix);
  if (name.size() <= p || name.compare(0, p, kStepPrefix) != 0 || name.size() - p > 18) return std::nullopt;
  int64_t v = 0;
  for (size_t i = p; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return std::nullopt;
    v = v * 10 + (name[i] - '0');
  }
  return v;
}

// All step-N folders (valid or not), sorted by step.
std::vector<std::pair<int64_t, fs::path>> step_folders(const fs::path& output_dir) {
  std::vector<std::pair<int64_t, fs::path>> r;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(checkpoints_dir(output_dir), ec)) {
    const auto s = step_of(e.path().filename().string());
    if (s && e.is_directory(ec)) r.emplace_back(*s, e.path());
  }
  std::sort(r.begin(), r.end());
  return r;
}

nlohmann::json optional_json(const std::optional<double>& v) {
  return v ? nlohmann::json(*v) : nlohmann::json(nullptr);
}

std::optional<double> optional_from(const nlohmann::json& j, const char* key) {
  if (!j.contains(key) || j.at(key).is_null()) return std::nullopt;
  return j.at(key).get<double>();
}

// The shortest decimal text that reads back as the same double.
std::string number_repr(double v) {
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, res.ptr);
}

// The files of a checkpoint besides state.json, which records their sizes
// and digests ("checksums") and a digest of itself ("state_digest").
constexpr const char* kChecksummedFiles[] = {"adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                                             kOptimizerFile};

std::string file_digest(const fs::path& p) {
  ContentHash h;
  h.add_file(p);
  return h.hex();
}

// The digest of state.json's content without its "state_digest" key (keys
// are sorted and numbers round-trip, so parse + dump reproduces the text hashed).
std::string state_digest(nlohmann::json j) {
  j.erase("state_digest");
  ContentHash h;
  h.add(j.dump());
  return h.hex();
}

std::string state_json(const TrainState& s, const Optimizer& opt, const fs::path& dir) {
  nlohmann::json j;
  j["format_version"] = kCheckpointFormatVersion;
  j["step"] = s.step;
  j["epoch"] = s.epoch;
  j["micro_batch_cursor"] = s.cursor;
  j["forward_count"] = s.forward_count;
  j["rng"] = s.rng;
  j["tokens_seen"] = s.tokens_seen;
  j["wall_seconds"] = s.wall_seconds;
  j["last_loss"] = optional_json(s.last_loss);
  j["last_eval_loss"] = optional_json(s.last_eval_loss);
  j["best_eval_loss"] = optional_json(s.best_eval_loss);
  j["recipe_hash"] = s.recipe_hash;
  j["base_fingerprint"] = s.base_fingerprint;
  j["optimizer"] = optimizer_kind_name(opt.config().kind);
  j["qlora_version"] = qlora_version();
  nlohmann::json sums = nlohmann::json::object();
  for (const char* f : kChecksummedFiles)
    sums[f] = {{"bytes", fs::file_size(dir / f)}, {"digest", file_digest(dir / f)}};
  j["checksums"] = sums;
  j["state_digest"] = state_digest(j);
  return j.dump(2) + "\n";
}

void write_optimizer_state(const fs::path& file, Optimizer& opt) {
  const auto state = opt.state();
  std::vector<TensorSpec> specs;
  for (const auto& t : state) specs.push_back({t.name, DType::F32, {int64_t(t.n)}});
  std::map<std::string, std::string> metadata{{"format", kOptimizerFormat},
                                              {"optimizer", optimizer_kind_name(opt.config().kind)},
                                              {"steps", std::to_string(opt.steps())}};
  // LoRA+ changes every later update of B: kept beside the state it shaped
  // (exact decimal text; absent means 1, as files before LoRA+ were written).
  if (opt.config().plus_lr_ratio != 1.0) metadata["plus_lr_ratio"] = number_repr(opt.config().plus_lr_ratio);
  SafetensorsWriter w(file, specs, metadata);
  for (const auto& t : state) w.write(t.data, t.n * sizeof(float));
  w.commit();
}

void prune(const fs::path& output_dir, int64_t new_step, int64_t keep_last) {
  const auto valid = list_checkpoints(output_dir);
  const auto folders = step_folders(output_dir);
  // Walking from the newest older folder down: keep keep_last - 1 valid ones;
  // the rest, and invalid ones (garbage of a failed copy), go.
  int64_t kept = 0;
  std::error_code ec;
  for (auto it = folders.rbegin(); it != folders.rend(); ++it) {
    if (it->first >= new_step) continue;  // the new one, or later steps: not older
    const bool ok = std::find(valid.begin(), valid.end(), it->second) != valid.end();
    if (ok && kept < keep_last - 1) {
      ++kept;
      continue;
    }
    fs::remove_all(it->second, ec);  // best effort: the new checkpoint is already safe
  }
  remove_stale_temporaries(checkpoints_dir(output_dir), kStepPrefix);
}

// What is wrong with a checkpoint folder; nullopt when it is valid. The
// sizes recorded in state.json are always checked (cheap: catches a
// truncated file); with `digests`, every file's content too (what resume does).
std::optional<std::string> checkpoint_problem(const fs::path& dir, int64_t step, bool digests) {
  try {
    const TrainState s = read_train_state(dir);
    if (s.step != step) return str("state.json says step ", s.step);
    std::ifstream sf(dir / kStateFile);
    const nlohmann::json j = parse_json(sf, (dir / kStateFile).string());
    if (j.contains("checksums")) {  // written by every qlora since checksums came (docs/reliability.md)
      if (!j.contains("state_digest") || j.at("state_digest") != state_digest(j))
        return std::string("state.json does not match its digest (edited or damaged)");
      for (const char* f : kChecksummedFiles) {
        const auto& c = j.at("checksums").at(f);
        std::error_code ec;
        const uint64_t size = fs::file_size(dir / f, ec);
        if (ec) return str(f, ": ", ec.message());
        const uint64_t recorded = json_integer<uint64_t>(c.at("bytes"), str("state.json: checksums.", f, ".bytes"));
        if (size != recorded)
          return str(f, " has ", size, " bytes, state.json recorded ", recorded,
                     " (truncated or replaced)");
        if (digests && file_digest(dir / f) != c.at("digest").get<std::string>())
          return str(f, " does not match its checksum (damaged or altered)");
      }
    }
    const SafetensorsFile opt(dir / kOptimizerFile);
    const SafetensorsFile adapter(dir / kAdapterDir / "adapter_model.safetensors");
    std::ifstream f(dir / kAdapterDir / "adapter_config.json");
    if (!f) return std::string("adapter/adapter_config.json is missing");
    if (!nlohmann::json::accept(f)) return std::string("adapter/adapter_config.json is not valid JSON");
    return std::nullopt;
  } catch (const std::exception& e) {
    return std::string(e.what());
  }
}

bool is_valid_checkpoint(const fs::path& dir, int64_t step) {
  return !checkpoint_problem(dir, step, /*digests=*/false);
}

}  // namespace

fs::path checkpoints_dir(const fs::path& output_dir) {
  return output_dir / "checkpoints";
}

fs::path checkpoint_path(const fs::path& output_dir, int64_t step) {
  std::string digits = std::to_string(step);
  if (digits.size() < 8) digits.insert(0, 8 - digits.size(), '0');
  return checkpoints_dir(output_dir) / (kStepPrefix + digits);
}

fs::path save_checkpoint(const fs::path& output_dir, const TrainState& state, const LoraWeights& lora,
                         const ModelConfig& cfg, Optimizer& opt, const std::string& base_model_name,
                         int64_t keep_last) {
  if (keep_last < 1) fail("keep_checkpoints must be >= 1, got ", keep_last);
  if (state.step < 0) fail("checkpoint step must be >= 0, got ", state.step);
  const fs::path dir = checkpoint_path(output_dir, state.step);
  const auto previous = latest_checkpoint(output_dir);
  try {
    std::error_code ec;
    fs::create_directories(checkpoints_dir(output_dir), ec);
    if (ec) fail(checkpoints_dir(output_dir).string(), ": cannot create: ", ec.message());
    AtomicDir out(dir, /*replace=*/true);
    save_peft_adapter(lora, cfg, out.path() / kAdapterDir, base_model_name, state.base_fingerprint);
    write_optimizer_state(out.path() / kOptimizerFile, opt);
    write_file_atomic(out.path() / kStateFile, state_json(state, opt, out.path()));
    out.commit();
  } catch (const std::exception& e) {
    fail("cannot save checkpoint ", dir.string(), ": ", e.what(),
         previous ? str("; the previous checkpoint ", previous->string(), " is intact")
                  : std::string("; there is no earlier checkpoint"));
  }
  prune(output_dir, state.step, keep_last);
  return dir;
}

std::vector<fs::path> list_checkpoints(const fs::path& output_dir) {
  std::vector<fs::path> r;
  for (const auto& [s, p] : step_folders(output_dir))
    if (is_valid_checkpoint(p, s)) r.push_back(p);
  return r;
}

std::optional<fs::path> latest_checkpoint(const fs::path& output_dir) {
  const auto folders = step_folders(output_dir);
  for (auto it = folders.rbegin(); it != folders.rend(); ++it)
    if (is_valid_checkpoint(it->second, it->first)) return it->second;
  return std::nullopt;
}

ResumePoint find_resume_checkpoint(const fs::path& output_dir) {
  ResumePoint r;
  const auto folders = step_folders(output_dir);
  for (auto it = folders.rbegin(); it != folders.rend(); ++it) {
    const auto problem = checkpoint_problem(it->second, it->first, /*digests=*/true);
    if (!problem) {
      r.checkpoint = it->second;
      return r;
    }
    r.skipped.push_back(str("checkpoint ", it->second.string(), " is damaged (", *problem, "): skipped"));
  }
  return r;
}

TrainState read_train_state(const fs::path& ckpt) {
  const fs::path file = ckpt / kStateFile;
  std::ifstream f(file);
  if (!f) fail("cannot open ", file.string(), " (not a checkpoint folder?)");
  nlohmann::json j;
  try {
    j = parse_json(f, file.string());
  } catch (const nlohmann::json::exception& e) {
    fail(file.string(), ": invalid JSON: ", e.what());
  }
  TrainState s;
  try {
    const int64_t version = json_integer<int64_t>(j.at("format_version"), file.string() + ": format_version");
    if (version != kCheckpointFormatVersion)
      fail(file.string(), ": checkpoint format version ", version, ", this qlora reads version ",
           kCheckpointFormatVersion);
    s.step = json_integer<int64_t>(j.at("step"), file.string() + ": step");
    s.epoch = json_integer<int64_t>(j.at("epoch"), file.string() + ": epoch");
    s.cursor = json_integer<int64_t>(j.at("micro_batch_cursor"), file.string() + ": micro_batch_cursor");
    s.forward_count = json_integer<uint64_t>(j.at("forward_count"), file.string() + ": forward_count");
    s.rng = json_integer<uint64_t>(j.at("rng"), file.string() + ": rng");
    s.tokens_seen = json_integer<int64_t>(j.at("tokens_seen"), file.string() + ": tokens_seen");
    s.wall_seconds = j.at("wall_seconds").get<double>();
    s.last_loss = optional_from(j, "last_loss");
    s.last_eval_loss = optional_from(j, "last_eval_loss");
    s.best_eval_loss = optional_from(j, "best_eval_loss");
    s.recipe_hash = j.at("recipe_hash").get<std::string>();
    s.base_fingerprint = j.at("base_fingerprint").get<std::string>();
  } catch (const nlohmann::json::exception& e) {
    fail(file.string(), ": ", e.what());
  }
  s.source = ckpt;
  return s;
}

TrainState load_checkpoint(const fs::path& ckpt, LoraWeights& lora, Optimizer& opt, const ModelConfig& cfg) {
  TrainState s = read_train_state(ckpt);

  const LoraWeights loaded = load_matching_adapter(ckpt / kAdapterDir, lora, cfg);

  // Optimizer: the same state arrays, by name and length.
  const SafetensorsFile of(ckpt / kOptimizerFile);
  const auto& md = of.metadata();
  auto meta = [&](const char* key) -> const std::string& {
    const auto it = md.find(key);
    if (it == md.end()) fail(of.path().string(), ": metadata key \"", key, "\" is missing");
    return it->second;
  };
  if (meta("format") != kOptimizerFormat)
    fail(of.path().string(), ": not a qlora optimizer state (format \"", meta("format"), "\")");
  int64_t steps = 0;
  try {
    steps = std::stoll(meta("steps"));
  } catch (const std::exception&) {
    fail(of.path().string(), ": metadata \"steps\" is not an integer: \"", meta("steps"), "\"");
  }
  {
    const auto it = md.find("plus_lr_ratio");
    const std::string have = it == md.end() ? number_repr(1.0) : it->second;
    if (have != number_repr(opt.config().plus_lr_ratio))
      fail(of.path().string(), ": the checkpoint was trained with lora.plus_lr_ratio ", have, ", this run uses ",
           number_repr(opt.config().plus_lr_ratio));
  }
  const auto state = opt.state();
  for (const auto& t : state) {
    const TensorInfo* info = of.find(t.name);
    if (!info)
      fail(of.path().string(), ": tensor ", t.name, " is missing (the checkpoint was written by optimizer ",
           meta("optimizer"), ", this run uses ", optimizer_kind_name(opt.config().kind), ")");
    if (info->dtype != DType::F32 || info->shape != Shape{int64_t(t.n)})
      fail(of.path().string(), ": tensor ", t.name, " is ", dtype_name(info->dtype), " ",
           shape_str(info->shape), ", expected F32 [", t.n, "]");
  }
  if (of.tensors().size() != state.size())
    fail(of.path().string(), ": holds ", of.tensors().size(), " state tensors (optimizer ", meta("optimizer"),
         "), this run's ", optimizer_kind_name(opt.config().kind), " has ", state.size());

  // Everything checked: restore.
  std::memcpy(lora.flat_params(), loaded.flat_params(), lora.flat_size() * sizeof(float));
  for (const auto& t : state) std::memcpy(t.data, of.data(*of.find(t.name)).data(), t.n * sizeof(float));
  opt.set_steps(steps);
  return s;
}

namespace {

// A few pages of a file: start, middle and end of [start, size).
void add_file_samples(ContentHash& h, std::ifstream& in, const fs::path& p, uint64_t start, uint64_t size) {
  constexpr uint64_t kSample = 4096;
  const uint64_t data_size = size - start;
  std::string buf;
  for (uint64_t at : {uint64_t(0), data_size / 2, data_size > kSample ? data_size - kSample : 0}) {
    const uint64_t len = std::min(kSample, data_size - std::min(at, data_size));
    buf.assign(size_t(len), '\0');
    in.seekg(std::streamoff(start + at));
    if (!in.read(buf.data(), std::streamsize(len))) fail(p.string(), ": read error while fingerprinting");
    h.add(buf);
  }
}

// A GGUF model: its size, its first 64 KiB (header and metadata, which name
// the model) and pages of the rest.
std::string gguf_fingerprint(const fs::path& file) {
  ContentHash h;
  h.add("qlora base model fingerprint v1 gguf\n");
  std::error_code ec;
  const uint64_t size = fs::file_size(file, ec);
  std::ifstream in(file, std::ios::binary);
  if (!in || ec) fail(file.string(), ": cannot read the model file");
  h.add(std::string_view(reinterpret_cast<const char*>(&size), sizeof size));
  add_file_samples(h, in, file, 0, std::min<uint64_t>(size, 65536));
  add_file_samples(h, in, file, 0, size);
  return h.hex().substr(0, 16);
}

}  // namespace

std::string base_model_fingerprint(const fs::path& model_dir) {
  std::error_code ec;
  if (is_gguf_file(model_dir)) return gguf_fingerprint(model_dir);
  if (!fs::is_directory(model_dir, ec)) fail(model_dir.string(), ": not a model folder");
  ContentHash h;
  h.add("qlora base model fingerprint v1\n");
  const fs::path config = model_dir / "config.json";
  if (fs::is_regular_file(config, ec)) {
    h.add("config.json\n");
    h.add_file(config);
  }
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(model_dir, ec))
    if (e.path().extension() == ".safetensors" && e.is_regular_file(ec)) files.push_back(e.path());
  std::sort(files.begin(), files.end());
  for (const auto& p : files) {
    std::ifstream in(p, std::ios::binary);
    const uint64_t size = fs::file_size(p, ec);
    uint64_t n = 0;
    if (!in || ec || !in.read(reinterpret_cast<char*>(&n), 8) || n > size - 8)
      fail(p.string(), ": not a safetensors file (cannot read its header)");
    std::string header(size_t(n), '\0');
    if (!in.read(header.data(), std::streamsize(n))) fail(p.string(), ": cannot read its header");
    h.add(p.filename().string());
    h.add(header);
    h.add(std::string_view(reinterpret_cast<const char*>(&size), sizeof size));
    // A few pages of data: start, middle and end of the data section.
    add_file_samples(h, in, p, 8 + n, size);
  }
  // 128 bits folded to 64: a 16-digit id is plenty to tell models apart.
  const std::string hex = h.hex();
  const uint64_t folded =
      std::stoull(hex.substr(0, 16), nullptr, 16) ^ std::stoull(hex.substr(16), nullptr, 16);
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  for (int shift = 60; shift >= 0; shift -= 4) out += kDigits[(folded >> shift) & 0xF];
  return out;
}

void check_resume_compatible(const TrainState& state, const std::string& recipe_hash,
                             const std::string& fingerprint) {
  const std::string where =
      state.source.empty() ? std::string("checkpoint") : "checkpoint " + state.source.string();
  if (state.base_fingerprint != fingerprint)
    fail(where, " was trained on another base model (fingerprint ", state.base_fingerprint, ", now ",
         fingerprint, "): it cannot be resumed on this one; use --overwrite to start again");
  if (state.recipe_hash != recipe_hash)
    fail(where, " was trained with a different recipe (hash ", state.recipe_hash, ", now ", recipe_hash,
         "): changed keys cannot be resumed; use --overwrite to start again");
}

}  // namespace qlora
