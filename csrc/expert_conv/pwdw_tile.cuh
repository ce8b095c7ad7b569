// The tile machinery shared by the fused pw->dw forward (pwdw_forward.cu) and its backward core
// (pwdw_backward.cu): an 8 x 32 output tile with a (k-1)/2 halo, the block's 1x1 result over the halo
// computed in two halves of its pixels (tensor cores for 16-bit, fp32 FMAs for float) into shared
// memory, and the depthwise conv of one channel for a lane's column with the 8 rows in registers.
#pragma once

#include <mma.h>

#include <type_traits>

#include "expert_conv/device_common.cuh"
#include "expert_conv/kernels.h"

namespace moce {
namespace expert_conv {
namespace tile {

constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int kTH = 8, kTW = 32;  // output tile: 8 rows x 32 columns (a lane per column)
constexpr int kKC = 16;           // input channels per K step (one MMA k-tile)

template <int K, int CG_>
struct Geo {
  static constexpr int P = K / 2, HWD = kTW + K - 1, HH = kTH + K - 1, HALO = HH * HWD;
  static constexpr int NT = (HALO + 15) / 16;      // 16-pixel tiles of the halo
  static constexpr int NTH = (NT + 1) / 2;         // ... per half
  static constexpr int NH = NTH * 16;              // pixels per half
  static constexpr int LD = NT * 16;               // row stride of the 1x1 result in smem (floats)
  static constexpr int LDX = NH + 8;               // row stride of the staged inputs (conflict-free B loads)
  static constexpr int CG = CG_;                   // pw output rows per block
  static constexpr int MT = CG / 16;               // 16-row MMA tiles
  static constexpr int NW = kWarps / MT;           // warps sharing an MMA row tile
  static constexpr int TPW = (NTH + NW - 1) / NW;  // MMA column tiles per warp and half
  static constexpr int LDW = kKC + 8;              // row stride of the staged weights
  // float path: thread = 8 rows x PPT pixels of a half (pixel lanes PL apart)
  static constexpr int CGRP = CG / 8, PL = kThreads / CGRP, PPT = (NH + PL - 1) / PL;
};

// The work of one block: blocks enumerate (row n, output tile, channel block cb), channel blocks
// fastest; m is row n's expert meta row, srow its source row (a gathered row for routed inputs).
struct TileWork {
  int cb, ty0, tx0;
  int64_t n, srow;
  const int64_t* m;
};

// Decodes blockIdx.x; false for blocks past the last row (uniform over the block).
template <typename Params>
__device__ __forceinline__ bool tile_work(const Params& p, int n_tw, int n_tiles, int n_cblk, TileWork& w) {
  const int64_t bid = blockIdx.x;
  w.cb = (int)(bid % n_cblk);
  const int64_t rest = bid / n_cblk;
  const int tile = (int)(rest % n_tiles);
  w.n = rest / n_tiles;
  if (w.n >= p.N) return false;
  w.m = p.meta + 16 * expert_of(p.offsets, w.n, p.E);
  w.srow = p.perm != nullptr ? p.perm[w.n] / p.kslots : w.n;
  w.ty0 = (tile / n_tw) * kTH;
  w.tx0 = (tile % n_tw) * kTW;
  return true;
}

// Element offset of output channel c of row n in the pw->dw output layout (meta columns 8-11: base,
// channels per split, split stride, row stride); add the pixel index.
__device__ __forceinline__ int64_t out_offset(const int64_t* m, int c, int64_t n, int64_t HW) {
  return m[8] + (c / m[9]) * m[10] + n * m[11] + (c % m[9]) * HW;
}

// Shared memory of a block, in floats: the 1x1 result (CG x LD), the staged inputs and weights
// (aliased as T), the depthwise weights (CG x K*K).
template <typename T, int K, int CG>
struct Smem {
  using G = Geo<K, CG>;
  static constexpr int kY = G::CG * G::LD;
  static constexpr int kXBytes = kKC * G::LDX * (int)sizeof(T);
  static constexpr int kWBytes = G::CG * G::LDW * (int)sizeof(T);
  static constexpr int kStage = (kXBytes + kWBytes + 15) / 16 * 4;  // floats, 16-byte aligned
  static constexpr int kDw = G::CG * K * K;
  static constexpr int kFloats = kY + kStage + kDw;
};

// pw output row r of the block (0 <= r < CG) -> pw weight row, or -1 outside the expert's channels.
// plain: rows cb*CG + r; gated: a rows cb*CG/2 + r (r < CG/2) and their b rows nch + cb*CG/2 + r - CG/2.
template <int CG, int NB>
__device__ __forceinline__ int pw_row(int r, int cb, int nch) {
  if (NB == 1) {
    const int c = cb * CG + r;
    return c < nch ? c : -1;
  }
  const int h = r / (CG / 2), c = cb * (CG / 2) + r % (CG / 2);
  return c < nch ? c + h * nch : -1;
}

// Stages input channels [k0, k0 + kKC) of the halo pixels [half * NH, half * NH + NH) (zero
// outside the image / beyond cin) into sx (kKC x LDX) and the block's weights of those channels
// into sw (CG x LDW).
template <typename T, int K, int CG, int NB>
__device__ __forceinline__ void stage(const T* __restrict__ src, int64_t src_off, const T* __restrict__ w,
                                      int64_t w_off, int cin, int k0, int half, int cb, int nch, int ty0, int tx0,
                                      int H, int W, T* sx, T* sw) {
  using G = Geo<K, CG>;
  const int64_t HW = (int64_t)H * W;
  for (int i = threadIdx.x; i < kKC * G::NH; i += kThreads) {
    const int kk = i / G::NH, jh = i % G::NH, j = half * G::NH + jh, k = k0 + kk;
    const int iy = ty0 - G::P + j / G::HWD, ix = tx0 - G::P + j % G::HWD;
    const bool valid = j < G::HALO && k < cin && iy >= 0 && iy < H && ix >= 0 && ix < W;
    sx[kk * G::LDX + jh] = valid ? src[src_off + (int64_t)k * HW + (int64_t)iy * W + ix] : from_f<T>(0.f);
  }
  for (int i = threadIdx.x; i < G::CG * kKC; i += kThreads) {
    const int r = i / kKC, kk = i % kKC, k = k0 + kk, row = pw_row<G::CG, NB>(r, cb, nch);
    sw[r * G::LDW + kk] = (row >= 0 && k < cin) ? w[w_off + (int64_t)row * cin + k] : from_f<T>(0.f);
  }
}

// Accumulators of the 1x1 over the halo: tensor cores for 16-bit T (fragments), fp32 FMAs for float.
template <typename T, int K, int CG, bool MMA = !std::is_same<T, float>::value>
struct Pw;

template <typename T, int K, int CG>
struct Pw<T, K, CG, true> {
  using G = Geo<K, CG>;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[G::TPW];
  int mt, nw;  // this warp's row tile and first column tile

