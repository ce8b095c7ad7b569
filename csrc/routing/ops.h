// Torch-facing declarations of the routing family (implemented in ops.cpp, registered by
// csrc/torch_bindings.cpp).
#pragma once
#include <torch/library.h>

namespace moce {
void register_routing(torch::Library& m);
}  // namespace moce
