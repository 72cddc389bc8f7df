// The trainer's live status line:
//
//   step 12/300  loss 2.3456  lr 1.20e-04  1534 tok/s  eta 3m10s  mem 1.21 GiB
//
// On a terminal it is one line on stderr redrawn in place; otherwise (a log
// file, CI) it is one plain line per log step on stdout. Messages printed
// while a live line is shown (eval results, checkpoint notices) go through
// message(), which clears the line, prints the text and redraws the line, so
// nothing is garbled. Not thread-safe: the trainer loop owns it.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <string_view>

namespace qlora {

struct LineStats {
  int64_t step = 0;
  int64_t total_steps = 0;  // 0 = unknown: "step 12"
  double loss = std::numeric_limits<double>::quiet_NaN();
  double lr = 0;
  double tokens_per_s = 0;
  double eta_s = -1;       // < 0 = unknown: "eta --"
  uint64_t mem_bytes = 0;  // 0 = unknown: field left out
};

// The line for these numbers, without a newline (the testable core).
std::string format_step_line(const LineStats& s);
// "eval step 50/300  val_loss 2.1034  val_ppl 8.19"
std::string format_eval_line(int64_t step, int64_t total_steps, double val_loss, double val_ppl);

// Seconds left for `steps_left` more steps, from the `steps_done` steps of this
// process that took `elapsed_s` (steps replayed by a resume are not counted,
// so the rate is this process's own); < 0 when nothing has been measured yet.
double estimate_eta_s(int64_t steps_done, int64_t steps_left, double elapsed_s);

class ProgressLine {
 public:
  // live: redraw one line in place on `out` (a terminal), cut to `columns`
  // characters when columns > 0 (a wrapped line cannot be redrawn with '\r').
  // Otherwise plain: one line per log step.
  ProgressLine(std::FILE* out, bool live, int columns = 0);
  // Live on stderr when stderr is a terminal (its width from the terminal),
  // else plain on stdout.
  static ProgressLine standard();
  ~ProgressLine();
  ProgressLine(ProgressLine&& o) noexcept;
  ProgressLine(const ProgressLine&) = delete;
  ProgressLine& operator=(const ProgressLine&) = delete;
  ProgressLine& operator=(ProgressLine&&) = delete;

  // Call every step; log_step marks the steps that are logged. Plain: prints
  // a line on log steps only. Live: redraws on log steps, and on other steps
  // at most ten times a second.
  void update(const LineStats& s, bool log_step);
  // Prints a line of its own (an eval result, "saved checkpoint ...") above
  // the live line.
  void message(std::string_view text);
  void eval(int64_t step, int64_t total_steps, double val_loss, double val_ppl);
  // Ends the live line with a newline (so later output starts on a fresh
  // line); the destructor calls it. Idempotent until the next update.
  void finish();

  bool live() const { return live_; }

 private:
  void draw();
  std::FILE* out_;  // null once moved from
  bool live_;
  int columns_;
  std::string current_;  // the live line on screen; empty when none is
  std::chrono::steady_clock::time_point last_draw_{};
};

}  // namespace qlora
