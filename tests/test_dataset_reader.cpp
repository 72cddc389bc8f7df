// Dataset readers: every format loads from the fixture datasets, and every
// kind of bad input is reported with file:line (or file[index]) and the problem.
#include <gtest/gtest.h>

#include "core/error.h"
#include "data/dataset_reader.h"
#include "testing.h"

namespace qlora {
namespace {

using testing::error_of;

using testing::ScratchDir;
using testing::write_bytes;

ReadOptions opts(DataFormat f, OnBadRecord b = OnBadRecord::error) {
  ReadOptions o;
  o.format = f;
  o.on_bad_record = b;
  return o;
}

bool has(const std::string& s, const std::string& sub) { return s.find(sub) != std::string::npos; }

size_t count_with_input(const ReadResult& r) {
  size_t n = 0;
  for (const auto& s : r.samples)
    for (const auto& m : s.conversation) n += !m.input.empty();
  return n;
}

TEST(DatasetReader, AlpacaFixtures) {
  QLORA_REQUIRE_FIXTURES(fx);
  const auto d = fx / "datasets";
  auto r = read_dataset(d / "alpaca/alpaca_data_first102.json", opts(DataFormat::alpaca));
  ASSERT_EQ(r.samples.size(), 102u);
  EXPECT_EQ(r.skipped, 0u);
  const auto& s0 = r.samples[0];
  EXPECT_EQ(s0.kind, Sample::Kind::conversation);
  EXPECT_TRUE(has(s0.where, "alpaca_data_first102.json[0]")) << s0.where;
  ASSERT_EQ(s0.conversation.size(), 2u);
  EXPECT_EQ(s0.conversation[0].role, Role::user);
  EXPECT_EQ(s0.conversation[0].content, "Give three tips for staying healthy.");
  EXPECT_EQ(s0.conversation[0].input, "");
  EXPECT_EQ(s0.conversation[1].role, Role::assistant);
  EXPECT_EQ(s0.conversation[1].content.substr(0, 50), "1. Eat a balanced diet and make sure to include pl");
  EXPECT_EQ(count_with_input(r), 48u);

  r = read_dataset(d / "alpaca/llamafactory_alpaca_en_demo.json", opts(DataFormat::alpaca));
  EXPECT_EQ(r.samples.size(), 999u);
  EXPECT_EQ(count_with_input(r), 412u);
  EXPECT_EQ(read_dataset(d / "alpaca/llamafactory_identity.json", opts(DataFormat::alpaca)).samples.size(), 91u);
  r = read_dataset(d / "alpaca/torchtune_alpaca_tiny.json", opts(DataFormat::alpaca));
  EXPECT_EQ(r.samples.size(), 100u);
  EXPECT_EQ(count_with_input(r), 46u);
  r = read_dataset(d / "medical/chatdoctor_genmedgpt5k.json", opts(DataFormat::alpaca));
  EXPECT_EQ(r.samples.size(), 5452u);
  EXPECT_EQ(count_with_input(r), 5452u);
  EXPECT_EQ(read_dataset(d / "medical/medalpaca_medical_meadow_small.json", opts(DataFormat::alpaca)).samples.size(),
            5942u);
}

TEST(DatasetReader, AlpacaMultiTurnRecordsOfLawyerLlama) {
  QLORA_REQUIRE_FIXTURES(fx);
  // lawyer-llama ships each record as an array of alpaca turns.
  const auto d = fx / "datasets/legal/lawyer-llama";
  auto r = read_dataset(d / "legal_advice.json", opts(DataFormat::alpaca));
  ASSERT_EQ(r.samples.size(), 5000u);
  const auto& c = r.samples[0].conversation;
  ASSERT_EQ(c.size(), 2u);
  EXPECT_EQ(c[0].content, "假冒他人专利进行买卖算不算诈骗");
  EXPECT_EQ(c[1].role, Role::assistant);
  EXPECT_EQ(read_dataset(d / "judical_examination.json", opts(DataFormat::alpaca)).samples.size(), 2000u);
}

TEST(DatasetReader, ChatFixtures) {
  QLORA_REQUIRE_FIXTURES(fx);
  const auto d = fx / "datasets/chat";
  // One ShareGPT conversation as a single JSON object.
  auto r = read_dataset(d / "axolotl_conversation.json", opts(DataFormat::sharegpt));
  ASSERT_EQ(r.samples.size(), 1u);
  const auto& c = r.samples[0].conversation;
  ASSERT_EQ(c.size(), 12u);
  for (size_t i = 0; i < c.size(); ++i) EXPECT_EQ(c[i].role, i % 2 ? Role::assistant : Role::user);
  EXPECT_EQ(c[0].content, "how could i implement a minesweeper algorithm that utilises algebraic topology to solve boards?");
  EXPECT_EQ(c[1].content.size(), 615u);

  // OpenAI messages with LLaMA-Factory's content parts ({"type": "text", "value": ...}).
  r = read_dataset(d / "llamafactory_v1_sft_demo.jsonl", opts(DataFormat::messages));
  ASSERT_EQ(r.samples.size(), 500u);
  EXPECT_TRUE(has(r.samples[0].where, "llamafactory_v1_sft_demo.jsonl:1")) << r.samples[0].where;
  EXPECT_EQ(r.samples[0].conversation[0].content, "hi");
  EXPECT_EQ(r.samples[0].conversation[1].content,
            "Hello! I am {{name}}, an AI assistant developed by {{author}}. How can I assist you today?");

  // Pre-tokenized (axolotl's reference tokenization, with labels).
  for (const char* f : {"axolotl_conversation.tokenized_llama2chat.json", "axolotl_conversation.tokenized.json"}) {
    r = read_dataset(d / f, opts(DataFormat::tokens));
    ASSERT_EQ(r.samples.size(), 1u);
    const auto& s = r.samples[0];
    EXPECT_EQ(s.kind, Sample::Kind::tokens);
    EXPECT_EQ(s.labels.size(), s.input_ids.size());
    EXPECT_EQ(s.input_ids[0], 1);  // <s>
  }
  EXPECT_EQ(r.samples[0].input_ids.size(), 1970u);
}

TEST(DatasetReader, TextAndPromptCompletionWithConfiguredFieldNames) {
  QLORA_REQUIRE_FIXTURES(fx);
  const auto d = fx / "datasets";
  // tatsu-lab/alpaca records carry a ready "text": continued-pretraining input.
  auto r = read_dataset(d / "alpaca/torchtune_alpaca_tiny.json", opts(DataFormat::text));
  ASSERT_EQ(r.samples.size(), 100u);
  EXPECT_EQ(r.samples[0].kind, Sample::Kind::text);
  EXPECT_EQ(r.samples[0].text.substr(0, 40), "Below is an instruction that describes a");

  // PubMedQA: an object of records keyed by PubMed id (read in key order),
  // fields renamed.
  ReadOptions o = opts(DataFormat::prompt_completion);
  o.fields.prompt = "QUESTION";
  o.fields.completion = "LONG_ANSWER";
  r = read_dataset(d / "medical/pubmedqa_ori_pqal.json", o);
  ASSERT_EQ(r.samples.size(), 1000u);
  const Sample* first = nullptr;
  for (const auto& s : r.samples)
    if (has(s.where, "pubmedqa_ori_pqal.json[21645374]")) first = &s;
  ASSERT_NE(first, nullptr);
  EXPECT_EQ(first->conversation[0].role, Role::user);
  EXPECT_EQ(first->conversation[0].content,
            "Do mitochondria play a role in remodelling lace plant leaves during programmed cell death?");
}

TEST(DatasetReader, RealFileInTheWrongFormatNamesLineAndField) {
  QLORA_REQUIRE_FIXTURES(fx);
  // Self-instruct seed tasks keep outputs under "instances": not alpaca.
  const auto f = fx / "datasets/alpaca/stanford_alpaca_seed_tasks.jsonl";
  const auto e = error_of([&] { read_dataset(f, opts(DataFormat::alpaca)); });
  EXPECT_TRUE(has(e, "stanford_alpaca_seed_tasks.jsonl:1: missing field \"output\"")) << e;
  const auto r = read_dataset(f, opts(DataFormat::alpaca, OnBadRecord::skip));
  EXPECT_EQ(r.samples.size(), 0u);
  EXPECT_EQ(r.skipped, 175u);
}

TEST(DatasetReader, JsonlBadRecordsNameTheirLine) {
  ScratchDir dir;
  const auto f = dir / "data.jsonl";
  write_bytes(f,
              "{\"prompt\": \"a\", \"completion\": \"b\"}\n"
              "\n"                                                  // blank: not a record, still counted as a line
              "{\"prompt\": \"a\", \"completion\": \"b\"\n"          // 3: malformed
              "{\"prompt\": \"a\"}\n"                               // 4: missing
              "{\"prompt\": 7, \"completion\": \"b\"}\n"            // 5: mistyped
              "{\"prompt\": \"\", \"completion\": \"b\"}\n"         // 6: empty
              "{\"prompt\": \"\xff\xfe\", \"completion\": \"b\"}\n"  // 7: invalid UTF-8
              "[1, 2]\r\n"                                          // 8: not an object
              "{\"prompt\": \"c\", \"completion\": \"d\"}\r\n");    // 9: fine, CRLF
  const auto e = error_of([&] { read_dataset(f, opts(DataFormat::prompt_completion)); });
  EXPECT_TRUE(has(e, "data.jsonl:3: malformed JSON")) << e;

  const auto r = read_dataset(f, opts(DataFormat::prompt_completion, OnBadRecord::skip));
  ASSERT_EQ(r.samples.size(), 2u);
  EXPECT_EQ(r.samples[1].conversation[1].content, "d");
  EXPECT_EQ(r.skipped, 6u);
  ASSERT_EQ(r.skip_reasons.size(), 6u);
  const char* want[] = {"data.jsonl:3: malformed JSON",
                        "data.jsonl:4: missing field \"completion\"",
                        "data.jsonl:5: field \"prompt\" is a number, expected a string",
                        "data.jsonl:6: field \"prompt\" is empty",
                        "data.jsonl:7: invalid UTF-8 at byte 13",
                        "data.jsonl:8: record is an array, expected an object"};
  for (size_t i = 0; i < 6; ++i) EXPECT_TRUE(has(r.skip_reasons[i], want[i])) << r.skip_reasons[i];
}

TEST(DatasetReader, JsonArrayBadRecordsNameTheirIndex) {
  ScratchDir dir;
  const auto f = dir / "chat.json";
  write_bytes(f, R"([
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]},
    {"messages": [{"role": "user", "content": "hi"}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
                  {"role": "assistant", "content": "a"}]},
    {"messages": []},
    {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "q"},
                  {"role": "assistant", "content": ""}]},
    {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": [{"type": "text", "text": "q"}]},
                  {"role": "assistant", "content": "a"}]}
  ])");
  const auto e = error_of([&] { read_dataset(f, opts(DataFormat::messages)); });
  EXPECT_TRUE(has(e, "chat.json[1]: messages[1]: unknown role \"tool\"")) << e;
  const auto r = read_dataset(f, opts(DataFormat::messages, OnBadRecord::skip));
  EXPECT_EQ(r.skipped, 5u);
  ASSERT_EQ(r.samples.size(), 2u);
  EXPECT_TRUE(has(r.skip_reasons[1], "chat.json[2]: conversation has no assistant message")) << r.skip_reasons[1];
  EXPECT_TRUE(has(r.skip_reasons[2], "chat.json[3]: messages[0]: content[0]: part of type \"image_url\""))
      << r.skip_reasons[2];
  EXPECT_TRUE(has(r.skip_reasons[3], "chat.json[4]: field \"messages\" is an empty array")) << r.skip_reasons[3];
  EXPECT_TRUE(has(r.skip_reasons[4], "chat.json[5]: messages[2]: assistant message is empty")) << r.skip_reasons[4];
  // An empty system message is dropped, not an error; text parts are joined.
  const auto& c = r.samples[1].conversation;
  ASSERT_EQ(c.size(), 2u);
  EXPECT_EQ(c[0].content, "q");
}

