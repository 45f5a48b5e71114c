// Attention per head, fused: out[b] = softmax(scale * (q[b] @ kt[b])) @ v[b], with q [..., S, D],
// kt [..., D, T] (the keys transposed, as the importer leaves them), v [..., T, E], b over the
// leading dims. Rows of q in
// blocks of kRows over the pool; a block's scores (kRows x T) stay in the task's buffer and
// never reach memory as a tensor (the unfused graph wrote and read them four times: matmul,
// scale, softmax, matmul), and one call replaces four. The table row "attention".
#include <algorithm>
#include <array>
#include <utility>
#include <immintrin.h>
#include <cstdint>
#include <vector>

#include "call.h"
#include "rows_avx2.h"

namespace mtc {
namespace {

constexpr int64_t kRows = 16;  // query rows per task unit

// rows [0, nr) of one head: s is an nr x T buffer; the loops run over contiguous rows of kt
// and v, vectorized by the compiler for the target of the caller
inline __attribute__((always_inline)) void attention_body(const float* q, const float* kt,
                                                          const float* v, float scale,
                                                          int64_t nr, int64_t D, int64_t T,
                                                          int64_t E, float* s, float* o,
                                                          bool avx2) {
  for (int64_t i = 0; i < nr; ++i) {
    float* __restrict si = s + i * T;
    std::fill(si, si + T, 0.f);
    for (int64_t d = 0; d < D; ++d) {
      const float a = q[i * D + d];
      const float* __restrict kr = kt + d * T;
      for (int64_t t = 0; t < T; ++t) si[t] += a * kr[t];
    }
    for (int64_t t = 0; t < T; ++t) si[t] *= scale;  // as the graph: the product, then scaled
    if (avx2)
      softmax_row_avx2(si, si, T);
    else
      softmax_row_generic(si, si, T);
    float* __restrict oi = o + i * E;
    std::fill(oi, oi + E, 0.f);
    for (int64_t t = 0; t < T; ++t) {
      const float p = si[t];
      const float* __restrict vr = v + t * E;
      for (int64_t e = 0; e < E; ++e) oi[e] += p * vr[e];
    }
  }
}

__attribute__((target("avx2,fma"))) void attention_rows_avx2(const float* q, const float* kt,
                                                             const float* v, float scale,
                                                             int64_t nr, int64_t D, int64_t T,
                                                             int64_t E, float* s, float* o) {
  attention_body(q, kt, v, scale, nr, D, T, E, s, o, true);
}

// c[MR x 16] = a[MR x K] @ b[K x 16 of ldb], ncols valid columns (masked): the rows' sums
// in registers, one load of b per k
template <int MR>
__attribute__((target("avx512f,avx2,fma"))) void tile512(int64_t K, const float* a,
                                                         int64_t lda, const float* b,
                                                         int64_t ldb, float* c, int64_t ldc,
                                                         int ncols) {
  const __mmask16 m = static_cast<__mmask16>((1u << ncols) - 1);
  __m512 acc[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 bv = _mm512_maskz_loadu_ps(m, b + k * ldb);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(a[i * lda + k]), bv, acc[i]);
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) _mm512_mask_storeu_ps(c + i * ldc, m, acc[i]);
}

using Tile512 = void (*)(int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t,
                         int);
template <int... MR>
constexpr std::array<Tile512, sizeof...(MR) + 1> tiles512(std::integer_sequence<int, MR...>) {
  return {nullptr, tile512<MR + 1>...};
}
constexpr auto kTiles512 = tiles512(std::make_integer_sequence<int, kRows>());

// c[nr x N] = a[nr x K] @ b[K x N] (row strides lda, ldb, ldc), in 16-column tiles
void gemm512(int64_t nr, int64_t N, int64_t K, const float* a, int64_t lda, const float* b,
             int64_t ldb, float* c, int64_t ldc) {
  for (int64_t n0 = 0; n0 < N; n0 += 16)
    kTiles512[nr](K, a, lda, b + n0, ldb, c + n0, ldc,
                  static_cast<int>(std::min<int64_t>(16, N - n0)));
}

__attribute__((target("avx512f,avx2,fma"))) void attention_rows_avx512(
    const float* q, const float* kt, const float* v, float scale, int64_t nr, int64_t D,
    int64_t T, int64_t E, float* s, float* o) {
  gemm512(nr, T, D, q, D, kt, T, s, T);
  for (int64_t i = 0; i < nr; ++i) {
    float* si = s + i * T;
    for (int64_t t = 0; t < T; ++t) si[t] *= scale;  // as the graph: the product, then scaled
    softmax_row_avx2(si, si, T);
  }
  gemm512(nr, E, T, s, T, v, E, o, E);
}

void attention_rows_generic(const float* q, const float* kt, const float* v, float scale,
                            int64_t nr, int64_t D, int64_t T, int64_t E, float* s, float* o) {
  attention_body(q, kt, v, scale, nr, D, T, E, s, o, false);
}

// q [..., S, D], kt [..., D, T], v [..., T, E], out [..., S, E] with the same leading dims
// (heads, and the tenants of a horizontally fused call); returns their product B
int64_t check_attention(const Call& c) {
  const TensorView q = c.in(0), kt = c.in(1), v = c.in(2), sc = c.in(3), out = c.out();
  check_tensor(c.op, "q", q, 3, 8);
  check_tensor(c.op, "kt", kt, 3, 8);
  check_tensor(c.op, "v", v, 3, 8);
  check_tensor(c.op, "scale", sc, 1, 1);
  check_tensor(c.op, "out", out, 3, 8);
  const int r = q.ndim();
  bool ok = kt.ndim() == r && v.ndim() == r && out.ndim() == r && sc.size(0) == 1;
  int64_t B = 1;
  for (int i = 0; ok && i + 2 < r; ++i) {
    ok = kt.size(i) == q.size(i) && v.size(i) == q.size(i) && out.size(i) == q.size(i);
    B *= q.size(i);
  }
  ok = ok && kt.size(r - 2) == q.size(r - 1) && v.size(r - 2) == kt.size(r - 1) &&
       out.size(r - 2) == q.size(r - 2) && out.size(r - 1) == v.size(r - 1);
  if (!ok)
    TVM_FFI_THROW(ValueError) << c.op << ": q " << shape_str(q) << ", kt " << shape_str(kt)
                              << ", v " << shape_str(v) << ", scale " << shape_str(sc)
                              << " and out " << shape_str(out) << " do not fit (expected [..., S, "
                              << "D], [..., D, T], [..., T, E], [1] and [..., S, E])";
  return B;
}

}  // namespace

