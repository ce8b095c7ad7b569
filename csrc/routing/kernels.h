// Torch-free CUDA kernels of the routing family: router (pool, linear, softmax, top-k, aux loss),
// dispatch (stable counting sort of slots by expert) and the deterministic gated combine.
// Every launcher runs on the given stream, never synchronises, never reads device data on the host,
// and returns the launch's cudaError_t (cudaGetLastError()).
//
// Shapes (all contiguous, row-major):
//   x (B, C, HW); freq_emb (B, F); gate_weight (E, C); freq_weight (E, F); complexity (E,); noise (B, E)
//   gates (B, k) fp32; indices (B, k) int64; logits (B, E) fp32; loss () fp32
//   slots s = b*k + j; perm (B*k,) slot ids sorted by expert; expert_out (B*k, N) with N = C*H*W.
// Small router tensors (freq_emb, weights, complexity, noise, grads of gates/logits/loss) are fp32;
// the big tensors (x, expert_out, grads) are float, half or bfloat16, accumulated in fp32.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "common/dtype.h"

namespace moce {
namespace routing {

constexpr int kMaxExperts = 64;  // router and dispatch limit (one bit per expert in a uint64 mask)
constexpr int kMaxTopK = 64;

// ---------------------------------------------------------------- router
// Number of chunks S each (b, c) row of HW elements is cut into by the pooling pass.
int pool_split(int64_t rows, int64_t hw);

// Doubles of scratch the head kernels need (pooled, logits, per-image loss terms).
int64_t route_scratch_doubles(int64_t B, int64_t C, int64_t E);

struct RouteParams {
  const float* part;        // (B*C, S) partial sums from launch_pool_partial
  const float* freq_emb;    // (B, F)
  const float* gate_weight; // (E, C)
  const float* freq_weight; // (E, F)
  const float* complexity;  // (E,)
  const float* noise;       // (B, E)
  double* scratch;          // route_scratch_doubles(B, C, E) (float64 workspace)
  int64_t B, C, F, E, S;
  float inv_hw, noise_std;
  int k;
  bool compute_loss, use_complexity;
};

// part[row, s] = sum of x[row, s*chunk : (s+1)*chunk] (fp32), rows = B*C.
cudaError_t launch_pool_partial(const void* x, DType dtype, int64_t rows, int64_t hw, int split, float* part,
                                cudaStream_t stream);

// One block: logits, softmax(logits + noise), top-k gates/indices, aux loss (0 unless compute_loss).
cudaError_t launch_route_head(const RouteParams& p, float* gates, int64_t* indices, float* logits, float* loss,
                              cudaStream_t stream);

// One block: d logits from (grad_gates, grad_logits, grad_loss), then grads of freq_emb (B, F),
// gate_weight (E, C), freq_weight (E, F) (fp32) and grad_pooled (B, C) fp32 already divided by HW.
cudaError_t launch_route_head_backward(const RouteParams& p, const float* grad_gates, const float* grad_logits,
                                       const float* grad_loss, float* grad_freq_emb, float* grad_gate_weight,
                                       float* grad_freq_weight, float* grad_pooled, cudaStream_t stream);

// out[row, i] = src[row] for i < hw (cast to dtype).
cudaError_t launch_broadcast_rows(const float* src, void* out, DType dtype, int64_t rows, int64_t hw,
                                  cudaStream_t stream);

// ---------------------------------------------------------------- dispatch
// One block: counts (E,), offsets (E+1,), perm (n,) int64; stable; indices outside [0, E) are placed
// after every expert's segment and not counted, so every perm entry is written.
cudaError_t launch_dispatch(const int64_t* indices, int64_t n, int num_experts, int64_t* counts, int64_t* offsets,
                            int64_t* perm, cudaStream_t stream);

// ---------------------------------------------------------------- combine
// out[b, i] = sum_j gates[b, j] * expert_out[pos(b*k + j), i], j in order, fp32 accumulation.
cudaError_t launch_combine(const void* expert_out, const float* gates, const int64_t* perm, void* out, DType dtype,
                           int64_t B, int k, int64_t N, cudaStream_t stream);

// Floats of scratch launch_combine_backward needs.
int64_t combine_backward_scratch_floats(int64_t B, int k, int64_t N);

// grad_expert_out[r] = gates[s] * grad[s / k] (s = perm[r]); grad_gates[s] = <grad[s / k], expert_out[r]> (fp32).
cudaError_t launch_combine_backward(const void* grad, const void* expert_out, const float* gates, const int64_t* perm,
                                    void* grad_expert_out, float* grad_gates, float* scratch, DType dtype, int64_t B,
                                    int k, int64_t N, cudaStream_t stream);

}  // namespace routing
}  // namespace moce
