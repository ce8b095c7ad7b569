// CPU emulation of the CUDA execution model, for testing the project's CUDA C++ kernels on machines
// without a GPU (CI). Not a simulator of performance: a faithful-enough model of the semantics the
// kernels rely on, strict where real GPUs are strict.
//
// * Every thread of a block is a fiber (ucontext) on the calling OS thread; a block's fibers run
//   one at a time, each until it reaches a barrier or exits, in a random order (seeded) that is
//   drawn again after every barrier: a missing __syncthreads shows up as a wrong result.
// * Blocks of a grid run one after another, in random order: a kernel that depends on the order of
//   its blocks fails. Shared memory, static and dynamic, is per block and filled with NaN bytes at
//   every block start: a read of shared memory no thread of the block wrote shows up.
// * Warp collectives (__shfl_*_sync, __ballot_sync, __match_any_sync, wmma) synchronise the lanes
//   named in their mask, as the .sync instructions do.
// * A barrier that can never complete (threads waiting at different barriers, a __syncthreads that
//   some threads of the block skip or reach after exiting) raises an error instead of hanging or
//   passing by luck. Launch configurations beyond
//   the hardware limits (block > 1024 threads, grid y/z > 65535, dynamic shared memory > 48 KiB
//   without cudaFuncSetAttribute) fail like the real launch: cudaGetLastError reports them.
//
// Use: the kernel sources are compiled as C++ with this header included first and their
// `kernel<<<grid, block, smem, stream>>>(args)` launches rewritten to
// `::emu::Launch(grid, block, smem, stream)(kernel, args)` (moce_kernels/emulation.py does that,
// turns `extern __shared__ T x[];` into `T* x = ::emu::dynamic_smem<T>();` and every static
// `__shared__ T x;` into `auto& x = ::emu::shared_var<T>(key);`).
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace emu {

constexpr int kWarp = 32;

struct Barrier {
  int arrived = 0;
  int expected = 0;
  uint64_t gen = 0;
};

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  int linear = 0;
  bool done = false;
  Barrier* waiting = nullptr;  // barrier this fiber waits at (nullptr: runnable)
  uint64_t wait_gen = 0;
};

struct BlockState {
  dim3 grid, block;
  uint3 bid;
  std::vector<Fiber>* fibers = nullptr;
  Fiber* cur = nullptr;
  ucontext_t sched;
  Barrier bar;                       // __syncthreads
  std::vector<Barrier> warp_bar;     // warp collectives
  std::vector<unsigned> warp_live;   // mask of lanes not yet exited, per warp
  std::vector<uint64_t> xch;         // warp exchange slots, 32 per warp
  unsigned char* dyn_smem = nullptr;
  size_t dyn_smem_size = 0;
  // static __shared__ variables of the running block: key (one per declaration and instantiation) -> storage
  std::vector<std::pair<const void*, std::unique_ptr<unsigned char, void (*)(void*)>>> shared_vars;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
  std::mt19937_64* rng = nullptr;
};

// Current block and launch status (one launch at a time per OS thread).
inline thread_local BlockState* g_block = nullptr;
inline thread_local cudaError_t g_last_error = cudaSuccess;
inline thread_local std::string g_last_message;

[[noreturn]] inline void fail(const std::string& what) { throw std::runtime_error("CUDA emulation: " + what); }

inline BlockState& blk() {
  if (g_block == nullptr) fail("device code called outside a kernel launch");
  return *g_block;
}
inline Fiber& me() { return *blk().cur; }

inline void yield_to_scheduler() {
  BlockState& b = blk();
  swapcontext(&b.cur->ctx, &b.sched);
}

// Arrive at `bar` expecting `expected` participants and wait until all have arrived. `strict`
// (warp collectives): every participant must name the same set of lanes. The last arriver releases
// the others and yields too, so that the order in which the threads continue is the scheduler's
// (random), not the arrival order.
inline void arrive_and_wait(Barrier& bar, int expected, bool strict) {
  Fiber& f = me();
  if (bar.arrived > 0 && strict && bar.expected != expected)
    fail("lanes of one warp reached a collective with different masks");
  bar.expected = expected;
  ++bar.arrived;
  f.waiting = &bar;
  f.wait_gen = bar.gen;
  if (bar.arrived >= bar.expected) {
    bar.arrived = 0;
    ++bar.gen;
  }
  yield_to_scheduler();
}

inline int live_threads() {
  int n = 0;
  for (unsigned m : blk().warp_live) n += __builtin_popcount(m);
  return n;
}

