// qlora: QLoRA fine-tuning on one GPU. This file only dispatches; errors from
// library code arrive as qlora::Error with their context and leave here as a
// message on stderr and a non-zero exit code.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>
#include <map>
#include <new>
#include <algorithm>

#include "cli/commands.h"
#include "core/error.h"

namespace qlora::cli {
std::vector<std::pair<int, AddCommand>>& command_registry() {
  static std::vector<std::pair<int, AddCommand>> r;  // function-local: safe during static init
  return r;
}
}  // namespace qlora::cli

int main(int argc, char** argv) {
  CLI::App app{"qlora: fine-tune open LLMs with QLoRA (4-bit NF4 base + LoRA adapters) on one GPU"};
  app.set_version_flag("--version", "qlora 0.1.0");
  app.require_subcommand(1);
  std::map<CLI::App*, qlora::cli::Runner> runners;
  auto registry = qlora::cli::command_registry();
  std::sort(registry.begin(), registry.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  for (const auto& [order, add] : registry) {
    const size_t before = app.get_subcommands({}).size();
    qlora::cli::Runner r = add(app);
    runners[app.get_subcommands({}).at(before)] = std::move(r);
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }
  try {
    for (auto& [sub, run] : runners)
      if (sub->parsed()) return run();
    return 2;
  } catch (const qlora::Error& e) {
    std::fprintf(stderr, "qlora: error: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "qlora: error: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "qlora: internal error: %s\n", e.what());
    return 1;
  }
}
