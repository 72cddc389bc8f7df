// report.html: one self-contained page per run (inline CSS, inline SVG charts
// drawn here; no scripts, nothing fetched), readable offline years later and
// safe to open from an untrusted run folder: every text is HTML-escaped.
#pragma once

#include <cstddef>
#include <filesystem>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "train/metrics.h"

namespace qlora {

// A sample prompt and the model's replies before and after training ("" =
// not generated, e.g. the "before" of a run started elsewhere).
struct SampleAnswer {
  std::string prompt, before, after;
};

// Field order as agreed with the trainer (designated initializers follow it).
struct ReportData {
  // Key/value rows in the order given: model, recipe, data statistics in
  // brief, memory planned vs measured, wall time, ...
  std::vector<std::pair<std::string, std::string>> summary;
  std::vector<StepMetrics> train;     // read_metrics(...).train
  std::vector<EvalMetrics> val;       // read_metrics(...).val
  std::string title;                  // e.g. "qlora run legal-llama3-8b"; "" = "qlora run"
  std::string data_statistics;        // preformatted text, shown as is; "" = section left out
  std::string memory_table;           // preformatted text (the planner's table); "" = left out
  std::vector<SampleAnswer> samples;  // empty = section left out
};

// The page as a string, and the page written atomically to `path`.
std::string render_report_html(const ReportData& d);
void write_report_html(const std::filesystem::path& path, const ReportData& d);

// ---- the pieces, public for tests and for other pages ----------------------

// & < > " ' replaced by entities: safe in element text and quoted attributes.
std::string html_escape(std::string_view s);

struct ChartSeries {
  std::string name;
  std::vector<double> x, y;  // same length; points with a non-finite x or y are skipped
  bool line = true;          // a polyline through the points
  bool markers = false;      // a dot on each point (always drawn for a single point)
  std::string color = "#1f77b4";
};

struct ChartOptions {
  std::string title, x_label, y_label;
  int width = 520, height = 280;
  // The plot area is [margin_left, width - margin_right] x [margin_top, height - margin_bottom].
  int margin_left = 64, margin_right = 16, margin_top = 30, margin_bottom = 44;
  size_t max_points = 800;  // per series; more are decimated for the drawing
  bool integer_x = true;    // x ticks at whole numbers (steps)
};

// One <svg> element: frame, grid, ticks at round numbers, axis labels, the
// series and (for more than one) a legend. With no finite point it draws
// the empty frame and says "no data".
std::string svg_line_chart(const std::vector<ChartSeries>& series, const ChartOptions& o);

// Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]:
// the first is <= lo and the last >= hi, at most about max_ticks + 1 of them.
// lo == hi is widened first. integer: spacing at least 1.
std::vector<double> nice_ticks(double lo, double hi, int max_ticks, bool integer = false);

// Indices of the points to draw when there are more than max_points: the
// first and last points, and for each of the buckets between them the
// lowest and highest y, in order (spikes survive, the ends are kept). All
// indices when n <= max_points.
std::vector<size_t> decimate(const std::vector<double>& y, size_t max_points);

}  // namespace qlora
