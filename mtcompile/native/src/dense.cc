// matmul (numpy semantics, on the BLAS) and dense on a packed weight (AVX2/AVX-512 tiles of
// dense_avx2.h; bfloat16 pairs on AVX-512 BF16: dense_bf16.h): the kernels of table row
// "matmul" and its "packed" and "bf16" variants; and a patch
// embedding (conv2d's "patch" variant) as a dense layer on its patches.
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "call.h"
#include "dense_bf16.h"

namespace mtc {
namespace {

// ---------------------------------------------------------------- matmul
// the shapes of out = a @ b (numpy matmul: 1-D operands, broadcast batch dims)
struct MatmulShape {
  int64_t M, K, N;
  int nb;                              // batch dims
  std::vector<int64_t> batch, sa, sb;  // batch shape; element strides in a and b (0: broadcast)
  int64_t nbatch = 1, rows;            // batches; rows per batch (all of them when folded)
  bool fold = true;                    // b shared by every batch and a contiguous over them
};

std::vector<int64_t> matmul_batch(const char* op, const TensorView& a, const TensorView& b) {
  const int ra = a.ndim(), rb = b.ndim();
  const int ba = std::max(ra - 2, 0), bb = std::max(rb - 2, 0), nb = std::max(ba, bb);
  std::vector<int64_t> batch(nb);
  for (int i = 0; i < nb; ++i) {
    int ia = i - (nb - ba), ib = i - (nb - bb);
    int64_t da = ia >= 0 ? a.size(ia) : 1, db = ib >= 0 ? b.size(ib) : 1;
    if (da != db && da != 1 && db != 1)
      TVM_FFI_THROW(ValueError) << op << ": batch dimensions do not broadcast: a "
                                << shape_str(a) << ", b " << shape_str(b);
    batch[i] = std::max(da, db);
  }
  return batch;
}

void matmul_check_out(const char* op, const TensorView& a, const TensorView& b,
                      const TensorView& out, const MatmulShape& s) {
  std::vector<int64_t> want(s.batch);
  if (a.ndim() > 1) want.push_back(s.M);
  if (b.ndim() > 1) want.push_back(s.N);
  bool ok = out.ndim() == static_cast<int>(want.size());
  for (size_t i = 0; ok && i < want.size(); ++i) ok = out.size(i) == want[i];
  if (ok) return;
  std::string w = "[";
  for (size_t i = 0; i < want.size(); ++i) w += (i ? ", " : "") + std::to_string(want[i]);
  TVM_FFI_THROW(ValueError) << op << ": out has shape " << shape_str(out) << ", expected " << w
                            << "] for a " << shape_str(a) << " @ b " << shape_str(b);
}

void matmul_strides(const TensorView& a, const TensorView& b, MatmulShape& s) {
  const int ra = a.ndim(), rb = b.ndim(), nb = s.nb;
  const int ba = std::max(ra - 2, 0), bb = std::max(rb - 2, 0);
  s.sa.assign(nb, 0), s.sb.assign(nb, 0);
  int64_t stA = s.M * s.K, stB = s.K * s.N;
  for (int i = nb - 1; i >= 0; --i) {
    int ia = i - (nb - ba), ib = i - (nb - bb);
    if (ia >= 0) {
      s.sa[i] = a.size(ia) == 1 ? 0 : stA;
      stA *= a.size(ia);
    }
    if (ib >= 0) {
      s.sb[i] = b.size(ib) == 1 ? 0 : stB;
      stB *= b.size(ib);
    }
  }
  for (int64_t d : s.batch) s.nbatch *= d;
  for (int i = 0; i < nb; ++i) s.fold = s.fold && s.sb[i] == 0 && (s.batch[i] == 1 || s.sa[i] != 0);
  s.rows = s.M;
  if (s.fold) {
    s.rows = s.M * s.nbatch;
    s.nbatch = 1;
  }
}

MatmulShape matmul_shape(const char* op, const TensorView& a, const TensorView& b,
                         const TensorView& out, int64_t nbias, bool bias) {
  const int ra = a.ndim(), rb = b.ndim();
  MatmulShape s;
  s.M = ra == 1 ? 1 : a.size(ra - 2), s.K = a.size(ra - 1);
  const int64_t Kb = rb == 1 ? b.size(0) : b.size(rb - 2);
  s.N = rb == 1 ? 1 : b.size(rb - 1);
  if (s.K != Kb)
    TVM_FFI_THROW(ValueError) << op << ": inner dimensions differ: a " << shape_str(a) << ", b "
                              << shape_str(b);
  s.batch = matmul_batch(op, a, b);
  s.nb = static_cast<int>(s.batch.size());
  matmul_check_out(op, a, b, out, s);
  if (bias && nbias != s.N)
    TVM_FFI_THROW(ValueError) << op << ": bias has " << nbias << " values, out has " << s.N
                              << " columns";
  matmul_strides(a, b, s);
  return s;
}

// task `task` of `ntask`: tiles of batches x row blocks x column blocks, given out in
// contiguous runs to the tasks
void matmul_task(const MatmulShape& s, const float* pa, const float* pb, const float* bias,
                 float* pc, const Epilogue& ep, int64_t task, int64_t ntask) {
  const int64_t rows = s.rows, N = s.N, K = s.K, nbatch = s.nbatch;
  // split rows when there are enough (8-row aligned), else columns (16-aligned), else batches
  int64_t per_batch_parts = 1;
  bool by_rows = true;
  if (nbatch < ntask) {
    per_batch_parts = (ntask + nbatch - 1) / nbatch;
    by_rows = rows >= 8 * per_batch_parts || N < 16 * per_batch_parts;
  }
  const int64_t tiles = nbatch * per_batch_parts;
  auto [t0, t1] = part(tiles, task, ntask, 1);
  for (int64_t t = t0; t < t1; ++t) {
    int64_t bi = t / per_batch_parts, pi = t % per_batch_parts;
    int64_t r0 = 0, r1 = rows, c0 = 0, c1 = N;
    if (by_rows)
      std::tie(r0, r1) = part(rows, pi, per_batch_parts, 8);
    else
      std::tie(c0, c1) = part(N, pi, per_batch_parts, 16);
    int64_t oa = 0, ob = 0, rem = bi;
    for (int i = s.nb - 1; i >= 0 && !s.fold; --i) {
      int64_t idx = rem % s.batch[i];
      rem /= s.batch[i];
      oa += idx * s.sa[i];
      ob += idx * s.sb[i];
    }
    float* c = pc + bi * rows * N + r0 * N + c0;
    if (bias) {
      for (int64_t r = r0; r < r1; ++r)
        std::memcpy(pc + bi * rows * N + r * N + c0, bias + c0, (c1 - c0) * sizeof(float));
    }
    sgemm(r1 - r0, c1 - c0, K, pa + oa + r0 * K, K, pb + ob + c0, N, bias ? 1.f : 0.f, c, N);
    finish_block(ep, pc, bi * rows * N + r0 * N + c0, N, r1 - r0, c1 - c0);
  }
}

// out = a @ b (numpy matmul), optional bias along the last axis of out, then the epilogue
void matmul_impl(const char* op, TensorView a, TensorView b, const float* bias, int64_t nbias,
                 TensorView out, const Epilogue& ep) {
  check_tensor(op, "a", a, 1, 8);
  check_tensor(op, "b", b, 1, 8);
  check_tensor(op, "out", out, 0, 8);
  const MatmulShape s = matmul_shape(op, a, b, out, nbias, bias != nullptr);
  if (s.rows == 0 || s.N == 0 || s.nbatch == 0) return;
  const float* pa = fdata(a);
  const float* pb = fdata(b);
  float* pc = fdata_mut(out);
  const int64_t work = s.nbatch * s.rows * s.N * s.K;
  parallel(work, std::max<int64_t>(s.nbatch, s.rows / 8 + 1) * std::max<int64_t>(1, s.N / 16),
           [&](int64_t task, int64_t ntask) { matmul_task(s, pa, pb, bias, pc, ep, task, ntask); });
}

// ---------------------------------------------------------------- dense on a packed weight
// out[..., n] = a[..., :] @ w[:, n] (+ bias[n]) with w packed at build time as 16-column
// panels wp[N/16][K][16] (see dense_avx2.h; mtcompile.native.pack_dense packs it), or as
// bfloat16 pairs wp[N/16][ceil(K/2)][16 x 2] (the "bf16" variant: dense_bf16.h,
// mtcompile.native.pack_dense_bf16). A 4-D wp [B][...] is B such weights, one per slice of
// a's first dimension (the stacked weights of horizontally fused tenants): out[b] = a[b] @
// w[b] (+ bias[b * N + n] where the bias has N values per weight).
void dense_packed_check(const char* op, TensorView a, TensorView wp, int64_t nbias,
                        TensorView out, bool bf16) {
  check_tensor(op, "a", a, 1, 8);
  check_tensor(op, "packed weight", wp, 3, 4, bf16 ? kUint16 : kFloat32);
  check_tensor(op, "out", out, 1, 8);
  const int w0 = wp.ndim() - 3;  // a batch of weights: their count first
  const int64_t K = a.size(a.ndim() - 1), N = out.size(out.ndim() - 1);
  const int64_t panels = (N + kDenseNR - 1) / kDenseNR;
  const int64_t depth = bf16 ? (K + 1) / 2 : K, width = bf16 ? 2 * kDenseNR : kDenseNR;
  if (wp.size(w0) != panels || wp.size(w0 + 1) != depth || wp.size(w0 + 2) != width ||
      (w0 == 1 && (a.ndim() < 2 || a.size(0) != wp.size(0))))
    TVM_FFI_THROW(ValueError) << op << ": packed weight has shape " << shape_str(wp)
                              << ", expected [" << (w0 ? "a's first dimension, " : "")
                              << panels << ", " << depth << ", " << width << "] for a "
                              << shape_str(a) << " and out " << shape_str(out);
  bool ok = out.ndim() == a.ndim();
  for (int i = 0; ok && i + 1 < a.ndim(); ++i) ok = out.size(i) == a.size(i);
  if (!ok)
    TVM_FFI_THROW(ValueError) << op << ": out has shape " << shape_str(out) << ", expected a's "
                              << shape_str(a) << " with the last dimension " << N;
  if (nbias >= 0 && nbias != N && !(w0 == 1 && nbias == wp.size(0) * N))
    TVM_FFI_THROW(ValueError) << op << ": bias has " << nbias << " values, out has " << N
                              << " columns"
                              << (w0 ? " (a stacked weight takes N values, or N per weight)"
                                     : "");
}

// panels [p0, p1) of rows [r0, r0 + nr) of one weight's slice: a, out at that slice, wp at
// panel p0; `at`: the slice's first element in out (for the residual)
void dense_packed_tile(int64_t r0, int64_t nr, int64_t K, int64_t N, const float* pa,
                       const float* pw, const float* bias, float* pc, int64_t p0, int64_t p1,
                       const Epilogue& ep, int64_t at) {
  if (kHasAvx2) {
    dense_panels(kHasAvx512, nr, K, N, pa + r0 * K, pw, bias, pc + r0 * N, p0, p1,
                 ep.res_at(at + r0 * N), ep.act);
    return;
  }
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n0 = p * kDenseNR, nc = std::min<int64_t>(kDenseNR, N - n0);
    float* c = pc + r0 * N + n0;
    if (bias)
      for (int64_t r = 0; r < nr; ++r) std::memcpy(c + r * N, bias + n0, nc * sizeof(float));
    sgemm(nr, nc, K, pa + r0 * K, K, pw + (p - p0) * K * kDenseNR, kDenseNR, bias ? 1.f : 0.f,
          c, N);
    finish_block(ep, pc - at, at + r0 * N + n0, N, nr, nc);
  }
}

// as dense_packed_tile on a bfloat16 weight (pw: panel p0's pairs)
void dense_bf16_tile(int64_t r0, int64_t nr, int64_t K, int64_t N, const float* pa,
                     const uint32_t* pw, const float* bias, float* pc, int64_t p0, int64_t p1,
                     const Epilogue& ep, int64_t at) {
  const int64_t K2 = (K + 1) / 2;
  if (kHasAvx512Bf16) {
    thread_local std::vector<uint32_t> ab;  // the rows as bfloat16 pairs
    if (ab.size() < static_cast<size_t>(nr * K2)) ab.resize(nr * K2);
    bf16_pairs(pa + r0 * K, nr, K, ab.data());
    dense_panels_bf16(nr, K2, N, ab.data(), pw, bias, pc + r0 * N, p0, p1,
                      ep.res_at(at + r0 * N), ep.act);
    return;
  }
  // elsewhere the same rounded values through the float32 tiles, a panel at a time
  thread_local std::vector<float> af, wf;
  if (af.size() < static_cast<size_t>(nr * K)) af.resize(nr * K);
  if (wf.size() < static_cast<size_t>(K * kDenseNR)) wf.resize(K * kDenseNR);
  for (int64_t i = 0; i < nr * K; ++i) af[i] = from_bf16(to_bf16(pa[r0 * K + i]));
  for (int64_t p = p0; p < p1; ++p) {
    const uint32_t* panel = pw + (p - p0) * K2 * kDenseNR;
    for (int64_t k = 0; k < K; ++k)
      for (int j = 0; j < kDenseNR; ++j)
        wf[k * kDenseNR + j] = from_bf16((panel[k / 2 * kDenseNR + j] >> (k % 2 * 16)) & 0xffff);
    dense_packed_tile(0, nr, K, N, af.data(), wf.data(), bias, pc + r0 * N, p, p + 1, ep,
                      at + r0 * N);
  }
}

// the tiles of a dense layer on B stacked weights of `rows` rows each over the pool, row
// blocks x panels: tile(b, r0, nr, p0, p1) computes panels [p0, p1) of rows [r0, r0 + nr) of
// slice b
template <typename Tile>
void dense_row_blocks(int64_t B, int64_t rows, int64_t K, int64_t N, const Tile& tile) {
  const int64_t panels = (N + kDenseNR - 1) / kDenseNR;
  // row blocks whose activations (rows x K) stay in L2 while the panels stream past them, of
  // near-equal height: the tasks take runs of tiles in block order, so a short last block
  // (197 rows: 168 + 29) left one thread most of the work
  const int64_t most = std::max<int64_t>(
      kDenseMR, (32768 / std::max<int64_t>(K, 1)) / kDenseMR * kDenseMR);
  const int64_t blocks = (rows + most - 1) / most, rb = (rows + blocks - 1) / blocks;
  const int64_t tiles = B * blocks * panels;
  parallel(B * rows * N * K, tiles, [&](int64_t task, int64_t ntask) {
    auto [t0, t1] = part(tiles, task, ntask, 1);
    for (int64_t t = t0; t < t1;) {  // a task's run may span row blocks and weights
      const int64_t u = t / panels, end = std::min(t1, (u + 1) * panels);
      const int64_t b = u / blocks, r0 = (u % blocks) * rb;
      tile(b, r0, std::min(rb, rows - r0), t - u * panels, end - u * panels);
      t = end;
    }
  });
}

// out[b] = a[b] @ w[b] (+ bias) for B stacked weights (B = 1: one weight), wp float32
// panels or (bf16) bfloat16 pairs; a bias of N values per weight where nbias != N
template <typename W>
void dense_packed_rows(int64_t B, int64_t rows, int64_t K, int64_t N, const float* pa,
                       const W* pw, const float* bias, int64_t nbias, float* pc,
                       const Epilogue& ep) {
  constexpr bool bf16 = std::is_same_v<W, uint32_t>;
  const int64_t panels = (N + kDenseNR - 1) / kDenseNR, depth = bf16 ? (K + 1) / 2 : K;
  dense_row_blocks(B, rows, K, N, [&](int64_t b, int64_t r0, int64_t nr, int64_t p0, int64_t p1) {
    const int64_t at = b * rows * N;
    const W* w = pw + (b * panels + p0) * depth * kDenseNR;
    const float* bb = bias != nullptr && nbias != N ? bias + b * N : bias;
    if constexpr (bf16)
      dense_bf16_tile(r0, nr, K, N, pa + b * rows * K, w, bb, pc + at, p0, p1, ep, at);
    else
      dense_packed_tile(r0, nr, K, N, pa + b * rows * K, w, bb, pc + at, p0, p1, ep, at);
  });
}

void dense_packed_impl(const char* op, TensorView a, TensorView wp, const float* bias,
                       int64_t nbias, TensorView out, const Epilogue& ep, bool bf16) {
  dense_packed_check(op, a, wp, bias != nullptr ? nbias : -1, out, bf16);
  const int64_t B = wp.ndim() == 4 ? wp.size(0) : 1;
  const int64_t K = a.size(a.ndim() - 1), N = out.size(out.ndim() - 1);
  const int64_t rows = (K == 0 ? out.numel() / std::max<int64_t>(N, 1) : a.numel() / K) / B;
  if (rows == 0 || N == 0) return;
  if (bf16)
    dense_packed_rows(B, rows, K, N, fdata(a),
                      reinterpret_cast<const uint32_t*>(
                          static_cast<const char*>(wp.data_ptr()) + wp.byte_offset()),
                      bias, nbias, fdata_mut(out), ep);
  else
    dense_packed_rows(B, rows, K, N, fdata(a), fdata(wp), bias, nbias, fdata_mut(out), ep);
}

// ---------------------------------------------------------------- patch embedding
// a patch call's tensors and parameters checked (wp: float32 panels, or with bf16 bfloat16
// pairs); its geometry: N, C, OH, OW, KH, KW
std::array<int64_t, 6> patch_geom(const char* op, TensorView x, TensorView wp, int64_t nbias,
                                  const tvm::ffi::Shape& params, TensorView out, bool bf16) {
  check_tensor(op, "x", x, 4, 4);
  check_tensor(op, "packed weight", wp, 3, 3, bf16 ? kUint16 : kFloat32);
  check_tensor(op, "out", out, 4, 4);
  if (params.size() != 9 || params[2] || params[3] || params[4] || params[5] ||
      params[6] != 1 || params[7] != 1 || params[8] != 1 || params[0] < 1 || params[1] < 1) {
    std::string found;
    for (size_t i = 0; i < params.size(); ++i) found += (i ? ", " : "") + std::to_string(params[i]);
    TVM_FFI_THROW(ValueError) << op << ": the patch form takes a stride (the kernel's size), no "
                              << "padding, dilation 1 and one group; found params [" << found
                              << "] (stride h/w, padding t/l/b/r, dilation h/w, groups)";
  }
  const int64_t N = x.size(0), C = x.size(1), KH = params[0], KW = params[1];
  const int64_t OH = x.size(2) / KH, OW = x.size(3) / KW, O = out.size(1), K = C * KH * KW;
  const int64_t panels = (O + kDenseNR - 1) / kDenseNR;
  const int64_t depth = bf16 ? (K + 1) / 2 : K, width = bf16 ? 2 * kDenseNR : kDenseNR;
  if (wp.size(0) != panels || wp.size(1) != depth || wp.size(2) != width)
    TVM_FFI_THROW(ValueError) << op << ": packed weight has shape " << shape_str(wp)
                              << ", expected [" << panels << ", " << depth << ", " << width
                              << "] for x " << shape_str(x) << " and out " << shape_str(out);
  if (out.size(0) != N || out.size(2) != OH || out.size(3) != OW)
    TVM_FFI_THROW(ValueError) << op << ": out has shape " << shape_str(out) << ", expected ["
                              << N << ", " << O << ", " << OH << ", " << OW << "]";
  if (nbias >= 0 && nbias != O)
    TVM_FFI_THROW(ValueError) << op << ": bias has " << nbias << " values, out has " << O
                              << " channels";
  return {N, C, OH, OW, KH, KW};
}

// conv2d[patch]: a conv whose stride is its kernel, unpadded, undilated, one group (a ViT's
// patch embedding), as a dense layer on its patches: a[(n, oh, ow), (c, kh, kw)] =
// x[n, c, oh * KH + kh, ow * KW + kw] times the weight [O, C * KH * KW] transposed and packed
// at build time as dense_packed's panels (W = uint32_t: dense_bf16's pairs, the "patch_bf16"
// variant); the result [N * OH * OW, O] is then transposed into out [N, O, OH, OW]. (The
// direct conv would use 6 of 16 lanes on a 6-patch-wide output, and im2col + BLAS repacks
// the weight on every call.)
template <typename W>
void conv2d_patch_impl(const Call& c) {
  const TensorView x = c.in(0), wp = c.in(1), out = c.out();
  const auto [N, C, OH, OW, KH, KW] = patch_geom(c.op, x, wp, c.bias != nullptr ? c.nbias : -1,
                                                 c.params, out, std::is_same_v<W, uint32_t>);
  const int64_t H = x.size(2), Wd = x.size(3), O = out.size(1), K = C * KH * KW, P = OH * OW;
  if (N * P == 0 || O == 0) return;
  thread_local std::vector<float> a, ct;  // the calling thread's patches and result
  if (a.size() < static_cast<size_t>(N * P * K)) a.resize(N * P * K);
  if (ct.size() < static_cast<size_t>(N * P * O)) ct.resize(N * P * O);
  const float* px = fdata(x);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t oh = 0; oh < OH; ++oh)
      for (int64_t ow = 0; ow < OW; ++ow) {
        float* row = a.data() + ((n * OH + oh) * OW + ow) * K;
        for (int64_t ch = 0; ch < C; ++ch)
          for (int64_t kh = 0; kh < KH; ++kh)
            std::memcpy(row + (ch * KH + kh) * KW,
                        px + ((n * C + ch) * H + oh * KH + kh) * Wd + ow * KW, KW * sizeof(float));
      }
  const auto* w = reinterpret_cast<const W*>(static_cast<const char*>(wp.data_ptr()) +
                                             wp.byte_offset());
  dense_packed_rows(1, N * P, K, O, a.data(), w, c.bias, O, ct.data(), Epilogue{});
  float* po = fdata_mut(out);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < O; ++o)
      for (int64_t p = 0; p < P; ++p) po[(n * O + o) * P + p] = ct[(n * P + p) * O + o];
  finish_block(c.ep, po, 0, P, N * O, P);
}

}  // namespace

void matmul_run(const Call& c) {
  TensorView w = c.in(1);
  if (c.bias != nullptr) check_tensor(c.op, "weight", w, 2, 2);  // addmm's 2-D weight
  matmul_impl(c.op, c.in(0), w, c.bias, c.nbias, c.out(), c.ep);
}

void dense_packed_run(const Call& c) {
  dense_packed_impl(c.op, c.in(0), c.in(1), c.bias, c.nbias, c.out(), c.ep, false);
}

void dense_bf16_run(const Call& c) {
  dense_packed_impl(c.op, c.in(0), c.in(1), c.bias, c.nbias, c.out(), c.ep, true);
}

void conv2d_patch_run(const Call& c) { conv2d_patch_impl<float>(c); }

void conv2d_patch_bf16_run(const Call& c) { conv2d_patch_impl<uint32_t>(c); }

}  // namespace mtc
