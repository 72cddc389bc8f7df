// metrics.jsonl, the live progress line and report.html.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "core/error.h"
#include "testing.h"
#include "train/metrics.h"
#include "train/progress_line.h"
#include "train/report.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;
using testing::error_of;
using testing::read_bytes;
using testing::ScratchDir;
using testing::write_bytes;

StepMetrics step_record(int64_t step) {
  StepMetrics m;
  m.step = step;
  m.epoch = double(step) / 40.0;
  m.loss = 3.0 / (1.0 + 0.1 * double(step));
  m.lr = 2e-4 * double(step) / 100.0;
  m.grad_norm = 0.5 + 0.01 * double(step);
  m.tokens = step * 2048;
  m.tokens_per_s = 1500.0 + double(step);
  m.elapsed_s = 1.25 * double(step);
  m.mem_bytes = (uint64_t(5) << 30) + uint64_t(step);  // > 2^32: no 32-bit truncation
  return m;
}

EvalMetrics eval_record(int64_t step) {
  return {step, 2.0 - 0.01 * double(step), std::exp(2.0 - 0.01 * double(step))};
}

std::vector<int64_t> steps_of(const std::vector<StepMetrics>& v) {
  std::vector<int64_t> s;
  for (const auto& m : v) s.push_back(m.step);
  return s;
}

// ---- metrics.jsonl ----------------------------------------------------------

TEST(Metrics, RoundTripsEveryField) {
  ScratchDir dir;
  const fs::path p = dir / "metrics.jsonl";
  StepMetrics diverged = step_record(3);
  diverged.loss = std::nan("");
  diverged.grad_norm = INFINITY;
  {
    MetricsLog log(p, false);
    log.write(step_record(1));
    log.write(step_record(2));
    log.write(eval_record(2));
    log.write(diverged);
  }
  const MetricsHistory h = read_metrics(p);
  ASSERT_EQ(h.train.size(), 3u);
  ASSERT_EQ(h.val.size(), 1u);
  for (int i = 0; i < 2; ++i) {
    const StepMetrics want = step_record(i + 1), &got = h.train[size_t(i)];
    EXPECT_EQ(got.step, want.step);
    EXPECT_EQ(got.epoch, want.epoch);
    EXPECT_EQ(got.loss, want.loss);  // shortest round-trip decimal: exact
    EXPECT_EQ(got.lr, want.lr);
    EXPECT_EQ(got.grad_norm, want.grad_norm);
    EXPECT_EQ(got.tokens, want.tokens);
    EXPECT_EQ(got.tokens_per_s, want.tokens_per_s);
    EXPECT_EQ(got.elapsed_s, want.elapsed_s);
    EXPECT_EQ(got.mem_bytes, want.mem_bytes);
  }
  EXPECT_TRUE(std::isnan(h.train[2].loss));
  EXPECT_TRUE(std::isnan(h.train[2].grad_norm));  // inf has no JSON spelling either
  EXPECT_EQ(h.val[0].step, 2);
  EXPECT_EQ(h.val[0].val_loss, eval_record(2).val_loss);
  EXPECT_EQ(h.val[0].val_ppl, eval_record(2).val_ppl);
}

