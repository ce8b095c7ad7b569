// Torch-facing declarations of the grouped-convolution family (implemented in ops.cpp, registered by
// csrc/torch_bindings.cpp).
#pragma once
#include <torch/library.h>

namespace moce {
void register_grouped_conv(torch::Library& m);
}  // namespace moce
