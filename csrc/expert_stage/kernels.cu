// The expert epilogue, forward and backward, and the gather-sum (kernels.h). The epilogue computes on
// the register-blocked 32 (channels) x 64 (pixels) row tiles of common/tile_mm.cuh, fp32 FMAs: a
// block per (row, 64-pixel tile), and h = t * silu(u) of all ranks kept in shared memory when it
// fits, else a block per 32 output channels that recomputes h in chunks of 32 ranks.
#include "expert_stage/kernels.h"

#include "common/device_attr.h"
#include "common/device_math.cuh"
#include "common/expert_stage_meta.h"
#include "common/tile_mm.cuh"

namespace moce {
namespace expert_stage {
namespace {

using namespace row_tile;
namespace col = moce_meta::epilogue_col;  // the columns of an expert's meta row

// t = W_o attn + b_o and u = W_1 shared for ranks r0 .. r0+31 (rows ty*8+i of this thread, pixel tx).
template <typename T>
__device__ __forceinline__ void expert_tu(float (&t)[8], float (&u)[8], const T* w, const int64_t* m, int r, int r0,
                                          int C, const T* attn, const T* sh, int64_t HW, int64_t p0, float* sW,
                                          float* sX) {
#pragma unroll
  for (int i = 0; i < 8; ++i) t[i] = u[i] = 0.f;
  auto load_a = [&](int k, int pp) -> float {
    const int64_t px = p0 + pp;
    return px < HW ? to_f(attn[(int64_t)k * HW + px]) : 0.f;
  };
  auto load_s = [&](int k, int pp) -> float {
    const int64_t px = p0 + pp;
    return px < HW ? to_f(sh[(int64_t)k * HW + px]) : 0.f;
  };
  tile_mm(t, w, m[col::PROJ_OUT], r, 1, r0, r, r, load_a, sW, sX);
  tile_mm(u, w, m[col::PROJ1], C, 1, r0, r, C, load_s, sW, sX);
  const int ty = threadIdx.x / kMmP;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int j = r0 + ty * 8 + i;
    if (j < r) t[i] += to_f(w[m[col::PROJ_OUT_BIAS] + j]);
  }
}

// h = t * silu(u) for ranks r0 .. r0 + 31 into the 32 rows of kMmP pixels at hrows (zero past r).
template <typename T>
__device__ __forceinline__ void expert_h(float* hrows, const T* w, const int64_t* m, int r, int r0, int C,
                                         const T* attn, const T* sh, int64_t HW, int64_t p0, float* sW, float* sX) {
  float t[8], u[8];
  expert_tu(t, u, w, m, r, r0, C, attn, sh, HW, p0, sW, sX);
  const int tx = threadIdx.x % kMmP, ty = threadIdx.x / kMmP;
#pragma unroll
  for (int i = 0; i < 8; ++i) hrows[(ty * 8 + i) * kMmP + tx] = t[i] * u[i] * sigmoid_f(u[i]);
}

// The block's row n: its expert's meta row and rank, its inputs and output, the pixel tile.
template <typename T>
struct EpilogueRow {
  const int64_t* m;
  int r, C;
  int64_t HW, p0;
  const T *w, *attn, *sh, *xs;
  T* out;
  __device__ __forceinline__ EpilogueRow(const EpilogueParams& p, int64_t n, int pt)
      : m(p.meta + moce_meta::kRowWidth * expert_of(p.offsets, n, p.E)), r((int)m[col::RANK]), C(p.C), HW(p.HW),
        p0((int64_t)pt * kMmP), w(static_cast<const T*>(p.w)),
        attn(static_cast<const T*>(p.attn) + m[col::ATTN] + n * r * HW) {
    const int64_t img = p.perm[n] / p.kslots;
    sh = static_cast<const T*>(p.shared) + img * C * HW;
    xs = static_cast<const T*>(p.xs) + (p.x_gather ? img : n) * C * HW;
    out = static_cast<T*>(p.out) + n * C * HW;
  }
  // h of ranks r0 .. r0 + 31 into the 32 rows at hrows
  __device__ __forceinline__ void h_chunk(float* hrows, int r0, float* sW, float* sX) const {
    expert_h(hrows, w, m, r, r0, C, attn, sh, HW, p0, sW, sX);
  }
  // out[n, c] = acc + xs[row, c] at this thread's pixel, channels cb * 32 + ty * 8 + i
  __device__ __forceinline__ void store(const float (&acc)[8], int cb) const {
    const int tx = threadIdx.x % kMmP, ty = threadIdx.x / kMmP;
    const int64_t px = p0 + tx;
    if (px >= HW) return;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int c = cb * kMmC + ty * 8 + i;
      if (c >= C) break;
      out[(int64_t)c * HW + px] = from_f<T>(acc[i] + to_f(xs[(int64_t)c * HW + px]));
    }
  }
};

// One block per (row, 64-pixel tile), every output channel: h over all ranks stays in shared memory
// (max_r rounded up to 32 rows), then out = xs + W_2 h, 32 channels at a time. t and u are computed
// once per pixel (the split form below recomputes them for every 32 output channels).
template <typename T>
__global__ void __launch_bounds__(kThreads) epilogue_kernel(EpilogueParams p, int n_pt) {
  extern __shared__ __align__(16) float smem[];  // sW, sX, sH
  float *sW = smem, *sX = sW + kMmWFloats, *sH = sX + kMmXFloats;
  const int64_t n = blockIdx.x / n_pt;
  if (n >= p.N) return;
  const EpilogueRow<T> row(p, n, (int)(blockIdx.x % n_pt));
  for (int r0 = 0; r0 < row.r; r0 += kMmC) row.h_chunk(sH + (int64_t)r0 * kMmP, r0, sW, sX);
  // tile_mm_smem's first barrier orders the h rows before they are read
  for (int cb = 0; cb * kMmC < p.C; ++cb) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    tile_mm_smem(acc, row.w, row.m[col::PROJ2], row.r, 1, cb * kMmC, p.C, row.r, sH, sW);
    row.store(acc, cb);
  }
}

