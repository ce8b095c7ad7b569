// Probes of the CUDA emulation itself (tests/test_cuda_emulation.py): it must compute what a GPU
// computes for correct kernels, and it must expose the usual kernel bugs (a missing barrier, a
// barrier in divergent code, a dependency between blocks, launch configurations over the limits)
// instead of hiding them. Built by the test for the emulation only; plain CUDA otherwise.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstring>
#include <exception>

namespace {

constexpr int kThreads = 256;

// Block sum of x[0..n) into *out: warp shuffles, then one partial per warp through shared memory.
// With `racy`, the barrier between writing and reading the partials is left out.
__global__ void block_sum(const float* x, int n, float* out, bool racy) {
  __shared__ float part[kThreads / 32];
  float acc = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) acc += x[i];
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = acc;
  if (!racy) __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) s += part[w];
    *out = s;
  }
}

__global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1.f;
}

// Block b adds b + 1 to *acc, then writes what it saw: only block order makes `seen` predictable.
__global__ void order_dependent(int* acc, int* seen) {
  if (threadIdx.x == 0) {
    seen[blockIdx.x] = *acc;
    *acc += blockIdx.x + 1;
  }
}

__global__ void noop() {}

__global__ void big_smem(float* out) {
  extern __shared__ float dyn[];
  dyn[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = dyn[(threadIdx.x + 1) % blockDim.x];
}

// Per lane: shfl_xor(lane, 5), shfl_down(lane, 3), shfl_up(lane, 2), shfl(lane, 7), ballot(odd lanes),
// match_any(lane / 8), popc.
__global__ void warp_ops(int* out) {
  const int lane = threadIdx.x % 32;
  int* o = out + threadIdx.x * 7;
  o[0] = __shfl_xor_sync(0xffffffffu, lane, 5);
  o[1] = __shfl_down_sync(0xffffffffu, lane, 3);
  o[2] = __shfl_up_sync(0xffffffffu, lane, 2);
  o[3] = __shfl_sync(0xffffffffu, lane, 7);
  o[4] = static_cast<int>(__ballot_sync(0xffffffffu, lane & 1));
  o[5] = static_cast<int>(__match_any_sync(0xffffffffu, lane / 8));
  o[6] = __popc(static_cast<unsigned>(o[4]));
}

// C (16 x 16, fp32) = A (16 x 16, row-major fp16) x B (16 x 16, row-major fp16) with one warp.
__global__ void wmma_16x16(const __half* a, const __half* b, float* c) {
  using namespace nvcuda;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 0.f);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
}

char g_message[512];

template <typename F>
int guarded(F&& f) {
  g_message[0] = 0;
  try {
    f();
  } catch (const std::exception& e) {
    std::strncpy(g_message, e.what(), sizeof(g_message) - 1);
    return -1;
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" {

const char* probe_message() { return g_message; }

int probe_block_sum(const float* x, int n, float* out, int racy) {
  return guarded([&] { block_sum<<<1, kThreads>>>(x, n, out, racy != 0); });
}

int probe_divergent_barrier(float* out) {
  return guarded([&] { divergent_barrier<<<1, 64>>>(out); });
}

int probe_order_dependent(int blocks, int* acc, int* seen) {
  return guarded([&] { order_dependent<<<blocks, 32>>>(acc, seen); });
}

int probe_launch(int grid_y, int block_x) {
  return guarded([&] { noop<<<dim3(1, grid_y), block_x>>>(); });
}

int probe_big_smem(int threads, int opt_in, float* out) {
  return guarded([&] {
    const int bytes = threads * static_cast<int>(sizeof(float)) + 64 * 1024;
    if (opt_in) cudaFuncSetAttribute(big_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    big_smem<<<1, threads, bytes>>>(out);
  });
}

int probe_warp_ops(int threads, int* out) {
  return guarded([&] { warp_ops<<<1, threads>>>(out); });
}

int probe_wmma(const __half* a, const __half* b, float* c) {
  return guarded([&] { wmma_16x16<<<1, 32>>>(a, b, c); });
}

}  // extern "C"
