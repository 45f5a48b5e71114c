// Native heavy kernels (float32 matmul, matmul+bias, conv2d, conv2d+bias, dense on a packed
// weight; the bias kernels optionally with an epilogue: ReLU or GELU, a residual added, see
// epilogue.h) on AVX2/FMA register tiles or a single-threaded BLAS sgemm, their work split
// across the run's one thread pool (pool.h), which also serves the generated kernels: it is
// registered as TVM's parallel-launch context symbols, so a library loaded after this one
// launches its parallel loops on it. Registered as TVM global functions;
// argument conventions match mtcompile/runtime/library.py (destination-passing: out is last).
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "conv_avx2.h"
#include "dense_avx2.h"
#include "epilogue.h"
#include "pool.h"
#include "rows_avx2.h"

#ifndef MTC_PREFIX
#define MTC_PREFIX "mtcompile.native."
#endif


#if defined(MTC_BLAS_MKL)
extern "C" {
void cblas_sgemm(int layout, int transa, int transb, int m, int n, int k, float alpha,
                 const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc);
int MKL_Set_Num_Threads_Local(int);
void MKL_Set_Num_Threads(int);
}
#define MTC_SGEMM cblas_sgemm
static void blas_single_thread() { MKL_Set_Num_Threads(1); }
#else
extern "C" {
void scipy_cblas_sgemm(int layout, int transa, int transb, int m, int n, int k, float alpha,
                       const float* a, int lda, const float* b, int ldb, float beta, float* c,
                       int ldc);
void scipy_openblas_set_num_threads(int);
}
#define MTC_SGEMM scipy_cblas_sgemm
static void blas_single_thread() { scipy_openblas_set_num_threads(1); }
#endif

namespace {

using tvm::ffi::TensorView;
constexpr int kRowMajor = 101, kNoTrans = 111;
// below this many multiply-adds a call runs on the calling thread: a parallel launch costs more
constexpr int64_t kSerialWork = 1 << 17;

// C[m x n] (+)= A[m x k] @ B[k x n], row-major with leading dimensions.
inline void sgemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                  int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k == 0) {
    if (beta == 0.f)
      for (int64_t i = 0; i < m; ++i) std::memset(c + i * ldc, 0, n * sizeof(float));
    return;
  }
  MTC_SGEMM(kRowMajor, kNoTrans, kNoTrans, static_cast<int>(m), static_cast<int>(n),
            static_cast<int>(k), 1.f, a, static_cast<int>(lda), b, static_cast<int>(ldb), beta, c,
            static_cast<int>(ldc));
}

// TVM's parallel-launch ABI on the calling thread's pool (pool.h)
std::atomic<int64_t> g_launches{0};  // parallel launches served, for tests and profiles
int PoolLaunch(FTVMParallelLambda f, void* cdata, int num_task) {
  g_launches.fetch_add(1, std::memory_order_relaxed);
  return mtc::thread_pool()->Launch(f, cdata, num_task);
}
int PoolBarrier(int, TVMParallelGroupEnv* penv) {
  auto* pool = static_cast<mtc::Pool*>(penv->sync_handle);
  return pool != nullptr ? pool->Barrier() : (penv->num_task > 1 ? -1 : 0);
}
using LaunchFn = int (*)(FTVMParallelLambda, void*, int);
// the process's one pool: this copy's, unless a copy of these kernels loaded earlier (the
// compiler's build of them, another bundle) registered its own first (see the init block)
LaunchFn g_launch = PoolLaunch;

// Run body(task, num_tasks) on the pool, or inline when the work is small.
template <typename F>
void parallel(int64_t work, int64_t max_tasks, const F& body) {
  if (work < kSerialWork || max_tasks <= 1) {
    body(0, 1);
    return;
  }
  struct Ctx {
    const F* body;
  } ctx{&body};
  auto lambda = [](int task_id, TVMParallelGroupEnv* penv, void* cdata) -> int {
    const Ctx* c = static_cast<const Ctx*>(cdata);
    (*c->body)(task_id, penv->num_task);
    return 0;
  };
  int rc = g_launch(lambda, &ctx, 0);
  if (rc != 0) TVM_FFI_THROW(RuntimeError) << "parallel launch failed (" << rc << ")";
}

// the AVX2/FMA kernels' CPU check, made during the library's static initialization (so the
// CPU model is set up first); without them the BLAS paths run. MTCOMPILE_NATIVE_GENERIC=1
// forces those paths (to test them on a CPU that has AVX2).
const bool kHasAvx2 = (__builtin_cpu_init(), __builtin_cpu_supports("avx2") &&
                                                 __builtin_cpu_supports("fma")) &&
                      std::getenv("MTCOMPILE_NATIVE_GENERIC") == nullptr;
// AVX-512 tiles where they pay (the direct conv, the packed dense); MTCOMPILE_NATIVE_AVX2
// keeps the AVX2 ones
const bool kHasAvx512 = kHasAvx2 && __builtin_cpu_supports("avx512f") &&
                        std::getenv("MTCOMPILE_NATIVE_AVX2") == nullptr;

// A kernel's epilogue (epilogue.h): act(result + res), res laid out as the kernel's output.
struct Epilogue {
  mtc::Act act = mtc::kActNone;
  const float* res = nullptr;
  // the residual at the output element `at` (null without one)
  const float* res_at(int64_t at) const { return res != nullptr ? res + at : nullptr; }
  bool any() const { return act != mtc::kActNone || res != nullptr; }
};

