// The tile machinery shared by the fused pw->dw forward (pwdw_forward.cu) and its backward core
// (pwdw_backward.cu): an 8 x 32 output tile with a (k-1)/2 halo in one of two shared-memory layouts
// (Geo), the staging of x and the weights (element-wise, or 16-byte cp.async), the block's 1x1 result
// over the halo computed in parts (mma.sync for 16-bit, fp32 FMAs for float), and the depthwise conv of
// one channel (fp32 FMAs, a lane per column; or, 16-bit, tensor cores as a banded Toeplitz product).
#pragma once

#include <type_traits>

#include "common/async_copy.cuh"
#include "common/device_math.cuh"
#include "common/dtype.h"
#include "common/expert_stage_meta.h"
#include "common/warp_mma.cuh"
#include "grouped_conv/kernels.h"

namespace moce {
namespace grouped_conv {
namespace tile {

// The bits of an element type, for copies that need no conversion (a 16-bit zero is then just a zero
// register; fp32 0.0f is all-zero bits too).
template <typename T> struct RawBits { using type = unsigned short; };
template <> struct RawBits<float> { using type = unsigned int; };

// p, hidden from the optimiser's integer reassociation: indexing it then costs one IMAD.WIDE per
// element (base register + offset) instead of a 64-bit index sum rescaled and rebased per element.
template <typename P>
__device__ __forceinline__ P* opaque(P* p) {
#ifdef __CUDA_ARCH__
  asm("" : "+l"(p));
#endif
  return p;
}

namespace col = moce_meta::pw_dw_col;  // the meta columns of every pw->dw kernel (kernels.h)

constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int kTH = 8, kTW = 32;  // output tile: 8 rows x 32 columns (a lane per column)
constexpr int kKC = 16;           // input channels per K step (one MMA k-tile)

// Layout of a block's halo in shared memory (the staged x and the 1x1 result y): HH rows of RS
// pixels, halo column c at row position C0 + c.
//   linear (WIN = false): RS = HWD, C0 = 0: the halo's pixels, nothing else (fp32 forward, backward);
//   window (WIN = true):  RS = 48, C0 = 8 - P: image columns tx0 - 8 .. tx0 + 39, six aligned 8-pixel
//                          chunks per row, so that x can be staged by 16-byte cp.async (16-bit forward).
// MMA: the 1x1 runs on mma.sync (16-bit inputs), whose K step loads every warp's TPW column tiles
// without a predicate, so a part holds a multiple of NW tiles; the fp32 FMA path needs no rounding.
template <int K, int CG_, bool WIN_, bool MMA_>
struct Geo {
  static constexpr bool WIN = WIN_;
  static constexpr int P = K / 2, HWD = kTW + K - 1, HH = kTH + K - 1;
  static constexpr int RS = WIN ? kTW + 16 : HWD, C0 = WIN ? 8 - P : 0, HALO = HH * RS;
  static_assert(P <= 8, "the window holds halos of up to 8 columns");
  static constexpr int NT = (HALO + 15) / 16;      // 16-pixel tiles of the halo
  static constexpr int NPART = (NT + 11) / 12;     // parts of the halo computed one after the other (the
                                                   // accumulators of a part stay in registers)
  static constexpr int CG = CG_;                   // pw output rows per block
  static constexpr int MT = CG / 16;               // 16-row MMA tiles
  // MMA row tiles per warp: 2 in the 16-bit forward at k = 5, 7 (each staged x tile is then read by
  // half as many warps, for the same tiles per part), else 1
  static constexpr int RT = (MMA_ && WIN_ && K >= 5 && MT % 2 == 0) ? 2 : 1;
  static constexpr int NW = kWarps / (MT / RT);    // warps sharing a row tile (group)
  static constexpr int TPW = ((NT + NPART - 1) / NPART + NW - 1) / NW;  // MMA column tiles per warp and part
  static constexpr int NTH = MMA_ ? TPW * NW : (NT + NPART - 1) / NPART;  // 16-pixel tiles per part (with MMA,
                                                   // the last part's tiles past the halo are computed on
                                                   // zeros and not stored)
  static constexpr int NH = NTH * 16;              // pixels per part
  static constexpr int LD = NT * 16 + 8;           // row stride of the 1x1 result in smem (elements; the tail
                                                   // past the halo is never read)
  static constexpr int LDX = NH + 8;               // row stride of the staged inputs (conflict-free B loads)
  static_assert((NPART - 1) * NTH < NT, "every part holds tiles of the halo");
  static constexpr int LDW = kKC + 8;              // row stride of the staged weights
  // float path: thread = 8 rows x PPT pixels of a part (pixel lanes PL apart)
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
  w.m = p.meta + moce_meta::kRowWidth * expert_of(p.offsets, w.n, p.E);
  w.srow = p.perm != nullptr ? p.perm[w.n] / p.kslots : w.n;
  w.ty0 = (tile / n_tw) * kTH;
  w.tx0 = (tile % n_tw) * kTW;
  return true;
}

// Element offsets of row n's output channels in the pw->dw output layout (meta columns OUT,
// OUT_SPLIT, OUT_SPLIT_STRIDE, OUT_ROW_STRIDE), read once per block: oa(c) + pixel index.
struct OutAddr {
  int64_t base, split_stride, HW;
  int split;
  __device__ __forceinline__ OutAddr(const int64_t* m, int64_t n, int64_t HW_)
      : base(m[col::OUT] + n * m[col::OUT_ROW_STRIDE]), split_stride(m[col::OUT_SPLIT_STRIDE]), HW(HW_),
        split((int)m[col::OUT_SPLIT]) {}
  __device__ __forceinline__ int64_t operator()(int c) const {
    const unsigned uc = (unsigned)c, us = (unsigned)split;  // both >= 0: unsigned division is cheaper
    return base + (int64_t)(uc / us) * split_stride + (int64_t)(uc % us) * HW;
  }
};

// The offsets oa(c) of channels c0, c0 + step, c0 + 2 step, ... (c0 >= 0, 0 < step), one division in
// all: off = oa(c), r = c % split.
struct OutWalk {
  int64_t off, wrap;  // wrap: what crossing into the next split adds (split stride - split * HW)
  int r, split, step;
  int64_t dstep;      // step * HW
  __device__ __forceinline__ OutWalk(const OutAddr& oa, int c0, int step_)
      : off(oa(c0)), wrap(oa.split_stride - oa.split * oa.HW), r((int)((unsigned)c0 % (unsigned)oa.split)),
        split(oa.split), step(step_), dstep(step_ * oa.HW) {}
  __device__ __forceinline__ void next() {
    r += step;
    off += dstep;
    while (r >= split) {
      r -= split;
      off += wrap;
    }
  }
};

// Shared memory of a block, in floats: the 1x1 result (CG x LD elements of Y: float, or T for the
// 16-bit forward), the staged inputs and weights (aliased as T; two buffers in the window layout,
// where cp.async fills one while the MMAs read the other), the depthwise weights (CG x K*K of D: T in
// the window layout, which the tensor-core depthwise packs into operands anyway, else float).
// The layout of a block for input type T (the 1x1 on mma.sync unless T is float).
template <typename T, int K, int CG, bool WIN = false>
using GeoOf = Geo<K, CG, WIN, !std::is_same<T, float>::value>;

template <typename T, int K, int CG, typename Y = float, bool WIN = false>
struct Smem {
  using G = GeoOf<T, K, CG, WIN>;
  static constexpr int kY = (G::CG * G::LD * (int)sizeof(Y) + 15) / 16 * 4;
  static constexpr int kXBytes = kKC * G::LDX * (int)sizeof(T);
  static constexpr int kWBytes = G::CG * G::LDW * (int)sizeof(T);
  static constexpr int kBuf = WIN ? 2 : 1;                               // window layout: double-buffered (cp.async)
  static constexpr int kStage1 = (kXBytes + kWBytes + 15) / 16 * 4;    // one buffer, floats, 16-byte aligned
  static constexpr int kStage = kBuf * kStage1;
  using D = std::conditional_t<WIN, T, float>;                       // depthwise weights: T for the 16-bit forward
  static constexpr int kDw = (G::CG * K * K * (int)sizeof(D) + 15) / 16 * 4;
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

// An image pixel offset that marks "outside the image" (offsets are unsigned and < H * W <= 2^31 - 1).
constexpr unsigned kOutside = 0xffffffffu;

// Pixels j0 + CW (lane + 32 u) (u < U) of layout G (row j / RS, position j % RS) for this thread's lane:
// their offsets in the image (iy * W + ix), or kOutside outside the image or past the layout
// (j >= HALO). Computed once, so that the per-channel loops that stage or patch the halo do no index
// arithmetic (unsigned: one IMAD.WIDE.U32 per address). CW > 1: the first pixels of CW-pixel chunks,
// each wholly inside or outside when W, j0 and the layout's image column of position 0 are multiples
// of CW (and CW divides RS).
template <typename G, int U>
struct HaloLane {
  unsigned off[U];

