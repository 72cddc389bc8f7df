#include "train/report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>

#include "core/atomic_file.h"
#include "core/progress.h"

namespace qlora {

namespace {

std::string num(const char* fmt, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, fmt, v);
  return buf;
}

// SVG coordinates: a tenth of a pixel is finer than any screen shows.
std::string coord(double v) {
  return num("%.1f", v);
}

// A tick label short enough for the left margin: "0.5", "1500", or on an axis
// of tiny or huge values (axis_max: its largest |tick|) "5e-5", "1.5e-4", "2e+6".
std::string tick_label(double v, double axis_max) {
  if (v == 0 || (axis_max >= 1e-2 && axis_max < 1e5)) return num("%g", v);
  const int e = int(std::floor(std::log10(std::abs(v)) + 1e-9));
  return num("%g", v / std::pow(10.0, e)) + "e" + (e > 0 ? "+" : "") + std::to_string(e);
}

double max_abs(const std::vector<double>& ticks) {
  return std::max(std::abs(ticks.front()), std::abs(ticks.back()));
}

// Ceiling of x (> 0) to 1, 2 or 5 times a power of ten.
double nice_step(double x) {
  const double p = std::pow(10.0, std::floor(std::log10(x)));
  const double f = x / p;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * p;
}

// The finite points of a series (x[i] and y[i] belong together).
struct Points {
  std::vector<double> x, y;
};

Points finite_points(const ChartSeries& s) {
  Points p;
  const size_t n = std::min(s.x.size(), s.y.size());
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) continue;
    p.x.push_back(s.x[i]);
    p.y.push_back(s.y[i]);
  }
  return p;
}

