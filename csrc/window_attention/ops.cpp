// Torch-facing wrappers of the window_attention kernels: input checks, allocation, launch on the current stream.
#include "window_attention/ops.h"

namespace moce {
void register_window_attention(torch::Library& m) {}
}  // namespace moce
