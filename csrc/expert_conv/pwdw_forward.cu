// Fused pointwise -> depthwise forward (plain, GELU-gated, gated-backward epilogue), grouped over
// experts (kernels.h: PwdwParams, meta columns). Version 3; design and byte counts in
// benchmarks/notes/expert_conv.md.
//
// One block per (row n, 8 x 32 output tile, group of CG pw output channels: 64 for k = 3, 32 for
// k = 5, 7). The 1x1 result of the group over the tile plus its (k-1)/2 halo (64 x 352, 32 x 432,
// 32 x 544) is computed in two halves of the halo's pixels, each accumulated in registers while the
// input channels stream through shared memory 16 at a time, and stored to shared memory (fp32): x is
// read once per channel group (version 2 re-read it once per 16 channels). Tensor cores (wmma
// 16x16x16, fp32 accumulation) for half / bfloat16, register-blocked fp32 FMAs for float (exact, as
// the reference's fp32 conv). Then the pw bias is added and the halo zeroed outside the image (the
// depthwise conv pads the 1x1 *output*), and one warp per channel computes the depthwise conv with a
// lane per output column and the tile's 8 rows in registers, sliding down the halo rows (k loads per
// input row feed k*k FMAs per output); stores are 32 consecutive pixels per warp. Shared memory
// ~101 KB (bf16, k = 3), registers <= 128: two blocks per SM.
#include <mma.h>

#include <type_traits>

#include "expert_conv/device_common.cuh"
#include "expert_conv/kernels.h"

