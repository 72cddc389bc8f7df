// A recipe: YAML, then after a NUL byte the command-line overrides
// (key.path=value, one a line). A recipe that validates is written back to
// YAML, which must parse again (what `qlora run` stores in the run folder).
#include <sstream>

#include "fuzz_util.h"
#include "recipe/recipe.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qlora;
  const std::string_view in = fuzz::as_text(data, size);
  const size_t nul = in.find('\0');
  const std::string yaml(in.substr(0, nul));
  std::vector<std::string> overrides;
  if (nul != std::string_view::npos) {
    std::istringstream rest{std::string(in.substr(nul + 1))};
    for (std::string line; std::getline(rest, line);) overrides.push_back(line);
  }
  fuzz::expect_only_qlora_errors([&] {
    const Recipe r = parse_recipe(yaml, "fuzz.yaml", fuzz::scratch(), overrides);
    (void)recipe_training_hash(r);
    const Recipe again = parse_recipe(recipe_to_yaml(r), "fuzz-again.yaml", fuzz::scratch());
    if (recipe_training_hash(again) != recipe_training_hash(r)) std::abort();  // the stored recipe must mean the same
  });
  return 0;
}
