// What `qlora serve` and `qlora chat` hold in memory: one base model (NF4
// LlamaWeights), its tokenizer and chat template, and any number of LoRA
// adapters, each its own LoraWeights, never merged: a generation applies the
// one its request names (LlamaGenerator::set_lora). Every adapter passes the
// base lock (train/base_lock.h) when it is loaded.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "data/chat_template.h"
#include "model/lora.h"
#include "model/weights.h"
#include "tokenizer/tokenizer.h"

namespace qlora {

// "NAME=DIR", or a DIR named after its folder (a run's "adapter" folder after
// the run folder: runs/legal/adapter -> "legal").
std::pair<std::string, std::filesystem::path> parse_adapter_spec(const std::string& spec);

struct ServedModelOptions {
  std::filesystem::path model;  // resolved: a folder or a GGUF file
  std::string base_name = "base";
  std::vector<std::string> adapters;  // parse_adapter_spec each
  bool allow_other_base = false;
  WeightLoadOptions weights;
  std::string chat_template = "auto";
};

class ServedModels {
 public:
  // Loads everything; warnings (adapters without a fingerprint, ...) are
  // appended to `warnings` for the caller to print. Errors name the adapter.
  ServedModels(const ServedModelOptions& opt, std::vector<std::string>* warnings);

  const LlamaWeights& base() const { return base_; }
  const ModelConfig& config() const { return base_.cfg; }
  const Tokenizer& tokenizer() const { return *tok_; }
  // nullopt: the model has no chat template qlora knows (the reason in
  // chat_template_error()); chat requests are then refused.
  const std::optional<ChatTemplate>& chat_template() const { return tmpl_; }
  const std::string& chat_template_error() const { return tmpl_error_; }
  const std::string& base_name() const { return base_name_; }
  const std::string& fingerprint() const { return fingerprint_; }

  // Base first, then the adapters in the order given.
  std::vector<std::string> names() const;
  bool has(const std::string& name) const { return name == base_name_ || adapters_.count(name) > 0; }
  // nullptr for the base; throws qlora::Error for an unknown name.
  const LoraWeights* adapter(const std::string& name) const;
  // The largest LoRA rank among the adapters (1 with none): what each
  // generator reserves so it can run any of them.
  int64_t max_rank() const;
  const std::filesystem::path& adapter_dir(const std::string& name) const { return adapter_dirs_.at(name); }

 private:
  LlamaWeights base_;
  std::unique_ptr<Tokenizer> tok_;
  std::optional<ChatTemplate> tmpl_;
  std::string tmpl_error_, base_name_, fingerprint_;
  std::vector<std::string> order_;
  std::map<std::string, std::unique_ptr<LoraWeights>> adapters_;
  std::map<std::string, std::filesystem::path> adapter_dirs_;
};

// The memory of a server, from the same layout functions the allocations use
// (base_weight_arena_bytes, LoraWeights::arena_bytes, LlamaGenerator::arena_bytes),
// as lines of a table for the log.
std::string served_memory_table(const ServedModels& m, int64_t context, int generators);

}  // namespace qlora
