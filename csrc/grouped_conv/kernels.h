// Torch-free CUDA kernels of the grouped convolutions: the fused pointwise -> depthwise convolution
// (plain, GELU-gated, and the gated backward's epilogue) forward and its backward core, the grouped 1x1
// and its weight gradient. Grouped over the experts of a batch (common/group_args.h: the rows of expert
// e, the meta table, the row permutation); the trunk's convolutions are the one-group case. Each
// kernel's meta table (its columns named in common/expert_stage_meta.h) is given with its parameters
// below. Grids depend only on N, H, W and the largest channel counts, never on the routing. Every
// launcher runs on the given stream, never synchronises, and returns cudaGetLastError().
//
// dtypes: activations and weights float, half or bfloat16 (one dtype T per launch), fp32 accumulation;
// weight-gradient accumulators are fp32 (atomics). "F32" flags mark buffers that are fp32 whatever T is.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "common/dtype.h"
#include "common/group_args.h"

namespace moce {
namespace grouped_conv {

// meta of the fused pw->dw launches: moce_meta::pw_dw_col (C_OUT: pw output channels; the pw weight
// [C_OUT, C_IN] at PW_WEIGHT, the dw weight [C_OUT, k*k] at DW_WEIGHT, the biases at PW_BIAS, DW_BIAS);
//  src(row, ci, p) = SRC + row*SRC_ROW_STRIDE + ci*HW + p;
//  out(n, c, p) = OUT + (c/OUT_SPLIT)*OUT_SPLIT_STRIDE + n*OUT_ROW_STRIDE + (c%OUT_SPLIT)*HW + p
struct PwdwParams : GroupArgs {
  const void* src;       // T
  const void* w;         // T, packed pw weights
  const void* dw;        // T, packed dw weights
  const void* pb;        // T or null
  const void* db;        // T or null
  void* out;             // T (mode 0, 1)
  const void* g;         // T, mode 2: grad of the gated output (laid out like out)
  void* gofull;          // T, mode 2: (N, c_out, HW) grad wrt (a, b)
  int N, H, W, K, max_nch, mode;  // mode 0 plain, 1 gelu(a)*b, 2 gated backward epilogue
};
cudaError_t launch_pwdw(DType dt, const PwdwParams& p, cudaStream_t stream);

// Backward core: recompute the 1x1 halo; gy = dL/d(pw output) (T, at GRAD_PW + n*GRAD_PW_ROW_STRIDE);
// gdw / gdb (fp32, same packing as dw weights / dw bias: DW_WEIGHT, DW_BIAS) += per-tile partials (atomics).
struct PwdwBwdParams : GroupArgs {
  const void* src;
  const void* w;
  const void* dw;
  const void* pb;   // T or null
  const void* go;   // T, laid out like the forward output
  void* gy;         // T
  float* gdw;
  float* gdb;       // null: no dw bias
  int N, H, W, K, max_cout;
};
cudaError_t launch_pwdw_bwd(DType dt, const PwdwBwdParams& p, cudaStream_t stream);

// Grouped 1x1: Y[n, c, p] (+)= sum_ci W[c*so + ci*si] X[row, ci, p] (+ b[c]).
// meta: moce_meta::gemm_col (W at WEIGHT, so = WEIGHT_OUT_STRIDE, si = WEIGHT_IN_STRIDE; b at BIAS;
//       X at SRC + row*SRC_ROW_STRIDE, Y at OUT + n*OUT_ROW_STRIDE)
struct GemmParams : GroupArgs {
  const void* x;  // T
  const void* w;  // T
  const void* b;  // T or null
  void* y;        // T, or fp32 when y_f32
  bool y_f32, accumulate;
  int N, HW, max_cout;
};
cudaError_t launch_gemm(DType dt, const GemmParams& p, cudaStream_t stream);

// Grouped weight gradient: o[c*c_in + ci] += sum_{n in segment e, p} G[n, c, p] X[row, ci, p]; bo[c] += sum G.
// meta: moce_meta::wgrad_col (o at GRAD_WEIGHT, bo at GRAD_BIAS; G at G + n*G_ROW_STRIDE, X at
//       X + row*X_ROW_STRIDE)
struct WgradParams : GroupArgs {
  const void* g;  // T, or fp32 when g_f32
  const void* x;  // T
  float* o;
  float* bo;      // null: no bias grad
  bool g_f32;
  int HW, max_cout, max_cin, n_split;
};
cudaError_t launch_wgrad(DType dt, const WgradParams& p, cudaStream_t stream);

}  // namespace grouped_conv
}  // namespace moce
