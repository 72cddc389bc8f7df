#include "core/arena.h"

#include <cstdlib>

#include "core/error.h"

namespace qlora {

namespace {
size_t round_up(size_t n) { return (n + Arena::kAlign - 1) / Arena::kAlign * Arena::kAlign; }
}  // namespace

void Arena::Free::operator()(std::byte*) const { std::free(raw); }

Arena::Arena(size_t bytes, std::string_view name) : capacity_(round_up(bytes)), name_(name) {
  // calloc, not aligned_alloc + memset: a large block comes zeroed from the
  // kernel's zero pages, so a 35 GiB weight arena is not written once by one
  // thread before the loader (or the parallel random fill) writes it again.
  // Two extra alignment units: one to align by hand, one so a zero-byte arena
  // still owns a buffer (and so is not mistaken for a measuring one).
  void* raw = std::calloc(capacity_ + 2 * kAlign, 1);
  if (!raw) fail("arena ", name, ": cannot allocate ", capacity_, " bytes");
  const uintptr_t at = (reinterpret_cast<uintptr_t>(raw) + kAlign - 1) / kAlign * kAlign;
  data_ = std::unique_ptr<std::byte, Free>(reinterpret_cast<std::byte*>(at), Free{raw});
}

void* Arena::take_bytes(size_t bytes, std::string_view what) {
  const size_t at = used_;
  used_ += round_up(bytes);
  if (!data_) return nullptr;
  if (used_ > capacity_)
    fail("arena ", name_, ": ", what, " needs ", bytes, " bytes at offset ", at, " but the arena holds ", capacity_,
         " (layout differs from the one measured)");
  return data_.get() + at;
}

}  // namespace qlora
