// Torch-free CUDA kernels of the MoCE expert stage that follow the experts' window attention: the
// fused expert epilogue, forward and backward, and the gather-sum of the slots of each image. Grouped
// over experts as the grouped convolutions are (common/group_args.h); every launcher runs on the given
// stream, never synchronises, and returns cudaGetLastError(). Tensors of dtype T (float, half or
// bfloat16, one per launch) unless marked fp32; fp32 accumulation.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "common/dtype.h"
#include "common/group_args.h"

namespace moce {
namespace expert_stage {

// Expert epilogue of row n (expert e of rank r): t = W_o attn[n] + b_o, u = W_1 shared[img] (img =
// perm[n] / kslots, perm required), h = t * silu(u).
// meta: moce_meta::epilogue_col: RANK r (0: expert inactive, out = xs), the offsets of W_o (PROJ_OUT),
//       b_o (PROJ_OUT_BIAS), W_1 (PROJ1), W_2 (PROJ2) in the packed weights w, and ATTN, the base of the
//       expert's rows in attn (and in gt/gu/h, laid out alike): row n at ATTN + n*r*HW.
struct EpilogueArgs : GroupArgs {
  const void* shared;  // (B, C, HW)
  const void* attn;    // the experts' (N, r, HW) blocks
  const void* w;       // packed weights
  int N, C, HW, max_r;  // max_r: the largest rank in meta (sizes the shared memory of h)
};

// forward: out[n] = xs[row] + W_2 h, row = img if x_gather else n.
struct EpilogueParams : EpilogueArgs {
  const void* xs;
  void* out;  // (N, C, HW)
  bool x_gather;
};
cudaError_t launch_epilogue(DType dt, const EpilogueParams& p, cudaStream_t stream);

// backward: from G = dL/d out (T or fp32) writes gt = dL/dt, gu = dL/du and h (T, laid out like attn).
struct EpilogueBwdParams : EpilogueArgs {
  const void* g;
  bool g_f32;
  void* gt;
  void* gu;
  void* h;
};
cudaError_t launch_epilogue_backward(DType dt, const EpilogueBwdParams& p, cudaStream_t stream);

// out[b, l] = sum_j src[inv[b*k + j], l] (src fp32 (B*k, L), out T (B, L)), j in slot order.
cudaError_t launch_gather_sum(DType dt, const float* src, const int64_t* inv, void* out, int64_t B, int64_t L,
                              int64_t kslots, cudaStream_t stream);

}  // namespace expert_stage
}  // namespace moce
