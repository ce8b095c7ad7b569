// The register-blocked 32 (channels) x 64 (pixels) tile of one batch row that the grouped 1x1
// (grouped_conv/gemm.cu) and the expert epilogue (expert_stage/kernels.cu) compute with: weights and
// inputs staged through shared memory, fp32 FMAs; and the grid of those row-tile kernels.
#pragma once

#include <cstdint>

#include "common/device_math.cuh"
#include "common/dtype.h"

namespace moce {
namespace row_tile {

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

// The grid of a row-tile kernel: x enumerates (row n, 64-pixel tile), n_pt tiles per row; y the blocks
// of 32 of `channels` output channels.
struct Grid {
  int n_pt;
  int64_t gx, gy;
  Grid(int64_t N, int64_t HW, int64_t channels)
      : n_pt((int)cdiv(HW, kMmP)), gx(N * n_pt), gy(cdiv(channels, kMmC)) {}
  bool empty() const { return gx == 0 || gy == 0; }
  bool too_large() const { return gx > 0x7fffffffLL || gy > 65535; }
  dim3 dims() const { return dim3((unsigned)gx, (unsigned)gy); }
};

// kernel(p, n_pt) over `grid`, kThreads per block, on `stream`: nothing for an empty grid, an error
// for one too large; else cudaGetLastError().
template <typename Params>
cudaError_t launch_row_tiles(const Grid& grid, void (*kernel)(Params, int), const Params& p, cudaStream_t stream) {
  if (grid.empty()) return cudaSuccess;
  if (grid.too_large()) return cudaErrorInvalidConfiguration;
#ifdef MOCE_CUDA_EMULATION  // the emulation rewrites the launches of .cu files only (moce_kernels/emulation.py)
  ::emu::Launch(grid.dims(), kThreads, 0, stream)(kernel, p, grid.n_pt);
#else
  kernel<<<grid.dims(), kThreads, 0, stream>>>(p, grid.n_pt);
#endif
  return cudaGetLastError();
}

}  // namespace row_tile
}  // namespace moce
