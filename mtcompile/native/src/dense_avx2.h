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

namespace mtc {

constexpr int kDenseMR = 6, kDenseNR = 16;

// rows [0, MR) x 16 columns of one panel: a (MR rows, stride lda), wp (K x 16)
template <int MR>
__attribute__((target("avx2,fma"), always_inline)) inline void dense_tile(
    int64_t K, const float* a, int64_t lda, const float* wp, const float* bias, float* out,
    int64_t ldc, int ncols) {
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
    const __m256 r0 = _mm256_add_ps(c0[i], bv0), r1 = _mm256_add_ps(c1[i], bv1);
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

// panels [p0, p1) for all `rows` rows of a (rows x K) into out (rows x N)
__attribute__((target("avx2,fma"))) inline void dense_panels_avx2(
    int64_t rows, int64_t K, int64_t N, const float* a, const float* wp, const float* bias,
    float* out, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* panel = wp + p * K * kDenseNR;
    const int64_t n0 = p * kDenseNR;
    const int nc = static_cast<int>(std::min<int64_t>(kDenseNR, N - n0));
    const float* b = bias != nullptr ? bias + n0 : nullptr;
    int64_t r = 0;
    for (; r + kDenseMR <= rows; r += kDenseMR)
      dense_tile<kDenseMR>(K, a + r * K, K, panel, b, out + r * N + n0, N, nc);
    switch (rows - r) {
      case 1: dense_tile<1>(K, a + r * K, K, panel, b, out + r * N + n0, N, nc); break;
      case 2: dense_tile<2>(K, a + r * K, K, panel, b, out + r * N + n0, N, nc); break;
      case 3: dense_tile<3>(K, a + r * K, K, panel, b, out + r * N + n0, N, nc); break;
      case 4: dense_tile<4>(K, a + r * K, K, panel, b, out + r * N + n0, N, nc); break;
      case 5: dense_tile<5>(K, a + r * K, K, panel, b, out + r * N + n0, N, nc); break;
      default: break;
    }
  }
}

}  // namespace mtc
