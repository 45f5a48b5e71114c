// Dense layer on a weight packed at build time: out[r, n] = sum_k a[r, k] * w[k, n] (+ bias[n])
// with w given as panels wp[n / 16][k][n % 16] (columns zero-padded to a multiple of 16). The
// packing is what a BLAS redoes on every call (for a 64-row activation it costs about a third
// of the multiply); done once on the constant, each 6x16 register tile streams one contiguous
// panel and broadcasts the activation rows straight from a. Built with target attributes;
// the caller dispatches on the CPU's features.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

#include "epilogue.h"

namespace mtc {

constexpr int kDenseMR = 6, kDenseMR512 = 14, kDenseNR = 16;

// bias[n0 .. n0 + ncols) as two 8-column halves (zeros past ncols; none: zeros)
__attribute__((target("avx2,fma"), always_inline)) inline void bias_halves(
    const float* bias, int ncols, __m256* bv0, __m256* bv1) {
  alignas(32) float tmp[kDenseNR] = {};
  if (bias != nullptr && ncols == kDenseNR) {
    *bv0 = _mm256_loadu_ps(bias);
    *bv1 = _mm256_loadu_ps(bias + 8);
    return;
  }
  if (bias != nullptr) std::memcpy(tmp, bias, ncols * sizeof(float));
  *bv0 = _mm256_load_ps(tmp);
  *bv1 = _mm256_load_ps(tmp + 8);
}

// One output row of a tile, 16 columns in two halves: + bias, then the epilogue (res laid out
// as out, null for none); ncols < 16 writes the valid columns only.
__attribute__((target("avx2,fma"), always_inline)) inline void store_row(
    __m256 r0, __m256 r1, __m256 bv0, __m256 bv1, float* o, const float* r, int ncols, Act act) {
  r0 = _mm256_add_ps(r0, bv0);
  r1 = _mm256_add_ps(r1, bv1);
  if (r != nullptr || act != kActNone) {
    r0 = finish8(r0, r, std::min(ncols, 8), act);
    r1 = finish8(r1, r ? r + 8 : nullptr, std::max(ncols - 8, 0), act);
  }
  if (ncols == kDenseNR) {
    _mm256_storeu_ps(o, r0);
    _mm256_storeu_ps(o + 8, r1);
    return;
  }
  alignas(32) float tmp[kDenseNR];
  _mm256_store_ps(tmp, r0);
  _mm256_store_ps(tmp + 8, r1);
  std::memcpy(o, tmp, ncols * sizeof(float));
}

// independent sums per accumulator over k (k mod KU) for a short tile: one row's FMAs form a
// single dependent chain otherwise (4 cycles each: a batch-1 dense layer ran at a quarter of
// the FMA rate)
template <int MR>
constexpr int kSplitK = MR >= 4 ? 1 : MR >= 2 ? 2 : 4;

// rows [0, MR) x 16 columns of one panel: a (MR rows, stride lda), wp (K x 16); res (null for
// none), act: the epilogue, res laid out as out at the tile's first output
template <int MR>
__attribute__((target("avx2,fma"), always_inline)) inline void dense_tile(
    int64_t K, const float* a, int64_t lda, const float* wp, const float* bias, float* out,
    int64_t ldc, int ncols, const float* res, Act act) {
  constexpr int KU = kSplitK<MR>;
  __m256 c0[KU][MR], c1[KU][MR];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int u = 0; u < KU; ++u) c0[u][i] = c1[u][i] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + KU <= K; k += KU)
#pragma GCC unroll 4
    for (int u = 0; u < KU; ++u, wp += kDenseNR) {
      const __m256 b0 = _mm256_loadu_ps(wp), b1 = _mm256_loadu_ps(wp + 8);
#pragma GCC unroll 6
      for (int i = 0; i < MR; ++i) {
        const __m256 av = _mm256_broadcast_ss(a + i * lda + k + u);
        c0[u][i] = _mm256_fmadd_ps(av, b0, c0[u][i]);
        c1[u][i] = _mm256_fmadd_ps(av, b1, c1[u][i]);
      }
    }
  for (; k < K; ++k, wp += kDenseNR) {
    const __m256 b0 = _mm256_loadu_ps(wp), b1 = _mm256_loadu_ps(wp + 8);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_broadcast_ss(a + i * lda + k);
      c0[0][i] = _mm256_fmadd_ps(av, b0, c0[0][i]);
      c1[0][i] = _mm256_fmadd_ps(av, b1, c1[0][i]);
    }
  }
#pragma GCC unroll 4
  for (int u = 1; u < KU; ++u)
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      c0[0][i] = _mm256_add_ps(c0[0][i], c0[u][i]);
      c1[0][i] = _mm256_add_ps(c1[0][i], c1[u][i]);
    }
  __m256 bv0, bv1;
  bias_halves(bias, ncols, &bv0, &bv1);
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i)
    store_row(c0[0][i], c1[0][i], bv0, bv1, out + i * ldc, res ? res + i * ldc : nullptr, ncols,
              act);
}

// An AVX-512 tile's MR rows of one zmm, each the sum of its KU partial sums: + bias, then
// the epilogue, stored (ncols < 16: the valid columns only)
template <int MR, int KU>
__attribute__((target("avx512f,avx2,fma"), always_inline)) inline void store_tile512(
    __m512 (&c)[KU][MR], const float* bias, float* out, int64_t ldc, int ncols, const float* res,
    Act act) {
#pragma GCC unroll 4
  for (int u = 1; u < KU; ++u)
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) c[0][i] = _mm512_add_ps(c[0][i], c[u][i]);
  __m256 bv0, bv1;
  bias_halves(bias, ncols, &bv0, &bv1);
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
    store_row(_mm512_castps512_ps256(c[0][i]),
              _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(c[0][i]), 1)), bv0, bv1,
              out + i * ldc, res ? res + i * ldc : nullptr, ncols, act);
}