  __device__ __forceinline__ bool in(int u) const { return off[u] != kOutside; }

  template <int CW = 1>
  __device__ __forceinline__ void init(int j0, int ty0, int tx0, int H, int W) {
    static_assert(G::RS % CW == 0, "a chunk lies in one row of the layout");
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + CW * (lane + 32 * u);
      const int iy = ty0 - G::P + j / G::RS, ix = tx0 - G::P - G::C0 + j % G::RS;
      off[u] = (j < G::HALO && iy >= 0 && iy < H && ix >= 0 && ix < W) ? (unsigned)(iy * W + ix) : kOutside;
    }
  }
};

// Staging of one K step: input channels [k0, k0 + kKC) over the pixels of one part into sx (kKC x LDX;
// zero outside the image / beyond cin) and the block's weights of those channels into sw (CG x LDW).
// Four ways, chosen per block (uniformly, copy_bytes()):
//  * 0, element-wise (any layout, any alignment): a warp per channel row and a lane per pixel, the pixel
//    offsets precomputed per part; each thread owns the same EW consecutive entries of one weight row;
//  * 16, 16-byte cp.async (window layout, when W % 8 == 0 with 16-byte aligned x planes and C_in % 8 == 0
//    with aligned weight rows): a thread per 8-pixel chunk of a row, the chunks' addresses precomputed
//    per part, zero fill for chunks outside the image; two threads per weight row;
//  * 8 or 4, the same weights, x by 8- or 4-byte cp.async of 4- or 2-pixel chunks when W % 4 == 0 or W
//    is even (the levels below the first of an image padded to a multiple of 8): a warp per channel row
//    and a lane per chunk (the chunks' offsets precomputed per part, the rows' planes per block).
// The cp.async ways commit a group per step; the caller waits.
template <typename T, int K, int CG, int NB, bool WIN = false>
struct Stager {
  using G = GeoOf<T, K, CG, WIN>;
  using R = typename RawBits<T>::type;  // copied as raw bits: a zeroed register and a predicated load
  static constexpr int kU = (G::NH + 31) / 32;           // pixel slots per lane and part
  static constexpr int kEW = G::CG * kKC / kThreads;     // weight entries per thread and step
  static_assert(G::CG * kKC % kThreads == 0 && kKC % kEW == 0, "weight staging: CG * kKC / threads entries each");
  static constexpr int kCPR = G::NH / 8;                              // 8-pixel chunks per channel and part
  static constexpr int kCU = WIN ? (kKC * kCPR + kThreads - 1) / kThreads : 1;  // chunk slots per thread
  static_assert(!WIN || (G::RS % 8 == 0 && G::NH % 8 == 0 && sizeof(T) == 2), "chunks of 8 16-bit pixels");
  static constexpr int kNever = 1 << 30;  // a channel limit that no count of remaining channels reaches
  HaloLane<G, kU> px;
  // cp.async, per slot: the thread's chunk at input channel kk of the step (k0 = 0), or wbase outside the
  // image or when kk >= cin; its place in sx; kk (kKC for no chunk); and kk, or kNever when the pointer
  // is wbase (the chunk is copied while kk < cin - k0, else zero-filled from the k0 = 0 address, which
  // is then valid: kk < cin)
  const T* cptr[kCU];
  int cdst[kCU], ckk[kCU], clim[kCU];
  const T* wp;         // this thread's weights: row of block row wr, from input channel wk; null outside the expert
  int wr, wk;
  const T* wrow16;     // cp.async weights: row of block row threadIdx.x / 2 from channel 8 (threadIdx.x % 2), or
                       // wbase outside the expert or past the row (C_in = 8)
  int wlim;            // ... its first channel (threadIdx.x % 2 * 8), or kNever where wrow16 is wbase
  const T* wbase;      // the weights' base (a valid, aligned address for zero-fill copies)
  int x_bytes;         // x's copy width: 16, 8, 4 (8-, 4-, 2-pixel chunks), 0 (element-wise)
  bool fast_w;
  const T* xrow[kKC / kWarps];  // 8- and 4-byte copies: this warp's channel rows kk = warp + 8 i at k0 = 0, or
                                // the row's channel 0 where kk >= cin

