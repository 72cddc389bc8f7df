// Each command file registers its CLI11 subcommand with a static
// CommandRegistration (the CLI sources are linked straight into the binary,
// so the registrations always run); main() adds them in `order`. Commands only
// translate arguments; the work lives in src/tools and below.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>
#include <utility>
#include <vector>

namespace qlora::cli {

using Runner = std::function<int()>;
using AddCommand = Runner (*)(CLI::App& app);

std::vector<std::pair<int, AddCommand>>& command_registry();

struct CommandRegistration {
  CommandRegistration(int order, AddCommand add) { command_registry().emplace_back(order, add); }
};

}  // namespace qlora::cli
