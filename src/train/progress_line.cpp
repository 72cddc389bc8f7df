#include "train/progress_line.h"

#include <sys/ioctl.h>
#include <unistd.h>

#include <cmath>

#include "core/progress.h"

namespace qlora {

namespace {

std::string fixed(const char* fmt, double v) {
  if (std::isnan(v)) return "nan";
  char buf[64];
  std::snprintf(buf, sizeof buf, fmt, v);
  return buf;
}

std::string step_of(int64_t step, int64_t total) {
  std::string s = "step " + std::to_string(step);
  if (total > 0) s += "/" + std::to_string(total);
  return s;
}

int terminal_columns(int fd) {
  winsize ws{};
  return ::ioctl(fd, TIOCGWINSZ, &ws) == 0 ? ws.ws_col : 0;
}

}  // namespace

std::string format_step_line(const LineStats& s) {
  std::string line = step_of(s.step, s.total_steps);
  line += "  loss " + fixed("%.4f", s.loss);
  line += "  lr " + fixed("%.2e", s.lr);
  line += "  " + fixed("%.0f", s.tokens_per_s) + " tok/s";
  line += "  eta " + (s.eta_s >= 0 && std::isfinite(s.eta_s) ? human_duration(s.eta_s) : std::string("--"));
  if (s.mem_bytes > 0) line += "  mem " + human_bytes(s.mem_bytes);
  return line;
}

std::string format_eval_line(int64_t step, int64_t total_steps, double val_loss, double val_ppl) {
  return "eval " + step_of(step, total_steps) + "  val_loss " + fixed("%.4f", val_loss) + "  val_ppl " +
         fixed("%.2f", val_ppl);
}

double estimate_eta_s(int64_t steps_done, int64_t steps_left, double elapsed_s) {
  if (steps_left <= 0) return 0;
  if (steps_done <= 0 || !(elapsed_s > 0)) return -1;
  return elapsed_s / double(steps_done) * double(steps_left);
}

ProgressLine::ProgressLine(std::FILE* out, bool live, int columns)
    : out_(out), live_(live), columns_(columns) {}

ProgressLine ProgressLine::standard() {
  if (Progress::stderr_is_tty()) return ProgressLine(stderr, true, terminal_columns(STDERR_FILENO));
  return ProgressLine(stdout, false);
}

ProgressLine::ProgressLine(ProgressLine&& o) noexcept
    : out_(o.out_),
      live_(o.live_),
      columns_(o.columns_),
      current_(std::move(o.current_)),
      last_draw_(o.last_draw_) {
  o.out_ = nullptr;
}

ProgressLine::~ProgressLine() {
  if (out_) finish();
}

void ProgressLine::update(const LineStats& s, bool log_step) {
  if (!live_) {
    if (log_step) message(format_step_line(s));
    return;
  }
  const auto now = std::chrono::steady_clock::now();
  // Redrawing a fast run's every step would cost more terminal time than the step.
  if (!log_step && !current_.empty() && now - last_draw_ < std::chrono::milliseconds(100)) return;
  last_draw_ = now;
  current_ = format_step_line(s);
  // One column short of the width: writing the last column wraps on some terminals.
  if (columns_ > 1 && current_.size() >= size_t(columns_)) current_.resize(size_t(columns_ - 1));
  draw();
}

void ProgressLine::draw() {
  std::fprintf(out_, "\r%s\x1b[K", current_.c_str());
  std::fflush(out_);
}

void ProgressLine::message(std::string_view text) {
  if (live_ && !current_.empty()) {
    std::fprintf(out_, "\r\x1b[K%.*s\n", int(text.size()), text.data());
    draw();
    return;
  }
  std::fprintf(out_, "%.*s\n", int(text.size()), text.data());
  std::fflush(out_);
}

void ProgressLine::eval(int64_t step, int64_t total_steps, double val_loss, double val_ppl) {
  message(format_eval_line(step, total_steps, val_loss, val_ppl));
}

void ProgressLine::finish() {
  if (!live_ || current_.empty()) return;
  std::fputs("\n", out_);
  std::fflush(out_);
  current_.clear();
}

}  // namespace qlora
