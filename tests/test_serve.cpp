// qlora serve and chat without sockets: OpenAI request parsing and error
// bodies, the bounded queue, streamed text with stop strings, UTF-8 repair,
// one generator switching adapters, the completion service's limits and the
// chat session's commands (on builtin:tiny with two random adapters).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>

#include "data/tokenize_sample.h"
#include "model/builtin.h"
#include "model/random_weights.h"
#include "serve/admission.h"
#include "serve/chat_session.h"
#include "serve/completion_service.h"
#include "serve/generation.h"
#include "serve/openai_api.h"
#include "serve/served_models.h"
#include "test_models.h"
#include "testing.h"
#include "train/checkpoint.h"
#include "train/peft_adapter.h"
#include "train/sample_text.h"

namespace qlora {
namespace {

using nlohmann::json;

bool has(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

ApiError api_error_of(const std::string& body, Endpoint e = Endpoint::chat) {
  try {
    parse_completion_request(body, e);
  } catch (const ApiError& err) {
    return err;
  }
  ADD_FAILURE() << "accepted: " << body;
  return ApiError(0, "", "");
}

TEST(OpenAiRequest, ParsesChatAndCompletionFields) {
  const CompletionRequest c = parse_completion_request(
      R"({"model": "legal", "messages": [{"role": "system", "content": "Be brief."},
          {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
          {"role": "user", "content": [{"type": "text", "text": "Who "}, {"type": "text", "text": "are you?"}]}],
          "max_tokens": 12, "temperature": 0, "top_p": 0.5, "seed": 7, "stop": ["\n\n", "END"],
          "stream": true, "stream_options": {"include_usage": true}, "n": 1, "user": "x"})",
      Endpoint::chat);
  EXPECT_EQ(c.model, "legal");
  ASSERT_EQ(c.messages.size(), 4u);
  EXPECT_EQ(c.messages[0].role, Role::system);
  EXPECT_EQ(c.messages[3].content, "Who are you?");
  EXPECT_EQ(c.max_tokens, 12);
  EXPECT_EQ(c.temperature, 0.0f);
  EXPECT_EQ(c.top_p, 0.5f);
  EXPECT_EQ(c.seed, 7u);
  EXPECT_EQ(c.stop, (std::vector<std::string>{"\n\n", "END"}));
  EXPECT_TRUE(c.stream && c.include_usage);
  // OpenAI's defaults, the newer max_completion_tokens, a single-string stop, prompt as a list of one.
  const CompletionRequest d = parse_completion_request(
      R"({"model": "base", "prompt": ["Once"], "stop": "x", "max_completion_tokens": 3})",
      Endpoint::completion);
  EXPECT_EQ(d.prompt, "Once");
  EXPECT_EQ(d.temperature, 1.0f);
  EXPECT_EQ(d.top_p, 1.0f);
  EXPECT_EQ(d.seed, 0u);
  EXPECT_EQ(d.max_tokens, 3);
  EXPECT_EQ(d.stop, std::vector<std::string>{"x"});
  EXPECT_FALSE(d.stream);
  EXPECT_FALSE(parse_completion_request(R"({"model": "m", "prompt": "p"})", Endpoint::completion).max_tokens);
}

TEST(OpenAiRequest, RefusesBadInputNamingTheParameter) {
  const std::string chat = R"("model": "m", "messages": [{"role": "user", "content": "hi"}])";
  struct Case {
    std::string body, param, message;
  };
  const std::vector<Case> cases = {
      {R"({"model": "m", "messages": [)", "", "not valid JSON"},
      {R"({"model": "m", "max_tokens": 1e999, "messages": []})", "", "not valid JSON"},
      {"{" + chat + R"(, "user": )" + std::string(100000, '[') + "}", "", "JSON nested deeper than 512 levels"},
      {R"([1, 2])", "", "must be a JSON object"},
      {R"({"messages": [{"role": "user", "content": "hi"}]})", "model", "'model' is required"},
      {R"({"model": 3, "messages": []})", "model", "'model' is required"},
      {R"({"model": "m"})", "messages", "'messages' is required"},
      {R"({"model": "m", "messages": []})", "messages", "non-empty array"},
      {R"({"model": "m", "messages": [{"role": "tool", "content": "x"}]})", "messages[0].role", "'tool'"},
      {R"({"model": "m", "messages": [{"role": "user"}]})", "messages[0].content", "is required"},
      {R"({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})",
       "messages[0].content", "only text"},
      {R"({"model": "m", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})",
       "messages", "last message must be from the user"},
      {"{" + chat + R"(, "max_tokens": 0})", "max_tokens", "at least 1"},
      {"{" + chat + R"(, "max_tokens": 1.5})", "max_tokens", "integer"},
      {"{" + chat + R"(, "max_tokens": "10"})", "max_tokens", "must be a number"},
      {"{" + chat + R"(, "temperature": 2.5})", "temperature", "[0, 2]"},
      {"{" + chat + R"(, "top_p": 0})", "top_p", "(0, 1]"},
      {"{" + chat + R"(, "stop": ["a", "b", "c", "d", "e"]})", "stop", "at most 4"},
      {"{" + chat + R"(, "stop": [""]})", "stop", "must not be empty"},
      {"{" + chat + R"(, "stop": 5})", "stop", "string or an array"},
      {"{" + chat + R"(, "stream": "yes"})", "stream", "boolean"},
      {"{" + chat + R"(, "stream_options": {"include_usage": true}})", "stream_options", "only allowed"},
      {"{" + chat + R"(, "n": 2})", "n", "must be 1"},
      {"{" + chat + R"(, "tools": [{"type": "function"}]})", "tools", "not supported"},
      {"{" + chat + R"(, "logprobs": true})", "logprobs", "not supported"},
  };
  for (const auto& c : cases) {
    const ApiError e = api_error_of(c.body);
    EXPECT_EQ(e.status, 400) << c.body;
    EXPECT_EQ(e.type, "invalid_request_error") << c.body;
    EXPECT_EQ(e.param, c.param) << c.body;
    EXPECT_TRUE(has(e.what(), c.message)) << c.body << " -> " << e.what();
  }
  EXPECT_EQ(api_error_of(R"({"model": "m", "prompt": 5})", Endpoint::completion).param, "prompt");
  EXPECT_EQ(api_error_of(R"({"model": "m", "prompt": ""})", Endpoint::completion).param, "prompt");
  EXPECT_EQ(api_error_of(R"({"model": "m", "prompt": ["a", "b"]})", Endpoint::completion).param, "prompt");
}

TEST(OpenAiResponse, ErrorBodyHasOpenAisShape) {
  const json a = error_body(invalid_request("bad", "max_tokens", "max_tokens_exceeded"));
  EXPECT_EQ(a, json::parse(R"({"error": {"message": "bad", "type": "invalid_request_error",
                                         "param": "max_tokens", "code": "max_tokens_exceeded"}})"));
  const json b = error_body(ApiError(429, "rate_limit_error", "busy"));
  EXPECT_TRUE(b.at("error").at("param").is_null());
  EXPECT_TRUE(b.at("error").at("code").is_null());
  const ApiError nf = model_not_found("nope");
  EXPECT_EQ(nf.status, 404);
  EXPECT_EQ(nf.code, "model_not_found");
  EXPECT_TRUE(has(nf.what(), "'nope'"));
  // Invalid UTF-8 in a message never breaks the JSON.
  EXPECT_NO_THROW(json_text(error_body(invalid_request("bad \xFF byte"))));
}

