// 3x3 stride-1 convolution by Winograd's minimal filtering F(2x2, 3x3) (Lavin and Gray,
// "Fast Algorithms for Convolutional Neural Networks", 2016): each 2x2 block of output (a
// tile) comes from its 4x4 block of input with 16 multiply-adds per pair of input and output
// channels instead of 36. Per tile, the input block d becomes V = B^T d B; the weights g
// become U = G g G^T, at build time (`mtcompile.native.winograd_weights`: [16][O][C], xi =
// 4 * row + column of the 4x4), and the kernel takes U in place of the weight (variant
// "winograd" of table row "conv2d"). The 16 positions xi are then 16 independent matrix
// products M[xi] = U[xi] (O x C) . V[xi] (C x tiles), and each tile's output is A^T M A.
// On AVX-512 the products run on a register tile of up to 16 output channels x 16 tiles, 16
// tiles at a time; elsewhere on the BLAS, a band at a time. The bf16 form (variant
// "winograd_bf16", `mtcompile.native.winograd_weights_bf16`) takes U as bfloat16 pairs over
// input channels and rounds V to them: on AVX-512 BF16 one VDPBF16PS per pair of channels;
// elsewhere the same rounded values through the float32 path.
//
// The work is split into bands of tile rows per image, fixed by the sizes (not by the
// threads): a band pads its input rows, transforms them, and runs the products and the output
// transform, all in the task that took it, so a result never depends on which thread
// computed it or how many there were. The transforms only add and subtract: the result is
// as close to the exact sums as the direct form's (tests/test_native.py).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

#include "common.h"
#include "conv_avx2.h"
#include "dense_bf16.h"  // to_bf16, from_bf16

namespace mtc {

// The geometry of a Winograd conv: tiles, bands, and the scratch a band uses.
struct WinoGeom {
  int64_t TH, TW, TWv;  // tile rows, tiles per row, that rounded up to 16 (a vector of tiles)
  int64_t PW;           // floats per phase (even / odd columns) of a padded row
  int64_t bh, bands;    // tile rows per band, bands per image
  int64_t ldv;          // floats per row of V (and of M on the BLAS path): a band's tiles
  explicit WinoGeom(const ConvGeom& q) {
    TH = (q.OH + 1) / 2, TW = (q.OW + 1) / 2;
    TWv = (TW + kNR - 1) / kNR * kNR;
    PW = TWv + kNR;  // tile j reads even and odd columns j and j + 1
    // a band's transformed input (16 x C x bh x TWv floats) stays within about 256 KB, and
    // an image has 8 bands where it has the rows (tasks for the pool's threads to take)
    bh = std::clamp<int64_t>(std::min((int64_t{1} << 16) / (16 * q.C * TWv), (TH + 7) / 8), 1,
                             TH);
    bands = (TH + bh - 1) / bh;
    ldv = bh * TWv;
  }
  int64_t pad_floats(const ConvGeom& q) const { return q.C * (2 * bh + 2) * 2 * PW; }
  int64_t v_floats(const ConvGeom& q) const { return 16 * q.C * ldv; }
  int64_t m_floats(const ConvGeom& q) const { return 16 * q.O * (kHasAvx512 ? kNR : ldv); }
  // V as bfloat16 pairs over channels (the bf16 form): 16 x ceil(C / 2) x ldv 32-bit pairs
  int64_t vb_floats(const ConvGeom& q) const { return 16 * ((q.C + 1) / 2) * ldv; }
  int64_t scratch_floats(const ConvGeom& q, bool bf16) const {
    return pad_floats(q) + v_floats(q) + m_floats(q) + (bf16 ? vb_floats(q) : 0);
  }
};

// Padded input rows [2 * i0, 2 * i0 + 2 * nb + 2) of every channel of image x (C, H, W), each
// row split into its even and odd padded columns: pad + (c * rows + r) * 2 * PW is the even
// phase of row r of channel c, PW floats later its odd phase.
inline void winograd_pad(const ConvGeom& q, const WinoGeom& g, const float* x, int64_t i0,
                         int64_t nb, float* pad) {
  const int64_t rows = 2 * nb + 2, pe = q.pl % 2;
  std::memset(pad, 0, q.C * rows * 2 * g.PW * sizeof(float));
  for (int64_t c = 0; c < q.C; ++c)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t ih = 2 * i0 + r - q.pt;
      if (ih < 0 || ih >= q.H) continue;
      const float* src = x + (c * q.H + ih) * q.W;
      float* row = pad + (c * rows + r) * 2 * g.PW;
      // input column iw is padded column iw + pl: phase (iw + pl) % 2, index (iw + pl) / 2
      float* even = row + pe * g.PW + q.pl / 2;
      float* odd = row + (1 - pe) * g.PW + (q.pl + 1) / 2;
      if (kHasAvx2) {
        split2(src, q.W, even, odd);
      } else {
        for (int64_t m = 0; 2 * m < q.W; ++m) {
          even[m] = src[2 * m];
          if (2 * m + 1 < q.W) odd[m] = src[2 * m + 1];
        }
      }
    }
}

