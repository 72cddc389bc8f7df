#include "train/trainer.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/progress.h"
#include "data/pipeline.h"
#include "data/prepare.h"
#include "model/llama.h"
#include "model/lora.h"
#include "model/weights.h"
#include "tokenizer/tokenizer.h"
#include "tools/evaluate.h"
#include "tools/export_gguf.h"
#include "tools/merge_model.h"
#include "train/batch.h"
#include "train/checkpoint.h"
#include "train/engine.h"
#include "train/metrics.h"
#include "train/optimizer.h"
#include "train/peft_adapter.h"
#include "train/progress_line.h"
#include "train/report.h"
#include "train/run_setup.h"
#include "train/sample_text.h"
#include "train/schedule.h"

namespace qlora {

namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// The step -> micro-batches map. Epoch e visits the rows in a permutation of
// its own (epoch 0: the order prepare_dataset shuffled them into); an epoch is
// ceil(rows / micro_batch) micro-batches, grouped grad_accum at a time into
// steps (the last step of an epoch may have fewer). Everything is a function
// of the step number, so resuming needs nothing but the step.
class StepPlan {
 public:
  StepPlan(size_t rows, int64_t micro_batch, int64_t grad_accum, uint64_t seed)
      : rows_(rows), mb_(micro_batch), ga_(grad_accum), seed_(seed) {
    mbs_per_epoch_ = (int64_t(rows) + mb_ - 1) / mb_;
    steps_per_epoch_ = (mbs_per_epoch_ + ga_ - 1) / ga_;
  }
  int64_t steps_per_epoch() const { return steps_per_epoch_; }
  // Micro-batches of the current epoch consumed before `step` (the data position).
  int64_t micro_batches_before(int64_t step) const {
    return std::min((step % steps_per_epoch_) * ga_, mbs_per_epoch_);
  }
  int64_t epoch_of(int64_t step) const { return step / steps_per_epoch_; }

  struct Micro {
    size_t first, count;
  };
  // The micro-batches of `step` (row ranges into order(epoch_of(step))).
  std::vector<Micro> micro_batches(int64_t step) const {
    const int64_t k = step % steps_per_epoch_;
    std::vector<Micro> out;
    for (int64_t j = k * ga_; j < std::min((k + 1) * ga_, mbs_per_epoch_); ++j) {
      const size_t first = size_t(j * mb_);
      out.push_back({first, std::min(size_t(mb_), rows_ - first)});
    }
    return out;
  }
  const std::vector<size_t>& order(int64_t epoch) {
    if (epoch != order_epoch_) {
      if (epoch == 0) {
        order_.resize(rows_);
        for (size_t i = 0; i < rows_; ++i) order_[i] = i;
      } else {
        order_ = seeded_permutation(rows_, seed_ + 0x9e3779b97f4a7c15ull * uint64_t(epoch));
      }
      order_epoch_ = epoch;
    }
    return order_;
  }

