#include "serve/served_models.h"

#include <algorithm>
#include <cstdio>

#include "core/error.h"
#include "data/tokenize_sample.h"
#include "model/llama_generate.h"
#include "train/base_lock.h"
#include "train/checkpoint.h"

namespace qlora {

namespace fs = std::filesystem;

std::pair<std::string, fs::path> parse_adapter_spec(const std::string& spec) {
  const size_t eq = spec.find('=');
  if (eq != std::string::npos) {
    const std::string name = spec.substr(0, eq), dir = spec.substr(eq + 1);
    if (name.empty() || dir.empty()) fail("--adapter \"", spec, "\": expected NAME=DIR or DIR");
    return {name, dir};
  }
  fs::path dir(spec);
  while (!dir.empty() && dir.filename().empty()) dir = dir.parent_path();  // "runs/legal/adapter/"
  std::string name = dir.filename().string();
  if (name == "adapter" && !dir.parent_path().filename().empty())
    name = dir.parent_path().filename().string();
  if (name.empty() || name == "." || name == "..") fail("--adapter \"", spec, "\": give it a name: NAME=DIR");
  return {name, fs::path(spec)};
}

ServedModels::ServedModels(const ServedModelOptions& opt, std::vector<std::string>* warnings)
    : base_name_(opt.base_name) {
  if (base_name_.empty()) fail("the base model's name is empty");
  // Adapters are checked (names, base lock) before the slow part, the base weights.
  fingerprint_ = base_model_fingerprint(opt.model);
  std::vector<std::pair<std::string, fs::path>> specs;
  for (const auto& s : opt.adapters) {
    auto [name, dir] = parse_adapter_spec(s);
    if (name == base_name_ || adapter_dirs_.count(name))
      fail("--adapter ", s, ": the name \"", name, "\" is taken (the base is \"", base_name_,
           "\"); name it with NAME=DIR");
    const std::string warning = check_base_lock_fingerprint(dir, fingerprint_, opt.allow_other_base);
    if (!warning.empty() && warnings) warnings->push_back(warning);
    adapter_dirs_[name] = dir;
    order_.push_back(name);
    specs.emplace_back(name, dir);
  }
  base_ = load_llama_weights(opt.model, opt.weights);
  for (const auto& [name, dir] : specs)
    adapters_[name] = std::make_unique<LoraWeights>(LoraWeights::load_peft(dir, base_.cfg));
  tok_ = Tokenizer::load(opt.model);
  try {
    tmpl_ = template_for_tokenizer(*tok_, opt.chat_template);
  } catch (const Error& e) {
    tmpl_error_ = e.what();
  }
}

std::vector<std::string> ServedModels::names() const {
  std::vector<std::string> n{base_name_};
  n.insert(n.end(), order_.begin(), order_.end());
  return n;
}

const LoraWeights* ServedModels::adapter(const std::string& name) const {
  if (name == base_name_) return nullptr;
  const auto it = adapters_.find(name);
  if (it == adapters_.end()) {
    std::string known;
    for (const auto& n : names()) known += (known.empty() ? "" : ", ") + n;
    fail("no model named \"", name, "\" (known: ", known, ")");
  }
  return it->second.get();
}

int64_t ServedModels::max_rank() const {
  int64_t r = 1;
  for (const auto& [name, w] : adapters_) r = std::max(r, w->max_rank());
  return r;
}

namespace {

std::string mib(size_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f MiB", double(bytes) / (1024.0 * 1024.0));
  return buf;
}

}  // namespace

std::string served_memory_table(const ServedModels& m, int64_t context, int generators) {
  const ModelConfig& cfg = m.config();
  std::string t;
  char line[256];
  const size_t base = m.base().arena.capacity();
  std::snprintf(line, sizeof line, "  %-34s %12s\n",
                (std::string("base weights (") + (m.base().quantized ? "NF4/FP4" : "fp32") + ")").c_str(),
                mib(base).c_str());
  t += line;
  size_t total = base;
  for (const auto& name : m.names()) {
    const LoraWeights* a = m.adapter(name);
    if (!a) continue;
    const auto bytes = LoraWeights::arena_bytes(cfg, a->config());
    std::snprintf(line, sizeof line, "  %-34s %12s (r=%lld; + %s gradient arena, never touched)\n",
                  ("adapter " + name).c_str(), mib(bytes.params).c_str(), (long long)a->max_rank(),
                  mib(bytes.grads).c_str());
    t += line;
    total += bytes.params;
  }
  const size_t gen = LlamaGenerator::arena_bytes(cfg, context, m.max_rank());
  std::snprintf(line, sizeof line, "  %-34s %12s x %d\n",
                ("KV cache + activations (" + std::to_string(context) + " tokens)").c_str(), mib(gen).c_str(),
                generators);
  t += line;
  total += gen * size_t(generators);
  std::snprintf(line, sizeof line, "  %-34s %12s\n", "total", mib(total).c_str());
  t += line;
  return t;
}

}  // namespace qlora
