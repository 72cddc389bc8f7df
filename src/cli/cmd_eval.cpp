// `qlora eval`: loss and perplexity of a model (+ adapter) on a dataset,
// through the training data pipeline (tools/evaluate.h).
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "core/error.h"
#include "io/hf_config.h"
#include "model/builtin.h"
#include "recipe/recipe.h"
#include "recipe/recipe_schema.h"
#include "tools/evaluate.h"
#include "train/base_lock.h"

namespace qlora::cli {

namespace {

// "--field prompt=QUESTION" options -> FieldNames, through the recipe's
// data.fields mapping (one table of field names for both).
FieldNames field_names_from(const std::vector<std::string>& kvs) {
  RecipeData d;
  for (const auto& kv : kvs) {
    const size_t eq = kv.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == kv.size())
      fail("--field \"", kv, "\": expected NAME=FIELD, e.g. prompt=QUESTION");
    d.fields.emplace_back(kv.substr(0, eq), kv.substr(eq + 1));
  }
  try {
    return recipe_schema::field_names(d);
  } catch (const Error& e) {
    fail("--field: ", e.what());
  }
}

Runner add_eval(CLI::App& app) {
  auto* cmd =
      app.add_subcommand("eval", "Loss and perplexity of a model (+ LoRA adapter) on a dataset, on the CPU");
  struct Args {
    std::string model, adapter, tokenizer, format = "messages", chat_template = "auto", quant = "nf4";
    std::vector<std::string> data, fields;
    int64_t seq_len = 0, batch = 4;
    bool json = false, allow_other_base = false;
  };
  auto a = std::make_shared<Args>();
  cmd->add_option("--model", a->model, "HF model folder, bnb 4-bit checkpoint, GGUF file, or builtin:tiny")
      ->required();
  cmd->add_option("--adapter", a->adapter,
                  "PEFT adapter folder (adapter_config.json + adapter_model.safetensors)");
  cmd->add_option("--tokenizer", a->tokenizer, "Tokenizer folder (default: the model folder)");
  cmd->add_option("--data", a->data, "Dataset file(s): JSONL or JSON")->required();
  cmd->add_option("--format", a->format, "alpaca | messages | sharegpt | prompt_completion | text | tokens")
      ->capture_default_str();
  auto* tmpl =
      cmd->add_option("--chat-template", a->chat_template,
                      "Chat template (auto = from tokenizer_config.json; none for text and tokens data)")
          ->capture_default_str();
  cmd->add_option("--seq-len", a->seq_len, "Row length (default: 2048, or the model's positions if fewer)")
      ->check(CLI::Range(int64_t(2), int64_t(1) << 20));
  cmd->add_option("--batch", a->batch, "Rows per forward pass")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--field", a->fields,
                  "Dataset field name override NAME=FIELD (repeatable), e.g. prompt=QUESTION");
  cmd->add_option("--quant", a->quant, "Base weights: nf4 / fp4 (as trained with QLoRA) or none (dense fp32)")
      ->check(CLI::IsMember({"nf4", "fp4", "none"}))
      ->capture_default_str();
  cmd->add_flag("--json", a->json, "Print the result as one JSON object");
  cmd->add_flag("--allow-other-base", a->allow_other_base,
                "Apply an adapter that records another base model's fingerprint (docs/serving.md#base-lock)");
  return [a, tmpl]() {
    EvalOptions opt;
    opt.model = resolve_model_path(a->model);
    if (!a->adapter.empty()) {
      const std::string warning = check_base_lock(a->adapter, opt.model, a->allow_other_base);
      if (!warning.empty()) std::fprintf(stderr, "%s\n", warning.c_str());
    }
    if (!a->adapter.empty()) opt.adapter = a->adapter;
    if (!a->tokenizer.empty()) opt.tokenizer = a->tokenizer;
    opt.weights.quantize = a->quant != "none";
    if (a->quant == "fp4") opt.weights.type = Quant4Type::FP4;
    for (const auto& f : a->data) opt.data.train_files.emplace_back(f);
    opt.data.read.format = parse_data_format(a->format);
    opt.data.read.fields = field_names_from(a->fields);
    // Plain text and token ids are not rendered through a template; "auto"
    // would still demand one from tokenizer_config.json (base models have none).
    const bool plain = opt.data.read.format == DataFormat::text || opt.data.read.format == DataFormat::tokens;
    opt.data.chat_template = plain && tmpl->count() == 0 ? "none" : a->chat_template;
    opt.data.pack.packing = true;
    opt.data.pack.seq_len =
        a->seq_len > 0 ? a->seq_len
                       : std::min<int64_t>(2048, load_model_config(opt.model).max_position_embeddings);
    opt.micro_batch = a->batch;
    EvalDataInfo info;
    const EvalResult r = evaluate_model(opt, &info);
    if (a->json) {
      const nlohmann::ordered_json j = {{"loss", r.loss},
                                        {"perplexity", r.perplexity},
                                        {"target_tokens", r.target_tokens},
                                        {"rows", r.rows},
                                        {"samples", info.samples},
                                        {"tokens", info.pack.tokens},
                                        {"seq_len", opt.data.pack.seq_len},
                                        {"template", info.template_name}};
      std::printf("%s\n", j.dump().c_str());
      return 0;
    }
    std::printf("data  %zu samples -> %lld rows of %lld tokens (%lld tokens), template %s%s\n", info.samples,
                static_cast<long long>(r.rows), static_cast<long long>(opt.data.pack.seq_len),
                static_cast<long long>(info.pack.tokens), info.template_name.c_str(),
                info.skipped_records ? str(", ", info.skipped_records, " bad records skipped").c_str() : "");
    std::printf("loss %.4f  perplexity %.2f  (%lld target tokens in %lld rows)\n", r.loss, r.perplexity,
                static_cast<long long>(r.target_tokens), static_cast<long long>(r.rows));
    return 0;
  };
}

const CommandRegistration kRegistered(60, add_eval);

}  // namespace

}  // namespace qlora::cli