// the epilogue over a rows x cols block (row stride ld) of out, computed without it; at: the
// block's first element's index in out
void finish_block(const Epilogue& ep, float* out, int64_t at, int64_t ld, int64_t rows,
                  int64_t cols) {
  if (!ep.any()) return;
  (kHasAvx2 ? mtc::finish_block_avx2 : mtc::finish_block_generic)(out + at, ep.res_at(at), ld,
                                                                  rows, cols, ep.act);
}

// [begin, end) of part `i` of `n` equal parts of [0, total), boundaries rounded to `align`.
inline std::pair<int64_t, int64_t> part(int64_t total, int64_t i, int64_t n, int64_t align) {
  int64_t blocks = (total + align - 1) / align;
  int64_t b0 = blocks * i / n, b1 = blocks * (i + 1) / n;
  return {std::min(total, b0 * align), std::min(total, b1 * align)};
}

std::string shape_str(const TensorView& t) {
  std::string s = "[";
  for (int i = 0; i < t.ndim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

const float* fdata(const TensorView& t) {
  return reinterpret_cast<const float*>(static_cast<const char*>(t.data_ptr()) + t.byte_offset());
}
float* fdata_mut(const TensorView& t) {
  return reinterpret_cast<float*>(static_cast<char*>(t.data_ptr()) + t.byte_offset());
}

void check_tensor(const char* op, const char* what, const TensorView& t, int min_rank,
                  int max_rank) {
  DLDataType dt = t.dtype();
  if (dt.code != kDLFloat || dt.bits != 32 || dt.lanes != 1)
    TVM_FFI_THROW(TypeError) << op << ": " << what << " must be float32, found dtype code "
                             << int(dt.code) << " bits " << int(dt.bits) << " lanes "
                             << dt.lanes;
  if (t.device().device_type != kDLCPU)
    TVM_FFI_THROW(ValueError) << op << ": " << what << " must be on the CPU, found device type "
                              << t.device().device_type;
  if (t.ndim() < min_rank || t.ndim() > max_rank)
    TVM_FFI_THROW(ValueError) << op << ": " << what << " must have rank " << min_rank
                              << (min_rank == max_rank ? "" : "..." + std::to_string(max_rank))
                              << ", found shape " << shape_str(t);
  if (!t.IsContiguous())
    TVM_FFI_THROW(ValueError) << op << ": " << what << " must be contiguous (row-major), shape "
                              << shape_str(t);
  if (t.numel() > INT32_MAX)
    TVM_FFI_THROW(ValueError) << op << ": " << what << " has more than 2^31 elements";
}

// ---------------------------------------------------------------- matmul
// out = a @ b (numpy matmul: 1-D operands, broadcast batch dims), optional bias along the last
// axis of out.
void matmul_impl(const char* op, TensorView a, TensorView b, const float* bias, int64_t nbias,
                 TensorView out, const Epilogue& ep = {}) {
  check_tensor(op, "a", a, 1, 8);
  check_tensor(op, "b", b, 1, 8);
  check_tensor(op, "out", out, 0, 8);
  const int ra = a.ndim(), rb = b.ndim();
  const int64_t M = ra == 1 ? 1 : a.size(ra - 2), K = a.size(ra - 1);
  const int64_t Kb = rb == 1 ? b.size(0) : b.size(rb - 2), N = rb == 1 ? 1 : b.size(rb - 1);
  if (K != Kb)
    TVM_FFI_THROW(ValueError) << op << ": inner dimensions differ: a " << shape_str(a) << ", b "
                              << shape_str(b);
  // batch shape: broadcast of a's and b's leading dims
  const int ba = std::max(ra - 2, 0), bb = std::max(rb - 2, 0), nb = std::max(ba, bb);
  std::vector<int64_t> batch(nb), sa(nb, 0), sb(nb, 0);
  for (int i = 0; i < nb; ++i) {
    int ia = i - (nb - ba), ib = i - (nb - bb);
    int64_t da = ia >= 0 ? a.size(ia) : 1, db = ib >= 0 ? b.size(ib) : 1;
    if (da != db && da != 1 && db != 1)
      TVM_FFI_THROW(ValueError) << op << ": batch dimensions do not broadcast: a "
                                << shape_str(a) << ", b " << shape_str(b);
    batch[i] = std::max(da, db);
  }
  // expected out shape
  std::vector<int64_t> want(batch);
  if (ra > 1) want.push_back(M);
  if (rb > 1) want.push_back(N);
  bool ok = out.ndim() == static_cast<int>(want.size());
  for (size_t i = 0; ok && i < want.size(); ++i) ok = out.size(i) == want[i];
  if (!ok) {
    std::string w = "[";
    for (size_t i = 0; i < want.size(); ++i) w += (i ? ", " : "") + std::to_string(want[i]);
    TVM_FFI_THROW(ValueError) << op << ": out has shape " << shape_str(out) << ", expected " << w
                              << "] for a " << shape_str(a) << " @ b " << shape_str(b);
  }
  if (bias != nullptr && nbias != N)
    TVM_FFI_THROW(ValueError) << op << ": bias has " << nbias << " values, out has " << N
                              << " columns";
  // element strides of each batch dim in a and b (0 where broadcast)
  int64_t stA = M * K, stB = K * N;
  for (int i = nb - 1; i >= 0; --i) {
    int ia = i - (nb - ba), ib = i - (nb - bb);
    if (ia >= 0) {
      sa[i] = a.size(ia) == 1 ? 0 : stA;
      stA *= a.size(ia);
    }
    if (ib >= 0) {
      sb[i] = b.size(ib) == 1 ? 0 : stB;
      stB *= b.size(ib);
    }
  }
  int64_t nbatch = 1;
  for (int64_t d : batch) nbatch *= d;
  const float* pa = fdata(a);
  const float* pb = fdata(b);
  float* pc = fdata_mut(out);
  // b shared by every batch and a contiguous over them: one GEMM with the batch folded into M
  bool fold = true;
  for (int i = 0; i < nb; ++i) fold = fold && sb[i] == 0 && (batch[i] == 1 || sa[i] != 0);
  int64_t rows = M;
  if (fold) {
    rows = M * nbatch;
    nbatch = 1;
  }
  if (rows == 0 || N == 0 || nbatch == 0) return;
  // tiles: batches x row blocks x column blocks, given out in contiguous runs to the tasks
  const int64_t work = nbatch * rows * N * K;
  auto run = [&](int64_t task, int64_t ntask) {
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
      for (int i = nb - 1; i >= 0 && !fold; --i) {
        int64_t idx = rem % batch[i];
        rem /= batch[i];
        oa += idx * sa[i];
        ob += idx * sb[i];
      }
      float* c = pc + bi * rows * N + r0 * N + c0;
      if (bias) {
        for (int64_t r = r0; r < r1; ++r)
          std::memcpy(pc + bi * rows * N + r * N + c0, bias + c0, (c1 - c0) * sizeof(float));
      }
      sgemm(r1 - r0, c1 - c0, K, pa + oa + r0 * K, K, pb + ob + c0, N, bias ? 1.f : 0.f, c, N);
      finish_block(ep, pc, bi * rows * N + r0 * N + c0, N, r1 - r0, c1 - c0);
    }
  };
  parallel(work, std::max<int64_t>(nbatch, rows / 8 + 1) * std::max<int64_t>(1, N / 16), run);
}

void matmul(TensorView a, TensorView b, TensorView out) {
  matmul_impl("mtcompile.native.matmul", a, b, nullptr, 0, out);
}

void matmul_bias(TensorView a, TensorView w, TensorView bias, TensorView out) {
  const char* op = "mtcompile.native.matmul_bias";
  check_tensor(op, "weight", w, 2, 2);
  check_tensor(op, "bias", bias, 1, 1);
  matmul_impl(op, a, w, fdata(bias), bias.size(0), out);
}

// ---------------------------------------------------------------- dense on a packed weight
// out[..., n] = a[..., :] @ w[:, n] (+ bias[n]) with w packed at build time as 16-column
// panels wp[N/16][K][16] (see dense_avx2.h; mtcompile.backend.kernels.pack_dense packs it).
// A 4-D wp [B][N/16][K][16] is B such weights, one per slice of a's first dimension (the
// stacked weights of horizontally fused tenants): out[b] = a[b] @ w[b].
void dense_packed_check(const char* op, TensorView a, TensorView wp, int64_t nbias,
                        TensorView out) {
  check_tensor(op, "a", a, 1, 8);
  check_tensor(op, "packed weight", wp, 3, 4);
  check_tensor(op, "out", out, 1, 8);
  const int w0 = wp.ndim() - 3;  // a batch of weights: their count first
  const int64_t K = a.size(a.ndim() - 1), N = out.size(out.ndim() - 1);
  const int64_t panels = (N + mtc::kDenseNR - 1) / mtc::kDenseNR;
  if (wp.size(w0) != panels || wp.size(w0 + 1) != K || wp.size(w0 + 2) != mtc::kDenseNR ||
      (w0 == 1 && (a.ndim() < 2 || a.size(0) != wp.size(0))))
    TVM_FFI_THROW(ValueError) << op << ": packed weight has shape " << shape_str(wp)
                              << ", expected [" << (w0 ? "a's first dimension, " : "")
                              << panels << ", " << K << ", " << mtc::kDenseNR << "] for a "
                              << shape_str(a) << " and out " << shape_str(out);
  bool ok = out.ndim() == a.ndim();
  for (int i = 0; ok && i + 1 < a.ndim(); ++i) ok = out.size(i) == a.size(i);
  if (!ok)
    TVM_FFI_THROW(ValueError) << op << ": out has shape " << shape_str(out) << ", expected a's "
                              << shape_str(a) << " with the last dimension " << N;
  if (nbias >= 0 && nbias != N)
    TVM_FFI_THROW(ValueError) << op << ": bias has " << nbias << " values, out has " << N
                              << " columns";
}

// panels [p0, p1) of rows [r0, r0 + nr) of one weight's slice: a, wp, out at that slice
void dense_packed_tile(int64_t r0, int64_t nr, int64_t K, int64_t N, const float* pa,
                       const float* pw, const float* bias, float* pc, int64_t p0, int64_t p1,
                       const Epilogue& ep, int64_t at) {
  if (kHasAvx2) {
    mtc::dense_panels(kHasAvx512, nr, K, N, pa + r0 * K, pw, bias, pc + r0 * N, p0, p1,
                      ep.res_at(at + r0 * N), ep.act);
    return;
  }
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n0 = p * mtc::kDenseNR, nc = std::min<int64_t>(mtc::kDenseNR, N - n0);
    float* c = pc + r0 * N + n0;
    if (bias)
      for (int64_t r = 0; r < nr; ++r) std::memcpy(c + r * N, bias + n0, nc * sizeof(float));
    sgemm(nr, nc, K, pa + r0 * K, K, pw + p * K * mtc::kDenseNR, mtc::kDenseNR,
          bias ? 1.f : 0.f, c, N);
    finish_block(ep, pc - at, at + r0 * N + n0, N, nr, nc);
  }
}