// The AVX-512 tile: as `dense_tile`, MR rows (up to kDenseMR512) x one zmm of 16 columns, the
// activation broadcast inside the FMA (one load and MR FMAs per k: the AVX2 tile's loads and
// broadcasts held it to ~70% of the FMA rate).
template <int MR>
__attribute__((target("avx512f,avx2,fma"), always_inline)) inline void dense_tile512(
    int64_t K, const float* a, int64_t lda, const float* wp, const float* bias, float* out,
    int64_t ldc, int ncols, const float* res, Act act) {
  constexpr int KU = kSplitK<MR>;
  __m512 c[KU][MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int u = 0; u < KU; ++u) c[u][i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + KU <= K; k += KU)
#pragma GCC unroll 4
    for (int u = 0; u < KU; ++u, wp += kDenseNR) {
      const __m512 b = _mm512_loadu_ps(wp);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i)
        c[u][i] = _mm512_fmadd_ps(_mm512_set1_ps(a[i * lda + k + u]), b, c[u][i]);
    }
  for (; k < K; ++k, wp += kDenseNR) {
    const __m512 b = _mm512_loadu_ps(wp);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) c[0][i] = _mm512_fmadd_ps(_mm512_set1_ps(a[i * lda + k]), b, c[0][i]);
  }
  store_tile512<MR, KU>(c, bias, out, ldc, ncols, res, act);
}

using DenseTileFn = void (*)(int64_t, const float*, int64_t, const float*, const float*, float*,
                             int64_t, int, const float*, Act);
template <int MR>
__attribute__((target("avx2,fma"))) void dense_tile_call(int64_t K, const float* a, int64_t lda,
                                                         const float* wp, const float* bias,
                                                         float* out, int64_t ldc, int ncols,
                                                         const float* res, Act act) {
  dense_tile<MR>(K, a, lda, wp, bias, out, ldc, ncols, res, act);
}
template <int MR>
__attribute__((target("avx512f,avx2,fma"))) void dense_tile512_call(
    int64_t K, const float* a, int64_t lda, const float* wp, const float* bias, float* out,
    int64_t ldc, int ncols, const float* res, Act act) {
  dense_tile512<MR>(K, a, lda, wp, bias, out, ldc, ncols, res, act);
}
template <int... MR>
constexpr std::array<DenseTileFn, sizeof...(MR)> dense_tiles(std::integer_sequence<int, MR...>) {
  return {(MR == 0 ? nullptr : dense_tile_call<MR == 0 ? 1 : MR>)...};
}
template <int... MR>
constexpr std::array<DenseTileFn, sizeof...(MR)> dense_tiles512(
    std::integer_sequence<int, MR...>) {
  return {(MR == 0 ? nullptr : dense_tile512_call<MR == 0 ? 1 : MR>)...};
}
// per row count 1..max: the tile of each ISA
constexpr auto kDenseTiles = dense_tiles(std::make_integer_sequence<int, kDenseMR + 1>());
constexpr auto kDenseTiles512 =
    dense_tiles512(std::make_integer_sequence<int, kDenseMR512 + 1>());

// panels [p0, p1) for all `rows` rows of a (rows x depth elements: floats, or the bf16
// kernels' pairs) into out (rows x N), wp at panel p0, in tiles of at most `most` rows of
// near-equal height (37 rows: 13, 12, 12, not 14, 14, 9: a short tile has too few
// accumulators to hide the FMA latency); tiles[mr] computes mr rows; res (null for none) and
// act: the epilogue, res laid out as out
template <typename W>
inline void dense_panels_of(
    int64_t rows, int64_t most, int64_t depth, int64_t N, const W* a, const W* wp,
    const float* bias, float* out, int64_t p0, int64_t p1, const float* res, Act act,
    void (*const* tiles)(int64_t, const W*, int64_t, const W*, const float*, float*, int64_t, int,
                         const float*, Act)) {
  const int64_t ntiles = (rows + most - 1) / most, base = rows / ntiles, extra = rows % ntiles;
  for (int64_t p = p0; p < p1; ++p) {
    const W* panel = wp + (p - p0) * depth * kDenseNR;
    const int64_t n0 = p * kDenseNR;
    const int nc = static_cast<int>(std::min<int64_t>(kDenseNR, N - n0));
    const float* b = bias != nullptr ? bias + n0 : nullptr;
    for (int64_t i = 0, r = 0; i < ntiles; ++i) {
      const int64_t mr = base + (i < extra ? 1 : 0);
      tiles[mr](depth, a + r * depth, depth, panel, b, out + r * N + n0, N, nc,
                res != nullptr ? res + r * N + n0 : nullptr, act);
      r += mr;
    }
  }
}

// the float32 panels: tiles of up to kDenseMR512 rows on AVX-512, else kDenseMR
inline void dense_panels(bool avx512, int64_t rows, int64_t K, int64_t N, const float* a,
                         const float* wp, const float* bias, float* out, int64_t p0, int64_t p1,
                         const float* res = nullptr, Act act = kActNone) {
  dense_panels_of<float>(rows, avx512 ? kDenseMR512 : kDenseMR, K, N, a, wp, bias, out, p0, p1,
                         res, act, avx512 ? kDenseTiles512.data() : kDenseTiles.data());
}

}  // namespace mtc
