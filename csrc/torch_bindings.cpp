// The one entry point of the CUDA extension moce_kernels._C: every op family registers its
// schemas and CUDA implementations into the `moce_C` torch library here. The Python module itself
// is empty (the ops live in torch.ops.moce_C), so it is made with the bare C API: no pybind11 and
// no <torch/extension.h>, which alone takes most of a minute to compile.
#include <Python.h>
#include <torch/library.h>

#include "expert_stage/ops.h"
#include "grouped_conv/ops.h"
#include "routing/ops.h"
#include "window_attention/ops.h"

TORCH_LIBRARY(moce_C, m) {
  moce::register_window_attention(m);
  moce::register_grouped_conv(m);
  moce::register_expert_stage(m);
  moce::register_routing(m);
}

#define MOCE_STR_(x) #x
#define MOCE_STR(x) MOCE_STR_(x)
#define MOCE_CONCAT_(a, b) a##b
#define MOCE_CONCAT(a, b) MOCE_CONCAT_(a, b)

PyMODINIT_FUNC MOCE_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, MOCE_STR(TORCH_EXTENSION_NAME),
                               "moce_kernels CUDA kernels; the ops live in torch.ops.moce_C", -1, nullptr};
  return PyModule_Create(&module);
}