  __device__ __forceinline__ void init_weights(const T* w, int64_t w_off, int cin, int cb, int nch) {
    wbase = w;
    wr = threadIdx.x / (kKC / kEW);
    wk = threadIdx.x % (kKC / kEW) * kEW;
    const int row = pw_row<G::CG, NB>(wr, cb, nch);
    wp = row >= 0 ? w + w_off + (int64_t)row * cin + wk : nullptr;
    fast_w = WIN && cin % 8 == 0 && w_off % 8 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0;
    const int row16 = threadIdx.x < 2 * G::CG ? pw_row<G::CG, NB>(threadIdx.x / 2, cb, nch) : -1;
    const bool in16 = row16 >= 0 && threadIdx.x % 2 * 8 < cin;
    wrow16 = in16 ? w + w_off + (int64_t)row16 * cin + threadIdx.x % 2 * 8 : w;
    wlim = in16 ? threadIdx.x % 2 * 8 : kNever;
  }
  // x may go by cp.async (window layout) in the widest chunks of 8, 4 or 2 pixels that are aligned in
  // global memory
  __device__ __forceinline__ void init_x(const T* src, int64_t src_off, int64_t HW, int cin, int W) {
    auto aligned = [&](int n) {  // chunks of n pixels start at n * sizeof(T)-byte aligned addresses
      return W % n == 0 && src_off % n == 0 && reinterpret_cast<uintptr_t>(src) % (n * sizeof(T)) == 0;
    };
    x_bytes = !WIN ? 0 : aligned(8) ? 16 : aligned(4) ? 8 : aligned(2) ? 4 : 0;
#pragma unroll
    for (int i = 0; i < kKC / kWarps; ++i) {
      const int kk = threadIdx.x / 32 + kWarps * i;
      xrow[i] = opaque(src + src_off + (kk < cin ? (int64_t)kk * HW : 0));
    }
#pragma unroll
    for (int s = 0; s < kCU; ++s) {
      const int i = threadIdx.x + kThreads * s;  // chunk i % kCPR of channel i / kCPR
      ckk[s] = i < kKC * kCPR ? i / kCPR : kKC;
      cdst[s] = ckk[s] * G::LDX + 8 * (i % kCPR);
    }
  }
  template <int MODE>
  __device__ __forceinline__ void init_part(int part, const T* src, int64_t src_off, int64_t HW, int cin, int ty0,
                                            int tx0, int H, int W) {
    if constexpr (MODE == 16) {
#pragma unroll
      for (int s = 0; s < kCU; ++s) {
        const int q = (threadIdx.x + kThreads * s) % kCPR;
        const int j = part * G::NH + 8 * q, iy = ty0 - G::P + j / G::RS, ix = tx0 - G::P - G::C0 + j % G::RS;
        const bool in = ckk[s] < kKC && ckk[s] < cin && j < G::HALO && iy >= 0 && iy < H && ix >= 0 && ix + 8 <= W;
        cptr[s] = in ? src + src_off + (int64_t)ckk[s] * HW + (int64_t)iy * W + ix : wbase;
        clim[s] = in ? ckk[s] : kNever;
      }
    } else if constexpr (MODE > 0) {
      px.template init<MODE / (int)sizeof(T)>(part * G::NH, ty0, tx0, H, W);
    } else {
      px.init(part * G::NH, ty0, tx0, H, W);
    }
  }
  // the staging of the block (uniform): 16, 8 or 4 (x's cp.async width, the weights by 16-byte
  // cp.async), or 0 (both element-wise)
  __device__ __forceinline__ int copy_bytes() const { return WIN && fast_w ? x_bytes : 0; }
  template <int MODE>
  __device__ __forceinline__ void stage(const T* __restrict__ src, int64_t src_off, int64_t HW, int cin, int k0,
                                        T* sx, T* sw) const {
    if constexpr (MODE > 0) {
      const int rem = cin - k0;  // channels left
      if constexpr (MODE == 16) {
        const int64_t step = (int64_t)k0 * HW;
#pragma unroll
        for (int s = 0; s < kCU; ++s) {
          if (ckk[s] < kKC) {
            const bool in = clim[s] < rem;
            async_copy::copy16(sx + cdst[s], cptr[s] + (in ? step : 0), in);
          }
        }
      } else {
        stage_x_narrow<MODE / (int)sizeof(T)>(HW, k0, rem, sx);
      }
      if (threadIdx.x < 2 * G::CG) {
        const bool in = wlim < rem;
        async_copy::copy16(sw + threadIdx.x / 2 * G::LDW + threadIdx.x % 2 * 8, wrow16 + (in ? k0 : 0), in);
      }
      async_copy::commit();  // the caller waits
    } else {
      stage_x(src, src_off, HW, cin, k0, sx);
      stage_w(cin, k0, sw);
    }
  }
  // 8- or 4-byte cp.async of CW-pixel chunks (CW = 4, 2): a warp per channel row, a lane per chunk;
  // chunks outside the image or past the halo, and channels >= cin (rem: channels left), are
  // zero-filled from a valid source (the chunk's row at the step's channel, or the row's channel 0)
  template <int CW>
  __device__ __forceinline__ void stage_x_narrow(int64_t HW, int k0, int rem, T* sx) const {
    constexpr int kChunks = G::NH / CW, kNU = (kChunks + 31) / 32;
    static_assert(G::NH % CW == 0 && kNU <= kU && kKC % kWarps == 0, "chunks of the part's pixels, offsets in px");
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t step = (int64_t)k0 * HW;
#pragma unroll
    for (int i = 0; i < kKC / kWarps; ++i) {
      const int kk = warp + kWarps * i;
      const bool kin = kk < rem;
      const T* chan = opaque(xrow[i] + (kin ? step : 0));
      T* row = sx + kk * G::LDX + CW * lane;
#pragma unroll
      for (int u = 0; u < kNU; ++u) {
        if (kChunks % 32 == 0 || lane + 32 * u < kChunks) {
          const bool in = kin && px.in(u);
          async_copy::copy_ca<CW * (int)sizeof(T)>(row + 32 * CW * u, chan + (in ? px.off[u] : 0u), in);
        }
      }
    }
  }
  __device__ __forceinline__ void stage_x(const T* __restrict__ src, int64_t src_off, int64_t HW, int cin, int k0,
                                          T* sx) const {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int kk = warp; kk < kKC; kk += kWarps) {
      const int k = k0 + kk;
      const R* chan = opaque(reinterpret_cast<const R*>(src) + src_off + (int64_t)k * HW);
      R* row = reinterpret_cast<R*>(sx) + kk * G::LDX + lane;
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        R v = 0;
        if (k < cin && px.in(u)) v = __ldg(chan + px.off[u]);
        if (lane + 32 * u < G::NH) row[32 * u] = v;
      }
    }
  }
  __device__ __forceinline__ void stage_w(int cin, int k0, T* sw) const {
    R* dst = reinterpret_cast<R*>(sw) + wr * G::LDW + wk;
    const R* wk0 = opaque(reinterpret_cast<const R*>(wp) + k0);
#pragma unroll
    for (int e = 0; e < kEW; ++e) {
      R v = 0;
      if (wp != nullptr && k0 + wk + e < cin) v = __ldg(wk0 + e);
      dst[e] = v;
    }
  }
};

// Accumulators of the 1x1 over the halo: tensor cores for 16-bit T (fragments), fp32 FMAs for float.
template <typename T, int K, int CG, bool WIN = false, bool MMA = !std::is_same<T, float>::value>
struct Pw;

template <typename T, int K, int CG, bool WIN>
struct Pw<T, K, CG, WIN, true> {
  using G = Geo<K, CG, WIN, true>;
  // mma.sync m16n8k16 (warp_mma.cuh): per row tile and 16-pixel column tile two n8 accumulators; A
  // (the weights, 16 rows x 16 input channels) by one ldmatrix per row tile, B (16 channels x 16
  // pixels) by one ldmatrix.trans per column tile, shared by the warp's RT row tiles.
  float acc[G::RT][G::TPW][2][4];
  float bias[G::RT][2];  // pw bias of this lane's rows g and g + 8 of each row tile
  int mt, nw, lim;  // this warp's first row tile and first column tile; the part's column tiles in the halo

