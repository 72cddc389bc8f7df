// The Llama-family model over frozen (NF4 or dense) base weights with LoRA
// adapters: forward with chunked cross entropy, backward into the LoRA
// gradients only, per-layer activation checkpointing. Written as a flat list
// of op calls (kernels/ops.h); backward mirrors forward in reverse.
//
// Memory: every activation and scratch buffer of a step lives in one arena
// sized for (B, T) in the constructor; forward and backward allocate nothing.
#pragma once

#include <cstdint>
#include <vector>

#include "core/arena.h"
#include "kernels/ops.h"
#include "model/lora.h"
#include "model/trainable.h"
#include "model/weights.h"

namespace qlora {

// One micro-batch. tokens, targets, positions are (B,T). positions restart at
// 0 at each packed document (HF position_ids); they define the document
// masks. positions == nullptr means one document per row. targets ==
// kIgnoreIndex (-100) are not trained on.
struct LlamaBatch {
  const int32_t* tokens = nullptr;
  const int32_t* targets = nullptr;
  const int32_t* positions = nullptr;
  int64_t B = 0, T = 0;
};

struct LlamaRunOptions {
  bool checkpointing = false;  // keep only each layer's input; recompute it in backward
  ops::CeChunking ce;
};

// The first key each query of a sliding-window layer sees: start (B*T) =
// max(doc_start, t - window + 1), i.e. its document's keys s with t - s <
// window (transformers' convention: the window counts the query itself).
// The attention ops take it in place of doc_start (their mask is "start[t] <=
// s <= t"), so one kernel serves both. window >= 1.
void window_starts(int32_t* start, const int32_t* doc_start, int64_t B, int64_t T, int64_t window);

// pos (B*T) and doc_start (B*T) of a batch (doc_start[i] = t - position: the
// first token of i's document in its row); throws qlora::Error naming the row
// and column of a position that does not start at 0 or count up by one.
void batch_positions(const LlamaBatch& b, int32_t* pos, int32_t* doc_start);

// The dropout seed of adapter (l, t) at a forward count: every backend draws
// the same masks (ops::dropout_forward's counter-based hash).
uint64_t lora_dropout_seed(uint64_t lora_seed, uint64_t forward_count, int64_t l, LoraTarget t);

// The config's rope_theta / rope_scaling as the op's parameters.
ops::RopeParams rope_params(const ModelConfig& c);

// The views of LlamaModel's activation arena, laid out by one function for
// the model (real arena) and for the memory planner (measuring arena, from the
// config alone): the planned bytes are the allocated bytes by construction.
struct LlamaActivationViews {
  // One layer's saved activations (all (N,...) with N = B*T).
  struct LayerActs {
    float *ln1, *rstd1, *q, *k, *v, *att, *lse, *xmid, *ln2, *rstd2, *gate, *up, *act;
    // qk_norm (qwen3) only, else null: the projections before the per-head
    // norm, (N,H*D) and (N,KVH*D), and the norm's rstd, (N*H) and (N*KVH).
    float *qraw, *kraw, *rstdq, *rstdk;
    float* h[kNumLoraTargets];      // LoRA hidden (N,R) per target
    float* wnorm[kNumLoraTargets];  // DoRA: ||W + s B A|| per output row (OUT), else null
  };
  // lora: null for the base model only.
  void layout(Arena& a, const ModelConfig& cfg, const LoraConfig* lora, int64_t max_B, int64_t max_T,
              const LlamaRunOptions& opt);