TEST(OpenAiResponse, ResponsesAndChunks) {
  CompletionRequest r;
  r.model = "legal";
  const json full = completion_response(r, "id1", 5, "Hello", "stop", {3, 2}, "fp");
  EXPECT_EQ(full.at("object"), "chat.completion");
  EXPECT_EQ(full.at("choices")[0].at("message").at("content"), "Hello");
  EXPECT_EQ(full.at("choices")[0].at("message").at("role"), "assistant");
  EXPECT_EQ(full.at("usage").at("total_tokens"), 5);
  EXPECT_EQ(full.at("model"), "legal");
  const json first = completion_chunk(r, "id1", 5, "He", std::nullopt, true, "fp");
  EXPECT_EQ(first.at("object"), "chat.completion.chunk");
  EXPECT_EQ(first.at("choices")[0].at("delta"), json::parse(R"({"role": "assistant", "content": "He"})"));
  EXPECT_TRUE(first.at("choices")[0].at("finish_reason").is_null());
  const json last = completion_chunk(r, "id1", 5, "", std::string("length"), false, "fp");
  EXPECT_EQ(last.at("choices")[0].at("delta"), json::object());
  EXPECT_EQ(last.at("choices")[0].at("finish_reason"), "length");
  EXPECT_EQ(sse_event(json{{"a", 1}}), "data: {\"a\":1}\n\n");
  r.endpoint = Endpoint::completion;
  const json text = completion_chunk(r, "id2", 5, "x", std::nullopt, true, "fp");
  EXPECT_EQ(text.at("object"), "text_completion");
  EXPECT_EQ(text.at("choices")[0].at("text"), "x");
  EXPECT_EQ(usage_chunk(r, "id2", 5, {4, 1}, "fp").at("choices"), json::array());
}