// __syncthreads must be reached by every thread of the block (CUDA C++ Programming Guide: allowed in
// conditional code only if the condition is the same for the whole block); one that exited early
// never arrives, so that is an error here rather than the hang or undefined behaviour it is on a GPU.
inline void syncthreads() {
  BlockState& b = blk();
  const int live = live_threads();
  if (live < static_cast<int>(b.fibers->size()))
    fail("__syncthreads reached after " + std::to_string(b.fibers->size() - live) +
         " thread(s) of the block exited: every thread must reach it");
  arrive_and_wait(b.bar, live, false);
}

inline int lane() { return me().linear % kWarp; }
inline int warp_id() { return me().linear / kWarp; }

// Warp barrier over the live lanes of `mask`; this lane must be one of them.
inline void warp_sync(unsigned mask) {
  BlockState& b = blk();
  const int w = warp_id();
  const unsigned parts = mask & b.warp_live[w];
  if (!(parts >> lane() & 1u)) fail("a lane called a warp collective with a mask that does not name it");
  arrive_and_wait(b.warp_bar[w], __builtin_popcount(parts), true);
}

// Publish this lane's 64-bit value, synchronise, run `read(slots)`, synchronise again (so the slots
// are not overwritten by the next collective before every lane has read them).
template <typename F>
inline auto warp_exchange(unsigned mask, uint64_t mine, F&& read) {
  BlockState& b = blk();
  uint64_t* slots = b.xch.data() + warp_id() * kWarp;
  slots[lane()] = mine;
  warp_sync(mask);
  auto r = read(slots, mask & b.warp_live[warp_id()]);
  warp_sync(mask);
  return r;
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "warp shuffles of at most 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

template <typename T>
inline T shfl_from(unsigned mask, T v, int src, int width) {
  const int l = lane();
  const int base = l - l % width;
  return from_bits<T>(warp_exchange(mask, to_bits(v), [&](const uint64_t* s, unsigned) {
    const int from = base + ((src % width) + width) % width;
    return s[from];
  }));
}

template <typename T>
inline T shfl_down(unsigned mask, T v, unsigned delta, int width) {
  const int l = lane();
  return from_bits<T>(warp_exchange(mask, to_bits(v), [&](const uint64_t* s, unsigned) {
    const int seg = l % width;
    return seg + static_cast<int>(delta) < width ? s[l + delta] : s[l];
  }));
}

template <typename T>
inline T shfl_up(unsigned mask, T v, unsigned delta, int width) {
  const int l = lane();
  return from_bits<T>(warp_exchange(mask, to_bits(v), [&](const uint64_t* s, unsigned) {
    const int seg = l % width;
    return seg >= static_cast<int>(delta) ? s[l - delta] : s[l];
  }));
}

template <typename T>
inline T shfl_xor(unsigned mask, T v, int lane_mask, int width) {
  const int l = lane();
  return from_bits<T>(warp_exchange(mask, to_bits(v), [&](const uint64_t* s, unsigned) {
    const int base = l - l % width;
    const int from = l ^ lane_mask;
    return from < base + width ? s[from] : s[l];
  }));
}

inline unsigned ballot(unsigned mask, int pred) {
  return warp_exchange(mask, pred != 0 ? 1u : 0u, [&](const uint64_t* s, unsigned parts) {
    unsigned r = 0;
    for (int i = 0; i < kWarp; ++i)
      if ((parts >> i & 1u) && s[i]) r |= 1u << i;
    return r;
  });
}

template <typename T>
inline unsigned match_any(unsigned mask, T v) {
  const int l = lane();
  return warp_exchange(mask, to_bits(v), [&](const uint64_t* s, unsigned parts) {
    unsigned r = 0;
    for (int i = 0; i < kWarp; ++i)
      if ((parts >> i & 1u) && s[i] == s[l]) r |= 1u << i;
    return r;
  });
}

template <typename T>
inline T* dynamic_smem() {
  return reinterpret_cast<T*>(blk().dyn_smem);
}

// Whether [p, p + n) lies in the running block's dynamic shared memory: what the shared-memory
// instructions the kernels issue by address (ldmatrix, cp.async destinations) need.
inline bool in_shared(const void* p, size_t n) {
  const BlockState& b = blk();
  const auto* c = static_cast<const unsigned char*>(p);
  return b.dyn_smem != nullptr && c >= b.dyn_smem && c + n <= b.dyn_smem + b.dyn_smem_size;
}

// The block's instance of a static __shared__ variable (declared `__shared__ T name;` in the source;
// the translation turns it into `auto& name = shared_var<T>(key)`): allocated at the first call in a
// block, filled with 0xff bytes (NaN floats, -1 integers), shared by the block's threads.
template <typename T>
inline T& shared_var(const void* key) {
  BlockState& b = blk();
  for (auto& [k, mem] : b.shared_vars)
    if (k == key) return *reinterpret_cast<T*>(mem.get());
  const size_t bytes = (sizeof(T) + 127) / 128 * 128;
  unsigned char* mem = static_cast<unsigned char*>(std::aligned_alloc(128, bytes));
  std::memset(mem, 0xff, bytes);
  b.shared_vars.emplace_back(key, std::unique_ptr<unsigned char, void (*)(void*)>(mem, std::free));
  return *reinterpret_cast<T*>(mem);
}

// ---------------------------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------------------------

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kDefaultDynSmem = 48 * 1024;
constexpr size_t kMaxDynSmem = 227 * 1024;

inline std::mt19937_64& rng() {
  static thread_local std::mt19937_64 gen([] {
    const char* s = std::getenv("MOCE_EMU_SEED");
    return s != nullptr ? std::strtoull(s, nullptr, 10) : std::random_device{}();
  }());
  return gen;
}

// Opt-in dynamic shared memory limits per kernel (cudaFuncSetAttribute).
inline std::vector<std::pair<const void*, size_t>>& smem_optin() {
  static thread_local std::vector<std::pair<const void*, size_t>> v;
  return v;
}

inline size_t dyn_smem_limit(const void* fn) {
  for (auto& [f, n] : smem_optin())
    if (f == fn) return n;
  return kDefaultDynSmem;
}

inline void fiber_main() {
  BlockState& b = blk();
  Fiber& f = *b.cur;
  try {
    (*b.body)();
  } catch (...) {
    if (!b.error) b.error = std::current_exception();
  }
  f.done = true;
  b.warp_live[f.linear / kWarp] &= ~(1u << (f.linear % kWarp));
  if (b.bar.arrived > 0 && !b.error) {
    try {
      fail("a thread exited while others wait at __syncthreads: every thread must reach it");
    } catch (...) {
      b.error = std::current_exception();
    }
  }
  swapcontext(&f.ctx, &b.sched);
}

inline std::vector<char*>& stack_pool() {
  static thread_local std::vector<char*> pool;
  return pool;
}

inline void run_block(BlockState& b, std::vector<Fiber>& fibers) {
  const int n = static_cast<int>(fibers.size());
  auto& pool = stack_pool();
  while (static_cast<int>(pool.size()) < n) pool.push_back(static_cast<char*>(std::malloc(kStackBytes)));
  const int nw = (n + kWarp - 1) / kWarp;
  b.bar = Barrier{};
  b.warp_bar.assign(nw, Barrier{});
  b.warp_live.assign(nw, 0u);
  b.xch.assign(static_cast<size_t>(nw) * kWarp, 0);
  for (int i = 0; i < n; ++i) b.warp_live[i / kWarp] |= 1u << (i % kWarp);
  for (int i = 0; i < n; ++i) {
    Fiber& f = fibers[i];
    f.linear = i;
    f.tid = make_uint3(i % b.block.x, (i / b.block.x) % b.block.y, i / (b.block.x * b.block.y));
    f.done = false;
    f.waiting = nullptr;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = pool[i];
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
  }
  std::vector<int> order;
  int remaining = n;
  while (remaining > 0 && !b.error) {
    order.clear();
    for (int i = 0; i < n; ++i) {
      Fiber& f = fibers[i];
      if (f.done) continue;
      if (f.waiting != nullptr && f.waiting->gen > f.wait_gen) f.waiting = nullptr;
      if (f.waiting == nullptr) order.push_back(i);
    }
    if (order.empty()) {
      fail("deadlock in block (" + std::to_string(b.bid.x) + "," + std::to_string(b.bid.y) + "," +
           std::to_string(b.bid.z) + "): threads wait at a barrier the others never reach "
           "(__syncthreads or a warp collective in divergent code?)");
    }
    std::shuffle(order.begin(), order.end(), *b.rng);
    for (int i : order) {
      Fiber& f = fibers[i];
      if (f.done || f.waiting != nullptr || b.error) continue;
      b.cur = &f;
      swapcontext(&b.sched, &f.ctx);
      if (f.done) --remaining;
    }
  }
  b.cur = nullptr;
  if (b.error) std::rethrow_exception(b.error);
}

inline bool set_launch_error(cudaError_t e, const std::string& msg) {
  g_last_error = e;
  g_last_message = msg;
  return false;
}

inline bool check_config(const dim3& grid, const dim3& block, size_t smem, const void* fn) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
    return set_launch_error(cudaErrorInvalidConfiguration, "block of " + std::to_string(threads) + " threads");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
    return set_launch_error(cudaErrorInvalidConfiguration, "grid beyond the hardware limits");
  if (smem > dyn_smem_limit(fn))
    return set_launch_error(cudaErrorInvalidValue, "dynamic shared memory " + std::to_string(smem) +
                                                       " B over the kernel's limit (cudaFuncSetAttribute?)");
  return true;
}

