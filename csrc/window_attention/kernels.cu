// Window FFT attention CUDA kernels: exact fp32 FFTs in registers, a window per lane group.
//
// A warp owns 32 / p windows of one image, a lane one row of one window. For each channel the lane
// loads its row of z = q + i k, and the window's 2-D DFT is two p-point radix-2 FFTs in registers
// (rows, then columns after a transpose through the warp's shared memory); Im(IDFT(Z^2)) / 2 is
// q (*) k (the same trick the Triton kernels use: one complex transform for two real inputs). Every
// transform is fp32 on CUDA cores (about 10 log2(p) flops per pixel and channel against 224-448 MACs
// for DFT-by-matmul), so the results have the reference's fp32 accuracy for every dtype.
//
// The LayerNorm couples the channels of a pixel: the channels are walked twice (forward: statistics,
// then output) or three times (backward: statistics; channel means of g v w and g v w yh, weight/bias
// partials; gradients). The convolution rows of the first pass are kept in shared memory when they
// fit (small C per warp, see cached_channels), else recomputed in each pass. Per-pixel statistics live in
// shared memory (a lane owns p pixels). When windows alone cannot fill the GPU, S warps of a block
// split one window group's channels and combine their statistics through shared memory (Chan's
// formula).
// Barriers: __syncwarp inside the transforms, __syncthreads only around the statistics exchange,
// reached by every warp of a block (none returns early).
#include "window_attention/kernels.h"

#include <type_traits>

#include "common/device_attr.h"
#include "common/dtype.h"

// Analysis builds (benchmarks/cuda_instruction_floor.py) fix the cache choice at compile time so
// that each channel loop holds one path; production builds choose per launch.
#ifdef MOCE_WFA_FORCE_YCACHE
#define WFA_CACHED(runtime_choice) (MOCE_WFA_FORCE_YCACHE != 0)
#else
#define WFA_CACHED(runtime_choice) (runtime_choice)
#endif

