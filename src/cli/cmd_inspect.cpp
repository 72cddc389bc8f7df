#include <cstdio>
#include <string>

#include "cli/commands.h"
#include "model/builtin.h"
#include "tools/inspect_model.h"

namespace qlora::cli {

namespace {

Runner add_inspect(CLI::App& app) {
  auto* cmd =
      app.add_subcommand("inspect", "Show the architecture, tensors and quantization of a model or file");
  struct Args {
    std::string path;
    bool json = false;
  };
  auto a = std::make_shared<Args>();
  cmd->add_option("path", a->path, "A .safetensors file, an HF model folder, a GGUF file, or builtin:tiny")
      ->required();
  cmd->add_flag("--json", a->json, "Machine-readable output");
  return [a]() {
    const Inspection in = inspect_model(resolve_model_path(a->path));
    const std::string out = a->json ? inspection_json(in) : inspection_text(in);
    std::fwrite(out.data(), 1, out.size(), stdout);
    return 0;
  };
}

const CommandRegistration kRegistered(30, add_inspect);

}  // namespace

}  // namespace qlora::cli