  __device__ __forceinline__ void init() {
    const int warp = threadIdx.x / 32;
    mt = warp % G::MT;
    nw = warp / G::MT;
#pragma unroll
    for (int t = 0; t < G::TPW; ++t) nvcuda::wmma::fill_fragment(acc[t], 0.f);
  }
  // column tile t of this warp in half `half` (in [0, NTH) within the half), or -1
  __device__ __forceinline__ int tile_of(int t, int half) const {
    const int nt = nw + t * G::NW;
    return (nt < G::NTH && half * G::NTH + nt < G::NT) ? nt : -1;
  }
  __device__ __forceinline__ void step(const T* sx, const T* sw, int half) {
    using namespace nvcuda;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
    wmma::load_matrix_sync(a, sw + mt * 16 * G::LDW, G::LDW);
#pragma unroll
    for (int t = 0; t < G::TPW; ++t) {
      const int nt = tile_of(t, half);
      if (nt >= 0) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(b, sx + nt * 16, G::LDX);
        wmma::mma_sync(acc[t], a, b, acc[t]);
      }
    }
  }
  // Writes this thread's part of the half's result to sy (CG x LD).
  __device__ __forceinline__ void store(float* sy, int half) {
#pragma unroll
    for (int t = 0; t < G::TPW; ++t) {
      const int nt = tile_of(t, half);
      if (nt >= 0)
        nvcuda::wmma::store_matrix_sync(sy + mt * 16 * G::LD + half * G::NH + nt * 16, acc[t], G::LD,
                                        nvcuda::wmma::mem_row_major);
    }
  }
};

template <int K, int CG>
struct Pw<float, K, CG, false> {
  using G = Geo<K, CG>;
  float acc[8][G::PPT];
  int grp, lane;  // rows grp*8 .. grp*8+7; pixels lane + i*PL

