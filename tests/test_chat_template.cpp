// Chat templates: rendered text against what the real Jinja templates produce,
// which text is trained, and template detection on the fixture configs.
#include <gtest/gtest.h>

#include <map>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/chat_template.h"
#include "testing.h"

namespace qlora {
namespace {

using testing::error_of;

using nlohmann::json;

Message msg(Role r, std::string content) { return Message{r, std::move(content), {}}; }

// The conversations of the table below.
const std::map<std::string, Conversation>& conversations() {
  static const std::map<std::string, Conversation> c = {
      {"one", {msg(Role::user, "Hello!"), msg(Role::assistant, "Hi there. How can I help?")}},
      {"sys2",
       {msg(Role::system, "You are terse."), msg(Role::user, "What is 2+2?"), msg(Role::assistant, "4"),
        msg(Role::user, "And 3+3?"), msg(Role::assistant, "6")}},
      {"spaces", {msg(Role::user, " padded question \n"), msg(Role::assistant, "  answer with spaces  ")}},
      {"useronly", {msg(Role::system, "Be brief."), msg(Role::user, "Hi")}},
  };
  return c;
}

struct Expected {
  const char* tmpl;
  const char* conversation;
  const char* text;
};

// What jinja2 3.1 (trim_blocks + lstrip_blocks, as transformers sets it up)
// renders with add_generation_prompt=false from: fixtures/chat_templates/
// (Llama 3.1, Qwen2.5, Mistral v1/v3/Nemo), SmolLM's tokenizer_config.json
// (chatml), and the chat_template strings of meta-llama/Meta-Llama-3-8B-Instruct
// (llama3) and meta-llama/Llama-2-7b-chat-hf (llama2), with the families'
// bos/eos tokens. Each was also derived by hand from the template source.
const Expected kExpected[] = {
    {"llama3.1", "one",
     "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHi there. How can I help?<|eot_id|>"},
    {"llama3.1", "sys2",
     "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n6<|eot_id|>"},
    {"llama3.1", "spaces",
     "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\npadded question<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nanswer with spaces<|eot_id|>"},
    {"llama3.1", "useronly",
     "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"},
    {"qwen2.5", "one",
     "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\nHi there. How can I help?<|im_end|>\n"},
    {"qwen2.5", "sys2",
     "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n6<|im_end|>\n"},
    {"qwen2.5", "spaces",
     "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\n padded question \n<|im_end|>\n<|im_start|>assistant\n  answer with spaces  <|im_end|>\n"},
    {"qwen2.5", "useronly",
     "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"},
    {"mistral-v1", "one",
     "<s> [INST] Hello! [/INST] Hi there. How can I help?</s>"},
    {"mistral-v1", "sys2",
     "<s> [INST] You are terse.\n\nWhat is 2+2? [/INST] 4</s> [INST] And 3+3? [/INST] 6</s>"},
    {"mistral-v1", "spaces",
     "<s> [INST]  padded question \n [/INST]   answer with spaces  </s>"},
    {"mistral-v1", "useronly",
     "<s> [INST] Be brief.\n\nHi [/INST]"},
    {"mistral-v3", "one",
     "<s>[INST] Hello![/INST] Hi there. How can I help?</s>"},
    {"mistral-v3", "sys2",
     "<s>[INST] What is 2+2?[/INST] 4</s>[INST] You are terse.\n\nAnd 3+3?[/INST] 6</s>"},
    {"mistral-v3", "spaces",
     "<s>[INST]  padded question \n[/INST]   answer with spaces  </s>"},
    {"mistral-v3", "useronly",
     "<s>[INST] Be brief.\n\nHi[/INST]"},
    {"mistral-nemo", "one",
     "<s>[INST]Hello![/INST]Hi there. How can I help?</s>"},
    {"mistral-nemo", "sys2",
     "<s>[INST]What is 2+2?[/INST]4</s>[INST]And 3+3?[/INST]6</s>"},
    {"mistral-nemo", "spaces",
     "<s>[INST] padded question \n[/INST]  answer with spaces  </s>"},
    {"mistral-nemo", "useronly",
     "<s>[INST]Be brief.\n\nHi[/INST]"},
    // SmolLM2-135M-Instruct's tokenizer.chat_template (the fixture GGUF's metadata).
    {"smollm2", "one",
     "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\nHi there. How can I help?<|im_end|>\n"},
    {"smollm2", "sys2",
     "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n6<|im_end|>\n"},
    {"chatml", "one",
     "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\nHi there. How can I help?<|im_end|>\n"},
    {"chatml", "sys2",
     "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n6<|im_end|>\n"},
    {"chatml", "spaces",
     "<|im_start|>user\n padded question \n<|im_end|>\n<|im_start|>assistant\n  answer with spaces  <|im_end|>\n"},
    {"chatml", "useronly",
     "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"},
    {"llama2", "one",
     "<s>[INST] Hello! [/INST] Hi there. How can I help? </s>"},
    {"llama2", "sys2",
     "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nWhat is 2+2? [/INST] 4 </s><s>[INST] And 3+3? [/INST] 6 </s>"},
    {"llama2", "spaces",
     "<s>[INST] padded question [/INST] answer with spaces </s>"},
    {"llama2", "useronly",
     "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"},
    {"llama3", "one",
     "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHi there. How can I help?<|eot_id|>"},
    {"llama3", "sys2",
     "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n6<|eot_id|>"},
    {"llama3", "spaces",
     "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\npadded question<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nanswer with spaces<|eot_id|>"},
    {"llama3", "useronly",
     "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"},
    // Qwen3's chat_template (Qwen/Qwen3-* tokenizer_config.json): the last reply gets an empty think block.
    {"qwen3", "one",
     "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHi there. How can I help?<|im_end|>\n"},
    {"qwen3", "sys2",
     "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n6<|im_end|>\n"},
    {"qwen3", "spaces",
     "<|im_start|>user\n padded question \n<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n  answer with spaces  <|im_end|>\n"},
    {"qwen3", "useronly",
     "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"},
};

TEST(ChatTemplate, RendersExactlyWhatTheJinjaTemplatesRender) {
  for (const auto& e : kExpected) {
    SCOPED_TRACE(std::string(e.tmpl) + " / " + e.conversation);
    const auto t = ChatTemplate::named(e.tmpl);
    EXPECT_EQ(t.render_text(conversations().at(e.conversation)), e.text);
  }
}

std::string trained_text(const std::vector<Segment>& segs) {
  std::string s;
  for (const auto& g : segs)
    if (g.trained) s += g.text;
  return s;
}

TEST(ChatTemplate, TrainsAssistantRepliesAndTheirEndOfTurnToken) {
  const auto& conv = conversations().at("sys2");
  const std::map<std::string, std::string> want = {
      {"llama3", "4<|eot_id|>6<|eot_id|>"},  {"llama3.1", "4<|eot_id|>6<|eot_id|>"},
      {"llama2", " 4 </s> 6 </s>"},          {"mistral-v1", " 4</s> 6</s>"},
      {"mistral-v3", " 4</s> 6</s>"},        {"mistral-nemo", "4</s>6</s>"},
      {"chatml", "4<|im_end|>6<|im_end|>"},  {"qwen2.5", "4<|im_end|>6<|im_end|>"},
      {"smollm2", "4<|im_end|>6<|im_end|>"}, {"qwen3", "4<|im_end|>6<|im_end|>"},
      {"alpaca", "4<eos>6<eos>"},            {"none", "4<eos>6<eos>"},
  };
  TemplateOptions o;
  o.eos_token = "<eos>";
  for (const auto& name : ChatTemplate::names()) {
    SCOPED_TRACE(name);
    const auto segs = ChatTemplate::named(name, o).render(conv);
    EXPECT_EQ(trained_text(segs), want.at(name));
    // The end-of-turn token is its own special segment, and trained.
    ASSERT_FALSE(segs.empty());
    const Segment& last = segs.back().trained ? segs.back() : segs[segs.size() - 2];
    EXPECT_TRUE(last.special_text) << last.text;
    EXPECT_TRUE(last.trained);
    // Nothing of the prompt is trained: no role header, no user text.
    EXPECT_EQ(trained_text(segs).find("3+3"), std::string::npos);
  }
}

// add_generation_prompt=True as the Jinja templates render it (the interop
// suite checks it against Jinja2 on the real templates).
TEST(ChatTemplate, GenerationPromptIsTheAssistantHeader) {
  const auto& c = conversations().at("useronly");
  const std::map<std::string, std::string> header = {
      {"llama3", "<|start_header_id|>assistant<|end_header_id|>\n\n"},
      {"llama3.1", "<|start_header_id|>assistant<|end_header_id|>\n\n"},
      {"chatml", "<|im_start|>assistant\n"},
      {"qwen2.5", "<|im_start|>assistant\n"},
      {"smollm2", "<|im_start|>assistant\n"},
      {"llama2", ""},
      {"mistral-v1", ""},
      {"mistral-v3", ""},
      {"mistral-nemo", ""},
  };
  for (const auto& [name, h] : header) {
    SCOPED_TRACE(name);
    const auto t = ChatTemplate::named(name);
    std::string with;
    for (const auto& s : t.render(c, true)) with += s.text;
    EXPECT_EQ(with, t.render_text(c) + h);
  }
}

// Qwen3: past replies lose their reasoning, the replies after the last user
// message keep it in a think block (trained), an empty block is not trained;
// the generation prompt has the empty block only with enable_thinking false
// (Jinja2 renders of the real template, as the table above).
TEST(ChatTemplate, Qwen3ThinkBlocks) {
  const auto t = ChatTemplate::named("qwen3");
  EXPECT_TRUE(t.options().enable_thinking);
  const Conversation think = {msg(Role::user, "Q1"), msg(Role::assistant, "<think>\nold reasoning\n</think>\n\nA1"),
                              msg(Role::user, "Q2"),
                              msg(Role::assistant, "<think>\nstep 1\nstep 2\n\n</think>\n\n\nA2")};
  EXPECT_EQ(t.render_text(think),
            "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
            "<|im_start|>assistant\n<think>\nstep 1\nstep 2\n</think>\n\nA2<|im_end|>\n");
  EXPECT_EQ(trained_text(t.render(think)), "A1<|im_end|><think>\nstep 1\nstep 2\n</think>\n\nA2<|im_end|>");
  const Conversation two = {msg(Role::user, "Q"), msg(Role::assistant, "first"),
                            msg(Role::assistant, "<think>r</think>second")};
  EXPECT_EQ(t.render_text(two),
            "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nfirst<|im_end|>\n<|im_start|>assistant\n"
            "<think>\nr\n</think>\n\nsecond<|im_end|>\n");
  const auto& c = conversations().at("one");
  EXPECT_EQ(trained_text(t.render(c)), "Hi there. How can I help?<|im_end|>");

  const auto& u = conversations().at("useronly");
  std::string with, without;
  for (const auto& s : t.render(u, true)) with += s.text;
  const auto nothink = ChatTemplate::named("qwen3-nothink");
  EXPECT_FALSE(nothink.options().enable_thinking);
  EXPECT_EQ(nothink.kind(), ChatTemplate::Kind::qwen3);
  for (const auto& s : nothink.render(u, true)) without += s.text;
  EXPECT_EQ(with, t.render_text(u) + "<|im_start|>assistant\n");
  EXPECT_EQ(without, t.render_text(u) + "<|im_start|>assistant\n<think>\n\n</think>\n\n");
  // Detected by its think markers, before the ChatML families.
  EXPECT_EQ(ChatTemplate::detect("{%- set ns = namespace(last_query_index=0) %}<|im_start|><think><|im_end|>"),
            ChatTemplate::Kind::qwen3);
}

TEST(ChatTemplate, SpecialSegmentsAreSingleTokensAndNeighboursMerge) {
  const auto segs = ChatTemplate::named("llama3.1").render(conversations().at("one"));
  const std::vector<Segment> want = {
      {"<|begin_of_text|>", false, true},
      {"<|start_header_id|>", false, true},
      {"system", false, false},
      {"<|end_header_id|>", false, true},
      {"\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n", false, false},
      {"<|eot_id|>", false, true},
      {"<|start_header_id|>", false, true},
      {"user", false, false},
      {"<|end_header_id|>", false, true},
      {"\n\nHello!", false, false},
      {"<|eot_id|>", false, true},
      {"<|start_header_id|>", false, true},
      {"assistant", false, false},
      {"<|end_header_id|>", false, true},
      {"\n\n", false, false},
      {"Hi there. How can I help?", true, false},
      {"<|eot_id|>", true, true},
  };
  EXPECT_EQ(segs, want);
  // In Mistral v1 [INST] is plain text; from v3 on it is a control token.
  const auto v1 = ChatTemplate::named("mistral-v1").render(conversations().at("one"));
  for (const auto& s : v1) EXPECT_TRUE(!s.special_text || s.text == "<s>" || s.text == "</s>") << s.text;
  const auto v3 = ChatTemplate::named("mistral-v3").render(conversations().at("one"));
  EXPECT_EQ(v3[1], (Segment{"[INST]", false, true}));
}

TEST(ChatTemplate, Llama31DateIsFixedAndConfigurable) {
  TemplateOptions o;
  o.date_string = "01 Jan 2025";
  const auto text = ChatTemplate::named("llama3.2", o).render_text(conversations().at("one"));
  EXPECT_NE(text.find("\nToday Date: 01 Jan 2025\n\n<|eot_id|>"), std::string::npos) << text;
  EXPECT_EQ(ChatTemplate::named("llama3.3").kind(), ChatTemplate::Kind::llama31);
}

// Qwen3's real template (llama.cpp's copy of Qwen/Qwen3-0.6B's, unpacked
// from the pinned llama-cpp-python sdist by scripts/peer-fixtures.sh) is
// recognized as qwen3; Jinja2 renders it against qlora in the interop suite.
TEST(ChatTemplate, DetectsQwen3sPublishedTemplate) {
  QLORA_REQUIRE_PEER_FIXTURE(file, "chat_templates/Qwen-Qwen3-0.6B.jinja");
  const auto t = ChatTemplate::resolve("auto", testing::read_bytes(file));
  EXPECT_EQ(t.name(), "qwen3");
  EXPECT_EQ(t.kind(), ChatTemplate::Kind::qwen3);
}

TEST(ChatTemplate, DetectsTheFixtureTemplates) {
  QLORA_REQUIRE_FIXTURES(fx);
  auto read = [](const std::filesystem::path& p) { return testing::read_bytes(p); };
  auto config_template = [&](const std::filesystem::path& p) -> std::optional<std::string> {
    const auto j = json::parse(read(p));
    if (!j.contains("chat_template")) return std::nullopt;
    return j["chat_template"].get<std::string>();
  };
  const auto dir = fx / "chat_templates";
  const std::map<std::string, std::string> want = {
      {"meta-llama-Llama-3.1-8B-Instruct.jinja", "llama3.1"},
      {"meta-llama-Llama-3.2-3B-Instruct.jinja", "llama3.1"},
      {"meta-llama-Llama-3.3-70B-Instruct.jinja", "llama3.1"},
      {"Qwen-Qwen2.5-7B-Instruct.jinja", "qwen2.5"},
      {"mistral_v1_spm.jinja", "mistral-v1"},
      {"mistral_v3_spm.jinja", "mistral-v3"},
      {"mistralai-Mistral-Nemo-Instruct-2407.jinja", "mistral-nemo"},
  };
  for (const auto& [file, name] : want) {
    SCOPED_TRACE(file);
    const auto t = ChatTemplate::resolve("auto", read(dir / file));
    EXPECT_EQ(t.name(), name);
  }
  EXPECT_EQ(ChatTemplate::resolve("auto", config_template(fx / "tokenizers/smollm-135m-instruct/tokenizer_config.json"))
                .name(),
            "chatml");
  EXPECT_EQ(
      ChatTemplate::resolve("auto", config_template(fx / "tokenizers/llama3/assembled_hf/tokenizer_config.json")).name(),
      "llama3.1");
  // Llama 2's tokenizer_config.json carries no chat_template: auto must ask
  // for a name, and naming it works.
  const auto none = config_template(fx / "tokenizers/llama2-hf/tokenizer_config.json");
  if (none) {
    EXPECT_EQ(ChatTemplate::resolve("auto", none).name(), "llama2");
  } else {
    const auto e = error_of([&] { ChatTemplate::resolve("auto", none); });
    EXPECT_NE(e.find("no chat_template"), std::string::npos) << e;
    EXPECT_NE(e.find("llama2"), std::string::npos) << e;
  }
  EXPECT_EQ(ChatTemplate::resolve("llama2", none).name(), "llama2");
}

TEST(ChatTemplate, DetectsLlama2AndLlama3ByMarkers) {
  // The chat_template strings of meta-llama/Llama-2-7b-chat-hf and
  // Meta-Llama-3-8B-Instruct, abridged to their rendering lines.
  EXPECT_EQ(ChatTemplate::detect("{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + "
                                 "message['content'] %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"),
            ChatTemplate::Kind::llama2);
  EXPECT_EQ(ChatTemplate::detect("{% set content = '<|start_header_id|>' + message['role'] + "
                                 "'<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}"),
            ChatTemplate::Kind::llama3);
  EXPECT_EQ(ChatTemplate::detect("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"), std::nullopt);
}

TEST(ChatTemplate, UnknownTemplatesAndNamesListTheSupportedNames) {
  auto e = error_of([] { ChatTemplate::resolve("auto", std::string("{% for m in messages %}{{ m.content }}{% endfor %}")); });
  for (const char* n : {"llama3.1", "llama2", "mistral-v3", "chatml", "alpaca", "none"})
    EXPECT_NE(e.find(n), std::string::npos) << e;
  e = error_of([] { ChatTemplate::named("vicuna"); });
  EXPECT_NE(e.find("'vicuna'"), std::string::npos) << e;
  EXPECT_NE(e.find("qwen2.5"), std::string::npos) << e;
}

TEST(ChatTemplate, RefusesConversationsTheTemplatesReject) {
  const Conversation two_users = {msg(Role::user, "a"), msg(Role::user, "b")};
  for (const char* n : {"llama2", "mistral-v1", "mistral-v3", "mistral-nemo"}) {
    const auto e = error_of([&] { ChatTemplate::named(n).render(two_users); });
    EXPECT_NE(e.find("alternate"), std::string::npos) << e;
  }
  const auto e = error_of([] { ChatTemplate::named("chatml").render({}); });
  EXPECT_NE(e.find("empty conversation"), std::string::npos) << e;
  // alpaca and none take their EOS from the tokenizer; without one they refuse
  // rather than train a model that never learns to stop.
  const auto a = error_of([] { ChatTemplate::named("alpaca").render(conversations().at("one")); });
  EXPECT_NE(a.find("EOS"), std::string::npos) << a;
  // ChatML and Llama 3 render any order, as their Jinja does.
  EXPECT_EQ(ChatTemplate::named("chatml").render_text(two_users),
            "<|im_start|>user\na<|im_end|>\n<|im_start|>user\nb<|im_end|>\n");
}

TEST(ChatTemplate, AlpacaMatchesTheStanfordPromptOfTheFixtureRecords) {
  QLORA_REQUIRE_FIXTURES(fx);
  // tatsu-lab/alpaca records carry their training text (without EOS) in "text".
  const auto data = json::parse(testing::read_bytes(fx / "datasets/alpaca/torchtune_alpaca_tiny.json"));
  TemplateOptions o;
  o.eos_token = "</s>";
  const auto t = ChatTemplate::named("alpaca", o);
  size_t with_input = 0;
  for (size_t i = 0; i < data.size(); ++i) {
    SCOPED_TRACE(i);
    const auto& r = data[i];
    Message user{Role::user, r["instruction"].get<std::string>(), r["input"].get<std::string>()};
    with_input += !user.input.empty();
    const Conversation c = {user, msg(Role::assistant, r["output"].get<std::string>())};
    const auto segs = t.render(c);
    EXPECT_EQ(t.render_text(c), r["text"].get<std::string>() + "</s>");
    EXPECT_EQ(trained_text(segs), r["output"].get<std::string>() + "</s>");
  }
  EXPECT_GT(with_input, 0u);
  // Other templates join instruction and input with "\n" (LLaMA-Factory).
  const Conversation c = {Message{Role::user, "Translate.", "Bonjour"}, msg(Role::assistant, "Hello")};
  EXPECT_EQ(ChatTemplate::named("chatml").render_text(c),
            "<|im_start|>user\nTranslate.\nBonjour<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n");
}

TEST(ChatTemplate, AlpacaMultiTurnAndSystem) {
  TemplateOptions o;
  o.eos_token = "</s>";
  const Conversation c = {msg(Role::system, "You are a lawyer."), msg(Role::user, "Q1"), msg(Role::assistant, "A1"),
                          msg(Role::user, "Q2"), msg(Role::assistant, "A2")};
  EXPECT_EQ(ChatTemplate::named("alpaca", o).render_text(c),
            "You are a lawyer.\n\n### Instruction:\nQ1\n\n### Response:\nA1</s>\n\n### Instruction:\nQ2\n\n"
            "### Response:\nA2</s>");
  EXPECT_EQ(ChatTemplate::named("none", o).render_text(c), "You are a lawyer.Q1A1</s>Q2A2</s>");
}

}  // namespace
}  // namespace qlora
