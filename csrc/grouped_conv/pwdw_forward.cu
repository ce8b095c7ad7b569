// Fused pointwise -> depthwise forward (plain, GELU-gated, gated-backward epilogue), grouped over
// experts (kernels.h: PwdwParams, meta columns). Design and measured counts in
// benchmarks/notes/expert_conv.md.
//
// One block per (row n, 8 x 32 output tile, group of CG = 64 pw output channels; 32 for fp32 at
// k = 5, 7). The group's 1x1 result over the tile plus its (k-1)/2 halo is computed in Geo::NPART
// parts of at most 12 16-pixel tiles, each accumulated in registers while the input channels stream
// through shared memory 16 at a time, then stored with the pw bias; x is read once per channel group.
//  * 16-bit: the halo lives in a 48-column window of aligned 8-pixel chunks, so x (and the weights)
//    are staged by double-buffered cp.async (16-byte chunks when W % 8 == 0, 8- or 4-byte when W % 4 == 0
//    or W is even; element-wise otherwise, and for weights whose rows are not 16-byte aligned); the 1x1
//    runs on mma.sync (ldmatrix / ldmatrix.trans operands; two row tiles per warp at k = 5, 7; the
//    accumulators start at the pw bias) and its result stays in T; the depthwise runs on tensor
//    cores as a banded Toeplitz product per row shift, one MMA for two 8-column slices (DwTc), and
//    its epilogue stores output pairs as 32-bit words when W is even.
//  * fp32: exact FMAs for the 1x1 (register-blocked) and the depthwise (a lane per column, the
//    tile's 8 rows in registers), as the reference's fp32 convs.
// The halo is zeroed outside the image (the depthwise conv pads the 1x1 *output*; blocks whose halo
// lies inside skip it). Registers <= 128 (__launch_bounds__) and <= ~110 KB of shared memory: two
// blocks per SM.
#include "grouped_conv/pwdw_tile.cuh"

namespace moce {
namespace grouped_conv {
namespace {

using namespace tile;

// pw output rows per block: 64, except 32 for the fp32 path at k = 5, 7 (its fp32 1x1 result would not
// leave room for two blocks per SM); the 16-bit path keeps its 1x1 result in T.
template <typename T>
constexpr bool kWin = !std::is_same<T, float>::value;  // 16-bit: window layout, x staged by cp.async
template <typename T, int K>
constexpr int kFwdGroup = (K == 3 || kWin<T>) ? 64 : 32;
template <typename T>
using YOf = std::conditional_t<kWin<T>, T, float>;  // element of the 1x1 result in smem
template <typename T, int K>
using FwdGeo = GeoOf<T, K, kFwdGroup<T, K>, kWin<T>>;
template <typename T, int K>
using FwdSmem = Smem<T, K, kFwdGroup<T, K>, YOf<T>, kWin<T>>;

// The depthwise conv and epilogue of a block, a warp per output channel: block row q is output channel
// cb * OUT_PER_BLOCK + q (its b row q + CG / 2 in the gated modes). Holds what both forms need: the
// channels of each half (nch), the dw bias, the output offsets.
template <typename T, int K, int MODE>
struct Epilogue {
  static constexpr int CG = kFwdGroup<T, K>, NB = MODE > 0 ? 2 : 1, OUT_PER_BLOCK = CG / NB;
  using G = FwdGeo<T, K>;
  const PwdwParams& p;
  const int nch, warp, lane;
  const int64_t n, cout, HW, db_off;
  const T* db;
  const OutAddr oa;

  __device__ __forceinline__ Epilogue(const PwdwParams& p_, const int64_t* m, int64_t n_)
      : p(p_), nch((int)m[col::C_OUT] / NB), warp(threadIdx.x / 32), lane(threadIdx.x % 32), n(n_),
        cout(m[col::C_OUT]), HW((int64_t)p_.H * p_.W), db_off(m[col::DW_BIAS]), db(static_cast<const T*>(p_.db)),
        oa(m, n_, HW) {}

  // dw bias of output channel oc (h = 0) or of its b half (h = 1)
  __device__ __forceinline__ float bias(int oc, int h) const {
    return db != nullptr ? to_f(db[db_off + oc + h * nch]) : 0.f;
  }
  // One output of channel oc at pixel pix: plain (MODE 0, av), gelu(a) * b (MODE 1), or the gated
  // backward's two gradients (MODE 2: g = grad of the gated output at o0 + pix, into gofull).
  // out: the channel's output (modes 0, 1), opaque.
  __device__ __forceinline__ void put(T* out, int64_t o0, int oc, unsigned pix, float av, float bv) const {
    if (MODE == 0) {
      __stcg(out + pix, from_f<T>(av));  // st.global: out is opaque to the compiler
    } else if (MODE == 1) {
      __stcg(out + pix, from_f<T>(gelu_f(av) * bv));
    } else {
      const float g = to_f(static_cast<const T*>(p.g)[o0 + pix]);
      T* gf = static_cast<T*>(p.gofull) + (n * cout + oc) * HW + pix;
      gf[0] = from_f<T>(g * bv * gelu_grad_f(av));
      gf[(int64_t)nch * HW] = from_f<T>(g * gelu_f(av));
    }
  }