void dense_packed_impl(const char* op, TensorView a, TensorView wp, const float* bias,
                       int64_t nbias, TensorView out, const Epilogue& ep = {}) {
  dense_packed_check(op, a, wp, bias != nullptr ? nbias : -1, out);
  const int64_t B = wp.ndim() == 4 ? wp.size(0) : 1;
  const int64_t K = a.size(a.ndim() - 1), N = out.size(out.ndim() - 1);
  const int64_t panels = (N + mtc::kDenseNR - 1) / mtc::kDenseNR;
  const int64_t rows = (K == 0 ? out.numel() / std::max<int64_t>(N, 1) : a.numel() / K) / B;
  if (rows == 0 || N == 0) return;
  const float* pa = fdata(a);
  const float* pw = fdata(wp);
  float* pc = fdata_mut(out);
  // row blocks whose activations (rows x K) stay in L2 while the panels stream past them
  const int64_t rb = std::max<int64_t>(mtc::kDenseMR,
                                       (32768 / std::max<int64_t>(K, 1)) / mtc::kDenseMR *
                                           mtc::kDenseMR);
  const int64_t blocks = (rows + rb - 1) / rb, tiles = B * blocks * panels;
  parallel(B * rows * N * K, tiles, [&](int64_t task, int64_t ntask) {
    auto [t0, t1] = part(tiles, task, ntask, 1);
    for (int64_t t = t0; t < t1;) {  // a task's run may span row blocks and weights
      const int64_t u = t / panels, end = std::min(t1, (u + 1) * panels);
      const int64_t b = u / blocks, r0 = (u % blocks) * rb, nr = std::min(rb, rows - r0);
      const int64_t at = b * rows * N;
      dense_packed_tile(r0, nr, K, N, pa + b * rows * K, pw + b * panels * K * mtc::kDenseNR,
                        bias, pc + at, t - u * panels, end - u * panels, ep, at);
      t = end;
    }
  });
}