TEST(DatasetReader, WholeFileErrorsAreNeverSkipped) {
  ScratchDir dir;
  write_bytes(dir / "bad.json", "[\n  {\"text\": \"ok\"},\n  {\"text\": \"caf\xc3\"}\n]\n");
  auto e = error_of([&] { read_dataset(dir / "bad.json", opts(DataFormat::text, OnBadRecord::skip)); });
  EXPECT_TRUE(has(e, "bad.json:3: invalid UTF-8")) << e;
  write_bytes(dir / "broken.json", "[\n  {\"text\": \"ok\"},\n  {\"text\": \"x\"\n]\n");
  e = error_of([&] { read_dataset(dir / "broken.json", opts(DataFormat::text, OnBadRecord::skip)); });
  EXPECT_TRUE(has(e, "broken.json:4: malformed JSON")) << e;
  e = error_of([&] { read_dataset(dir / "missing.jsonl", opts(DataFormat::text)); });
  EXPECT_TRUE(has(e, "missing.jsonl: cannot open")) << e;
  write_bytes(dir / "empty.jsonl", "\n \n");
  e = error_of([&] { read_dataset(dir / "empty.jsonl", opts(DataFormat::text)); });
  EXPECT_TRUE(has(e, "empty")) << e;
  // Overlong encodings and surrogates are not UTF-8 either.
  size_t at = 0;
  EXPECT_FALSE(valid_utf8("ab\xc0\xaf", &at));
  EXPECT_EQ(at, 2u);
  EXPECT_FALSE(valid_utf8("\xed\xa0\x80"));
  EXPECT_FALSE(valid_utf8("\xf4\x90\x80\x80"));
  EXPECT_TRUE(valid_utf8("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"));
}

