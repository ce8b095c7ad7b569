// Device helpers shared by the expert_conv kernel files: dtype conversion, the expert of a row,
// the exact GELU and its derivative, sigmoid, a warp sum, an opaque pointer, and the host-side dtype
// dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "expert_conv/kernels.h"

namespace moce {
namespace expert_conv {

// The bits of an element type, for copies that need no conversion (a 16-bit zero is then just a zero
// register; fp32 0.0f is all-zero bits too).
template <typename T> struct RawBits { using type = unsigned short; };
template <> struct RawBits<float> { using type = unsigned int; };

// p, hidden from the optimiser's integer reassociation: indexing it then costs one IMAD.WIDE per
// element (base register + offset) instead of a 64-bit index sum rescaled and rebased per element.
template <typename P>
__device__ __forceinline__ P* opaque(P* p) {
#ifdef __CUDA_ARCH__
  asm("" : "+l"(p));
#endif
  return p;
}

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Expert owning row n: the number of i in [1, E) with offsets[i] <= n.
__device__ __forceinline__ int expert_of(const int64_t* offsets, int64_t n, int E) {
  int e = 0;
  for (int i = 1; i < E; ++i) e += (offsets[i] <= n) ? 1 : 0;
  return e;
}

__device__ __forceinline__ float gelu_f(float a) { return 0.5f * a * (1.f + erff(a * 0.70710678118654752f)); }
__device__ __forceinline__ float gelu_grad_f(float a) {
  return 0.5f * (1.f + erff(a * 0.70710678118654752f)) + a * expf(-0.5f * a * a) * 0.3989422804014327f;
}
__device__ __forceinline__ float sigmoid_f(float u) { return 1.f / (1.f + expf(-u)); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// f(T{}) with T the element type of dt.
template <typename F>
cudaError_t with_type(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace expert_conv
}  // namespace moce
