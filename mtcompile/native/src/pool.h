// The one thread pool of a bundle's run: TVM's parallel-launch API (TVMBackendParallelLaunch /
// TVMBackendParallelBarrier) served by workers that spin only while a run is in progress.
//
// TVM's own pool makes its workers either spin for a fixed count after every parallel region
// (so they keep spinning after a call has returned, slowing the process's other work) or, with
// the count at 0, sleep after every region, so that each kernel's launch waits for a worker to
// wake (tens of microseconds on a small VM, per launch). Here a run announces itself
// (run_begin / run_end, around each entry call): while one is in progress the workers spin
// between regions; once none is, they sleep at once. Runs in progress times threads beyond the
// machine's cores (threads calling bundles concurrently) spin nothing: a spinning worker would
// take a core another run computes on. A run that never says it ended (a caller that died)
// stops their spinning after kMaxSpinNs.
//
// One pool per calling thread, as TVM's: its size is set per thread (set_threads), else from
// TVM_NUM_THREADS, else the machine's cores. The caller runs task 0; the workers 1..n-1. A
// launch of more tasks than threads runs them strided (task t on thread t % n): the lambdas
// split work by (task_id, num_task), so the partition, and the results, depend on n only.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MTC_PAUSE() _mm_pause()
#else
#define MTC_PAUSE() std::this_thread::yield()
#endif

extern "C" {
typedef struct {
  void* sync_handle;
  int32_t num_task;
} TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);
}

namespace mtc {

// runs in progress in this process (run_begin / run_end)
inline std::atomic<int>& active_runs() {
  static std::atomic<int> n{0};
  return n;
}
constexpr int64_t kMaxSpinNs = 2'000'000;  // a worker's spin without news, at most

class Pool {
 public:
  explicit Pool(int threads)
      : n_(threads < 1 ? 1 : threads),
        cores_(std::max(1, static_cast<int>(std::thread::hardware_concurrency()))) {
    for (int w = 1; w < n_; ++w) workers_.emplace_back([this, w] { Work(w); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_.store(true);
      gen_.fetch_add(1);
    }
    cv_.notify_all();
    for (std::thread& t : workers_) t.join();
  }
  int threads() const { return n_; }

  int Launch(FTVMParallelLambda f, void* cdata, int num_task) {
    if (num_task <= 0) num_task = n_;
    if (n_ == 1 || num_task == 1 || in_task_) return RunSerial(f, cdata, num_task);
    f_ = f;
    cdata_ = cdata;
    env_.sync_handle = this;
    env_.num_task = num_task;
    error_.store(0, std::memory_order_relaxed);
    barrier_count_.store(0, std::memory_order_relaxed);
    // every worker acknowledges every launch (one with no task too): a launch never starts
    // while a worker may still read the last one's fields
    pending_.store(n_ - 1, std::memory_order_relaxed);
    gen_.fetch_add(1);  // seq_cst: publishes the job, ordered before the sleepers check
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      cv_.notify_all();
    }
    RunTasks(0, num_task);
    while (pending_.load(std::memory_order_acquire) > 0) MTC_PAUSE();
    return error_.load(std::memory_order_relaxed);
  }

  // all num_task tasks of the current launch meet here (they must run at once: num_task <= n)
  int Barrier() {
    const int total = env_.num_task;
    if (total > n_) return -1;  // strided tasks never all wait at once: it would deadlock
    const int phase = barrier_phase_.load(std::memory_order_acquire);
    if (barrier_count_.fetch_add(1, std::memory_order_acq_rel) + 1 == total) {
      barrier_count_.store(0, std::memory_order_relaxed);
      barrier_phase_.store(phase + 1, std::memory_order_release);
    } else {
      while (barrier_phase_.load(std::memory_order_acquire) == phase) MTC_PAUSE();
    }
    return 0;
  }

 private:
  int RunSerial(FTVMParallelLambda f, void* cdata, int num_task) {
    TVMParallelGroupEnv env{nullptr, num_task};  // no barrier: the tasks run one by one
    int rc = 0;
    for (int t = 0; t < num_task && rc == 0; ++t) rc = f(t, &env, cdata);
    return rc;
  }

  void RunTasks(int w, int num_task) {
    in_task_ = true;
    for (int t = w; t < num_task; t += n_) {
      if (f_(t, &env_, cdata_) != 0) error_.store(-1, std::memory_order_relaxed);
    }
    in_task_ = false;
  }

  void Work(int w) {
    uint64_t seen = 0;  // gen_ at construction: a launch may come before this thread runs
    while (true) {
      // wait for the next launch: spin while a run is in progress, else sleep
      auto start = std::chrono::steady_clock::now();
      int spins = 0;
      while (gen_.load(std::memory_order_acquire) == seen) {
        // spin only where it steals no core: several runs at once (threads calling the
        // bundle concurrently) would spin workers on the cores the other runs compute on
        const int runs = active_runs().load(std::memory_order_relaxed);
        if (runs > 0 && runs * n_ <= cores_) {
          MTC_PAUSE();
          if (++spins % 1024 != 0 ||
              std::chrono::duration_cast<std::chrono::nanoseconds>(
                  std::chrono::steady_clock::now() - start).count() < kMaxSpinNs)
            continue;
        }
        std::unique_lock<std::mutex> lock(mutex_);
        sleepers_.fetch_add(1);
        cv_.wait(lock, [&] { return gen_.load() != seen; });
        sleepers_.fetch_sub(1);
        start = std::chrono::steady_clock::now();
        spins = 0;
      }
      seen = gen_.load(std::memory_order_acquire);
      if (stop_.load()) return;
      if (w < env_.num_task) RunTasks(w, env_.num_task);
      pending_.fetch_sub(1, std::memory_order_release);
    }
  }

  const int n_;
  const int cores_;  // the machine's: runs x threads beyond it do not spin
  std::vector<std::thread> workers_;
  FTVMParallelLambda f_ = nullptr;
  void* cdata_ = nullptr;
  TVMParallelGroupEnv env_{nullptr, 0};
  alignas(64) std::atomic<uint64_t> gen_{0};
  alignas(64) std::atomic<int> pending_{0};
  alignas(64) std::atomic<int> sleepers_{0};
  alignas(64) std::atomic<int> barrier_count_{0};
  alignas(64) std::atomic<int> barrier_phase_{0};
  std::atomic<int> error_{0};
  std::atomic<bool> stop_{false};
  std::mutex mutex_;
  std::condition_variable cv_;
  static thread_local bool in_task_;
};

inline thread_local bool Pool::in_task_ = false;

// the calling thread's pool size: set_threads, else TVM_NUM_THREADS, else the cores
inline int& thread_setting() {
  static thread_local int n = 0;
  return n;
}

inline int default_threads() {
  const char* env = std::getenv("TVM_NUM_THREADS");
  int n = env != nullptr ? std::atoi(env) : 0;
  if (n < 1) n = static_cast<int>(std::thread::hardware_concurrency());
  return n < 1 ? 1 : n;
}

inline std::unique_ptr<Pool>& thread_pool_slot() {
  static thread_local std::unique_ptr<Pool> pool;
  return pool;
}

inline Pool* thread_pool() {
  static thread_local const int dflt = default_threads();
  std::unique_ptr<Pool>& p = thread_pool_slot();
  const int want = thread_setting() > 0 ? thread_setting() : dflt;
  if (!p || p->threads() != want) p = std::make_unique<Pool>(want);
  return p.get();
}

}  // namespace mtc

