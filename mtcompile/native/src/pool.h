// The one thread pool of a bundle's run: TVM's parallel-launch API (TVMBackendParallelLaunch /
// TVMBackendParallelBarrier) served by workers that spin only while a run is in progress.
//
// TVM's own pool makes its workers either spin for a fixed count after every parallel region
// (so they keep spinning after a call has returned, slowing the process's other work) or, with
// the count at 0, sleep after every region, so that each kernel's launch waits for a worker to
// wake (tens of microseconds on a small VM, per launch). Here a run announces itself
// (run_begin / run_end, around each entry call): while one is in progress the workers spin
// between regions, for at most kMaxSpinNs, then sleep; once none is, they sleep at once. Runs
// in progress times threads beyond the cores this process may use (threads calling bundles
// concurrently, a narrow affinity mask) spin nothing: a spinning worker would take a core
// another run computes on.
//
// Steady on a busy host: the tasks of a launch are claimed, not assigned. The caller and every
// awake worker take the next unclaimed task until none is left, and the launch waits only for
// tasks in progress, never for a worker to wake: a descheduled or sleeping worker delays
// nothing it has not claimed (a launch used to wait for every worker's acknowledgement, so one
// descheduled worker stalled each parallel region for up to a time slice). A worker preempted
// in the middle of its task still delays the launch by what is left of that task. Waits spin
// (for up to a millisecond), then yield the core. The partition of the work is still fixed by
// (task_id, num_task), and num_task by the pool's size, so results do not depend on who ran
// what.
//
// Spinning is for a quiet host. Where other threads want the cores (other processes, another
// runtime's pool in this one), a thread that spins spends this process's share of a core on
// nothing and is then preempted in the middle of the work it waited for. So each pool thread
// (the caller at its launches, a worker after its tasks) reads its run delay from the kernel
// (/proc/thread-self/schedstat: time runnable but waiting for a core): where it waited over
// kBusyPercent of the last kWindowNs it wanted a core, workers sleep after each launch instead
// of spinning for kCalmNs, renewed while the host stays busy. On a quiet host the run delay
// stays near zero (bursts of a few milliseconds) and the workers spin.
//
// One pool per calling thread, as TVM's: its size is set per thread (set_threads), else from
// TVM_NUM_THREADS, else the cores this process may use (affinity mask and cgroup CPU quota).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <cstdio>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <fcntl.h>
#include <sched.h>
#include <unistd.h>
#endif

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
// A wait (a caller for its launch's tasks, a task at a barrier) spins this long before it
// yields its core: a yield on a busy host hands the core to another process for a whole time
// slice, so it is only for a thread we wait for that shares our core (threads > cores)
constexpr int64_t kSpinBeforeYieldNs = 1'000'000;
constexpr int64_t kCalmNs = 200'000'000;  // a busy host seen: workers spin nothing this long

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

// until when (now_ns) workers sleep between launches instead of spinning
inline std::atomic<int64_t>& calm_until() {
  static std::atomic<int64_t> t{0};
  return t;
}
inline bool Calm(int64_t now) { return now < calm_until().load(std::memory_order_relaxed); }

constexpr int64_t kSampleNs = 2'000'000;  // a thread reads its schedstat at most this often
// a verdict per 50 ms the thread wanted a core (on it or waiting): waiting over 15% of that is a
// busy host (a quiet one shows bursts of a few ms at most: under 10%)
constexpr int64_t kWindowNs = 50'000'000;
constexpr int64_t kBusyPercent = 15;