  // fp32: exact FMAs (dw_column: a lane per column, 8 rows).
  __device__ __forceinline__ void fma(int cb, int ty0, int tx0, const float* sy, const float* sdw) const {
    unsigned opix[kTH];  // this lane's output pixels (image offsets, or kOutside), the same for every channel
#pragma unroll
    for (int i = 0; i < kTH; ++i) {
      const int py = ty0 + i, px = tx0 + lane;
      opix[i] = (py < p.H && px < p.W) ? (unsigned)(py * p.W + px) : kOutside;
    }
    for (int q = warp; q < OUT_PER_BLOCK; q += kWarps) {
      const int oc = cb * OUT_PER_BLOCK + q;
      if (oc >= nch) break;
      float a[kTH], b[kTH] = {};
      dw_column<G>(sy + q * G::LD, sdw + q * K * K, lane, a);
      if (NB == 2) dw_column<G>(sy + (CG / 2 + q) * G::LD, sdw + (CG / 2 + q) * K * K, lane, b);
      const float dba = bias(oc, 0), dbb = NB == 2 ? bias(oc, 1) : 0.f;
      const int64_t o0 = oa(oc);
      T* out = opaque(static_cast<T*>(p.out) + o0);
#pragma unroll
      for (int i = 0; i < kTH; ++i)
        if (opix[i] != kOutside) put(out, o0, oc, opix[i], a[i] + dba, b[i] + dbb);
    }
  }

