// Window FFT attention CUDA kernels. One thread block owns one batch row n and one TILE x TILE
// pixel tile (TILE = max(p, 16), so the tile holds whole p x p windows); one thread per pixel.
// Per channel the block computes every window's 2-D DFT separably through shared memory
// (row stage, then column stage; each thread O(p) complex MACs per stage, twiddles in shared
// memory), multiplies spectra, and inverts. Each thread keeps its own pixel's values in registers,
// so the LayerNorm statistics over channels are per-thread sums; the convolution is recomputed
// per channel pass instead of being stored (2 passes forward, 3 backward).
#include "window_attention/kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace moce {
namespace wfa {
namespace {

template <typename T>
__device__ __forceinline__ float to_f(T x);
template <>
__device__ __forceinline__ float to_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Shared-memory workspace of one block.
template <int TILE>
struct Smem {
  float xs[2][TILE * TILE];   // real inputs of the forward transforms
  float2 ta[2][TILE * TILE];  // row-stage outputs
  float2 pp[2][TILE * TILE];  // spectra fed to the inverse transforms
  float2 tw[32];              // (cos, sin)(2 pi m / p)
  float red[2][TILE * TILE / 32];
};

// Position of this thread's pixel inside the tile and inside its window.
template <int TILE>
struct Pos {
  int tid, i, j;  // tile row/col
  int h0, u;      // window start row, row inside window
  int w0, f;      // window start col, col inside window
  __device__ Pos(int p) {
    tid = threadIdx.x;
    i = tid / TILE;
    j = tid % TILE;
    u = i % p;
    h0 = i - u;
    f = j % p;
    w0 = j - f;
  }
};

__device__ __forceinline__ float2 cmul(float2 a, float2 b) {
  return make_float2(a.x * b.x - a.y * b.y, a.x * b.y + a.y * b.x);
}
__device__ __forceinline__ float2 cmul_conj(float2 a, float2 b) {  // a * conj(b)
  return make_float2(a.x * b.x + a.y * b.y, a.y * b.x - a.x * b.y);
}

// Row stage, real input, forward (e^{-i}): sum_b x[i, w0+b] w^{f b}.
template <int TILE>
__device__ __forceinline__ float2 row_fwd_real(const float* x, const float2* tw, const Pos<TILE>& ps, int p) {
  float re = 0.f, im = 0.f;
  const float* row = x + ps.i * TILE + ps.w0;
  for (int b = 0, m = 0; b < p; ++b, m += ps.f) {
    float2 t = tw[m % p];
    re += row[b] * t.x;
    im -= row[b] * t.y;
  }
  return make_float2(re, im);
}

// Row stage, complex input: sum_b X[i, w0+b] (cos + sign i sin)(2 pi f b / p).
template <int TILE>
__device__ __forceinline__ float2 row_cplx(const float2* x, const float2* tw, const Pos<TILE>& ps, int p, float sign) {
  float re = 0.f, im = 0.f;
  const float2* row = x + ps.i * TILE + ps.w0;
  for (int b = 0, m = 0; b < p; ++b, m += ps.f) {
    float2 t = tw[m % p];
    float s = sign * t.y;
    re += row[b].x * t.x - row[b].y * s;
    im += row[b].y * t.x + row[b].x * s;
  }
  return make_float2(re, im);
}

// Column stage, complex input: sum_a X[h0+a, j] (cos + sign i sin)(2 pi u a / p).
template <int TILE>
__device__ __forceinline__ float2 col_cplx(const float2* x, const float2* tw, const Pos<TILE>& ps, int p, float sign) {
  float re = 0.f, im = 0.f;
  const float2* col = x + ps.h0 * TILE + ps.j;
  for (int a = 0, m = 0; a < p; ++a, m += ps.u) {
    float2 t = tw[m % p];
    float2 xv = col[a * TILE];
    float s = sign * t.y;
    re += xv.x * t.x - xv.y * s;
    im += xv.y * t.x + xv.x * s;
  }
  return make_float2(re, im);
}

// Column stage of the inverse, real part only (sign +).
template <int TILE>
__device__ __forceinline__ float col_inv_real(const float2* x, const float2* tw, const Pos<TILE>& ps, int p) {
  float re = 0.f;
  const float2* col = x + ps.h0 * TILE + ps.j;
  for (int a = 0, m = 0; a < p; ++a, m += ps.u) {
    float2 t = tw[m % p];
    float2 xv = col[a * TILE];
    re += xv.x * t.x - xv.y * t.y;
  }
  return re;
}

// Spectra of the q and k values already in sm.xs[0], sm.xs[1] (caller synchronised after the
// store). Returns this thread's (Q^, K^); leaves sm.ta written. Ends without a barrier.
template <int TILE>
__device__ __forceinline__ void spectra(Smem<TILE>& sm, const Pos<TILE>& ps, int p, float2& qh, float2& kh) {
  sm.ta[0][ps.tid] = row_fwd_real<TILE>(sm.xs[0], sm.tw, ps, p);
  sm.ta[1][ps.tid] = row_fwd_real<TILE>(sm.xs[1], sm.tw, ps, p);
  __syncthreads();
  qh = col_cplx<TILE>(sm.ta[0], sm.tw, ps, p, -1.f);
  kh = col_cplx<TILE>(sm.ta[1], sm.tw, ps, p, -1.f);
}

// Inverse transform of this thread's spectrum value `pv` (already scaled by 1/p^2) through
// buffer `slot`. Starts with a barrier (other threads may still read sm.ta), ends without one.
template <int TILE>
__device__ __forceinline__ float inverse(Smem<TILE>& sm, const Pos<TILE>& ps, int p, float2 pv, int slot) {
  sm.pp[slot][ps.tid] = pv;
  __syncthreads();
  sm.ta[slot][ps.tid] = row_cplx<TILE>(sm.pp[slot], sm.tw, ps, p, 1.f);
  __syncthreads();
  return col_inv_real<TILE>(sm.ta[slot], sm.tw, ps, p);
}

// Loads q and k of channel c into shared memory (0 outside the image), then a barrier.
template <typename T, int TILE>
__device__ __forceinline__ void load_qk(Smem<TILE>& sm, const T* q, const T* k, int64_t off, bool valid, int tid) {
  sm.xs[0][tid] = valid ? to_f(q[off]) : 0.f;
  sm.xs[1][tid] = valid ? to_f(k[off]) : 0.f;
  __syncthreads();
}

// Circular convolution value at this thread's pixel for channel offset `off`.
template <typename T, int TILE>
__device__ __forceinline__ float conv_at(Smem<TILE>& sm, const Pos<TILE>& ps, int p, float inv_pp, const T* q,
                                         const T* k, int64_t off, bool valid) {
  load_qk<T, TILE>(sm, q, k, off, valid, ps.tid);
  float2 qh, kh;
  spectra<TILE>(sm, ps, p, qh, kh);
  float2 pv = cmul(qh, kh);
  return inverse<TILE>(sm, ps, p, make_float2(pv.x * inv_pp, pv.y * inv_pp), 0);
}

struct Tile {
  int64_t n;
  int64_t pix;  // offset of the pixel inside one (H, W) plane
  bool valid;
};

template <int TILE>
__device__ __forceinline__ bool setup(Smem<TILE>& sm, const Shape& s, const int64_t* rows, const Pos<TILE>& ps,
                                      Tile& t) {
  t.n = blockIdx.y;
  if (rows != nullptr && (t.n < rows[0] || t.n >= rows[1])) return false;
  const int64_t n_tw = (s.W + TILE - 1) / TILE;
  const int64_t r = (blockIdx.x / n_tw) * TILE + ps.i;
  const int64_t c = (blockIdx.x % n_tw) * TILE + ps.j;
  t.valid = r < s.H && c < s.W;
  t.pix = r * s.W + c;
  if (ps.tid < s.p) {
    double sv, cv;
    sincospi(2.0 * ps.tid / s.p, &sv, &cv);
    sm.tw[ps.tid] = make_float2(static_cast<float>(cv), static_cast<float>(sv));
  }
  // the barrier inside the first load_qk publishes the twiddles
  return true;
}

// Per-pixel LayerNorm statistics over channels (one-pass sums shifted by channel 0's value).
template <typename T, int TILE>
__device__ __forceinline__ void stats(Smem<TILE>& sm, const Pos<TILE>& ps, const Shape& s, float inv_pp, const T* q,
                                      const T* k, const Tile& t, float& mean, float& rstd) {
  const int64_t HW = s.H * s.W;
  const int64_t base = t.n * s.C * HW + t.pix;
  const float shift = conv_at<T, TILE>(sm, ps, s.p, inv_pp, q, k, base, t.valid);
  float s1 = 0.f, s2 = 0.f;
  for (int64_t c = 1; c < s.C; ++c) {
    const float d = conv_at<T, TILE>(sm, ps, s.p, inv_pp, q, k, base + c * HW, t.valid) - shift;
    s1 += d;
    s2 += d * d;
  }
  const float m = s1 / s.C;
  mean = shift + m;
  rstd = rsqrtf(fmaxf(s2 / s.C - m * m, 0.f) + s.eps);
}

template <typename T, int TILE>
__global__ void __launch_bounds__(TILE* TILE) fwd_kernel(FwdArgs a) {
  __shared__ Smem<TILE> sm;
  const Shape s = a.s;
  const Pos<TILE> ps(s.p);
  Tile t;
  if (!setup<TILE>(sm, s, a.rows, ps, t)) return;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  T* out = static_cast<T*>(a.out);
  const float inv_pp = 1.f / (s.p * s.p);
  float mean, rstd;
  stats<T, TILE>(sm, ps, s, inv_pp, q, k, t, mean, rstd);
  const int64_t HW = s.H * s.W;
  const int64_t base = t.n * s.C * HW + t.pix;
  for (int64_t c = 0; c < s.C; ++c) {
    const int64_t off = base + c * HW;
    const float y = conv_at<T, TILE>(sm, ps, s.p, inv_pp, q, k, off, t.valid);
    if (t.valid) {
      const float z = (y - mean) * rstd * a.weight[c] + a.bias[c];
      out[off] = from_f<T>(z * to_f(v[off]));
    }
  }
}

// Block sum of x0, x1 (all threads call); thread 0 gets the totals. Contains barriers.
template <int TILE>
__device__ __forceinline__ void block_sum2(Smem<TILE>& sm, int tid, float& x0, float& x1) {
  for (int o = 16; o > 0; o >>= 1) {
    x0 += __shfl_down_sync(0xffffffffu, x0, o);
    x1 += __shfl_down_sync(0xffffffffu, x1, o);
  }
  if ((tid & 31) == 0) {
    sm.red[0][tid >> 5] = x0;
    sm.red[1][tid >> 5] = x1;
  }
  __syncthreads();
  if (tid < 32) {
    constexpr int kWarps = TILE * TILE / 32;
    x0 = tid < kWarps ? sm.red[0][tid] : 0.f;
    x1 = tid < kWarps ? sm.red[1][tid] : 0.f;
    for (int o = 16; o > 0; o >>= 1) {
      x0 += __shfl_down_sync(0xffffffffu, x0, o);
      x1 += __shfl_down_sync(0xffffffffu, x1, o);
    }
  }
  __syncthreads();
}

template <typename T, int TILE>
__global__ void __launch_bounds__(TILE* TILE) bwd_kernel(BwdArgs a) {
  __shared__ Smem<TILE> sm;
  const Shape s = a.s;
  const Pos<TILE> ps(s.p);
  Tile t;
  if (!setup<TILE>(sm, s, a.rows, ps, t)) return;
  const T* g = static_cast<const T*>(a.grad);
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const float inv_pp = 1.f / (s.p * s.p);
  const int64_t HW = s.H * s.W;
  const int64_t base = t.n * s.C * HW + t.pix;
  const int64_t n_tiles = gridDim.x;
  float* part = a.workspace + (t.n * n_tiles + blockIdx.x) * 2 * s.C;  // [2][C]
  float mean, rstd;
  stats<T, TILE>(sm, ps, s, inv_pp, q, k, t, mean, rstd);
  // pass 2: channel means of gyh = g v w and gyh * yh; per-tile weight/bias partials
  float m1 = 0.f, m2 = 0.f;
  for (int64_t c = 0; c < s.C; ++c) {
    const int64_t off = base + c * HW;
    const float yh = (conv_at<T, TILE>(sm, ps, s.p, inv_pp, q, k, off, t.valid) - mean) * rstd;
    const float gz = t.valid ? to_f(g[off]) * to_f(v[off]) : 0.f;
    m1 += gz * a.weight[c];
    m2 += gz * a.weight[c] * yh;
    float sw = gz * yh, sb = gz;
    block_sum2<TILE>(sm, ps.tid, sw, sb);
    if (ps.tid == 0) {
      part[c] = sw;
      part[s.C + c] = sb;
    }
  }
  m1 /= s.C;
  m2 /= s.C;
  // pass 3: gradients
  T* gq = static_cast<T*>(a.grad_q);
  T* gk = static_cast<T*>(a.grad_k);
  T* gv = static_cast<T*>(a.grad_v);
  for (int64_t c = 0; c < s.C; ++c) {
    const int64_t off = base + c * HW;
    load_qk<T, TILE>(sm, q, k, off, t.valid, ps.tid);
    float2 qh, kh;
    spectra<TILE>(sm, ps, s.p, qh, kh);
    const float2 pv = cmul(qh, kh);
    const float y = inverse<TILE>(sm, ps, s.p, make_float2(pv.x * inv_pp, pv.y * inv_pp), 0);
    const float yh = (y - mean) * rstd;
    float gy = 0.f;
    if (t.valid) {
      const float gval = to_f(g[off]);
      const float wc = a.weight[c];
      gv[off] = from_f<T>(gval * (yh * wc + a.bias[c]));
      gy = rstd * (gval * to_f(v[off]) * wc - m1 - yh * m2);
    }
    sm.xs[0][ps.tid] = gy;  // xs last read before two barriers
    __syncthreads();
    sm.ta[0][ps.tid] = row_fwd_real<TILE>(sm.xs[0], sm.tw, ps, s.p);
    __syncthreads();
    const float2 gh = col_cplx<TILE>(sm.ta[0], sm.tw, ps, s.p, -1.f);
    const float2 pq = cmul_conj(gh, kh), pk = cmul_conj(gh, qh);
    sm.pp[0][ps.tid] = make_float2(pq.x * inv_pp, pq.y * inv_pp);
    sm.pp[1][ps.tid] = make_float2(pk.x * inv_pp, pk.y * inv_pp);
    __syncthreads();
    sm.ta[0][ps.tid] = row_cplx<TILE>(sm.pp[0], sm.tw, ps, s.p, 1.f);
    sm.ta[1][ps.tid] = row_cplx<TILE>(sm.pp[1], sm.tw, ps, s.p, 1.f);
    __syncthreads();
    const float dq = col_inv_real<TILE>(sm.ta[0], sm.tw, ps, s.p);
    const float dk = col_inv_real<TILE>(sm.ta[1], sm.tw, ps, s.p);
    if (t.valid) {
      gq[off] = from_f<T>(dq);
      gk[off] = from_f<T>(dk);
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

int64_t n_tiles(const Shape& s) {
  const int t = tile_size(s.p);
  return ((s.H + t - 1) / t) * ((s.W + t - 1) / t);
}

template <typename T, int TILE>
cudaError_t launch_fwd(const FwdArgs& a, cudaStream_t stream) {
  dim3 grid(static_cast<unsigned>(n_tiles(a.s)), static_cast<unsigned>(a.s.N));
  fwd_kernel<T, TILE><<<grid, TILE * TILE, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int TILE>
cudaError_t launch_bwd(const BwdArgs& a, cudaStream_t stream) {
  const int64_t tiles = n_tiles(a.s);
  const int64_t ws = backward_workspace_floats(a.s);
  cudaError_t err = cudaMemsetAsync(a.workspace, 0, ws * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(a.s.N));
  bwd_kernel<T, TILE><<<grid, TILE * TILE, 0, stream>>>(a);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  reduce_partials_kernel<<<static_cast<unsigned>(2 * a.s.C), kReduceThreads, 0, stream>>>(
      a.workspace, a.s.N * tiles, a.s.C, a.grad_weight, a.grad_bias);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_fwd(const FwdArgs& a, cudaStream_t stream) {
  return tile_size(a.s.p) == 32 ? launch_fwd<T, 32>(a, stream) : launch_fwd<T, 16>(a, stream);
}

template <typename T>
cudaError_t dispatch_bwd(const BwdArgs& a, cudaStream_t stream) {
  return tile_size(a.s.p) == 32 ? launch_bwd<T, 32>(a, stream) : launch_bwd<T, 16>(a, stream);
}

}  // namespace

int tile_size(int p) { return p > 16 ? p : 16; }

int64_t backward_workspace_floats(const Shape& s) { return s.N * n_tiles(s) * 2 * s.C; }

const char* check_shape(const Shape& s) {
  if (s.p != 4 && s.p != 8 && s.p != 16 && s.p != 32) return "window_size must be one of 4, 8, 16, 32";
  if (s.N < 1 || s.C < 1 || s.H < 1 || s.W < 1) return "N, C, H and W must all be >= 1";
  if (s.N > 65535) return "batch size N must be <= 65535 (grid y dimension)";
  if (n_tiles(s) > 0x7fffffffLL) return "image too large for the grid";
  if (2 * s.C > 0x7fffffffLL) return "too many channels";
  return nullptr;
}

cudaError_t forward(const FwdArgs& a, cudaStream_t stream) {
  if (check_shape(a.s) != nullptr) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::kFloat32: return dispatch_fwd<float>(a, stream);
    case DType::kFloat16: return dispatch_fwd<__half>(a, stream);
    case DType::kBFloat16: return dispatch_fwd<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t backward(const BwdArgs& a, cudaStream_t stream) {
  if (check_shape(a.s) != nullptr) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::kFloat32: return dispatch_bwd<float>(a, stream);
    case DType::kFloat16: return dispatch_bwd<__half>(a, stream);
    case DType::kBFloat16: return dispatch_bwd<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace wfa
}  // namespace moce
