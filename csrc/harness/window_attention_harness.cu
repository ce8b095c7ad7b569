// Standalone harness for the window FFT attention kernels (for ncu / nsys): random inputs,
// forward and backward launches with error checks, cudaEvent timings.
// Usage: window_attention_harness [N C H W p dtype(f32|f16|bf16) iters]
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

#include "common/harness_common.h"
#include "window_attention/kernels.h"

using moce::DType;
using namespace moce::harness;

int main(int argc, char** argv) {
  moce::wfa::Shape s{8, 48, 256, 256, 8, 1e-5f};
  DType dt = DType::kBFloat16;
  int iters = 20;
  if (argc > 1) s.N = std::atoll(argv[1]);
  if (argc > 2) s.C = std::atoll(argv[2]);
  if (argc > 3) s.H = std::atoll(argv[3]);
  if (argc > 4) s.W = std::atoll(argv[4]);
  if (argc > 5) s.p = std::atoi(argv[5]);
  if (argc > 6) dt = parse_dtype(argv[6]);
  if (argc > 7) iters = std::atoi(argv[7]);
  if (const char* msg = moce::wfa::check_shape(s)) {
    std::fprintf(stderr, "bad shape: %s\n", msg);
    return 1;
  }
  const int64_t n = s.N * s.C * s.H * s.W;
  const size_t bytes_t = n * moce::elem_size(dt);
  std::mt19937 rng(0);
  void* q = random_device(n, dt, rng);
  void* k = random_device(n, dt, rng);
  void* v = random_device(n, dt, rng);
  void* g = random_device(n, dt, rng);
  float* w = random_f32(s.C, rng);
  float* b = random_f32(s.C, rng);
  void* out = device_alloc<char>(bytes_t);
  void* gq = device_alloc<char>(bytes_t);
  void* gk = device_alloc<char>(bytes_t);
  void* gv = device_alloc<char>(bytes_t);
  float* ws = device_alloc<float>(moce::wfa::backward_workspace_floats(s));
  float* gw = device_alloc<float>(s.C);
  float* gb = device_alloc<float>(s.C);
  const moce::wfa::Inputs in{s, dt, q, k, v, w, b, nullptr};
  const moce::wfa::FwdArgs fa{in, out};
  const moce::wfa::BwdArgs ba{in, g, gq, gk, gv, ws, gw, gb};
  const float fwd = time_ms([&] { CHECK(moce::wfa::forward(fa, 0)); }, iters);
  const float bwd = time_ms([&] { CHECK(moce::wfa::backward(ba, 0)); }, iters);
  const double bytes = 4.0 * bytes_t;
  std::printf("window_fft_attention N=%lld C=%lld H=%lld W=%lld p=%d dtype=%s\n", (long long)s.N, (long long)s.C,
              (long long)s.H, (long long)s.W, s.p, dtype_name(dt));
  std::printf("forward  %.4f ms  (%.1f GB/s of q,k,v,out)\n", fwd, bytes / fwd * 1e-6);
  std::printf("backward %.4f ms\n", bwd);
  for (void* p : {q, k, v, g, out, gq, gk, gv}) CHECK(cudaFree(p));
  for (float* p : {w, b, ws, gw, gb}) CHECK(cudaFree(p));
  return 0;
}
