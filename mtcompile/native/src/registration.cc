// Registers every native kernel form of kernels_table.h (generated from
// mtcompile/native/table.py) as a TVM global function, each unpacking its arguments into one
// `Call` (call.h) the same way; and shares the process's one thread pool (pool.h): the first
// copy of these kernels to load registers it as TVM's parallel-launch context symbols, so a
// library loaded after this one launches its parallel loops on it.
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>

#include <pthread.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>

#include "call.h"
#include "kernels_table.h"

#ifndef MTC_PREFIX
#define MTC_PREFIX "mtcompile.native."
#endif

namespace mtc {

// made during the library's static initialization (so the CPU model is set up first)
const bool kHasAvx2 = (__builtin_cpu_init(), __builtin_cpu_supports("avx2") &&
                                                 __builtin_cpu_supports("fma")) &&
                      std::getenv("MTCOMPILE_NATIVE_GENERIC") == nullptr;
const bool kHasAvx512 = kHasAvx2 && __builtin_cpu_supports("avx512f") &&
                        std::getenv("MTCOMPILE_NATIVE_AVX2") == nullptr;
const bool kHasAvx512Bf16 = kHasAvx512 && __builtin_cpu_supports("avx512bf16") &&
                            std::getenv("MTCOMPILE_NATIVE_NO_BF16") == nullptr;

namespace {

// TVM's parallel-launch ABI on the calling thread's pool (pool.h)
std::atomic<int64_t> g_launches{0};  // parallel launches served, for tests and profiles
int PoolLaunch(FTVMParallelLambda f, void* cdata, int num_task) {
  g_launches.fetch_add(1, std::memory_order_relaxed);
  return thread_pool()->Launch(f, cdata, num_task);
}
int PoolBarrier(int, TVMParallelGroupEnv* penv) {
  auto* pool = static_cast<Pool*>(penv->sync_handle);
  return pool != nullptr ? pool->Barrier() : (penv->num_task > 1 ? -1 : 0);
}

}  // namespace

// the process's one pool: this copy's, unless a copy of these kernels loaded earlier (the
// compiler's build of them, another bundle) registered its own first (see share_pool)
LaunchFn g_launch = PoolLaunch;

namespace {

// the residual of an epilogue: out's shape, and not overlapping out (a conv in several
// channel blocks writes out before it reads the residual there)
const float* residual(const char* op, const TensorView& res, const TensorView& out) {
  check_tensor(op, "residual", res, 0, 8);
  if (!same_shape(res, out))
    TVM_FFI_THROW(ValueError) << op << ": residual has shape " << shape_str(res)
                              << ", expected out's " << shape_str(out);
  const float *r = fdata(res), *o = fdata(out);
  if (r < o + out.numel() && o < r + res.numel())
    TVM_FFI_THROW(ValueError) << op << ": residual and out overlap in memory";
  return r;
}

// a call of `row`: its arguments as one `Call`, then the kernel's entry
void run_row(const KernelRow& row, tvm::ffi::PackedArgs args) {
  const int want = row.inputs + row.bias + row.residual + row.params + 1;
  if (args.size() != want)
    TVM_FFI_THROW(TypeError) << row.symbol << " takes " << want << " arguments, got "
                             << args.size();
  Call c{row.symbol, args};
  int i = row.inputs;
  if (row.bias) {
    TensorView bias = args[i++].cast<TensorView>();
    check_tensor(row.symbol, "bias", bias, 1, 1);
    c.bias = fdata(bias), c.nbias = bias.size(0);
  }
  c.ep.act = row.act;
  if (row.residual) c.ep.res = residual(row.symbol, args[i++].cast<TensorView>(), c.out());
  if (row.params) c.params = args[i++].cast<tvm::ffi::Shape>();
  row.fn(c);
}

void define(const KernelRow& row) {
  // a bundle that links these kernels in may load after this library (or another bundle)
  // registered them: the first registration stays
  if (tvm::ffi::Function::GetGlobal(row.symbol).has_value()) return;
  tvm::ffi::reflection::GlobalDef().def_packed(
      row.symbol, [&row](tvm::ffi::PackedArgs args, tvm::ffi::Any*) { run_row(row, args); });
}

void blas_single_thread() {
#if defined(MTC_BLAS_MKL)
  MKL_Set_Num_Threads(1);
#else
  scipy_openblas_set_num_threads(1);
#endif
}

// the pool's counters and settings, as functions (tests, profiles, the runtime)
void define_pool_functions() {
  namespace refl = tvm::ffi::reflection;
  // a run in progress (its workers spin between parallel regions) and its end (they sleep)
  refl::GlobalDef().def(MTC_PREFIX "run_begin", []() { active_runs().fetch_add(1); });
  refl::GlobalDef().def(MTC_PREFIX "run_end", []() { active_runs().fetch_sub(1); });
  refl::GlobalDef().def(MTC_PREFIX "pool_launches", []() { return g_launches.load(); });
  refl::GlobalDef().def(MTC_PREFIX "active_runs",
                        []() { return static_cast<int64_t>(active_runs().load()); });
  // windows in which a pool's thread found the host busy (each starts a calm period: workers
  // sleep between launches instead of spinning)
  refl::GlobalDef().def(MTC_PREFIX "pool_busy_windows",
                        []() { return RunDelay::busy_windows().load(); });
  // the calling thread's pool size (n > 0: set it first); its threads start on first use
  refl::GlobalDef().def(MTC_PREFIX "pool_threads", [](int n) {
    if (n > 0) thread_setting() = n;
    return n > 0 ? n : (thread_setting() > 0 ? thread_setting() : default_threads());
  });
}

// One pool per process: the first copy of these kernels to load registers its pool (as TVM's
// parallel-launch context symbols and as functions); a later copy uses that one.
void share_pool() {
  // a forked child has none of the workers: it starts a pool of its own on first use
  pthread_atfork(nullptr, nullptr, [] {
    thread_pool_slot().release();  // leaked: its threads do not exist here
    active_runs().store(0);
  });
  auto first = tvm::ffi::Function::GetGlobal(MTC_PREFIX "pool_launch_fn");
  if (first.has_value()) {
    g_launch = reinterpret_cast<LaunchFn>((*first)().cast<int64_t>());
    return;
  }
  tvm::ffi::reflection::GlobalDef().def(MTC_PREFIX "pool_launch_fn",
                                        []() { return reinterpret_cast<int64_t>(&PoolLaunch); });
  TVMFFIEnvModRegisterContextSymbol("__TVMBackendParallelLaunch",
                                    reinterpret_cast<void*>(&PoolLaunch));
  TVMFFIEnvModRegisterContextSymbol("__TVMBackendParallelBarrier",
                                    reinterpret_cast<void*>(&PoolBarrier));
  define_pool_functions();
}

}  // namespace
}  // namespace mtc

TVM_FFI_STATIC_INIT_BLOCK() {
  // the BLAS runs on the calling worker only; the parallelism is the pool's
  mtc::blas_single_thread();
  mtc::share_pool();
  for (const mtc::KernelRow& row : mtc::kKernelRows) mtc::define(row);
}