  __device__ __forceinline__ static int first_row_tile() { return (threadIdx.x / 32) % (G::MT / G::RT) * G::RT; }
  template <int NB>
  __device__ __forceinline__ void set_bias(const T* pb, int64_t pb_off, int cb, int nch) {
    const int r0 = first_row_tile() * 16 + threadIdx.x % 32 / 4;
#pragma unroll
    for (int rt = 0; rt < G::RT; ++rt)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int row = pw_row<G::CG, NB>(r0 + 16 * rt + 8 * i, cb, nch);
        bias[rt][i] = (pb != nullptr && row >= 0) ? to_f(pb[pb_off + row]) : 0.f;
      }
  }
  __device__ __forceinline__ void init(int part) {
    mt = first_row_tile();
    nw = threadIdx.x / 32 / (G::MT / G::RT);
    lim = G::NT - part * G::NTH < G::NTH ? G::NT - part * G::NTH : G::NTH;
    // the accumulators start at the pw bias (rows g, g + 8: d[0..1], d[2..3]), so the store adds nothing
#pragma unroll
    for (int rt = 0; rt < G::RT; ++rt)
#pragma unroll
      for (int t = 0; t < G::TPW; ++t)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            acc[rt][t][h][i] = bias[rt][i / 2];
#ifdef __CUDA_ARCH__
            asm volatile("" : "+f"(acc[rt][t][h][i]));  // set here, once, not re-set on each path into the K loop
#endif
          }
  }
  __device__ __forceinline__ void step(const T* sx, const T* sw, int) {
    const int lane = threadIdx.x % 32, m = lane / 8, r = lane % 8;
    uint32_t a[G::RT][4];  // per row tile, matrices: rows 0-7 / 8-15 (m % 2) x channels 0-7 / 8-15 (m / 2)
#pragma unroll
    for (int rt = 0; rt < G::RT; ++rt)
      warp_mma::ldsm_x4<false>(a[rt], sw + ((mt + rt) * 16 + (m % 2) * 8 + r) * G::LDW + (m / 2) * 8);
    // channels (m % 2) * 8 + r, pixels (m / 2) * 8 of this warp's first tile; tile t is NW tiles further
    const T* brow = sx + ((m % 2) * 8 + r) * G::LDX + (m / 2) * 8 + nw * 16;
    // every tile, also those past the halo in the last part (staged as zeros; not stored): no predicate
#pragma unroll
    for (int t = 0; t < G::TPW; ++t) {
      uint32_t b[4];  // b[0..1]: pixels 0-7 of the tile, b[2..3]: pixels 8-15
      warp_mma::ldsm_x4<true>(b, brow + t * G::NW * 16);
      const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
#pragma unroll
      for (int rt = 0; rt < G::RT; ++rt) {
        warp_mma::mma_16816<T>(acc[rt][t][0], a[rt], b0);
        warp_mma::mma_16816<T>(acc[rt][t][1], a[rt], b1);
      }
    }
  }
  // Writes this thread's share of the part's result (bias included) to sy (CG x LD of Y, rounded once
  // to Y): rows g and g + 8 of each row tile, pixel pairs 2t, 2t + 1 of each n8 tile, for the column
  // tiles nw + t NW inside the halo (those past it would run into the next row).
  template <typename Y>
  __device__ __forceinline__ void store(Y* sy, int part) {
    const int lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
    Y* y0 = sy + (mt * 16 + g) * G::LD + part * G::NH + nw * 16 + 2 * tq;  // tile t at + t NW 16
#pragma unroll
    for (int t = 0; t < G::TPW; ++t) {
      if (nw + t * G::NW < lim) {
#pragma unroll
        for (int rt = 0; rt < G::RT; ++rt) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            Y* y = y0 + 16 * rt * G::LD + t * G::NW * 16 + h * 8;
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              Y* yi = y + 8 * i * G::LD;
              const float v0 = acc[rt][t][h][2 * i], v1 = acc[rt][t][h][2 * i + 1];
              warp_mma::check_aligned(yi, 2 * sizeof(Y), "1x1 result pair");
              if constexpr (std::is_same<Y, float>::value)
                *reinterpret_cast<float2*>(yi) = make_float2(v0, v1);
              else
                *reinterpret_cast<uint32_t*>(yi) = warp_mma::pack2<Y>(v0, v1);
            }
          }
        }
      }
    }
  }
};

