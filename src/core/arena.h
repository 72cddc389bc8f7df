// One allocation with named views into it (llm.c's "all parameters in one
// buffer"). An arena is laid out twice by the same code: first in measuring
// mode (take() hands out nullptr and only counts bytes), then for real in a
// buffer of exactly the measured size. So the size is known before anything
// is allocated and no allocation happens later (e.g. inside a step).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>

namespace qlora {

class Arena {
 public:
  static constexpr size_t kAlign = 64;  // a cache line; also enough for any SIMD load

  // A measuring arena: take() returns nullptr and only adds up sizes.
  Arena() = default;
  // A real arena of `bytes` bytes (zeroed). `name` appears in errors.
  Arena(size_t bytes, std::string_view name);

  Arena(Arena&&) noexcept = default;
  Arena& operator=(Arena&&) noexcept = default;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  bool measuring() const { return !data_; }
  // n elements of T, aligned to kAlign. Throws qlora::Error naming the arena
  // and `what` if a real arena would overflow (a layout that differs from the
  // one measured: a bug, reported rather than corrupting memory).
  template <typename T>
  T* take(size_t n, std::string_view what) {
    return static_cast<T*>(take_bytes(n * sizeof(T), what));
  }
  size_t used() const { return used_; }
  std::byte* data() { return data_.get(); }
  const std::byte* data() const { return data_.get(); }
  size_t capacity() const { return capacity_; }
  // Zero bytes [0, used()): e.g. all gradients in one memset.
  void zero() {
    if (data_) std::memset(data_.get(), 0, used_);
  }
  // Forget every view, keep the buffer (the next layout reuses it).
  void reset() { used_ = 0; }

 private:
  void* take_bytes(size_t bytes, std::string_view what);
  struct Free {
    void* raw;  // what calloc returned (data_ is aligned within it); value-initialized: null
    void operator()(std::byte* p) const;
  };
  std::unique_ptr<std::byte, Free> data_;
  size_t capacity_ = 0;
  size_t used_ = 0;
  std::string name_ = "arena";
};

}  // namespace qlora
