#include <cstdio>
#include <string>

#include "cli/commands.h"
#include "core/error.h"
#include "core/progress.h"
#include "model/builtin.h"
#include "tools/quantize_model.h"

namespace qlora::cli {

namespace {

// "5GB", "512MiB", "1000000" -> bytes.
uint64_t parse_size(const std::string& s) {
  size_t pos = 0;
  double v = 0;
  try {
    v = std::stod(s, &pos);
  } catch (const std::exception&) {
    fail("--shard-size \"", s, "\": expected a size such as 5GB or 512MiB");
  }
  const std::string unit = s.substr(pos);
  const std::pair<const char*, double> units[] = {
      {"", 1},     {"B", 1},        {"KB", 1e3},        {"MB", 1e6},
      {"GB", 1e9}, {"KiB", 1024.0}, {"MiB", 1048576.0}, {"GiB", 1073741824.0}};
  for (const auto& [u, m] : units)
    if (unit == u && v > 0) return uint64_t(v * m);
  fail("--shard-size \"", s, "\": expected a positive size such as 5GB or 512MiB");
}

}  // namespace

namespace {

Runner add_quantize(CLI::App& app) {
  auto* cmd = app.add_subcommand("quantize",
                                 "Quantize an HF model folder or GGUF file to the bitsandbytes 4-bit layout "
                                 "(or convert it: --type none)");
  struct Args {
    std::string input, output, type = "nf4", shard_size = "5GB", device = "auto";
    int64_t block = 64;
    bool no_double_quant = false, force = false, no_progress = false;
  };
  auto a = std::make_shared<Args>();
  cmd->add_option("model", a->input,
                  "HF model folder (config.json + safetensors), GGUF file, or builtin:tiny")
      ->required();
  cmd->add_option("-o,--output", a->output, "Output folder (created complete or not at all)")->required();
  cmd->add_option("--type", a->type,
                  "4-bit data type; none writes a plain BF16 folder (GGUF -> HF conversion)")
      ->check(CLI::IsMember({"nf4", "fp4", "none"}))
      ->capture_default_str();
  cmd->add_option("--block-size", a->block, "Values per absmax scale: 32..4096, a power of two")
      ->capture_default_str();
  cmd->add_flag("--no-double-quant", a->no_double_quant,
                "Keep absmax scales in fp32 (4.5 instead of 4.127 bits)");
  cmd->add_option("--shard-size", a->shard_size, "Largest output shard")->capture_default_str();
  cmd->add_option("--device", a->device,
                  "Where to quantize: auto (the GPU when one is usable), cpu or cuda; the output is the same")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}))
      ->capture_default_str();
  cmd->add_flag("--force", a->force, "Replace the output folder if it exists");
  cmd->add_flag("--no-progress", a->no_progress, "No progress bar");
  return [a]() {
    QuantizeOptions opt;
    opt.quantize = a->type != "none";
    if (opt.quantize) opt.type = *quant4_from_name(a->type);
    opt.block = a->block;
    opt.double_quant = !a->no_double_quant;
    opt.force = a->force;
    opt.max_shard_bytes = parse_size(a->shard_size);
    opt.progress = !a->no_progress && Progress::stderr_is_tty();
    opt.device = a->device == "cuda"  ? QuantDevice::cuda
                 : a->device == "cpu" ? QuantDevice::cpu
                                      : QuantDevice::automatic;
    const auto input = resolve_model_path(a->input);
    const QuantizeReport r = quantize_model(input, a->output, opt);
    std::printf("quantized %s -> %s\n", input.string().c_str(), a->output.c_str());
    if (opt.quantize)
      std::printf("  %lld linear weights to %s (block %lld%s), %lld tensors kept in BF16, %lld shard%s\n",
                  static_cast<long long>(r.quantized_tensors), a->type.c_str(),
                  static_cast<long long>(opt.block), opt.double_quant ? ", double quant" : "",
                  static_cast<long long>(r.kept_tensors), static_cast<long long>(r.shards),
                  r.shards == 1 ? "" : "s");
    else
      std::printf("  %lld tensors in BF16, %lld shard%s\n", static_cast<long long>(r.kept_tensors),
                  static_cast<long long>(r.shards), r.shards == 1 ? "" : "s");
    const std::string note = r.device_note.empty() ? "" : " (" + r.device_note + ")";
    std::printf("  %s -> %s (%.3f bits/parameter over %lld parameters) in %s, %s/s on %s%s\n",
                human_bytes(r.input_bytes).c_str(), human_bytes(r.output_bytes).c_str(), r.bits_per_param(),
                static_cast<long long>(r.params), human_duration(r.seconds).c_str(),
                human_bytes(uint64_t(double(r.input_bytes) / std::max(r.seconds, 1e-9))).c_str(),
                r.device_name.c_str(), note.c_str());
    return 0;
  };
}

const CommandRegistration kRegistered(20, add_quantize);

}  // namespace

}  // namespace qlora::cli
