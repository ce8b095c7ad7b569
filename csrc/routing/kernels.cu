// CUDA kernels of the routing family (see kernels.h for shapes and semantics).
//
// Design:
//  * router: one pass over x (pool_partial_kernel: grid (B*C rows, S chunks), fp32 partial sums, no
//    atomics) and one single-block head kernel that does everything else in float64 (tiny: B x E),
//    so that --use_fast_math cannot touch the softmax / erf / loss accuracy.
//  * dispatch: one block, stable counting sort with warp ballots (sized by B*k, never by data).
//  * combine: grid (tiles of C*H*W, B); each block finds its k rows by scanning perm (B*k entries)
//    and sums them in j order in fp32; backward writes partial dot products per tile, then a second
//    kernel sums them in a fixed order (deterministic, no atomics anywhere).
#include "routing/kernels.h"

#include "common/dtype.h"

namespace moce {
namespace routing {
namespace {

constexpr int kThreads = 256;          // block size of every kernel but dispatch
constexpr int kVec = 8;                // elements per thread per tile (8 loads in flight)
constexpr int kTile = kThreads * kVec; // elements per block per tile
constexpr int kDispatchThreads = 1024;
constexpr int kDispatchWarps = kDispatchThreads / 32;
constexpr int kMaxGridY = 65535;
constexpr unsigned kFull = 0xffffffffu;

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// Deterministic sum over a block of kThreads threads; the result is valid in thread 0.
template <typename A>
__device__ A block_sum(A v) {
  __shared__ A warp_part[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // warp_part may still be read by a previous call
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  A r = 0;
  if (warp == 0) {
    r = lane < kThreads / 32 ? warp_part[lane] : A(0);
    r = warp_sum(r);
  }
  return r;
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------- pooling
template <typename T>
__global__ void __launch_bounds__(kThreads) pool_partial_kernel(const T* __restrict__ x, int64_t hw, int64_t chunk,
                                                                int split, float* __restrict__ part) {
  const int64_t row = blockIdx.x;
  const int s = blockIdx.y;
  const int64_t start = static_cast<int64_t>(s) * chunk;
  const int64_t end = start + chunk < hw ? start + chunk : hw;
  const T* src = x + row * hw;
  float acc = 0.f;
  for (int64_t off = start; off < end; off += kTile) {
#pragma unroll
    for (int q = 0; q < kVec; ++q) {
      const int64_t i = off + q * kThreads + threadIdx.x;
      if (i < end) acc += to_f(src[i]);
    }
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) part[row * split + s] = acc;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) broadcast_rows_kernel(const float* __restrict__ src, T* __restrict__ out,
                                                                  int64_t hw) {
  const int64_t row = blockIdx.x;
  const T v = from_f<T>(src[row]);
  T* dst = out + row * hw;
  for (int64_t off = static_cast<int64_t>(blockIdx.y) * kTile; off < hw; off += static_cast<int64_t>(gridDim.y) * kTile) {
#pragma unroll
    for (int q = 0; q < kVec; ++q) {
      const int64_t i = off + q * kThreads + threadIdx.x;
      if (i < hw) dst[i] = v;
    }
  }
}

// ---------------------------------------------------------------- router head (float64 inside)
struct Scratch {
  double* pooled;  // (B, C)
  double* logits;  // (B, E)
  double* q;       // (B, E) softmax(logits)
  double* z;       // (B, E) (threshold - logits) / noise_std
  double* ld;      // (B, E) 1 - Phi(z)
  double* dlog;    // (B, E)
  double* kk;      // (B,) index of the k-th largest noisy logit
};

__device__ Scratch carve(double* base, int64_t B, int64_t C, int64_t E) {
  Scratch s;
  s.pooled = base;
  s.logits = s.pooled + B * C;
  s.q = s.logits + B * E;
  s.z = s.q + B * E;
  s.ld = s.z + B * E;
  s.dlog = s.ld + B * E;
  s.kk = s.dlog + B * E;
  return s;
}

// Does a rank above b in the routing order? NaN ranks above every number (reference.routing.top_k);
// equal values keep the lower index first, so callers scan in index order and take only "ranks above".
__device__ __forceinline__ bool ranks_above(double a, double b) { return (a != a && b == b) || a > b; }

// Index of the best entry of v[0..E) not yet in `taken` (a bit per entry), which it joins.
__device__ int take_best(const double* v, int E, unsigned long long& taken) {
  int best = -1;
  for (int e = 0; e < E; ++e)
    if (!((taken >> e) & 1ull) && (best < 0 || ranks_above(v[e], v[best]))) best = e;
  if (best < 0) best = 0;
  taken |= 1ull << best;
  return best;
}

// The k largest of v[0..E) in the routing order: f(j, e) for the j-th largest, v[e].
template <typename F>
__device__ __forceinline__ void top_k(const double* v, int E, int k, F&& f) {
  unsigned long long taken = 0ull;
  for (int j = 0; j < k; ++j) f(j, take_best(v, E, taken));
}

// Index of the (j+1)-th largest of v[0..E) in the routing order.
__device__ int kth_largest(const double* v, int E, int j) {
  unsigned long long taken = 0ull;
  int best = 0;
  for (int t = 0; t <= j; ++t) best = take_best(v, E, taken);
  return best;
}

__device__ void softmax_row(const double* v, double* p, int E) {
  double mx = v[0];
  for (int e = 1; e < E; ++e) mx = v[e] > mx ? v[e] : mx;
  double sum = 0.0;
  for (int e = 0; e < E; ++e) {
    p[e] = exp(v[e] - mx);
    sum += p[e];
  }
  for (int e = 0; e < E; ++e) p[e] /= sum;
}

// Phases shared by forward and backward: pooled means and noise-free logits into scratch.
__device__ void pooled_and_logits(const RouteParams& p, const Scratch& s) {
  const int64_t B = p.B, C = p.C, F = p.F, E = p.E;
  for (int64_t i = threadIdx.x; i < B * C; i += blockDim.x) {
    double acc = 0.0;
    for (int64_t t = 0; t < p.S; ++t) acc += p.part[i * p.S + t];
    s.pooled[i] = acc * p.inv_hw;
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int64_t pair = warp; pair < B * E; pair += nwarps) {
    const int64_t b = pair / E, e = pair % E;
    double acc = 0.0;
    for (int64_t c = lane; c < C; c += 32) acc += s.pooled[b * C + c] * static_cast<double>(p.gate_weight[e * C + c]);
    for (int64_t f = lane; f < F; f += 32)
      acc += static_cast<double>(p.freq_emb[b * F + f]) * static_cast<double>(p.freq_weight[e * F + f]);
    acc = warp_sum(acc);
    if (lane == 0) s.logits[pair] = acc;
  }
  __syncthreads();
}

// Per image b: q, z, 1 - Phi(z) rows and the index of the k-th noisy choice (for the aux loss).
__device__ void loss_rows(const RouteParams& p, const Scratch& s, int64_t b, const double* noisy) {
  const int E = static_cast<int>(p.E);
  const int kk = kth_largest(noisy, E, p.k - 1);
  const double thr = noisy[kk];
  s.kk[b] = kk;
  softmax_row(s.logits + b * E, s.q + b * E, E);
  for (int e = 0; e < E; ++e) {
    const double z = (thr - s.logits[b * E + e]) / static_cast<double>(p.noise_std);
    s.z[b * E + e] = z;
    s.ld[b * E + e] = 1.0 - 0.5 * (1.0 + erf(z * 0.70710678118654752440));
  }
}

// importance (E,) and load (E,) into shared arrays (threads e < E, serial over b: fixed order).
__device__ void importance_and_load(const RouteParams& p, const Scratch& s, double* imp, double* load) {
  const int64_t B = p.B, E = p.E;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    double a = 0.0, l = 0.0;
    for (int64_t b = 0; b < B; ++b) {
      a += s.q[b * E + e];
      l += s.ld[b * E + e];
    }
    imp[e] = p.use_complexity ? a * static_cast<double>(p.complexity[e]) : a;
    load[e] = l / static_cast<double>(B);
  }
  __syncthreads();
}

// cv2 = var / (mean + 1e-8)^2 with the unbiased variance; returns mean + 1e-8 and var.
__device__ void cv2_parts(const double* v, int E, double* m, double* var) {
  double mu = 0.0;
  for (int e = 0; e < E; ++e) mu += v[e];
  mu /= E;
  double ss = 0.0;
  for (int e = 0; e < E; ++e) ss += (v[e] - mu) * (v[e] - mu);
  *m = mu + 1e-8;
  *var = ss / (E - 1);
}

__global__ void __launch_bounds__(kThreads) route_head_kernel(RouteParams p, float* __restrict__ gates,
                                                              int64_t* __restrict__ indices,
                                                              float* __restrict__ logits, float* __restrict__ loss) {
  __shared__ double imp[kMaxExperts], load[kMaxExperts];
  const Scratch s = carve(p.scratch, p.B, p.C, p.E);
  pooled_and_logits(p, s);
  const int E = static_cast<int>(p.E), k = p.k;
  for (int64_t b = threadIdx.x; b < p.B; b += blockDim.x) {
    double noisy[kMaxExperts], prob[kMaxExperts];
    for (int e = 0; e < E; ++e) {
      logits[b * E + e] = static_cast<float>(s.logits[b * E + e]);
      noisy[e] = s.logits[b * E + e] + static_cast<double>(p.noise[b * E + e]);
    }
    softmax_row(noisy, prob, E);
    top_k(prob, E, k, [&](int j, int e) {
      gates[b * k + j] = static_cast<float>(prob[e]);
      indices[b * k + j] = e;
    });
    if (p.compute_loss) loss_rows(p, s, b, noisy);
  }
  __syncthreads();
  if (!p.compute_loss) {
    if (threadIdx.x == 0) *loss = 0.f;
    return;
  }
  importance_and_load(p, s, imp, load);
  if (threadIdx.x == 0) {
    double m1, v1, m2, v2;
    cv2_parts(imp, E, &m1, &v1);
    cv2_parts(load, E, &m2, &v2);
    *loss = static_cast<float>(0.5 * v1 / (m1 * m1) + 0.5 * v2 / (m2 * m2));
  }
}

// d cv2 / d v_e, scaled by `scale`.
__device__ void dcv2(const double* v, int E, double scale, double* out) {
  double m, var;
  cv2_parts(v, E, &m, &var);
  const double mu = m - 1e-8;
  for (int e = 0; e < E; ++e) out[e] = scale * (2.0 * (v[e] - mu) / ((E - 1) * m * m) - 2.0 * var / (E * m * m * m));
}

__global__ void __launch_bounds__(kThreads) route_head_backward_kernel(
    RouteParams p, const float* __restrict__ grad_gates, const float* __restrict__ grad_logits,
    const float* __restrict__ grad_loss, float* __restrict__ grad_fe, float* __restrict__ grad_gw,
    float* __restrict__ grad_fw, float* __restrict__ grad_pooled) {
  __shared__ double imp[kMaxExperts], load[kMaxExperts], dimp[kMaxExperts], dload[kMaxExperts];
  const Scratch s = carve(p.scratch, p.B, p.C, p.E);
  pooled_and_logits(p, s);
  const int64_t B = p.B, C = p.C, F = p.F;
  const int E = static_cast<int>(p.E), k = p.k;
  // per image: gates -> softmax backward, plus grad_logits; loss rows
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    double noisy[kMaxExperts], prob[kMaxExperts], dp[kMaxExperts];
    for (int e = 0; e < E; ++e) {
      noisy[e] = s.logits[b * E + e] + static_cast<double>(p.noise[b * E + e]);
      dp[e] = 0.0;
    }
    softmax_row(noisy, prob, E);
    top_k(prob, E, k, [&](int j, int e) { dp[e] += static_cast<double>(grad_gates[b * k + j]); });
    double dot = 0.0;
    for (int e = 0; e < E; ++e) dot += dp[e] * prob[e];
    for (int e = 0; e < E; ++e)
      s.dlog[b * E + e] = prob[e] * (dp[e] - dot) + static_cast<double>(grad_logits[b * E + e]);
    if (p.compute_loss) loss_rows(p, s, b, noisy);
  }
  __syncthreads();
  if (p.compute_loss) {
    importance_and_load(p, s, imp, load);
    if (threadIdx.x == 0) {
      const double gl = static_cast<double>(*grad_loss);
      dcv2(imp, E, 0.5 * gl, dimp);
      dcv2(load, E, 0.5 * gl, dload);
      if (p.use_complexity)
        for (int e = 0; e < E; ++e) dimp[e] *= static_cast<double>(p.complexity[e]);
    }
    __syncthreads();
    const double inv_sqrt_2pi = 0.39894228040143267794;
    for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
      const double* q = s.q + b * E;
      double qdot = 0.0, dthr = 0.0;
      for (int e = 0; e < E; ++e) qdot += dimp[e] * q[e];
      for (int e = 0; e < E; ++e) {
        const double z = s.z[b * E + e];
        const double a = exp(-0.5 * z * z) * inv_sqrt_2pi * dload[e] / (static_cast<double>(p.noise_std) * B);
        s.dlog[b * E + e] += q[e] * (dimp[e] - qdot) + a;
        dthr -= a;
      }
      int kk = static_cast<int>(s.kk[b]);
      kk = kk < 0 ? 0 : (kk >= E ? E - 1 : kk);
      s.dlog[b * E + kk] += dthr;
    }
    __syncthreads();
  }
  // grads of the linear maps (fixed summation order)
  for (int64_t i = threadIdx.x; i < E * C; i += blockDim.x) {
    const int64_t e = i / C, c = i % C;
    double acc = 0.0;
    for (int64_t b = 0; b < B; ++b) acc += s.dlog[b * E + e] * s.pooled[b * C + c];
    grad_gw[i] = static_cast<float>(acc);
  }
  for (int64_t i = threadIdx.x; i < E * F; i += blockDim.x) {
    const int64_t e = i / F, f = i % F;
    double acc = 0.0;
    for (int64_t b = 0; b < B; ++b) acc += s.dlog[b * E + e] * static_cast<double>(p.freq_emb[b * F + f]);
    grad_fw[i] = static_cast<float>(acc);
  }
  for (int64_t i = threadIdx.x; i < B * F; i += blockDim.x) {
    const int64_t b = i / F, f = i % F;
    double acc = 0.0;
    for (int e = 0; e < E; ++e) acc += s.dlog[b * E + e] * static_cast<double>(p.freq_weight[e * F + f]);
    grad_fe[i] = static_cast<float>(acc);
  }
  for (int64_t i = threadIdx.x; i < B * C; i += blockDim.x) {
    const int64_t b = i / C, c = i % C;
    double acc = 0.0;
    for (int e = 0; e < E; ++e) acc += s.dlog[b * E + e] * static_cast<double>(p.gate_weight[e * C + c]);
    grad_pooled[i] = static_cast<float>(acc * p.inv_hw);
  }
}

// ---------------------------------------------------------------- dispatch
// The bucket of slot sidx: its expert idx[sidx], E for an index outside [0, E), or -1 (none) past n.
__device__ __forceinline__ int bucket_of(const int64_t* __restrict__ idx, int64_t sidx, int64_t n, int E) {
  int key = -1;
  if (sidx < n) {
    const int64_t v = idx[sidx];
    key = (v >= 0 && v < E) ? static_cast<int>(v) : E;
  }
  return key;
}

// row[bk] = (ADD: +=) the number of this warp's lanes whose key is bk, for every bucket bk < NB (lane 0
// writes).
template <bool ADD>
__device__ __forceinline__ void count_warp(int key, int NB, int lane, int64_t* row) {
  for (int bk = 0; bk < NB; ++bk) {
    const unsigned m = __ballot_sync(kFull, key == bk);
    if (lane == 0) {
      if (ADD) row[bk] += __popc(m);
      else row[bk] = __popc(m);
    }
  }
}

__global__ void __launch_bounds__(kDispatchThreads) dispatch_kernel(const int64_t* __restrict__ idx, int64_t n, int E,
                                                                    int64_t* __restrict__ counts,
                                                                    int64_t* __restrict__ offsets,
                                                                    int64_t* __restrict__ perm) {
  __shared__ int64_t tile[kDispatchWarps][kMaxExperts + 1];
  __shared__ int64_t run[kMaxExperts + 1];
  const int NB = E + 1;  // bucket E: indices outside [0, E)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned lt = (1u << lane) - 1u;
  for (int i = threadIdx.x; i < kDispatchWarps * (kMaxExperts + 1); i += blockDim.x)
    tile[i / (kMaxExperts + 1)][i % (kMaxExperts + 1)] = 0;
  __syncthreads();
  // pass 1: per-warp bucket totals
  for (int64_t t0 = 0; t0 < n; t0 += kDispatchThreads)
    count_warp<true>(bucket_of(idx, t0 + threadIdx.x, n, E), NB, lane, tile[warp]);
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t acc = 0;
    offsets[0] = 0;
    for (int bk = 0; bk < NB; ++bk) {
      int64_t total = 0;
      for (int w = 0; w < kDispatchWarps; ++w) total += tile[w][bk];
      run[bk] = acc;
      acc += total;
      if (bk < E) {
        counts[bk] = total;
        offsets[bk + 1] = acc;
      }
    }
  }
  __syncthreads();
  // pass 2: stable placement, one tile of kDispatchThreads slots at a time
  for (int64_t t0 = 0; t0 < n; t0 += kDispatchThreads) {
    const int64_t sidx = t0 + threadIdx.x;
    const int key = bucket_of(idx, sidx, n, E);
    const unsigned same = __match_any_sync(kFull, key);
    const int rank = __popc(same & lt);
    count_warp<false>(key, NB, lane, tile[warp]);
    __syncthreads();
    for (int bk = threadIdx.x; bk < NB; bk += blockDim.x) {
      int64_t acc = run[bk];
      for (int w = 0; w < kDispatchWarps; ++w) {
        const int64_t c = tile[w][bk];
        tile[w][bk] = acc;
        acc += c;
      }
      run[bk] = acc;
    }
    __syncthreads();
    if (key >= 0) {
      const int64_t dst = tile[warp][key] + rank;
      if (dst >= 0 && dst < n) perm[dst] = sidx;
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------- combine
// pos[j] = row r with perm[r] == b*k + j (0 if absent), gate[j] = gates[b, j].
__device__ void find_rows(const int64_t* __restrict__ perm, const float* __restrict__ gates, int64_t b, int k,
                          int64_t nslot, int64_t* pos, float* g) {
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    pos[j] = 0;
    g[j] = gates[b * k + j];
  }
  __syncthreads();
  const int64_t lo = b * k;
  for (int64_t r = threadIdx.x; r < nslot; r += blockDim.x) {
    const int64_t sl = perm[r];
    if (sl >= lo && sl < lo + k) pos[sl - lo] = r;
  }
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(const T* __restrict__ eo, const float* __restrict__ gates,
                                                           const int64_t* __restrict__ perm, T* __restrict__ out,
                                                           int k, int64_t N) {
  __shared__ int64_t pos[kMaxTopK];
  __shared__ float g[kMaxTopK];
  const int64_t b = blockIdx.y;
  const int64_t nslot = static_cast<int64_t>(gridDim.y) * k;
  find_rows(perm, gates, b, k, nslot, pos, g);
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  float acc[kVec];
#pragma unroll
  for (int q = 0; q < kVec; ++q) acc[q] = 0.f;
  for (int j = 0; j < k; ++j) {
    const T* row = eo + pos[j] * N;
    const float gj = g[j];
#pragma unroll
    for (int q = 0; q < kVec; ++q) {
      const int64_t i = base + q * kThreads;
      if (i < N) acc[q] += gj * to_f(row[i]);
    }
  }
#pragma unroll
  for (int q = 0; q < kVec; ++q) {
    const int64_t i = base + q * kThreads;
    if (i < N) out[b * N + i] = from_f<T>(acc[q]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) combine_bwd_rows_kernel(const T* __restrict__ grad,
                                                                    const T* __restrict__ eo,
                                                                    const float* __restrict__ gates,
                                                                    const int64_t* __restrict__ perm,
                                                                    T* __restrict__ geo, float* __restrict__ part,
                                                                    int k, int64_t nslot, int64_t N) {
  const int64_t r = blockIdx.y;
  int64_t sl = perm[r];
  sl = sl < 0 ? 0 : (sl >= nslot ? nslot - 1 : sl);
  const int64_t b = sl / k;
  const float g = gates[sl];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  float dot = 0.f;
#pragma unroll
  for (int q = 0; q < kVec; ++q) {
    const int64_t i = base + q * kThreads;
    if (i < N) {
      const float gr = to_f(grad[b * N + i]);
      geo[r * N + i] = from_f<T>(g * gr);
      dot += gr * to_f(eo[r * N + i]);
    }
  }
  dot = block_sum(dot);
  if (threadIdx.x == 0) part[r * gridDim.x + blockIdx.x] = dot;
}

__global__ void __launch_bounds__(kThreads) combine_bwd_gates_kernel(const float* __restrict__ part,
                                                                     const int64_t* __restrict__ perm,
                                                                     float* __restrict__ grad_gates, int64_t nslot,
                                                                     int64_t nblk) {
  const int64_t r = blockIdx.x;
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < nblk; i += blockDim.x) acc += part[r * nblk + i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    int64_t sl = perm[r];
    sl = sl < 0 ? 0 : (sl >= nslot ? nslot - 1 : sl);
    grad_gates[sl] = acc;
  }
}

}  // namespace

// ---------------------------------------------------------------- launchers
int pool_split(int64_t rows, int64_t hw) {
  const int64_t target = 2048;  // programs to aim for (many waves on 132 SMs)
  int64_t split = cdiv(target, rows > 0 ? rows : 1);
  const int64_t max_split = cdiv(hw > 0 ? hw : 1, kTile);
  split = split < max_split ? split : max_split;
  split = split < 256 ? split : 256;
  return static_cast<int>(split < 1 ? 1 : split);
}

int64_t route_scratch_doubles(int64_t B, int64_t C, int64_t E) { return B * C + 5 * B * E + B; }

cudaError_t launch_pool_partial(const void* x, DType dtype, int64_t rows, int64_t hw, int split, float* part,
                                cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (split < 1 || split > kMaxGridY) return cudaErrorInvalidValue;
  const int64_t chunk = cdiv(cdiv(hw, split), kTile) * kTile;
  return MOCE_DISPATCH_FLOATING_TYPES(dtype, [&] {
    using T = scalar_t;
    pool_partial_kernel<T><<<dim3(static_cast<unsigned>(rows), split), kThreads, 0, stream>>>(
        static_cast<const T*>(x), hw, chunk, split, part);
    return cudaGetLastError();
  });
}

static bool head_ok(const RouteParams& p) {
  return p.B >= 1 && p.E >= 1 && p.E <= kMaxExperts && p.k >= 1 && p.k <= p.E && p.S >= 1;
}

cudaError_t launch_route_head(const RouteParams& p, float* gates, int64_t* indices, float* logits, float* loss,
                              cudaStream_t stream) {
  if (!head_ok(p)) return cudaErrorInvalidValue;
  route_head_kernel<<<1, kThreads, 0, stream>>>(p, gates, indices, logits, loss);
  return cudaGetLastError();
}

cudaError_t launch_route_head_backward(const RouteParams& p, const float* grad_gates, const float* grad_logits,
                                       const float* grad_loss, float* grad_freq_emb, float* grad_gate_weight,
                                       float* grad_freq_weight, float* grad_pooled, cudaStream_t stream) {
  if (!head_ok(p)) return cudaErrorInvalidValue;
  route_head_backward_kernel<<<1, kThreads, 0, stream>>>(p, grad_gates, grad_logits, grad_loss, grad_freq_emb,
                                                         grad_gate_weight, grad_freq_weight, grad_pooled);
  return cudaGetLastError();
}

cudaError_t launch_broadcast_rows(const float* src, void* out, DType dtype, int64_t rows, int64_t hw,
                                  cudaStream_t stream) {
  if (rows <= 0 || hw <= 0) return cudaSuccess;
  const int64_t tiles = cdiv(hw, kTile);
  const unsigned gy = static_cast<unsigned>(tiles < kMaxGridY ? tiles : kMaxGridY);
  return MOCE_DISPATCH_FLOATING_TYPES(dtype, [&] {
    using T = scalar_t;
    broadcast_rows_kernel<T><<<dim3(static_cast<unsigned>(rows), gy), kThreads, 0, stream>>>(src, static_cast<T*>(out),
                                                                                           hw);
    return cudaGetLastError();
  });
}

cudaError_t launch_dispatch(const int64_t* indices, int64_t n, int num_experts, int64_t* counts, int64_t* offsets,
                            int64_t* perm, cudaStream_t stream) {
  if (num_experts < 1 || num_experts > kMaxExperts || n < 0) return cudaErrorInvalidValue;
  dispatch_kernel<<<1, kDispatchThreads, 0, stream>>>(indices, n, num_experts, counts, offsets, perm);
  return cudaGetLastError();
}

cudaError_t launch_combine(const void* expert_out, const float* gates, const int64_t* perm, void* out, DType dtype,
                           int64_t B, int k, int64_t N, cudaStream_t stream) {
  if (B <= 0 || N <= 0) return cudaSuccess;
  if (k < 1 || k > kMaxTopK || B > kMaxGridY) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(cdiv(N, kTile)), static_cast<unsigned>(B));
  return MOCE_DISPATCH_FLOATING_TYPES(dtype, [&] {
    using T = scalar_t;
    combine_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(expert_out), gates, perm,
                                                     static_cast<T*>(out), k, N);
    return cudaGetLastError();
  });
}

int64_t combine_backward_scratch_floats(int64_t B, int k, int64_t N) {
  const int64_t nblk = cdiv(N > 0 ? N : 1, kTile);
  return B * k * nblk;
}

cudaError_t launch_combine_backward(const void* grad, const void* expert_out, const float* gates, const int64_t* perm,
                                    void* grad_expert_out, float* grad_gates, float* scratch, DType dtype, int64_t B,
                                    int k, int64_t N, cudaStream_t stream) {
  const int64_t nslot = B * k;
  if (nslot <= 0) return cudaSuccess;
  if (k < 1 || nslot > kMaxGridY || N <= 0) return cudaErrorInvalidValue;
  const int64_t nblk = cdiv(N, kTile);
  cudaError_t err = MOCE_DISPATCH_FLOATING_TYPES(dtype, [&] {
    using T = scalar_t;
    combine_bwd_rows_kernel<T><<<dim3(static_cast<unsigned>(nblk), static_cast<unsigned>(nslot)), kThreads, 0,
                                 stream>>>(static_cast<const T*>(grad), static_cast<const T*>(expert_out), gates, perm,
                                           static_cast<T*>(grad_expert_out), scratch, k, nslot, N);
    return cudaGetLastError();
  });
  if (err != cudaSuccess) return err;
  combine_bwd_gates_kernel<<<static_cast<unsigned>(nslot), kThreads, 0, stream>>>(scratch, perm, grad_gates, nslot,
                                                                                  nblk);
  return cudaGetLastError();
}

}  // namespace routing
}  // namespace moce
