// Device math of the grouped-convolution and expert-stage kernels: the expert of a row, the exact GELU
// (and a cheaper one for 16-bit outputs) and its derivative, sigmoid; and cdiv for their launchers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace moce {

// Expert owning row n: the number of i in [1, E) with offsets[i] <= n (common/group_args.h).
__device__ __forceinline__ int expert_of(const int64_t* offsets, int64_t n, int E) {
  int e = 0;
  for (int i = 1; i < E; ++i) e += (offsets[i] <= n) ? 1 : 0;
  return e;
}

__device__ __forceinline__ float gelu_f(float a) { return 0.5f * a * (1.f + erff(a * 0.70710678118654752f)); }
// 2^x (kEx2) or 1 / x (kRcp) by the special-function unit (ex2.approx.ftz, rcp.approx.ftz: about 2 ulp,
// subnormal results flushed to zero) without the range fix-ups of __expf and __fdividef; exact in the
// emulation.
enum class Sfu { kEx2, kRcp };
template <Sfu F>
__device__ __forceinline__ float sfu(float x) {
#ifdef __CUDA_ARCH__
  float y;
  if constexpr (F == Sfu::kEx2)
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  else
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return F == Sfu::kEx2 ? exp2f(x) : 1.f / x;
#endif
}

// The exact (erf) GELU for a 16-bit output: erf(z) = 1 - (a1 t + ... + a5 t^5) exp(-z^2) with
// t = 1 / (1 + p z) (Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7), within 1e-6 * max(1, |a|) of the
// true GELU (tests/test_device_math.py), three orders below the rounding of a bf16 or fp16 output;
// about half the instructions of erff. In u = |a| sqrt(log2(e) / 2): z = u / sqrt(log2(e)) and
// exp(-z^2) = 2^(-u^2).
__device__ __forceinline__ float gelu16_f(float a) {
  const float u = fabsf(a) * 0.84932180028801904f;                 // sqrt(log2(e) / 2)
  const float t = sfu<Sfu::kRcp>(fmaf(0.3275911f * 0.83255461115769776f, u, 1.f));  // p / sqrt(log2(e))
  float q = fmaf(1.061405429f, t, -1.453152027f);
  q = fmaf(q, t, 1.421413741f);
  q = fmaf(q, t, -0.284496736f);
  q = fmaf(q, t, 0.254829592f);
  const float e = fmaf(-q * t, sfu<Sfu::kEx2>(-u * u), 1.f);  // erf(|a| / sqrt(2))
  return 0.5f * a * (1.f + copysignf(e, a));
}
__device__ __forceinline__ float gelu_grad_f(float a) {
  return 0.5f * (1.f + erff(a * 0.70710678118654752f)) + a * expf(-0.5f * a * a) * 0.3989422804014327f;
}
__device__ __forceinline__ float sigmoid_f(float u) { return 1.f / (1.f + expf(-u)); }

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace moce
