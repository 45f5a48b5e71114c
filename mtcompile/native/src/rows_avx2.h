// Row kernels on AVX2/FMA: softmax and layer norm over the last axis, one row at a time. TVM's
// generated code for them runs scalar reductions and (softmax) an exp per element; here a row
// is a few vector passes in L1. exp is Cephes' expf polynomial (as TVM's fast_exp): within
// 2 ulp on [-88, 88], 0 below. NaN in a row gives a NaN row, as in PyTorch. Built with target
// attributes; the caller dispatches on the CPU's features.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace mtc {

__attribute__((target("avx2,fma"))) inline __m256 exp_avx2(__m256 x) {
  // x second in min/max: x86 returns the second operand when either is NaN, so NaN stays
  x = _mm256_max_ps(_mm256_set1_ps(-88.3762626647949f),
                    _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), x));
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, z, _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i n = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127));
  return _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(n, 23)));
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// the n (< 8) values at p, the other lanes `fill`
__attribute__((target("avx2"))) inline __m256 load_tail(const float* p, int64_t n, float fill) {
  alignas(32) float t[8];
  for (int i = 0; i < 8; ++i) t[i] = i < n ? p[i] : fill;
  return _mm256_load_ps(t);
}
__attribute__((target("avx2"))) inline void store_tail(float* p, __m256 v, int64_t n) {
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  for (int64_t i = 0; i < n; ++i) p[i] = t[i];
}

__attribute__((target("avx2,fma"))) inline void softmax_row_avx2(const float* x, float* y,
                                                                 int64_t n) {
  const float inf = std::numeric_limits<float>::infinity();
  __m256 m = _mm256_set1_ps(-inf), bad = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    m = _mm256_max_ps(m, v);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  float mx = hmax(m);
  bool nan = _mm256_movemask_ps(bad) != 0;
  for (; j < n; ++j) {
    nan = nan || std::isnan(x[j]);
    mx = x[j] > mx ? x[j] : mx;
  }
  if (nan) {
    for (j = 0; j < n; ++j) y[j] = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  const __m256 vm = _mm256_set1_ps(mx);
  __m256 s = _mm256_setzero_ps();
  for (j = 0; j + 8 <= n; j += 8) {
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm));
    _mm256_storeu_ps(y + j, e);
    s = _mm256_add_ps(s, e);
  }
  if (j < n) {
    const __m256 e = exp_avx2(_mm256_sub_ps(load_tail(x + j, n - j, -inf), vm));
    store_tail(y + j, e, n - j);
    s = _mm256_add_ps(s, e);  // the -inf lanes give 0
  }
  const __m256 inv = _mm256_set1_ps(1.f / hsum(s));
  for (j = 0; j + 8 <= n; j += 8) _mm256_storeu_ps(y + j, _mm256_mul_ps(_mm256_loadu_ps(y + j), inv));
  for (; j < n; ++j) y[j] *= _mm256_cvtss_f32(inv);
}

__attribute__((target("avx2,fma"))) inline void layer_norm_row_avx2(const float* x,
                                                                    const float* gamma,
                                                                    const float* beta, float eps,
                                                                    float* y, int64_t n) {
  __m256 s = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(x + j));
  float sum = hsum(s);
  for (; j < n; ++j) sum += x[j];
  const float mean = sum / static_cast<float>(n);
  const __m256 vm = _mm256_set1_ps(mean);
  __m256 q = _mm256_setzero_ps();
  for (j = 0; j + 8 <= n; j += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + j), vm);
    q = _mm256_fmadd_ps(d, d, q);
  }
  float var = hsum(q);
  for (; j < n; ++j) var += (x[j] - mean) * (x[j] - mean);
  const float inv = 1.f / std::sqrt(var / static_cast<float>(n) + eps);
  const __m256 vi = _mm256_set1_ps(inv);
  for (j = 0; j + 8 <= n; j += 8) {
    const __m256 d = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm), vi);
    _mm256_storeu_ps(y + j, _mm256_fmadd_ps(d, _mm256_loadu_ps(gamma + j),
                                            _mm256_loadu_ps(beta + j)));
  }
  for (; j < n; ++j) y[j] = (x[j] - mean) * inv * gamma[j] + beta[j];
}

// the same without AVX2 (std::exp: libm)
inline void softmax_row_generic(const float* x, float* y, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    if (std::isnan(x[j])) {
      for (int64_t k = 0; k < n; ++k) y[k] = std::numeric_limits<float>::quiet_NaN();
      return;
    }
    mx = x[j] > mx ? x[j] : mx;
  }
  float s = 0.f;
  for (int64_t j = 0; j < n; ++j) s += (y[j] = std::exp(x[j] - mx));
  const float inv = 1.f / s;
  for (int64_t j = 0; j < n; ++j) y[j] *= inv;
}

inline void layer_norm_row_generic(const float* x, const float* gamma, const float* beta,
                                   float eps, float* y, int64_t n) {
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) sum += x[j];
  const float mean = sum / static_cast<float>(n);
  float var = 0.f;
  for (int64_t j = 0; j < n; ++j) var += (x[j] - mean) * (x[j] - mean);
  const float inv = 1.f / std::sqrt(var / static_cast<float>(n) + eps);
  for (int64_t j = 0; j < n; ++j) y[j] = (x[j] - mean) * inv * gamma[j] + beta[j];
}

}  // namespace mtc