 private:
  size_t rows_;
  int64_t mb_, ga_;
  uint64_t seed_;
  int64_t mbs_per_epoch_ = 0, steps_per_epoch_ = 0;
  int64_t order_epoch_ = -1;
  std::vector<size_t> order_;
};

// report.html from what is on disk and in memory now.
void write_run_report(const RunSetup& setup, const Recipe& r, const std::string& measured, double wall_s,
                      int64_t step, int64_t total) {
  if (!r.logging.report) return;
  const MetricsHistory h = read_metrics(setup.output_dir / "metrics.jsonl");
  ReportData d;
  d.title = "qlora run " + setup.output_dir.filename().string();
  d.summary = {{"model", r.model.path},
               {"recipe", r.file.string()},
               {"progress", std::to_string(step) + " / " + std::to_string(total) + " steps"},
               {"LoRA", "rank " + std::to_string(r.lora.rank) + ", " +
                            std::to_string(setup.plan.lora_params) + " trainable parameters"},
               {"data", std::to_string(setup.data.train.rows.size()) + " training rows, " +
                            std::to_string(setup.data.val.rows.size()) + " validation rows of " +
                            std::to_string(r.data.seq_len) + " tokens"},
               {"wall time", human_duration(wall_s)}};
  d.train = h.train;
  d.val = h.val;
  d.data_statistics = setup.data_statistics;
  d.memory_table = plan_table(setup.plan) + (measured.empty() ? "" : "\n" + measured);
  const SampleReplies s = load_sample_replies(setup.output_dir);
  for (size_t i = 0; i < s.prompts.size(); ++i)
    d.samples.push_back(
        {s.prompts[i], i < s.before.size() ? s.before[i] : "", i < s.after.size() ? s.after[i] : ""});
  write_report_html(setup.output_dir / "report.html", d);
}

// On the engine's model with the LoRA it holds: before training that is the
// starting adapter (B = 0, the base model's output, unless lora.init loaded one).
// Also kept in the run folder's samples.json for the report (before: a fresh
// file; after: added to what is there).
void print_samples(const RunSetup& setup, const Recipe& r, StepEngine& engine, bool after, std::FILE* out) {
  const MakeGenerator make = [&](int64_t max_seq) { return engine.generator(max_seq); };
  SampleReplies kept = after ? load_sample_replies(setup.output_dir) : SampleReplies{};
  if (kept.prompts != r.logging.sample_prompts) kept = SampleReplies{r.logging.sample_prompts, {}, {}};
  std::vector<std::string>& replies = after ? kept.after : kept.before;
  replies.clear();
  for (const auto& prompt : r.logging.sample_prompts) {
    replies.push_back(sample_reply(make, setup.weights.cfg, *setup.tokenizer, *setup.chat_template, prompt,
                                   r.logging.sample_max_new_tokens));
    std::fprintf(out, "sample (%s training)\n  prompt: %s\n  reply:  %s\n", after ? "after" : "before",
                 prompt.c_str(), replies.back().c_str());
  }
  save_sample_replies(setup.output_dir, kept);
}

}  // namespace

