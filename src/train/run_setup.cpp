#include "train/run_setup.h"

#include <algorithm>

#include "core/atomic_file.h"
#include "core/cache_dir.h"
#include "core/error.h"
#include "core/progress.h"
#include "data/tokenize_sample.h"
#include "io/hf_config.h"
#include "model/builtin.h"
#include "recipe/recipe_schema.h"
#include "train/backend.h"
#include "train/checkpoint.h"

namespace qlora {

namespace fs = std::filesystem;

namespace {

// Fresh, resumed or replaced: a folder holding another run is never written
// into by accident, and a folder that is not a run is never deleted.
void prepare_output_dir(const fs::path& dir, bool resume, bool overwrite) {
  std::error_code ec;
  const bool exists = fs::exists(dir, ec);
  if (exists && !fs::is_directory(dir)) fail("output.dir ", dir.string(), " exists and is not a folder");
  // What a killed run left half-written ("<name>.tmp-<pid>-<n>" of a dead
  // process) goes first: it would otherwise make a run killed before its
  // first save look like a foreign folder.
  if (exists) {
    remove_stale_temporaries(dir);
    remove_stale_temporaries(checkpoints_dir(dir));
  }
  const bool empty = !exists || fs::is_empty(dir, ec);
  if (!empty) {
    if (!fs::exists(dir / "recipe.yaml"))
      fail("output.dir ", dir.string(),
           " is not empty and holds no qlora run (no recipe.yaml); choose another output.dir");
    if (!resume && !overwrite)
      fail("output.dir ", dir.string(),
           " holds another run; use --resume to continue it or --overwrite to replace it");
    if (overwrite && !resume) {
      fs::remove_all(dir, ec);
      if (ec) fail("output.dir ", dir.string(), ": cannot remove the previous run: ", ec.message());
    }
  }
  fs::create_directories(dir, ec);
  if (ec) fail("output.dir ", dir.string(), ": cannot create: ", ec.message());
  // A folder we cannot write into (read-only mount, another user's) is
  // refused now, not after the model and data have loaded.
  try {
    AtomicFile probe(dir / ".qlora-write-test");
  } catch (const Error& e) {
    fail("output.dir ", dir.string(), " is not writable (", e.what(), "); choose another output.dir");
  }
}

}  // namespace

DataSpec data_spec_from(const Recipe& r) {
  DataSpec s;
  for (const auto& f : r.data.train) s.train_files.emplace_back(f);
  for (const auto& f : r.data.val) s.val_files.emplace_back(f);
  s.val_fraction = r.data.val_fraction;
  s.read.format = parse_data_format(r.data.format);
  s.read.on_bad_record = parse_on_bad_record(r.data.on_bad_record);
  s.read.fields = recipe_schema::field_names(r.data);
  s.chat_template = r.data.chat_template;
  s.tokenize.train_on_inputs = r.data.train_on_inputs;
  s.pack.seq_len = r.data.seq_len;
  s.pack.packing = r.data.packing;
  s.pack.over_long = r.data.over_long == "drop" ? OverLong::drop : OverLong::truncate;
  s.seed = r.train.seed;
  if (r.data.cache) s.cache_dir = cache_subdir("data");
  s.threads = unsigned(r.data.threads);
  return s;
}

RunSetup open_run(const Recipe& r, bool resume, bool overwrite, std::FILE* out) {
  RunSetup s;
  s.output_dir = r.output.dir;
  prepare_output_dir(s.output_dir, resume, overwrite);
  // 2-3: config, then the memory plan, before any weight is read.
  s.model_dir = resolve_model_path(r.model.path);
  s.base_name = r.model.path;
  const ModelConfig cfg = load_model_config(s.model_dir);
  s.fingerprint = base_model_fingerprint(s.model_dir);
  if (resume) {
    // Checked before anything in the folder changes: a refused resume
    // leaves the run as it was.
    const ResumePoint point = find_resume_checkpoint(s.output_dir);
    for (const auto& line : point.skipped) std::fprintf(out, "%s\n", line.c_str());
    s.resume_from = point.checkpoint;
    if (s.resume_from)
      check_resume_compatible(read_train_state(*s.resume_from), recipe_training_hash(r), s.fingerprint);
    else
      std::fprintf(out, "no checkpoint in %s yet: starting from step 0\n", s.output_dir.string().c_str());
  }
  PlanInput in = plan_input_from_recipe(r, cfg);
  apply_checkpoint_quant(in, s.model_dir);
  in.model_name = r.model.path;
  const BackendChoice backend = choose_backend(r.device.backend, cuda_training_unavailable());
  if (!backend.warning.empty()) std::fprintf(out, "%s\n", backend.warning.c_str());
  in.backend = backend.backend;
  if (in.backend == PlanBackend::cpu && in.budget_bytes == 0) in.budget_bytes = host_memory_bytes();
  s.plan = make_plan(in);
  std::fprintf(out, "%s\n", plan_table(s.plan).c_str());
  if (s.plan.verdict == Verdict::does_not_fit)
    fail("the run does not fit the memory budget; nothing was loaded.\n", plan_table(s.plan), "\n",
         advice_text(s.plan, make_advice(in)));

  // 5 before 4: data errors surface before the (slow) weight load.
  s.tokenizer = Tokenizer::load(s.model_dir);
  const DataSpec spec = data_spec_from(r);
  try {
    s.data = prepare_dataset(*s.tokenizer, s.model_dir, spec);
  } catch (const Error& e) {
    // The template module names its own setting; here it is a recipe key.
    const std::string m = e.what();
    if (m.rfind("chat_template:", 0) == 0) fail("data.", m);
    throw;
  }
  s.chat_template = template_for_tokenizer(*s.tokenizer, s.data.template_name);
  s.data_statistics = data_statistics_text(s.data);
  std::fprintf(out, "%s\n", s.data_statistics.c_str());
  if (s.data.train.rows.empty()) fail("data.train: no training rows after packing");

  // The plan's options, so the arenas are exactly the planned ones. The GPU
  // engine streams the weights from the folder itself (no host copy of the
  // model): here only the checks, so a bad folder fails before the GPU is touched.
  s.weight_options = weight_load_options(s.plan.input);
  if (s.plan.input.backend == PlanBackend::cuda)
    s.weights.cfg = check_llama_weights(s.model_dir, s.weight_options);
  else
    s.weights = load_llama_weights(s.model_dir, s.weight_options);
  return s;
}

}  // namespace qlora