template <int K, int CG, bool WIN>
struct Pw<float, K, CG, WIN, false> {
  using G = Geo<K, CG, WIN, false>;
  float acc[8][G::PPT];
  float bias[8];  // pw bias of rows grp*8 .. grp*8+7
  int grp, lane;  // rows grp*8 .. grp*8+7; pixels lane + i*PL

  template <int NB>
  __device__ __forceinline__ void set_bias(const float* pb, int64_t pb_off, int cb, int nch) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int row = pw_row<G::CG, NB>(threadIdx.x / G::PL * 8 + i, cb, nch);
      bias[i] = (pb != nullptr && row >= 0) ? pb[pb_off + row] : 0.f;
    }
  }
  __device__ __forceinline__ void init(int) {
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
  template <typename Y>
  __device__ __forceinline__ void store(Y* sy, int part) {
    static_assert(std::is_same<Y, float>::value, "the fp32 path keeps its 1x1 result in fp32");
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < G::PPT; ++j) {
        const int px = part * G::NH + lane + j * G::PL;
        if (lane + j * G::PL < G::NH && px < G::LD) sy[(grp * 8 + i) * G::LD + px] = acc[i][j] + bias[i];
      }
  }
};

// f(oy, t, v) for every output row oy < kTH of this lane's column and tap t = dy * k + dx of the
// k x k window, v = y(oy + dy, lane + dx) of a channel's halo (layout G; each value read once).
template <typename G, typename F>
__device__ __forceinline__ void for_each_tap(const float* y, int lane, F&& f) {
  constexpr int K = 2 * G::P + 1;
#pragma unroll
  for (int ri = 0; ri < G::HH; ++ri) {
    float v[K];
#pragma unroll
    for (int dx = 0; dx < K; ++dx) v[dx] = y[ri * G::RS + G::C0 + lane + dx];
#pragma unroll
    for (int dy = 0; dy < K; ++dy) {
      const int oy = ri - dy;
      if (oy >= 0 && oy < kTH) {
#pragma unroll
        for (int dx = 0; dx < K; ++dx) f(oy, dy * K + dx, v[dx]);
      }
    }
  }
}

