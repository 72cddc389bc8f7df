#include "train/metrics.h"

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string_view>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/json_integer.h"
#include "core/json_parse.h"

namespace qlora {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

namespace {

std::string read_whole(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) fail(p.string(), ": cannot open metrics file: ", std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A line of the file without its '\n', with its 1-based number.
struct Line {
  std::string_view text;
  size_t number;
};

std::vector<Line> split_lines(std::string_view text) {
  std::vector<Line> lines;
  size_t pos = 0, number = 1;
  while (pos < text.size()) {
    const size_t nl = text.find('\n', pos);
    const bool terminated = nl != std::string_view::npos;
    const size_t end = terminated ? nl : text.size();
    lines.push_back({text.substr(pos, end - pos), number++});
    pos = terminated ? nl + 1 : text.size();
  }
  return lines;
}

bool is_blank(std::string_view s) {
  return s.find_first_not_of(" \t\r") == std::string_view::npos;
}

// A record is a JSON object with an integer "step"; anything else is not ours.
// "step" must be an integer in [0, 2^63) (not 1e99, which get<int64_t>()
// would cast out of range), so rec.at("step").get<int64_t>() below is exact.
std::optional<nlohmann::json> parse_record(std::string_view line) {
  nlohmann::json j;
  try {
    j = parse_json(line, "");
  } catch (const std::exception&) {  // malformed, or nested too deep
    return std::nullopt;
  }
  if (!j.is_object()) return std::nullopt;
  const auto it = j.find("step");
  if (it == j.end() || !json_integer_within(*it, 0, INT64_MAX)) return std::nullopt;
  return j;
}

// Parses every line; a bad line throws unless it is the last one (torn by a
// kill mid-write), which is dropped. Calls keep(line, record) for the others.
template <typename F>
void for_each_record(const fs::path& path, std::string_view text, F&& keep) {
  const auto lines = split_lines(text);
  for (size_t i = 0; i < lines.size(); ++i) {
    if (is_blank(lines[i].text)) continue;
    auto rec = parse_record(lines[i].text);
    if (!rec) {
      if (i + 1 == lines.size()) break;
      fail(path.string(), ":", lines[i].number,
           ": not a metrics record (expected a JSON object with an integer \"step\")");
    }
    keep(lines[i], *rec);
  }
}

double number_or_nan(const nlohmann::json& j, const char* key) {
  const auto it = j.find(key);
  if (it == j.end() || !it->is_number()) return std::nan("");
  return it->get<double>();
}

// A count >= 0 (tokens, bytes), or `fallback` when absent or not one.
int64_t count_or(const nlohmann::json& j, const char* key, int64_t fallback) {
  const auto it = j.find(key);
  if (it == j.end()) return fallback;
  return json_integer_within(*it, 0, INT64_MAX).value_or(fallback);
}

// null for NaN/inf: JSON has no spelling for them.
ojson number(double v) {
  return std::isfinite(v) ? ojson(v) : ojson(nullptr);
}

}  // namespace

MetricsLog::MetricsLog(fs::path path, bool append) : path_(std::move(path)) {
  if (append && fs::exists(path_)) {
    // A line torn by a kill would glue itself to the next record: cut it off
    // (or terminate it, if it is in fact complete).
    const std::string text = read_whole(path_);
    if (!text.empty() && text.back() != '\n') {
      const size_t start = text.rfind('\n') == std::string::npos ? 0 : text.rfind('\n') + 1;
      if (parse_record(std::string_view(text).substr(start))) {
        open_for_append();
        write_line("");
        return;
      }
      fs::resize_file(path_, start);
    }
    open_for_append();
    return;
  }
  write_file_atomic(path_, "");
  open_for_append();
}

MetricsLog::~MetricsLog() {
  if (f_) std::fclose(f_);
}

void MetricsLog::open_for_append() {
  f_ = std::fopen(path_.c_str(), "ab");
  if (!f_) fail(path_.string(), ": cannot open metrics file for appending: ", std::strerror(errno));
}

void MetricsLog::write_line(const std::string& line) {
  if (!f_) fail(path_.string(), ": metrics file is not open (an earlier truncate_after failed)");
  const std::string with_nl = line + "\n";
  // One fwrite + fflush per record: a kill leaves at most this line torn.
  if (std::fwrite(with_nl.data(), 1, with_nl.size(), f_) != with_nl.size() || std::fflush(f_) != 0)
    fail(path_.string(), ": cannot write metrics record: ", std::strerror(errno));
}

void MetricsLog::write(const StepMetrics& m) {
  ojson j;
  j["step"] = m.step;
  j["epoch"] = number(m.epoch);
  j["loss"] = number(m.loss);
  j["lr"] = number(m.lr);
  j["grad_norm"] = number(m.grad_norm);
  j["tokens"] = m.tokens;
  j["tokens_per_s"] = number(m.tokens_per_s);
  j["elapsed_s"] = number(m.elapsed_s);
  j["mem_bytes"] = m.mem_bytes;
  write_line(j.dump());
}

void MetricsLog::write(const EvalMetrics& m) {
  ojson j;
  j["step"] = m.step;
  j["val_loss"] = number(m.val_loss);
  j["val_ppl"] = number(m.val_ppl);
  write_line(j.dump());
}

void MetricsLog::truncate_after(int64_t step) {
  std::fflush(f_);
  const std::string text = read_whole(path_);
  std::string kept;
  for_each_record(path_, text, [&](const Line& line, const nlohmann::json& rec) {
    if (rec.at("step").get<int64_t>() <= step) (kept += line.text) += '\n';
  });
  std::fclose(f_);
  f_ = nullptr;
  write_file_atomic(path_, kept);
  open_for_append();
}

MetricsHistory read_metrics(const fs::path& path) {
  const std::string text = read_whole(path);
  MetricsHistory h;
  for_each_record(path, text, [&](const Line&, const nlohmann::json& rec) {
    if (rec.contains("val_loss")) {
      EvalMetrics e;
      e.step = rec.at("step").get<int64_t>();
      e.val_loss = number_or_nan(rec, "val_loss");
      e.val_ppl = number_or_nan(rec, "val_ppl");
      h.val.push_back(e);
      return;
    }
    StepMetrics m;
    m.step = rec.at("step").get<int64_t>();
    m.epoch = number_or_nan(rec, "epoch");
    m.loss = number_or_nan(rec, "loss");
    m.lr = number_or_nan(rec, "lr");
    m.grad_norm = number_or_nan(rec, "grad_norm");
    m.tokens = count_or(rec, "tokens", 0);
    m.tokens_per_s = number_or_nan(rec, "tokens_per_s");
    m.elapsed_s = number_or_nan(rec, "elapsed_s");
    m.mem_bytes = uint64_t(count_or(rec, "mem_bytes", 0));
    h.train.push_back(m);
  });
  return h;
}

}  // namespace qlora