void dense_packed(TensorView a, TensorView wp, TensorView out) {
  dense_packed_impl("mtcompile.native.dense_packed", a, wp, nullptr, 0, out);
}

void dense_packed_bias(TensorView a, TensorView wp, TensorView bias, TensorView out) {
  const char* op = "mtcompile.native.dense_packed_bias";
  check_tensor(op, "bias", bias, 1, 1);
  dense_packed_impl(op, a, wp, fdata(bias), bias.size(0), out);
}

// ---------------------------------------------------------------- conv2d
struct Conv {
  int64_t N, C, H, W, O, KH, KW, OH, OW, G, Cg, Og;
  int64_t sh, sw, pt, pl, dh, dw;
};

// col[k, p] for k over (c, kh, kw) of group g and p over output pixels [p0, p1) of image n
void im2col(const Conv& q, const float* x, int64_t p0, int64_t p1, float* col) {
  const int64_t np = p1 - p0;
  for (int64_t c = 0; c < q.Cg; ++c) {
    const float* xc = x + c * q.H * q.W;
    for (int64_t kh = 0; kh < q.KH; ++kh) {
      for (int64_t kw = 0; kw < q.KW; ++kw) {
        float* dst = col + ((c * q.KH + kh) * q.KW + kw) * np;
        int64_t p = p0;
        while (p < p1) {
          const int64_t oh = p / q.OW, ow0 = p % q.OW;
          const int64_t run = std::min(q.OW - ow0, p1 - p);
          const int64_t ih = oh * q.sh - q.pt + kh * q.dh;
          float* d = dst + (p - p0);
          if (ih < 0 || ih >= q.H) {
            std::memset(d, 0, run * sizeof(float));
          } else {
            const float* src = xc + ih * q.W;
            int64_t iw = ow0 * q.sw - q.pl + kw * q.dw;
            if (q.sw == 1 && iw >= 0 && iw + run <= q.W) {
              std::memcpy(d, src + iw, run * sizeof(float));
            } else {
              for (int64_t j = 0; j < run; ++j, iw += q.sw)
                d[j] = (iw >= 0 && iw < q.W) ? src[iw] : 0.f;
            }
          }
          p += run;
        }
      }
    }
  }
}

// one input channel per group (depthwise, with any channel multiplier): direct loops
inline __attribute__((always_inline)) void depthwise_body(const Conv& q, const float* x, const float* w, const float* bias, float* y,
                    int64_t n, int64_t o) {
  const int64_t g = o / q.Og;
  const float* xc = x + (n * q.C + g) * q.H * q.W;
  const float* wk = w + o * q.KH * q.KW;
  float* yo = y + (n * q.O + o) * q.OH * q.OW;
  const float b = bias ? bias[o] : 0.f;
  for (int64_t i = 0; i < q.OH * q.OW; ++i) yo[i] = b;
  for (int64_t kh = 0; kh < q.KH; ++kh) {
    for (int64_t oh = 0; oh < q.OH; ++oh) {
      const int64_t ih = oh * q.sh - q.pt + kh * q.dh;
      if (ih < 0 || ih >= q.H) continue;
      const float* xr = xc + ih * q.W;
      float* yr = yo + oh * q.OW;
      for (int64_t kw = 0; kw < q.KW; ++kw) {
        const float wv = wk[kh * q.KW + kw];
        // output columns whose input column lies inside the image
        const int64_t off = kw * q.dw - q.pl;
        int64_t lo = off >= 0 ? 0 : (-off + q.sw - 1) / q.sw;
        int64_t hi = (q.W - 1 - off) >= 0 ? (q.W - 1 - off) / q.sw + 1 : 0;
        hi = std::min(hi, q.OW);
        if (q.sw == 1) {
          const float* xs = xr + off;
          for (int64_t ow = lo; ow < hi; ++ow) yr[ow] += wv * xs[ow];
        } else {
          for (int64_t ow = lo; ow < hi; ++ow) yr[ow] += wv * xr[ow * q.sw + off];
        }
      }
    }
  }
}

