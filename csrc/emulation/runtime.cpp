// The few CUDA runtime calls the kernels' host code makes, for the CPU emulation (emu/device.h):
// launch errors, memset, the dynamic shared memory opt-in. Everything runs synchronously.
#include <cstdlib>
#include <cstring>

#include "emu/device.h"

extern "C" {

cudaError_t CUDARTAPI cudaGetLastError(void) {
  const cudaError_t e = emu::g_last_error;
  emu::g_last_error = cudaSuccess;
  return e;
}

cudaError_t CUDARTAPI cudaPeekAtLastError(void) { return emu::g_last_error; }

const char* CUDARTAPI cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument (emulated launch)";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (emulated launch)";
    default: return "CUDA error (emulated)";
  }
}

cudaError_t CUDARTAPI cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
  std::memset(ptr, value, count);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > emu::kMaxDynSmem) return cudaErrorInvalidValue;
    for (auto& [f, n] : emu::smem_optin())
      if (f == func) {
        n = static_cast<size_t>(value);
        return cudaSuccess;
      }
    emu::smem_optin().emplace_back(func, static_cast<size_t>(value));
  }
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

// A small emulated GPU (MOCE_EMU_SMS multiprocessors, default 2), so that launch heuristics that
// adapt to the SM count take their small-grid branches on test-sized inputs too.
cudaError_t CUDARTAPI cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int) {
  if (attr == cudaDevAttrMultiProcessorCount) {
    const char* s = std::getenv("MOCE_EMU_SMS");
    *value = s != nullptr ? std::atoi(s) : 2;
    return cudaSuccess;
  }
  if (attr == cudaDevAttrMaxSharedMemoryPerMultiprocessor) {  // sm_90's
    *value = 233472;
    return cudaSuccess;
  }
  if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) {  // sm_90's, or MOCE_EMU_SMEM_OPTIN (bytes): a smaller
    const char* s = std::getenv("MOCE_EMU_SMEM_OPTIN");   // GPU, for the launchers' fallbacks
    *value = s != nullptr ? std::atoi(s) : static_cast<int>(emu::kMaxDynSmem);
    return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t CUDARTAPI cudaDeviceSynchronize(void) { return cudaSuccess; }
cudaError_t CUDARTAPI cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

}  // extern "C"
