// The rows of a batch grouped by expert, as every grouped-convolution and expert-stage launch takes
// them (torch-free; the torch wrappers fill it once per op with Checks::group, common/torch_checks.h).
#pragma once

#include <cstdint>

#include "common/expert_stage_meta.h"

namespace moce {

// Row n of the batch belongs to expert e with offsets[e] <= n < offsets[e+1] (expert_of in
// common/device_math.cuh). meta is an int64 (E, moce_meta::kRowWidth) table of per-expert sizes, weight
// offsets (into one packed weight buffer) and buffer bases, one row per expert, built by
// moce_kernels/expert_stage/driver.py; each kernel has its own table, whose columns
// common/expert_stage_meta.h names (generated from moce_kernels/expert_stage/layouts.py). A routed row
// reads its input from source row perm[n] / kslots (perm null: row n). All three are device tensors,
// read on the device only: grids never depend on the routing.
struct GroupArgs {
  const int64_t* offsets;  // (E + 1,)
  const int64_t* meta;     // (E, moce_meta::kRowWidth)
  const int64_t* perm;     // (N,) slot ids, or null
  int64_t kslots;          // slots per source row (perm[n] / kslots is its source row)
  int E;
};

}  // namespace moce
