// Torch-free CUDA kernels of the expert_conv family: fused pointwise -> depthwise convolutions (plain,
// GELU-gated, grouped over experts) forward and backward, the grouped 1x1 / weight-gradient kernels and
// the fused expert epilogue of the MoCE expert stage.
//
// Grouping: rows n of a batch belong to expert e with offsets[e] <= n < offsets[e+1] (int64 device
// tensor, read on the device only). meta is an int64 (E, 16) device table of per-expert sizes, weight
// offsets (into one packed weight buffer) and buffer bases; its columns per kernel are listed below and
// built by moce_kernels/ops/grouped_conv.py. Grids depend only on N, H, W and the largest channel
// counts, never on the routing. Every launcher runs on the given stream, never synchronises, and
// returns cudaGetLastError().
//
// dtypes: activations and weights float, half or bfloat16 (one dtype T per launch), fp32 accumulation;
// weight-gradient accumulators are fp32 (atomics). "F32" flags mark buffers that are fp32 whatever T is.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace moce {
namespace expert_conv {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// meta columns of the fused pw->dw launches:
//  0 c_in  1 c_out (pw output channels)  2 pw weight offset ([c_out, c_in])  3 dw weight offset ([c_out, k*k])
//  4 pw bias offset  5 dw bias offset  6 src base  7 src row stride  8 out base  9 out split (channels per
//  split)  10 split stride  11 out row stride  12 gy base  13 gy row stride
//  src(row, ci, p) = src[6] + row*[7] + ci*HW + p; out(n, c, p) = [8] + (c/[9])*[10] + n*[11] + (c%[9])*HW + p
struct PwdwParams {
  const void* src;       // T
  const void* w;         // T, packed pw weights
  const void* dw;        // T, packed dw weights
  const void* pb;        // T or null
  const void* db;        // T or null
  void* out;             // T (mode 0, 1)
  const void* g;         // T, mode 2: grad of the gated output (laid out like out)
  void* gofull;          // T, mode 2: (N, c_out, HW) grad wrt (a, b)
  const int64_t* offsets;
  const int64_t* meta;
  const int64_t* perm;   // null: src row = n; else src row = perm[n] / kslots
  int64_t kslots;
  int N, H, W, K, E, max_nch, mode;  // mode 0 plain, 1 gelu(a)*b, 2 gated backward epilogue
};
cudaError_t launch_pwdw(DType dt, const PwdwParams& p, cudaStream_t stream);

// Backward core: recompute the 1x1 halo; gy = dL/d(pw output) (T, base/row stride meta 12/13);
// gdw / gdb (fp32, same packing as dw weights / dw bias) += per-tile partials (atomics).
struct PwdwBwdParams {
  const void* src;
  const void* w;
  const void* dw;
  const void* pb;   // T or null
  const void* go;   // T, laid out like the forward output
  void* gy;         // T
  float* gdw;
  float* gdb;       // null: no dw bias
  const int64_t* offsets;
  const int64_t* meta;
  const int64_t* perm;
  int64_t kslots;
  int N, H, W, K, E, max_cout;
};
cudaError_t launch_pwdw_bwd(DType dt, const PwdwBwdParams& p, cudaStream_t stream);

// Grouped 1x1: Y[n, c, p] (+)= sum_ci W[c*so + ci*si] X[row, ci, p] (+ b[c]).
// meta: 0 c_in 1 c_out 2 w offset 3 w stride (out) 4 w stride (in) 5 bias offset 6 x base 7 x row stride
//       8 y base 9 y row stride
struct GemmParams {
  const void* x;  // T
  const void* w;  // T
  const void* b;  // T or null
  void* y;        // T, or fp32 when y_f32
  bool y_f32, accumulate;
  const int64_t* offsets;
  const int64_t* meta;
  const int64_t* perm;
  int64_t kslots;
  int N, HW, E, max_cout;
};
cudaError_t launch_gemm(DType dt, const GemmParams& p, cudaStream_t stream);

// Grouped weight gradient: o[c*c_in + ci] += sum_{n in segment e, p} G[n, c, p] X[row, ci, p]; bo[c] += sum G.
// meta: 0 c_out 1 c_in 2 o offset 3 g base 4 g row stride 5 x base 6 x row stride 7 bias-grad offset
struct WgradParams {
  const void* g;  // T, or fp32 when g_f32
  const void* x;  // T
  float* o;
  float* bo;      // null: no bias grad
  bool g_f32;
  const int64_t* offsets;
  const int64_t* meta;
  const int64_t* perm;
  int64_t kslots;
  int HW, E, max_cout, max_cin, n_split;
};
cudaError_t launch_wgrad(DType dt, const WgradParams& p, cudaStream_t stream);

// Expert epilogue. meta: 0 r (0: expert inactive, out = xs) 1 W_o offset 2 b_o offset 3 W_1 offset
// 4 W_2 offset 5 base of the expert's (N, r, HW) block in attn (and gt/gu/h).
// forward: out[n] = xs[row] + W_2 ((W_o attn[n] + b_o) * silu(W_1 shared[img])), row = img if x_gather.
struct FinalParams {
  const void* xs;
  const void* shared;
  const void* attn;
  const void* w;
  void* out;
  const int64_t* offsets;
  const int64_t* meta;
  const int64_t* perm;
  int64_t kslots;
  int N, C, HW, E, max_r;  // max_r: the largest rank in meta (sizes the shared memory of h)
  bool x_gather;
};
cudaError_t launch_final_fwd(DType dt, const FinalParams& p, cudaStream_t stream);

// backward: from G = dL/d out (T or fp32) writes gt = dL/dt, gu = dL/du, h = t * silu(u) (T).
struct FinalBwdParams {
  const void* g;
  bool g_f32;
  const void* shared;
  const void* attn;
  const void* w;
  void* gt;
  void* gu;
  void* h;
  const int64_t* offsets;
  const int64_t* meta;
  const int64_t* perm;
  int64_t kslots;
  int N, C, HW, E, max_r;
};
cudaError_t launch_final_bwd(DType dt, const FinalBwdParams& p, cudaStream_t stream);

// out[b, l] = sum_j src[inv[b*k + j], l] (src fp32 (B*k, L), out T (B, L)), j in slot order.
cudaError_t launch_gather_sum(DType dt, const float* src, const int64_t* inv, void* out, int64_t B, int64_t L,
                              int64_t kslots, cudaStream_t stream);

}  // namespace expert_conv
}  // namespace moce
