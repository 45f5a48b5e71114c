// Dense layer on a weight packed at build time: out[r, n] = sum_k a[r, k] * w[k, n] (+ bias[n])
// with w given as panels wp[n / 16][k][n % 16] (columns zero-padded to a multiple of 16). The
// packing is what a BLAS redoes on every call (for a 64-row activation it costs about a third
// of the multiply); done once on the constant, each 6x16 register tile streams one contiguous
// panel and broadcasts the activation rows straight from a. Built with target attributes;
// the caller dispatches on the CPU's features.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "epilogue.h"

namespace mtc {

constexpr int kDenseMR = 6, kDenseNR = 16;

// rows [0, MR) x 16 columns of one panel: a (MR rows, stride lda), wp (K x 16); res (null for
// none), act: the epilogue, res laid out as out at the tile's first output
template <int MR>
__attribute__((target("avx2,fma"), always_inline)) inline void dense_tile(
    int64_t K, const float* a, int64_t lda, const float* wp, const float* bias, float* out,
    int64_t ldc, int ncols, const float* res, Act act) {
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k, wp += kDenseNR) {
    const __m256 b0 = _mm256_loadu_ps(wp), b1 = _mm256_loadu_ps(wp + 8);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_broadcast_ss(a + i * lda + k);
      c0[i] = _mm256_fmadd_ps(av, b0, c0[i]);
      c1[i] = _mm256_fmadd_ps(av, b1, c1[i]);
    }
  }
  __m256 bv0 = _mm256_setzero_ps(), bv1 = _mm256_setzero_ps();
  alignas(32) float tmp[kDenseNR];
  if (bias != nullptr) {
    if (ncols == kDenseNR) {
      bv0 = _mm256_loadu_ps(bias);
      bv1 = _mm256_loadu_ps(bias + 8);
    } else {
      std::memset(tmp, 0, sizeof(tmp));
      std::memcpy(tmp, bias, ncols * sizeof(float));
      bv0 = _mm256_load_ps(tmp);
      bv1 = _mm256_load_ps(tmp + 8);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    __m256 r0 = _mm256_add_ps(c0[i], bv0), r1 = _mm256_add_ps(c1[i], bv1);
    if (res != nullptr || act != kActNone) {
      const float* r = res != nullptr ? res + i * ldc : nullptr;
      r0 = finish8(r0, r, std::min(ncols, 8), act);
      r1 = finish8(r1, r ? r + 8 : nullptr, std::max(ncols - 8, 0), act);
    }
    float* o = out + i * ldc;
    if (ncols == kDenseNR) {
      _mm256_storeu_ps(o, r0);
      _mm256_storeu_ps(o + 8, r1);
    } else {
      _mm256_store_ps(tmp, r0);
      _mm256_store_ps(tmp + 8, r1);
      std::memcpy(o, tmp, ncols * sizeof(float));
    }
  }
}

// panels [p0, p1) for all `rows` rows of a (rows x K) into out (rows x N); res (null for none)
// and act: the epilogue, res laid out as out
__attribute__((target("avx2,fma"))) inline void dense_panels_avx2(
    int64_t rows, int64_t K, int64_t N, const float* a, const float* wp, const float* bias,
    float* out, int64_t p0, int64_t p1, const float* res = nullptr, Act act = kActNone) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* panel = wp + p * K * kDenseNR;
    const int64_t n0 = p * kDenseNR;
    const int nc = static_cast<int>(std::min<int64_t>(kDenseNR, N - n0));
    const float* b = bias != nullptr ? bias + n0 : nullptr;
    for (int64_t r = 0; r < rows; r += kDenseMR) {
      const float* ar = a + r * K;
      float* o = out + r * N + n0;
      const float* rr = res != nullptr ? res + r * N + n0 : nullptr;
      switch (std::min<int64_t>(kDenseMR, rows - r)) {
        case 6: dense_tile<6>(K, ar, K, panel, b, o, N, nc, rr, act); break;
        case 5: dense_tile<5>(K, ar, K, panel, b, o, N, nc, rr, act); break;
        case 4: dense_tile<4>(K, ar, K, panel, b, o, N, nc, rr, act); break;
        case 3: dense_tile<3>(K, ar, K, panel, b, o, N, nc, rr, act); break;
        case 2: dense_tile<2>(K, ar, K, panel, b, o, N, nc, rr, act); break;
        default: dense_tile<1>(K, ar, K, panel, b, o, N, nc, rr, act); break;
      }
    }
  }
}

}  // namespace mtc
