// Resumable training checkpoints.
//
//   <output>/checkpoints/step-00000120/
//     adapter/                 the PEFT adapter (save_peft_adapter)
//     optimizer.safetensors    Optimizer::state() as F32 tensors; metadata:
//                              optimizer kind, steps, n_params
//     state.json               TrainState + format_version, the sizes and
//                              digests of the other files ("checksums") and
//                              its own digest ("state_digest")
//
// A checkpoint folder is built under a temporary name and renamed into place
// (AtomicDir), so a crash or a full disk mid-write leaves the earlier
// checkpoints as they were; a folder that does not validate (an interrupted
// copy, a hand-edited state.json) is skipped by latest_checkpoint. A resume
// also checks every file against its digest (find_resume_checkpoint) and
// falls back to the previous valid checkpoint, saying why.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "io/hf_config.h"
#include "model/lora.h"
#include "train/optimizer.h"

namespace qlora {

inline constexpr int kCheckpointFormatVersion = 1;

// Everything besides the weights and optimizer state that a resumed run needs
// to continue exactly where the saved one stopped.
struct TrainState {
  int64_t step = 0;                      // optimizer steps done
  int64_t epoch = 0;                     // current epoch (0-based)
  int64_t cursor = 0;                    // micro-batches of the current epoch already consumed
  uint64_t forward_count = 0;            // forward passes so far (seeds LoRA dropout)
  uint64_t rng = 0;                      // the trainer's RNG state
  int64_t tokens_seen = 0;               // trained (label) tokens so far
  double wall_seconds = 0;               // training time so far, over all resumes
  std::optional<double> last_loss;       // train loss of the last step
  std::optional<double> last_eval_loss;  // most recent validation loss
  std::optional<double> best_eval_loss;  // lowest validation loss so far
  std::string recipe_hash;               // recipe_training_hash of the run
  std::string base_fingerprint;          // base_model_fingerprint of the base model

  // Where it was read from (not saved): named in compatibility errors.
  std::filesystem::path source;
};

// "<output_dir>/checkpoints"
std::filesystem::path checkpoints_dir(const std::filesystem::path& output_dir);
// "<output_dir>/checkpoints/step-<step, 8 digits or more>"
std::filesystem::path checkpoint_path(const std::filesystem::path& output_dir, int64_t step);

// Writes the checkpoint of state.step (replacing a folder of the same step),
// then removes older step-* folders so that keep_last remain, the new one
// included; folders of later steps are left alone, as are leftovers of
// interrupted writes by a running process (those of a dead one are removed).
// keep_last must be >= 1 (checked before writing). A failed write throws
// qlora::Error with the cause, saying which earlier checkpoint is intact.
std::filesystem::path save_checkpoint(const std::filesystem::path& output_dir, const TrainState& state,
                                      const LoraWeights& lora, const ModelConfig& cfg, Optimizer& opt,
                                      const std::string& base_model_name, int64_t keep_last);

// The valid checkpoint folders under output_dir, oldest first: a step-N
// name, state.json that parses with this format version and step N and
// matches its digest, the adapter files and optimizer.safetensors present
// with valid headers and the sizes state.json recorded (contents are
// checked against their digests only by find_resume_checkpoint).
// Temporary folders and anything else are ignored.
std::vector<std::filesystem::path> list_checkpoints(const std::filesystem::path& output_dir);
// The newest of them; nullopt if there is none.
std::optional<std::filesystem::path> latest_checkpoint(const std::filesystem::path& output_dir);

// Where --resume continues: the newest checkpoint whose files all match the
// sizes and digests in its state.json (a truncated, altered or half-copied
// one is passed over), and a line per newer folder passed over, saying why.
struct ResumePoint {
  std::optional<std::filesystem::path> checkpoint;
  std::vector<std::string> skipped;
};
ResumePoint find_resume_checkpoint(const std::filesystem::path& output_dir);

// Reads <ckpt>/state.json (cheap: check compatibility before loading weights).
TrainState read_train_state(const std::filesystem::path& ckpt);

// Restores the adapter weights and the optimizer state (bit for bit) and
// returns the TrainState. A checkpoint for another shape (model dims, layer
// count, rank, target modules, alpha) or another optimizer throws
// qlora::Error naming the file and what differs; lora and opt are left as
// they were then.
TrainState load_checkpoint(const std::filesystem::path& ckpt, LoraWeights& lora, Optimizer& opt,
                           const ModelConfig& cfg);

// 16 hex digits identifying a base model folder from config.json and the
// headers of its *.safetensors files (plus a few KiB of each file's data,
// so two fine-tunes with identical shapes differ), not from all the data:
// instant on a 140 GB folder. Independent of where the folder is.
std::string base_model_fingerprint(const std::filesystem::path& model_dir);

// Throws qlora::Error when the checkpoint's base model or recipe differs:
//   "checkpoint <path> was trained on another base model (fingerprint X, now Y): ..."
//   "checkpoint <path> was trained with a different recipe (hash X, now Y): changed keys cannot be
//    resumed; use --overwrite to start again"
void check_resume_compatible(const TrainState& state, const std::string& recipe_hash,
                             const std::string& fingerprint);

}  // namespace qlora
