#include "train/base_lock.h"

#include "core/error.h"
#include "io/safetensors.h"
#include "train/checkpoint.h"
#include "train/peft_adapter.h"

namespace qlora {

std::string adapter_base_fingerprint(const std::filesystem::path& adapter_dir) {
  const SafetensorsFile m(adapter_dir / "adapter_model.safetensors");
  const auto& md = m.metadata();
  const auto it = md.find(kAdapterFingerprintKey);
  return it == md.end() ? std::string() : it->second;
}

std::string check_base_lock_fingerprint(const std::filesystem::path& adapter_dir,
                                        const std::string& model_fingerprint, bool allow_other_base) {
  const std::string have = adapter_base_fingerprint(adapter_dir);
  if (have.empty())
    return str("warning: adapter ", adapter_dir.string(),
               " records no base fingerprint (made elsewhere, or by an older qlora): it cannot be checked "
               "against this base model (",
               model_fingerprint, ")");
  if (have == model_fingerprint) return {};
  if (!allow_other_base)
    fail("adapter ", adapter_dir.string(), " was trained on another base model (fingerprint ", have,
         ", this model ", model_fingerprint, "); pass --allow-other-base to apply it anyway");
  return str("warning: adapter ", adapter_dir.string(), " was trained on another base model (fingerprint ",
             have, ", this model ", model_fingerprint, "); applied anyway (--allow-other-base)");
}

std::string check_base_lock(const std::filesystem::path& adapter_dir, const std::filesystem::path& model,
                            bool allow_other_base) {
  return check_base_lock_fingerprint(adapter_dir, base_model_fingerprint(model), allow_other_base);
}

}  // namespace qlora