// Depthwise k x k of one channel's 1x1 result (sy row in layout G) for this lane's column: out[0..8).
// wk: the k*k weights, row-major; FLIP: use them rotated by 180 degrees (the correlation of the
// backward).
template <typename G, bool FLIP = false>
__device__ __forceinline__ void dw_column(const float* __restrict__ y, const float* __restrict__ wk, int lane,
                                          float (&out)[kTH]) {
  constexpr int K = 2 * G::P + 1;
  float wr[K * K];
#pragma unroll
  for (int t = 0; t < K * K; ++t) wr[t] = wk[FLIP ? K * K - 1 - t : t];
#pragma unroll
  for (int oy = 0; oy < kTH; ++oy) out[oy] = 0.f;
  for_each_tap<G>(y, lane, [&](int oy, int t, float v) { out[oy] += wr[t] * v; });
}

// Depthwise k x k of one channel on tensor cores (16-bit T, window layout G): each row shift dy is a
// banded Toeplitz product. B (16 x 8) holds w[dy][j - x - DOFF] for A column j and output column x
// (zero outside [0, k)), DOFF = C0 - 4; it does not depend on where the 8 output columns lie, so one
// MMA serves two 8-column slices: for x0 = 8 h (h = 0, 1), A rows 0-7 hold the 1x1 result (kept in T)
// at rows oy + dy (oy < 8) and row positions x0 + 4 .. x0 + 19, A rows 8-15 the same rows at positions
// x0 + 20 .. x0 + 35 (the slice 16 columns further). Output column x0 + x reads positions
// x0 + x + C0 .. + k - 1, which are A columns x + DOFF .. x + DOFF + k - 1, inside [0, 16)
// (static_assert); the last position read, 8 + 16 + 4 + 15 = 43, stays inside the 48-position row.
template <typename G>
struct DwTc {
  static constexpr int K = 2 * G::P + 1, AOFF = 4, DOFF = G::C0 - AOFF;
  static_assert(G::WIN && DOFF >= 0 && 7 + DOFF + K - 1 <= 15 && 8 + 16 + AOFF + 15 < G::RS, "A covers every tap");
  // this lane's B elements are taps d0, d0 + 1 (b[0]) and d0 + 8, d0 + 9 (b[1]), d0 = 2 t - g - DOFF:
  // their indices clamped into [0, k), and masks that zero the taps outside [0, k) (the same for
  // every channel, so the per-channel operands need no predicate)
  int idx[4];
  uint32_t mask[2];