TEST(Admission, BoundsRunningAndWaiting) {
  Admission a(2, 1);
  auto t1 = a.try_enter(), t2 = a.try_enter(), t3 = a.try_enter();
  ASSERT_TRUE(t1 && t2 && t3);
  EXPECT_FALSE(a.try_enter()) << "2 slots + 1 waiting are taken";
  EXPECT_EQ(t1->acquire(), 0);
  EXPECT_EQ(t2->acquire(), 1);
  EXPECT_EQ(a.counts().running, 2);
  EXPECT_EQ(a.counts().waiting, 1);
  // The third waits until a slot frees, then gets that one.
  std::atomic<int> got{-2};
  std::thread waiter([&] { got = t3->acquire().value_or(-1); });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(got.load(), -2) << "acquired with no free slot";
  { auto done = std::move(*t1); }  // the first generation ends
  waiter.join();
  EXPECT_EQ(got.load(), 0);
  // A freed place admits one more; shutdown wakes waiters with nothing and refuses new ones.
  auto t4 = a.try_enter();
  ASSERT_TRUE(t4);
  EXPECT_FALSE(a.try_enter());
  std::thread waiter4([&] { got = t4->acquire().value_or(-1); });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  a.shutdown();
  waiter4.join();
  EXPECT_EQ(got.load(), -1);
  t4.reset();
  t2.reset();
  t3.reset();
  EXPECT_FALSE(a.try_enter());
  EXPECT_EQ(a.counts().running, 0);
  EXPECT_EQ(a.counts().waiting, 0);
  EXPECT_THROW(Admission(0, 1), Error);
}

TEST(SanitizeUtf8, ReplacesEachMaximalSubpartOnce) {
  // Expected strings are Python's bytes.decode("utf-8", errors="replace").
  const std::string R = "\xEF\xBF\xBD";
  EXPECT_EQ(sanitize_utf8("plain \xC3\xA9 \xF0\x9F\x98\x80"), "plain \xC3\xA9 \xF0\x9F\x98\x80");
  EXPECT_EQ(sanitize_utf8("a\xF0\x9F\x98"
                          "b"),
            "a" + R + "b");  // truncated 4-byte: one
  EXPECT_EQ(sanitize_utf8("a\xE0\x80"
                          "b"),
            "a" + R + R + "b");                                 // overlong: E0 then 80
  EXPECT_EQ(sanitize_utf8("\xC0\xAF"), R + R);                  // C0 is never a lead
  EXPECT_EQ(sanitize_utf8("\xED\xA0\x80"), R + R + R);          // a surrogate
  EXPECT_EQ(sanitize_utf8("\xF4\x90\x80\x80"), R + R + R + R);  // past U+10FFFF
  EXPECT_EQ(sanitize_utf8("\x80\xBF"), R + R);                  // lone continuations
  EXPECT_EQ(sanitize_utf8("\xE2\x82"), R);                      // cut at the end
}

