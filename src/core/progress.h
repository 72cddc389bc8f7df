// A progress bar with rate and ETA on a terminal (stderr), silent otherwise.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace qlora {

class Progress {
 public:
  // total: units of work (bytes, say); unit: "B" prints sizes as KiB/MiB/GiB.
  Progress(std::string label, uint64_t total, std::string unit, bool enabled);
  ~Progress();
  void advance(uint64_t done_units);
  void finish();
  // Whether stderr is a terminal (the default for `enabled`).
  static bool stderr_is_tty();

 private:
  void draw(bool final);
  std::string label_, unit_;
  uint64_t total_, done_ = 0;
  bool enabled_, finished_ = false;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

std::string human_bytes(uint64_t bytes);      // "1.50 GiB"
std::string human_duration(double seconds);  // "1m05s"

}  // namespace qlora
