#include <algorithm>
#include <cstdio>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "core/error.h"
#include "model/builtin.h"
#include "model/llama_generate.h"
#include "serve/generation.h"
#include "train/backend.h"
#include "train/base_lock.h"
#if QLORA_HAVE_CUDA
#include "model/llama_cuda.h"
#endif
#include "data/tokenize_sample.h"
#include "tokenizer/tokenizer.h"
#include "train/sample_text.h"

namespace qlora::cli {

namespace {

// "1 2 3" or "1,2,3" (or "1, 2, 3").
std::vector<int32_t> parse_ids(std::string s) {
  std::replace(s.begin(), s.end(), ',', ' ');
  std::istringstream is(s);
  std::vector<int32_t> ids;
  std::string tok;
  while (is >> tok) {
    try {
      size_t used = 0;
      const long v = std::stol(tok, &used);
      if (used != tok.size() || v < 0 || v > INT32_MAX) throw std::invalid_argument(tok);
      ids.push_back(int32_t(v));
    } catch (const std::exception&) {
      fail("--prompt-ids: \"", tok, "\" is not a token id");
    }
  }
  if (ids.empty()) fail("--prompt-ids: no ids given");
  return ids;
}

Runner add_generate(CLI::App& app) {
  auto* cmd =
      app.add_subcommand("generate", "Generate text from a model (+ LoRA adapter) on the GPU or the CPU");
  struct Args {
    std::string model, adapter, prompt, prompt_ids, device = "auto", system, chat_template = "auto";
    int64_t max_new = 64;
    float temperature = 0.0f, top_p = 1.0f;
    uint64_t seed = 0;
    bool dense = false, ignore_eos = false, chat = false, allow_other_base = false;
  };
  auto a = std::make_shared<Args>();
  cmd->add_option("--model", a->model, "HF model folder, bnb 4-bit checkpoint, GGUF file, or builtin:tiny")
      ->required();
  cmd->add_option("--adapter", a->adapter,
                  "PEFT adapter folder (adapter_config.json + adapter_model.safetensors)");
  auto* p = cmd->add_option("--prompt", a->prompt, "Prompt text (needs the model's tokenizer)");
  auto* pi = cmd->add_option("--prompt-ids", a->prompt_ids, "Prompt as token ids, e.g. \"1 2 3\" or 1,2,3");
  p->excludes(pi);
  auto* chat =
      cmd->add_flag("--chat", a->chat,
                    "Render --prompt as a user message through the model's chat template, stop at the end "
                    "of the turn and print the reply alone");
  chat->excludes(pi);
  cmd->add_option("--system", a->system, "System message for --chat")->needs(chat);
  cmd->add_option("--chat-template", a->chat_template, "Chat template for --chat (auto = the model's own)")
      ->needs(chat)
      ->capture_default_str();
  cmd->add_option("--max-new-tokens", a->max_new, "Tokens to generate")->check(CLI::PositiveNumber);
  cmd->add_option("--temperature", a->temperature, "0 = greedy")->check(CLI::NonNegativeNumber);
  cmd->add_option("--top-p", a->top_p, "Nucleus sampling mass")->check(CLI::Range(0.0f, 1.0f));
  cmd->add_option("--seed", a->seed, "Sampling seed");
  cmd->add_flag("--dense", a->dense, "Keep the base weights fp32 instead of NF4");
  cmd->add_flag("--ignore-eos", a->ignore_eos, "Do not stop at the end-of-sequence token");
  cmd->add_flag("--allow-other-base", a->allow_other_base,
                "Apply an adapter that records another base model's fingerprint (docs/serving.md#base-lock)");
  cmd->add_option(
         "--device", a->device,
         "auto (the GPU when one is usable, else the CPU with a warning), cpu (fp32, KV cache) or cuda "
         "(bf16)")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}))
      ->capture_default_str();
  return [a]() {
    if (a->prompt.empty() && a->prompt_ids.empty()) fail("give --prompt or --prompt-ids");
    if (a->chat && a->prompt.empty()) fail("--chat needs --prompt");
    // Before loading anything: `cuda` that cannot run fails at once, naming why.
    const auto why_no_gpu = cuda_backend_unavailable();
    if (a->device == "cuda" && why_no_gpu) fail("--device cuda: ", *why_no_gpu);
    const bool gpu = a->device != "cpu" && !why_no_gpu;
    if (a->device == "auto" && why_no_gpu)
      std::fprintf(stderr, "warning: --device auto: %s; generating on the CPU\n", why_no_gpu->c_str());
    const auto dir = resolve_model_path(a->model);
    if (!a->adapter.empty()) {
      const std::string warning = check_base_lock(a->adapter, dir, a->allow_other_base);
      if (!warning.empty()) std::fprintf(stderr, "%s\n", warning.c_str());
    }
    WeightLoadOptions opt;
    opt.quantize = !a->dense;
    // The GPU streams the weights from the folder itself: the host then only checks it.
    LlamaWeights w;
    if (gpu)
      w.cfg = check_llama_weights(dir, opt);
    else
      w = load_llama_weights(dir, opt);
    std::unique_ptr<LoraWeights> lora;
    if (!a->adapter.empty()) lora = std::make_unique<LoraWeights>(LoraWeights::load_peft(a->adapter, w.cfg));
    // The tokenizer is needed for --prompt; otherwise it only decodes, if present.
    std::unique_ptr<Tokenizer> tok;
    try {
      tok = Tokenizer::load(dir);
    } catch (const Error&) {
      if (!a->prompt.empty()) throw;
    }
    std::vector<int32_t> prompt;
    if (a->chat)
      prompt = chat_prompt_ids(*tok, template_for_tokenizer(*tok, a->chat_template), a->prompt, a->system);
    else
      prompt = a->prompt.empty() ? parse_ids(a->prompt_ids) : tok->encode(a->prompt, true);
    const int64_t total = int64_t(prompt.size()) + a->max_new;
    if (total > w.cfg.max_position_embeddings)
      fail("prompt (", prompt.size(), " tokens) + --max-new-tokens ", a->max_new, " exceeds the model's ",
           w.cfg.max_position_embeddings, " positions (", dir.string(), ")");
    std::unique_ptr<TokenGenerator> gen;
#if QLORA_HAVE_CUDA
    if (gpu) gen = make_cuda_generator(dir, opt, lora.get(), total);
#else
    (void)gpu;
#endif
    if (!gen) gen = std::make_unique<LlamaGenerator>(w, lora.get(), total);
    // The loop `qlora chat` and `qlora serve` run too (serve/generation.h).
    GenerationSettings gs;
    gs.max_new_tokens = a->max_new;
    gs.sampling = {a->temperature, a->top_p};
    gs.seed = a->seed;
    gs.ignore_eos = a->ignore_eos;
    gs.chat = a->chat;
    const std::vector<int32_t> out =
        generate_tokens(*gen, w.cfg.vocab_size, prompt, end_of_sequence_ids(w.cfg, tok.get(), a->chat), gs)
            .ids;
    if (a->chat) {
      std::printf("%s\n", tok->decode(out, true).c_str());
      return 0;
    }
    std::string ids;
    for (int32_t id : out) ids += (ids.empty() ? "" : " ") + std::to_string(id);
    std::printf("ids: %s\n", ids.c_str());
    if (tok) std::printf("%s\n", tok->decode(out, true).c_str());
    return 0;
  };
}

const CommandRegistration kRegistered(50, add_generate);

}  // namespace

}  // namespace qlora::cli
