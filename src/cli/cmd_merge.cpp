// `qlora merge`: base model + PEFT adapter -> a plain HF folder or a GGUF
// file with W + scale * B A in the linears (tools/merge_model.h).
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>

#include "cli/commands.h"
#include "core/progress.h"
#include "model/builtin.h"
#include "tools/merge_model.h"
#include "train/base_lock.h"

namespace qlora::cli {

namespace {

Runner add_merge(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "merge", "Merge a LoRA adapter into its base model (a plain HF folder or a GGUF file)");
  struct Args {
    std::string model, adapter, output, dtype = "bf16", format;
    bool overwrite = false, no_progress = false, allow_other_base = false;
  };
  auto a = std::make_shared<Args>();
  cmd->add_option("--model", a->model, "HF model folder, bnb 4-bit checkpoint, GGUF file, or builtin:tiny")
      ->required();
  cmd->add_option("--adapter", a->adapter,
                  "PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
      ->required();
  cmd->add_option("-o,--output", a->output, "Output folder, or .gguf file (created complete or not at all)")
      ->required();
  cmd->add_option("--format", a->format,
                  "hf (a Hugging Face folder) or gguf (llama.cpp/Ollama); default: gguf when -o ends in "
                  ".gguf, else hf")
      ->check(CLI::IsMember({"hf", "gguf"}));
  cmd->add_option("--dtype", a->dtype, "Output dtype of the weights (q8_0: GGUF only)")
      ->check(CLI::IsMember({"bf16", "f16", "f32", "q8_0"}))
      ->capture_default_str();
  cmd->add_flag("--overwrite", a->overwrite, "Replace the output folder if it exists");
  cmd->add_flag("--no-progress", a->no_progress, "No progress bar");
  cmd->add_flag("--allow-other-base", a->allow_other_base,
                "Apply an adapter that records another base model's fingerprint (docs/serving.md#base-lock)");
  return [a]() {
    MergeOptions opt;
    const bool gguf_name = std::filesystem::path(a->output).extension() == ".gguf";
    opt.format = merge_format_from_name(a->format.empty() ? (gguf_name ? "gguf" : "hf") : a->format);
    set_merge_dtype(opt, a->dtype);
    opt.overwrite = a->overwrite;
    opt.progress = !a->no_progress && Progress::stderr_is_tty();
    const auto model = resolve_model_path(a->model);
    if (!a->adapter.empty()) {
      const std::string warning = check_base_lock(a->adapter, model, a->allow_other_base);
      if (!warning.empty()) std::fprintf(stderr, "%s\n", warning.c_str());
    }
    const MergeReport r = merge_model(model, a->adapter, a->output, opt);
    std::printf("merged %s + %s -> %s\n", model.string().c_str(), a->adapter.c_str(), a->output.c_str());
    std::printf("  %lld linear weights W + scale*B*A from %s, %lld tensors copied, %s in %s (%s) in %s\n",
                static_cast<long long>(r.merged_tensors),
                r.from_4bit ? "the dequantized 4-bit base" : "the base",
                static_cast<long long>(r.copied_tensors), a->dtype.c_str(),
                opt.format == MergeFormat::Gguf
                    ? "one GGUF file"
                    : (std::to_string(r.shards) + (r.shards == 1 ? " shard" : " shards")).c_str(),
                human_bytes(r.output_bytes).c_str(), human_duration(r.seconds).c_str());
    if (!r.q8_0_fallbacks.empty()) {
      std::string names;
      for (const auto& n : r.q8_0_fallbacks) names += (names.empty() ? "" : ", ") + n;
      std::printf("  note: %zu tensor%s written as F16, not Q8_0 (rows not a multiple of 32 values): %s\n",
                  r.q8_0_fallbacks.size(), r.q8_0_fallbacks.size() == 1 ? "" : "s", names.c_str());
    }
    if (r.from_4bit)
      std::printf(
          "  note: the base was 4-bit, so its quantization error is part of the merged weights; merge onto "
          "the original 16-bit model for deployment (docs/adapters.md)\n");
    return 0;
  };
}

const CommandRegistration kRegistered(70, add_merge);

}  // namespace

}  // namespace qlora::cli
