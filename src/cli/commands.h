// Each command registers its CLI11 subcommand and the function that runs it.
// Commands only translate arguments; the work lives in src/tools and below.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>

namespace qlora::cli {

using Runner = std::function<int()>;

Runner add_quantize(CLI::App& app);
Runner add_inspect(CLI::App& app);

}  // namespace qlora::cli