// the loops vectorize 8-wide where the CPU has AVX2+FMA (the library is built for generic x86-64)
__attribute__((target("avx2,fma"))) void conv_depthwise_avx2(const Conv& q, const float* x,
                                                             const float* w, const float* bias,
                                                             float* y, int64_t n, int64_t o) {
  depthwise_body(q, x, w, bias, y, n, o);
}
void conv_depthwise_generic(const Conv& q, const float* x, const float* w, const float* bias,
                            float* y, int64_t n, int64_t o) {
  depthwise_body(q, x, w, bias, y, n, o);
}
void conv_depthwise(const Conv& q, const float* x, const float* w, const float* bias, float* y,
                    int64_t n, int64_t o) {
  (kHasAvx2 ? conv_depthwise_avx2 : conv_depthwise_generic)(q, x, w, bias, y, n, o);
}

// the AVX2 path: a padded copy of the input, packed weights, 16-pixel tiles over the pool
// (see conv_avx2.h)
void conv_direct(const Conv& c, const float* px, const float* pw, const float* bias, float* py,
                 const Epilogue& ep) {
  const mtc::ConvGeom q{c.C,  c.H,  c.W,  c.KH, c.KW, c.OH, c.OW, c.Cg,
                        c.Og, c.sh, c.sw, c.pt, c.pl, c.dh, c.dw};
  const mtc::Padded pd(q);
  const int64_t Kd = c.Cg * c.KH * c.KW, cf = pd.channel_floats();
  // the calling thread's buffers, kept between calls (pad_channels writes every float)
  thread_local std::vector<float> wp, xp;
  if (wp.size() < static_cast<size_t>(c.O * Kd)) wp.resize(c.O * Kd);
  float* const wpp = wp.data();
  const mtc::Tiles tiles = mtc::tiles_for(c.KW, kHasAvx512);
  for (int64_t g = 0; g < c.G; ++g)
    mtc::pack_weights(pw + g * c.Og * Kd, c.Og, Kd, tiles.strip, wpp + g * c.Og * Kd);
  const int64_t panels = c.OH * ((c.OW + mtc::kNR - 1) / mtc::kNR);
  // images in groups of about 512 KB of padded input: two launches per group (a batch of
  // small images made two per image, 256 launches for a batch of 16 through a small ResNet)
  const int64_t per_image = c.C * cf;
  const int64_t group = std::clamp<int64_t>((int64_t{1} << 17) / per_image, 1, c.N);
  if (xp.size() < static_cast<size_t>(group * per_image)) xp.resize(group * per_image);
  float* const xpp = xp.data();
  for (int64_t n0 = 0; n0 < c.N; n0 += group) {
    const int64_t ng = std::min(group, c.N - n0), units = ng * c.G * panels;
    const float* xn = px + n0 * c.C * c.H * c.W;
    // two launches, not one with a barrier between the phases: a barrier ties each task to
    // a thread of its own, so one descheduled worker would stall it (a busy host)
    const int64_t work = ng * c.O * c.OH * c.OW * Kd;
    parallel(work, units, [&](int64_t task, int64_t ntask) {  // pad the channels
      auto [u0, u1] = part(ng * c.C, task, ntask, 1);
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t n = u / c.C, ch = u % c.C;
        mtc::pad_channels(q, pd, xn + n * c.C * c.H * c.W, ch, ch + 1, xpp + n * per_image);
      }
    });
    parallel(work, units, [&](int64_t task, int64_t ntask) {  // then compute the panels
      auto [t0, t1] = part(units, task, ntask, 1);
      for (int64_t t = t0; t < t1;) {  // a task's run of panels may span images and groups
        const int64_t u = t / panels, end = std::min(t1, (u + 1) * panels);
        const int64_t n = u / c.G, g = u % c.G;
        const int64_t at = ((n0 + n) * c.O + g * c.Og) * c.OH * c.OW;
        mtc::conv_panels(q, pd, tiles, xpp + n * per_image + g * c.Cg * cf,
                         wpp + g * c.Og * Kd, bias ? bias + g * c.Og : nullptr, py + at,
                         t - u * panels, end - u * panels, ep.res_at(at), ep.act);
        t = end;
      }
    });
  }
}

