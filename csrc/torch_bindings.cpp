// The one entry point of the CUDA extension moce_kernels._C: every op family registers its
// schemas and CUDA implementations into the `moce_C` torch library here.
#include <torch/extension.h>

#include "expert_conv/ops.h"
#include "routing/ops.h"
#include "window_attention/ops.h"

TORCH_LIBRARY(moce_C, m) {
  moce::register_window_attention(m);
  moce::register_expert_conv(m);
  moce::register_routing(m);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moce_kernels CUDA kernels; the ops live in torch.ops.moce_C";
}