// V = B^T d B for the band's tiles, 16 at a time: v + (xi * C + c) * ldv + ii * TWv + j,
// with B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]
inline __attribute__((always_inline)) void winograd_input_body(const ConvGeom& q,
                                                               const WinoGeom& g,
                                                               const float* pad, int64_t nb,
                                                               float* v) {
  const int64_t rows = 2 * nb + 2, plane = q.C * g.ldv;
  for (int64_t c = 0; c < q.C; ++c)
    for (int64_t ii = 0; ii < nb; ++ii)
      for (int64_t j = 0; j < g.TWv; j += kNR) {
        float t[4][4][kNR];
        for (int r = 0; r < 4; ++r) {
          const float* e = pad + (c * rows + 2 * ii + r) * 2 * g.PW + j;
          const float* o = e + g.PW;
          for (int l = 0; l < kNR; ++l) {
            t[r][0][l] = e[l] - e[l + 1];
            t[r][1][l] = o[l] + e[l + 1];
            t[r][2][l] = e[l + 1] - o[l];
            t[r][3][l] = o[l] - o[l + 1];
          }
        }
        float* dst = v + c * g.ldv + ii * g.TWv + j;
        for (int k = 0; k < 4; ++k)
          for (int l = 0; l < kNR; ++l) {
            dst[(0 * 4 + k) * plane + l] = t[0][k][l] - t[2][k][l];
            dst[(1 * 4 + k) * plane + l] = t[1][k][l] + t[2][k][l];
            dst[(2 * 4 + k) * plane + l] = t[2][k][l] - t[1][k][l];
            dst[(3 * 4 + k) * plane + l] = t[1][k][l] - t[3][k][l];
          }
      }
}

// Y = A^T M A (+ bias) for the 16 tiles from (i, j0), every output channel, with
// A^T = [1 1 1 0; 0 1 -1 -1]; m + (xi * O + o) * ld holds M[xi] for the 16 tiles. Writes
// output rows 2i, 2i + 1 and columns from 2 * j0, those inside the output.
inline __attribute__((always_inline)) void winograd_output_body(const ConvGeom& q,
                                                                const float* m, int64_t ld,
                                                                const float* bias, int64_t i,
                                                                int64_t j0, float* y) {
  const int64_t P = q.OH * q.OW, n = std::min<int64_t>(2 * kNR, q.OW - 2 * j0);
  const int nrow = 2 * i + 1 < q.OH ? 2 : 1;
  for (int64_t o = 0; o < q.O; ++o) {
    float s[2][4][kNR];
    for (int k = 0; k < 4; ++k) {
      const float* m0 = m + ((0 * 4 + k) * q.O + o) * ld;
      const float* m1 = m + ((1 * 4 + k) * q.O + o) * ld;
      const float* m2 = m + ((2 * 4 + k) * q.O + o) * ld;
      const float* m3 = m + ((3 * 4 + k) * q.O + o) * ld;
      for (int l = 0; l < kNR; ++l) {
        s[0][k][l] = m0[l] + m1[l] + m2[l];
        s[1][k][l] = m1[l] - m2[l] - m3[l];
      }
    }
    const float b = bias != nullptr ? bias[o] : 0.f;
    for (int r = 0; r < nrow; ++r) {
      float row[2 * kNR];
      for (int l = 0; l < kNR; ++l) {
        row[2 * l] = s[r][0][l] + s[r][1][l] + s[r][2][l] + b;
        row[2 * l + 1] = s[r][1][l] - s[r][2][l] - s[r][3][l] + b;
      }
      std::memcpy(y + o * P + (2 * i + r) * q.OW + 2 * j0, row, n * sizeof(float));
    }
  }
}