void conv_impl(const char* op, TensorView x, TensorView w, const float* bias, int64_t nbias,
               tvm::ffi::Shape params, TensorView out, const Epilogue& ep = {}) {
  check_tensor(op, "x", x, 4, 4);
  check_tensor(op, "weight", w, 4, 4);
  check_tensor(op, "out", out, 4, 4);
  if (params.size() != 9)
    TVM_FFI_THROW(ValueError) << op
                              << ": params must be 9 values (stride h/w, padding "
                                 "top/left/bottom/right, dilation h/w, groups), found "
                              << params.size();
  int64_t p[9];
  for (int i = 0; i < 9; ++i) p[i] = params[i];
  Conv q{};
  q.N = x.size(0), q.C = x.size(1), q.H = x.size(2), q.W = x.size(3);
  q.O = w.size(0), q.KH = w.size(2), q.KW = w.size(3);
  q.sh = p[0], q.sw = p[1], q.pt = p[2], q.pl = p[3], q.dh = p[6], q.dw = p[7], q.G = p[8];
  const int64_t pb = p[4], pr = p[5];
  if (q.sh < 1 || q.sw < 1 || q.dh < 1 || q.dw < 1 || q.G < 1 || q.pt < 0 || q.pl < 0 ||
      pb < 0 || pr < 0)
    TVM_FFI_THROW(ValueError) << op << ": bad params: strides " << q.sh << "," << q.sw
                              << " padding " << q.pt << "," << q.pl << "," << pb << "," << pr
                              << " dilation " << q.dh << "," << q.dw << " groups " << q.G;
  if (q.C % q.G != 0 || q.O % q.G != 0 || w.size(1) != q.C / q.G)
    TVM_FFI_THROW(ValueError) << op << ": x " << shape_str(x) << ", weight " << shape_str(w)
                              << " and groups " << q.G << " do not match";
  q.Cg = q.C / q.G, q.Og = q.O / q.G;
  q.OH = (q.H + q.pt + pb - q.dh * (q.KH - 1) - 1) / q.sh + 1;
  q.OW = (q.W + q.pl + pr - q.dw * (q.KW - 1) - 1) / q.sw + 1;
  if (q.OH <= 0 || q.OW <= 0)
    TVM_FFI_THROW(ValueError) << op << ": the (dilated) kernel " << w.size(2) << "x" << w.size(3)
                              << " is larger than the padded input of x " << shape_str(x);
  if (out.size(0) != q.N || out.size(1) != q.O || out.size(2) != q.OH || out.size(3) != q.OW)
    TVM_FFI_THROW(ValueError) << op << ": out has shape " << shape_str(out) << ", expected ["
                              << q.N << ", " << q.O << ", " << q.OH << ", " << q.OW << "]";
  if (bias != nullptr && nbias != q.O)
    TVM_FFI_THROW(ValueError) << op << ": bias has " << nbias << " values, out has " << q.O
                              << " channels";
  if (q.N == 0 || q.O == 0) return;
  const float* px = fdata(x);
  const float* pw = fdata(w);
  float* py = fdata_mut(out);
  const int64_t P = q.OH * q.OW, Kd = q.Cg * q.KH * q.KW;
  const int64_t work = q.N * q.O * P * Kd;
  if (q.Cg == 1) {
    parallel(work, q.N * q.O, [&](int64_t task, int64_t ntask) {
      auto [t0, t1] = part(q.N * q.O, task, ntask, 1);
      for (int64_t t = t0; t < t1; ++t) {
        conv_depthwise(q, px, pw, bias, py, t / q.O, t % q.O);
        finish_block(ep, py, t * P, P, 1, P);
      }
    });
    return;
  }
  // the direct form computes 16 output columns at a time: narrow outputs (the 6x6 of a
  // 16x16-patch embedding) would waste most lanes, and go to im2col + GEMM instead
  const int64_t lanes = (q.OW + mtc::kNR - 1) / mtc::kNR * mtc::kNR;
  if (kHasAvx2 && 4 * q.OW >= 3 * lanes) {
    conv_direct(q, px, pw, bias, py, ep);
    return;
  }
  // a 1x1, stride 1, unpadded conv reads x as the GEMM's right operand directly
  const bool direct = q.KH == 1 && q.KW == 1 && q.sh == 1 && q.sw == 1 && q.pt == 0 &&
                      q.pl == 0 && pb == 0 && pr == 0;
  // tiles: (image, group, pixel block); pixel blocks of 64+ columns keep each GEMM wide
  const int64_t units = q.N * q.G;
  parallel(work, units * std::max<int64_t>(1, P / 64), [&](int64_t task, int64_t ntask) {
    int64_t pparts = units >= ntask ? 1 : (ntask + units - 1) / units;
    pparts = std::max<int64_t>(1, std::min(pparts, P / 64));
    auto [t0, t1] = part(units * pparts, task, ntask, 1);
    thread_local std::vector<float> scratch;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t u = t / pparts, n = u / q.G, g = u % q.G;
      auto [p0, p1] = part(P, t % pparts, pparts, 16);
      if (p1 <= p0) continue;
      const float* xg = px + (n * q.C + g * q.Cg) * q.H * q.W;
      const float* wg = pw + g * q.Og * Kd;
      float* yg = py + (n * q.O + g * q.Og) * P + p0;
      float beta = 0.f;
      if (bias) {
        for (int64_t o = 0; o < q.Og; ++o) std::fill(yg + o * P, yg + o * P + (p1 - p0),
                                                     bias[g * q.Og + o]);
        beta = 1.f;
      }
      if (direct) {
        sgemm(q.Og, p1 - p0, Kd, wg, Kd, xg + p0, P, beta, yg, P);
      } else {
        if (scratch.size() < static_cast<size_t>(Kd * (p1 - p0))) scratch.resize(Kd * (p1 - p0));
        im2col(q, xg, p0, p1, scratch.data());
        sgemm(q.Og, p1 - p0, Kd, wg, Kd, scratch.data(), p1 - p0, beta, yg, P);
      }
      finish_block(ep, py, (n * q.O + g * q.Og) * P + p0, P, q.Og, p1 - p0);
    }
  });
}

void conv2d(TensorView x, TensorView w, tvm::ffi::Shape params, TensorView out) {
  conv_impl("mtcompile.native.conv2d", x, w, nullptr, 0, params, out);
}

void conv2d_bias(TensorView x, TensorView w, TensorView bias, tvm::ffi::Shape params,
                 TensorView out) {
  const char* op = "mtcompile.native.conv2d_bias";
  check_tensor(op, "bias", bias, 1, 1);
  conv_impl(op, x, w, fdata(bias), bias.size(0), params, out);
}

// ---------------------------------------------------------------- rows
// softmax and layer norm over the last axis of x, rows split over the pool
void check_same_shape(const char* op, const TensorView& x, const TensorView& out) {
  bool same = x.ndim() == out.ndim();
  for (int i = 0; same && i < x.ndim(); ++i) same = x.size(i) == out.size(i);
  if (!same)
    TVM_FFI_THROW(ValueError) << op << ": out has shape " << shape_str(out) << ", expected x's "
                              << shape_str(x);
}

