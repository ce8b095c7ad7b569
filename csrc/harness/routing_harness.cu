// Standalone harness for the routing kernels (for ncu / nsys; no PyTorch).
// Usage: routing_harness [B C H W E k dtype iters]
//   defaults: 8 48 256 256 4 1 bf16 50   (dtype: f32 | f16 | bf16)
// Runs router forward+backward, dispatch, combine forward+backward on random inputs, checks every
// launch, checks dispatch's permutation on the host, and prints the median-free mean time per op in ms.
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "common/harness_common.h"
#include "routing/kernels.h"

using moce::DType;
using namespace moce::harness;

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
  const DType dt = parse_dtype(dts);
  if (B < 1 || C < 1 || H < 1 || W < 1 || E < 1 || k < 1 || k > E || E > moce::routing::kMaxExperts) {
    std::fprintf(stderr, "bad sizes\n");
    return 1;
  }
  const int64_t HW = H * W, N = C * HW, F = 8 * C;
  std::mt19937 rng(1234);
  cudaStream_t stream;
  CHECK(cudaStreamCreate(&stream));

  void* x = random_device(B * N, dt, rng);
  float* fe = random_f32(B * F, rng);
  float* gw = random_f32(E * C, rng);
  float* fw = random_f32(E * F, rng);
  float* cplx = random_f32(E, rng);
  float* noise = random_f32(B * E, rng, 0.25f);
  const int split = moce::routing::pool_split(B * C, HW);
  float* part = device_alloc<float>(B * C * split);
  double* scratch = device_alloc<double>(moce::routing::route_scratch_doubles(B, C, E));
  float* gates = device_alloc<float>(B * k);
  int64_t* indices = device_alloc<int64_t>(B * k);
  float* logits = device_alloc<float>(B * E);
  float* loss = device_alloc<float>(1);
  moce::routing::RouteParams p{part, fe, gw, fw, cplx, noise, scratch, B, C, F, E, split, 1.f / static_cast<float>(HW),
                               1.f / static_cast<float>(E), static_cast<int>(k), true, true};

  auto route = [&] {
    CHECK(moce::routing::launch_pool_partial(x, dt, B * C, HW, split, part, stream));
    CHECK(moce::routing::launch_route_head(p, gates, indices, logits, loss, stream));
  };
  float* gg = random_f32(B * k, rng);
  float* gl = random_f32(B * E, rng);
  float* gL = random_f32(1, rng);
  float* gfe = device_alloc<float>(B * F);
  float* ggw = device_alloc<float>(E * C);
  float* gfw = device_alloc<float>(E * F);
  float* gpool = device_alloc<float>(B * C);
  void* gx = device_alloc<char>(B * N * moce::elem_size(dt));
  auto route_bwd = [&] {
    CHECK(moce::routing::launch_pool_partial(x, dt, B * C, HW, split, part, stream));
    CHECK(moce::routing::launch_route_head_backward(p, gg, gl, gL, gfe, ggw, gfw, gpool, stream));
    CHECK(moce::routing::launch_broadcast_rows(gpool, gx, dt, B * C, HW, stream));
  };
  int64_t* counts = device_alloc<int64_t>(E);
  int64_t* offsets = device_alloc<int64_t>(E + 1);
  int64_t* perm = device_alloc<int64_t>(B * k);
  auto dispatch = [&] {
    CHECK(moce::routing::launch_dispatch(indices, B * k, static_cast<int>(E), counts, offsets, perm, stream));
  };
  void* eo = random_device(B * k * N, dt, rng);
  void* out = device_alloc<char>(B * N * moce::elem_size(dt));
  auto combine = [&] {
    CHECK(moce::routing::launch_combine(eo, gates, perm, out, dt, B, static_cast<int>(k), N, stream));
  };
  void* geo = device_alloc<char>(B * k * N * moce::elem_size(dt));
  float* ggates = device_alloc<float>(B * k);
  float* cscratch = device_alloc<float>(moce::routing::combine_backward_scratch_floats(B, static_cast<int>(k), N));
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

  const double bytes_x = static_cast<double>(B * N * moce::elem_size(dt));
  const float t_route = time_ms(route, iters, stream, 3);
  const float t_route_bwd = time_ms(route_bwd, iters, stream, 3);
  const float t_dispatch = time_ms(dispatch, iters, stream, 3);
  const float t_combine = time_ms(combine, iters, stream, 3);
  const float t_combine_bwd = time_ms(combine_bwd, iters, stream, 3);
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
