// Host-side query of the current device's attributes, for launchers that size grids or shared memory.
#pragma once

#include <cuda_runtime.h>

namespace moce {

// Attribute `attr` of the current device, or `fallback` when the query fails or answers <= 0 (the
// error is cleared, so the next launch's cudaGetLastError does not report it).
inline int device_attr(cudaDeviceAttr attr, int fallback) {
  int dev = 0, value = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&value, attr, dev) != cudaSuccess || value <= 0)
    value = fallback;
  cudaGetLastError();
  return value;
}

}  // namespace moce
