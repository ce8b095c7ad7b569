// Torch-facing declarations of the window_attention family (implemented in ops.cpp, registered by
// csrc/torch_bindings.cpp).
#pragma once
#include <torch/library.h>

namespace moce {
void register_window_attention(torch::Library& m);
}  // namespace moce
