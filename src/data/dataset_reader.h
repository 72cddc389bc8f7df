// Dataset readers: JSONL files, JSON arrays (and JSON objects, see below) in
// the formats people bring, turned into one Sample per record: a conversation
// (rendered later by a chat template), a plain text (continued pretraining) or
// pre-tokenized ids.
//
// Every bad record (malformed JSON line, missing or mistyped field, empty text,
// invalid UTF-8, unknown role) is reported as "<file>:<line>: <problem>" for
// JSONL and "<file>[<index>]: <problem>" for JSON arrays; with
// on_bad_record = skip it is counted instead and the read goes on.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "data/chat_template.h"

namespace qlora {

enum class DataFormat { alpaca, messages, sharegpt, prompt_completion, text, tokens };
// "alpaca", "messages", "sharegpt", "prompt_completion", "text", "tokens";
// anything else -> Error listing them.
DataFormat parse_data_format(std::string_view name);
const char* data_format_name(DataFormat f);

enum class OnBadRecord { error, skip };
OnBadRecord parse_on_bad_record(std::string_view name);  // "error" | "skip"

// Field names, so differently named datasets load without conversion (e.g.
// PubMedQA as prompt_completion with prompt = "QUESTION", completion =
// "LONG_ANSWER").
struct FieldNames {
  // alpaca: a record is one turn, or an array of turns (a multi-turn record,
  // as lawyer-llama ships them); system is optional.
  std::string instruction = "instruction", input = "input", output = "output", system = "system";
  // messages: [{role, content}], role in system/user/assistant; content a
  // string or OpenAI-style parts [{"type": "text", "text"|"value": ...}].
  std::string messages = "messages", role = "role", content = "content";
  // sharegpt: [{from, value}], from in system/human/gpt (user/assistant too).
  std::string conversations = "conversations", from = "from", value = "value";
  std::string prompt = "prompt", completion = "completion";
  std::string text = "text";
  // tokens: input_ids (ints >= 0), optional labels (same length; -100 = not trained).
  std::string input_ids = "input_ids", labels = "labels";
};

struct ReadOptions {
  DataFormat format = DataFormat::messages;
  FieldNames fields;
  OnBadRecord on_bad_record = OnBadRecord::error;
};

struct Sample {
  enum class Kind { conversation, text, tokens };
  Kind kind = Kind::conversation;
  Conversation conversation;           // kind == conversation
  std::string text;                    // kind == text
  std::vector<int32_t> input_ids;      // kind == tokens
  std::vector<int32_t> labels;         // kind == tokens; empty = train on all
  std::string where;                   // "file:line" or "file[index]", for later errors
};

struct ReadResult {
  std::vector<Sample> samples;
  size_t skipped = 0;                  // bad records skipped (on_bad_record = skip)
  std::vector<std::string> skip_reasons;  // the first few, for the log
};

// Reads one file. Layout by content: "*.jsonl"/"*.ndjson" are JSONL; otherwise
// a file starting with '[' is a JSON array of records, one starting with '{'
// is a single record (e.g. one ShareGPT conversation), an object of records
// keyed by id (e.g. PubMedQA; location "file[key]", read in key order), or else JSONL. Errors
// about the file itself (missing, unreadable, malformed JSON array) are never
// skipped.
ReadResult read_dataset(const std::filesystem::path& file, const ReadOptions& options);

// Converts one parsed record (for callers with records in memory). Throws
// qlora::Error naming the problem, without a location (the caller adds it).
Sample record_to_sample(const nlohmann::json& record, const ReadOptions& options);

// True when s is well-formed UTF-8 (no overlongs, surrogates or > U+10FFFF);
// bad_offset gets the offset of the first bad byte otherwise.
bool valid_utf8(std::string_view s, size_t* bad_offset = nullptr);

}  // namespace qlora