void attention_run(const Call& c) {
  const int64_t B = check_attention(c);
  const TensorView q = c.in(0), kt = c.in(1), v = c.in(2), out = c.out();
  const int r = q.ndim();
  const int64_t S = q.size(r - 2), D = q.size(r - 1), T = kt.size(r - 1), E = v.size(r - 1);
  if (B == 0 || S == 0 || E == 0) return;
  const float *pq = fdata(q), *pk = fdata(kt), *pv = fdata(v);
  const float scale = fdata(c.in(3))[0];
  float* po = fdata_mut(out);
  const int64_t blocks = (S + kRows - 1) / kRows, units = B * blocks;
  parallel(B * S * T * (D + E), units, [&](int64_t task, int64_t ntask) {
    thread_local std::vector<float> scores;
    if (scores.size() < static_cast<size_t>(kRows * T)) scores.resize(kRows * T);
    auto [u0, u1] = part(units, task, ntask, 1);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / blocks, i0 = (u % blocks) * kRows, nr = std::min(kRows, S - i0);
      (kHasAvx512 ? attention_rows_avx512
       : kHasAvx2 ? attention_rows_avx2
                  : attention_rows_generic)(
          pq + (b * S + i0) * D, pk + b * D * T, pv + b * T * E, scale, nr, D, T, E,
          scores.data(), po + (b * S + i0) * E);
    }
  });
}

}  // namespace mtc