// builtin:tiny with two random adapters of different ranks, saved with the
// model's fingerprint, shared by the tests below (loaded once).
struct TinyServed {
  testing::ScratchDir dir;
  std::unique_ptr<ServedModels> models;
  std::vector<std::string> warnings;
  TinyServed() {
    const auto model = resolve_model_path("builtin:tiny");
    const ModelConfig cfg = load_model_config(model);
    const std::string fp = base_model_fingerprint(model);
    LoraConfig small;
    small.rank = 4;
    save_peft_adapter(testing::random_lora(cfg, small, 1, 0.3f), cfg, dir / "runs/legal/adapter", "b", fp);
    save_peft_adapter(testing::random_lora(cfg, LoraConfig{}, 2, 0.3f), cfg, dir / "med", "b", fp);
    ServedModelOptions o;
    o.model = model;
    o.adapters = {(dir / "runs/legal/adapter").string(), "medical=" + (dir / "med").string()};
    o.chat_template = "alpaca";  // its byte-level tokenizer has no ChatML tokens
    models = std::make_unique<ServedModels>(o, &warnings);
  }
};

const TinyServed& tiny() {
  static TinyServed t;
  return t;
}

TEST(ServedModels, NamesAdaptersAndChecksTheBaseLock) {
  const ServedModels& m = *tiny().models;
  EXPECT_EQ(m.names(), (std::vector<std::string>{"base", "legal", "medical"}));
  EXPECT_TRUE(tiny().warnings.empty());
  EXPECT_EQ(m.adapter("base"), nullptr);
  EXPECT_EQ(m.adapter("legal")->config().rank, 4);
  EXPECT_EQ(m.max_rank(), 8);
  EXPECT_TRUE(has(testing::error_of([&] { m.adapter("nope"); }), "known: base, legal, medical"));
  EXPECT_EQ(parse_adapter_spec("x=/a/b").first, "x");
  EXPECT_EQ(parse_adapter_spec("runs/legal/adapter/").first, "legal");
  EXPECT_EQ(parse_adapter_spec("/data/contracts").first, "contracts");
  EXPECT_THROW(parse_adapter_spec("=dir"), Error);
  // Another base's adapter is refused before any weight is read; duplicate names too.
  const auto model = resolve_model_path("builtin:tiny");
  const ModelConfig cfg = load_model_config(model);
  testing::ScratchDir d;
  save_peft_adapter(testing::random_lora(cfg, LoraConfig{}, 3), cfg, d / "other", "b", "0000000000000000");
  ServedModelOptions o;
  o.model = model;
  o.adapters = {(d / "other").string()};
  const std::string e = testing::error_of([&] { ServedModels bad(o, nullptr); });
  EXPECT_TRUE(has(e, "0000000000000000") && has(e, base_model_fingerprint(model))) << e;
  o.allow_other_base = true;
  std::vector<std::string> warnings;
  ServedModels allowed(o, &warnings);
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_TRUE(has(warnings[0], "applied anyway"));
  o.adapters = {"a=" + (d / "other").string(), "a=" + (d / "other").string()};
  EXPECT_TRUE(has(testing::error_of([&] { ServedModels dup(o, nullptr); }), "is taken"));
}

// One generator, its cache allocated once, switching adapters gives exactly
// the logits of a generator built for each adapter.
TEST(ServeGenerator, SwitchingAdaptersEqualsAFreshGenerator) {
  const ServedModels& m = *tiny().models;
  const std::vector<int32_t> prompt = {1, 40, 41, 42, 43};
  const int64_t V = m.config().vocab_size;
  auto logits_of = [&](LlamaGenerator& g) {
    std::vector<float> l(static_cast<size_t>(V));
    g.feed(prompt.data(), int64_t(prompt.size()), l.data());
    const int32_t next = 50;
    g.feed(&next, 1, l.data());
    return l;
  };
  LlamaGenerator shared(m.base(), nullptr, 64, m.max_rank());
  EXPECT_EQ(shared.arena_bytes(), LlamaGenerator::arena_bytes(m.config(), 64, m.max_rank()));
  std::vector<std::vector<float>> seen;
  for (const std::string name : {"legal", "base", "medical", "legal"}) {
    LlamaGenerator fresh(m.base(), m.adapter(name), 64);
    shared.set_lora(m.adapter(name));
    const auto a = logits_of(fresh), b = logits_of(shared);
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << name;
    seen.push_back(b);
  }
  EXPECT_NE(seen[0], seen[1]) << "the adapter changes nothing: the check would prove nothing";
  EXPECT_NE(seen[1], seen[2]);
  LlamaGenerator rank1(m.base(), nullptr, 64);
  EXPECT_THROW(rank1.set_lora(m.adapter("medical")), Error);
}