TEST(Metrics, OneJsonObjectPerLineWithTheDocumentedKeys) {
  ScratchDir dir;
  const fs::path p = dir / "metrics.jsonl";
  StepMetrics m = step_record(7);
  m.loss = std::nan("");
  {
    MetricsLog log(p, false);
    log.write(m);
    // Flushed per line: visible before the log is closed.
    const std::string text = read_bytes(p);
    ASSERT_FALSE(text.empty());
    EXPECT_EQ(text.back(), '\n');
    log.write(eval_record(7));
  }
  const std::string text = read_bytes(p);
  const size_t nl = text.find('\n');
  const auto step = nlohmann::json::parse(text.substr(0, nl));
  for (const char* k :
       {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s", "mem_bytes"})
    EXPECT_TRUE(step.contains(k)) << k;
  EXPECT_TRUE(step["loss"].is_null());
  const auto ev = nlohmann::json::parse(text.substr(nl + 1));
  EXPECT_EQ(ev.size(), 3u);
  EXPECT_EQ(ev["step"], 7);
  EXPECT_TRUE(ev.contains("val_loss") && ev.contains("val_ppl"));
}

TEST(Metrics, FreshRunStartsAnEmptyFile) {
  ScratchDir dir;
  const fs::path p = dir / "metrics.jsonl";
  write_bytes(p, nlohmann::json{{"step", 99}, {"loss", 1.0}}.dump() + "\n");
  {
    MetricsLog log(p, false);
    log.write(step_record(1));
  }
  EXPECT_EQ(steps_of(read_metrics(p).train), std::vector<int64_t>{1});
}

TEST(Metrics, ResumeTruncatesRecordsPastTheCheckpoint) {
  ScratchDir dir;
  const fs::path p = dir / "metrics.jsonl";
  {
    MetricsLog log(p, false);
    for (int64_t s = 1; s <= 10; ++s) {
      log.write(step_record(s));
      if (s % 5 == 0) log.write(eval_record(s));
    }
  }
  {
    // Checkpoint at step 6; the killed run had logged up to 10.
    MetricsLog log(p, true);
    log.truncate_after(6);
    EXPECT_EQ(steps_of(read_metrics(p).train), (std::vector<int64_t>{1, 2, 3, 4, 5, 6}));
    log.write(step_record(7));
    log.write(step_record(8));
  }
  const MetricsHistory h = read_metrics(p);
  EXPECT_EQ(steps_of(h.train), (std::vector<int64_t>{1, 2, 3, 4, 5, 6, 7, 8}));
  ASSERT_EQ(h.val.size(), 1u);
  EXPECT_EQ(h.val[0].step, 5);
  // Nothing but the file itself is left in the folder.
  EXPECT_EQ(std::distance(fs::directory_iterator(dir.path()), fs::directory_iterator()), 1);
}

TEST(Metrics, TornLastLineIsIgnoredAndRepairedOnAppend) {
  ScratchDir dir;
  const fs::path p = dir / "metrics.jsonl";
  {
    MetricsLog log(p, false);
    for (int64_t s = 1; s <= 3; ++s) log.write(step_record(s));
  }
  write_bytes(p, read_bytes(p) + "{\"step\":4,\"epoch\":0.1,\"lo");  // killed mid-write
  EXPECT_EQ(steps_of(read_metrics(p).train), (std::vector<int64_t>{1, 2, 3}));
  {
    MetricsLog log(p, true);
    log.write(step_record(4));
  }
  const MetricsHistory h = read_metrics(p);
  EXPECT_EQ(steps_of(h.train), (std::vector<int64_t>{1, 2, 3, 4}));
  EXPECT_EQ(h.train.back().loss, step_record(4).loss);
}

TEST(Metrics, CompleteLastLineWithoutNewlineIsKeptOnAppend) {
  ScratchDir dir;
  const fs::path p = dir / "metrics.jsonl";
  write_bytes(p, nlohmann::json{{"step", 1}, {"loss", 2.5}}.dump());
  {
    MetricsLog log(p, true);
    log.write(step_record(2));
  }
  const MetricsHistory h = read_metrics(p);
  EXPECT_EQ(steps_of(h.train), (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(h.train[0].loss, 2.5);
}

TEST(Metrics, CorruptLineInTheMiddleIsAnError) {
  ScratchDir dir;
  const fs::path p = dir / "metrics.jsonl";
  write_bytes(p, "{\"step\":1}\nnot json\n{\"step\":3}\n");
  const std::string msg = error_of([&] { read_metrics(p); });
  EXPECT_NE(msg.find("metrics.jsonl:2"), std::string::npos) << msg;
  EXPECT_NE(error_of([&] { read_metrics(dir / "missing.jsonl"); }).find("missing.jsonl"), std::string::npos);
}

// "step" is read as an integer only when it is one in [0, 2^63): 1e99 was cast
// out of range by get<int64_t>() (undefined behaviour), 2^64-1 wrapped.
TEST(Metrics, StepsThatAreNotIntegersInRangeAreNotRecords) {
  ScratchDir dir;
  const fs::path p = dir / "metrics.jsonl";
  for (const std::string step : {"1e99", "1.5", "18446744073709551615", "-1", "\"3\""}) {
    write_bytes(p, "{\"step\":1}\n{\"step\":" + step + "}\n{\"step\":3}\n");
    const std::string msg = error_of([&] { read_metrics(p); });
    EXPECT_NE(msg.find("metrics.jsonl:2: not a metrics record"), std::string::npos) << step << ": " << msg;
  }
  // Counts out of range read as unknown (0), not as a wrapped number.
  write_bytes(p,
              "{\"step\":1,\"tokens\":1e99,\"mem_bytes\":-5}\n{\"step\":2,\"tokens\":7,\"mem_bytes\":9}\n");
  const MetricsHistory h = read_metrics(p);
  ASSERT_EQ(h.train.size(), 2u);
  EXPECT_EQ(h.train[0].tokens, 0);
  EXPECT_EQ(h.train[0].mem_bytes, 0u);
  EXPECT_EQ(h.train[1].tokens, 7);
  EXPECT_EQ(h.train[1].mem_bytes, 9u);
}

// ---- the progress line ----------------------------------------------------

TEST(ProgressLine, FormatsTheStepLine) {
  LineStats s;
  s.step = 12;
  s.total_steps = 300;
  s.loss = 2.34561;
  s.lr = 1.2e-4;
  s.tokens_per_s = 1534.4;
  s.eta_s = 190;
  s.mem_bytes = uint64_t(1.21 * double(1ull << 30));
  EXPECT_EQ(format_step_line(s),
            "step 12/300  loss 2.3456  lr 1.20e-04  1534 tok/s  eta 3m10s  mem 1.21 GiB");
}

TEST(ProgressLine, UnknownFieldsAreMarkedOrLeftOut) {
  LineStats s;
  s.step = 5;
  s.lr = 3e-5;
  const std::string line = format_step_line(s);
  EXPECT_EQ(line.rfind("step 5  loss nan  lr 3.00e-05", 0), 0u) << line;
  EXPECT_NE(line.find("eta --"), std::string::npos) << line;
  EXPECT_EQ(line.find("mem"), std::string::npos) << line;
  EXPECT_EQ(format_eval_line(50, 300, 2.10341, 8.1934), "eval step 50/300  val_loss 2.1034  val_ppl 8.19");
}

TEST(ProgressLine, EtaFromThisProcessSteps) {
  EXPECT_DOUBLE_EQ(estimate_eta_s(10, 290, 20.0), 580.0);
  EXPECT_LT(estimate_eta_s(0, 290, 0.0), 0.0);
  EXPECT_EQ(estimate_eta_s(10, 0, 20.0), 0.0);
}

// What a terminal shows after the bytes: '\r' returns, ESC[K erases to the end, '\n' ends a line.
std::vector<std::string> screen(const std::string& bytes) {
  std::vector<std::string> lines{""};
  size_t cursor = 0;
  for (size_t i = 0; i < bytes.size(); ++i) {
    const char c = bytes[i];
    if (c == '\r') {
      cursor = 0;
    } else if (c == '\n') {
      lines.emplace_back();
      cursor = 0;
    } else if (c == '\x1b') {
      EXPECT_EQ(bytes.compare(i, 3, "\x1b[K"), 0) << "unexpected escape sequence";
      lines.back().resize(cursor);
      i += 2;
    } else {
      if (cursor < lines.back().size())
        lines.back()[cursor] = c;
      else
        lines.back() += c;
      ++cursor;
    }
  }
  return lines;
}

std::string contents(std::FILE* f) {
  std::fflush(f);
  std::rewind(f);
  std::string s;
  char buf[4096];
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, f)) > 0;) s.append(buf, n);
  return s;
}

struct TempFile {
  std::FILE* f = std::tmpfile();
  ~TempFile() { std::fclose(f); }
};

LineStats stats(int64_t step, double loss) {
  LineStats s;
  s.step = step;
  s.total_steps = 100;
  s.loss = loss;
  s.lr = 1e-4;
  s.tokens_per_s = 1000;
  return s;
}

TEST(ProgressLine, PlainModePrintsOneLinePerLogStep) {
  TempFile out;
  {
    ProgressLine line(out.f, false);
    for (int64_t s = 1; s <= 6; ++s) line.update(stats(s, 1.0), s % 3 == 0);
    line.eval(6, 100, 0.9, std::exp(0.9));
  }
  const std::string text = contents(out.f);
  EXPECT_EQ(text.find('\r'), std::string::npos);
  EXPECT_EQ(text.find('\x1b'), std::string::npos);
  EXPECT_EQ(text, format_step_line(stats(3, 1.0)) + "\n" + format_step_line(stats(6, 1.0)) + "\n" +
                      format_eval_line(6, 100, 0.9, std::exp(0.9)) + "\n");
}

TEST(ProgressLine, LiveModeRedrawsInPlaceAndMessagesDoNotGarbleIt) {
  TempFile out;
  {
    ProgressLine line(out.f, true);
    line.update(stats(1, 2.5), true);
    line.update(stats(2, 2.25), true);
    line.message("saved checkpoint-2");
    line.update(stats(3, 2.0), true);
    line.eval(3, 100, 1.5, std::exp(1.5));
  }  // the destructor ends the live line
  const auto lines = screen(contents(out.f));
  const std::vector<std::string> want{"saved checkpoint-2", format_eval_line(3, 100, 1.5, std::exp(1.5)),
                                      format_step_line(stats(3, 2.0)), ""};
  EXPECT_EQ(lines, want);
}

TEST(ProgressLine, LiveLineIsCutToTheTerminalWidth) {
  TempFile out;
  {
    ProgressLine line(out.f, true, 30);
    line.update(stats(1, 2.5), false);  // the first draw happens even off a log step
  }
  const auto lines = screen(contents(out.f));
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(lines[0], format_step_line(stats(1, 2.5)).substr(0, 29));
}

// ---- report.html ------------------------------------------------------------

size_t count(const std::string& s, const std::string& what) {
  size_t n = 0;
  for (size_t p = s.find(what); p != std::string::npos; p = s.find(what, p + what.size())) ++n;
  return n;
}

// Every element closed in order (XML-ish): returns "" or what went wrong.
std::string tag_balance_error(const std::string& h) {
  std::vector<std::string> stack;
  for (size_t p = h.find('<'); p != std::string::npos; p = h.find('<', p + 1)) {
    const size_t end = h.find('>', p);
    if (end == std::string::npos) return "unterminated tag at " + std::to_string(p);
    if (h[p + 1] == '!') continue;  // doctype
    const bool closing = h[p + 1] == '/';
    const size_t name_begin = p + (closing ? 2 : 1);
    const size_t name_end = h.find_first_of(" \t\n/>", name_begin);
    const std::string name = h.substr(name_begin, name_end - name_begin);
    if (closing) {
      if (stack.empty() || stack.back() != name)
        return "</" + name + "> does not close " + (stack.empty() ? "" : stack.back());
      stack.pop_back();
    } else if (h[end - 1] != '/' && name != "meta") {
      stack.push_back(name);
    }
  }
  return stack.empty() ? "" : "unclosed <" + stack.back() + ">";
}

ReportData sample_report(int64_t steps) {
  ReportData d;
  d.title = "qlora run demo";
  d.summary = {{"model", "builtin:tiny"}, {"wall time", "1m05s"}};
  for (int64_t s = 1; s <= steps; ++s) d.train.push_back(step_record(s));
  for (int64_t s = 10; s <= steps; s += 10) d.val.push_back(eval_record(s));
  d.data_statistics = "train: 120 rows, 61440 tokens\nval: 12 rows";
  d.memory_table = "weights   1.00 GiB\nlora      10.0 MiB";
  return d;
}

struct Polyline {
  std::vector<std::pair<double, double>> points;
};

std::vector<Polyline> polylines(const std::string& svg) {
  std::vector<Polyline> r;
  static const std::regex re("<polyline[^>]* points=\"([^\"]*)\"");
  for (auto it = std::sregex_iterator(svg.begin(), svg.end(), re); it != std::sregex_iterator(); ++it) {
    Polyline pl;
    std::istringstream in((*it)[1].str());
    std::string xy;
    while (in >> xy) {
      const size_t comma = xy.find(',');
      pl.points.emplace_back(std::stod(xy.substr(0, comma)), std::stod(xy.substr(comma + 1)));
    }
    r.push_back(pl);
  }
  return r;
}

void expect_inside_plot(const Polyline& pl, const ChartOptions& o) {
  for (const auto& [x, y] : pl.points) {
    EXPECT_GE(x, o.margin_left);
    EXPECT_LE(x, o.width - o.margin_right);
    EXPECT_GE(y, o.margin_top);
    EXPECT_LE(y, o.height - o.margin_bottom);
  }
}

TEST(Report, IsBalancedSelfContainedHtmlWithOneSvgPerChart) {
  const ReportData d = sample_report(50);
  const std::string h = render_report_html(d);
  EXPECT_EQ(h.rfind("<!DOCTYPE html>", 0), 0u);
  EXPECT_EQ(tag_balance_error(h), "");
  EXPECT_EQ(count(h, "<svg"), 4u);  // loss (+val), lr, grad norm, tokens/s
  EXPECT_EQ(count(h, "</svg>"), 4u);
  EXPECT_EQ(count(h, "<script"), 0u);
  EXPECT_EQ(count(h, "http"), 0u);  // nothing fetched: no URL at all, not even an xmlns
  EXPECT_EQ(count(h, "src="), 0u);
  EXPECT_EQ(count(h, "href="), 0u);
  EXPECT_EQ(count(h, "<pre>"), 2u);
  EXPECT_NE(h.find("train: 120 rows, 61440 tokens"), std::string::npos);
  EXPECT_NE(h.find("builtin:tiny"), std::string::npos);
  // The loss chart carries train and val; the others one series each.
  EXPECT_EQ(polylines(h).size(), 5u);
  EXPECT_NE(h.find("lowest val loss"), std::string::npos);
}

TEST(Report, EscapesEveryText) {
  ReportData d = sample_report(5);
  d.title = "run <b>&</b>";
  d.summary = {{"model", "<script>alert(1)</script>"}, {"note\"", "it's"}};
  d.memory_table = "</pre><script>x</script>";
  const std::string h = render_report_html(d);
  EXPECT_EQ(count(h, "<script"), 0u);
  EXPECT_EQ(count(h, "<b>"), 0u);
  EXPECT_NE(h.find("&lt;script&gt;alert(1)&lt;/script&gt;"), std::string::npos);
  EXPECT_NE(h.find("run &lt;b&gt;&amp;&lt;/b&gt;"), std::string::npos);
  EXPECT_NE(h.find("note&quot;"), std::string::npos);
  EXPECT_NE(h.find("it&#39;s"), std::string::npos);
  EXPECT_EQ(tag_balance_error(h), "");
  EXPECT_EQ(html_escape("a<b>&\"'"), "a&lt;b&gt;&amp;&quot;&#39;");
}

TEST(Report, EmptyAndOnePointRuns) {
  ReportData empty;
  const std::string h0 = render_report_html(empty);
  EXPECT_EQ(tag_balance_error(h0), "");
  EXPECT_EQ(count(h0, "<svg"), 4u);
  EXPECT_EQ(count(h0, "no data"), 4u);
  EXPECT_EQ(count(h0, "<polyline"), 0u);

  const std::string h1 = render_report_html(sample_report(1));
  EXPECT_EQ(tag_balance_error(h1), "");
  EXPECT_EQ(count(h1, "<svg"), 4u);
  EXPECT_EQ(count(h1, "no data"), 0u);
  EXPECT_EQ(count(h1, "<polyline"), 0u);  // a one-point line draws nothing...
  EXPECT_EQ(count(h1, "<circle"), 4u);    // ...so the point is a dot

  // The dot of a single point sits mid-plot horizontally.
  ChartOptions o;
  const std::string svg = svg_line_chart({ChartSeries{"loss", {7}, {2.5}}}, o);
  static const std::regex cx_re("<circle cx=\"([0-9.]+)\" cy=\"([0-9.]+)\"");
  std::smatch m;
  ASSERT_TRUE(std::regex_search(svg, m, cx_re));
  EXPECT_NEAR(std::stod(m[1]), (o.margin_left + o.width - o.margin_right) / 2.0, 0.1);
  const double cy = std::stod(m[2]);
  EXPECT_GT(cy, o.margin_top);
  EXPECT_LT(cy, o.height - o.margin_bottom);
}

TEST(Report, PointsMapIntoThePlotAreaAndNaNIsSkipped) {
  ChartSeries s{"loss", {}, {}};
  for (int i = 0; i < 40; ++i) {
    s.x.push_back(100 + i);
    s.y.push_back(i == 17 ? std::nan("") : std::sin(i * 0.3) * 1e-3 - 5e-4);
  }
  s.y[5] = INFINITY;
  ChartOptions o;
  const std::string svg = svg_line_chart({s}, o);
  EXPECT_EQ(svg.find("nan"), std::string::npos);
  EXPECT_EQ(svg.find("inf"), std::string::npos);
  const auto pls = polylines(svg);
  ASSERT_EQ(pls.size(), 1u);
  ASSERT_EQ(pls[0].points.size(), 38u);
  expect_inside_plot(pls[0], o);
  // Increasing steps go right; a higher value is drawn higher (smaller y).
  for (size_t i = 1; i < pls[0].points.size(); ++i)
    EXPECT_GT(pls[0].points[i].first, pls[0].points[i - 1].first);
  std::vector<double> finite;
  for (const double v : s.y)
    if (std::isfinite(v)) finite.push_back(v);
  const auto by_y = [](auto& a, auto& b) { return a.second < b.second; };
  const auto& pts = pls[0].points;
  EXPECT_EQ(std::min_element(pts.begin(), pts.end(), by_y) - pts.begin(),
            std::max_element(finite.begin(), finite.end()) - finite.begin());
  EXPECT_EQ(std::max_element(pts.begin(), pts.end(), by_y) - pts.begin(),
            std::min_element(finite.begin(), finite.end()) - finite.begin());
}

TEST(Report, ConstantSeriesIsDrawnInsideThePlot) {
  ChartOptions o;
  const std::string svg = svg_line_chart({ChartSeries{"lr", {1, 2, 3, 4}, {2e-4, 2e-4, 2e-4, 2e-4}}}, o);
  const auto pls = polylines(svg);
  ASSERT_EQ(pls.size(), 1u);
  ASSERT_EQ(pls[0].points.size(), 4u);
  for (const auto& p : pls[0].points) {
    EXPECT_EQ(p.second, pls[0].points[0].second);
    EXPECT_GT(p.second, o.margin_top);
    EXPECT_LT(p.second, o.height - o.margin_bottom);
  }
}

TEST(Report, ThousandsOfPointsAreDecimatedKeepingEndsAndSpikes) {
  ChartSeries s{"loss", {}, {}};
  const int n = 20000;
  for (int i = 0; i < n; ++i) s.x.push_back(i + 1), s.y.push_back(2.0 + 0.1 * std::sin(i * 0.01));
  s.y[12345] = 9.0;  // a loss spike must survive the decimation
  ChartOptions o;
  const auto pls = polylines(svg_line_chart({s}, o));
  ASSERT_EQ(pls.size(), 1u);
  const auto& pts = pls[0].points;
  EXPECT_LE(pts.size(), o.max_points);
  EXPECT_GT(pts.size(), o.max_points / 2);
  expect_inside_plot(pls[0], o);
  EXPECT_NEAR(pts.front().first, o.margin_left, 0.1);  // x from 1: the first tick is at or before it
  const auto top =
      std::min_element(pts.begin(), pts.end(), [](auto& a, auto& b) { return a.second < b.second; });
  const double plot_w = o.width - o.margin_right - o.margin_left;
  // The x axis spans [0, 20000]: the spike sits at 12346 / 20000 of the width.
  EXPECT_NEAR(top->first, o.margin_left + plot_w * 12346.0 / 20000.0, 0.2);
  EXPECT_NEAR(pts.back().first, o.width - o.margin_right, 0.1);  // the last point (x = 20000) is kept

  const auto idx = decimate(s.y, 100);
  EXPECT_LE(idx.size(), 100u);
  EXPECT_EQ(idx.front(), 0u);
  EXPECT_EQ(idx.back(), size_t(n - 1));
  EXPECT_TRUE(std::is_sorted(idx.begin(), idx.end()));
  EXPECT_EQ(std::adjacent_find(idx.begin(), idx.end()), idx.end());
  EXPECT_NE(std::find(idx.begin(), idx.end(), 12345u), idx.end());
  EXPECT_EQ(decimate({1, 2, 3}, 100), (std::vector<size_t>{0, 1, 2}));
}

TEST(Report, TicksAreRoundNumbersCoveringTheRange) {
  for (const auto& [lo, hi] : std::vector<std::pair<double, double>>{
           {0.0, 2.35}, {1.7, 2.9}, {0.0, 2e-4}, {1.0, 20000.0}, {-3.2, 7.9}, {1234.5, 1234.5}}) {
    const auto t = nice_ticks(lo, hi, 5);
    ASSERT_GE(t.size(), 2u) << lo << " " << hi;
    EXPECT_LE(t.size(), 8u) << lo << " " << hi;
    EXPECT_LE(t.front(), lo);
    EXPECT_GE(t.back(), hi);
    if (lo == hi) {
      EXPECT_LT(t.front(), lo);
      EXPECT_GT(t.back(), hi);
    }
    const double step = t[1] - t[0];
    const double mant = step / std::pow(10.0, std::floor(std::log10(step) + 1e-9));
    EXPECT_TRUE(std::abs(mant - 1) < 1e-6 || std::abs(mant - 2) < 1e-6 || std::abs(mant - 5) < 1e-6) << step;
    for (const double v : t) EXPECT_NEAR(v / step, std::round(v / step), 1e-6) << v;
  }
  // Tiny values get short scientific labels the left margin can hold.
  const std::string lr = svg_line_chart({ChartSeries{"lr", {1, 2, 3}, {0, 1e-4, 2e-4}}}, ChartOptions{});
  EXPECT_NE(lr.find(">1e-4</text>"), std::string::npos);
  EXPECT_EQ(lr.find("0.0001"), std::string::npos);
  const auto ints = nice_ticks(1, 3, 6, true);
  EXPECT_GE(ints[1] - ints[0], 1.0);
}

TEST(Report, FromAMetricsFileWrittenAtomically) {
  ScratchDir dir;
  {
    MetricsLog log(dir / "metrics.jsonl", false);
    for (int64_t s = 1; s <= 20; ++s) log.write(step_record(s));
    log.write(eval_record(20));
  }
  const MetricsHistory hist = read_metrics(dir / "metrics.jsonl");
  ReportData d;
  d.title = "resume test";
  d.train = hist.train;
  d.val = hist.val;
  write_report_html(dir / "report.html", d);
  const std::string h = read_bytes(dir / "report.html");
  EXPECT_EQ(h, render_report_html(d));
  EXPECT_NE(h.find("final train loss"), std::string::npos);
  EXPECT_EQ(std::distance(fs::directory_iterator(dir.path()), fs::directory_iterator()), 2);
}

}  // namespace
}  // namespace qlora
