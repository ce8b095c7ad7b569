// CPU emulation of the warp matrix functions (nvcuda::wmma) for the CUDA emulation (emu/device.h).
// A fragment holds the whole tile in every lane (the real layout is unspecified, so element-wise
// code over frag.x[0..num_elements) means the same thing); every call is a warp collective that
// first synchronises the warp's live lanes, as the .sync instructions do. Products accumulate in
// float in k order (the hardware's order and rounding inside one MMA differ within float rounding).
#pragma once

#include <type_traits>

#include "emu/device.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  using storage_element_type = std::conditional_t<std::is_same<T, precision::tf32>::value, float, T>;
  using element_type = storage_element_type;
  static constexpr int num_elements = rows * cols;
  storage_element_type x[num_elements];
};

namespace detail {
inline void collective() { ::emu::warp_sync(0xffffffffu); }

template <typename E, typename S>
inline E convert(S v) {
  if constexpr (std::is_same<E, S>::value) {
    return v;
  } else if constexpr (std::is_same<E, float>::value) {
    return static_cast<float>(v);
  } else {
    return E(static_cast<float>(v));
  }
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename L, typename S>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const S& v) {
  detail::collective();
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = detail::convert<typename fragment<Use, M, N, K, T, L>::element_type>(v);
}

template <typename Use, int M, int N, int K, typename T, typename L, typename P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  static_assert(!std::is_same<L, void>::value, "matrix_a / matrix_b fragments need a layout");
  detail::collective();
  using F = fragment<Use, M, N, K, T, L>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) {
      const P v = std::is_same<L, row_major>::value ? p[r * ldm + c] : p[c * ldm + r];
      f.x[r * F::cols + c] = detail::convert<typename F::element_type>(v);
    }
}

template <int M, int N, int K, typename T, typename P>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T, void>& f, const P* p, unsigned ldm, layout_t layout) {
  detail::collective();
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.x[r * N + c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}

template <int M, int N, int K, typename T, typename P>
inline void store_matrix_sync(P* p, const fragment<accumulator, M, N, K, T, void>& f, unsigned ldm, layout_t layout) {
  detail::collective();
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) {
      P& dst = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
      dst = detail::convert<P>(f.x[r * N + c]);
    }
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC>
inline void mma_sync(fragment<accumulator, M, N, K, TC, void>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC, void>& c) {
  detail::collective();
  float out[M * N];
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float acc = static_cast<float>(c.x[m * N + n]);
      for (int k = 0; k < K; ++k) acc += static_cast<float>(a.x[m * K + k]) * static_cast<float>(b.x[k * N + n]);
      out[m * N + n] = acc;
    }
  for (int i = 0; i < M * N; ++i) d.x[i] = detail::convert<TC>(out[i]);
}

}  // namespace wmma
}  // namespace nvcuda