namespace moce {
namespace expert_conv {
namespace {

constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int kTH = 8, kTW = 32;  // output tile: 8 rows x 32 columns (a lane per column)
constexpr int kKC = 16;           // input channels per K step (one MMA k-tile)

template <int K>
struct Geo {
  static constexpr int P = K / 2, HWD = kTW + K - 1, HH = kTH + K - 1, HALO = HH * HWD;
  static constexpr int NT = (HALO + 15) / 16;      // 16-pixel tiles of the halo
  static constexpr int NTH = (NT + 1) / 2;         // ... per half
  static constexpr int NH = NTH * 16;              // pixels per half
  static constexpr int LD = NT * 16;               // row stride of the 1x1 result in smem (floats)
  static constexpr int LDX = NH + 8;               // row stride of the staged inputs (conflict-free B loads)
  static constexpr int CG = K == 3 ? 64 : 32;      // pw output rows per block
  static constexpr int MT = CG / 16;               // 16-row MMA tiles
  static constexpr int NW = kWarps / MT;           // warps sharing an MMA row tile
  static constexpr int TPW = (NTH + NW - 1) / NW;  // MMA column tiles per warp and half
  static constexpr int LDW = kKC + 8;              // row stride of the staged weights
  // float path: thread = 8 rows x PPT pixels of a half (pixel lanes PL apart)
  static constexpr int CGRP = CG / 8, PL = kThreads / CGRP, PPT = (NH + PL - 1) / PL;
};

// Shared memory of a block, in floats: the 1x1 result (CG x LD), the staged inputs and weights
// (aliased as T), the depthwise weights (CG x K*K).
template <typename T, int K>
struct Smem {
  using G = Geo<K>;
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
template <typename T, int K, int NB>
__device__ __forceinline__ void stage(const T* __restrict__ src, int64_t src_off, const T* __restrict__ w,
                                      int64_t w_off, int cin, int k0, int half, int cb, int nch, int ty0, int tx0,
                                      int H, int W, T* sx, T* sw) {
  using G = Geo<K>;
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
template <typename T, int K, bool MMA = !std::is_same<T, float>::value>
struct Pw;

template <typename T, int K>
struct Pw<T, K, true> {
  using G = Geo<K>;
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

template <int K>
struct Pw<float, K, false> {
  using G = Geo<K>;
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
template <int K>
__device__ __forceinline__ void dw_column(const float* __restrict__ y, const float* __restrict__ wk, int lane,
                                          float (&out)[kTH]) {
  using G = Geo<K>;
  float wr[K * K];
#pragma unroll
  for (int t = 0; t < K * K; ++t) wr[t] = wk[t];
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

template <typename T, int K, int MODE>
__global__ void __launch_bounds__(kThreads) pwdw_fwd_kernel(PwdwParams p, int n_tw, int n_tiles, int n_cblk) {
  using G = Geo<K>;
  using S = Smem<T, K>;
  constexpr int NB = MODE > 0 ? 2 : 1;
  constexpr int OUT_PER_BLOCK = G::CG / NB;  // output channels of the block
  extern __shared__ __align__(128) float smem[];
  float* sy = smem;
  T* sx = reinterpret_cast<T*>(smem + S::kY);
  T* sw = reinterpret_cast<T*>(reinterpret_cast<unsigned char*>(sx) + S::kXBytes);
  float* sdw = smem + S::kY + S::kStage;

  const int64_t bid = blockIdx.x;
  const int cb = (int)(bid % n_cblk);
  const int64_t rest = bid / n_cblk;
  const int tile = (int)(rest % n_tiles);
  const int64_t n = rest / n_tiles;
  if (n >= p.N) return;  // uniform over the block
  const int64_t* m = p.meta + 16 * expert_of(p.offsets, n, p.E);
  const int cin = (int)m[0], nch = (int)m[1] / NB;
  if (cb * OUT_PER_BLOCK >= nch) return;  // uniform over the block
  const int64_t srow = p.perm != nullptr ? p.perm[n] / p.kslots : n;
  const int ty0 = (tile / n_tw) * kTH, tx0 = (tile % n_tw) * kTW;
  const T* dw = static_cast<const T*>(p.dw);

  for (int i = threadIdx.x; i < G::CG * K * K; i += kThreads) {
    const int row = pw_row<G::CG, NB>(i / (K * K), cb, nch);
    sdw[i] = row >= 0 ? to_f(dw[m[3] + (int64_t)row * K * K + i % (K * K)]) : 0.f;
  }
  // 1x1 over the halo, two halves of its pixels -> sy
  for (int half = 0; half < 2; ++half) {
    Pw<T, K> pw;
    pw.init();
    for (int k0 = 0; k0 < cin; k0 += kKC) {
      __syncthreads();  // the previous step's operands are consumed
      stage<T, K, NB>(static_cast<const T*>(p.src), m[6] + srow * m[7], static_cast<const T*>(p.w), m[2], cin, k0,
                      half, cb, nch, ty0, tx0, p.H, p.W, sx, sw);
      __syncthreads();
      pw.step(sx, sw, half);
    }
    pw.store(sy, half);
  }
  __syncthreads();
  const T* pb = static_cast<const T*>(p.pb);
  for (int i = threadIdx.x; i < G::CG * G::HALO; i += kThreads) {  // pw bias; zero outside the image
    const int r = i / G::HALO, j = i % G::HALO;
    const int row = pw_row<G::CG, NB>(r, cb, nch);
    const int iy = ty0 - G::P + j / G::HWD, ix = tx0 - G::P + j % G::HWD;
    const bool inside = iy >= 0 && iy < p.H && ix >= 0 && ix < p.W;
    float v = sy[r * G::LD + j];
    if (pb != nullptr && row >= 0) v += to_f(pb[m[4] + row]);
    sy[r * G::LD + j] = inside ? v : 0.f;
  }
  __syncthreads();

  // depthwise: one warp per output channel, a lane per column
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t HW = (int64_t)p.H * p.W;
  const T* db = static_cast<const T*>(p.db);
  const int px = tx0 + lane;
  for (int q = warp; q < OUT_PER_BLOCK; q += kWarps) {
    const int oc = cb * OUT_PER_BLOCK + q;  // output channel; its a row is block row q, b row q + CG/2
    if (oc >= nch) break;
    float a[kTH], b[kTH];
    dw_column<K>(sy + q * G::LD, sdw + q * K * K, lane, a);
    if (NB == 2) dw_column<K>(sy + (G::CG / 2 + q) * G::LD, sdw + (G::CG / 2 + q) * K * K, lane, b);
    const float dba = db != nullptr ? to_f(db[m[5] + oc]) : 0.f;
    const float dbb = (NB == 2 && db != nullptr) ? to_f(db[m[5] + oc + nch]) : 0.f;
    const int64_t obase = m[8] + (oc / m[9]) * m[10] + n * m[11] + (oc % m[9]) * HW;
#pragma unroll
    for (int oy = 0; oy < kTH; ++oy) {
      const int py = ty0 + oy;
      if (py >= p.H || px >= p.W) continue;
      const int64_t pix = (int64_t)py * p.W + px;
      const float av = a[oy] + dba;
      if (MODE == 0) {
        static_cast<T*>(p.out)[obase + pix] = from_f<T>(av);
      } else {
        const float bv = b[oy] + dbb;
        if (MODE == 1) {
          static_cast<T*>(p.out)[obase + pix] = from_f<T>(gelu_f(av) * bv);
        } else {
          const float g = to_f(static_cast<const T*>(p.g)[obase + pix]);
          T* gf = static_cast<T*>(p.gofull);
          const int64_t base = (n * (int64_t)m[1] + oc) * HW + pix;
          gf[base] = from_f<T>(g * bv * gelu_grad_f(av));
          gf[base + (int64_t)nch * HW] = from_f<T>(g * gelu_f(av));
        }
      }
    }
  }
}

template <typename T, int K, int MODE>
cudaError_t launch_t(const PwdwParams& p, cudaStream_t stream) {
  using G = Geo<K>;
  constexpr int NB = MODE > 0 ? 2 : 1;
  const int n_tw = (int)cdiv(p.W, kTW), n_tiles = (int)cdiv(p.H, kTH) * n_tw;
  const int n_cblk = (int)cdiv(p.max_nch, G::CG / NB);
  const int64_t blocks = (int64_t)p.N * n_tiles * n_cblk;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const size_t smem = sizeof(float) * Smem<T, K>::kFloats;
  cudaError_t err = cudaFuncSetAttribute(pwdw_fwd_kernel<T, K, MODE>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)smem);
  if (err != cudaSuccess) return err;
  pwdw_fwd_kernel<T, K, MODE><<<(unsigned)blocks, kThreads, smem, stream>>>(p, n_tw, n_tiles, n_cblk);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_pwdw(DType dt, const PwdwParams& p, cudaStream_t stream) {
  if (p.mode < 0 || p.mode > 2 || (p.K != 3 && p.K != 5 && p.K != 7)) return cudaErrorInvalidValue;
  return with_type(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    switch (p.K * 10 + p.mode) {
      case 30: return launch_t<T, 3, 0>(p, stream);
      case 31: return launch_t<T, 3, 1>(p, stream);
      case 32: return launch_t<T, 3, 2>(p, stream);
      case 50: return launch_t<T, 5, 0>(p, stream);
      case 51: return launch_t<T, 5, 1>(p, stream);
      case 52: return launch_t<T, 5, 2>(p, stream);
      case 70: return launch_t<T, 7, 0>(p, stream);
      case 71: return launch_t<T, 7, 1>(p, stream);
      default: return launch_t<T, 7, 2>(p, stream);
    }
  });
}

}  // namespace expert_conv
}  // namespace moce