__attribute__((target("avx2,fma"))) inline void winograd_input_avx2(const ConvGeom& q,
                                                                    const WinoGeom& g,
                                                                    const float* pad,
                                                                    int64_t nb, float* v) {
  winograd_input_body(q, g, pad, nb, v);
}
inline void winograd_input_generic(const ConvGeom& q, const WinoGeom& g, const float* pad,
                                   int64_t nb, float* v) {
  winograd_input_body(q, g, pad, nb, v);
}
__attribute__((target("avx2,fma"))) inline void winograd_output_avx2(
    const ConvGeom& q, const float* m, int64_t ld, const float* bias, int64_t i, int64_t j0,
    float* y) {
  winograd_output_body(q, m, ld, bias, i, j0, y);
}
inline void winograd_output_generic(const ConvGeom& q, const float* m, int64_t ld,
                                    const float* bias, int64_t i, int64_t j0, float* y) {
  winograd_output_body(q, m, ld, bias, i, j0, y);
}

// The AVX-512 forms of the two transforms: as the bodies above, in zmm registers.
__attribute__((target("avx512f"))) inline void winograd_input_512(const ConvGeom& q,
                                                                  const WinoGeom& g,
                                                                  const float* pad, int64_t nb,
                                                                  float* v) {
  const int64_t rows = 2 * nb + 2, plane = q.C * g.ldv;
  for (int64_t c = 0; c < q.C; ++c)
    for (int64_t ii = 0; ii < nb; ++ii)
      for (int64_t j = 0; j < g.TWv; j += kNR) {
        __m512 t[4][4];
        for (int r = 0; r < 4; ++r) {
          const float* e = pad + (c * rows + 2 * ii + r) * 2 * g.PW + j;
          const float* o = e + g.PW;
          const __m512 d0 = _mm512_loadu_ps(e), d1 = _mm512_loadu_ps(o);
          const __m512 d2 = _mm512_loadu_ps(e + 1), d3 = _mm512_loadu_ps(o + 1);
          t[r][0] = _mm512_sub_ps(d0, d2);
          t[r][1] = _mm512_add_ps(d1, d2);
          t[r][2] = _mm512_sub_ps(d2, d1);
          t[r][3] = _mm512_sub_ps(d1, d3);
        }
        float* dst = v + c * g.ldv + ii * g.TWv + j;
        for (int k = 0; k < 4; ++k) {
          _mm512_storeu_ps(dst + (0 * 4 + k) * plane, _mm512_sub_ps(t[0][k], t[2][k]));
          _mm512_storeu_ps(dst + (1 * 4 + k) * plane, _mm512_add_ps(t[1][k], t[2][k]));
          _mm512_storeu_ps(dst + (2 * 4 + k) * plane, _mm512_sub_ps(t[2][k], t[1][k]));
          _mm512_storeu_ps(dst + (3 * 4 + k) * plane, _mm512_sub_ps(t[1][k], t[3][k]));
        }
      }
}

__attribute__((target("avx512f"))) inline void winograd_output_512(const ConvGeom& q,
                                                                   const float* m, int64_t ld,
                                                                   const float* bias, int64_t i,
                                                                   int64_t j0, float* y) {
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi =
      _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const int64_t n = std::min<int64_t>(2 * kNR, q.OW - 2 * j0);
  const __mmask16 mlo = n >= 16 ? 0xffff : (1u << n) - 1;
  const __mmask16 mhi = n >= 32 ? 0xffff : n > 16 ? (1u << (n - 16)) - 1 : 0;
  const int nrow = 2 * i + 1 < q.OH ? 2 : 1;
  const int64_t P = q.OH * q.OW;
  for (int64_t o = 0; o < q.O; ++o) {
    __m512 s[2][4];
    for (int k = 0; k < 4; ++k) {
      const __m512 m0 = _mm512_loadu_ps(m + ((0 * 4 + k) * q.O + o) * ld);
      const __m512 m1 = _mm512_loadu_ps(m + ((1 * 4 + k) * q.O + o) * ld);
      const __m512 m2 = _mm512_loadu_ps(m + ((2 * 4 + k) * q.O + o) * ld);
      const __m512 m3 = _mm512_loadu_ps(m + ((3 * 4 + k) * q.O + o) * ld);
      s[0][k] = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
      s[1][k] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
    }
    const __m512 b = _mm512_set1_ps(bias != nullptr ? bias[o] : 0.f);
    for (int r = 0; r < nrow; ++r) {
      const __m512 y0 =
          _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s[r][0], s[r][1]), s[r][2]), b);
      const __m512 y1 =
          _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(s[r][1], s[r][2]), s[r][3]), b);
      float* dst = y + o * P + (2 * i + r) * q.OW + 2 * j0;
      _mm512_mask_storeu_ps(dst, mlo, _mm512_permutex2var_ps(y0, lo, y1));
      _mm512_mask_storeu_ps(dst + kNR, mhi, _mm512_permutex2var_ps(y0, hi, y1));
    }
  }
}