namespace moce {
namespace wfa {
namespace {

// cos / sin (2 pi m / 32), m < 16: the twiddles of every radix-2 stage of a p <= 32 FFT.
__constant__ float kCos32[16] = {1.0f,           9.807852804e-01f, 9.238795325e-01f, 8.314696123e-01f,
                                 7.071067812e-01f, 5.555702330e-01f, 3.826834324e-01f, 1.950903220e-01f,
                                 0.0f,           -1.950903220e-01f, -3.826834324e-01f, -5.555702330e-01f,
                                 -7.071067812e-01f, -8.314696123e-01f, -9.238795325e-01f, -9.807852804e-01f};
__constant__ float kSin32[16] = {0.0f,           1.950903220e-01f, 3.826834324e-01f, 5.555702330e-01f,
                                 7.071067812e-01f, 8.314696123e-01f, 9.238795325e-01f, 9.807852804e-01f,
                                 1.0f,           9.807852804e-01f, 9.238795325e-01f, 8.314696123e-01f,
                                 7.071067812e-01f, 5.555702330e-01f, 3.826834324e-01f, 1.950903220e-01f};

__host__ __device__ constexpr int ilog2(int p) { return p <= 1 ? 0 : 1 + ilog2(p / 2); }
__host__ __device__ constexpr int bitrev(int x, int bits) {
  int r = 0;
  for (int i = 0; i < bits; ++i) r = (r << 1) | ((x >> i) & 1);
  return r;
}

// Bit-reversal permutation of x, as compile-time swaps (a runtime index would put x in local memory).
template <int P, int I = 0>
__device__ __forceinline__ void bit_reverse(float2 (&x)[P]) {
  if constexpr (I < P) {
    constexpr int J = bitrev(I, ilog2(P));
    if constexpr (I < J) {
      const float2 t = x[I];
      x[I] = x[J];
      x[J] = t;
    }
    bit_reverse<P, I + 1>(x);
  }
}

// One radix-2 butterfly (u, v) -> (u + w v, u - w v), w = exp(SIGN 2 pi i m / 32). m is a constant
// once the FFT's loops are unrolled, so the branches fold away: w = 1 and w = +-i (m = 8) cost 4 FADD
// (the multiply is a swap and a sign); any other w costs 6 FFMA: x = u + w v as two fused chains,
// then u - w v = 2u - x (one FFMA per component; its error, <= eps (|u + w v| + |u - w v|) per
// component, is of the order of the plain butterfly's).
template <int SIGN>
__device__ __forceinline__ void butterfly(float2& u, float2& v, int m) {
  const float2 a = u;
  if (m == 0) {
    u = make_float2(a.x + v.x, a.y + v.y);
    v = make_float2(a.x - v.x, a.y - v.y);
  } else if (m == 8) {  // w v = SIGN i v = (-SIGN v.y, SIGN v.x)
    const float tx = -SIGN * v.y, ty = SIGN * v.x;
    u = make_float2(a.x + tx, a.y + ty);
    v = make_float2(a.x - tx, a.y - ty);
  } else {
    const float c = kCos32[m], s = SIGN * kSin32[m];
    const float x = fmaf(v.x, c, fmaf(-v.y, s, a.x));
    const float y = fmaf(v.x, s, fmaf(v.y, c, a.y));
    u = make_float2(x, y);
    v = make_float2(fmaf(2.f, a.x, -x), fmaf(2.f, a.y, -y));
  }
}

// The radix-2 stages of span LEN, 2 LEN, ..., P (butterfly j of a group has twiddle m = j * 32 / LEN).
template <int P, int SIGN, int LEN>
__device__ __forceinline__ void fft_stages(float2 (&x)[P]) {
  if constexpr (LEN <= P) {
#pragma unroll
    for (int i = 0; i < P; i += LEN) {
#pragma unroll
      for (int j = 0; j < LEN / 2; ++j) butterfly<SIGN>(x[i + j], x[i + j + LEN / 2], j * (32 / LEN));
    }
    fft_stages<P, SIGN, LEN * 2>(x);
  }
}

// In place, unnormalised P-point DFT with kernel exp(SIGN * 2 pi i j f / P): radix-2 decimation in
// time, every index and twiddle a compile-time constant (the stages are templates, not a loop, so
// that the inner loops unroll and x stays in registers).
template <int P, int SIGN>
__device__ __forceinline__ void fft(float2 (&x)[P]) {
  bit_reverse<P>(x);
  fft_stages<P, SIGN, 2>(x);
}

// Warps per block: 8, except 4 at p = 32 (shared memory: transposes + per-pixel statistics).
template <int P>
struct Cfg {
  static constexpr int G = 32 / P;          // windows per warp
  static constexpr int WARPS = P == 32 ? 4 : 8;
  static constexpr int THREADS = 32 * WARPS;
  static constexpr int LDT = P + 1;          // row stride of a warp's transpose buffer (float2)
  static constexpr int TBUF = 32 * LDT;      // float2 per warp
  static constexpr int NSTAT = 4;            // per-pixel fields: mean, rstd, m1, m2 (forward: 2 used)
};

// Dynamic shared memory of a block: per warp a transpose buffer (float2), NSTAT x P x 32 floats of
// statistics and, when the convolution rows are cached, `cached` x P x 32 floats (one row per lane
// and channel of the warp's split).
template <int P>
constexpr size_t smem_bytes(int64_t cached = 0) {
  using C = Cfg<P>;
  return (size_t)C::WARPS * (C::TBUF * sizeof(float2) + (C::NSTAT + cached) * P * 32 * sizeof(float));
}

// What one lane works on: row r of window gw of window group `group` of image n, pixels
// (hy, hx0 + j), j < P; channels [c0, c1) of its split.
template <int P>
struct Lane {
  int lane, warp, r, gw, split, S;
  int64_t group;
  bool active;        // the window exists (group in range)
  bool row_valid;     // hy < H
  int hy, hx0;
  int64_t row_off;    // offset of pixel (hy, hx0) inside an (H, W) plane
  int c0, c1;
  float2* tbuf;       // this warp's transpose buffer
  float* stat;        // this warp's statistics: [NSTAT][P][32]
  bool cached;        // the convolution rows are kept in shared memory (else recomputed each pass)
  float* ycache;      // this warp's convolution rows [c - c0][P][32] (fp32), when cached

