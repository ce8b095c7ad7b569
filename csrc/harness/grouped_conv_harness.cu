// Standalone harness for the grouped-convolution kernels (for ncu / nsys; no PyTorch).
// Usage: grouped_conv_harness [B C_in C_out H W K gated dtype iters]
//   defaults: 8 96 288 128 128 3 0 bf16 50   (dtype: f32 | f16 | bf16; gated: 0 | 1)
// Runs the fused pw->dw forward (plain or gated), its backward core (recompute + grad dw / gy), the
// grouped 1x1 data grad and the weight grad on random inputs, checks every launch, and prints the mean
// time per launch in ms (cudaEvents, after one warm-up).
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "common/expert_stage_meta.h"
#include "common/harness_common.h"
#include "grouped_conv/kernels.h"

using moce::DType;
using namespace moce::harness;
using namespace moce_meta;  // kRowWidth and the meta tables' columns

int main(int argc, char** argv) {
  const int B = argc > 1 ? std::atoi(argv[1]) : 8;
  const int cin = argc > 2 ? std::atoi(argv[2]) : 96;
  const int cout = argc > 3 ? std::atoi(argv[3]) : 288;
  const int H = argc > 4 ? std::atoi(argv[4]) : 128;
  const int W = argc > 5 ? std::atoi(argv[5]) : 128;
  const int K = argc > 6 ? std::atoi(argv[6]) : 3;
  const bool gated = argc > 7 ? std::atoi(argv[7]) != 0 : false;
  const std::string dts = argc > 8 ? argv[8] : "bf16";
  const int iters = argc > 9 ? std::atoi(argv[9]) : 50;
  const DType dt = parse_dtype(dts);
  if (B < 1 || cin < 1 || cout < 1 || H < 1 || W < 1 || (K != 3 && K != 5 && K != 7) || (gated && cout % 2)) {
    std::fprintf(stderr, "bad arguments\n");
    return 2;
  }
  const int64_t HW = (int64_t)H * W, nout = gated ? cout / 2 : cout;
  std::mt19937 rng(0);
  void* x = random_device(B * cin * HW, dt, rng);
  void* w = random_device((int64_t)cout * cin, dt, rng, 0.2f);
  void* dw = random_device((int64_t)cout * K * K, dt, rng, 0.3f);
  void* pb = random_device(cout, dt, rng);
  void* db = random_device(cout, dt, rng);
  void* out = random_device(B * nout * HW, dt, rng);
  void* g = random_device(B * nout * HW, dt, rng);
  void* gofull = random_device(B * cout * HW, dt, rng);
  void* gy = random_device(B * cout * HW, dt, rng);
  void* gx = random_device(B * cin * HW, dt, rng);
  float* gdw = device_alloc<float>((int64_t)cout * K * K);
  float* gdb = device_alloc<float>(cout);
  float* gpw = device_alloc<float>((int64_t)cout * cin);
  float* gpb = device_alloc<float>(cout);
  int64_t* offsets = device_copy<int64_t>({0, B});
  // meta rows (common/expert_stage_meta.h), unnamed columns 0: the pw->dw forward's, then its backward's
  // (go has all c_out channels), the weight gradient's, and the data gradient's gx = W^T gy
  std::vector<int64_t> m(kRowWidth, 0);
  m[pw_dw_col::C_IN] = cin; m[pw_dw_col::C_OUT] = cout; m[pw_dw_col::SRC_ROW_STRIDE] = cin * HW;
  m[pw_dw_col::OUT_SPLIT] = nout; m[pw_dw_col::OUT_ROW_STRIDE] = nout * HW;
  m[pw_dw_col::GRAD_PW_ROW_STRIDE] = cout * HW;
  int64_t* meta_fwd = device_copy(m);
  m[pw_dw_col::OUT_SPLIT] = cout; m[pw_dw_col::OUT_ROW_STRIDE] = cout * HW;
  int64_t* meta_bwd = device_copy(m);
  std::vector<int64_t> mw(kRowWidth, 0);
  mw[wgrad_col::C_OUT] = cout; mw[wgrad_col::C_IN] = cin;
  mw[wgrad_col::G_ROW_STRIDE] = cout * HW; mw[wgrad_col::X_ROW_STRIDE] = cin * HW;
  int64_t* meta_wg = device_copy(mw);
  std::vector<int64_t> mg(kRowWidth, 0);
  mg[gemm_col::C_IN] = cout; mg[gemm_col::C_OUT] = cin;
  mg[gemm_col::WEIGHT_OUT_STRIDE] = 1; mg[gemm_col::WEIGHT_IN_STRIDE] = cin;
  mg[gemm_col::SRC_ROW_STRIDE] = cout * HW; mg[gemm_col::OUT_ROW_STRIDE] = cin * HW;
  int64_t* meta_gm = device_copy(mg);
  cudaStream_t s = nullptr;
  // every row in one group, read in place (no gather)
  auto group = [&](const int64_t* meta) { return moce::GroupArgs{offsets, meta, nullptr, 1, 1}; };

  moce::grouped_conv::PwdwParams f{group(meta_fwd)};
  f.src = x; f.w = w; f.dw = dw; f.pb = pb; f.db = db; f.out = out; f.g = g; f.gofull = gofull;
  f.N = B; f.H = H; f.W = W; f.K = K; f.max_nch = (int)nout; f.mode = gated ? 1 : 0;
  const float t_fwd = time_ms([&] { CHECK(moce::grouped_conv::launch_pwdw(dt, f, s)); }, iters);

  moce::grouped_conv::PwdwParams fg = f;
  fg.mode = 2;
  const float t_gate = gated ? time_ms([&] { CHECK(moce::grouped_conv::launch_pwdw(dt, fg, s)); }, iters) : 0.f;

  moce::grouped_conv::PwdwBwdParams b{group(meta_bwd)};
  b.src = x; b.w = w; b.dw = dw; b.pb = pb; b.go = gated ? gofull : out; b.gy = gy; b.gdw = gdw; b.gdb = gdb;
  b.N = B; b.H = H; b.W = W; b.K = K; b.max_cout = cout;
  const float t_bwd = time_ms([&] { CHECK(moce::grouped_conv::launch_pwdw_bwd(dt, b, s)); }, iters);

  moce::grouped_conv::WgradParams wg{group(meta_wg)};
  wg.g = gy; wg.x = x; wg.o = gpw; wg.bo = gpb; wg.g_f32 = false;
  wg.HW = (int)HW; wg.max_cout = cout; wg.max_cin = cin; wg.n_split = 128;
  const float t_wg = time_ms([&] { CHECK(moce::grouped_conv::launch_wgrad(dt, wg, s)); }, iters);

  moce::grouped_conv::GemmParams gm{group(meta_gm)};
  gm.x = gy; gm.w = w; gm.b = nullptr; gm.y = gx; gm.y_f32 = false; gm.accumulate = false;
  gm.N = B; gm.HW = (int)HW; gm.max_cout = cin;
  const float t_gm = time_ms([&] { CHECK(moce::grouped_conv::launch_gemm(dt, gm, s)); }, iters);

  CHECK(cudaDeviceSynchronize());
  const double fwd_bytes = (double)B * HW * (cin + nout) * moce::elem_size(dt);
  std::printf("grouped_conv B=%d C_in=%d C_out=%d %dx%d k=%d gated=%d %s\n", B, cin, cout, H, W, K, (int)gated,
              dts.c_str());
  std::printf("  fused pw->dw forward      %8.4f ms  (%.1f GB/s of compulsory traffic)\n", t_fwd,
              fwd_bytes / (t_fwd * 1e6));
  if (gated) std::printf("  gated backward epilogue   %8.4f ms\n", t_gate);
  std::printf("  backward core (gy, gdw)   %8.4f ms\n", t_bwd);
  std::printf("  1x1 weight grad           %8.4f ms\n", t_wg);
  std::printf("  1x1 data grad             %8.4f ms\n", t_gm);
  for (void* p : {x, w, dw, pb, db, out, g, gofull, gy, gx}) CHECK(cudaFree(p));
  for (float* p : {gdw, gdb, gpw, gpb}) CHECK(cudaFree(p));
  for (int64_t* p : {offsets, meta_fwd, meta_bwd, meta_wg, meta_gm}) CHECK(cudaFree(p));
  return 0;
}