RunSummary run_recipe(const Recipe& r, const RunOptions& o) {
  const auto t_start = Clock::now();
  std::FILE* out = o.out ? o.out : stdout;
  RunSetup setup = open_run(r, o.resume, o.overwrite, out);
  RunSummary sum;
  sum.output_dir = setup.output_dir;
  const ModelConfig& cfg = setup.weights.cfg;
  const PlanInput& planned = setup.plan.input;
  const auto& train_rows = setup.data.train.rows;
  const auto& val_rows = setup.data.val.rows;

  // 6: LoRA adapters, fresh (PEFT's init) or continued from an adapter folder.
  LoraWeights lora(cfg, planned.lora);
  lora.init_default(r.train.seed);
  if (r.lora.init != "default") {
    try {
      const LoraWeights from = load_matching_adapter(r.lora.init, lora, cfg);
      std::memcpy(lora.flat_params(), from.flat_params(), lora.flat_size() * sizeof(float));
    } catch (const Error& e) {
      fail("lora.init: ", e.what(), " (set the lora section to the adapter's)");
    }
  }
  Optimizer opt(planned.optimizer, lora.flat_size(), lora.plus_ranges());
  const std::unique_ptr<StepEngine> engine =
      planned.backend == PlanBackend::cuda
          ? make_cuda_engine(setup.model_dir, setup.weight_options, lora, opt, planned.micro_batch,
                             planned.seq_len, llama_run_options(planned))
          : make_cpu_engine(setup.weights, lora, opt, planned.micro_batch, planned.seq_len,
                            llama_run_options(planned));
  // DoRA's magnitudes at PEFT's initialisation (an adapter from lora.init
  // brings its own): by the engine, as the GPU's has no host copy of the base.
  if (r.lora.init == "default") engine->init_dora_magnitudes();
  TrainableModel& model = engine->model();
  BatchBuffer batch(planned.micro_batch, planned.seq_len);

  StepPlan plan(train_rows.size(), r.train.micro_batch, r.train.grad_accum, r.train.seed);
  const int64_t total = r.train.max_steps > 0 ? r.train.max_steps : r.train.epochs * plan.steps_per_epoch();
  ScheduleConfig sc;
  sc.kind = parse_schedule_kind(r.train.schedule);
  sc.lr = r.train.lr;
  sc.total_steps = total;
  sc.warmup_steps = warmup_steps_from(r.train.warmup, total);
  sc.min_lr_ratio = r.train.min_lr_ratio;
  check_schedule(sc);
  sum.total_steps = total;

  TrainState state;
  state.recipe_hash = recipe_training_hash(r);
  state.base_fingerprint = setup.fingerprint;
  if (setup.resume_from) {
    state = load_checkpoint(*setup.resume_from, lora, opt, cfg);
    engine->push();
    model.set_forward_count(state.forward_count);
    sum.resumed = true;
    std::fprintf(out, "resuming from %s (step %lld of %lld)\n", setup.resume_from->string().c_str(),
                 (long long)state.step, (long long)total);
  }
  sum.start_step = state.step;
  // Written once everything is loaded and checked: a run that failed before
  // training leaves no recipe.yaml, so its folder does not count as a run.
  write_file_atomic(setup.output_dir / "recipe.yaml", recipe_to_yaml(r));
  const double wall_before = state.wall_seconds;

  MetricsLog metrics(setup.output_dir / "metrics.jsonl", /*append=*/setup.resume_from.has_value());
  if (setup.resume_from) metrics.truncate_after(state.step);
  ProgressLine line = o.live ? ProgressLine(*o.live ? stderr : out, *o.live) : ProgressLine::standard();

  // Validation loss without dropout; never advances the dropout masks.
  auto evaluate_val = [&](int64_t step) -> std::optional<double> {
    if (val_rows.empty()) return std::nullopt;
    const EvalResult e = evaluate_rows(model, val_rows, batch, planned.micro_batch);
    metrics.write(EvalMetrics{step, e.loss, e.perplexity});
    line.eval(step, total, e.loss, e.perplexity);
    state.last_eval_loss = e.loss;
    if (!state.best_eval_loss || e.loss < *state.best_eval_loss) state.best_eval_loss = e.loss;
    return e.loss;
  };
  auto checkpoint = [&](int64_t step) {
    state.step = step;
    state.epoch = plan.epoch_of(step);
    state.cursor = plan.micro_batches_before(step);
    state.forward_count = model.forward_count();
    state.wall_seconds = wall_before + seconds_since(t_start);
    engine->pull();
    const fs::path dir =
        save_checkpoint(setup.output_dir, state, lora, cfg, opt, setup.base_name, r.train.keep_checkpoints);
    line.message("checkpoint " + dir.string());
    write_run_report(setup, r, "", state.wall_seconds, step, total);
  };

  if (!setup.resume_from) {
    if (o.samples) print_samples(setup, r, *engine, false, out);
    sum.first_val_loss = evaluate_val(0);
  }

  // 7: the step loop.
  const auto t_loop = Clock::now();
  int64_t step = state.step;
  for (; step < total; ++step) {
    const auto t0 = Clock::now();
    const auto& order = plan.order(plan.epoch_of(step));
    const auto micros = plan.micro_batches(step);
    // Token-weighted: every micro-batch's loss is divided by the target count
    // of the whole step, so grad_accum micro-batches equal one big batch.
    int64_t n_targets = 0, tokens = 0;
    for (const auto& m : micros)
      for (size_t i = 0; i < m.count; ++i) {
        const PackedRow& row = train_rows[order[m.first + i]];
        n_targets += row_target_count(row);
        tokens += row.doc_offsets.empty() ? 0 : row.doc_offsets.back();
      }
    engine->zero_grad();
    double loss = 0;
    if (n_targets > 0)
      for (const auto& m : micros) {
        loss += model.forward(batch.fill(train_rows, order, m.first, m.count), n_targets);
        model.backward();
      }
    const double norm = engine->clip_grad_norm(r.train.max_grad_norm);
    if (!std::isfinite(loss) || !std::isfinite(norm)) {
      line.finish();
      write_run_report(setup, r, "", wall_before + seconds_since(t_start), step, total);
      const auto last = latest_checkpoint(setup.output_dir);
      fail("step ", step + 1, ": the loss is ", loss, " and the gradient norm ", norm,
           "; stopping without applying this step. ",
           last ? "The last good checkpoint is " + last->string() +
                      "; lower train.lr or train.max_grad_norm and continue with --resume, or start again"
                : std::string("No checkpoint had been written yet."));
    }
    const double lr = lr_at(sc, step);
    if (n_targets > 0) engine->optimizer_step(lr);
    state.tokens_seen += n_targets;
    state.last_loss = loss;

    if (step == sum.start_step) sum.first_loss = loss;
    sum.last_loss = loss;
    const double dt = seconds_since(t0);
    const bool log_step = (step + 1) % r.logging.every == 0 || step + 1 == total;
    const uint64_t mem = engine->memory_bytes();
    if (log_step) {
      StepMetrics sm;
      sm.step = step + 1;
      sm.epoch = double(step + 1) / double(plan.steps_per_epoch());
      sm.loss = loss;
      sm.lr = lr;
      sm.grad_norm = norm;
      sm.tokens = state.tokens_seen;
      sm.tokens_per_s = dt > 0 ? double(tokens) / dt : 0;
      sm.elapsed_s = wall_before + seconds_since(t_start);
      sm.mem_bytes = mem;
      metrics.write(sm);
    }
    LineStats ls;
    ls.step = step + 1;
    ls.total_steps = total;
    ls.loss = loss;
    ls.lr = lr;
    ls.tokens_per_s = dt > 0 ? double(tokens) / dt : 0;
    ls.eta_s = estimate_eta_s(step + 1 - sum.start_step, total - step - 1, seconds_since(t_loop));
    ls.mem_bytes = mem;
    line.update(ls, log_step);

    const bool at_end = step + 1 == total;
    if (at_end) break;
    if (r.train.eval_every > 0 && (step + 1) % r.train.eval_every == 0) {
      if (auto v = evaluate_val(step + 1)) sum.last_val_loss = v;
    }
    const bool interrupted =
        (o.interrupt && o.interrupt->load()) || (o.stop_after_step > 0 && step + 1 == o.stop_after_step);
    if (interrupted || (r.train.save_every > 0 && (step + 1) % r.train.save_every == 0)) checkpoint(step + 1);
    if (interrupted) {
      line.finish();
      std::fprintf(out, "interrupted after step %lld of %lld; continue with: qlora run %s --resume\n",
                   (long long)(step + 1), (long long)total, r.file.string().c_str());
      sum.steps_done = step + 1;
      sum.interrupted = true;
      return sum;
    }
  }
  // 8: final evaluation, checkpoint, adapter, samples, report.
  sum.steps_done = total;
  if (auto v = evaluate_val(total)) sum.last_val_loss = v;
  checkpoint(total);
  line.finish();
  sum.adapter_dir = setup.output_dir / "adapter";
  save_peft_adapter(lora, cfg, sum.adapter_dir, setup.base_name, setup.fingerprint);
  std::fprintf(out, "adapter: %s\n", sum.adapter_dir.string().c_str());
  if (o.samples) print_samples(setup, r, *engine, true, out);
  if (r.output.merge) {
    MergeOptions mo;
    mo.overwrite = true;  // the run folder is ours: a resumed run replaces its earlier merge
    merge_model(setup.model_dir, sum.adapter_dir, setup.output_dir / "merged", mo);
    std::fprintf(out, "merged model: %s\n", (setup.output_dir / "merged").string().c_str());
  }
  if (r.output.gguf) {
    // llama.cpp's adapter format beside the PEFT folder (docs/adapters.md).
    AdapterExportOptions eo;
    eo.model = setup.model_dir;
    eo.overwrite = true;  // the run folder is ours: a resumed run replaces its earlier export
    export_adapter_gguf(sum.adapter_dir, setup.output_dir / "adapter.gguf", eo);
    std::fprintf(out, "adapter (llama.cpp GGUF): %s\n", (setup.output_dir / "adapter.gguf").string().c_str());
  }
  const std::string measured = engine->measured_text(setup.plan);
  std::fprintf(out, "%s", measured.c_str());
  write_run_report(setup, r, measured, wall_before + seconds_since(t_start), total, total);
  if (r.logging.report)
    std::fprintf(out, "report: %s\n", (setup.output_dir / "report.html").string().c_str());
  return sum;
}

}  // namespace qlora
