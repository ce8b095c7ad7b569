// Window FFT attention kernels (torch-free): out = LN_C(crop(circconv_p(q, k))) * v, forward and
// backward, on batch rows rows[0] <= n < rows[1] (rows: device int64[2]; nullptr = all rows).
//
// Layout: q, k, v, out, grad tensors (N, C, H, W) contiguous, one dtype (float, half, bfloat16);
// norm weight/bias are float32 (C,) (the torch wrapper converts). p in {4, 8, 16, 32}.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "common/dtype.h"

namespace moce {
namespace wfa {

struct Shape {
  int64_t N, C, H, W;
  int p;       // window size
  float eps;   // LayerNorm epsilon
};

// What forward and backward both read.
struct Inputs {
  Shape s;
  DType dtype;
  const void* q;
  const void* k;
  const void* v;
  const float* weight;  // (C,)
  const float* bias;    // (C,)
  const int64_t* rows;  // device [begin, end) or nullptr for all rows
};

struct FwdArgs : Inputs {
  void* out;
};

struct BwdArgs : Inputs {
  const void* grad;
  void* grad_q;
  void* grad_k;
  void* grad_v;
  float* workspace;     // backward_workspace_floats(s) floats, scratch
  float* grad_weight;   // (C,) float32, sum over the rows in range (overwritten)
  float* grad_bias;     // (C,) float32
};

// Number of float32 elements of backward scratch (per-tile weight/bias partials).
int64_t backward_workspace_floats(const Shape& s);
// Validates the shape (window size, grid limits); returns nullptr or a static error message.
const char* check_shape(const Shape& s);

// Launch on `stream`; return the launch error (cudaSuccess when fine). No host synchronisation.
cudaError_t forward(const FwdArgs& a, cudaStream_t stream);
cudaError_t backward(const BwdArgs& a, cudaStream_t stream);

}  // namespace wfa
}  // namespace moce
