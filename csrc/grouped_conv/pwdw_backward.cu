// Backward core of the fused pointwise -> depthwise conv, grouped over experts (kernels.h:
// PwdwBwdParams): from go = dL/d(dw output) it writes gy = dL/d(pw output) and accumulates the
// depthwise weight and bias gradients, on the forward's tile machinery (pwdw_tile.cuh).
//
// One block per (row n, 8 x 32 tile, 32 pw output channels): the 1x1 result over the tile plus halo
// is recomputed into shared memory (x read once per 32 channels), go over the same halo is staged
// beside it (zero outside the image), then one warp per channel, a lane per column:
//   gy = the depthwise correlation of go with the kernel rotated by 180 degrees (8 rows in registers);
//   grad dw[t] = sum over the tile of go * y shifted by t: k*k partials per lane, reduced across the
//   warp through a padded shared-memory scratch (one store and one column sum per partial, no
//   per-tap shuffles), then one atomic per tap and channel per block (grad db likewise).
#include "grouped_conv/pwdw_tile.cuh"

namespace moce {
namespace grouped_conv {
namespace {

using namespace tile;

constexpr int kBwdGroup = 32;  // pw output channels per block

template <typename T, int K>
struct BwdSmem {
  using S = Smem<T, K, kBwdGroup>;
  static constexpr int kY = S::kY;                                // 1x1 result over the halo
  static constexpr int kG = S::kY > S::kStage ? S::kY : S::kStage;  // go over the halo; aliases the staging
  static constexpr int kDw = kBwdGroup * K * K;
  static constexpr int kRedLd = 33;                               // padded: conflict-free column sums
  static constexpr int kRed = kWarps * (K * K + 1) * kRedLd;      // per warp: k*k + 1 partials x 32 lanes
  static constexpr int kFloats = kY + kG + kDw + kRed;
};

template <typename T, int K>
__global__ void __launch_bounds__(kThreads) pwdw_bwd_kernel(PwdwBwdParams p, int n_tw, int n_tiles, int n_cblk) {
  constexpr int CG = kBwdGroup, KK = K * K;
  using G = GeoOf<T, K, CG>;
  using S = Smem<T, K, CG>;
  using B = BwdSmem<T, K>;
  extern __shared__ __align__(128) float smem[];
  float* sy = smem;
  float* sg = smem + B::kY;
  T* sx = reinterpret_cast<T*>(sg);
  T* sw = reinterpret_cast<T*>(reinterpret_cast<unsigned char*>(sx) + S::kXBytes);
  float* sdw = sg + B::kG;
  float* sred = sdw + B::kDw;

  TileWork w;
  if (!tile_work(p, n_tw, n_tiles, n_cblk, w)) return;  // uniform over the block
  const auto& [cb, ty0, tx0, n, srow, m] = w;
  const int cout = (int)m[col::C_OUT];
  if (cb * CG >= cout) return;  // uniform over the block
  const int64_t HW = (int64_t)p.H * p.W;
  stage_dw<T, K, CG, 1, float>(p, m, cb, cout, sdw);
  pw_halo<T, K, CG, 1, float, false>(p, m, srow, cb, cout, ty0, tx0, sy, sx, sw);  // ends with a barrier

  // go over the tile plus halo (the staging buffers are free now): a warp per channel, a lane per
  // halo column, zero outside the image
  const T* go = static_cast<const T*>(p.go);
  const OutAddr oa(m, n, HW);
  {
    constexpr int U = (G::HALO + 31) / 32;
    HaloLane<G, U> hl;
    hl.init(0, ty0, tx0, p.H, p.W);
    for (int r = threadIdx.x / 32; r < CG; r += kWarps) {
      const int c = cb * CG + r;
      const T* gc = go + (c < cout ? oa(c) : 0);
      float* dst = sg + r * G::LD + threadIdx.x % 32;
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (threadIdx.x % 32 + 32 * u < G::HALO)
          dst[32 * u] = (c < cout && hl.in(u)) ? to_f(gc[hl.off[u]]) : 0.f;
    }
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* red = sred + warp * (KK + 1) * B::kRedLd;
  const int px = tx0 + lane;
  for (int q = warp; q < CG; q += kWarps) {
    const int c = cb * CG + q;
    if (c >= cout) break;
    const float* yq = sy + q * G::LD;
    const float* gq = sg + q * G::LD;
    float gy[kTH];
    dw_column<G, true>(gq, sdw + q * KK, lane, gy);
    T* gyp = static_cast<T*>(p.gy) + m[col::GRAD_PW] + n * m[col::GRAD_PW_ROW_STRIDE] + (int64_t)c * HW;
#pragma unroll
    for (int oy = 0; oy < kTH; ++oy)
      if (ty0 + oy < p.H && px < p.W) gyp[(int64_t)(ty0 + oy) * p.W + px] = from_f<T>(gy[oy]);

    // grad dw: acc[dy * K + dx] = sum_oy go(oy, lane) * y(oy + dy, lane + dx); grad db: sum go
    float gcol[kTH], acc[KK], sgo = 0.f;
#pragma unroll
    for (int oy = 0; oy < kTH; ++oy) {
      gcol[oy] = gq[(oy + G::P) * G::RS + G::C0 + lane + G::P];
      sgo += gcol[oy];
    }
#pragma unroll
    for (int t = 0; t < KK; ++t) acc[t] = 0.f;
    for_each_tap<G>(yq, lane, [&](int oy, int t, float v) { acc[t] += gcol[oy] * v; });
#pragma unroll
    for (int t = 0; t < KK; ++t) red[t * B::kRedLd + lane] = acc[t];
    red[KK * B::kRedLd + lane] = sgo;
    __syncwarp();
    for (int t = lane; t <= KK; t += 32) {
      float s = 0.f;
      for (int l = 0; l < 32; ++l) s += red[t * B::kRedLd + l];
      if (t < KK) atomicAdd(p.gdw + m[col::DW_WEIGHT] + (int64_t)c * KK + t, s);
      else if (p.gdb != nullptr) atomicAdd(p.gdb + m[col::DW_BIAS] + c, s);
    }
    __syncwarp();
  }
}

template <typename T, int K>
cudaError_t launch_t(const PwdwBwdParams& p, cudaStream_t stream) {
  const int n_tw = (int)cdiv(p.W, kTW), n_tiles = (int)cdiv(p.H, kTH) * n_tw;
  const int n_cblk = (int)cdiv(p.max_cout, kBwdGroup);
  const int64_t blocks = (int64_t)p.N * n_tiles * n_cblk;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const size_t smem = sizeof(float) * BwdSmem<T, K>::kFloats;
  cudaError_t err =
      cudaFuncSetAttribute(pwdw_bwd_kernel<T, K>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  pwdw_bwd_kernel<T, K><<<(unsigned)blocks, kThreads, smem, stream>>>(p, n_tw, n_tiles, n_cblk);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_pwdw_bwd(DType dt, const PwdwBwdParams& p, cudaStream_t stream) {
  if ((p.K != 3 && p.K != 5 && p.K != 7) || (int64_t)p.H * p.W > INT32_MAX) return cudaErrorInvalidValue;
  return MOCE_DISPATCH_FLOATING_TYPES(dt, [&] {
    if (p.K == 3) return launch_t<scalar_t, 3>(p, stream);
    if (p.K == 5) return launch_t<scalar_t, 5>(p, stream);
    return launch_t<scalar_t, 7>(p, stream);
  });
}

}  // namespace grouped_conv
}  // namespace moce
