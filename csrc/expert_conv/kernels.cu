// CUDA kernels of the expert_conv family (see kernels.h for the layouts and meta columns) other than
// the fused pw->dw ones (pwdw_forward.cu, pwdw_backward.cu, pwdw_tile.cuh): the grouped 1x1, the
// grouped weight gradient, the expert epilogue and the gather-sum. The 1x1 / epilogue kernels use
// 32 (channels) x 64 (pixels) register-blocked tiles with shared-memory staging (tile_mm), fp32 FMAs.
#include "expert_conv/kernels.h"

#include <type_traits>

#include "common/device_attr.h"
#include "expert_conv/device_common.cuh"

namespace moce {
namespace expert_conv {
namespace {

constexpr int kThreads = 256;
constexpr int kMmC = 32, kMmP = 64, kMmK = 32;  // tile_mm: output channels x pixels, reduction chunk
constexpr int kMmWS = kMmC + 4;                 // row stride of the staged weights ([k][c]: 16-byte aligned rows)
constexpr int kMmWFloats = kMmK * kMmWS, kMmXFloats = kMmK * kMmP;

// tile_mm's staging buffers as static shared memory (float4: 16-byte aligned)
struct MmSmem {
  float4 w[kMmWFloats / 4], x[kMmXFloats / 4];
  __device__ __forceinline__ float* sw() { return reinterpret_cast<float*>(w); }
  __device__ __forceinline__ float* sx() { return reinterpret_cast<float*>(x); }
};

// ------------------------------------------------------------------ register-blocked 32 x 64 tile
// Thread layout: tx = threadIdx.x % 64 (pixel), ty = threadIdx.x / 64 (rows ty*8 .. ty*8+7).

// Stages W[c0 + cc][k0 + kk] (element w_off + c so + k si; zero for c >= cout or k >= cin) transposed,
// into sW[kk * kMmWS + cc], cc, kk < 32.
template <typename TW>
__device__ __forceinline__ void stage_w(float* sW, const TW* __restrict__ W, int64_t w_off, int64_t so, int64_t si,
                                        int c0, int cout, int k0, int cin) {
  for (int i = threadIdx.x; i < kMmC * kMmK; i += kThreads) {
    const int kk = i / kMmC, cc = i % kMmC, c = c0 + cc, k = k0 + kk;
    sW[kk * kMmWS + cc] = (c < cout && k < cin) ? to_f(W[w_off + (int64_t)c * so + (int64_t)k * si]) : 0.f;
  }
}

// acc[i] += sum_kk sW[kk][ty * 8 + i] * X[kk * kMmP + tx] over a chunk's kMmK rows (X in shared memory). A
// row's 8 weights are two broadcast 16-byte loads: 11 instructions per 8 FMAs.
__device__ __forceinline__ void tile_fma(float (&acc)[8], const float* sW, const float* X) {
  const int tx = threadIdx.x % kMmP, ty = threadIdx.x / kMmP;
#pragma unroll 8
  for (int kk = 0; kk < kMmK; ++kk) {
    const float xv = X[kk * kMmP + tx];
    const float4* w = reinterpret_cast<const float4*>(sW + kk * kMmWS + ty * 8);
    const float4 a = w[0], b = w[1];
    acc[0] += a.x * xv;
    acc[1] += a.y * xv;
    acc[2] += a.z * xv;
    acc[3] += a.w * xv;
    acc[4] += b.x * xv;
    acc[5] += b.y * xv;
    acc[6] += b.z * xv;
    acc[7] += b.w * xv;
  }
}

// acc[i] += sum_k W[(c0 + ty*8 + i)*so + k*si] * X(k, tx) for rows < cout, k < cin. X(k, pp) by loadx.
template <typename TW, typename LoadX>
__device__ __forceinline__ void tile_mm(float (&acc)[8], const TW* __restrict__ W, int64_t w_off, int64_t so,
                                        int64_t si, int c0, int cout, int cin, LoadX loadx, float* sW, float* sX) {
  for (int k0 = 0; k0 < cin; k0 += kMmK) {
    stage_w(sW, W, w_off, so, si, c0, cout, k0, cin);
    for (int i = threadIdx.x; i < kMmK * kMmP; i += kThreads) {
      const int kk = i / kMmP, pp = i % kMmP;
      sX[kk * kMmP + pp] = (k0 + kk < cin) ? loadx(k0 + kk, pp) : 0.f;
    }
    __syncthreads();
    tile_fma(acc, sW, sX);
    __syncthreads();
  }
}

// The same with X(k, pp) = X[k * kMmP + pp] already in shared memory (finite up to cin rounded up to kMmK).
template <typename TW>
__device__ __forceinline__ void tile_mm_smem(float (&acc)[8], const TW* __restrict__ W, int64_t w_off, int64_t so,
                                             int64_t si, int c0, int cout, int cin, const float* X, float* sW) {
  for (int k0 = 0; k0 < cin; k0 += kMmK) {
    stage_w(sW, W, w_off, so, si, c0, cout, k0, cin);
    __syncthreads();
    tile_fma(acc, sW, X + (int64_t)k0 * kMmP);
    __syncthreads();
  }
}

template <typename T, typename TY>
__global__ void __launch_bounds__(kThreads) gemm_kernel(GemmParams p, int n_pt) {
  __shared__ MmSmem sm;
  const int64_t n = blockIdx.x / n_pt;
  const int pt = (int)(blockIdx.x % n_pt), cb = blockIdx.y;
  if (n >= p.N) return;
  const int64_t* m = p.meta + 16 * expert_of(p.offsets, n, p.E);
  const int cin = (int)m[0], cout = (int)m[1];
  if (cb * kMmC >= cout) return;
  const int64_t srow = p.perm != nullptr ? p.perm[n] / p.kslots : n;
  const T* x = static_cast<const T*>(p.x) + m[6] + srow * m[7];
  const int64_t HW = p.HW, p0 = (int64_t)pt * kMmP;
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  auto loadx = [&](int k, int pp) -> float {
    const int64_t px = p0 + pp;
    return px < HW ? to_f(x[(int64_t)k * HW + px]) : 0.f;
  };
  tile_mm(acc, static_cast<const T*>(p.w), m[2], m[3], m[4], cb * kMmC, cout, cin, loadx, sm.sw(), sm.sx());
  const int tx = threadIdx.x % kMmP, ty = threadIdx.x / kMmP;
  const int64_t px = p0 + tx;
  if (px >= HW) return;
  TY* y = static_cast<TY*>(p.y);
  const T* b = static_cast<const T*>(p.b);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int c = cb * kMmC + ty * 8 + i;
    if (c >= cout) break;
    float v = acc[i] + (b != nullptr ? to_f(b[m[5] + c]) : 0.f);
    const int64_t o = m[8] + n * m[9] + (int64_t)c * HW + px;
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
  const int64_t* m = p.meta + 16 * e;
  const int cout = (int)m[0], cin = (int)m[1];
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
      sG[r][pp] = (c < cout && px < HW) ? to_f(g[m[3] + n * m[4] + (int64_t)c * HW + px]) : 0.f;
      sX[r][pp] = (k < cin && px < HW) ? to_f(x[m[5] + srow * m[6] + (int64_t)k * HW + px]) : 0.f;
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
    if (k < cin && total > 0) atomicAdd(p.o + m[2] + (int64_t)c * cin + k, acc[j]);
  }
  if (p.bo != nullptr && kb == 0 && tk == 0 && total > 0) atomicAdd(p.bo + m[7] + c, bacc);
}

// ------------------------------------------------------------------ expert epilogue
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
  tile_mm(t, w, m[1], r, 1, r0, r, r, load_a, sW, sX);
  tile_mm(u, w, m[3], C, 1, r0, r, C, load_s, sW, sX);
  const int ty = threadIdx.x / kMmP;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int j = r0 + ty * 8 + i;
    if (j < r) t[i] += to_f(w[m[2] + j]);
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
struct FinalRow {
  const int64_t* m;
  int r, C;
  int64_t HW, p0;
  const T *w, *attn, *sh, *xs;
  T* out;
  __device__ __forceinline__ FinalRow(const FinalParams& p, int64_t n, int pt)
      : m(p.meta + 16 * expert_of(p.offsets, n, p.E)), r((int)m[0]), C(p.C), HW(p.HW), p0((int64_t)pt * kMmP),
        w(static_cast<const T*>(p.w)), attn(static_cast<const T*>(p.attn) + m[5] + n * r * HW) {
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
__global__ void __launch_bounds__(kThreads) final_fwd_kernel(FinalParams p, int n_pt) {
  extern __shared__ __align__(16) float smem[];  // sW, sX, sH
  float *sW = smem, *sX = sW + kMmWFloats, *sH = sX + kMmXFloats;
  const int64_t n = blockIdx.x / n_pt;
  if (n >= p.N) return;
  const FinalRow<T> row(p, n, (int)(blockIdx.x % n_pt));
  for (int r0 = 0; r0 < row.r; r0 += kMmC) row.h_chunk(sH + (int64_t)r0 * kMmP, r0, sW, sX);
  // tile_mm_smem's first barrier orders the h rows before they are read
  for (int cb = 0; cb * kMmC < p.C; ++cb) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    tile_mm_smem(acc, row.w, row.m[4], row.r, 1, cb * kMmC, p.C, row.r, sH, sW);
    row.store(acc, cb);
  }
}

// The split form, for ranks whose h does not fit in shared memory: one block per (row, 64-pixel tile,
// 32 output channels), h in chunks of 32 ranks.
template <typename T>
__global__ void __launch_bounds__(kThreads) final_fwd_split_kernel(FinalParams p, int n_pt) {
  __shared__ MmSmem sm;
  __shared__ float4 sH4[kMmC * kMmP / 4];
  float* sH = reinterpret_cast<float*>(sH4);
  const int64_t n = blockIdx.x / n_pt;
  const int cb = blockIdx.y;
  if (n >= p.N) return;
  const FinalRow<T> row(p, n, (int)(blockIdx.x % n_pt));
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int r0 = 0; r0 < row.r; r0 += kMmC) {
    row.h_chunk(sH, r0, sm.sw(), sm.sx());
    __syncthreads();
    tile_mm_smem(acc, row.w, row.m[4] + r0, row.r, 1, cb * kMmC, p.C, min(kMmC, row.r - r0), sH, sm.sw());
  }
  row.store(acc, cb);
}

template <typename T, typename TG>
__global__ void __launch_bounds__(kThreads) final_bwd_kernel(FinalBwdParams p, int n_pt) {
  __shared__ MmSmem sm;
  float *sW = sm.sw(), *sX = sm.sx();
  const int64_t n = blockIdx.x / n_pt;
  const int pt = (int)(blockIdx.x % n_pt), r0 = blockIdx.y * kMmC;
  if (n >= p.N) return;
  const int64_t* m = p.meta + 16 * expert_of(p.offsets, n, p.E);
  const int r = (int)m[0], C = p.C;
  if (r0 >= r) return;
  const int64_t HW = p.HW, p0 = (int64_t)pt * kMmP;
  const int64_t img = p.perm[n] / p.kslots;
  const T* w = static_cast<const T*>(p.w);
  const int64_t a_off = m[5] + n * r * HW;
  const T* attn = static_cast<const T*>(p.attn) + a_off;
  const T* sh = static_cast<const T*>(p.shared) + img * C * HW;
  const TG* g = static_cast<const TG*>(p.g) + n * C * HW;
  float t[8], u[8], gh[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  expert_tu(t, u, w, m, r, r0, C, attn, sh, HW, p0, sW, sX);
  auto load_g = [&](int k, int pp) -> float {
    const int64_t px = p0 + pp;
    return px < HW ? to_f(g[(int64_t)k * HW + px]) : 0.f;
  };
  tile_mm(gh, w, m[4], 1, r, r0, r, C, load_g, sW, sX);  // W_2^T: element (j, c) at c*r + j
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

cudaError_t launch_gemm(DType dt, const GemmParams& p, cudaStream_t stream) {
  const int n_pt = (int)cdiv(p.HW, kMmP);
  const int64_t gx = (int64_t)p.N * n_pt, gy = cdiv(p.max_cout, kMmC);
  if (gx == 0 || gy == 0) return cudaSuccess;
  if (gx > 0x7fffffffLL || gy > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid((unsigned)gx, (unsigned)gy);
  return with_type(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    if (p.y_f32) gemm_kernel<T, float><<<grid, kThreads, 0, stream>>>(p, n_pt);
    else gemm_kernel<T, T><<<grid, kThreads, 0, stream>>>(p, n_pt);
    return cudaGetLastError();
  });
}

cudaError_t launch_wgrad(DType dt, const WgradParams& p, cudaStream_t stream) {
  const int npc = (int)cdiv(p.HW, 32);
  const int64_t gx = (int64_t)p.E * p.n_split, gy = cdiv(p.max_cout, 32), gz = cdiv(p.max_cin, 32);
  if (gx == 0 || gy == 0 || gz == 0) return cudaSuccess;
  if (gx > 0x7fffffffLL || gy > 65535 || gz > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid((unsigned)gx, (unsigned)gy, (unsigned)gz);
  return with_type(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    if (p.g_f32) wgrad_kernel<float, T><<<grid, kThreads, 0, stream>>>(p, npc);
    else wgrad_kernel<T, T><<<grid, kThreads, 0, stream>>>(p, npc);
    return cudaGetLastError();
  });
}

cudaError_t launch_final_fwd(DType dt, const FinalParams& p, cudaStream_t stream) {
  const int n_pt = (int)cdiv(p.HW, kMmP);
  const int64_t gx = (int64_t)p.N * n_pt, gy = cdiv(p.C, kMmC);
  if (gx == 0 || gy == 0) return cudaSuccess;
  if (gx > 0x7fffffffLL || gy > 65535 || p.max_r < 0) return cudaErrorInvalidConfiguration;
  // h of every rank in shared memory when it fits the device's per-block opt-in limit
  const size_t smem = sizeof(float) * (kMmWFloats + kMmXFloats + (size_t)cdiv(p.max_r, kMmC) * kMmC * kMmP);
  const int optin = device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin, 48 * 1024);  // 48 KB: no opt-in
  return with_type(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    if (smem <= (size_t)optin) {
      cudaError_t e = cudaFuncSetAttribute(final_fwd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
      if (e != cudaSuccess) return e;
      final_fwd_kernel<T><<<(unsigned)gx, kThreads, smem, stream>>>(p, n_pt);
    } else {
      final_fwd_split_kernel<T><<<dim3((unsigned)gx, (unsigned)gy), kThreads, 0, stream>>>(p, n_pt);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_final_bwd(DType dt, const FinalBwdParams& p, cudaStream_t stream) {
  const int n_pt = (int)cdiv(p.HW, kMmP);
  const int64_t gx = (int64_t)p.N * n_pt, gy = cdiv(p.max_r, kMmC);
  if (gx == 0 || gy == 0) return cudaSuccess;
  if (gx > 0x7fffffffLL || gy > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid((unsigned)gx, (unsigned)gy);
  return with_type(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    if (p.g_f32) final_bwd_kernel<T, float><<<grid, kThreads, 0, stream>>>(p, n_pt);
    else final_bwd_kernel<T, T><<<grid, kThreads, 0, stream>>>(p, n_pt);
    return cudaGetLastError();
  });
}

cudaError_t launch_gather_sum(DType dt, const float* src, const int64_t* inv, void* out, int64_t B, int64_t L,
                              int64_t kslots, cudaStream_t stream) {
  if (B == 0 || L == 0) return cudaSuccess;
  if (B > 65535 || cdiv(L, 256) > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const dim3 grid((unsigned)cdiv(L, 256), (unsigned)B);
  return with_type(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    gather_sum_kernel<T><<<grid, 256, 0, stream>>>(src, inv, static_cast<T*>(out), L, kslots);
    return cudaGetLastError();
  });
}

}  // namespace expert_conv
}  // namespace moce
