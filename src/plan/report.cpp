// The plan as a table by category, as JSON (same content), the advice as
// text, and planned vs measured for the end of a run.
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "plan/plan.h"

namespace qlora {

namespace {

// Binary units (KiB, MiB, GiB), two decimals.
std::string human(uint64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = double(bytes);
  int u = 0;
  while (v >= 1024.0 && u < 4) {
    v /= 1024.0;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.2f %s", v, units[u]);
  return buf;
}

std::string pad(std::string s, size_t w) {
  if (s.size() < w) s.append(w - s.size(), ' ');
  return s;
}
std::string lpad(const std::string& s, size_t w) {
  return s.size() < w ? std::string(w - s.size(), ' ') + s : s;
}

std::string settings_line(const PlanInput& in) {
  int n_targets = 0;
  for (bool t : in.lora.targets) n_targets += t ? 1 : 0;
  return str(
      "micro_batch ", in.micro_batch, " x seq_len ", in.seq_len, ", LoRA r ", in.lora.rank, " on ", n_targets,
      "/", kNumLoraTargets, " target modules, ",
      in.quantize ? str(quant4_name(in.quant_type), " block ", in.block,
                        in.double_quant ? " double-quant" : "", in.prequantized ? " (4-bit checkpoint)" : "")
                  : std::string("not quantized"),
      ", ", optimizer_kind_name(in.optimizer.kind), ", checkpointing ", in.checkpointing ? "on" : "off",
      in.checkpointing_auto ? " (auto)" : "");
}

// Categories in table order.
const char* const kCategories[] = {"base weights", "LoRA",    "optimizer", "activations",
                                   "workspace",    "runtime", "host"};

}  // namespace

std::string plan_table(const MemoryPlan& p) {
  const PlanInput& in = p.input;
  const bool cpu = in.backend == PlanBackend::cpu;
  std::string o = str("Memory plan: ", in.model_name.empty() ? std::string("model") : in.model_name, " on ",
                      plan_backend_name(in.backend), cpu ? " (device memory = RAM)" : "", "\n  ",
                      settings_line(in), "\n  ", p.lora_params, " trainable LoRA parameters\n\n");
  o += str("  ", pad("buffer", 44), pad("dtype", 7), pad("lifetime", 12), pad("place", 21), lpad("bytes", 12),
           "\n");
  for (const char* cat : kCategories) {
    uint64_t sub = 0;
    bool any = false;
    for (const PlanBuffer& b : p.buffers)
      if (b.category == cat) {
        if (!any) o += str("  ", cat, "\n");
        any = true;
        sub += b.bytes;
        o += str("    ", pad(b.name, 42), pad(b.dtype, 7), pad(lifetime_name(b.lifetime), 12),
                 pad(place_name(cpu ? Place::host : b.place), 21), lpad(human(b.bytes), 12), "\n");
      }
    if (any) o += str("    ", pad(str("subtotal ", cat), 82), lpad(human(sub), 12), "\n");
  }
  o += "\n";
  const std::string dev = cpu ? "RAM total" : "device total";
  o += str("  ", pad(dev, 14), human(p.device_bytes), " (", p.device_bytes, " bytes)");
  if (in.budget_bytes > 0)
    o += str(" of ", human(in.budget_bytes), " budget (",
             int(100.0 * double(p.device_bytes) / double(in.budget_bytes)), "%)");
  o += "\n";
  if (!cpu) {
    o += str("  ", pad("pinned host", 14), human(p.pinned_host_bytes), "\n");
    o += str("  ", pad("host", 14), human(p.host_bytes), "\n");
  }
  o += str("  ", pad("verdict", 14), verdict_name(p.verdict));
  if (p.verdict == Verdict::fits || p.verdict == Verdict::fits_with_paging)
    o += str(" (", human(in.budget_bytes - p.device_bytes), " to spare)");
  else if (p.verdict == Verdict::does_not_fit)
    o += str(" (", human(p.device_bytes - in.budget_bytes), " over)");
  else
    o += " (give --gpu NAME|SIZE or device.memory_budget)";
  o += "\n";
  return o;
}

std::string advice_text(const MemoryPlan& p, const PlanAdvice& a) {
  const PlanInput& in = p.input;
  std::string o = "Advice:\n";
  if (in.budget_bytes > 0) {
    o += a.max_micro_batch > 0
             ? str("  largest micro_batch that fits at seq_len ", in.seq_len, ": ", a.max_micro_batch,
                   a.max_micro_batch == kAdviceMaxMicroBatch ? " or more" : "", "\n")
             : str("  no micro_batch fits at seq_len ", in.seq_len, "\n");
    o += a.max_seq_len > 0
             ? str("  longest seq_len that fits at micro_batch ", in.micro_batch, ": ", a.max_seq_len,
                   a.max_seq_len == max_seq_len(in) ? " (the model's limit)" : "", "\n")
             : str("  no seq_len fits at micro_batch ", in.micro_batch, "\n");
  }
  for (const PlanSwitch& s : a.switches) {
    const std::string amount = s.saved_bytes >= 0 ? str("saves ", human(uint64_t(s.saved_bytes)))
                                                  : str("costs ", human(uint64_t(-s.saved_bytes)));
    std::string verdict;
    if (in.budget_bytes > 0) verdict = s.fits_after ? "-> fits" : "-> does not fit";
    o += str("  ", pad(s.name, 20), pad(amount, 20), pad(verdict, 17), s.change, "\n");
  }
  return o;
}

nlohmann::json plan_json(const MemoryPlan& p) {
  const PlanInput& in = p.input;
  nlohmann::json targets = nlohmann::json::array();
  for (int t = 0; t < kNumLoraTargets; ++t)
    if (in.lora.targets[size_t(t)]) targets.push_back(std::string(lora_target_module(LoraTarget(t))));
  nlohmann::json j;
  j["model"] = in.model_name;
  j["backend"] = plan_backend_name(in.backend);
  j["settings"] = {{"micro_batch", in.micro_batch},
                   {"seq_len", in.seq_len},
                   {"lora_rank", in.lora.rank},
                   {"lora_targets", targets},
                   {"quant", in.quantize ? std::string(quant4_name(in.quant_type)) : std::string("none")},
                   {"block_size", in.block},
                   {"double_quant", in.double_quant},
                   {"prequantized", in.prequantized},
                   {"optimizer", optimizer_kind_name(in.optimizer.kind)},
                   {"checkpointing", in.checkpointing},
                   {"checkpointing_auto", in.checkpointing_auto},
                   {"dataset_tokens", in.dataset_tokens}};
  j["lora_params"] = p.lora_params;
  nlohmann::json bufs = nlohmann::json::array();
  std::map<std::string, uint64_t> by_cat;
  for (const PlanBuffer& b : p.buffers) {
    bufs.push_back({{"category", b.category},
                    {"name", b.name},
                    {"bytes", b.bytes},
                    {"dtype", b.dtype},
                    {"lifetime", lifetime_name(b.lifetime)},
                    {"place", place_name(in.backend == PlanBackend::cpu ? Place::host : b.place)},
                    {"note", b.note}});
    by_cat[b.category] += b.bytes;
  }
  j["buffers"] = bufs;
  j["by_category"] = by_cat;
  j["device_bytes"] = p.device_bytes;
  j["pinned_host_bytes"] = p.pinned_host_bytes;
  j["host_bytes"] = p.host_bytes;
  j["budget_bytes"] = in.budget_bytes;
  j["verdict"] = verdict_name(p.verdict);
  if (in.backend == PlanBackend::cpu)
    j["cpu_arenas"] = {{"weights", p.arenas.weights},         {"lora_params", p.arenas.lora_params},
                       {"lora_grads", p.arenas.lora_grads},   {"optimizer", p.arenas.optimizer},
                       {"activations", p.arenas.activations}, {"total", p.arenas.total()}};
  return j;
}

nlohmann::json advice_json(const PlanAdvice& a) {
  nlohmann::json sw = nlohmann::json::array();
  for (const PlanSwitch& s : a.switches)
    sw.push_back({{"name", s.name},
                  {"change", s.change},
                  {"saved_bytes", s.saved_bytes},
                  {"fits_after", s.fits_after}});
  return {{"max_micro_batch", a.max_micro_batch}, {"max_seq_len", a.max_seq_len}, {"switches", sw}};
}

std::string plan_vs_measured_text(const MemoryPlan& p, const CpuArenas& m) {
  const CpuArenas& q = p.arenas;
  std::string o = str("Memory: planned vs measured (arenas)\n");
  auto line = [&](const char* name, uint64_t planned, uint64_t measured) {
    o += str("  ", pad(name, 16), lpad(human(planned), 12), lpad(human(measured), 12),
             planned == measured ? "  exact"
                                 : str("  differs by ", int64_t(measured) - int64_t(planned), " bytes"),
             "\n");
  };
  line("base weights", q.weights, m.weights);
  line("LoRA weights", q.lora_params, m.lora_params);
  line("LoRA gradients", q.lora_grads, m.lora_grads);
  line("optimizer", q.optimizer, m.optimizer);
  line("activations", q.activations, m.activations);
  line("total", q.total(), m.total());
  return o;
}

}  // namespace qlora