// The split form, for ranks whose h does not fit in shared memory: one block per (row, 64-pixel tile,
// 32 output channels), h in chunks of 32 ranks.
template <typename T>
__global__ void __launch_bounds__(kThreads) epilogue_split_kernel(EpilogueParams p, int n_pt) {
  __shared__ MmSmem sm;
  __shared__ float4 sH4[kMmC * kMmP / 4];
  float* sH = reinterpret_cast<float*>(sH4);
  const int64_t n = blockIdx.x / n_pt;
  const int cb = blockIdx.y;
  if (n >= p.N) return;
  const EpilogueRow<T> row(p, n, (int)(blockIdx.x % n_pt));
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int r0 = 0; r0 < row.r; r0 += kMmC) {
    row.h_chunk(sH, r0, sm.sw(), sm.sx());
    __syncthreads();
    tile_mm_smem(acc, row.w, row.m[col::PROJ2] + r0, row.r, 1, cb * kMmC, p.C, min(kMmC, row.r - r0), sH,
                 sm.sw());
  }
  row.store(acc, cb);
}

template <typename T, typename TG>
__global__ void __launch_bounds__(kThreads) epilogue_bwd_kernel(EpilogueBwdParams p, int n_pt) {
  __shared__ MmSmem sm;
  float *sW = sm.sw(), *sX = sm.sx();
  const int64_t n = blockIdx.x / n_pt;
  const int pt = (int)(blockIdx.x % n_pt), r0 = blockIdx.y * kMmC;
  if (n >= p.N) return;
  const int64_t* m = p.meta + moce_meta::kRowWidth * expert_of(p.offsets, n, p.E);
  const int r = (int)m[col::RANK], C = p.C;
  if (r0 >= r) return;
  const int64_t HW = p.HW, p0 = (int64_t)pt * kMmP;
  const int64_t img = p.perm[n] / p.kslots;
  const T* w = static_cast<const T*>(p.w);
  const int64_t a_off = m[col::ATTN] + n * r * HW;
  const T* attn = static_cast<const T*>(p.attn) + a_off;
  const T* sh = static_cast<const T*>(p.shared) + img * C * HW;
  const TG* g = static_cast<const TG*>(p.g) + n * C * HW;
  float t[8], u[8], gh[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  expert_tu(t, u, w, m, r, r0, C, attn, sh, HW, p0, sW, sX);
  auto load_g = [&](int k, int pp) -> float {
    const int64_t px = p0 + pp;
    return px < HW ? to_f(g[(int64_t)k * HW + px]) : 0.f;
  };
  tile_mm(gh, w, m[col::PROJ2], 1, r, r0, r, C, load_g, sW, sX);  // W_2^T: element (j, c) at c*r + j
  const int tx = threadIdx.x % kMmP, ty = threadIdx.x / kMmP;
  const int64_t px = p0 + tx;
  if (px >= HW) return;
  T* gt = static_cast<T*>(p.gt) + a_off;
  T* gu = static_cast<T*>(p.gu) + a_off;
  T* h = static_cast<T*>(p.h) + a_off;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int j = r0 + ty * 8 + i;
    if (j >= r) break;
    const float s = sigmoid_f(u[i]), sil = u[i] * s;
    const int64_t o = (int64_t)j * HW + px;
    gt[o] = from_f<T>(gh[i] * sil);
    gu[o] = from_f<T>(gh[i] * t[i] * s * (1.f + u[i] * (1.f - s)));
    h[o] = from_f<T>(t[i] * sil);
  }
}

