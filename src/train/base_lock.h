// The base lock: an adapter is a delta to the exact base weights it was
// trained on; over another base it still loads (the shapes agree) but answers
// wrongly. `qlora run` records base_model_fingerprint (train/checkpoint.h) of
// its model in the adapter (adapter_model.safetensors' __metadata__, key
// kAdapterFingerprintKey), and every command that applies an adapter to a
// model (generate, chat, serve, eval, merge) checks it here first.
#pragma once

#include <filesystem>
#include <string>

namespace qlora {

// The fingerprint an adapter folder records; empty when it records none (an
// adapter made elsewhere, or by qlora before the lock). Errors name the file.
std::string adapter_base_fingerprint(const std::filesystem::path& adapter_dir);

// Checks an adapter against the model it is about to be applied to (model:
// what base_model_fingerprint takes: a folder or a GGUF file). An adapter
// recording another fingerprint throws, naming the adapter and both
// fingerprints, unless allow_other_base. Returns a warning for the caller to
// print (an adapter without a fingerprint, or another base allowed), else "".
std::string check_base_lock(const std::filesystem::path& adapter_dir, const std::filesystem::path& model,
                            bool allow_other_base);

// Same, with the model's fingerprint already computed (a server checking
// many adapters against one base fingerprints it once).
std::string check_base_lock_fingerprint(const std::filesystem::path& adapter_dir,
                                        const std::string& model_fingerprint, bool allow_other_base);

}  // namespace qlora
