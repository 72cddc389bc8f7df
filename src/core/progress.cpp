#include "core/progress.h"

#include <unistd.h>

#include <cstdio>

namespace qlora {

std::string human_bytes(uint64_t b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = double(b);
  int u = 0;
  while (v >= 1024 && u < 4) v /= 1024, ++u;
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.2f %s", v, units[u]);
  return buf;
}

std::string human_duration(double s) {
  char buf[32];
  if (s < 60) std::snprintf(buf, sizeof buf, "%.1fs", s);
  else if (s < 3600) std::snprintf(buf, sizeof buf, "%dm%02ds", int(s) / 60, int(s) % 60);
  else std::snprintf(buf, sizeof buf, "%dh%02dm", int(s) / 3600, (int(s) % 3600) / 60);
  return buf;
}

bool Progress::stderr_is_tty() { return ::isatty(STDERR_FILENO) == 1; }

Progress::Progress(std::string label, uint64_t total, std::string unit, bool enabled)
    : label_(std::move(label)), unit_(std::move(unit)), total_(total), enabled_(enabled),
      start_(std::chrono::steady_clock::now()), last_draw_(start_) {}

Progress::~Progress() {
  if (enabled_ && !finished_) std::fputs("\n", stderr);
}

void Progress::advance(uint64_t done) {
  done_ = done;
  const auto now = std::chrono::steady_clock::now();
  if (enabled_ && now - last_draw_ > std::chrono::milliseconds(100)) {
    last_draw_ = now;
    draw(false);
  }
}

void Progress::finish() {
  if (finished_) return;
  done_ = total_;
  if (enabled_) draw(true);
  finished_ = true;
}

void Progress::draw(bool final) {
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double frac = total_ ? double(done_) / double(total_) : 1.0;
  constexpr int kWidth = 30;
  const int filled = int(frac * kWidth);
  std::string bar(size_t(filled), '#');
  bar += std::string(size_t(kWidth - filled), '.');
  const double rate = secs > 0 ? double(done_) / secs : 0;
  const std::string rate_s = unit_ == "B" ? human_bytes(uint64_t(rate)) + "/s" : std::to_string(int(rate)) + "/s";
  const std::string eta = final ? "done in " + human_duration(secs)
                                : (rate > 0 ? "ETA " + human_duration(double(total_ - done_) / rate) : "ETA --");
  std::fprintf(stderr, "\r%s [%s] %5.1f%% %s %s\x1b[K%s", label_.c_str(), bar.c_str(), frac * 100, rate_s.c_str(),
               eta.c_str(), final ? "\n" : "");
  std::fflush(stderr);
}

}  // namespace qlora
