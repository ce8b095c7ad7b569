// 16-byte asynchronous global -> shared copies (cp.async, sm_80+) with zero fill, committed and waited
// for in groups, and their twins for the CPU emulation (MOCE_CUDA_EMULATION: a synchronous copy, which
// also fails on misaligned addresses).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#ifdef MOCE_CUDA_EMULATION
#include "emu/device.h"
#endif

namespace moce {
namespace async_copy {

// Copies 16 bytes from global src to shared dst (both 16-byte aligned), or writes 16 zero bytes when
// !valid (src is then not read, but must still be a valid global address).
__device__ __forceinline__ void copy16(void* dst, const void* src, bool valid) {
#ifdef MOCE_CUDA_EMULATION
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0)
    ::emu::fail("cp.async: a 16-byte copy needs 16-byte aligned addresses");
  if (!::emu::in_shared(dst, 16) || ::emu::in_shared(src, 1))
    ::emu::fail("cp.async: copies from global memory into shared memory");
  if (valid)
    std::memcpy(dst, src, 16);
  else
    std::memset(dst, 0, 16);
#else
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
#endif
}

// Closes the group of copies issued since the last commit.
__device__ __forceinline__ void commit() {
#ifndef MOCE_CUDA_EMULATION
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N committed groups of this thread are still in flight (follow with a barrier
// before other threads read the copies). The emulation copies synchronously: nothing is in flight.
template <int N>
__device__ __forceinline__ void wait_group() {
#ifndef MOCE_CUDA_EMULATION
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

}  // namespace async_copy
}  // namespace moce