// `Launch(grid, block, smem, stream)(kernel, args...)`: runs the kernel to completion on the calling
// thread. Arguments are converted to the kernel's parameter types once, as a real launch copies them.
struct Launch {
  dim3 grid, block;
  size_t smem;
  Launch(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(s) {}

  template <typename... P, typename... A>
  void operator()(void (*kernel)(P...), A&&... args) const {
    if (!check_config(grid, block, smem, reinterpret_cast<const void*>(kernel))) return;
    std::tuple<std::decay_t<P>...> params(static_cast<std::decay_t<P>>(std::forward<A>(args))...);
    const std::function<void()> body = [&] { std::apply(kernel, params); };
    const int n = static_cast<int>(block.x * block.y * block.z);
    std::vector<Fiber> fibers(n);
    std::vector<unsigned char> dyn(smem + 16);
    std::vector<uint64_t> blocks;
    blocks.reserve(size_t(grid.x) * grid.y * grid.z);
    for (uint64_t z = 0; z < grid.z; ++z)
      for (uint64_t y = 0; y < grid.y; ++y)
        for (uint64_t x = 0; x < grid.x; ++x) blocks.push_back((z << 48) | (y << 32) | x);
    std::shuffle(blocks.begin(), blocks.end(), rng());
    BlockState b;
    b.grid = grid;
    b.block = block;
    b.fibers = &fibers;
    b.body = &body;
    b.rng = &rng();
    BlockState* prev = g_block;
    g_block = &b;
    try {
      for (uint64_t id : blocks) {
        b.bid = make_uint3(static_cast<unsigned>(id & 0xffffffffu), static_cast<unsigned>((id >> 32) & 0xffffu),
                           static_cast<unsigned>(id >> 48));
        std::memset(dyn.data(), 0xff, dyn.size());  // NaN in every float: unwritten reads show up
        b.dyn_smem = dyn.data();
        b.dyn_smem_size = smem;
        b.shared_vars.clear();  // fresh (poisoned) static shared memory for every block
        run_block(b, fibers);
      }
    } catch (...) {
      g_block = prev;
      throw;
    }
    g_block = prev;
  }
};

template <typename T>
inline T atomic_add(T* addr, T v) {
  T old = *addr;
  *addr = old + v;
  return old;
}

}  // namespace emu

