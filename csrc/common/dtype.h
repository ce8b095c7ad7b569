// The element types of the kernels' big tensors (activations, weights, gradients): float, half and
// bfloat16, named by DType on the host; their conversion to and from the fp32 every kernel computes
// in; and MOCE_DISPATCH_FLOATING_TYPES, which runs a launcher body once per element type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>

// Conversions are host and device functions under nvcc, plain inline functions for a host compiler
// (the torch wrappers, the CPU emulation).
#ifdef __CUDACC__
#define MOCE_HOST_DEVICE_INLINE __host__ __device__ __forceinline__
#else
#define MOCE_HOST_DEVICE_INLINE inline
#endif

namespace moce {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Bytes per element.
inline size_t elem_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

MOCE_HOST_DEVICE_INLINE float to_f(float v) { return v; }
MOCE_HOST_DEVICE_INLINE float to_f(__half v) { return __half2float(v); }
MOCE_HOST_DEVICE_INLINE float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

// v rounded to nearest (even) in T.
template <typename T>
MOCE_HOST_DEVICE_INLINE T from_f(float v);
template <>
MOCE_HOST_DEVICE_INLINE float from_f<float>(float v) { return v; }
template <>
MOCE_HOST_DEVICE_INLINE __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
MOCE_HOST_DEVICE_INLINE __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

}  // namespace moce

// MOCE_DISPATCH_FLOATING_TYPES(dtype, [&] { ... scalar_t ... }): calls the lambda with scalar_t the
// element type that `dtype` (a moce::DType) names, and returns what it returns (a cudaError_t);
// cudaErrorInvalidValue for a value outside the enum. The form of PyTorch's AT_DISPATCH_* macros (as
// vLLM's dispatch_utils.h uses them), over the kernels' own, torch-free DType.
#define MOCE_DISPATCH_CASE(ENUM, TYPE, ...) \
  case ::moce::DType::ENUM: {               \
    using scalar_t = TYPE;                  \
    return __VA_ARGS__();                   \
  }

#define MOCE_DISPATCH_FLOATING_TYPES(DTYPE, ...)                 \
  [&]() -> cudaError_t {                                         \
    switch (DTYPE) {                                             \
      MOCE_DISPATCH_CASE(kFloat32, float, __VA_ARGS__)           \
      MOCE_DISPATCH_CASE(kFloat16, __half, __VA_ARGS__)          \
      MOCE_DISPATCH_CASE(kBFloat16, __nv_bfloat16, __VA_ARGS__)  \
    }                                                            \
    return cudaErrorInvalidValue;                                \
  }()
