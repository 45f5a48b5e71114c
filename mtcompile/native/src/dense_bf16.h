// Dense layer on a bfloat16 weight packed at build time (matmul's "bf16" variant): out[r, n] =
// sum_k a[r, k] * w[k, n] (+ bias[n]) with w rounded to bfloat16 and given as panels
// wp[n / 16][k / 2][n % 16] of 32-bit pairs (w[2j, n] in the low half, w[2j + 1, n] in the
// high; a zero pads an odd K), the activation rows rounded to bfloat16 per call, and float32
// sums. On AVX-512 BF16 hosts one VDPBF16PS does two k steps of 16 columns, twice the float32
// FMA rate; elsewhere the same rounded values go through the float32 tiles of dense_avx2.h.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "dense_avx2.h"

namespace mtc {

// float -> bfloat16 bits, rounded to nearest even (a NaN stays a quiet NaN)
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float from_bf16(uint32_t h) {
  const uint32_t u = h << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// rows x K floats -> rows x ceil(K / 2) pairs of bfloat16 (k even low, odd high; zero past K)
__attribute__((target("avx512f,avx512bf16"))) inline void bf16_pairs(const float* a, int64_t rows,
                                                                      int64_t K, uint32_t* out) {
  const int64_t K2 = (K + 1) / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = a + r * K;
    uint32_t* o = out + r * K2;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32)  // 32 floats -> 16 pairs, in order
      _mm512_storeu_si512(o + k / 2, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + k + 16),
                                                                  _mm512_loadu_ps(x + k)));
    for (; k < K; k += 2)
      o[k / 2] = to_bf16(x[k]) | (k + 1 < K ? uint32_t{to_bf16(x[k + 1])} << 16 : 0u);
  }
}

// rows [0, MR) x 16 columns of one panel, as dense_tile512 with k in pairs: a (MR rows of
// K2 pairs, stride lda pairs), wp (K2 x 16 pairs)
template <int MR>
__attribute__((target("avx512f,avx512bf16,avx2,fma"), always_inline)) inline void
dense_tile_bf16(int64_t K2, const uint32_t* a, int64_t lda, const uint32_t* wp,
                const float* bias, float* out, int64_t ldc, int ncols, const float* res, Act act) {
  constexpr int KU = kSplitK<MR>;
  __m512 c[KU][MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int u = 0; u < KU; ++u) c[u][i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + KU <= K2; k += KU)
#pragma GCC unroll 4
    for (int u = 0; u < KU; ++u, wp += kDenseNR) {
      const __m512bh b = (__m512bh)_mm512_loadu_si512(wp);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i)
        c[u][i] = _mm512_dpbf16_ps(
            c[u][i], (__m512bh)_mm512_set1_epi32(static_cast<int>(a[i * lda + k + u])), b);
    }
  for (; k < K2; ++k, wp += kDenseNR) {
    const __m512bh b = (__m512bh)_mm512_loadu_si512(wp);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
      c[0][i] = _mm512_dpbf16_ps(c[0][i],
                                 (__m512bh)_mm512_set1_epi32(static_cast<int>(a[i * lda + k])), b);
  }
  store_tile512<MR, KU>(c, bias, out, ldc, ncols, res, act);
}

using DenseBf16TileFn = void (*)(int64_t, const uint32_t*, int64_t, const uint32_t*,
                                 const float*, float*, int64_t, int, const float*, Act);
template <int MR>
__attribute__((target("avx512f,avx512bf16,avx2,fma"))) void dense_tile_bf16_call(
    int64_t K2, const uint32_t* a, int64_t lda, const uint32_t* wp, const float* bias,
    float* out, int64_t ldc, int ncols, const float* res, Act act) {
  dense_tile_bf16<MR>(K2, a, lda, wp, bias, out, ldc, ncols, res, act);
}
template <int... MR>
constexpr std::array<DenseBf16TileFn, sizeof...(MR)> dense_tiles_bf16(
    std::integer_sequence<int, MR...>) {
  return {(MR == 0 ? nullptr : dense_tile_bf16_call<MR == 0 ? 1 : MR>)...};
}
constexpr auto kDenseTilesBf16 =
    dense_tiles_bf16(std::make_integer_sequence<int, kDenseMR512 + 1>());

// panels [p0, p1) for all `rows` rows of a (rows x K2 pairs) into out (rows x N), wp at
// panel p0, as dense_panels; res (null for none) and act: the epilogue
inline void dense_panels_bf16(int64_t rows, int64_t K2, int64_t N, const uint32_t* a,
                              const uint32_t* wp, const float* bias, float* out, int64_t p0,
                              int64_t p1, const float* res, Act act) {
  dense_panels_of<uint32_t>(rows, kDenseMR512, K2, N, a, wp, bias, out, p0, p1, res, act,
                            kDenseTilesBf16.data());
}

}  // namespace mtc
