#include "recipe/recipe_schema.h"

#include <algorithm>
#include <cctype>
#include <utility>

#include "core/error.h"
#include "data/dataset_reader.h"
#include "recipe/recipe.h"

namespace qlora::recipe_schema {

const std::vector<Section>& sections() {
  static const std::vector<Section> kSections{
      {"model", {"path", "preset"}},
      {"quant", {"type", "block_size", "double_quant"}},
      {"lora",
       {"rank", "alpha", "dropout", "rslora", "targets", "init", "rank_pattern", "alpha_pattern", "dora",
        "plus_lr_ratio"}},
      {"data",
       {"train", "val", "format", "fields", "chat_template", "seq_len", "packing", "train_on_inputs",
        "over_long", "on_bad_record", "cache", "threads"}},
      {"train", {"epochs",        "max_steps", "micro_batch",  "grad_accum", "lr",
                 "schedule",      "warmup",    "min_lr_ratio", "optimizer",  "weight_decay",
                 "beta1",         "beta2",     "eps",          "momentum",   "max_grad_norm",
                 "checkpointing", "seed",      "eval_every",   "save_every", "keep_checkpoints"}},
      {"device", {"backend", "memory_budget", "threads"}},
      {"output", {"dir", "merge", "gguf"}},
      {"logging", {"every", "report", "sample_prompts", "sample_max_new_tokens"}},
  };
  return kSections;
}

const Section* find_section(std::string_view name) {
  for (const auto& s : sections())
    if (s.name == name) return &s;
  return nullptr;
}

std::vector<std::string> section_names() {
  std::vector<std::string> v;
  for (const auto& s : sections()) v.push_back(s.name);
  return v;
}

namespace {

// One table for the accepted names and for applying them, so the two cannot drift.
using FieldMember = std::string FieldNames::*;
const std::vector<std::pair<std::string, FieldMember>>& field_members() {
  static const std::vector<std::pair<std::string, FieldMember>> kMembers{
      {"instruction", &FieldNames::instruction},
      {"input", &FieldNames::input},
      {"output", &FieldNames::output},
      {"system", &FieldNames::system},
      {"messages", &FieldNames::messages},
      {"role", &FieldNames::role},
      {"content", &FieldNames::content},
      {"conversations", &FieldNames::conversations},
      {"from", &FieldNames::from},
      {"value", &FieldNames::value},
      {"prompt", &FieldNames::prompt},
      {"completion", &FieldNames::completion},
      {"text", &FieldNames::text},
      {"input_ids", &FieldNames::input_ids},
      {"labels", &FieldNames::labels},
  };
  return kMembers;
}

}  // namespace

const std::vector<std::string>& field_keys() {
  static const std::vector<std::string> kKeys = [] {
    std::vector<std::string> v;
    for (const auto& m : field_members()) v.push_back(m.first);
    return v;
  }();
  return kKeys;
}

FieldNames field_names(const RecipeData& data) {
  FieldNames f;
  for (const auto& [key, value] : data.fields) {
    FieldMember member = nullptr;
    for (const auto& m : field_members())
      if (m.first == key) member = m.second;
    if (!member) fail("data.fields: unknown field '", key, "'; known: ", joined(field_keys()));
    f.*member = value;
  }
  return f;
}

std::string joined(const std::vector<std::string>& names) {
  std::string s;
  for (const auto& n : names) s += (s.empty() ? "" : ", ") + n;
  return s;
}

namespace {

// Optimal string alignment distance, case-insensitive.
size_t edit_distance(std::string_view a, std::string_view b) {
  auto lower = [](char c) { return static_cast<char>(std::tolower(static_cast<unsigned char>(c))); };
  const size_t n = a.size(), m = b.size();
  std::vector<std::vector<size_t>> d(n + 1, std::vector<size_t>(m + 1));
  for (size_t i = 0; i <= n; ++i) d[i][0] = i;
  for (size_t j = 0; j <= m; ++j) d[0][j] = j;
  for (size_t i = 1; i <= n; ++i)
    for (size_t j = 1; j <= m; ++j) {
      const size_t cost = lower(a[i - 1]) == lower(b[j - 1]) ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && lower(a[i - 1]) == lower(b[j - 2]) && lower(a[i - 2]) == lower(b[j - 1]))
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  return d[n][m];
}

}  // namespace

std::string closest(std::string_view name, const std::vector<std::string>& candidates) {
  const size_t limit = std::max<size_t>(2, name.size() / 3);
  std::string best;
  size_t best_d = limit + 1;
  for (const auto& c : candidates) {
    const size_t d = edit_distance(name, c);
    if (d < best_d) best_d = d, best = c;
  }
  return best;
}

std::string foreign_equivalent(std::string_view name) {
  // Names from axolotl configs, torchtune recipes and HF TrainingArguments /
  // PEFT LoraConfig, for people who paste their old config (docs/recipes.md).
  static const std::vector<std::pair<std::string, std::string>> kNames{
      {"base_model", "model.path"},
      {"model_name_or_path", "model.path"},
      {"load_in_4bit", "quant.type"},
      {"bnb_4bit_quant_type", "quant.type"},
      {"bnb_4bit_use_double_quant", "quant.double_quant"},
      {"lora_r", "lora.rank"},
      {"r", "lora.rank"},
      {"lora_rank", "lora.rank"},
      {"lora_alpha", "lora.alpha"},
      {"lora_dropout", "lora.dropout"},
      {"use_rslora", "lora.rslora"},
      {"lora_target_modules", "lora.targets"},
      {"lora_target_linear", "lora.targets"},
      {"target_modules", "lora.targets"},
      {"lora_attn_modules", "lora.targets"},
      {"lora_model_dir", "lora.init"},
      {"rank_pattern", "lora.rank_pattern"},
      {"alpha_pattern", "lora.alpha_pattern"},
      {"peft_use_dora", "lora.dora"},
      {"use_dora", "lora.dora"},
      {"loraplus_lr_ratio", "lora.plus_lr_ratio"},
      {"datasets", "data.train"},
      {"dataset", "data.train"},
      {"val_set_size", "data.val"},
      {"sequence_len", "data.seq_len"},
      {"max_seq_len", "data.seq_len"},
      {"max_seq_length", "data.seq_len"},
      {"sample_packing", "data.packing"},
      {"packed", "data.packing"},
      {"dataset_prepared_path", "data.cache"},
      {"num_epochs", "train.epochs"},
      {"num_train_epochs", "train.epochs"},
      {"max_steps_per_epoch", "train.max_steps"},
      {"micro_batch_size", "train.micro_batch"},
      {"batch_size", "train.micro_batch"},
      {"per_device_train_batch_size", "train.micro_batch"},
      {"gradient_accumulation_steps", "train.grad_accum"},
      {"learning_rate", "train.lr"},
      {"lr_scheduler", "train.schedule"},
      {"lr_scheduler_type", "train.schedule"},
      {"warmup_steps", "train.warmup"},
      {"warmup_ratio", "train.warmup"},
      {"num_warmup_steps", "train.warmup"},
      {"optim", "train.optimizer"},
      {"adam_beta1", "train.beta1"},
      {"adam_beta2", "train.beta2"},
      {"adam_epsilon", "train.eps"},
      {"gradient_checkpointing", "train.checkpointing"},
      {"enable_activation_checkpointing", "train.checkpointing"},
      {"eval_steps", "train.eval_every"},
      {"save_steps", "train.save_every"},
      {"save_total_limit", "train.keep_checkpoints"},
      {"output_dir", "output.dir"},
      {"merge_lora", "output.merge"},
      {"logging_steps", "logging.every"},
      {"log_every_n_steps", "logging.every"},
  };
  for (const auto& [foreign, ours] : kNames)
    if (name == foreign) return ours;
  return "";
}

std::string did_you_mean(const std::string& section, const std::string& key) {
  auto hint = [](const std::string& path) { return "; did you mean '" + path + "'?"; };
  // A name from another tool first: "lora_r" is closer to "lora" than to
  // anything else, but lora.rank is what it means.
  if (auto ours = foreign_equivalent(key); !ours.empty()) return hint(ours);
  if (section.empty()) {
    if (auto s = closest(key, section_names()); !s.empty()) return hint(s);
  } else if (const Section* sec = find_section(section)) {
    if (auto k = closest(key, sec->keys); !k.empty()) return hint(section + "." + k);
  }
  // Not a typo of a key here: maybe a key of another section ("lora.lr").
  for (const auto& s : sections())
    if (s.name != section && std::find(s.keys.begin(), s.keys.end(), key) != s.keys.end())
      return hint(s.name + "." + key);
  return "";
}

}  // namespace qlora::recipe_schema