// The AVX-512 product tile: m[i * 16 + l] = sum_c u[i * C + c] * v[c * ldv + l] for MR
// output channels i (rows of U[xi]) and 16 tiles l.
template <int MR>
__attribute__((target("avx512f"))) void winograd_tile(const float* u, int64_t C, const float* v,
                                                      int64_t ldv, float* m) {
  __m512 acc[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; ++c) {
    const __m512 b = _mm512_loadu_ps(v + c * ldv);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(u[i * C + c]), b, acc[i]);
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) _mm512_storeu_ps(m + i * kNR, acc[i]);
}

// The AVX-512 BF16 product tile: as winograd_tile with channels in pairs, u (MR rows of C2
// pairs of U) and v (C2 rows of 16 pairs of V), one VDPBF16PS per pair of channels.
template <int MR>
__attribute__((target("avx512f,avx512bf16"))) void winograd_tile_bf16(const uint32_t* u,
                                                                      int64_t C2,
                                                                      const uint32_t* v,
                                                                      int64_t ldv, float* m) {
  __m512 acc[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < C2; ++c) {
    const __m512bh b = (__m512bh)_mm512_loadu_si512(v + c * ldv);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
      acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32(static_cast<int>(u[i * C2 + c])),
                                b);
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) _mm512_storeu_ps(m + i * kNR, acc[i]);
}

// V (16 x C x ldv floats) of the band's tiles as bfloat16 pairs over channels: vb + (xi * C2
// + j) * ldv + l holds channels 2j (low half) and 2j + 1 (high; zero past C) of tile l
__attribute__((target("avx512f,avx512bf16"))) inline void winograd_pairs(const ConvGeom& q,
                                                                         const WinoGeom& g,
                                                                         const float* v,
                                                                         int64_t nb,
                                                                         uint32_t* vb) {
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi =
      _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const int64_t C2 = (q.C + 1) / 2;
  for (int64_t xi = 0; xi < 16; ++xi)
    for (int64_t j = 0; j < C2; ++j) {
      const float* a = v + (xi * q.C + 2 * j) * g.ldv;
      uint32_t* dst = vb + (xi * C2 + j) * g.ldv;
      for (int64_t f = 0; f < nb * g.TWv; f += kNR) {
        const __m512 even = _mm512_loadu_ps(a + f);
        const __m512 odd = 2 * j + 1 < q.C ? _mm512_loadu_ps(a + g.ldv + f) : _mm512_setzero_ps();
        _mm512_storeu_si512(dst + f, (__m512i)_mm512_cvtne2ps_pbh(
                                         _mm512_permutex2var_ps(even, hi, odd),
                                         _mm512_permutex2var_ps(even, lo, odd)));
      }
    }
}

using WinoTileFn = void (*)(const float*, int64_t, const float*, int64_t, float*);
template <int... MR>
constexpr std::array<WinoTileFn, kMR512 + 1> wino_tiles_of(std::integer_sequence<int, 0, MR...>) {
  return {nullptr, winograd_tile<MR>...};
}
// per row count 1..16
constexpr std::array<WinoTileFn, kMR512 + 1> kWinoTiles =
    wino_tiles_of(std::make_integer_sequence<int, kMR512 + 1>());
using WinoTileBf16Fn = void (*)(const uint32_t*, int64_t, const uint32_t*, int64_t, float*);
template <int... MR>
constexpr std::array<WinoTileBf16Fn, kMR512 + 1> wino_tiles_bf16_of(
    std::integer_sequence<int, 0, MR...>) {
  return {nullptr, winograd_tile_bf16<MR>...};
}
constexpr std::array<WinoTileBf16Fn, kMR512 + 1> kWinoTilesBf16 =
    wino_tiles_bf16_of(std::make_integer_sequence<int, kMR512 + 1>());