  __device__ __forceinline__ DwTc() {
    const int lane = threadIdx.x % 32, d0 = 2 * (lane % 4) - lane / 4 - DOFF;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int d = d0 + (j / 2) * 8 + j % 2;
      idx[j] = d < 0 ? 0 : (d >= K ? K - 1 : d);
    }
    auto in = [&](int d) { return d >= 0 && d < K; };
#pragma unroll
    for (int i = 0; i < 2; ++i)
      mask[i] = (in(d0 + 8 * i) ? 0xffffu : 0u) | (in(d0 + 8 * i + 1) ? 0xffff0000u : 0u);
  }

  // One channel: y its 1x1 result (layout G, in T), wk its k * k weights (T, row-major).
  // out[nt][e] = output (row g, column 8 nt + 2 t + e) of the lane, before the dw bias.
  template <typename T>
  __device__ __forceinline__ void operator()(const T* __restrict__ y, const T* __restrict__ wk,
                                             float (&out)[4][2]) const {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const uint16_t* w = reinterpret_cast<const uint16_t*>(wk);
    float acc[2][4];
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[h][i] = 0.f;
#pragma unroll
    for (int dy = 0; dy < K; ++dy) {
      const uint16_t* wr = w + dy * K;
      uint32_t b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) b[i] = ((uint32_t)wr[idx[2 * i]] | (uint32_t)wr[idx[2 * i + 1]] << 16) & mask[i];
      const T* row = y + (g + dy) * G::RS + AOFF + 2 * t;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const T* r = row + 8 * h;
        warp_mma::check_aligned(r, 4, "depthwise A pair");
        auto ld = [&](int off) { return *reinterpret_cast<const uint32_t*>(r + off); };
        // (rows, k): (0-7, 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15)
        const uint32_t a[4] = {ld(0), ld(16), ld(8), ld(24)};
        warp_mma::mma_16816<T>(acc[h], a, b);
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      out[h][0] = acc[h][0];
      out[h][1] = acc[h][1];
      out[h + 2][0] = acc[h][2];
      out[h + 2][1] = acc[h][3];
    }
  }
};

