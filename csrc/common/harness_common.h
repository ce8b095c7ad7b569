// What the standalone Nsight harnesses (csrc/harness/*.cu) share: CHECK for CUDA calls, the dtype
// argument, random and plain device buffers, and cudaEvent timing.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"

// Exits with the failing call, its place and CUDA's message unless expr returns cudaSuccess.
#define CHECK(expr)                                                                                   \
  do {                                                                                                \
    cudaError_t err_ = (expr);                                                                        \
    if (err_ != cudaSuccess) {                                                                        \
      std::fprintf(stderr, "%s:%d: %s -> %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(err_)); \
      std::exit(1);                                                                                   \
    }                                                                                                 \
  } while (0)

namespace moce {
namespace harness {

// "f32", "f16" or (anything else) bfloat16.
inline DType parse_dtype(const std::string& s) {
  return s == "f32" ? DType::kFloat32 : s == "f16" ? DType::kFloat16 : DType::kBFloat16;
}

inline const char* dtype_name(DType dt) {
  return dt == DType::kFloat32 ? "f32" : dt == DType::kFloat16 ? "f16" : "bf16";
}

// An uninitialised device buffer of n (at least one) elements of T.
template <typename T>
T* device_alloc(int64_t n) {
  T* d = nullptr;
  CHECK(cudaMalloc(&d, (n > 0 ? n : 1) * sizeof(T)));
  return d;
}

// A device copy of v.
template <typename T>
T* device_copy(const std::vector<T>& v) {
  T* d = device_alloc<T>(static_cast<int64_t>(v.size()));
  CHECK(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

// A device buffer of n elements of dtype dt, uniform in [-scale, scale).
inline void* random_device(int64_t n, DType dt, std::mt19937& rng, float scale = 1.f) {
  std::uniform_real_distribution<float> u(-scale, scale);
  void* d = nullptr;
  CHECK(MOCE_DISPATCH_FLOATING_TYPES(dt, [&] {
    std::vector<scalar_t> host(n);
    for (auto& v : host) v = from_f<scalar_t>(u(rng));
    d = device_copy(host);
    return cudaSuccess;
  }));
  return d;
}

inline float* random_f32(int64_t n, std::mt19937& rng, float scale = 1.f) {
  return static_cast<float*>(random_device(n, DType::kFloat32, rng, scale));
}

// Mean milliseconds per call of f over `iters` calls on `stream`, after `warmup` calls.
template <typename F>
float time_ms(F&& f, int iters, cudaStream_t stream = nullptr, int warmup = 1) {
  for (int i = 0; i < warmup; ++i) f();
  CHECK(cudaStreamSynchronize(stream));
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  CHECK(cudaEventRecord(a, stream));
  for (int i = 0; i < iters; ++i) f();
  CHECK(cudaEventRecord(b, stream));
  CHECK(cudaEventSynchronize(b));
  float ms = 0.f;
  CHECK(cudaEventElapsedTime(&ms, a, b));
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  return ms / iters;
}

}  // namespace harness
}  // namespace moce