// U as the kernel takes it: float32 [16][O][C], or (bf16 form) bfloat16 pairs over channels
// [16][O][ceil(C / 2)]; `round`: V is rounded to bfloat16 after its transform (the bf16
// form's values on a host without AVX-512 BF16, where U comes unpacked as float32)
struct WinoWeights {
  const float* u = nullptr;
  const uint32_t* ub = nullptr;
  bool round = false;
};

// M for the 16 tiles from f, every position and output channel, on the AVX-512 tiles
// (float32 U and V, or bfloat16 pairs: ub and vb)
inline void winograd_products(const ConvGeom& q, const WinoGeom& g, const WinoWeights& w,
                              const float* v, const uint32_t* vb, int64_t f, float* m) {
  const Strips strips(q.O, kMR512);
  const int64_t C2 = (q.C + 1) / 2;
  for (int xi = 0; xi < 16; ++xi)
    for (int64_t s = 0; s < strips.n; ++s) {
      const int64_t o0 = strips.first(s);
      float* mo = m + (xi * q.O + o0) * kNR;
      if (w.ub != nullptr)
        kWinoTilesBf16[strips.rows(s)](w.ub + (xi * q.O + o0) * C2, C2, vb + xi * C2 * g.ldv + f,
                                       g.ldv, mo);
      else
        kWinoTiles[strips.rows(s)](w.u + (xi * q.O + o0) * q.C, q.C, v + xi * q.C * g.ldv + f,
                                   g.ldv, mo);
    }
}

// One band (tile rows [i0, i0 + nb)) of image x into y (both at the image): pad, transform,
// the products and the output transform, then the epilogue; w: U (`WinoWeights`); scratch:
// `scratch_floats`; at: y's first element's index in the output (for the epilogue).
inline void winograd_band(const ConvGeom& q, const WinoGeom& g, const WinoWeights& w,
                          const float* x, const float* bias, float* y, int64_t i0, int64_t nb,
                          float* scratch, const Epilogue& ep, int64_t at) {
  float* pad = scratch;
  float* v = pad + g.pad_floats(q);
  float* m = v + g.v_floats(q);
  uint32_t* vb = reinterpret_cast<uint32_t*>(m + g.m_floats(q));
  winograd_pad(q, g, x, i0, nb, pad);
  (kHasAvx512 ? winograd_input_512 : kHasAvx2 ? winograd_input_avx2 : winograd_input_generic)(
      q, g, pad, nb, v);
  if (w.round)
    for (int64_t i = 0; i < g.v_floats(q); ++i) v[i] = from_bf16(to_bf16(v[i]));
  if (w.ub != nullptr) winograd_pairs(q, g, v, nb, vb);
  if (!kHasAvx512)  // the products of the whole band, on the BLAS
    for (int xi = 0; xi < 16; ++xi)
      sgemm(q.O, nb * g.TWv, q.C, w.u + xi * q.O * q.C, q.C, v + xi * q.C * g.ldv, g.ldv, 0.f,
            m + xi * q.O * g.ldv, g.ldv);
  for (int64_t f = 0; f < nb * g.TWv; f += kNR) {
    const int64_t i = i0 + f / g.TWv, j0 = f % g.TWv;
    if (j0 >= g.TW) continue;  // lanes past the last tile of the row
    if (kHasAvx512) {
      winograd_products(q, g, w, v, vb, f, m);
      winograd_output_512(q, m, kNR, bias, i, j0, y);
    } else {
      (kHasAvx2 ? winograd_output_avx2 : winograd_output_generic)(q, m + f, g.ldv, bias, i, j0,
                                                                  y);
    }
    if (ep.any()) {
      const int64_t r0 = 2 * i, nr = std::min<int64_t>(2, q.OH - r0);
      const int64_t cols = std::min<int64_t>(2 * kNR, q.OW - 2 * j0);
      for (int64_t o = 0; o < q.O; ++o)
        finish_block(ep, y - at, at + o * q.OH * q.OW + r0 * q.OW + 2 * j0, q.OW, nr, cols);
    }
  }
}

}  // namespace mtc
