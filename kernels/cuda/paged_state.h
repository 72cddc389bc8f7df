// The paged optimizer (optimizer: paged_adamw): AdamW's m and v live in pinned
// host memory and visit the GPU one page at a time during a step, so the
// device holds two pages of state instead of 8 bytes per parameter. Explicit
// copies, never CUDA managed memory (docs: ../shared/DESIGN.md, "Paged
// optimizer").
//
// A step, for pages i = 0, 1, ... (slot i % 2 of the two device page buffers):
//   copy stream:    page-in i+1 | wait update i, page-out i | page-in i+2 | ...
//   compute stream: wait page-in i, optimizer_step on page i, record update i
// so page i+1 copies in (and page i-1 copies out) while page i is updated. The
// update is elementwise, so paging changes no bit: the result equals
// cuda_ops::optimizer_step over the whole array with device-resident state.
//
// Host-only header: compiles with g++ (C++20) and nvcc (C++17).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <type_traits>

#include "kernels/cuda/context.h"
#include "kernels/cuda/device.h"
#include "kernels/cuda/optim_cuda.h"
#include "plan/cuda_constants.h"

namespace qlora {

// AdamW state (m and v, fp32) of n params in pinned host memory (cudaHostAlloc), in pages of
// page_params params; during step() the pages move to two device page buffers on ctx.copy_stream(),
// double-buffered (page i+1 copies in while page i is updated on ctx.stream(), events order them),
// updated by optimizer_step, and copied back. Never CUDA managed memory.
//
// The state starts at zero (a fresh AdamW). It must be destroyed before ctx (its destructor waits
// for ctx's streams). The host arrays may be read or written (a checkpoint, a restore) only when no
// step is in flight: after ctx.synchronize().
class PagedAdamState {
 public:
  // The page size is the planner's (plan/cuda_constants.h), so the plan's device
  // bytes for the paged state are plan_cuda::paged_optimizer_device_bytes(n) == device_bytes().
  PagedAdamState(CudaContext& ctx, int64_t n, int64_t page_params = plan_cuda::kPagedOptimizerPageParams);
  ~PagedAdamState();
  PagedAdamState(const PagedAdamState&) = delete;
  PagedAdamState& operator=(const PagedAdamState&) = delete;

  // One AdamW update of master/param_bf16 (device, n) from grad (device, n), queued on
  // ctx.stream() (master, param_bf16 and grad are read and written in stream order there);
  // param_bf16 may be null. st.kind must be 0 (adamw).
  void step(float* master, uint16_t* param_bf16, const float* grad, const cuda_ops::OptimStep& st);

  // Host views of the state for checkpoints (valid after ctx.synchronize()).
  float* host_m() { return pinned_.get(); }
  float* host_v() { return pinned_.get() + n_; }
  int64_t size() const { return n_; }
  int64_t page_params() const { return page_; }
  size_t device_bytes() const { return slot_[0].bytes() + slot_[1].bytes(); }  // the two page buffers

 private:
  struct FreePinned {
    void operator()(float* p) const noexcept { (void)cudaFreeHost(p); }
  };
  struct DestroyEvent {
    void operator()(cudaEvent_t e) const noexcept { (void)cudaEventDestroy(e); }
  };
  using Event = std::unique_ptr<std::remove_pointer_t<cudaEvent_t>, DestroyEvent>;

  CudaContext& ctx_;
  int64_t n_ = 0;
  int64_t page_ = 0;                           // params per page (the last page may be shorter)
  int64_t page_cap_ = 0;                       // params one slot holds: min(page_, n_)
  std::unique_ptr<float, FreePinned> pinned_;  // 2 n floats: m, then v (null when n is 0)
  // Each slot holds one page: m in [0, page_cap_), v in [page_cap_, 2 page_cap_).
  DeviceBuffer<float> slot_[2];
  Event paged_in_[2];  // recorded on the copy stream: the slot's page has arrived
  Event updated_[2];   // recorded on the compute stream: the slot's page is updated
};

}  // namespace qlora
