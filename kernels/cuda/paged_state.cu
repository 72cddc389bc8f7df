// The paged AdamW state (kernels/cuda/paged_state.h).
//
// Why the event pattern below is race-free, per slot k (pages i, i+2, ... use it):
//  - the update of page i waits for paged_in_[k] as recorded by page i's copy-in
//    (cudaStreamWaitEvent captures the latest record at the time of the call;
//    the next record of paged_in_[k], by page i+2's copy-in, is queued later);
//  - page i's copy-out waits for updated_[k] of page i, and page i+2's copy-in
//    into the same slot is queued after that copy-out on the same (in-order)
//    copy stream, so a slot is never overwritten while a kernel reads it;
//  - the next step's copy-ins read host pages after this step's copy-outs on
//    that same stream.
// master, param_bf16 and grad are only touched on the compute stream, in the
// caller's stream order.
#include "kernels/cuda/paged_state.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "core/error.h"
#include "kernels/cuda/common.cuh"

namespace qlora {

using namespace cuda_detail;

PagedAdamState::PagedAdamState(CudaContext& ctx, int64_t n, int64_t page_params)
    : ctx_(ctx), n_(n), page_(page_params) {
  const char* fn = "PagedAdamState";
  if (n < 0) fail(fn, ": parameter count ", n, " is negative");
  if (n > INT64_MAX / int64_t(2 * sizeof(float))) fail(fn, ": parameter count ", n, " is too large");
  if (page_params < 1) fail(fn, ": page size ", page_params, " must be at least 1 parameter");
  page_cap_ = std::min(page_, n_);
  for (int k = 0; k < 2; ++k) {
    cudaEvent_t e = nullptr;
    QLORA_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    paged_in_[k].reset(e);
    QLORA_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    updated_[k].reset(e);
  }
  if (n_ == 0) return;
  const size_t bytes = size_t(2) * size_t(n_) * sizeof(float);
  void* p = nullptr;
  QLORA_CUDA_CHECK(cudaHostAlloc(&p, bytes, cudaHostAllocDefault));
  pinned_.reset(static_cast<float*>(p));
  std::memset(p, 0, bytes);  // a fresh AdamW: m = v = 0 (+0.0f is all zero bits)
  for (auto& slot : slot_) slot = DeviceBuffer<float>(size_t(2) * size_t(page_cap_));
}

PagedAdamState::~PagedAdamState() {
  // Copies and kernels of the last step may still use the pinned pages and the
  // slots; errors are ignored (a destructor must not throw, and a failed step
  // has reported its error).
  (void)cudaStreamSynchronize(ctx_.copy_stream());
  (void)cudaStreamSynchronize(ctx_.stream());
}

void PagedAdamState::step(float* master, uint16_t* param_bf16, const float* grad,
                          const cuda_ops::OptimStep& st) {
  const char* fn = "PagedAdamState::step";
  if (st.kind != 0) fail(fn, ": the paged state is AdamW's (kind 0), got kind ", st.kind);
  check_pointer(fn, master, "master", n_);
  check_pointer(fn, grad, "grad", n_);
  // An empty update validates the hyperparameters (and t) with optimizer_step's
  // own checks before any page moves; it launches nothing.
  cuda_ops::optimizer_step(master, param_bf16, grad, nullptr, nullptr, 0, st, ctx_.stream());
  if (n_ == 0) return;

  const cudaStream_t copy = ctx_.copy_stream(), compute = ctx_.stream();
  // Not (n_ + page_ - 1) / page_: that overflows for a page size near INT64_MAX ("one page").
  const int64_t pages = n_ / page_ + (n_ % page_ != 0 ? 1 : 0);
  float* const hm = host_m();
  float* const hv = host_v();
  auto first_of = [&](int64_t i) { return i * page_; };
  auto count_of = [&](int64_t i) { return std::min(page_, n_ - i * page_); };
  auto slot_m = [&](int64_t i) { return slot_[i % 2].data(); };
  auto slot_v = [&](int64_t i) { return slot_[i % 2].data() + page_cap_; };

  auto page_in = [&](int64_t i) {
    const size_t bytes = size_t(count_of(i)) * sizeof(float);
    QLORA_CUDA_CHECK(cudaMemcpyAsync(slot_m(i), hm + first_of(i), bytes, cudaMemcpyHostToDevice, copy));
    QLORA_CUDA_CHECK(cudaMemcpyAsync(slot_v(i), hv + first_of(i), bytes, cudaMemcpyHostToDevice, copy));
    QLORA_CUDA_CHECK(cudaEventRecord(paged_in_[i % 2].get(), copy));
  };

  page_in(0);
  for (int64_t i = 0; i < pages; ++i) {
    // Queued before page i's copy-out, so it runs while page i is updated.
    if (i + 1 < pages) page_in(i + 1);
    const int64_t off = first_of(i), cnt = count_of(i);
    QLORA_CUDA_CHECK(cudaStreamWaitEvent(compute, paged_in_[i % 2].get(), 0));
    cuda_ops::OptimStep page_st = st;
    page_st.base = st.base + off;  // LoRA+ ranges are in whole-array indices
    cuda_ops::optimizer_step(master + off, param_bf16 != nullptr ? param_bf16 + off : nullptr, grad + off,
                             slot_m(i), slot_v(i), cnt, page_st, compute);
    QLORA_CUDA_CHECK(cudaEventRecord(updated_[i % 2].get(), compute));
    QLORA_CUDA_CHECK(cudaStreamWaitEvent(copy, updated_[i % 2].get(), 0));
    const size_t bytes = size_t(cnt) * sizeof(float);
    QLORA_CUDA_CHECK(cudaMemcpyAsync(hm + off, slot_m(i), bytes, cudaMemcpyDeviceToHost, copy));
    QLORA_CUDA_CHECK(cudaMemcpyAsync(hv + off, slot_v(i), bytes, cudaMemcpyDeviceToHost, copy));
  }
}

}  // namespace qlora
