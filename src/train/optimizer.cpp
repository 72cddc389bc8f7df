#include "train/optimizer.h"

#include <cmath>
#include <cstring>

#include "core/error.h"

namespace qlora {

namespace {

// Below this many elements the threads cost more than they save.
constexpr int64_t kParallelMin = int64_t(1) << 15;

// Lays out the state arena; the same code measures (a measuring arena) and
// builds it, so optimizer_state_bytes and the constructor cannot disagree.
void layout_state(const OptimizerConfig& c, size_t n, Arena& a, float** m, float** v) {
  switch (c.kind) {
    case OptimizerKind::adamw:
    case OptimizerKind::paged_adamw:
      *m = a.take<float>(n, "exp_avg");
      *v = a.take<float>(n, "exp_avg_sq");
      break;
    case OptimizerKind::sgd:
      if (c.momentum != 0.0) *m = a.take<float>(n, "momentum_buffer");
      break;
  }
}

void check_config(const OptimizerConfig& c) {
  const bool adam = c.kind != OptimizerKind::sgd;
  if (adam && !(c.beta1 >= 0.0 && c.beta1 < 1.0)) fail("optimizer: beta1 must be in [0, 1), got ", c.beta1);
  if (adam && !(c.beta2 >= 0.0 && c.beta2 < 1.0)) fail("optimizer: beta2 must be in [0, 1), got ", c.beta2);
  if (adam && !(c.eps >= 0.0)) fail("optimizer: eps must be >= 0, got ", c.eps);
  if (!(c.weight_decay >= 0.0)) fail("optimizer: weight_decay must be >= 0, got ", c.weight_decay);
  if (!(c.momentum >= 0.0)) fail("optimizer: momentum must be >= 0, got ", c.momentum);
  if (!(c.plus_lr_ratio > 0.0) || !std::isfinite(c.plus_lr_ratio))
    fail("optimizer: lora.plus_lr_ratio must be > 0, got ", c.plus_lr_ratio);
}

}  // namespace

OptimizerKind parse_optimizer_kind(std::string_view name) {
  if (name == "adamw") return OptimizerKind::adamw;
  if (name == "paged_adamw") return OptimizerKind::paged_adamw;
  if (name == "sgd") return OptimizerKind::sgd;
  fail("unknown optimizer \"", name, "\", expected one of: adamw, paged_adamw, sgd");
}

const char* optimizer_kind_name(OptimizerKind k) {
  switch (k) {
    case OptimizerKind::adamw:
      return "adamw";
    case OptimizerKind::paged_adamw:
      return "paged_adamw";
    case OptimizerKind::sgd:
      return "sgd";
  }
  return "?";
}

size_t optimizer_state_bytes(const OptimizerConfig& c, size_t n_params) {
  Arena measure;
  float *m = nullptr, *v = nullptr;
  layout_state(c, n_params, measure, &m, &v);
  return measure.used();
}

Optimizer::Optimizer(const OptimizerConfig& c, size_t n_params, std::vector<FlatRange> plus_ranges)
    : c_(c), n_(n_params), plus_(std::move(plus_ranges)), state_(optimizer_state_bytes(c, n_params), "optimizer state") {
  check_config(c);
  size_t prev = 0;
  for (const FlatRange& r : plus_) {
    if (r.begin < prev || r.end < r.begin || r.end > n_)
      fail("optimizer: LoRA+ ranges must be sorted, disjoint and inside the ", n_, " parameters");
    prev = r.end;
  }
  layout_state(c_, n_, state_, &m_, &v_);
}

// LoRA+ as PEFT's create_loraplus_optimizer builds it: one torch param group
// at lr (A) and one at lr * ratio (B, and 1-d parameters such as DoRA's
// magnitudes), both with the run's weight decay. Each group is the plain
// update at its own learning rate, so the ranges are stepped one by one.
void Optimizer::step(float* params, const float* grads, double lr) {
  const int64_t t = t_ + 1;  // torch increments the step before using it
  if (c_.plus_lr_ratio == 1.0 || plus_.empty()) {
    update(params, grads, 0, int64_t(n_), lr, t);
  } else {
    const double lr_b = lr * c_.plus_lr_ratio;
    size_t at = 0;
    for (const FlatRange& r : plus_) {
      if (r.begin > at) update(params, grads, int64_t(at), int64_t(r.begin), lr, t);
      update(params, grads, int64_t(r.begin), int64_t(r.end), lr_b, t);
      at = r.end;
    }
    if (at < n_) update(params, grads, int64_t(at), int64_t(n_), lr, t);
  }
  t_ = t;
}

// Every constant is rounded to fp32 once and every operation is done in fp32
// in the order of torch's single-tensor paths (torch turns a Python scalar
// into the tensor's dtype before the element loop), so the results match
// torch.optim within the few ulps that its vectorised FMAs contribute.
void Optimizer::update(float* params, const float* grads, int64_t lo, int64_t hi, double lr, int64_t t) {
  const int64_t n = hi - lo;
  params += lo;
  grads += lo;
  if (c_.kind == OptimizerKind::sgd) {
    const float wd = float(c_.weight_decay), mom = float(c_.momentum), neg_lr = float(-lr);
    const bool first = t == 1;  // torch initialises the buffer with the first d_p
    float* buf = m_ ? m_ + lo : nullptr;
#pragma omp parallel for schedule(static) if (n > kParallelMin)
    for (int64_t i = 0; i < n; ++i) {
      float d = grads[i];
      if (wd != 0.0f) d = d + wd * params[i];  // d_p.add(param, alpha=weight_decay)
      if (buf) {
        buf[i] = first ? d : buf[i] * mom + d;  // buf.mul_(momentum).add_(d_p) (dampening 0)
        d = buf[i];
      }
      params[i] = params[i] + neg_lr * d;  // param.add_(d_p, alpha=-lr)
    }
  } else {
    // adamw and paged_adamw (nothing pages on the CPU).
    const double bias_correction1 = 1.0 - std::pow(c_.beta1, double(t));
    const double bias_correction2 = 1.0 - std::pow(c_.beta2, double(t));
    const float decay = float(1.0 - lr * c_.weight_decay);
    const float b1 = float(c_.beta1), one_minus_b1 = float(1.0 - c_.beta1);
    const float b2 = float(c_.beta2), one_minus_b2 = float(1.0 - c_.beta2);
    const float neg_step_size = float(-(lr / bias_correction1));
    const float bc2_sqrt = float(std::sqrt(bias_correction2));
    const float eps = float(c_.eps);
    float* m = m_ + lo;
    float* v = v_ + lo;
#pragma omp parallel for schedule(static) if (n > kParallelMin)
    for (int64_t i = 0; i < n; ++i) {
      // torch: param.mul_(1 - lr * weight_decay)
      //        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
      //        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
      //        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
      //        param.addcdiv_(exp_avg, denom, value=-step_size)
      const float g = grads[i];
      float p = params[i] * decay;
      const float mi = m[i] * b1 + one_minus_b1 * g;
      const float vi = v[i] * b2 + one_minus_b2 * g * g;
      const float denom = std::sqrt(vi) / bc2_sqrt + eps;
      p = p + neg_step_size * mi / denom;
      m[i] = mi;
      v[i] = vi;
      params[i] = p;
    }
  }
}

std::vector<Optimizer::StateTensor> Optimizer::state() {
  std::vector<StateTensor> s;
  if (c_.kind == OptimizerKind::sgd) {
    if (m_) s.push_back({"momentum_buffer", m_, n_});
  } else {
    s.push_back({"exp_avg", m_, n_});
    s.push_back({"exp_avg_sq", v_, n_});
  }
  return s;
}

// Sums of squares over fixed blocks, added in block order: the result does not
// depend on the number of threads (an OpenMP reduction's combining order would).
double grad_norm(const float* grads, size_t n) {
  constexpr size_t kBlock = size_t(1) << 16;
  const int64_t blocks = int64_t((n + kBlock - 1) / kBlock);
  std::vector<double> partial(static_cast<size_t>(blocks), 0.0);
#pragma omp parallel for schedule(static) if (blocks > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const size_t lo = size_t(b) * kBlock, hi = std::min(n, lo + kBlock);
    double s = 0.0;
    for (size_t i = lo; i < hi; ++i) s += double(grads[i]) * double(grads[i]);
    partial[size_t(b)] = s;
  }
  double total = 0.0;
  for (double s : partial) total += s;
  return std::sqrt(total);
}

// As torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6) clamped
// to 1, applied as one fp32 multiplier. A coefficient of 1 changes nothing, so
// the multiply is skipped then; a non-finite norm scales by NaN as torch does
// with error_if_nonfinite=False (the trainer checks the returned norm).
double clip_grad_norm(float* grads, size_t n, double max_norm) {
  const double norm = grad_norm(grads, n);
  if (max_norm <= 0.0) return norm;
  const double coef = max_norm / (norm + 1e-6);
  if (coef >= 1.0) return norm;
  const float c = float(coef);
  const int64_t ni = int64_t(n);
#pragma omp parallel for schedule(static) if (ni > kParallelMin)
  for (int64_t i = 0; i < ni; ++i) grads[i] *= c;
  return norm;
}

}  // namespace qlora
