// Probe kernels for tests/test_device_math.py: the device math of common/device_math.cuh on a float
// array, compiled for the CPU emulation (torch-free, loaded with ctypes).
#include <cuda_runtime.h>

#include "common/device_math.cuh"

namespace {

// out[i] = f(x[i]) for f = gelu_f (which = 0) or gelu16_f (which = 1)
__global__ void gelu_kernel(const float* x, float* out, int n, int which) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = which == 0 ? moce::gelu_f(x[i]) : moce::gelu16_f(x[i]);
}

}  // namespace

extern "C" int probe_gelu(const float* x, float* out, int n, int which) {
  gelu_kernel<<<(n + 255) / 256, 256>>>(x, out, n, which);
  return static_cast<int>(cudaGetLastError());
}
