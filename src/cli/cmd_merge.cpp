// `qlora merge`: base model + PEFT adapter -> a plain HF folder with
// W + scale * B A in the linears (tools/merge_model.h).
#include <cstdio>
#include <memory>
#include <string>

#include "cli/commands.h"
#include "core/progress.h"
#include "model/builtin.h"
#include "tools/merge_model.h"

namespace qlora::cli {

namespace {

Runner add_merge(CLI::App& app) {
  auto* cmd = app.add_subcommand("merge", "Merge a LoRA adapter into its base model (a plain HF folder)");
  struct Args {
    std::string model, adapter, output, dtype = "bf16";
    bool overwrite = false, no_progress = false;
  };
  auto a = std::make_shared<Args>();
  cmd->add_option("--model", a->model, "HF model folder, bnb 4-bit checkpoint, or builtin:tiny")->required();
  cmd->add_option("--adapter", a->adapter,
                  "PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
      ->required();
  cmd->add_option("-o,--output", a->output, "Output folder (created complete or not at all)")->required();
  cmd->add_option("--dtype", a->dtype, "Output dtype of the weights")
      ->check(CLI::IsMember({"bf16", "f16", "f32"}))
      ->capture_default_str();
  cmd->add_flag("--overwrite", a->overwrite, "Replace the output folder if it exists");
  cmd->add_flag("--no-progress", a->no_progress, "No progress bar");
  return [a]() {
    MergeOptions opt;
    opt.dtype = merge_dtype_from_name(a->dtype);
    opt.overwrite = a->overwrite;
    opt.progress = !a->no_progress && Progress::stderr_is_tty();
    const auto model = resolve_model_path(a->model);
    const MergeReport r = merge_model(model, a->adapter, a->output, opt);
    std::printf("merged %s + %s -> %s\n", model.string().c_str(), a->adapter.c_str(), a->output.c_str());
    std::printf(
        "  %lld linear weights W + scale*B*A from %s, %lld tensors copied, %s in %lld shard%s (%s) in %s\n",
        static_cast<long long>(r.merged_tensors), r.from_4bit ? "the dequantized 4-bit base" : "the base",
        static_cast<long long>(r.copied_tensors), a->dtype.c_str(), static_cast<long long>(r.shards),
        r.shards == 1 ? "" : "s", human_bytes(r.output_bytes).c_str(), human_duration(r.seconds).c_str());
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