// The calling thread's run delay, sampled: Sample() starts the calm period where the thread
// waited for a core over kBusyPercent of the time it wanted one, over its last window.
class RunDelay {
 public:
  RunDelay() {
#if defined(__linux__)
    fd_ = open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC);
#endif
  }
  ~RunDelay() {
#if defined(__linux__)
    if (fd_ >= 0) close(fd_);
#endif
  }
  RunDelay(const RunDelay&) = delete;
  RunDelay& operator=(const RunDelay&) = delete;

  void Sample(int64_t now) {
    if (fd_ < 0 || now - last_ < kSampleNs) return;
    last_ = now;
    int64_t on_cpu = 0, waiting = 0;
    if (!Read(&on_cpu, &waiting)) return;
    const int64_t wanted = on_cpu - on_cpu_ + waiting - waiting_;
    if (on_cpu_ == 0 || wanted < kWindowNs) {
      if (on_cpu_ == 0) on_cpu_ = on_cpu, waiting_ = waiting;
      return;
    }
    if ((waiting - waiting_) * 100 > kBusyPercent * wanted) {
      calm_until().store(now + kCalmNs, std::memory_order_relaxed);
      busy_windows().fetch_add(1, std::memory_order_relaxed);
    }
    on_cpu_ = on_cpu;
    waiting_ = waiting;
  }
  // windows that found the host busy, in this process (for tests and benchmarks)
  static std::atomic<int64_t>& busy_windows() {
    static std::atomic<int64_t> n{0};
    return n;
  }

 private:
  // /proc/thread-self/schedstat: "<ns on a cpu> <ns runnable, waiting for one> <slices>"
  bool Read(int64_t* on_cpu, int64_t* waiting) const {
#if defined(__linux__)
    char buf[96];
    const ssize_t n = pread(fd_, buf, sizeof(buf) - 1, 0);
    if (n <= 0) return false;
    buf[n] = '\0';
    unsigned long long a = 0, w = 0;
    if (std::sscanf(buf, "%llu %llu", &a, &w) != 2) return false;
    *on_cpu = static_cast<int64_t>(a);
    *waiting = static_cast<int64_t>(w);
    return true;
#else
    return false;
#endif
  }
  int fd_ = -1;
  int64_t last_ = 0;     // the last sample (now_ns)
  int64_t on_cpu_ = 0;   // schedstat at the window's start
  int64_t waiting_ = 0;
};

inline RunDelay& run_delay() {
  static thread_local RunDelay watch;
  return watch;
}

// The cores this process may use: its affinity mask, capped by a cgroup v2 CPU quota
// (cpu.max "quota period", rounded up), at least 1.
inline int usable_cores() {
  int n = static_cast<int>(std::thread::hardware_concurrency());
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) n = CPU_COUNT(&set);
  if (FILE* f = std::fopen("/sys/fs/cgroup/cpu.max", "r")) {
    char quota[32] = {0};
    long long period = 0;
    if (std::fscanf(f, "%31s %lld", quota, &period) == 2 && period > 0 &&
        quota[0] >= '0' && quota[0] <= '9') {
      const long long q = std::atoll(quota);
      if (q > 0) n = std::min<long long>(n, (q + period - 1) / period);
    }
    std::fclose(f);
  }
#endif
  return n < 1 ? 1 : n;
}

// A wait that spins, then (after kSpinBeforeYieldNs) gives the core away between checks (a
// descheduled thread it waits for may need this very core).
struct Backoff {
  int spins = 0;
  bool yielding = false;
  const int64_t start = now_ns();
  void Pause() {
    if (yielding) {
      std::this_thread::yield();
      return;
    }
    MTC_PAUSE();
    if (++spins % 256 == 0) {
      const int64_t now = now_ns();
      yielding = now - start > kSpinBeforeYieldNs || Calm(now);
    }
  }
};

class Pool {
 public:
  explicit Pool(int threads) : n_(threads < 1 ? 1 : threads), cores_(usable_cores()) {
    for (int w = 1; w < n_; ++w) workers_.emplace_back([this] { Work(); });
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
    // one task per thread: cutting the work finer (so that a preempted worker holds less of
    // it) cost 20% on a quiet host, in the native GEMM tiles and TVM's loops alike
    if (num_task <= 0) num_task = n_;
    if (n_ == 1 || num_task == 1 || in_task_ || num_task > kMaxTasks)
      return RunSerial(f, cdata, num_task);
    // the last launch is over: every task it had was claimed and done, so no thread reads
    // these fields until the claim word below names this launch
    f_ = f;
    cdata_ = cdata;
    env_.sync_handle = this;
    env_.num_task = num_task;
    error_.store(0, std::memory_order_relaxed);
    barrier_count_.store(0, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t g = (gen_.load(std::memory_order_relaxed) + 1) & kGenMask;
    claim_.store(Word(g, num_task, 0), std::memory_order_release);
    gen_.store(g);  // seq_cst: ordered before the sleepers check
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      cv_.notify_all();
    }
    run_delay().Sample(now_ns());
    RunClaimed(g);
    Backoff wait;  // tasks other threads claimed and still run
    while (done_.load(std::memory_order_acquire) < num_task) wait.Pause();
    return error_.load(std::memory_order_relaxed);
  }