template <typename F>
void over_rows(const TensorView& x, int64_t cost_per_element, const F& row) {
  const int64_t n = x.size(x.ndim() - 1), rows = n == 0 ? 0 : x.numel() / n;
  if (rows == 0) return;
  parallel(x.numel() * cost_per_element, rows, [&](int64_t task, int64_t ntask) {
    auto [r0, r1] = part(rows, task, ntask, 1);
    for (int64_t r = r0; r < r1; ++r) row(r * n, n);
  });
}

void softmax(TensorView x, TensorView out) {
  const char* op = "mtcompile.native.softmax";
  check_tensor(op, "x", x, 1, 8);
  check_tensor(op, "out", out, 1, 8);
  check_same_shape(op, x, out);
  const float* px = fdata(x);
  float* py = fdata_mut(out);
  over_rows(x, 8, [&](int64_t at, int64_t n) {
    (kHasAvx2 ? mtc::softmax_row_avx2 : mtc::softmax_row_generic)(px + at, py + at, n);
  });
}

void layer_norm(TensorView x, TensorView gamma, TensorView beta, TensorView eps,
                TensorView out) {
  const char* op = "mtcompile.native.layer_norm";
  check_tensor(op, "x", x, 1, 8);
  check_tensor(op, "gamma", gamma, 1, 1);
  check_tensor(op, "beta", beta, 1, 1);
  check_tensor(op, "epsilon", eps, 1, 1);
  check_tensor(op, "out", out, 1, 8);
  check_same_shape(op, x, out);
  const int64_t n = x.size(x.ndim() - 1);
  if (gamma.size(0) != n || beta.size(0) != n || eps.size(0) != 1)
    TVM_FFI_THROW(ValueError) << op << ": gamma " << shape_str(gamma) << ", beta "
                              << shape_str(beta) << " and epsilon " << shape_str(eps)
                              << " do not fit x " << shape_str(x) << " (expected [" << n
                              << "], [" << n << "], [1])";
  const float *px = fdata(x), *pg = fdata(gamma), *pb = fdata(beta);
  const float e = fdata(eps)[0];
  float* py = fdata_mut(out);
  over_rows(x, 4, [&](int64_t at, int64_t len) {
    (kHasAvx2 ? mtc::layer_norm_row_avx2 : mtc::layer_norm_row_generic)(px + at, pg, pb, e,
                                                                         py + at, len);
  });
}

// ---------------------------------------------------------------- epilogue variants
// <kernel>_bias_<act> and <kernel>_bias_add[_<act>]: a bias kernel whose output then goes
// through the epilogue; the residual comes after the bias, before a conv's params.
std::string epilogue_name(const char* kernel, mtc::Act act, bool add) {
  std::string s = std::string(MTC_PREFIX) + kernel + "_bias";
  if (add) s += "_add";
  if (act == mtc::kActRelu) s += "_relu";
  if (act == mtc::kActGelu) s += "_gelu";
  return s;
}

Epilogue epilogue(const char* op, mtc::Act act, const TensorView* res, const TensorView& out) {
  Epilogue ep;
  ep.act = act;
  if (res == nullptr) return ep;
  check_tensor(op, "residual", *res, 0, 8);
  bool same = res->ndim() == out.ndim();
  for (int i = 0; same && i < out.ndim(); ++i) same = res->size(i) == out.size(i);
  if (!same)
    TVM_FFI_THROW(ValueError) << op << ": residual has shape " << shape_str(*res)
                              << ", expected out's " << shape_str(out);
  // the kernel reads the residual where it writes out (a conv in several channel blocks
  // writes before it reads): the two must not overlap
  const float *r = fdata(*res), *o = fdata(out);
  if (r < o + out.numel() && o < r + res->numel())
    TVM_FFI_THROW(ValueError) << op << ": residual and out overlap in memory";
  ep.res = r;
  return ep;
}

template <mtc::Act A>
void matmul_bias_act(TensorView a, TensorView w, TensorView bias, TensorView out) {
  static const std::string op = epilogue_name("matmul", A, false);
  check_tensor(op.c_str(), "weight", w, 2, 2);
  check_tensor(op.c_str(), "bias", bias, 1, 1);
  matmul_impl(op.c_str(), a, w, fdata(bias), bias.size(0), out,
              epilogue(op.c_str(), A, nullptr, out));
}
template <mtc::Act A>
void matmul_bias_add_act(TensorView a, TensorView w, TensorView bias, TensorView res,
                         TensorView out) {
  static const std::string op = epilogue_name("matmul", A, true);
  check_tensor(op.c_str(), "weight", w, 2, 2);
  check_tensor(op.c_str(), "bias", bias, 1, 1);
  matmul_impl(op.c_str(), a, w, fdata(bias), bias.size(0), out,
              epilogue(op.c_str(), A, &res, out));
}
template <mtc::Act A>
void dense_packed_bias_act(TensorView a, TensorView wp, TensorView bias, TensorView out) {
  static const std::string op = epilogue_name("dense_packed", A, false);
  check_tensor(op.c_str(), "bias", bias, 1, 1);
  dense_packed_impl(op.c_str(), a, wp, fdata(bias), bias.size(0), out,
                    epilogue(op.c_str(), A, nullptr, out));
}
template <mtc::Act A>
void dense_packed_bias_add_act(TensorView a, TensorView wp, TensorView bias, TensorView res,
                               TensorView out) {
  static const std::string op = epilogue_name("dense_packed", A, true);
  check_tensor(op.c_str(), "bias", bias, 1, 1);
  dense_packed_impl(op.c_str(), a, wp, fdata(bias), bias.size(0), out,
                    epilogue(op.c_str(), A, &res, out));
}
template <mtc::Act A>
void conv2d_bias_act(TensorView x, TensorView w, TensorView bias, tvm::ffi::Shape params,
                     TensorView out) {
  static const std::string op = epilogue_name("conv2d", A, false);
  check_tensor(op.c_str(), "bias", bias, 1, 1);
  conv_impl(op.c_str(), x, w, fdata(bias), bias.size(0), params, out,
            epilogue(op.c_str(), A, nullptr, out));
}
template <mtc::Act A>
void conv2d_bias_add_act(TensorView x, TensorView w, TensorView bias, TensorView res,
                         tvm::ffi::Shape params, TensorView out) {
  static const std::string op = epilogue_name("conv2d", A, true);
  check_tensor(op.c_str(), "bias", bias, 1, 1);
  conv_impl(op.c_str(), x, w, fdata(bias), bias.size(0), params, out,
            epilogue(op.c_str(), A, &res, out));
}

}  // namespace

