// What every native kernel family shares: the BLAS sgemm, the parallel split over the run's
// one thread pool (pool.h), the CPU-feature flags, tensor checks and the epilogue applied to
// a block of a kernel's output (epilogue.h). Defined once in registration.cc: the flags and
// the pool's launch function.
#pragma once

#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>

#include "epilogue.h"
#include "pool.h"

#if defined(MTC_BLAS_MKL)
extern "C" {
void cblas_sgemm(int layout, int transa, int transb, int m, int n, int k, float alpha,
                 const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc);
int MKL_Set_Num_Threads_Local(int);
void MKL_Set_Num_Threads(int);
}
#define MTC_SGEMM cblas_sgemm
#else
extern "C" {
void scipy_cblas_sgemm(int layout, int transa, int transb, int m, int n, int k, float alpha,
                       const float* a, int lda, const float* b, int ldb, float beta, float* c,
                       int ldc);
void scipy_openblas_set_num_threads(int);
}
#define MTC_SGEMM scipy_cblas_sgemm
#endif

namespace mtc {

using tvm::ffi::TensorView;
constexpr int kRowMajor = 101, kNoTrans = 111;
// below this many multiply-adds a call runs on the calling thread: a parallel launch costs more
constexpr int64_t kSerialWork = 1 << 17;

// the AVX2/FMA kernels' CPU check (registration.cc; without them the BLAS paths run;
// MTCOMPILE_NATIVE_GENERIC=1 forces those), and AVX-512 tiles where they pay
// (MTCOMPILE_NATIVE_AVX2 keeps the AVX2 ones)
extern const bool kHasAvx2;
extern const bool kHasAvx512;
extern const bool kHasAvx512Bf16;  // VDPBF16PS (dense_bf16.h)

// TVM's parallel-launch ABI: the process's one pool (registration.cc)
using LaunchFn = int (*)(FTVMParallelLambda, void*, int);
extern LaunchFn g_launch;

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

// A kernel's epilogue (epilogue.h): act(result + res), res laid out as the kernel's output.
struct Epilogue {
  Act act = kActNone;
  const float* res = nullptr;
  // the residual at the output element `at` (null without one)
  const float* res_at(int64_t at) const { return res != nullptr ? res + at : nullptr; }
  bool any() const { return act != kActNone || res != nullptr; }
};

// the epilogue over a rows x cols block (row stride ld) of out, computed without it; at: the
// block's first element's index in out
inline void finish_block(const Epilogue& ep, float* out, int64_t at, int64_t ld, int64_t rows,
                         int64_t cols) {
  if (!ep.any()) return;
  (kHasAvx2 ? finish_block_avx2 : finish_block_generic)(out + at, ep.res_at(at), ld, rows, cols,
                                                        ep.act);
}

// [begin, end) of part `i` of `n` equal parts of [0, total), boundaries rounded to `align`.
inline std::pair<int64_t, int64_t> part(int64_t total, int64_t i, int64_t n, int64_t align) {
  int64_t blocks = (total + align - 1) / align;
  int64_t b0 = blocks * i / n, b1 = blocks * (i + 1) / n;
  return {std::min(total, b0 * align), std::min(total, b1 * align)};
}

inline std::string shape_str(const TensorView& t) {
  std::string s = "[";
  for (int i = 0; i < t.ndim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

inline const float* fdata(const TensorView& t) {
  return reinterpret_cast<const float*>(static_cast<const char*>(t.data_ptr()) + t.byte_offset());
}
inline float* fdata_mut(const TensorView& t) {
  return reinterpret_cast<float*>(static_cast<char*>(t.data_ptr()) + t.byte_offset());
}

constexpr DLDataType kFloat32{kDLFloat, 32, 1};
constexpr DLDataType kUint16{kDLUInt, 16, 1};  // bfloat16 bits, as a packed bf16 weight holds them

inline std::string dtype_str(DLDataType dt) {
  const char* kind = dt.code == kDLFloat ? "float" : dt.code == kDLUInt ? "uint"
                     : dt.code == kDLInt ? "int" : nullptr;
  std::string s = kind != nullptr ? kind + std::to_string(dt.bits)
                                  : "code " + std::to_string(dt.code) + " bits " +
                                        std::to_string(dt.bits);
  return dt.lanes == 1 ? s : s + "x" + std::to_string(dt.lanes);
}

inline void check_tensor(const char* op, const char* what, const TensorView& t, int min_rank,
                         int max_rank, DLDataType want = kFloat32) {
  DLDataType dt = t.dtype();
  if (dt.code != want.code || dt.bits != want.bits || dt.lanes != want.lanes)
    TVM_FFI_THROW(TypeError) << op << ": " << what << " must be " << dtype_str(want)
                             << ", found " << dtype_str(dt);
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

inline bool same_shape(const TensorView& a, const TensorView& b) {
  bool same = a.ndim() == b.ndim();
  for (int i = 0; same && i < a.ndim(); ++i) same = a.size(i) == b.size(i);
  return same;
}

}  // namespace mtc