  __device__ __forceinline__ void init() {
    grp = threadIdx.x / G::PL;
    lane = threadIdx.x % G::PL;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < G::PPT; ++j) acc[i][j] = 0.f;
  }
  __device__ __forceinline__ void step(const float* sx, const float* sw, int) {
#pragma unroll 4
    for (int kk = 0; kk < kKC; ++kk) {
      float xv[G::PPT];
#pragma unroll
      for (int j = 0; j < G::PPT; ++j) {
        const int px = lane + j * G::PL;
        xv[j] = px < G::NH ? sx[kk * G::LDX + px] : 0.f;
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float wv = sw[(grp * 8 + i) * G::LDW + kk];
#pragma unroll
        for (int j = 0; j < G::PPT; ++j) acc[i][j] += wv * xv[j];
      }
    }
  }
  __device__ __forceinline__ void store(float* sy, int half) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < G::PPT; ++j) {
        const int px = half * G::NH + lane + j * G::PL;
        if (lane + j * G::PL < G::NH && px < G::LD) sy[(grp * 8 + i) * G::LD + px] = acc[i][j];
      }
  }
};

// Depthwise k x k of one channel's 1x1 result (sy row, halo layout) for this lane's column: out[0..8).
// wk: the k*k weights, row-major; FLIP: use them rotated by 180 degrees (the correlation of the
// backward).
template <int K, bool FLIP = false>
__device__ __forceinline__ void dw_column(const float* __restrict__ y, const float* __restrict__ wk, int lane,
                                          float (&out)[kTH]) {
  using G = Geo<K, 32>;
  float wr[K * K];
#pragma unroll
  for (int t = 0; t < K * K; ++t) wr[t] = wk[FLIP ? K * K - 1 - t : t];
#pragma unroll
  for (int oy = 0; oy < kTH; ++oy) out[oy] = 0.f;
#pragma unroll
  for (int ri = 0; ri < G::HH; ++ri) {
    float v[K];
#pragma unroll
    for (int dx = 0; dx < K; ++dx) v[dx] = y[ri * G::HWD + lane + dx];
#pragma unroll
    for (int dy = 0; dy < K; ++dy) {
      const int oy = ri - dy;
      if (oy >= 0 && oy < kTH) {
#pragma unroll
        for (int dx = 0; dx < K; ++dx) out[oy] += wr[dy * K + dx] * v[dx];
      }
    }
  }
}

// The block's 1x1 result over the tile plus halo into sy (CG x LD, fp32): two halves of the halo's
// pixels, input channels streamed through shared memory; then the pw bias is added and the halo
// zeroed outside the image (the depthwise conv pads the 1x1 *output*). Ends with a barrier.
template <typename T, int K, int CG, int NB, typename Params>
__device__ __forceinline__ void pw_halo(const Params& p, const int64_t* m, int64_t srow, int cb, int nch, int ty0,
                                        int tx0, float* sy, T* sx, T* sw) {
  using G = Geo<K, CG>;
  const int cin = (int)m[0];
  for (int half = 0; half < 2; ++half) {
    Pw<T, K, CG> pw;
    pw.init();
    for (int k0 = 0; k0 < cin; k0 += kKC) {
      __syncthreads();  // the previous step's operands are consumed
      stage<T, K, CG, NB>(static_cast<const T*>(p.src), m[6] + srow * m[7], static_cast<const T*>(p.w), m[2], cin,
                          k0, half, cb, nch, ty0, tx0, p.H, p.W, sx, sw);
      __syncthreads();
      pw.step(sx, sw, half);
    }
    pw.store(sy, half);
  }
  __syncthreads();
  const T* pb = static_cast<const T*>(p.pb);
  for (int i = threadIdx.x; i < CG * G::HALO; i += kThreads) {
    const int r = i / G::HALO, j = i % G::HALO;
    const int row = pw_row<CG, NB>(r, cb, nch);
    const int iy = ty0 - G::P + j / G::HWD, ix = tx0 - G::P + j % G::HWD;
    const bool inside = iy >= 0 && iy < p.H && ix >= 0 && ix < p.W;
    float v = sy[r * G::LD + j];
    if (pb != nullptr && row >= 0) v += to_f(pb[m[4] + row]);
    sy[r * G::LD + j] = inside ? v : 0.f;
  }
  __syncthreads();
}

// The block's depthwise weights (CG x K*K, fp32) into sdw.
template <typename T, int K, int CG, int NB, typename Params>
__device__ __forceinline__ void stage_dw(const Params& p, const int64_t* m, int cb, int nch, float* sdw) {
  const T* dw = static_cast<const T*>(p.dw);
  for (int i = threadIdx.x; i < CG * K * K; i += kThreads) {
    const int row = pw_row<CG, NB>(i / (K * K), cb, nch);
    sdw[i] = row >= 0 ? to_f(dw[m[3] + (int64_t)row * K * K + i % (K * K)]) : 0.f;
  }
}

}  // namespace tile
}  // namespace expert_conv
}  // namespace moce
