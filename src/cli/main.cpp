// qlora: QLoRA fine-tuning on one GPU. This file only dispatches; errors from
// library code arrive as qlora::Error with their context and leave here as a
// message on stderr and a non-zero exit code.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <new>
#include <unistd.h>
#include <algorithm>

#include "cli/commands.h"
#include "core/error.h"

namespace qlora::cli {
std::vector<std::pair<int, AddCommand>>& command_registry() {
  static std::vector<std::pair<int, AddCommand>> r;  // function-local: safe during static init
  return r;
}
}  // namespace qlora::cli

namespace {

// OpenMP threads spin while they wait for work (libgomp: up to ~300k spins),
// which on a few busy cores starves OpenBLAS's own threads and everything
// else: the demo took 68 s with spinning and 8 s with passive waits on a
// loaded 2-core machine (docs/engine.md). libgomp reads OMP_WAIT_POLICY once,
// when it loads, before main(); so unless the user chose a policy, set
// "passive" and run this program again. If exec fails we just go on.
void ensure_passive_openmp_waits(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") || std::getenv("GOMP_SPINCOUNT")) return;
  if (setenv("OMP_WAIT_POLICY", "passive", 1) != 0) return;
  execv("/proc/self/exe", argv);
}

}  // namespace

int main(int argc, char** argv) {
  ensure_passive_openmp_waits(argv);
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
