// `qlora export`: a PEFT adapter in another tool's format; today llama.cpp's
// LoRA adapter GGUF (tools/export_gguf.h).
#include <cstdio>
#include <memory>
#include <string>

#include "cli/commands.h"
#include "core/progress.h"
#include "model/builtin.h"
#include "tools/export_gguf.h"

namespace qlora::cli {

namespace {

Runner add_export(CLI::App& app) {
  auto* cmd = app.add_subcommand("export", "Write a LoRA adapter as a llama.cpp / Ollama adapter GGUF");
  struct Args {
    std::string adapter, output, model, format = "gguf", dtype = "f32";
    bool overwrite = false;
  };
  auto a = std::make_shared<Args>();
  cmd->add_option("--adapter", a->adapter,
                  "PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
      ->required();
  cmd->add_option("-o,--output", a->output, "Output file (written complete or not at all)")->required();
  cmd->add_option("--format", a->format, "Output format")
      ->check(CLI::IsMember({"gguf"}))
      ->capture_default_str();
  cmd->add_option("--model", a->model,
                  "Base model (HF folder, GGUF file or builtin:tiny) for the architecture and head counts; "
                  "default: the adapter's base_model_name_or_path when it is a local path");
  cmd->add_option("--dtype", a->dtype, "Element type of lora_a / lora_b")
      ->check(CLI::IsMember({"f32", "f16", "bf16"}))
      ->capture_default_str();
  cmd->add_flag("--overwrite", a->overwrite, "Replace the output file if it exists");
  return [a]() {
    AdapterExportOptions opt;
    opt.type = adapter_gguf_type_from_name(a->dtype);
    opt.overwrite = a->overwrite;
    if (!a->model.empty()) opt.model = resolve_model_path(a->model);
    const AdapterExportReport r = export_adapter_gguf(a->adapter, a->output, opt);
    std::printf("exported %s -> %s\n", a->adapter.c_str(), a->output.c_str());
    std::printf("  llama.cpp LoRA adapter for %s (architecture %s): %lld tensors, rank %lld, %s, %s\n",
                r.model.string().c_str(), r.architecture.c_str(), static_cast<long long>(r.tensors),
                static_cast<long long>(r.rank), a->dtype.c_str(), human_bytes(r.output_bytes).c_str());
    if (r.rslora)
      std::printf(
          "  rsLoRA: adapter.lora.alpha = %g = %g * sqrt(%lld), so llama.cpp's alpha / r equals PEFT's "
          "alpha / sqrt(r)\n",
          r.written_alpha, r.alpha, static_cast<long long>(r.rank));
    else
      std::printf("  adapter.lora.alpha = %g (scale alpha / r = %g)\n", r.written_alpha,
                  r.written_alpha / double(r.rank));
    std::printf("  use: llama-cli -m BASE.gguf --lora %s   (Ollama: ADAPTER %s)\n", a->output.c_str(),
                a->output.c_str());
    return 0;
  };
}

const CommandRegistration kRegistered(75, add_export);

}  // namespace

}  // namespace qlora::cli