// ---------------------------------------------------------------------------------------------
// The CUDA device built-ins, in terms of the above
// ---------------------------------------------------------------------------------------------
#undef __launch_bounds__
#define __launch_bounds__(...)
#define threadIdx (::emu::me().tid)
#define blockIdx (::emu::blk().bid)
#define blockDim (::emu::blk().block)
#define gridDim (::emu::blk().grid)
#define warpSize 32

inline void __syncthreads() { ::emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::emu::warp_sync(mask); }
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) { return ::emu::shfl_from(mask, v, src, width); }
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) { return ::emu::shfl_down(mask, v, d, width); }
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) { return ::emu::shfl_up(mask, v, d, width); }
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32) { return ::emu::shfl_xor(mask, v, m, width); }
inline unsigned __ballot_sync(unsigned mask, int pred) { return ::emu::ballot(mask, pred); }
template <typename T>
inline unsigned __match_any_sync(unsigned mask, T v) { return ::emu::match_any(mask, v); }
inline unsigned __activemask() { return ::emu::blk().warp_live[::emu::warp_id()]; }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }

inline float atomicAdd(float* a, float v) { return ::emu::atomic_add(a, v); }
inline double atomicAdd(double* a, double v) { return ::emu::atomic_add(a, v); }
inline int atomicAdd(int* a, int v) { return ::emu::atomic_add(a, v); }
inline unsigned atomicAdd(unsigned* a, unsigned v) { return ::emu::atomic_add(a, v); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) { return ::emu::atomic_add(a, v); }

// The C++ overload of cuda_runtime.h (nvcc only) that takes the kernel itself.
template <typename T>
inline cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}

template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline void __stcg(T* p, T v) { *p = v; }

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline void sincospi(double x, double* s, double* c) {
  const double r = std::fmod(x, 2.0);  // exact; sin(pi r), cos(pi r) as in the device function
  *s = std::sin(M_PI * r);
  *c = std::cos(M_PI * r);
}
inline void sincospif(float x, float* s, float* c) {
  double sd, cd;
  sincospi(x, &sd, &cd);
  *s = static_cast<float>(sd);
  *c = static_cast<float>(cd);
}
// The device min / max overloads (any arithmetic pair, as CUDA's overload set accepts).
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> min(A a, B b) {
  using R = std::common_type_t<A, B>;
  return static_cast<R>(b) < static_cast<R>(a) ? static_cast<R>(b) : static_cast<R>(a);
}
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> max(A a, B b) {
  using R = std::common_type_t<A, B>;
  return static_cast<R>(a) < static_cast<R>(b) ? static_cast<R>(b) : static_cast<R>(a);
}
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
