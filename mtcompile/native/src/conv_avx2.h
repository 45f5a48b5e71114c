// Direct convolution on an AVX2/FMA 6x16 register tile: out[o, p] = sum_k w[o, k] * x[k, p]
// with k over (input channel, kh, kw) and p over 16 output pixels of one output row. The
// input is first copied once into a zero-padded, stride-split layout (each row stored as
// `stride` phase rows, so that the 16 inputs one kernel tap reads are contiguous for any
// stride); the 16-wide vectors are then loaded straight from it, with no im2col matrix (for a
// 3x3 conv at 64x64 that would be 4.7 MB, twice the L2). Weights are packed once per call into
// K-major strips of output channels: kMR (4) rows for the AVX2 tile (its 2 x 4 accumulators,
// the two input vectors and a broadcast fit the 16 ymm registers: 6 rows spilled to the stack,
// 60% of the FMA rate), kMR512 (16) for the AVX-512 tile (one zmm of 16 pixels per output
// channel, the weight broadcast inside the FMA). Built with target attributes so that the
// library stays generic x86-64; the caller dispatches on the CPU's features.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "epilogue.h"

namespace mtc {

constexpr int kMR = 4, kMR512 = 16, kNR = 16;

// Output channels in strips of at most `most` rows, of near-equal height (40 rows: 14, 13, 13,
// not 16, 16, 8: a short strip has too few accumulators per input vector loaded); strip s
// covers rows [first(s), first(s) + rows(s)). The weights are packed and the tiles run in these.
struct Strips {
  int64_t n, base, extra;
  Strips(int64_t og, int64_t most) : n((og + most - 1) / most), base(og / n), extra(og % n) {}
  int64_t rows(int64_t s) const { return base + (s < extra ? 1 : 0); }
  int64_t first(int64_t s) const { return s * base + std::min(s, extra); }
};

// The one conv geometry (every conv path reads it): images N of C channels H x W, O output
// channels OH x OW from KH x KW kernels, G groups of Cg input and Og output channels; strides,
// padding top/left/bottom/right, dilations. Made from a call's tensors and its 9 parameters
// by conv.cc (`conv_geom`).
struct ConvGeom {
  int64_t N, C, H, W, O, KH, KW, OH, OW, G, Cg, Og;
  int64_t sh, sw, pt, pl, pb, pr, dh, dw;
};

// The padded, stride-split copy of one image's channels: row ih (in padded coordinates) of
// channel c holds `sw` phase rows of `phase_w` floats; phase f holds padded columns f, f + sw, ...
struct Padded {
  int64_t rows, phase_w, row_floats;  // padded rows per channel; floats per phase / padded row
  std::vector<int64_t> tap;           // per kw: offset of its first input within a padded row

  explicit Padded(const ConvGeom& q) {
    rows = q.pt + q.H;  // rows past the input are all padding: never read (see conv_panels)
    // every lane of every panel (16 per started panel) and every input column fits
    const int64_t lanes = (q.OW + kNR - 1) / kNR * kNR;
    phase_w = std::max(lanes + q.dw * (q.KW - 1) / q.sw, (q.pl + q.W - 1) / q.sw + 1);
    row_floats = phase_w * q.sw;
    for (int64_t kw = 0; kw < q.KW; ++kw) {
      const int64_t col = kw * q.dw;  // padded column of output column 0's tap
      tap.push_back((col % q.sw) * phase_w + col / q.sw);
    }
  }
  int64_t channel_floats() const { return rows * row_floats; }
};

// one input row split into its even and odd columns (16 at a time)
__attribute__((target("avx2"))) inline void split2(const float* src, int64_t w, float* even,
                                                   float* odd) {
  int64_t m = 0;
  for (; 2 * m + 16 <= w; m += 8) {
    const __m256 a = _mm256_loadu_ps(src + 2 * m), b = _mm256_loadu_ps(src + 2 * m + 8);
    // within each 128-bit lane: a0 a2 b0 b2 | a4 a6 b4 b6 -> reorder the 64-bit pairs
    const __m256 e = _mm256_shuffle_ps(a, b, 0x88), o = _mm256_shuffle_ps(a, b, 0xDD);
    _mm256_storeu_ps(even + m, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), 0xD8)));
    _mm256_storeu_ps(odd + m, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), 0xD8)));
  }
  for (; 2 * m < w; ++m) {
    even[m] = src[2 * m];
    if (2 * m + 1 < w) odd[m] = src[2 * m + 1];
  }
}

