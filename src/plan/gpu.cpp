// GPU names -> memory sizes, and this machine's RAM. Sizes are what the card
// reports as total memory, rounded as the vendor names it: the consumer and
// workstation cards and the A100/H100 have 24, 40, 48 or 80 GiB (2^30); the
// H200 is sold as 141 GB, which we take as 141e9 bytes (decimal, as NVIDIA
// writes it). The CUDA context and the driver's share come out of it in the
// plan (plan/cuda_constants.h).
#include <unistd.h>

#include <cctype>

#include "core/error.h"
#include "plan/plan.h"
#include "recipe/byte_size.h"

namespace qlora {

namespace {
constexpr uint64_t kGiB = uint64_t(1) << 30;
}  // namespace

std::vector<std::pair<std::string, uint64_t>> gpu_table() {
  return {{"rtx3090", 24 * kGiB}, {"rtx4090", 24 * kGiB},       {"a6000", 48 * kGiB},
          {"l40s", 48 * kGiB},    {"a100-40", 40 * kGiB},       {"a100-80", 80 * kGiB},
          {"h100-80", 80 * kGiB}, {"h200-141", 141000000000ull}};
}

uint64_t gpu_memory_bytes(std::string_view name_or_size) {
  std::string lower(name_or_size);
  for (char& c : lower) c = char(std::tolower(static_cast<unsigned char>(c)));
  for (const auto& [name, bytes] : gpu_table())
    if (lower == name) return bytes;
  if (const auto size = parse_byte_size(name_or_size)) {
    if (*size == 0) fail("memory size '", name_or_size, "' is zero");
    return *size;
  }
  std::string known;
  for (const auto& [name, bytes] : gpu_table()) known += str(known.empty() ? "" : ", ", name);
  fail("unknown GPU or memory size '", name_or_size, "'; known GPUs: ", known,
       "; or a size such as 24GiB, 48GB, 80000MiB");
}

uint64_t host_memory_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page > 0 ? uint64_t(pages) * uint64_t(page) : 0;
}

}  // namespace qlora