  __device__ __forceinline__ float& st(int field, int j) { return stat[(field * P + j) * 32 + lane]; }
  __device__ __forceinline__ bool valid(int j, int W) const { return row_valid && hx0 + j < W; }
  // This lane's cached row of channel c (element j at [j * 32]): lane-contiguous, conflict-free.
  __device__ __forceinline__ float* yrow(int c) const { return ycache + (int64_t)(c - c0) * P * 32 + lane; }
};

// This lane's work, its buffers carved out of the block's dynamic shared memory (smem_bytes).
template <int P>
__device__ __forceinline__ Lane<P> make_lane(const Shape& s, int S, bool cache) {
  using C = Cfg<P>;
  extern __shared__ __align__(16) float smem[];
  Lane<P> L;
  L.lane = threadIdx.x % 32;
  L.warp = threadIdx.x / 32;
  L.S = S;
  L.split = L.warp % S;
  L.group = (int64_t)blockIdx.x * (C::WARPS / S) + L.warp / S;
  L.gw = L.lane / P;
  L.r = L.lane % P;
  const int64_t nwx = (s.W + P - 1) / P, nwy = (s.H + P - 1) / P;
  const int64_t win = L.group * C::G + L.gw;
  L.active = win < nwx * nwy;
  const int64_t wy = L.active ? win / nwx : 0, wx = L.active ? win % nwx : 0;
  L.hy = (int)(wy * P + L.r);
  L.hx0 = (int)(wx * P);
  L.row_valid = L.active && L.hy < s.H;
  L.row_off = (int64_t)L.hy * s.W + L.hx0;
  const int cs = (int)((s.C + S - 1) / S);
  L.c0 = min((int)s.C, L.split * cs);
  L.c1 = min((int)s.C, L.c0 + cs);
  float2* tb = reinterpret_cast<float2*>(smem);
  L.tbuf = tb + L.warp * C::TBUF;
  L.stat = reinterpret_cast<float*>(tb + C::WARPS * C::TBUF) + L.warp * C::NSTAT * P * 32;
  L.cached = cache;
  L.ycache = cache ? reinterpret_cast<float*>(tb + C::WARPS * C::TBUF) + C::WARPS * C::NSTAT * P * 32 +
                         (int64_t)L.warp * cs * P * 32
                   : nullptr;
  return L;
}

// Row <-> column exchange inside each window of the warp: before, lane (gw, r) holds x[f] = X[r][f];
// after, x[u] = X[u][r].
template <int P>
__device__ __forceinline__ void transpose(const Lane<P>& L, float2 (&x)[P]) {
  constexpr int LDT = Cfg<P>::LDT;
  float2* base = L.tbuf + L.gw * P * LDT;
#pragma unroll
  for (int f = 0; f < P; ++f) base[L.r * LDT + f] = x[f];
  __syncwarp();
#pragma unroll
  for (int u = 0; u < P; ++u) x[u] = base[u * LDT + L.r];
  __syncwarp();
}

// Inverse of transpose (the same exchange read the other way).
template <int P>
__device__ __forceinline__ void untranspose(const Lane<P>& L, float2 (&x)[P]) {
  constexpr int LDT = Cfg<P>::LDT;
  float2* base = L.tbuf + L.gw * P * LDT;
#pragma unroll
  for (int u = 0; u < P; ++u) base[u * LDT + L.r] = x[u];
  __syncwarp();
#pragma unroll
  for (int f = 0; f < P; ++f) x[f] = base[L.r * LDT + f];
  __syncwarp();
}

// Spectrum of z = q + i k (zero outside the image) for channel plane `off`: lane (gw, r) ends with
// column r of the window's 2-D DFT, Z[a][r], a < P.
template <typename T, int P>
__device__ __forceinline__ void spectrum(const Lane<P>& L, const Shape& s, const T* q, const T* k, int64_t off,
                                         float2 (&z)[P]) {
#pragma unroll
  for (int j = 0; j < P; ++j) {
    const bool v = L.valid(j, (int)s.W);
    z[j] = v ? make_float2(to_f(q[off + L.row_off + j]), to_f(k[off + L.row_off + j])) : make_float2(0.f, 0.f);
  }
  fft<P, -1>(z);
  transpose<P>(L, z);
  fft<P, -1>(z);
}

// Lane's row of q (*) k = Im(IDFT(Z^2)) / 2 from the spectrum Z (column layout; Z is consumed).
template <int P>
__device__ __forceinline__ void conv_from_spectrum(const Lane<P>& L, float2 (&z)[P], float (&y)[P]) {
#pragma unroll
  for (int a = 0; a < P; ++a) z[a] = make_float2(z[a].x * z[a].x - z[a].y * z[a].y, 2.f * z[a].x * z[a].y);
  fft<P, 1>(z);
  untranspose<P>(L, z);
  fft<P, 1>(z);
  constexpr float scale = 0.5f / (P * P);
#pragma unroll
  for (int j = 0; j < P; ++j) y[j] = z[j].y * scale;
}

template <typename T, int P>
__device__ __forceinline__ void conv_row(const Lane<P>& L, const Shape& s, const T* q, const T* k, int64_t off,
                                         float (&y)[P]) {
  float2 z[P];
  spectrum<T, P>(L, s, q, k, off, z);
  conv_from_spectrum<P>(L, z, y);
}

// Lane's row of q (*) k for channel c of the split: from the cache ln_stats filled, or recomputed.
template <typename T, int P>
__device__ __forceinline__ void conv_row_of(const Lane<P>& L, const Shape& s, const T* q, const T* k, int64_t plane0,
                                            int64_t HW, int c, float (&y)[P]) {
  if (L.cached) {
    const float* row = L.yrow(c);
#pragma unroll
    for (int j = 0; j < P; ++j) y[j] = row[j * 32];
  } else {
    conv_row<T, P>(L, s, q, k, plane0 + (int64_t)c * HW, y);
  }
}

// Per-pixel mean and rstd over all C channels into the lane's statistics (fields 0, 1). Each warp
// takes Welford moments over its channel split; the S splits of a window group are combined (Chan).
template <typename T, int P>
__device__ void ln_stats(Lane<P>& L, const Shape& s, const T* q, const T* k, int64_t plane0, int64_t HW) {
  float mean[P], m2[P];
#pragma unroll
  for (int j = 0; j < P; ++j) mean[j] = m2[j] = 0.f;
  int cnt = 0;
  for (int c = L.c0; c < L.c1; ++c) {
    float y[P];
    conv_row<T, P>(L, s, q, k, plane0 + (int64_t)c * HW, y);
    if (L.cached) {  // only this lane reads it back: no barrier
      float* row = L.yrow(c);
#pragma unroll
      for (int j = 0; j < P; ++j) row[j * 32] = y[j];
    }
    ++cnt;
    const float inv = 1.f / cnt;
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const float d = y[j] - mean[j];
      mean[j] += d * inv;
      m2[j] += d * (y[j] - mean[j]);
    }
  }
  // publish the split's moments (the transpose buffers are free here), then combine the splits
#pragma unroll
  for (int j = 0; j < P; ++j) {
    L.st(0, j) = mean[j];
    L.st(1, j) = m2[j];
  }
  __syncthreads();
  const float* grp = L.stat - (int64_t)L.split * Cfg<P>::NSTAT * P * 32;  // split 0 of this window group
  const int cs = (int)((s.C + L.S - 1) / L.S);
#pragma unroll
  for (int j = 0; j < P; ++j) mean[j] = m2[j] = 0.f;
  float na = 0.f;
  for (int sp = 0; sp < L.S; ++sp) {  // splits outside, pixels inside: the arrays stay in registers
    const float nb = (float)max(0, min((int)s.C, (sp + 1) * cs) - min((int)s.C, sp * cs));
    if (nb == 0.f) continue;
    const float* o = grp + (int64_t)sp * Cfg<P>::NSTAT * P * 32;
    const float nab = na + nb, fa = nb / nab, fb = na * nb / nab;
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const float delta = o[j * 32 + L.lane] - mean[j];
      mean[j] += delta * fa;
      m2[j] += o[(P + j) * 32 + L.lane] + delta * delta * fb;
    }
    na = nab;
  }
#pragma unroll
  for (int j = 0; j < P; ++j) m2[j] = rsqrtf(fmaxf(m2[j] / (float)s.C, 0.f) + s.eps);  // now the rstd
  __syncthreads();  // every split has read the others' moments
#pragma unroll
  for (int j = 0; j < P; ++j) {
    L.st(0, j) = mean[j];
    L.st(1, j) = m2[j];
  }
}

template <typename T, int P>
__global__ void __launch_bounds__(Cfg<P>::THREADS) fwd_kernel(FwdArgs a, int S, int cache) {
  const Shape s = a.s;
  const int64_t n = blockIdx.y;
  if (a.rows != nullptr && (n < a.rows[0] || n >= a.rows[1])) return;  // uniform over the block
  T* out = static_cast<T*>(a.out);
  Lane<P> L = make_lane<P>(s, S, WFA_CACHED(cache != 0));
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const int64_t HW = s.H * s.W, plane0 = n * s.C * HW;
  ln_stats<T, P>(L, s, q, k, plane0, HW);
  for (int c = L.c0; c < L.c1; ++c) {
    const int64_t off = plane0 + (int64_t)c * HW + L.row_off;
    float y[P];
    conv_row_of<T, P>(L, s, q, k, plane0, HW, c, y);
    const float wc = a.weight[c], bc = a.bias[c];
#pragma unroll
    for (int j = 0; j < P; ++j)
      if (L.valid(j, (int)s.W))
        out[off + j] = from_f<T>(((y[j] - L.st(0, j)) * L.st(1, j) * wc + bc) * to_f(v[off + j]));
  }
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <typename T, int P>
__global__ void __launch_bounds__(Cfg<P>::THREADS) bwd_kernel(BwdArgs a, int S, int cache, int64_t n_groups) {
  const Shape s = a.s;
  const int64_t n = blockIdx.y;
  if (a.rows != nullptr && (n < a.rows[0] || n >= a.rows[1])) return;  // uniform over the block
  const T* g = static_cast<const T*>(a.grad);
  Lane<P> L = make_lane<P>(s, S, WFA_CACHED(cache != 0));
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const int64_t HW = s.H * s.W, plane0 = n * s.C * HW;
  const int W = (int)s.W;
  ln_stats<T, P>(L, s, q, k, plane0, HW);

  // pass 2: per pixel, sums over channels of gyh = g v w and gyh * yh; per (window group, channel)
  // weight/bias partials sum(g v yh), sum(g v)
  float* part = a.workspace + (n * n_groups + L.group) * 2 * s.C;  // [2][C]
  float s1[P], s2[P];
#pragma unroll
  for (int j = 0; j < P; ++j) s1[j] = s2[j] = 0.f;
  for (int c = L.c0; c < L.c1; ++c) {
    const int64_t off = plane0 + (int64_t)c * HW + L.row_off;
    float y[P];
    conv_row_of<T, P>(L, s, q, k, plane0, HW, c, y);
    const float wc = a.weight[c];
    float sw = 0.f, sb = 0.f;
#pragma unroll
    for (int j = 0; j < P; ++j) {
      if (!L.valid(j, W)) continue;
      const float yh = (y[j] - L.st(0, j)) * L.st(1, j);
      const float gz = to_f(g[off + j]) * to_f(v[off + j]);
      s1[j] += gz * wc;
      s2[j] += gz * wc * yh;
      sw += gz * yh;
      sb += gz;
    }
    sw = warp_sum(sw);
    sb = warp_sum(sb);
    if (L.lane == 0 && L.active) {
      part[c] = sw;
      part[s.C + c] = sb;
    }
  }
  // combine the splits' channel sums into means m1, m2 (fields 2, 3)
#pragma unroll
  for (int j = 0; j < P; ++j) {
    L.st(2, j) = s1[j];
    L.st(3, j) = s2[j];
  }
  __syncthreads();
  const float* grp = L.stat - (int64_t)L.split * Cfg<P>::NSTAT * P * 32;
#pragma unroll
  for (int j = 0; j < P; ++j) s1[j] = s2[j] = 0.f;
  for (int sp = 0; sp < S; ++sp) {
    const float* o = grp + (int64_t)sp * Cfg<P>::NSTAT * P * 32;
#pragma unroll
    for (int j = 0; j < P; ++j) {
      s1[j] += o[(2 * P + j) * 32 + L.lane];
      s2[j] += o[(3 * P + j) * 32 + L.lane];
    }
  }
#pragma unroll
  for (int j = 0; j < P; ++j) {
    s1[j] /= (float)s.C;
    s2[j] /= (float)s.C;
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < P; ++j) {
    L.st(2, j) = s1[j];
    L.st(3, j) = s2[j];
  }

  // pass 3: gradients. gy = rstd (g v w - m1 - yh m2); grad_k + i grad_q = F (Z conj(DFT gy)) F / p^2
  T* gq = static_cast<T*>(a.grad_q);
  T* gk = static_cast<T*>(a.grad_k);
  T* gv = static_cast<T*>(a.grad_v);
  for (int c = L.c0; c < L.c1; ++c) {
    const int64_t plane = plane0 + (int64_t)c * HW, off = plane + L.row_off;
    const float wc = a.weight[c], bc = a.bias[c];
    float y[P];
    conv_row_of<T, P>(L, s, q, k, plane0, HW, c, y);
    float2 x[P];
#pragma unroll
    for (int j = 0; j < P; ++j) {
      float gy = 0.f;
      if (L.valid(j, W)) {
        const float yh = (y[j] - L.st(0, j)) * L.st(1, j);
        const float gval = to_f(g[off + j]);
        gv[off + j] = from_f<T>(gval * (yh * wc + bc));
        gy = L.st(1, j) * (gval * to_f(v[off + j]) * wc - L.st(2, j) - yh * L.st(3, j));
      }
      x[j] = make_float2(gy, 0.f);
    }
    fft<P, -1>(x);
    transpose<P>(L, x);
    fft<P, -1>(x);  // DFT(gy), column layout
    float2 z[P];
    spectrum<T, P>(L, s, q, k, plane, z);  // recomputed rather than kept live through the pass
#pragma unroll
    for (int u = 0; u < P; ++u)  // Z conj(G)
      x[u] = make_float2(z[u].x * x[u].x + z[u].y * x[u].y, z[u].y * x[u].x - z[u].x * x[u].y);
    fft<P, -1>(x);
    untranspose<P>(L, x);
    fft<P, -1>(x);
    constexpr float scale = 1.f / (P * P);
#pragma unroll
    for (int j = 0; j < P; ++j)
      if (L.valid(j, W)) {
        gk[off + j] = from_f<T>(x[j].x * scale);
        gq[off + j] = from_f<T>(x[j].y * scale);
      }
  }
}

// grad_weight[c] = sum_r part[r][0][c], grad_bias[c] = sum_r part[r][1][c]: one block of
// kReduceThreads per output element, fixed summation order (deterministic).
constexpr int kReduceThreads = 256;
__global__ void __launch_bounds__(kReduceThreads)
    reduce_partials_kernel(const float* part, int64_t R, int64_t C, float* gw, float* gb) {
  __shared__ float red[kReduceThreads / 32];
  const int64_t idx = blockIdx.x;  // in [0, 2C)
  const int64_t which = idx / C, c = idx % C;
  float acc = 0.f;
  for (int64_t r = threadIdx.x; r < R; r += kReduceThreads) acc += part[(r * 2 + which) * C + c];
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x < 32) {
    acc = threadIdx.x < kReduceThreads / 32 ? red[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    if (threadIdx.x == 0) (which == 0 ? gw : gb)[c] = acc;
  }
}

// Window groups (32 / p windows each) of one image.
int64_t n_groups(const Shape& s) {
  const int64_t nw = ((s.H + s.p - 1) / s.p) * ((s.W + s.p - 1) / s.p);
  const int64_t G = 32 / s.p;
  return (nw + G - 1) / G;
}

int sm_count() {
  static const int sms = device_attr(cudaDevAttrMultiProcessorCount, 132);
  return sms;
}

int sm_shared_bytes() {
  static const int bytes = device_attr(cudaDevAttrMaxSharedMemoryPerMultiprocessor, 233472);
  return bytes;
}

// Channel splits per window group: 1 when the window groups of the batch give >= 4 warps per SM,
// else up to the block's warps (and at most C), a power of two.
int channel_splits(const Shape& s, int warps) {
  const int64_t groups = n_groups(s) * s.N;
  int S = 1;
  while (S < warps && S < s.C && groups * S < 4LL * sm_count()) S *= 2;
  return S;
}

// Channels per warp whose convolution rows stay in shared memory (one pass less forward, two less
// backward): all of the warp's split when the cache still leaves room for two blocks per SM, else 0
// (recompute). On sm_90 (228 KB per SM) up to 21 channels per warp at p = 4 and 7 at p = 8; never at
// p >= 16 (transposes and statistics already take ~100 KB a block).
template <int P>
int64_t cached_channels(const Shape& s, int S) {
  const int64_t cs = (s.C + S - 1) / S;
  return 2 * ((int64_t)smem_bytes<P>(cs) + 1024) <= sm_shared_bytes() ? cs : 0;  // 1 KB reserved per block
}

template <int P>
dim3 grid_of(const Shape& s, int S) {
  const int64_t per_block = Cfg<P>::WARPS / S;
  return dim3(static_cast<unsigned>((n_groups(s) + per_block - 1) / per_block), static_cast<unsigned>(s.N));
}

template <typename T, int P>
cudaError_t launch_fwd(const FwdArgs& a, cudaStream_t stream) {
  const int S = channel_splits(a.s, Cfg<P>::WARPS);
  const int64_t cached = cached_channels<P>(a.s, S);
  const size_t smem = smem_bytes<P>(cached);
  cudaError_t err = cudaFuncSetAttribute(fwd_kernel<T, P>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  fwd_kernel<T, P><<<grid_of<P>(a.s, S), Cfg<P>::THREADS, smem, stream>>>(a, S, cached > 0);
  return cudaGetLastError();
}

template <typename T, int P>
cudaError_t launch_bwd(const BwdArgs& a, cudaStream_t stream) {
  const int S = channel_splits(a.s, Cfg<P>::WARPS);
  const int64_t cached = cached_channels<P>(a.s, S);
  const size_t smem = smem_bytes<P>(cached);
  cudaError_t err = cudaMemsetAsync(a.workspace, 0, backward_workspace_floats(a.s) * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  err = cudaFuncSetAttribute(bwd_kernel<T, P>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  bwd_kernel<T, P><<<grid_of<P>(a.s, S), Cfg<P>::THREADS, smem, stream>>>(a, S, cached > 0, n_groups(a.s));
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  reduce_partials_kernel<<<static_cast<unsigned>(2 * a.s.C), kReduceThreads, 0, stream>>>(
      a.workspace, a.s.N * n_groups(a.s), a.s.C, a.grad_weight, a.grad_bias);
  return cudaGetLastError();
}

// f(std::integral_constant<int, p>{}) for the window size p of the shape.
template <typename F>
cudaError_t with_window(const Shape& s, F&& f) {
  switch (s.p) {
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    case 16: return f(std::integral_constant<int, 16>{});
    default: return f(std::integral_constant<int, 32>{});
  }
}

}  // namespace

int64_t backward_workspace_floats(const Shape& s) { return s.N * n_groups(s) * 2 * s.C; }

const char* check_shape(const Shape& s) {
  if (s.p != 4 && s.p != 8 && s.p != 16 && s.p != 32) return "window_size must be one of 4, 8, 16, 32";
  if (s.N < 1 || s.C < 1 || s.H < 1 || s.W < 1) return "N, C, H and W must all be >= 1";
  if (s.N > 65535) return "batch size N must be <= 65535 (grid y dimension)";
  if (n_groups(s) > 0x7fffffffLL || s.H > 0x7fffffffLL || s.W > 0x7fffffffLL) return "image too large for the grid";
  if (s.C > 0x3fffffffLL) return "too many channels";
  return nullptr;
}

cudaError_t forward(const FwdArgs& a, cudaStream_t stream) {
  if (check_shape(a.s) != nullptr) return cudaErrorInvalidValue;
  return MOCE_DISPATCH_FLOATING_TYPES(a.dtype, [&] {
    return with_window(a.s, [&](auto p) { return launch_fwd<scalar_t, decltype(p)::value>(a, stream); });
  });
}

cudaError_t backward(const BwdArgs& a, cudaStream_t stream) {
  if (check_shape(a.s) != nullptr) return cudaErrorInvalidValue;
  return MOCE_DISPATCH_FLOATING_TYPES(a.dtype, [&] {
    return with_window(a.s, [&](auto p) { return launch_bwd<scalar_t, decltype(p)::value>(a, stream); });
  });
}

}  // namespace wfa
}  // namespace moce
