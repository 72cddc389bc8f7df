// The bounded queue in front of the generators: at most `slots` generations
// run at once (one per preallocated generator), at most `queue` more wait for
// one; a request beyond that is refused at once (429) instead of piling up.
// Thread-safe; the HTTP threads block in acquire() while they wait.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <optional>
#include <vector>

namespace qlora {

class Admission {
 public:
  Admission(int slots, int queue);

  // A place in line, held from admission to the end of the generation.
  class Ticket {
   public:
    Ticket() = default;
    Ticket(Ticket&& o) noexcept : a_(o.a_), slot_(o.slot_) { o.a_ = nullptr; }
    Ticket& operator=(Ticket&&) = delete;
    Ticket(const Ticket&) = delete;
    ~Ticket();
    // Waits for a free slot and returns its index; nullopt when the server is
    // shutting down first (the request is then answered 503).
    std::optional<int> acquire();

   private:
    friend class Admission;
    explicit Ticket(Admission* a) : a_(a) {}
    Admission* a_ = nullptr;
    int slot_ = -1;
  };

  // A ticket, or nullopt when slots + queue are all taken or after shutdown().
  std::optional<Ticket> try_enter();
  // Refuses new requests and wakes every waiter (acquire -> nullopt); running
  // generations finish.
  void shutdown();
  bool shutting_down() const;

  struct Counts {
    int running = 0, waiting = 0;
  };
  Counts counts() const;
  int slots() const { return int(free_.size()); }
  int queue() const { return queue_; }

 private:
  mutable std::mutex m_;
  std::condition_variable cv_;
  std::vector<bool> free_;
  int queue_, running_ = 0, waiting_ = 0;
  bool shutdown_ = false;
};

}  // namespace qlora