namespace {
template <typename F>
void define(const char* name, F f) {
  // a bundle that links these kernels in may load after this library (or another bundle)
  // registered them: the first registration stays
  if (!tvm::ffi::Function::GetGlobal(name).has_value())
    tvm::ffi::reflection::GlobalDef().def(name, f);
}
}  // namespace

namespace {
// One pool per process: the first copy of these kernels to load registers its pool (as TVM's
// parallel-launch context symbols and as functions); a later copy uses that one.
void share_pool() {
  namespace refl = tvm::ffi::reflection;
  // a forked child has none of the workers: it starts a pool of its own on first use
  pthread_atfork(nullptr, nullptr, [] {
    mtc::thread_pool_slot().release();  // leaked: its threads do not exist here
    mtc::active_runs().store(0);
  });
  auto first = tvm::ffi::Function::GetGlobal(MTC_PREFIX "pool_launch_fn");
  if (first.has_value()) {
    g_launch = reinterpret_cast<LaunchFn>((*first)().cast<int64_t>());
    return;
  }
  refl::GlobalDef().def(MTC_PREFIX "pool_launch_fn",
                        []() { return reinterpret_cast<int64_t>(&PoolLaunch); });
  TVMFFIEnvModRegisterContextSymbol("__TVMBackendParallelLaunch",
                                    reinterpret_cast<void*>(&PoolLaunch));
  TVMFFIEnvModRegisterContextSymbol("__TVMBackendParallelBarrier",
                                    reinterpret_cast<void*>(&PoolBarrier));
  // a run in progress (its workers spin between parallel regions) and its end (they sleep)
  refl::GlobalDef().def(MTC_PREFIX "run_begin", []() { mtc::active_runs().fetch_add(1); });
  refl::GlobalDef().def(MTC_PREFIX "run_end", []() { mtc::active_runs().fetch_sub(1); });
  refl::GlobalDef().def(MTC_PREFIX "pool_launches", []() { return g_launches.load(); });
  refl::GlobalDef().def(MTC_PREFIX "active_runs",
                        []() { return static_cast<int64_t>(mtc::active_runs().load()); });
  // windows in which a pool's thread found the host busy (each starts a calm period: workers
  // sleep between launches instead of spinning)
  refl::GlobalDef().def(MTC_PREFIX "pool_busy_windows",
                        []() { return mtc::RunDelay::busy_windows().load(); });
  // the calling thread's pool size (n > 0: set it first); its threads start on first use
  refl::GlobalDef().def(MTC_PREFIX "pool_threads", [](int n) {
    if (n > 0) mtc::thread_setting() = n;
    return n > 0 ? n : (mtc::thread_setting() > 0 ? mtc::thread_setting()
                                                 : mtc::default_threads());
  });
}
}  // namespace

TVM_FFI_STATIC_INIT_BLOCK() {
  // the BLAS runs on the calling worker only; the parallelism is the pool's
  blas_single_thread();
  share_pool();
  define(MTC_PREFIX "matmul", matmul);
  define(MTC_PREFIX "matmul_bias", matmul_bias);
  define(MTC_PREFIX "conv2d", conv2d);
  define(MTC_PREFIX "conv2d_bias", conv2d_bias);
  define(MTC_PREFIX "dense_packed", dense_packed);
  define(MTC_PREFIX "dense_packed_bias", dense_packed_bias);
  define(MTC_PREFIX "softmax", softmax);
  define(MTC_PREFIX "layer_norm", layer_norm);
  using mtc::kActGelu, mtc::kActNone, mtc::kActRelu;
  define(epilogue_name("matmul", kActRelu, false).c_str(), matmul_bias_act<kActRelu>);
  define(epilogue_name("matmul", kActGelu, false).c_str(), matmul_bias_act<kActGelu>);
  define(epilogue_name("matmul", kActNone, true).c_str(), matmul_bias_add_act<kActNone>);
  define(epilogue_name("matmul", kActRelu, true).c_str(), matmul_bias_add_act<kActRelu>);
  define(epilogue_name("dense_packed", kActRelu, false).c_str(), dense_packed_bias_act<kActRelu>);
  define(epilogue_name("dense_packed", kActGelu, false).c_str(), dense_packed_bias_act<kActGelu>);
  define(epilogue_name("dense_packed", kActNone, true).c_str(),
         dense_packed_bias_add_act<kActNone>);
  define(epilogue_name("dense_packed", kActRelu, true).c_str(),
         dense_packed_bias_add_act<kActRelu>);
  define(epilogue_name("conv2d", kActRelu, false).c_str(), conv2d_bias_act<kActRelu>);
  define(epilogue_name("conv2d", kActGelu, false).c_str(), conv2d_bias_act<kActGelu>);
  define(epilogue_name("conv2d", kActNone, true).c_str(), conv2d_bias_add_act<kActNone>);
  define(epilogue_name("conv2d", kActRelu, true).c_str(), conv2d_bias_add_act<kActRelu>);
}
