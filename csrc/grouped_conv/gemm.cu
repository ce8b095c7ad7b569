// The grouped 1x1 convolution and its weight gradient (kernels.h: GemmParams, WgradParams): the 1x1 on
// register-blocked 32 (channels) x 64 (pixels) row tiles with shared-memory staging (common/tile_mm.cuh),
// the weight gradient on 32 x 32 tiles of (output, input) channels accumulated over an expert's rows;
// fp32 FMAs, atomics into the fp32 weight gradient.
#include "grouped_conv/kernels.h"

#include "common/device_math.cuh"
#include "common/expert_stage_meta.h"
#include "common/tile_mm.cuh"

namespace moce {
namespace grouped_conv {
namespace {

using namespace row_tile;

template <typename T, typename TY>
__global__ void __launch_bounds__(kThreads) gemm_kernel(GemmParams p, int n_pt) {
  __shared__ MmSmem sm;
  const int64_t n = blockIdx.x / n_pt;
  const int pt = (int)(blockIdx.x % n_pt), cb = blockIdx.y;
  if (n >= p.N) return;
  namespace col = moce_meta::gemm_col;
  const int64_t* m = p.meta + moce_meta::kRowWidth * expert_of(p.offsets, n, p.E);
  const int cin = (int)m[col::C_IN], cout = (int)m[col::C_OUT];
  if (cb * kMmC >= cout) return;
  const int64_t srow = p.perm != nullptr ? p.perm[n] / p.kslots : n;
  const T* x = static_cast<const T*>(p.x) + m[col::SRC] + srow * m[col::SRC_ROW_STRIDE];
  const int64_t HW = p.HW, p0 = (int64_t)pt * kMmP;
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  auto loadx = [&](int k, int pp) -> float {
    const int64_t px = p0 + pp;
    return px < HW ? to_f(x[(int64_t)k * HW + px]) : 0.f;
  };
  tile_mm(acc, static_cast<const T*>(p.w), m[col::WEIGHT], m[col::WEIGHT_OUT_STRIDE], m[col::WEIGHT_IN_STRIDE],
          cb * kMmC, cout, cin, loadx, sm.sw(), sm.sx());
  const int tx = threadIdx.x % kMmP, ty = threadIdx.x / kMmP;
  const int64_t px = p0 + tx;
  if (px >= HW) return;
  TY* y = static_cast<TY*>(p.y);
  const T* b = static_cast<const T*>(p.b);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int c = cb * kMmC + ty * 8 + i;
    if (c >= cout) break;
    float v = acc[i] + (b != nullptr ? to_f(b[m[col::BIAS] + c]) : 0.f);
    const int64_t o = m[col::OUT] + n * m[col::OUT_ROW_STRIDE] + (int64_t)c * HW + px;
    if (p.accumulate) v += to_f(y[o]);
    y[o] = from_f<TY>(v);
  }
}

template <typename TG, typename T>
__global__ void __launch_bounds__(kThreads) wgrad_kernel(WgradParams p, int npc) {
  constexpr int BP = 32;
  __shared__ float sG[32][BP + 1], sX[32][BP + 1];
  const int e = blockIdx.x / p.n_split, sp = blockIdx.x % p.n_split, cb = blockIdx.y, kb = blockIdx.z;
  if (e >= p.E) return;
  namespace col = moce_meta::wgrad_col;
  const int64_t* m = p.meta + moce_meta::kRowWidth * e;
  const int cout = (int)m[col::C_OUT], cin = (int)m[col::C_IN];
  if (cb * 32 >= cout || kb * 32 >= cin) return;
  const int64_t lo = p.offsets[e], hi = p.offsets[e + 1], HW = p.HW;
  const TG* g = static_cast<const TG*>(p.g);
  const T* x = static_cast<const T*>(p.x);
  const int tc = threadIdx.x / 8, tk = (threadIdx.x % 8) * 4;  // output (c = tc, ci = tk .. tk+3)
  float acc[4] = {0.f, 0.f, 0.f, 0.f}, bacc = 0.f;
  const int64_t total = (hi - lo) * npc;
  for (int64_t wi = sp; wi < total; wi += p.n_split) {
    const int64_t n = lo + wi / npc, p0 = (wi % npc) * BP;
    const int64_t srow = p.perm != nullptr ? p.perm[n] / p.kslots : n;
    for (int i = threadIdx.x; i < 32 * BP; i += kThreads) {
      const int r = i / BP, pp = i % BP;
      const int64_t px = p0 + pp;
      const int c = cb * 32 + r, k = kb * 32 + r;
      sG[r][pp] = (c < cout && px < HW) ? to_f(g[m[col::G] + n * m[col::G_ROW_STRIDE] + (int64_t)c * HW + px]) : 0.f;
      sX[r][pp] = (k < cin && px < HW) ? to_f(x[m[col::X] + srow * m[col::X_ROW_STRIDE] + (int64_t)k * HW + px]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int pp = 0; pp < BP; ++pp) {
      const float gv = sG[tc][pp];
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[j] += gv * sX[tk + j][pp];
      bacc += gv;
    }
    __syncthreads();
  }
  const int c = cb * 32 + tc;
  if (c >= cout) return;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int k = kb * 32 + tk + j;
    if (k < cin && total > 0) atomicAdd(p.o + m[col::GRAD_WEIGHT] + (int64_t)c * cin + k, acc[j]);
  }
  if (p.bo != nullptr && kb == 0 && tk == 0 && total > 0) atomicAdd(p.bo + m[col::GRAD_BIAS] + c, bacc);
}

}  // namespace

cudaError_t launch_gemm(DType dt, const GemmParams& p, cudaStream_t stream) {
  return MOCE_DISPATCH_FLOATING_TYPES(dt, [&] {
    const auto kernel = p.y_f32 ? gemm_kernel<scalar_t, float> : gemm_kernel<scalar_t, scalar_t>;
    return launch_row_tiles(Grid(p.N, p.HW, p.max_cout), kernel, p, stream);
  });
}

cudaError_t launch_wgrad(DType dt, const WgradParams& p, cudaStream_t stream) {
  const int npc = (int)cdiv(p.HW, 32);
  const int64_t gx = (int64_t)p.E * p.n_split, gy = cdiv(p.max_cout, 32), gz = cdiv(p.max_cin, 32);
  if (gx == 0 || gy == 0 || gz == 0) return cudaSuccess;
  if (gx > 0x7fffffffLL || gy > 65535 || gz > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid((unsigned)gx, (unsigned)gy, (unsigned)gz);
  return MOCE_DISPATCH_FLOATING_TYPES(dt, [&] {
    if (p.g_f32) wgrad_kernel<float, scalar_t><<<grid, kThreads, 0, stream>>>(p, npc);
    else wgrad_kernel<scalar_t, scalar_t><<<grid, kThreads, 0, stream>>>(p, npc);
    return cudaGetLastError();
  });
}

}  // namespace grouped_conv
}  // namespace moce
