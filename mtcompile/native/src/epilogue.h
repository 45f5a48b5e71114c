// What a kernel applies to its result before storing it (its epilogue): out = act(result + res)
// with res an optional tensor of out's shape (a residual) and act none, ReLU or GELU (erf form,
// through the polynomial erf of TVM's fast_erf, which the TVM kernels use: within 1e-6 of erf).
// Done in registers, it saves the separate kernel and its pass over the output in memory.
// NaN stays NaN, as in PyTorch: ReLU is max(0, x) with x second, which x86 returns when either
// operand is NaN.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace mtc {

enum Act : int { kActNone = 0, kActRelu = 1, kActGelu = 2 };

// TVM's fast_erf (topi/elemwise.h): an odd / even rational polynomial on x clamped to [-4, 4]
constexpr float kErfA[7] = {-1.60960333262415e-02f, -2.95459980854025e-03f,
                            -7.34990630326855e-04f, -5.69250639462346e-05f,
                            -2.10102402082508e-06f, 2.77068142495902e-08f,
                            -2.72614225801306e-10f};
constexpr float kErfB[5] = {-1.42647390514189e-02f, -7.37332916720468e-03f,
                            -1.68282697438203e-03f, -2.13374055278905e-04f,
                            -1.45660718464996e-05f};
constexpr float kSqrtHalf = 0.7071067811865476f;

inline float erf_poly(float x) {
  x = std::max(std::min(x, 4.f), -4.f);
  const float x2 = x * x;
  float p = kErfA[6];
  for (int i = 5; i >= 0; --i) p = p * x2 + kErfA[i];
  float q = kErfB[4];
  for (int i = 3; i >= 0; --i) q = q * x2 + kErfB[i];
  return x * p / q;
}

inline float act_scalar(float v, Act act) {
  if (act == kActRelu) return v < 0.f ? 0.f : v;
  if (act == kActGelu) return v * 0.5f * (1.f + erf_poly(v * kSqrtHalf));
  return v;
}

__attribute__((target("avx2,fma"))) inline __m256 erf_avx2(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(4.f)), _mm256_set1_ps(-4.f));
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(kErfA[6]);
  for (int i = 5; i >= 0; --i) p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(kErfA[i]));
  __m256 q = _mm256_set1_ps(kErfB[4]);
  for (int i = 3; i >= 0; --i) q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(kErfB[i]));
  return _mm256_div_ps(_mm256_mul_ps(x, p), q);
}

// v plus the residual's n (<= 8) values at r (none when r is null), then the activation
__attribute__((target("avx2,fma"), always_inline)) inline __m256 finish8(__m256 v, const float* r,
                                                                         int n, Act act) {
  if (r != nullptr && n > 0) {
    if (n >= 8) {
      v = _mm256_add_ps(v, _mm256_loadu_ps(r));
    } else {
      alignas(32) float t[8] = {};
      std::memcpy(t, r, n * sizeof(float));
      v = _mm256_add_ps(v, _mm256_load_ps(t));
    }
  }
  if (act == kActRelu) {
    v = _mm256_max_ps(_mm256_setzero_ps(), v);
  } else if (act == kActGelu) {
    const __m256 e = erf_avx2(_mm256_mul_ps(v, _mm256_set1_ps(kSqrtHalf)));
    v = _mm256_mul_ps(_mm256_mul_ps(v, _mm256_set1_ps(0.5f)),
                      _mm256_add_ps(_mm256_set1_ps(1.f), e));
  }
  return v;
}

// the epilogue over a rows x cols block of out (row stride ld) already computed; res (or null)
// is laid out as out, at the block's first element
__attribute__((target("avx2,fma"))) inline void finish_block_avx2(float* out, const float* res,
                                                                  int64_t ld, int64_t rows,
                                                                  int64_t cols, Act act) {
  for (int64_t i = 0; i < rows; ++i) {
    float* o = out + i * ld;
    const float* r = res != nullptr ? res + i * ld : nullptr;
    int64_t j = 0;
    for (; j + 8 <= cols; j += 8)
      _mm256_storeu_ps(o + j, finish8(_mm256_loadu_ps(o + j), r ? r + j : nullptr, 8, act));
    for (; j < cols; ++j) o[j] = act_scalar(o[j] + (r ? r[j] : 0.f), act);
  }
}

inline void finish_block_generic(float* out, const float* res, int64_t ld, int64_t rows,
                                 int64_t cols, Act act) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      out[i * ld + j] = act_scalar(out[i * ld + j] + (res ? res[i * ld + j] : 0.f), act);
}

}  // namespace mtc