TEST(ReplyText, StreamsTheDecodedTextAndCutsStopStrings) {
  const Tokenizer& tok = tiny().models->tokenizer();
  const std::string text = "The court held that the contract was void. END of story";
  const auto ids = tok.encode(text, false);
  auto stream = [&](std::vector<std::string> stops, std::string* shown) {
    ReplyText r(tok, std::move(stops));
    for (int32_t id : ids) {
      *shown += r.push(id);
      if (r.stopped()) break;
    }
    *shown += r.finish();
    return r.text();
  };
  std::string shown;
  EXPECT_EQ(stream({}, &shown), tok.decode(ids, true));
  EXPECT_EQ(shown, tok.decode(ids, true));
  shown.clear();
  EXPECT_EQ(stream({" END", "zzz"}, &shown), "The court held that the contract was void.");
  EXPECT_EQ(shown, "The court held that the contract was void.");
  shown.clear();
  EXPECT_EQ(stream({"contract"}, &shown), "The court held that the ");
  EXPECT_EQ(shown, "The court held that the ");
}

// builtin:tiny's tokenizer with alpaca (the only template whose text it can
// encode) and, where the fixtures are, SmolLM2's own ChatML-style template
// with its special tokens.
TEST(ChatPrompt, HistoryRendersAsTheTemplateWithTheGenerationPrompt) {
  std::vector<std::pair<std::unique_ptr<Tokenizer>, std::string>> cases;
  cases.emplace_back(Tokenizer::load(resolve_model_path("builtin:tiny")), "alpaca");
  const auto fx = testing::fixtures_dir();
  const auto gguf =
      fx ? *fx / "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf" : std::filesystem::path();
  if (fx && std::filesystem::exists(gguf))
    cases.emplace_back(Tokenizer::load(gguf), "auto");
  else
    std::printf("note: SmolLM2 fixture absent; only the alpaca case runs\n");
  for (const auto& [tokp, name] : cases) {
    const Tokenizer& tok = *tokp;
    const ChatTemplate t = template_for_tokenizer(tok, name);
    const Conversation one = {{Role::system, "Be brief.", {}}, {Role::user, "What is a tort?", {}}};
    EXPECT_EQ(chat_prompt_ids(tok, t, one), chat_prompt_ids(tok, t, "What is a tort?", "Be brief.")) << name;
    Conversation three = one;
    three.push_back({Role::assistant, "A civil wrong.", {}});
    three.push_back({Role::user, "And a crime?", {}});
    std::string want;
    for (const auto& s : t.render(three, /*add_generation_prompt=*/true)) want += s.text;
    std::string got = tok.decode(chat_prompt_ids(tok, t, three), false);
    // The tokenizer's own BOS, which the template's text does not hold.
    const std::string bos = tok.bos_id() ? tok.decode({*tok.bos_id()}, false) : "";
    if (!bos.empty() && got.rfind(bos, 0) == 0 && want.rfind(bos, 0) != 0) got = got.substr(bos.size());
    EXPECT_EQ(got, want) << name;
  }
}