// channels [c0, c1) of x (C, H, W) into dst (channel-major, as Padded describes)
inline void pad_channels(const ConvGeom& q, const Padded& pd, const float* x, int64_t c0,
                         int64_t c1, float* dst) {
  for (int64_t c = c0; c < c1; ++c) {
    float* dc = dst + c * pd.channel_floats();
    // stride 1: zero only the padding (the top rows, each row's margins), not the whole
    // channel before the copy writes it again (a third of the conv's memory traffic)
    std::memset(dc, 0, (q.sw == 1 ? q.pt * pd.row_floats : pd.channel_floats()) * sizeof(float));
    for (int64_t ih = 0; ih < q.H; ++ih) {
      const float* src = x + (c * q.H + ih) * q.W;
      float* row = dc + (ih + q.pt) * pd.row_floats;
      if (q.sw == 1) {
        std::memset(row, 0, q.pl * sizeof(float));
        std::memcpy(row + q.pl, src, q.W * sizeof(float));
        std::memset(row + q.pl + q.W, 0, (pd.row_floats - q.pl - q.W) * sizeof(float));
      } else if (q.sw == 2) {
        // input column iw sits at padded column iw + pl: phase (iw + pl) % 2, index (iw + pl) / 2
        const int64_t pe = q.pl % 2;
        split2(src, q.W, row + pe * pd.phase_w + q.pl / 2,
               row + (1 - pe) * pd.phase_w + (q.pl + 1) / 2);
      } else {
        // phase f takes input columns iw with (iw + pl) % sw == f, in order
        for (int64_t f = 0; f < q.sw; ++f) {
          const int64_t iw0 = ((f - q.pl) % q.sw + q.sw) % q.sw;
          float* dst = row + f * pd.phase_w + (iw0 + q.pl) / q.sw;
          for (int64_t iw = iw0; iw < q.W; iw += q.sw) *dst++ = src[iw];
        }
      }
    }
  }
}

// weights [Og, Kd] of one group -> strips of at most `strip` rows (`Strips`), each K-major
// (Kd x mr)
inline void pack_weights(const float* w, int64_t Og, int64_t Kd, int strip, float* dst) {
  const Strips strips(Og, strip);
  for (int64_t s = 0; s < strips.n; ++s) {
    const int64_t o0 = strips.first(s), mr = strips.rows(s);
    for (int64_t k = 0; k < Kd; ++k)
      for (int64_t i = 0; i < mr; ++i) dst[k * mr + i] = w[(o0 + i) * Kd + k];
    dst += mr * Kd;
  }
}

// One output row of a tile, 16 pixels in two halves: + bias, + what out holds (accumulate),
// then the epilogue; ncols < 16 writes the valid columns only.
__attribute__((target("avx2,fma"), always_inline)) inline void store_row(
    __m256 r0, __m256 r1, const float* bias, float* o, const float* r, bool accumulate,
    int ncols, Act act) {
  if (bias != nullptr) {
    const __m256 bv = _mm256_broadcast_ss(bias);
    r0 = _mm256_add_ps(r0, bv);
    r1 = _mm256_add_ps(r1, bv);
  }
  if (ncols == kNR) {
    if (accumulate) {
      r0 = _mm256_add_ps(r0, _mm256_loadu_ps(o));
      r1 = _mm256_add_ps(r1, _mm256_loadu_ps(o + 8));
    }
    if (r != nullptr || act != kActNone) {
      r0 = finish8(r0, r, 8, act);
      r1 = finish8(r1, r ? r + 8 : nullptr, 8, act);
    }
    _mm256_storeu_ps(o, r0);
    _mm256_storeu_ps(o + 8, r1);
    return;
  }
  alignas(32) float tmp[kNR];
  _mm256_store_ps(tmp, r0);
  _mm256_store_ps(tmp + 8, r1);
  for (int j = 0; j < ncols; ++j) o[j] = accumulate ? o[j] + tmp[j] : tmp[j];
  if (r != nullptr || act != kActNone)
    for (int j = 0; j < ncols; ++j) o[j] = act_scalar(o[j] + (r ? r[j] : 0.f), act);
}