TEST(DatasetReader, JsonlInADotJsonFileAndSharegptRoles) {
  ScratchDir dir;
  const auto f = dir / "sg.json";
  write_bytes(f,
              "{\"conversations\": [{\"from\": \"system\", \"value\": \"S\"}, {\"from\": \"human\", \"value\": \"Q\"}, "
              "{\"from\": \"gpt\", \"value\": \"A\"}]}\n"
              "{\"conversations\": [{\"from\": \"bot\", \"value\": \"Q\"}]}\n");
  const auto e = error_of([&] { read_dataset(f, opts(DataFormat::sharegpt)); });
  EXPECT_TRUE(has(e, "sg.json:2: conversations[0]: unknown \"from\" value \"bot\"")) << e;
  const auto r = read_dataset(f, opts(DataFormat::sharegpt, OnBadRecord::skip));
  ASSERT_EQ(r.samples.size(), 1u);
  const auto& c = r.samples[0].conversation;
  ASSERT_EQ(c.size(), 3u);
  EXPECT_EQ(c[0].role, Role::system);
  EXPECT_EQ(c[2].content, "A");
}

TEST(DatasetReader, TokensValidateIdsAndLabels) {
  ScratchDir dir;
  const auto f = dir / "tok.jsonl";
  write_bytes(f,
              "{\"input_ids\": [1, 2, 3], \"labels\": [-100, 2, 3]}\n"
              "{\"input_ids\": [5, 6]}\n"
              "{\"input_ids\": [1, 2], \"labels\": [2]}\n"
              "{\"input_ids\": [1, -2]}\n"
              "{\"input_ids\": [1, 2], \"labels\": [-5, 2]}\n"
              "{\"input_ids\": [1, 3000000000]}\n"
              "{\"input_ids\": [1, 2.5]}\n"
              "{\"input_ids\": []}\n");
  const auto r = read_dataset(f, opts(DataFormat::tokens, OnBadRecord::skip));
  ASSERT_EQ(r.samples.size(), 2u);
  EXPECT_EQ(r.samples[0].labels, (std::vector<int32_t>{-100, 2, 3}));
  EXPECT_TRUE(r.samples[1].labels.empty());
  ASSERT_EQ(r.skip_reasons.size(), 6u);
  const char* want[] = {"tok.jsonl:3: field \"labels\" has 1 entries but \"input_ids\" has 2",
                        "tok.jsonl:4: input_ids[1] = -2 is out of range",
                        "tok.jsonl:5: labels[0] = -5",
                        "tok.jsonl:6: input_ids[1] = 3000000000 is out of range",
                        "tok.jsonl:7: input_ids[1] is a number, expected an integer",
                        "tok.jsonl:8: field \"input_ids\" is an empty array"};
  for (size_t i = 0; i < 6; ++i) EXPECT_TRUE(has(r.skip_reasons[i], want[i])) << r.skip_reasons[i];
}