TEST(CompletionService, PrepareChecksTheLimitsAndRunIsRepeatable) {
  const ServedModels& m = *tiny().models;
  ServiceLimits lim;
  lim.context = 96;
  lim.max_tokens = 24;
  lim.generators = 2;
  lim.queue = 1;
  CompletionService svc(m, lim);
  CompletionRequest r;
  r.endpoint = Endpoint::completion;
  r.prompt = "The court held";
  r.model = "nope";
  auto status_of = [&](const CompletionRequest& q) {
    try {
      svc.prepare(q);
    } catch (const ApiError& e) {
      return std::make_pair(e.status, e.code);
    }
    return std::make_pair(200, std::string());
  };
  EXPECT_EQ(status_of(r), std::make_pair(404, std::string("model_not_found")));
  r.model = "legal";
  r.max_tokens = 25;
  EXPECT_EQ(status_of(r), std::make_pair(400, std::string("max_tokens_exceeded")));
  r.max_tokens = 24;
  CompletionRequest longer = r;
  longer.prompt.assign(400, 'x');
  EXPECT_EQ(status_of(longer), std::make_pair(400, std::string("context_length_exceeded")));
  r.temperature = 0.8f;
  r.seed = 3;
  auto run = [&](const CompletionRequest& q) {
    auto t = svc.admission().try_enter();
    EXPECT_TRUE(t);
    std::string streamed;
    const auto res = svc.run(*t, svc.prepare(q), [&](const std::string& s) {
      streamed += s;
      return true;
    });
    EXPECT_EQ(streamed, res.text);
    return res;
  };
  const auto a = run(r), b = run(r);
  EXPECT_EQ(a.text, b.text);
  EXPECT_EQ(a.usage.completion_tokens, b.usage.completion_tokens);
  EXPECT_GT(a.usage.completion_tokens, 0);
  r.model = "base";
  EXPECT_NE(run(r).text, a.text) << "the adapter changes nothing: the check would prove nothing";
  // Chat requests render through the template.
  CompletionRequest c;
  c.model = "medical";
  c.messages = {{Role::user, "Hello", {}}};
  c.max_tokens = 8;
  EXPECT_LE(run(c).usage.completion_tokens, 8);
}

TEST(ChatSession, CommandsHistoryAndInterrupt) {
  const ServedModels& m = *tiny().models;
  LlamaGenerator gen(m.base(), nullptr, 256, m.max_rank());
  GenerationSettings s;
  s.max_new_tokens = 12;
  ChatSession chat(m, gen, s, "", "legal");
  std::string out;
  auto sink = [&](const std::string& t) { out += t; };
  EXPECT_EQ(chat.handle("Hello", sink), ChatSession::Outcome::replied);
  ASSERT_EQ(chat.history().size(), 2u);
  EXPECT_EQ(chat.history()[1].role, Role::assistant);
  EXPECT_EQ(out, chat.history()[1].content + "\n");
  // The first reply is what a fresh generation of the same prompt gives.
  LlamaGenerator fresh(m.base(), m.adapter("legal"), 256);
  GenerationSettings cs = s;
  cs.chat = true;
  const auto ids = generate_tokens(fresh, m.config().vocab_size,
                                   chat_prompt_ids(m.tokenizer(), *m.chat_template(), "Hello"),
                                   end_of_sequence_ids(m.config(), &m.tokenizer(), true), cs)
                       .ids;
  EXPECT_EQ(chat.history()[1].content, m.tokenizer().decode(ids, true));
  out.clear();
  chat.handle("/adapter", sink);
  EXPECT_EQ(out, "models: base *legal medical\n");
  out.clear();
  chat.handle("/adapter nope", sink);
  EXPECT_TRUE(has(out, "no model named \"nope\"")) << out;
  chat.handle("/adapter medical", sink);
  EXPECT_EQ(chat.model(), "medical");
  chat.handle("Again", sink);
  EXPECT_EQ(chat.history().size(), 4u);
  chat.handle("/reset", sink);
  EXPECT_TRUE(chat.history().empty());
  // An interrupt stops the reply after its first token; the chat goes on.
  std::atomic<bool> stop{true};
  out.clear();
  s.max_new_tokens = 100;
  ChatSession longer(m, gen, s, "", "base");
  EXPECT_EQ(longer.handle("Tell me everything", sink, &stop), ChatSession::Outcome::replied);
  EXPECT_TRUE(has(out, " [stopped]\n")) << out;
  EXPECT_EQ(longer.handle("/quit", sink), ChatSession::Outcome::quit);
}

}  // namespace
}  // namespace qlora
