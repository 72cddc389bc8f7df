#include "data/pipeline.h"

#include <cstdio>

#include "core/atomic_file.h"
#include "core/error.h"
#include "data/prepare.h"
#include "data/token_cache.h"

namespace qlora {

namespace fs = std::filesystem;

namespace {

// Every setting that changes the tokenized samples, as one string for the key.
std::string tokenize_settings(const DataSpec& s, const std::string& template_name) {
  const FieldNames& f = s.read.fields;
  return str("v1|format=", data_format_name(s.read.format), "|template=", template_name,
             "|date=", s.template_options.date_string, "|eos=", s.template_options.eos_token,
             "|on_bad=", s.read.on_bad_record == OnBadRecord::skip ? "skip" : "error",
             "|train_on_inputs=", s.tokenize.train_on_inputs, "|append_eos=", s.tokenize.append_eos,
             "|fields=", f.instruction, ",", f.input, ",", f.output, ",", f.system, ",", f.messages, ",", f.role,
             ",", f.content, ",", f.conversations, ",", f.from, ",", f.value, ",", f.prompt, ",", f.completion, ",",
             f.text, ",", f.input_ids, ",", f.labels);
}

struct Tokenized {
  std::vector<TokenizedSample> samples;
  size_t skipped = 0;
};

Tokenized read_and_tokenize(const Tokenizer& tok, const ChatTemplate& tmpl, const std::vector<fs::path>& files,
                            const DataSpec& spec) {
  std::vector<Sample> samples;
  Tokenized out;
  for (const fs::path& f : files) {
    ReadResult r = read_dataset(f, spec.read);
    out.skipped += r.skipped;
    for (auto& s : r.samples) samples.push_back(std::move(s));
  }
  out.samples = tokenize_all(tok, tmpl, samples, spec.tokenize, spec.threads);
  return out;
}

// Loads the tokenized samples of `files` from the cache, or makes and stores them.
Tokenized cached(const Tokenizer& tok, const ChatTemplate& tmpl, const std::vector<fs::path>& files,
                 const DataSpec& spec, const std::string& key, const char* part, bool* hit) {
  std::optional<fs::path> file;
  if (spec.cache_dir) file = *spec.cache_dir / (key + "-" + part + ".tokens");
  if (file) {
    if (auto s = load_tokenized(*file, key)) {
      *hit = true;
      return {std::move(*s), 0};
    }
  }
  *hit = false;
  Tokenized t = read_and_tokenize(tok, tmpl, files, spec);
  if (file) {
    std::error_code ec;
    fs::create_directories(*spec.cache_dir, ec);
    if (ec) fail(spec.cache_dir->string(), ": cannot create the cache folder: ", ec.message());
    remove_stale_temporaries(*spec.cache_dir);  // cache files of runs killed while writing them
    save_tokenized(*file, key, t.samples);
  }
  return t;
}

std::vector<TokenizedSample> pick(std::vector<TokenizedSample>& all, const std::vector<size_t>& idx) {
  std::vector<TokenizedSample> out;
  out.reserve(idx.size());
  for (size_t i : idx) out.push_back(std::move(all[i]));
  return out;
}

}  // namespace

PreparedData prepare_dataset(const Tokenizer& tok, const fs::path& tokenizer_dir, const DataSpec& spec) {
  if (spec.train_files.empty()) fail("data: no training files given");
  if (spec.val_fraction < 0 || spec.val_fraction >= 1)
    fail("data: validation fraction ", spec.val_fraction, " must be in [0, 1)");
  const ChatTemplate tmpl = template_for_tokenizer(tok, spec.chat_template, spec.template_options);
  PreparedData d;
  d.template_name = tmpl.name();
  const std::string settings = tokenize_settings(spec, d.template_name);
  d.cache_key = tokenized_cache_key(spec.train_files, tokenizer_dir, settings);

  bool train_hit = false, val_hit = true;
  Tokenized train = cached(tok, tmpl, spec.train_files, spec, d.cache_key, "train", &train_hit);
  std::vector<TokenizedSample> val_samples;
  size_t skipped = train.skipped;
  if (!spec.val_files.empty()) {
    const std::string vkey = tokenized_cache_key(spec.val_files, tokenizer_dir, settings);
    Tokenized val = cached(tok, tmpl, spec.val_files, spec, vkey, "val", &val_hit);
    skipped += val.skipped;
    val_samples = std::move(val.samples);
  } else if (spec.val_fraction > 0) {
    const Split split = split_validation(train.samples.size(), spec.val_fraction, spec.seed);
    val_samples = pick(train.samples, split.val);
    train.samples = pick(train.samples, split.train);
  }
  d.from_cache = train_hit && val_hit;
  d.skipped_records = skipped;
  d.train_samples = train.samples.size();
  d.val_samples = val_samples.size();

  d.train = pack_samples(train.samples, spec.pack);
  seeded_shuffle(d.train.rows, spec.seed);
  if (!val_samples.empty()) d.val = pack_samples(val_samples, spec.pack);
  return d;
}

std::string data_statistics_text(const PreparedData& d) {
  auto line = [](const char* what, const PackStats& s, size_t rows) {
    char buf[512];
    std::snprintf(buf, sizeof buf,
                  "%-5s %zu samples -> %zu rows: %lld tokens, %.1f%% trained, %zu truncated, %zu dropped "
                  "(too long), %zu dropped (nothing trained), packing efficiency %.1f%%\n",
                  what, s.samples_in, rows, static_cast<long long>(s.tokens), 100 * s.trained_share(), s.truncated,
                  s.dropped_too_long, s.dropped_untrained, 100 * s.efficiency());
    return std::string(buf);
  };
  std::string out = str("data  template ", d.template_name, d.from_cache ? ", tokenized samples from the cache" : "",
                        d.skipped_records ? str(", ", d.skipped_records, " bad records skipped") : "", "\n");
  out += line("train", d.train.stats, d.train.rows.size());
  if (d.val_samples) out += line("val", d.val.stats, d.val.rows.size());
  return out;
}

}  // namespace qlora