TEST(DatasetReader, FormatNames) {
  EXPECT_EQ(parse_data_format("sharegpt"), DataFormat::sharegpt);
  EXPECT_EQ(std::string(data_format_name(DataFormat::prompt_completion)), "prompt_completion");
  const auto e = error_of([] { parse_data_format("csv"); });
  EXPECT_TRUE(has(e, "'csv'") && has(e, "alpaca, messages, sharegpt, prompt_completion, text, tokens")) << e;
  EXPECT_EQ(parse_on_bad_record("skip"), OnBadRecord::skip);
  EXPECT_THROW(parse_on_bad_record("ignore"), Error);
}

TEST(DatasetReader, EveryPrefixAndByteFlipOfARecordIsAnErrorOrASample) {
  // Never a crash, never another exception type: cut a valid record at every
  // byte, and overwrite every byte with a JSON-significant character.
  const std::string line =
      R"({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "h\u00e9"}]}, {"role": "assistant", "content": "ok"}]})";
  ScratchDir dir;
  std::string file;
  for (size_t n = 0; n <= line.size(); ++n) file += line.substr(0, n) + "\n";
  for (size_t i = 0; i < line.size(); ++i)
    for (char c : {'"', '{', ']', '\\', ',', '\xc3', '0'}) {
      std::string bad = line;
      bad[i] = c;
      file += bad + "\n";
    }
  write_bytes(dir / "fuzz.jsonl", file);
  ReadResult r;
  EXPECT_NO_THROW(r = read_dataset(dir / "fuzz.jsonl", opts(DataFormat::messages, OnBadRecord::skip)));
  EXPECT_GT(r.samples.size(), 1u);
  EXPECT_GT(r.skipped, line.size());
  for (const auto& s : r.samples) EXPECT_FALSE(s.conversation.empty());
}

}  // namespace
}  // namespace qlora
