#include "core/arena.h"

#include <cstdlib>

#include "core/error.h"

namespace qlora {

namespace {
size_t round_up(size_t n) { return (n + Arena::kAlign - 1) / Arena::kAlign * Arena::kAlign; }
}  // namespace

void Arena::Free::operator()(std::byte* p) const { std::free(p); }

Arena::Arena(size_t bytes, std::string_view name) : capacity_(round_up(bytes)), name_(name) {
  // One extra alignment unit so a zero-byte arena still owns a buffer (and so
  // is not mistaken for a measuring one).
  void* p = std::aligned_alloc(kAlign, capacity_ + kAlign);
  if (!p) fail("arena ", name, ": cannot allocate ", capacity_, " bytes");
  std::memset(p, 0, capacity_ + kAlign);
  data_.reset(static_cast<std::byte*>(p));
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
