// Standalone harness for the window FFT attention kernels (for ncu / nsys): random inputs,
// forward and backward launches with error checks, cudaEvent timings.
// Usage: window_attention_harness [N C H W p dtype(f32|f16|bf16) iters]
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "window_attention/kernels.h"

#define CHECK(x)                                                                          \
  do {                                                                                    \
    cudaError_t err_ = (x);                                                               \
    if (err_ != cudaSuccess) {                                                            \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(err_)); \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

using moce::wfa::DType;

static size_t elem_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

// Fills a device buffer of n elements of dtype d with uniform(-1, 1) values.
static void* random_device(int64_t n, DType d) {
  std::vector<unsigned char> host(n * elem_size(d));
  for (int64_t i = 0; i < n; ++i) {
    float x = 2.f * std::rand() / RAND_MAX - 1.f;
    if (d == DType::kFloat32) reinterpret_cast<float*>(host.data())[i] = x;
    else if (d == DType::kFloat16) reinterpret_cast<__half*>(host.data())[i] = __float2half(x);
    else reinterpret_cast<__nv_bfloat16*>(host.data())[i] = __float2bfloat16(x);
  }
  void* dev = nullptr;
  CHECK(cudaMalloc(&dev, host.size()));
  CHECK(cudaMemcpy(dev, host.data(), host.size(), cudaMemcpyHostToDevice));
  return dev;
}

template <typename F>
static float time_ms(F&& fn, int iters) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  CHECK(fn());
  CHECK(cudaDeviceSynchronize());
  CHECK(cudaEventRecord(a));
  for (int i = 0; i < iters; ++i) CHECK(fn());
  CHECK(cudaEventRecord(b));
  CHECK(cudaEventSynchronize(b));
  float ms = 0.f;
  CHECK(cudaEventElapsedTime(&ms, a, b));
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  return ms / iters;
}

int main(int argc, char** argv) {
  moce::wfa::Shape s{8, 48, 256, 256, 8, 1e-5f};
  DType dt = DType::kBFloat16;
  int iters = 20;
  if (argc > 1) s.N = std::atoll(argv[1]);
  if (argc > 2) s.C = std::atoll(argv[2]);
  if (argc > 3) s.H = std::atoll(argv[3]);
  if (argc > 4) s.W = std::atoll(argv[4]);
  if (argc > 5) s.p = std::atoi(argv[5]);
  if (argc > 6) dt = !std::strcmp(argv[6], "f32") ? DType::kFloat32 : !std::strcmp(argv[6], "f16") ? DType::kFloat16 : DType::kBFloat16;
  if (argc > 7) iters = std::atoi(argv[7]);
  if (const char* msg = moce::wfa::check_shape(s)) {
    std::fprintf(stderr, "bad shape: %s\n", msg);
    return 1;
  }
  const int64_t n = s.N * s.C * s.H * s.W;
  void* q = random_device(n, dt);
  void* k = random_device(n, dt);
  void* v = random_device(n, dt);
  void* g = random_device(n, dt);
  float* w = static_cast<float*>(random_device(s.C, DType::kFloat32));
  float* b = static_cast<float*>(random_device(s.C, DType::kFloat32));
  void *out, *gq, *gk, *gv;
  float *ws, *gw, *gb;
  CHECK(cudaMalloc(&out, n * elem_size(dt)));
  CHECK(cudaMalloc(&gq, n * elem_size(dt)));
  CHECK(cudaMalloc(&gk, n * elem_size(dt)));
  CHECK(cudaMalloc(&gv, n * elem_size(dt)));
  CHECK(cudaMalloc(&ws, moce::wfa::backward_workspace_floats(s) * sizeof(float)));
  CHECK(cudaMalloc(&gw, s.C * sizeof(float)));
  CHECK(cudaMalloc(&gb, s.C * sizeof(float)));
  moce::wfa::FwdArgs fa{s, dt, q, k, v, w, b, out, nullptr};
  moce::wfa::BwdArgs ba{s, dt, g, q, k, v, w, b, gq, gk, gv, ws, gw, gb, nullptr};
  const float fwd = time_ms([&] { return moce::wfa::forward(fa, 0); }, iters);
  const float bwd = time_ms([&] { return moce::wfa::backward(ba, 0); }, iters);
  const double bytes = 4.0 * n * elem_size(dt);
  std::printf("window_fft_attention N=%lld C=%lld H=%lld W=%lld p=%d dtype=%s\n", (long long)s.N, (long long)s.C,
              (long long)s.H, (long long)s.W, s.p, dt == DType::kFloat32 ? "f32" : dt == DType::kFloat16 ? "f16" : "bf16");
  std::printf("forward  %.4f ms  (%.1f GB/s of q,k,v,out)\n", fwd, bytes / fwd * 1e-6);
  std::printf("backward %.4f ms\n", bwd);
  for (void* p : {q, k, v, g, out, gq, gk, gv}) CHECK(cudaFree(p));
  for (float* p : {w, b, ws, gw, gb}) CHECK(cudaFree(p));
  return 0;
}