  // 16-bit: tensor cores (DwTc). Lane (g, t) holds row g, columns 8 nt + 2 t + j (nt < 4, j < 2) of
  // the tile: output i = 2 nt + j lies at immediate offset 8 nt + j from the lane's first pixel. When
  // every output offset is even (W even, an even output base and split stride, a 4-byte aligned
  // pointer), the pairs (j = 0, 1) are stored as one 32-bit word.
  __device__ __forceinline__ void tc(int cb, int ty0, int tx0, const T* sy, const T* sdw) const {
    const int ly = ty0 + lane / 4, lx = tx0 + 2 * (lane % 4);
    unsigned mask = 0;  // bit i: output i lies inside the image
#pragma unroll
    for (int i = 0; i < 8; ++i) mask |= (ly < p.H && lx + 8 * (i / 2) + i % 2 < p.W ? 1u : 0u) << i;
    const unsigned lpix = mask != 0 ? (unsigned)(ly * p.W + lx) : 0u;
    const DwTc<G> dw;
    // every output channel's pairs: 32-bit stores (the branch is uniform over the block)
    auto channels = [&](auto pairs_tag) {
      constexpr bool PAIRS = decltype(pairs_tag)::value;
      int oc = cb * OUT_PER_BLOCK + warp;
      OutWalk ow(oa, oc, kWarps);
      for (int q = warp; q < OUT_PER_BLOCK && oc < nch; q += kWarps, oc += kWarps, ow.next()) {
        float a[4][2], b[4][2] = {};
        dw(sy + q * G::LD, sdw + q * K * K, a);
        if (NB == 2) dw(sy + (CG / 2 + q) * G::LD, sdw + (CG / 2 + q) * K * K, b);
        const float dba = bias(oc, 0), dbb = NB == 2 ? bias(oc, 1) : 0.f;
        // the lane's first pixel, as an opaque pointer: its 8 outputs are at immediate offsets
        T* out = opaque(opaque(static_cast<T*>(p.out) + ow.off) + lpix);
        auto val = [&](int nt, int j) {
          const float av = a[nt][j] + dba;
          return MODE == 0 ? av : gelu16_f(av) * (b[nt][j] + dbb);  // rounded to 16 bits below
        };
        if constexpr (PAIRS) {
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) {
            if (!(mask >> 2 * nt & 1u)) continue;  // W even: both of the pair or neither
            warp_mma::check_aligned(out + 8 * nt, 4, "output pair");
            __stcg(reinterpret_cast<unsigned*>(out + 8 * nt), warp_mma::pack2<T>(val(nt, 0), val(nt, 1)));
          }
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            if (!(mask >> i & 1u)) continue;
            if (MODE < 2)
              __stcg(out + 8 * (i / 2) + i % 2, from_f<T>(val(i / 2, i % 2)));
            else
              put(nullptr, ow.off, oc, lpix + 8 * (i / 2) + i % 2, a[i / 2][i % 2] + dba, b[i / 2][i % 2] + dbb);
          }
        }
      }
    };
    if (MODE < 2 && p.W % 2 == 0 && oa.base % 2 == 0 && oa.split_stride % 2 == 0 &&
        reinterpret_cast<uintptr_t>(p.out) % 4 == 0)
      channels(std::true_type{});
    else
      channels(std::false_type{});
  }
};

template <typename T, int K, int MODE>
__global__ void __launch_bounds__(kThreads, 2) pwdw_fwd_kernel(PwdwParams p, int n_tw, int n_tiles, int n_cblk) {
  constexpr int CG = kFwdGroup<T, K>, NB = MODE > 0 ? 2 : 1;
  using Y = YOf<T>;
  constexpr bool WIN = kWin<T>;
  constexpr int OUT_PER_BLOCK = CG / NB;  // output channels of the block
  using S = FwdSmem<T, K>;
  // the 16-bit forward's design point: two blocks per SM on sm_90 (228 KB of shared memory, 1 KB
  // reserved per block)
  static_assert(!WIN || 2 * (S::kFloats * 4 + 1024) <= 228 * 1024, "two blocks per SM");
  extern __shared__ __align__(128) float smem[];
  Y* sy = reinterpret_cast<Y*>(smem);
  T* sx = reinterpret_cast<T*>(smem + S::kY);
  T* sw = reinterpret_cast<T*>(reinterpret_cast<unsigned char*>(sx) + S::kXBytes);
  using D = typename S::D;
  D* sdw = reinterpret_cast<D*>(smem + S::kY + S::kStage);

  TileWork w;
  if (!tile_work(p, n_tw, n_tiles, n_cblk, w)) return;  // uniform over the block
  const auto& [cb, ty0, tx0, n, srow, m] = w;
  const int nch = (int)m[col::C_OUT] / NB;
  if (cb * OUT_PER_BLOCK >= nch) return;  // uniform over the block
  stage_dw<T, K, CG, NB, D>(p, m, cb, nch, sdw);
  pw_halo<T, K, CG, NB, Y, WIN>(p, m, srow, cb, nch, ty0, tx0, sy, sx, sw);

  // depthwise: one warp per output channel; 16-bit: tensor cores (DwTc), float: exact FMAs
  // (dw_column, a lane per column, 8 rows)
  const Epilogue<T, K, MODE> epi(p, m, n);
  if constexpr (WIN)
    epi.tc(cb, ty0, tx0, sy, sdw);
  else
    epi.fma(cb, ty0, tx0, sy, sdw);
}

template <typename T, int K, int MODE>
cudaError_t launch_t(const PwdwParams& p, cudaStream_t stream) {
  using G = FwdGeo<T, K>;
  constexpr int NB = MODE > 0 ? 2 : 1;
  const int n_tw = (int)cdiv(p.W, kTW), n_tiles = (int)cdiv(p.H, kTH) * n_tw;
  const int n_cblk = (int)cdiv(p.max_nch, G::CG / NB);
  const int64_t blocks = (int64_t)p.N * n_tiles * n_cblk;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const size_t smem = sizeof(float) * FwdSmem<T, K>::kFloats;
  cudaError_t err = cudaFuncSetAttribute(pwdw_fwd_kernel<T, K, MODE>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)smem);
  if (err != cudaSuccess) return err;
  pwdw_fwd_kernel<T, K, MODE><<<(unsigned)blocks, kThreads, smem, stream>>>(p, n_tw, n_tiles, n_cblk);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_pwdw(DType dt, const PwdwParams& p, cudaStream_t stream) {
  if (p.mode < 0 || p.mode > 2 || (p.K != 3 && p.K != 5 && p.K != 7)) return cudaErrorInvalidValue;
  if ((int64_t)p.H * p.W > INT32_MAX) return cudaErrorInvalidValue;  // pixel offsets are 32-bit
  return MOCE_DISPATCH_FLOATING_TYPES(dt, [&] {
    switch (p.K * 10 + p.mode) {
      case 30: return launch_t<scalar_t, 3, 0>(p, stream);
      case 31: return launch_t<scalar_t, 3, 1>(p, stream);
      case 32: return launch_t<scalar_t, 3, 2>(p, stream);
      case 50: return launch_t<scalar_t, 5, 0>(p, stream);
      case 51: return launch_t<scalar_t, 5, 1>(p, stream);
      case 52: return launch_t<scalar_t, 5, 2>(p, stream);
      case 70: return launch_t<scalar_t, 7, 0>(p, stream);
      case 71: return launch_t<scalar_t, 7, 1>(p, stream);
      default: return launch_t<scalar_t, 7, 2>(p, stream);
    }
  });
}

}  // namespace grouped_conv
}  // namespace moce