const char* kCss = R"(body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;
max-width:1120px;margin:24px auto;padding:0 16px;background:#fff}
h1{font-size:22px;margin:0 0 16px}h2{font-size:17px;margin:28px 0 10px;border-bottom:1px solid #ddd;
padding-bottom:4px}
table{border-collapse:collapse}td,th{padding:3px 14px 3px 0;text-align:left;vertical-align:top}
th{font-weight:600;color:#444}table.kv th{white-space:nowrap}td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f6f8fa;border:1px solid #e1e4e8;padding:10px;overflow-x:auto;font-size:12.5px;line-height:1.35}
.charts{display:flex;flex-wrap:wrap;gap:16px}
svg.chart{border:1px solid #e1e4e8;background:#fff;max-width:100%;height:auto}
svg.chart text{font-family:system-ui,sans-serif;fill:#333}
svg.chart .chart-title{font-size:13px;font-weight:600}svg.chart .tick{font-size:10.5px;fill:#555}
svg.chart .axis-label{font-size:11px}svg.chart .legend{font-size:11px}svg.chart .no-data{font-size:13px;fill:#999}
footer{margin-top:32px;color:#888;font-size:12px}
)";

void key_value_table(std::string& h, const std::vector<std::pair<std::string, std::string>>& rows) {
  h += "<table class=\"kv\">\n";
  for (const auto& [k, v] : rows)
    h += "<tr><th>" + html_escape(k) + "</th><td>" + html_escape(v) + "</td></tr>\n";
  h += "</table>\n";
}

// Derived from the metrics, so every report has them whatever the trainer put in the summary.
std::vector<std::pair<std::string, std::string>> results(const ReportData& d) {
  std::vector<std::pair<std::string, std::string>> r;
  if (!d.train.empty()) {
    const StepMetrics& last = d.train.back();
    r.emplace_back("last logged step", std::to_string(last.step));
    const auto fin =
        std::find_if(d.train.rbegin(), d.train.rend(), [](auto& m) { return std::isfinite(m.loss); });
    if (fin != d.train.rend())
      r.emplace_back("final train loss",
                     num("%.4f", fin->loss) + " (step " + std::to_string(fin->step) + ")");
    if (last.tokens > 0) r.emplace_back("tokens trained", std::to_string(last.tokens));
    double sum = 0;
    int n = 0;
    uint64_t peak = 0;
    for (const auto& m : d.train) {
      if (std::isfinite(m.tokens_per_s) && m.tokens_per_s > 0) sum += m.tokens_per_s, ++n;
      peak = std::max(peak, m.mem_bytes);
    }
    if (n > 0) r.emplace_back("mean throughput", num("%.0f", sum / n) + " tokens/s");
    if (peak > 0) r.emplace_back("peak measured memory", human_bytes(peak));
    if (std::isfinite(last.elapsed_s) && last.elapsed_s > 0)
      r.emplace_back("training time", human_duration(last.elapsed_s));
  }
  const EvalMetrics* best = nullptr;
  for (const auto& e : d.val)
    if (std::isfinite(e.val_loss) && (!best || e.val_loss < best->val_loss)) best = &e;
  if (best)
    r.emplace_back("lowest val loss", num("%.4f", best->val_loss) + " (step " + std::to_string(best->step) +
                                          ", perplexity " + num("%.2f", best->val_ppl) + ")");
  return r;
}

std::string charts(const ReportData& d) {
  ChartSeries loss{"train loss", {}, {}, true, false, "#1f77b4"};
  ChartSeries lr{"learning rate", {}, {}, true, false, "#2ca02c"};
  ChartSeries gn{"grad norm", {}, {}, true, false, "#d62728"};
  ChartSeries tps{"tokens/s", {}, {}, true, false, "#9467bd"};
  for (const auto& m : d.train) {
    const double x = double(m.step);
    for (auto* s : {&loss, &lr, &gn, &tps}) s->x.push_back(x);
    loss.y.push_back(m.loss);
    lr.y.push_back(m.lr);
    gn.y.push_back(m.grad_norm);
    tps.y.push_back(m.tokens_per_s);
  }
  ChartSeries val{"val loss", {}, {}, true, true, "#ff7f0e"};
  for (const auto& e : d.val) val.x.push_back(double(e.step)), val.y.push_back(e.val_loss);

  std::vector<ChartSeries> loss_series{loss};
  if (!d.val.empty()) loss_series.push_back(val);
  auto opts = [](const char* title, const char* y_label) {
    ChartOptions o;
    o.title = title;
    o.x_label = "step";
    o.y_label = y_label;
    return o;
  };
  std::string h = "<div class=\"charts\">\n";
  h += svg_line_chart(loss_series, opts("Loss", "loss"));
  h += svg_line_chart({lr}, opts("Learning rate", "lr"));
  h += svg_line_chart({gn}, opts("Gradient norm (before clipping)", "norm"));
  h += svg_line_chart({tps}, opts("Throughput", "tokens/s"));
  h += "</div>\n";
  return h;
}

}  // namespace

std::string html_escape(std::string_view s) {
  std::string r;
  r.reserve(s.size());
  for (const char c : s) {
    switch (c) {
      case '&':
        r += "&amp;";
        break;
      case '<':
        r += "&lt;";
        break;
      case '>':
        r += "&gt;";
        break;
      case '"':
        r += "&quot;";
        break;
      case '\'':
        r += "&#39;";
        break;
      default:
        r += c;
    }
  }
  return r;
}

std::vector<double> nice_ticks(double lo, double hi, int max_ticks, bool integer) {
  if (!std::isfinite(lo) || !std::isfinite(hi)) lo = 0, hi = 1;
  if (lo > hi) std::swap(lo, hi);
  if (lo == hi) {
    // A constant series: a band around it, so it is drawn mid-height with ticks.
    const double pad = lo == 0 ? 1 : std::abs(lo) * 0.1;
    lo -= pad, hi += pad;
  }
  double step = nice_step((hi - lo) / std::max(max_ticks - 1, 1));
  if (integer) step = std::max(step, 1.0);
  // The tolerance keeps a bound that is a tick already (up to rounding) from
  // growing a tick; the chart clamps what it maps, so the 1e-9 cannot show.
  const double first = std::floor(lo / step + 1e-9) * step;
  const double last = std::ceil(hi / step - 1e-9) * step;
  const long n = std::max(1L, std::lround((last - first) / step));
  std::vector<double> ticks;
  for (long k = 0; k <= n; ++k) {
    const double v = first + double(k) * step;
    ticks.push_back(std::abs(v) < step * 1e-9 ? 0.0 : v);  // no "-0" or "1e-17" labels
  }
  return ticks;
}

std::vector<size_t> decimate(const std::vector<double>& y, size_t max_points) {
  const size_t n = y.size();
  max_points = std::max<size_t>(max_points, 4);
  std::vector<size_t> idx;
  if (n <= max_points) {
    for (size_t i = 0; i < n; ++i) idx.push_back(i);
    return idx;
  }
  idx.push_back(0);
  const size_t buckets = (max_points - 2) / 2, interior = n - 2;
  for (size_t b = 0; b < buckets; ++b) {
    const size_t begin = 1 + interior * b / buckets, end = 1 + interior * (b + 1) / buckets;
    if (begin == end) continue;
    const auto [lo, hi] = std::minmax_element(y.begin() + long(begin), y.begin() + long(end));
    const size_t a = size_t(lo - y.begin()), c = size_t(hi - y.begin());
    idx.push_back(std::min(a, c));
    if (a != c) idx.push_back(std::max(a, c));
  }
  idx.push_back(n - 1);
  return idx;
}

std::string svg_line_chart(const std::vector<ChartSeries>& series, const ChartOptions& o) {
  std::vector<Points> pts;
  double xlo = std::numeric_limits<double>::infinity(), xhi = -xlo, ylo = xlo, yhi = -xlo;
  for (const auto& s : series) {
    pts.push_back(finite_points(s));
    for (const double x : pts.back().x) xlo = std::min(xlo, x), xhi = std::max(xhi, x);
    for (const double y : pts.back().y) ylo = std::min(ylo, y), yhi = std::max(yhi, y);
  }
  const bool empty = !(xlo <= xhi);
  if (empty) xlo = 0, xhi = 1, ylo = 0, yhi = 1;
  if (xlo == xhi) xlo -= 1, xhi += 1;  // one step: centred, ticks either side

  const std::vector<double> xt = nice_ticks(xlo, xhi, 6, o.integer_x), yt = nice_ticks(ylo, yhi, 5);
  const double L = o.margin_left, R = o.width - o.margin_right, T = o.margin_top,
               B = o.height - o.margin_bottom;
  const auto px = [&](double x) {
    return std::clamp(L + (x - xt.front()) / (xt.back() - xt.front()) * (R - L), L, R);
  };
  const auto py = [&](double y) {
    return std::clamp(B - (y - yt.front()) / (yt.back() - yt.front()) * (B - T), T, B);
  };
  const std::string W = std::to_string(o.width), H = std::to_string(o.height), title = html_escape(o.title);

  std::string s = "<svg class=\"chart\" viewBox=\"0 0 " + W + " " + H + "\" width=\"" + W + "\" height=\"" +
                  H + "\" role=\"img\" aria-label=\"" + title + "\">\n<title>" + title + "</title>\n";
  s += "<text class=\"chart-title\" x=\"" + coord(o.width / 2.0) + "\" y=\"18\" text-anchor=\"middle\">" +
       title + "</text>\n";
  // Colours as attributes, not CSS: the <svg> stays readable when saved on its own.
  for (const double v : yt) {
    const std::string y = coord(py(v));
    s += "<line stroke=\"#eee\" x1=\"" + coord(L) + "\" y1=\"" + y + "\" x2=\"" + coord(R) + "\" y2=\"" + y +
         "\"/>";
    s += "<text class=\"tick\" x=\"" + coord(L - 6) + "\" y=\"" + coord(py(v) + 3.5) +
         "\" text-anchor=\"end\">" + tick_label(v, max_abs(yt)) + "</text>\n";
  }
  for (const double v : xt) {
    const std::string x = coord(px(v));
    s += "<line stroke=\"#eee\" x1=\"" + x + "\" y1=\"" + coord(T) + "\" x2=\"" + x + "\" y2=\"" + coord(B) +
         "\"/>";
    s += "<text class=\"tick\" x=\"" + x + "\" y=\"" + coord(B + 15) + "\" text-anchor=\"middle\">" +
         tick_label(v, max_abs(xt)) + "</text>\n";
  }
  s += "<rect fill=\"none\" stroke=\"#999\" x=\"" + coord(L) + "\" y=\"" + coord(T) + "\" width=\"" +
       coord(R - L) + "\" height=\"" + coord(B - T) + "\"/>\n";
  s += "<text class=\"axis-label\" x=\"" + coord((L + R) / 2) + "\" y=\"" + coord(o.height - 8.0) +
       "\" text-anchor=\"middle\">" + html_escape(o.x_label) + "</text>\n";
  s += "<text class=\"axis-label\" transform=\"translate(14," + coord((T + B) / 2) +
       ") rotate(-90)\" text-anchor=\"middle\">" + html_escape(o.y_label) + "</text>\n";
  if (empty)
    s += "<text class=\"no-data\" x=\"" + coord((L + R) / 2) + "\" y=\"" + coord((T + B) / 2) +
         "\" text-anchor=\"middle\">no data</text>\n";

  for (size_t k = 0; k < series.size(); ++k) {
    const ChartSeries& cs = series[k];
    const Points& p = pts[k];
    const std::vector<size_t> idx = decimate(p.y, o.max_points);
    const std::string color = html_escape(cs.color), name = html_escape(cs.name);
    if (cs.line && idx.size() >= 2) {
      s += "<polyline class=\"series\" fill=\"none\" stroke=\"" + color +
           "\" stroke-width=\"1.5\" stroke-linejoin=\"round\" points=\"";
      for (size_t j = 0; j < idx.size(); ++j)
        s += (j ? " " : "") + coord(px(p.x[idx[j]])) + "," + coord(py(p.y[idx[j]]));
      s += "\"><title>" + name + "</title></polyline>\n";
    }
    if (cs.markers || !cs.line || idx.size() == 1) {
      for (const size_t i : idx)
        s += "<circle cx=\"" + coord(px(p.x[i])) + "\" cy=\"" + coord(py(p.y[i])) + "\" r=\"2.5\" fill=\"" +
             color + "\"><title>" + name + " at " + num("%g", p.x[i]) + ": " + num("%.6g", p.y[i]) +
             "</title></circle>\n";
    }
  }

  if (series.size() > 1) {
    // Top right: training curves fall, so that corner is usually empty.
    for (size_t k = 0; k < series.size(); ++k) {
      const double y = T + 14 + 15 * double(k), x = R - 110;
      s += "<line x1=\"" + coord(x) + "\" y1=\"" + coord(y - 4) + "\" x2=\"" + coord(x + 18) + "\" y2=\"" +
           coord(y - 4) + "\" stroke=\"" + html_escape(series[k].color) + "\" stroke-width=\"2\"/>";
      s += "<text class=\"legend\" x=\"" + coord(x + 24) + "\" y=\"" + coord(y) + "\">" +
           html_escape(series[k].name) + "</text>\n";
    }
  }
  s += "</svg>\n";
  return s;
}

std::string render_report_html(const ReportData& d) {
  const std::string title = html_escape(d.title.empty() ? std::string("qlora run") : d.title);
  std::string h = "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n";
  h += "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n";
  h += "<title>" + title + "</title>\n<style>\n" + kCss + "</style>\n</head>\n<body>\n";
  h += "<h1>" + title + "</h1>\n";
  if (!d.summary.empty()) {
    h += "<section>\n<h2>Summary</h2>\n";
    key_value_table(h, d.summary);
    h += "</section>\n";
  }
  const auto res = results(d);
  if (!res.empty()) {
    h += "<section>\n<h2>Results</h2>\n";
    key_value_table(h, res);
    h += "</section>\n";
  }
  if (!d.samples.empty()) {
    h += "<section>\n<h2>Answers before and after training</h2>\n<table>\n<tr><th>prompt</th><th>before</th>"
         "<th>after</th></tr>\n";
    for (const auto& s : d.samples)
      h += "<tr><td>" + html_escape(s.prompt) + "</td><td>" + html_escape(s.before) + "</td><td>" +
           html_escape(s.after) + "</td></tr>\n";
    h += "</table>\n</section>\n";
  }
  h += "<section>\n<h2>Training curves</h2>\n" + charts(d) + "</section>\n";
  if (!d.val.empty()) {
    h += "<section>\n<h2>Evaluation</h2>\n<table>\n<tr><th>step</th><th>val "
         "loss</th><th>perplexity</th></tr>\n";
    for (const auto& e : d.val)
      h += "<tr><td class=\"n\">" + std::to_string(e.step) + "</td><td class=\"n\">" +
           num("%.4f", e.val_loss) + "</td><td class=\"n\">" + num("%.2f", e.val_ppl) + "</td></tr>\n";
    h += "</table>\n</section>\n";
  }
  if (!d.data_statistics.empty())
    h += "<section>\n<h2>Data statistics</h2>\n<pre>" + html_escape(d.data_statistics) +
         "</pre>\n</section>\n";
  if (!d.memory_table.empty())
    h += "<section>\n<h2>Memory</h2>\n<pre>" + html_escape(d.memory_table) + "</pre>\n</section>\n";
  h += "<footer>Written by qlora. Self-contained: no scripts, nothing loaded from elsewhere.</footer>\n";
  h += "</body>\n</html>\n";
  return h;
}

void write_report_html(const std::filesystem::path& path, const ReportData& d) {
  write_file_atomic(path, render_report_html(d));
}

}  // namespace qlora
