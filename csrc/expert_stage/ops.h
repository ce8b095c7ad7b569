// Torch-facing declarations of the expert-stage family (implemented in ops.cpp, registered by
// csrc/torch_bindings.cpp).
#pragma once
#include <torch/library.h>

namespace moce {
void register_expert_stage(torch::Library& m);
}  // namespace moce
