#include "serve/admission.h"

#include "core/error.h"

namespace qlora {

Admission::Admission(int slots, int queue) : free_(size_t(slots > 0 ? slots : 0), true), queue_(queue) {
  if (slots < 1) fail("concurrent generations must be at least 1, got ", slots);
  if (queue < 0) fail("queue length must be at least 0, got ", queue);
}

std::optional<Admission::Ticket> Admission::try_enter() {
  std::lock_guard lock(m_);
  if (shutdown_ || running_ + waiting_ >= int(free_.size()) + queue_) return std::nullopt;
  ++waiting_;
  return Ticket(this);
}

std::optional<int> Admission::Ticket::acquire() {
  if (!a_ || slot_ >= 0) return slot_ >= 0 ? std::optional<int>(slot_) : std::nullopt;
  std::unique_lock lock(a_->m_);
  int found = -1;
  a_->cv_.wait(lock, [&] {
    if (a_->shutdown_) return true;
    for (size_t i = 0; i < a_->free_.size(); ++i)
      if (a_->free_[i]) {
        found = int(i);
        return true;
      }
    return false;
  });
  if (a_->shutdown_ && found < 0) return std::nullopt;
  a_->free_[size_t(found)] = false;
  --a_->waiting_;
  ++a_->running_;
  slot_ = found;
  return slot_;
}

Admission::Ticket::~Ticket() {
  if (!a_) return;
  {
    std::lock_guard lock(a_->m_);
    if (slot_ >= 0) {
      a_->free_[size_t(slot_)] = true;
      --a_->running_;
    } else {
      --a_->waiting_;
    }
  }
  a_->cv_.notify_all();
}

void Admission::shutdown() {
  {
    std::lock_guard lock(m_);
    shutdown_ = true;
  }
  cv_.notify_all();
}

bool Admission::shutting_down() const {
  std::lock_guard lock(m_);
  return shutdown_;
}

Admission::Counts Admission::counts() const {
  std::lock_guard lock(m_);
  return {running_, waiting_};
}

}  // namespace qlora
