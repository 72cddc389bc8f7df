// A dataset file in each format (alpaca, messages, sharegpt,
// prompt_completion, text, tokens) and layout (JSONL, or a JSON array/object):
// the first byte picks format, layout and on_bad_record; the rest is the file.
#include "data/dataset_reader.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qlora;
  if (size == 0) return 0;
  static constexpr DataFormat kFormats[] = {DataFormat::alpaca, DataFormat::messages,
                                            DataFormat::sharegpt, DataFormat::prompt_completion,
                                            DataFormat::text, DataFormat::tokens};
  const uint8_t pick = data[0];
  ReadOptions o;
  o.format = kFormats[(pick & 0x7) % 6];
  o.on_bad_record = (pick & 0x10) ? OnBadRecord::skip : OnBadRecord::error;
  const auto file = fuzz::scratch() / ((pick & 0x8) ? "data.json" : "data.jsonl");
  fuzz::put(file, fuzz::as_text(data + 1, size - 1));
  fuzz::expect_only_qlora_errors([&] {
    const ReadResult r = read_dataset(file, o);
    for (const auto& s : r.samples)
      if (s.kind == Sample::Kind::tokens && !s.labels.empty() && s.labels.size() != s.input_ids.size())
        std::abort();
  });
  return 0;
}