template <typename T>
__global__ void gather_sum_kernel(const float* __restrict__ src, const int64_t* __restrict__ inv, T* __restrict__ out,
                                  int64_t L, int64_t kslots) {
  const int64_t b = blockIdx.y;
  const int64_t l = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (l >= L) return;
  float acc = 0.f;
  for (int64_t j = 0; j < kslots; ++j) acc += src[inv[b * kslots + j] * L + l];
  out[b * L + l] = from_f<T>(acc);
}

}  // namespace

cudaError_t launch_epilogue(DType dt, const EpilogueParams& p, cudaStream_t stream) {
  const Grid grid(p.N, p.HW, p.C);
  if (grid.empty()) return cudaSuccess;
  if (grid.too_large() || p.max_r < 0) return cudaErrorInvalidConfiguration;
  // h of every rank in shared memory when it fits the device's per-block opt-in limit
  const size_t smem = sizeof(float) * (kMmWFloats + kMmXFloats + (size_t)cdiv(p.max_r, kMmC) * kMmC * kMmP);
  const int optin = device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin, 48 * 1024);  // 48 KB: no opt-in
  return MOCE_DISPATCH_FLOATING_TYPES(dt, [&] {
    if (smem > (size_t)optin) return launch_row_tiles(grid, epilogue_split_kernel<scalar_t>, p, stream);
    const cudaError_t e =
        cudaFuncSetAttribute(epilogue_kernel<scalar_t>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
    epilogue_kernel<scalar_t><<<(unsigned)grid.gx, kThreads, smem, stream>>>(p, grid.n_pt);
    return cudaGetLastError();
  });
}

cudaError_t launch_epilogue_backward(DType dt, const EpilogueBwdParams& p, cudaStream_t stream) {
  return MOCE_DISPATCH_FLOATING_TYPES(dt, [&] {
    const auto kernel = p.g_f32 ? epilogue_bwd_kernel<scalar_t, float> : epilogue_bwd_kernel<scalar_t, scalar_t>;
    return launch_row_tiles(Grid(p.N, p.HW, p.max_r), kernel, p, stream);
  });
}

cudaError_t launch_gather_sum(DType dt, const float* src, const int64_t* inv, void* out, int64_t B, int64_t L,
                              int64_t kslots, cudaStream_t stream) {
  if (B == 0 || L == 0) return cudaSuccess;
  if (B > 65535 || cdiv(L, 256) > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const dim3 grid((unsigned)cdiv(L, 256), (unsigned)B);
  return MOCE_DISPATCH_FLOATING_TYPES(dt, [&] {
    gather_sum_kernel<scalar_t><<<grid, 256, 0, stream>>>(src, inv, static_cast<scalar_t*>(out), L, kslots);
    return cudaGetLastError();
  });
}

}  // namespace expert_stage
}  // namespace moce
