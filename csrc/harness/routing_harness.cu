// Standalone harness for the routing kernels (for ncu / nsys; no PyTorch).
// Usage: routing_harness [B C H W E k dtype iters]
//   defaults: 8 48 256 256 4 1 bf16 50   (dtype: f32 | f16 | bf16)
// Runs router forward+backward, dispatch, combine forward+backward on random inputs, checks every
// launch, checks dispatch's permutation on the host, and prints the median-free mean time per op in ms.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "routing/kernels.h"

using moce::routing::DType;

#define CHECK(expr)                                                                              \
  do {                                                                                           \
    cudaError_t err_ = (expr);                                                                   \
    if (err_ != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "%s:%d: %s -> %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(err_)); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

namespace {

size_t elem_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

// Random device buffer of n elements of dtype dt (values in [-1, 1)).
void* random_big(int64_t n, DType dt, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<unsigned char> host(n * elem_size(dt));
  for (int64_t i = 0; i < n; ++i) {
    const float v = u(rng);
    if (dt == DType::kFloat32) {
      std::memcpy(host.data() + 4 * i, &v, 4);
    } else if (dt == DType::kFloat16) {
      const __half h = __float2half(v);
      std::memcpy(host.data() + 2 * i, &h, 2);
    } else {
      const __nv_bfloat16 h = __float2bfloat16(v);
      std::memcpy(host.data() + 2 * i, &h, 2);
    }
  }
  void* d = nullptr;
  CHECK(cudaMalloc(&d, host.size()));
  CHECK(cudaMemcpy(d, host.data(), host.size(), cudaMemcpyHostToDevice));
  return d;
}

float* random_f32(int64_t n, std::mt19937& rng, float scale = 1.f) {
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<float> host(n);
  for (auto& v : host) v = u(rng);
  float* d = nullptr;
  CHECK(cudaMalloc(&d, n * sizeof(float)));
  CHECK(cudaMemcpy(d, host.data(), n * sizeof(float), cudaMemcpyHostToDevice));
  return d;
}

template <typename T>
T* alloc(int64_t n) {
  T* d = nullptr;
  CHECK(cudaMalloc(&d, (n > 0 ? n : 1) * sizeof(T)));
  return d;
}

template <typename F>
float time_ms(F&& f, int iters, cudaStream_t stream) {
  for (int i = 0; i < 3; ++i) f();
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

}  // namespace

int main(int argc, char** argv) {
  int64_t B = 8, C = 48, H = 256, W = 256, E = 4, k = 1;
  std::string dts = "bf16";
  int iters = 50;
  if (argc > 1) B = std::atoll(argv[1]);
  if (argc > 2) C = std::atoll(argv[2]);
  if (argc > 3) H = std::atoll(argv[3]);
  if (argc > 4) W = std::atoll(argv[4]);
  if (argc > 5) E = std::atoll(argv[5]);
  if (argc > 6) k = std::atoll(argv[6]);
  if (argc > 7) dts = argv[7];
  if (argc > 8) iters = std::atoi(argv[8]);
  const DType dt = dts == "f32" ? DType::kFloat32 : (dts == "f16" ? DType::kFloat16 : DType::kBFloat16);
  if (B < 1 || C < 1 || H < 1 || W < 1 || E < 1 || k < 1 || k > E || E > moce::routing::kMaxExperts) {
    std::fprintf(stderr, "bad sizes\n");
    return 1;
  }
  const int64_t HW = H * W, N = C * HW, F = 8 * C;
  std::mt19937 rng(1234);
  cudaStream_t stream;
  CHECK(cudaStreamCreate(&stream));

  void* x = random_big(B * N, dt, rng);
  float* fe = random_f32(B * F, rng);
  float* gw = random_f32(E * C, rng);
  float* fw = random_f32(E * F, rng);
  float* cplx = random_f32(E, rng);
  float* noise = random_f32(B * E, rng, 0.25f);
  const int split = moce::routing::pool_split(B * C, HW);
  float* part = alloc<float>(B * C * split);
  double* scratch = alloc<double>(moce::routing::route_scratch_doubles(B, C, E));
  float* gates = alloc<float>(B * k);
  int64_t* indices = alloc<int64_t>(B * k);
  float* logits = alloc<float>(B * E);
  float* loss = alloc<float>(1);
  moce::routing::RouteParams p{part, fe, gw, fw, cplx, noise, scratch, B, C, F, E, split,
                               1.f / static_cast<float>(HW), 1.f / static_cast<float>(E), static_cast<int>(k), true, true};

  auto route = [&] {
    CHECK(moce::routing::launch_pool_partial(x, dt, B * C, HW, split, part, stream));
    CHECK(moce::routing::launch_route_head(p, gates, indices, logits, loss, stream));
  };
  float* gg = random_f32(B * k, rng);
  float* gl = random_f32(B * E, rng);
  float* gL = random_f32(1, rng);
  float* gfe = alloc<float>(B * F);
  float* ggw = alloc<float>(E * C);
  float* gfw = alloc<float>(E * F);
  float* gpool = alloc<float>(B * C);
  void* gx = nullptr;
  CHECK(cudaMalloc(&gx, B * N * elem_size(dt)));
  auto route_bwd = [&] {
    CHECK(moce::routing::launch_pool_partial(x, dt, B * C, HW, split, part, stream));
    CHECK(moce::routing::launch_route_head_backward(p, gg, gl, gL, gfe, ggw, gfw, gpool, stream));
    CHECK(moce::routing::launch_broadcast_rows(gpool, gx, dt, B * C, HW, stream));
  };
  int64_t* counts = alloc<int64_t>(E);
  int64_t* offsets = alloc<int64_t>(E + 1);
  int64_t* perm = alloc<int64_t>(B * k);
  auto dispatch = [&] {
    CHECK(moce::routing::launch_dispatch(indices, B * k, static_cast<int>(E), counts, offsets, perm, stream));
  };
  void* eo = random_big(B * k * N, dt, rng);
  void* out = nullptr;
  CHECK(cudaMalloc(&out, B * N * elem_size(dt)));
  auto combine = [&] { CHECK(moce::routing::launch_combine(eo, gates, perm, out, dt, B, static_cast<int>(k), N, stream)); };
  void* geo = nullptr;
  CHECK(cudaMalloc(&geo, B * k * N * elem_size(dt)));
  float* ggates = alloc<float>(B * k);
  float* cscratch = alloc<float>(moce::routing::combine_backward_scratch_floats(B, static_cast<int>(k), N));
  auto combine_bwd = [&] {
    CHECK(moce::routing::launch_combine_backward(out, eo, gates, perm, geo, ggates, cscratch, dt, B,
                                                 static_cast<int>(k), N, stream));
  };

  route();
  dispatch();
  CHECK(cudaStreamSynchronize(stream));
  // host check of dispatch: perm is a stable sort of the slots by expert
  std::vector<int64_t> hidx(B * k), hperm(B * k), hoff(E + 1);
  CHECK(cudaMemcpy(hidx.data(), indices, B * k * 8, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(hperm.data(), perm, B * k * 8, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(hoff.data(), offsets, (E + 1) * 8, cudaMemcpyDeviceToHost));
  bool ok = hoff[0] == 0 && hoff[E] == B * k;
  for (int64_t e = 0, r = 0; e < E && ok; ++e)
    for (int64_t s = 0; s < B * k; ++s)
      if (hidx[s] == e) ok = ok && r < B * k && hperm[r++] == s && r <= hoff[e + 1];
  std::printf("dispatch check: %s\n", ok ? "ok" : "FAILED");

  const double bytes_x = static_cast<double>(B * N * elem_size(dt));
  const float t_route = time_ms(route, iters, stream);
  const float t_route_bwd = time_ms(route_bwd, iters, stream);
  const float t_dispatch = time_ms(dispatch, iters, stream);
  const float t_combine = time_ms(combine, iters, stream);
  const float t_combine_bwd = time_ms(combine_bwd, iters, stream);
  std::printf("B=%lld C=%lld H=%lld W=%lld E=%lld k=%lld dtype=%s\n", (long long)B, (long long)C, (long long)H,
              (long long)W, (long long)E, (long long)k, dts.c_str());
  std::printf("route fwd       %.4f ms  (%.1f GB/s over x)\n", t_route, bytes_x / t_route / 1e6);
  std::printf("route bwd       %.4f ms  (%.1f GB/s over x + grad_x)\n", t_route_bwd, 2 * bytes_x / t_route_bwd / 1e6);
  std::printf("dispatch        %.4f ms\n", t_dispatch);
  std::printf("combine fwd     %.4f ms  (%.1f GB/s)\n", t_combine, (k + 1) * bytes_x / t_combine / 1e6);
  std::printf("combine bwd     %.4f ms  (%.1f GB/s)\n", t_combine_bwd, (1 + 2 * k) * bytes_x / t_combine_bwd / 1e6);
  CHECK(cudaDeviceSynchronize());
  return ok ? 0 : 2;
}