  // all num_task tasks of the current launch meet here (they must run at once: num_task <= n;
  // a thread claims its next task only after finishing one, so each waiter is on its own)
  int Barrier() {
    const int total = env_.num_task;
    if (total > n_) return -1;  // not enough threads to hold every task at once
    const int phase = barrier_phase_.load(std::memory_order_acquire);
    if (barrier_count_.fetch_add(1, std::memory_order_acq_rel) + 1 == total) {
      barrier_count_.store(0, std::memory_order_relaxed);
      barrier_phase_.store(phase + 1, std::memory_order_release);
    } else {
      Backoff wait;
      while (barrier_phase_.load(std::memory_order_acquire) == phase) wait.Pause();
    }
    return 0;
  }

 private:
  // the claim word: launch generation (32 bits) | tasks of the launch (16) | next task (16)
  static constexpr int kMaxTasks = 0xffff;
  static constexpr uint64_t kGenMask = 0xffffffffULL;
  static uint64_t Word(uint64_t g, int num_task, int next) {
    return (g << 32) | (static_cast<uint64_t>(num_task) << 16) | static_cast<uint64_t>(next);
  }

  int RunSerial(FTVMParallelLambda f, void* cdata, int num_task) {
    TVMParallelGroupEnv env{nullptr, num_task};  // no barrier: the tasks run one by one
    int rc = 0;
    for (int t = 0; t < num_task && rc == 0; ++t) rc = f(t, &env, cdata);
    return rc;
  }

  // Take the next unclaimed task of launch `g`: its index, or -1 when none is left (or the
  // launch is over). A claimed task holds its launch open, so the fields stay valid for it.
  int Claim(uint64_t g) {
    uint64_t word = claim_.load(std::memory_order_acquire);
    while (true) {
      const int next = static_cast<int>(word & 0xffff);
      const int total = static_cast<int>((word >> 16) & 0xffff);
      if ((word >> 32) != g || next >= total) return -1;
      if (claim_.compare_exchange_weak(word, word + 1, std::memory_order_acq_rel,
                                       std::memory_order_acquire))
        return next;
    }
  }

  void RunClaimed(uint64_t g) {
    in_task_ = true;
    for (int t = Claim(g); t >= 0; t = Claim(g)) {
      if (f_(t, &env_, cdata_) != 0) error_.store(-1, std::memory_order_relaxed);
      done_.fetch_add(1, std::memory_order_acq_rel);
    }
    in_task_ = false;
  }

  void Work() {
    uint64_t seen = 0;  // gen_ at construction: a launch may come before this thread runs
    while (true) {
      // wait for the next launch: spin while a run is in progress, else sleep
      int64_t start = now_ns(), last = start;
      int spins = 0;
      while (gen_.load(std::memory_order_acquire) == seen) {
        // spin only where it steals no core: several runs at once (threads calling the
        // bundle concurrently) would spin workers on the cores the other runs compute on, and
        // a preempted spin says that something else wants this core
        const int runs = active_runs().load(std::memory_order_relaxed);
        if (runs > 0 && runs * n_ <= cores_ && !Calm(last)) {
          MTC_PAUSE();
          if (++spins % 1024 != 0 || (last = now_ns()) - start < kMaxSpinNs) continue;
        }
        std::unique_lock<std::mutex> lock(mutex_);
        sleepers_.fetch_add(1);
        cv_.wait(lock, [&] { return gen_.load() != seen; });
        sleepers_.fetch_sub(1);
        start = last = now_ns();
        spins = 0;
      }
      seen = gen_.load(std::memory_order_acquire);
      if (stop_.load()) return;
      RunClaimed(seen);  // nothing left to claim (a late wake-up): back to waiting
      run_delay().Sample(now_ns());
    }
  }

  const int n_;
  const int cores_;  // the process's usable cores: runs x threads beyond them do not spin
  std::vector<std::thread> workers_;
  FTVMParallelLambda f_ = nullptr;
  void* cdata_ = nullptr;
  TVMParallelGroupEnv env_{nullptr, 0};
  alignas(64) std::atomic<uint64_t> gen_{0};
  alignas(64) std::atomic<uint64_t> claim_{0};
  alignas(64) std::atomic<int> done_{0};
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

// the calling thread's pool size: set_threads, else TVM_NUM_THREADS, else the usable cores
inline int& thread_setting() {
  static thread_local int n = 0;
  return n;
}

inline int default_threads() {
  const char* env = std::getenv("TVM_NUM_THREADS");
  int n = env != nullptr ? std::atoi(env) : 0;
  if (n < 1) n = usable_cores();
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