// One register tile: MR output channels x 16 pixels over `nrows` (c, kh) rows. a: the strip's
// packed weights from the first of these rows on; rows: per (c, kh) the padded row's start at
// the tile's first pixel, null for a row that lies wholly in the padding (skipped); out: the
// tile's first output, `ncols` valid columns; accumulate: add to what out holds; res, act: the
// epilogue (res laid out as out, at the tile's first output; null for none). KW > 0 is the
// kernel width known at compile time (the tap loop unrolled), 0 reads it from q.
template <int MR, int KW>
__attribute__((target("avx2,fma"), always_inline)) inline void tile(
    const ConvGeom& q, const int64_t* tap, const float* a, const float* const* rows,
    int64_t nrows, float* out, int64_t ldc, const float* bias, bool accumulate, int ncols,
    const float* res, Act act) {
  const int64_t kw_n = KW > 0 ? KW : q.KW;
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm256_setzero_ps();
  for (int64_t r = 0; r < nrows; ++r, a += kw_n * MR) {
    const float* row = rows[r];
    if (row == nullptr) continue;
    const float* ak = a;
#pragma GCC unroll 8
    for (int64_t kw = 0; kw < kw_n; ++kw, ak += MR) {
      const float* src = row + tap[kw];
      const __m256 b0 = _mm256_loadu_ps(src), b1 = _mm256_loadu_ps(src + 8);
#pragma GCC unroll 6
      for (int i = 0; i < MR; ++i) {
        const __m256 av = _mm256_broadcast_ss(ak + i);
        c0[i] = _mm256_fmadd_ps(av, b0, c0[i]);
        c1[i] = _mm256_fmadd_ps(av, b1, c1[i]);
      }
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i)
    store_row(c0[i], c1[i], bias ? bias + i : nullptr, out + i * ldc,
              res ? res + i * ldc : nullptr, accumulate, ncols, act);
}

// The AVX-512 tile: as `tile`, MR (up to kMR512) output channels x 16 pixels, one zmm each.
template <int MR, int KW>
__attribute__((target("avx512f,avx2,fma"), always_inline)) inline void tile512(
    const ConvGeom& q, const int64_t* tap, const float* a, const float* const* rows,
    int64_t nrows, float* out, int64_t ldc, const float* bias, bool accumulate, int ncols,
    const float* res, Act act) {
  const int64_t kw_n = KW > 0 ? KW : q.KW;
  __m512 c[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) c[i] = _mm512_setzero_ps();
  for (int64_t r = 0; r < nrows; ++r, a += kw_n * MR) {
    const float* row = rows[r];
    if (row == nullptr) continue;
    const float* ak = a;
#pragma GCC unroll 8
    for (int64_t kw = 0; kw < kw_n; ++kw, ak += MR) {
      const __m512 b = _mm512_loadu_ps(row + tap[kw]);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) c[i] = _mm512_fmadd_ps(_mm512_set1_ps(ak[i]), b, c[i]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
    store_row(_mm512_castps512_ps256(c[i]),
              _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(c[i]), 1)),
              bias ? bias + i : nullptr, out + i * ldc, res ? res + i * ldc : nullptr,
              accumulate, ncols, act);
}

template <int MR, int KW>
__attribute__((target("avx512f,avx2,fma"))) void tile512_call(
    const ConvGeom& q, const int64_t* tap, const float* a, const float* const* rows,
    int64_t nrows, float* out, int64_t ldc, const float* bias, bool accumulate, int ncols,
    const float* res, Act act) {
  tile512<MR, KW>(q, tap, a, rows, nrows, out, ldc, bias, accumulate, ncols, res, act);
}

template <int MR, int KW>
__attribute__((target("avx2,fma"))) void tile_call(const ConvGeom& q, const int64_t* tap,
                                                   const float* a, const float* const* rows,
                                                   int64_t nrows, float* out, int64_t ldc,
                                                   const float* bias, bool accumulate,
                                                   int ncols, const float* res, Act act) {
  tile<MR, KW>(q, tap, a, rows, nrows, out, ldc, bias, accumulate, ncols, res, act);
}

using TileFn = void (*)(const ConvGeom&, const int64_t*, const float*, const float* const*,
                        int64_t, float*, int64_t, const float*, bool, int, const float*, Act);
template <int KW, int... MR>
constexpr std::array<TileFn, kMR + 1> tiles_of(std::integer_sequence<int, 0, MR...>) {
  return {nullptr, tile_call<MR, KW>...};
}
template <int KW, int... MR>
constexpr std::array<TileFn, kMR512 + 1> tiles512_of(std::integer_sequence<int, 0, MR...>) {
  return {nullptr, tile512_call<MR, KW>...};
}
// per row count 1..strip: the tile function for kernel width KW (0: read at run time)
template <int KW>
constexpr std::array<TileFn, kMR + 1> kTilesFor =
    tiles_of<KW>(std::make_integer_sequence<int, kMR + 1>());
template <int KW>
constexpr std::array<TileFn, kMR512 + 1> kTiles512For =
    tiles512_of<KW>(std::make_integer_sequence<int, kMR512 + 1>());

// The tiles of one ISA: `fn[mr]` computes mr (1..strip) output channels.
struct Tiles {
  int strip;
  const TileFn* fn;
};

// the tiles for a kernel width (1 and 3 unrolled, others read it at run time), on AVX-512
// where the CPU has it
inline Tiles tiles_for(int64_t kw, bool avx512) {
  if (avx512)
    return {kMR512, kw == 3   ? kTiles512For<3>.data()
                    : kw == 1 ? kTiles512For<1>.data()
                              : kTiles512For<0>.data()};
  return {kMR, kw == 3 ? kTilesFor<3>.data() : kw == 1 ? kTilesFor<1>.data() : kTilesFor<0>.data()};
}

// channels per block: a block's weights (6 rows) and input rows stay in L1 together
inline int64_t channel_block(const ConvGeom& q) {
  return std::max<int64_t>(1, 288 / (q.KH * q.KW));
}

// Output panels [t0, t1) of one image and group: panel t covers output row t / per_row,
// columns from (t % per_row) * 16. xp: the group's padded channels; wp: its packed weights;
// out: its first output channel; res (null for none), act: the epilogue, res laid out as out.
inline void conv_panels(const ConvGeom& q, const Padded& pd, Tiles tiles, const float* xp,
                        const float* wp, const float* bias, float* out, int64_t t0, int64_t t1,
                        const float* res = nullptr, Act act = kActNone) {
  const int64_t P = q.OH * q.OW, Kd = q.Cg * q.KH * q.KW;
  const int64_t per_row = (q.OW + kNR - 1) / kNR;
  thread_local std::vector<const float*> rows;
  rows.resize(q.Cg * q.KH);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t oh = t / per_row, ow0 = (t % per_row) * kNR;
    const int ncols = static_cast<int>(std::min<int64_t>(kNR, q.OW - ow0));
    for (int64_t c = 0; c < q.Cg; ++c)
      for (int64_t kh = 0; kh < q.KH; ++kh) {
        const int64_t ih = oh * q.sh + kh * q.dh;  // padded coordinates
        const bool pad_row = ih < q.pt || ih >= q.pt + q.H;
        rows[c * q.KH + kh] =
            pad_row ? nullptr : xp + c * pd.channel_floats() + ih * pd.row_floats + ow0;
      }
    const int64_t cb = channel_block(q), KK = q.KH * q.KW;
    for (int64_t c0 = 0; c0 < q.Cg; c0 += cb) {
      const int64_t c1 = std::min(q.Cg, c0 + cb);
      const float* a = wp;
      const bool last = c1 == q.Cg;  // the epilogue goes with the last channel block
      const Strips strips(q.Og, tiles.strip);
      for (int64_t s = 0; s < strips.n; ++s) {
        const int64_t o0 = strips.first(s), mr = strips.rows(s);
        const int64_t at = o0 * P + oh * q.OW + ow0;
        tiles.fn[mr](q, pd.tap.data(), a + c0 * KK * mr, rows.data() + c0 * q.KH,
                  (c1 - c0) * q.KH, out + at, P,
                  c0 == 0 && bias != nullptr ? bias + o0 : nullptr, c0 > 0, ncols,
                  last && res != nullptr ? res + at : nullptr, last ? act : kActNone);
        a += mr * Kd;
      }
    }
  }
}

}  // namespace mtc
