// The recipe's key schema as data: every section and its keys in the order
// recipe_to_yaml writes them and docs/recipes.md lists them. The validator
// checks unknown keys and override paths against it, so a key added to
// `Recipe` must be added here (the round-trip test fails otherwise).
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace qlora {
struct FieldNames;
struct RecipeData;
}  // namespace qlora

namespace qlora::recipe_schema {

struct Section {
  std::string name;
  std::vector<std::string> keys;
};

// model, quant, lora, data, train, device, output, logging.
const std::vector<Section>& sections();
const Section* find_section(std::string_view name);
std::vector<std::string> section_names();

// The keys data.fields accepts: the members of FieldNames (data/dataset_reader.h).
const std::vector<std::string>& field_keys();
// FieldNames with the recipe's data.fields applied (what the reader needs).
FieldNames field_names(const RecipeData& data);

// "a, b, c".
std::string joined(const std::vector<std::string>& names);

// The candidate closest to `name` by edit distance (case-insensitive,
// transposition = 1 edit), or "" when none is close enough to be a plausible
// typo (at most 2 edits, or a third of the name's length for long names).
std::string closest(std::string_view name, const std::vector<std::string>& candidates);

// Our key path for a name axolotl, torchtune or HF TrainingArguments use
// ("lora_r" -> "lora.rank"); "" when we know none.
std::string foreign_equivalent(std::string_view name);

// The did-you-mean hint for an unknown key `key` met in `section` ("" for the
// top level): "; did you mean 'lora.rank'?" or "".
std::string did_you_mean(const std::string& section, const std::string& key);

}  // namespace qlora::recipe_schema
