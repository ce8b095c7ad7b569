// Torch-facing wrappers of the routing kernels: input checks, allocation, launch on the current stream.
#include "routing/ops.h"

namespace moce {
void register_routing(torch::Library& m) {}
}  // namespace moce
