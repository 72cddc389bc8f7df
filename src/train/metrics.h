// metrics.jsonl: the record of a run, one JSON object per line, written by the
// trainer and read back for report.html.
//
//   {"step":12,"epoch":0.04,"loss":2.3456,"lr":0.00012,"grad_norm":0.83,
//    "tokens":24576,"tokens_per_s":1534.2,"elapsed_s":16.1,"mem_bytes":1299227648}
//   {"step":50,"val_loss":2.1034,"val_ppl":8.19}
//
// A line with "val_loss" is an evaluation record, any other a training step.
// Non-finite numbers (a diverged loss) are written as null and read back as
// NaN. Each line is flushed as it is written, so a killed run loses at most
// the line being written; read_metrics ignores such a torn last line.
#pragma once

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

namespace qlora {

// One optimizer step as the trainer logs it.
struct StepMetrics {
  int64_t step = 0;                                        // optimizer steps done (1 after the first update)
  double epoch = 0;                                        // fractional epochs of training data consumed
  double loss = std::numeric_limits<double>::quiet_NaN();  // mean over the step's target tokens
  double lr = 0;                                           // learning rate used by this step
  double grad_norm = std::numeric_limits<double>::quiet_NaN();  // before clipping
  int64_t tokens = 0;       // tokens trained on since step 0 (cumulative, so it survives a resume)
  double tokens_per_s = 0;  // throughput of this step (or of the steps since the last log line)
  double elapsed_s = 0;     // wall time of the run, resumes included
  uint64_t mem_bytes = 0;   // measured memory (device or RSS); 0 = unknown
};

// One evaluation on the validation data.
struct EvalMetrics {
  int64_t step = 0;
  double val_loss = std::numeric_limits<double>::quiet_NaN();
  double val_ppl = std::numeric_limits<double>::quiet_NaN();  // exp(val_loss)
};

struct MetricsHistory {
  std::vector<StepMetrics> train;  // in file order
  std::vector<EvalMetrics> val;
};

// Appends records to a metrics.jsonl file.
//
// A fresh run (append = false) starts an empty file. A resumed run
// (append = true) keeps what is there, minus a torn last line; it should then
// call truncate_after(resumed_step), because a run killed after its last
// checkpoint logged steps that the resumed run will log again.
class MetricsLog {
 public:
  MetricsLog(std::filesystem::path path, bool append);
  ~MetricsLog();
  MetricsLog(const MetricsLog&) = delete;
  MetricsLog& operator=(const MetricsLog&) = delete;

  void write(const StepMetrics& m);
  void write(const EvalMetrics& m);
  // Drops every record (training or evaluation) whose step is > step; the
  // file is rewritten atomically and later writes append to it.
  void truncate_after(int64_t step);

  const std::filesystem::path& path() const { return path_; }

 private:
  void open_for_append();
  void write_line(const std::string& line);
  std::filesystem::path path_;
  std::FILE* f_ = nullptr;
};

// The records of a metrics.jsonl file. Blank lines are skipped and an
// unparsable last line (a run killed mid-write) is ignored; an unparsable line
// elsewhere throws qlora::Error naming the file and line. A missing file
// throws.
MetricsHistory read_metrics(const std::filesystem::path& path);

}  // namespace qlora