  std::vector<LayerActs> layer_acts_;  // L sets, or 1 with checkpointing
  std::vector<float*> resid_;          // L+1 layer inputs (N,C); resid_[L] is the last output
  float *lnf_, *rstdf_, *losses_, *lse_ce_, *ce_scratch_, *tmp_, *xd_, *inv_freq_, *cos_, *sin_;
  int32_t *pos_, *doc_start_;
  int32_t* win_start_;  // (N): window_starts of the batch; null without a sliding window
  // backward scratch
  float *dres_, *dtmp_, *dln_, *dlin_, *dq_, *dk_, *dv_, *datt_, *dgate_, *dup_, *dact_, *dh_, *dxd_;
  // DoRA only (else null): the base and LoRA products of one linear (N,OUT),
  // forward and backward (their gradients in place), and the norm's panel.
  float *dora_base_ = nullptr, *dora_lora_ = nullptr, *dora_panel_ = nullptr;
};

// DoRA: every magnitude set to its row norm ||W + s B A|| (PEFT's
// initialisation, with the current A and B: at a fresh start B = 0, so the
// adapted model starts equal to the base). No-op without DoRA.
void init_dora_magnitudes(LoraWeights& lora, const LlamaWeights& w);

class LlamaModel : public TrainableModel, private LlamaActivationViews {
 public:
  // Bytes of the activation arena a model of this config would allocate for
  // batches up to max_B x max_T (== activation_bytes() of that model): the
  // same layout code, in measuring mode. No checks of the shape.
  static size_t arena_bytes(const ModelConfig& cfg, const LoraConfig* lora, int64_t max_B, int64_t max_T,
                            const LlamaRunOptions& opt = {});

  // lora may be null (base model only; backward then has nothing to do).
  // Sizes the activation arena for batches up to max_B x max_T.
  LlamaModel(const LlamaWeights& w, LoraWeights* lora, int64_t max_B, int64_t max_T, LlamaRunOptions opt = {});

  // Returns this micro-batch's loss contribution: sum of its target losses /
  // n_targets_step (the number of target tokens of the whole optimizer step;
  // <= 0 means this batch's own count). Keeps what backward needs.
  double forward(const LlamaBatch& batch, int64_t n_targets_step = 0) override;
  // Accumulates (+=) the LoRA gradients of the last forward's loss.
  void backward() override;
  // logits (B*T, V) of a batch (no loss; for tests and references).
  void logits(float* out, const LlamaBatch& batch);

  int64_t last_num_targets() const override { return n_targets_; }
  // Forward passes so far: it seeds the LoRA dropout masks, so a resumed run
  // restores it to continue with the same masks.
  uint64_t forward_count() const override { return step_; }
  void set_forward_count(uint64_t n) override { step_ = n; }
  // Evaluation: no LoRA dropout, and forward_count() does not advance (so
  // evaluating never changes the masks of later training steps).
  void set_training(bool training) override { training_ = training; }
  bool training() const override { return training_; }
  size_t activation_bytes() const { return acts_.capacity(); }

 private:
  void prepare(const LlamaBatch& batch);
  void layer_forward(int64_t l, const float* x, float* y, LayerActs& s);
  void layer_backward(int64_t l, const float* x, LayerActs& s);
  void project(float* out, const float* inp, const ops::LinearWeight& w, const float* bias, int64_t l,
               LoraTarget t, LayerActs& s);
  void project_backward(float* dinp, bool accumulate, const float* dout, const float* inp, const ops::LinearWeight& w,
                        const float* bias, int64_t l, LoraTarget t, const LayerActs& s);
  void dora_base_product(float* base, const float* result, const float* xd, const ops::LinearWeight& w,
                         const float* bias, bool dropout);
  void dora_backward(float* dinp, bool accumulate, const float* dout, const float* inp, const ops::LinearWeight& w,
                     const float* bias, int64_t l, LoraTarget t, const float* h, const float* wnorm, bool drop);
  LayerActs& acts_of(int64_t l) { return opt_.checkpointing ? layer_acts_[0] : layer_acts_[size_t(l)]; }
  // The attention mask of layer l: its first visible key per query.
  const int32_t* starts_of(int64_t l) const { return cfg_.attention_window(l) > 0 ? win_start_ : doc_start_; }
  uint64_t dropout_seed(int64_t l, LoraTarget t) const;

  const LlamaWeights& w_;
  LoraWeights* lora_;
  ModelConfig cfg_;
  LlamaRunOptions opt_;
  int64_t max_B_, max_T_;
  int64_t B_ = 0, T_ = 0, N_ = 0, n_targets_ = 0;
  float grad_scale_ = 0.0f;
  uint64_t step_ = 0;
  bool training_ = true;
  const int32_t* targets_ = nullptr;

  Arena acts_;
};

}  // namespace qlora
