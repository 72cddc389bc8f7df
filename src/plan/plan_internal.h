// Shared by the planner's source files; not part of the API (plan/plan.h).
#pragma once

#include <cstdint>
#include <string>

#include "plan/plan.h"

namespace qlora::plan_detail {

// Trainable LoRA parameters (no alignment padding).
uint64_t lora_param_count(const ModelConfig& cfg, const LoraConfig& lc);

// Appends one buffer to the plan.
void add(MemoryPlan& p, std::string category, std::string name, uint64_t bytes, std::string dtype,
         Lifetime lifetime, Place place, std::string note);

// The buffers of each device model (plan_cpu.cpp, plan_cuda.cpp).
void add_cpu_buffers(MemoryPlan& p);
void add_cuda_buffers(MemoryPlan& p);
// The tokenized dataset in host memory (both backends).
void add_dataset_buffer(MemoryPlan& p);

}  // namespace qlora::plan_detail
