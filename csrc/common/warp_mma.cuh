// Warp-level tensor-core primitives with the fragment layouts the PTX ISA documents (ldmatrix,
// mma.sync m16n8k16 with f32 accumulation), and their twins for the CPU emulation
// (MOCE_CUDA_EMULATION), which implement the same layouts lane by lane. Notation: lane l, g = l / 4,
// t = l % 4; a 32-bit register holds two 16-bit elements, the lower-indexed one in the low half.
//   A (16 x 16, row-major): a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 2t+8..), a[3] = (g+8, 2t+8..)
//   B (16 x 8, k x n):      b[0] = (k 2t..2t+1, n g), b[1] = (k 2t+8..2t+9, n g)
//   C, D (16 x 8, f32):     d[0..1] = (g, 2t..2t+1), d[2..3] = (g+8, 2t..2t+1)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#ifdef MOCE_CUDA_EMULATION
#include "emu/device.h"
#endif

namespace moce {
namespace warp_mma {

// The emulation fails on a misaligned vector or matrix access, which a GPU would fault on (or, for
// ldmatrix, silently misread); on the GPU this is a no-op.
__device__ __forceinline__ void check_aligned(const void* p, unsigned bytes, const char* what) {
#ifdef MOCE_CUDA_EMULATION
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0)
    ::emu::fail(std::string(what) + " is not " + std::to_string(bytes) + "-byte aligned");
#else
  (void)p, (void)bytes, (void)what;
#endif
}

// Two elements of T (bfloat16 or half) packed into a register, lo in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  T v[2];
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    v[0] = __float2bfloat16_rn(lo);
    v[1] = __float2bfloat16_rn(hi);
  } else {
    v[0] = __float2half_rn(lo);
    v[1] = __float2half_rn(hi);
  }
  uint32_t r;
  std::memcpy(&r, v, sizeof(r));
  return r;
}

// ldmatrix .x4 from shared memory: lane l gives the address of row l % 8 of 8 x 8 matrix l / 8 (16
// contiguous bytes, 16-byte aligned). Plain: r[j] = (row g, columns 2t, 2t+1) of matrix j. TRANS:
// r[j] = (rows 2t, 2t+1, column g) of matrix j, i.e. of its transpose.
template <bool TRANS>
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* row) {
#ifdef MOCE_CUDA_EMULATION
  const int l = ::emu::lane(), g = l / 4, t = l % 4;
  check_aligned(row, 16, "ldmatrix row address");
  if (!::emu::in_shared(row, 16)) ::emu::fail("ldmatrix: a row address outside shared memory");
  ::emu::warp_exchange(0xffffffffu, reinterpret_cast<uint64_t>(row), [&](const uint64_t* s, unsigned) {
    for (int j = 0; j < 4; ++j) {
      auto at = [&](int lane, int col) { return reinterpret_cast<const uint16_t*>(s[8 * j + lane])[col]; };
      const uint32_t lo = TRANS ? at(2 * t, g) : at(g, 2 * t);
      const uint32_t hi = TRANS ? at(2 * t + 1, g) : at(g, 2 * t + 1);
      r[j] = lo | hi << 16;
    }
    return 0;
  });
#else
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#endif
}

#ifdef MOCE_CUDA_EMULATION
namespace detail {
template <typename T>
inline float element(uint32_t reg, int hi) {
  const uint16_t bits = static_cast<uint16_t>(hi ? reg >> 16 : reg);
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    const uint32_t f = static_cast<uint32_t>(bits) << 16;
    float v;
    std::memcpy(&v, &f, sizeof(v));
    return v;
  } else {
    __half_raw raw;
    raw.x = bits;
    return __half2float(__half(raw));
  }
}
}  // namespace detail
#endif

// d += A B for a 16 x 16 A and a 16 x 8 B of T (bfloat16 or half), f32 accumulation.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value, "16-bit operands");
#ifdef MOCE_CUDA_EMULATION
  struct Frag {
    uint32_t a[4], b[2];
  } mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
  const int l = ::emu::lane(), g = l / 4, t = l % 4;
  float out[4];
  ::emu::warp_exchange(0xffffffffu, reinterpret_cast<uint64_t>(&mine), [&](const uint64_t* s, unsigned) {
    auto frag = [&](int lane) -> const Frag& { return *reinterpret_cast<const Frag*>(s[lane]); };
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + i % 2;
      float acc = d[i];
      for (int k = 0; k < 16; ++k) {
        const float av = detail::element<T>(frag((row % 8) * 4 + (k % 8) / 2).a[(row >= 8) + 2 * (k >= 8)], k % 2);
        const float bv = detail::element<T>(frag(col * 4 + (k % 8) / 2).b[k >= 8], k % 2);
        acc = std::fma(av, bv, acc);
      }
      out[i] = acc;
    }
    return 0;
  });
  for (int i = 0; i < 4; ++i) d[i] = out[i];
#else
  if constexpr (std::is_same<T, __nv_bfloat16>::value)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

}  // namespace warp_mma
}  // namespace moce