// The block's 1x1 result plus the pw bias over the tile and halo into sy (CG x LD of Y: fp32, or T
// for the 16-bit forward, rounded once): NPART parts of the halo's pixels, input channels streamed
// through shared memory; then the halo is zeroed outside the image (the depthwise conv pads the 1x1
// *output*) and past it. Ends with a barrier.
template <typename T, int K, int CG, int NB, typename Y, bool WIN, typename Params>
__device__ __forceinline__ void pw_halo(const Params& p, const int64_t* m, int64_t srow, int cb, int nch, int ty0,
                                        int tx0, Y* sy, T* sx, T* sw) {
  using G = GeoOf<T, K, CG, WIN>;
  const int cin = (int)m[col::C_IN];
  const int64_t HW = (int64_t)p.H * p.W;
  const int64_t src_off = m[col::SRC] + srow * m[col::SRC_ROW_STRIDE];
  Stager<T, K, CG, NB, WIN> st;
  st.init_weights(static_cast<const T*>(p.w), m[col::PW_WEIGHT], cin, cb, nch);
  st.init_x(static_cast<const T*>(p.src), src_off, HW, cin, p.W);
  Pw<T, K, CG, WIN> pw;
  pw.template set_bias<NB>(static_cast<const T*>(p.pb), m[col::PW_BIAS], cb, nch);
  const T* src = static_cast<const T*>(p.src);
  auto parts = [&](auto mode) {
    constexpr int MODE = decltype(mode)::value;  // Stager::copy_bytes()
    // cp.async: step s + 1 is copied into the other buffer while the MMAs of step s run
    constexpr int kBufElems = Smem<T, K, CG, Y, WIN>::kStage1 * 4 / (int)sizeof(T);
    for (int part = 0; part < G::NPART; ++part) {
      pw.init(part);
      st.template init_part<MODE>(part, src, src_off, HW, cin, ty0, tx0, p.H, p.W);
      if constexpr (MODE > 0) {
        const int nsteps = (cin + kKC - 1) / kKC;  // >= 1
        __syncthreads();  // the previous part's last step is consumed
        st.template stage<MODE>(src, src_off, HW, cin, 0, sx, sw);
        // step s reads buffer s % 2 (B, known at compile time in the loop unrolled by two)
        auto one = [&](int s, auto buf) {
          constexpr int B = decltype(buf)::value;
          if (s + 1 < nsteps) {
            st.template stage<MODE>(src, src_off, HW, cin, (s + 1) * kKC, sx + (B ^ 1) * kBufElems,
                                    sw + (B ^ 1) * kBufElems);
            async_copy::wait_group<1>();  // step s's copies have landed
          } else {
            async_copy::wait_group<0>();
          }
          __syncthreads();
          pw.step(sx + B * kBufElems, sw + B * kBufElems, part);
          __syncthreads();  // buffer B is consumed before step s + 2 refills it
        };
        int s = 0;
#pragma unroll 1
        for (; s + 1 < nsteps; s += 2) {
          one(s, std::integral_constant<int, 0>{});
          one(s + 1, std::integral_constant<int, 1>{});
        }
        if (s < nsteps) one(s, std::integral_constant<int, 0>{});  // an odd count's last step
      } else {
        for (int k0 = 0; k0 < cin; k0 += kKC) {
          __syncthreads();  // the previous step's operands are consumed
          st.template stage<0>(src, src_off, HW, cin, k0, sx, sw);
          __syncthreads();
          pw.step(sx, sw, part);
        }
      }
      pw.store(sy, part);
    }
  };
  if constexpr (!WIN) {
    parts(std::integral_constant<int, 0>{});
  } else {
    switch (st.copy_bytes()) {
      case 16: parts(std::integral_constant<int, 16>{}); break;
      case 8: parts(std::integral_constant<int, 8>{}); break;
      case 4: parts(std::integral_constant<int, 4>{}); break;
      default: parts(std::integral_constant<int, 0>{});
    }
  }
  __syncthreads();
  // A halo inside the image needs no padding (uniform over the block). Every position that a depthwise
  // tap reads with a nonzero weight is then a 1x1 result; the others that it reads (the window's
  // columns past the halo) hold finite ones (x is zero-filled outside the image), and nothing reads
  // the tail past the halo.
  if (ty0 >= G::P && ty0 + kTH + G::P <= p.H && tx0 >= G::P && tx0 + kTW + G::P <= p.W) return;
  // zero padding: a warp per row, a lane per column of the row (inside-the-image bits precomputed;
  // zero past the halo too)
  constexpr int U = (G::LD + 31) / 32;
  static_assert(U <= 32, "one bit per halo slot");
  unsigned inside = 0;
  {
    HaloLane<G, U> hl;
    hl.init(0, ty0, tx0, p.H, p.W);
#pragma unroll
    for (int u = 0; u < U; ++u) inside |= (hl.in(u) ? 1u : 0u) << u;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < CG; r += kWarps) {
    Y* y = sy + r * G::LD + lane;
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (lane + 32 * u < G::LD && !(inside >> u & 1u)) y[32 * u] = from_f<Y>(0.f);
  }
  __syncthreads();
}

// The block's depthwise weights (CG x K*K, as D: float or T) into sdw.
template <typename T, int K, int CG, int NB, typename D, typename Params>
__device__ __forceinline__ void stage_dw(const Params& p, const int64_t* m, int cb, int nch, D* sdw) {
  const T* dw = static_cast<const T*>(p.dw);
  for (int i = threadIdx.x; i < CG * K * K; i += kThreads) {
    const int row = pw_row<CG, NB>(i / (K * K), cb, nch);
    sdw[i] = from_f<D>(row >= 0 ? to_f(dw[m[col::DW_WEIGHT] + (int64_t)row * K * K + i % (K * K)]) : 0.f);
  }
}

}  // namespace tile
}  // namespace grouped_conv
}  // namespace moce
