// The device the torch wrappers (csrc/*/ops.cpp) run their kernels on, and define_op, which registers
// an op's kernel there: CUDA in the real extension; the CPU when the kernels are compiled for the CPU
// emulation (MOCE_CUDA_EMULATION, see csrc/emulation/include/emu/device.h), so that CI runs the same
// wrappers and kernels without a GPU.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <string>

#ifndef MOCE_CUDA_EMULATION
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace moce {

#ifndef MOCE_CUDA_EMULATION
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CUDA;
using DeviceGuard = c10::cuda::OptionalCUDAGuard;
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
// The current stream of device `d` (the caller holds a DeviceGuard for it).
inline cudaStream_t current_stream(const c10::Device& d) { return c10::cuda::getCurrentCUDAStream(d.index()).stream(); }
#else
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CPU;
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }
inline cudaStream_t current_stream(const c10::Device&) { return nullptr; }
#endif

// Defines the op of `schema` ("name(args) -> returns") in m, with fn its kernel on the kernels' device.
template <typename Fn>
void define_op(torch::Library& m, const char* schema, Fn* fn) {
  const std::string s(schema);
  m.def(schema);
  m.impl(s.substr(0, s.find('(')).c_str(), kKernelDevice, fn);
}

}  // namespace moce
