// The stream executor of run_all (the runtime core's, for both front-ends): each stream's Relax
// function runs on a persistent thread of its own with a VM of its own over the one executable
// (a VM is not thread-safe), made on that thread; the streams meet at event points.
//
// Event points (mtcompile.abi: lowering emits them inside the stream functions) find their run
// through a thread-local set by the stream thread: signal(event) sets an event, wait(event)
// blocks on the run's condition variable until it is set. A failing stream aborts the run: every
// stream waiting wakes and stops. A wait past the run's deadline is a deadlock (a missing
// signal): it aborts the run too, and the run reports every stream left blocked with the event it
// waits for. put/get hand a tensor from one stream to another.
//
// A run's outcome (results, or a failure: the first failing stream, its error and the kernel
// that raised when the stream ran again alone; or the deadlock's blocked streams) goes to its
// caller only. Runs of one executor are serialized (a lock); a failed run leaves nothing behind
// (its state is its own; its streams make fresh VMs for the next run, which look the functions
// up anew), so later runs and other callers' runs go on on the same threads.
//
// Threads: on the CPU each stream thread limits its pool (the native kernels' pool, else TVM's)
// to `threads`. Hooks from the Python runtime, called on the stream threads: on_start(stream)
// before the VM is made (PyTorch's per-thread count; a raw CUDA stream, UNTESTED: no GPU here),
// on_signal(event, stream) before an event is set (CUDA's cross-stream sync).
#pragma once

#include <pthread.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/ffi/string.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace mtc::streams {

namespace ffi = tvm::ffi;
using Clock = std::chrono::steady_clock;

// mtcompile.abi's names of the event points
constexpr const char* kSignal = "mtcompile.streams.signal";
constexpr const char* kWait = "mtcompile.streams.wait";
constexpr const char* kPut = "mtcompile.streams.put";
constexpr const char* kGet = "mtcompile.streams.get";

// what an executor runs: the record lowering fills (mtcompile.abi.StreamFunctions), and options
struct Spec {
  std::vector<std::string> functions;  // the VM function of each stream
  int64_t num_events = 0;
  std::vector<std::pair<int64_t, int64_t>> event_streams;  // (signaller, waiter); may be empty
  std::vector<std::string> stream_tenants;                  // a label per stream, for errors
  std::map<std::string, std::string> kernel_tenant;         // VM symbol -> tenant
  int device_type = kDLCPU, device_id = 0;
  int threads = 1;  // CPU threads per stream
  double timeout_s = 120.0;
  bool diagnose = true;  // name the failing kernel (a lone re-run of the failing stream)
  std::optional<ffi::Function> on_start, on_signal;
};

// one run: its events, the values handed over, the abort flag and the deadline
struct Run {
  Run(const Spec& s, bool diag) : spec(s), events(s.num_events, 0), diagnose(diag) {
    deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                  std::chrono::duration<double>(s.timeout_s));
  }
  const Spec& spec;
  std::mutex mu;
  std::condition_variable cv;
  std::vector<char> events;
  std::map<int64_t, ffi::Any> values;  // value id -> tensor (put/get)
  bool diagnose, abort = false, deadlocked = false;
  std::set<int> aborted;        // streams stopped because the run was aborted
  std::map<int, int64_t> blocked;  // stream -> the event it waited for when stopped
  Clock::time_point deadline;

  void stop() {  // wake every waiter: they stop
    {
      std::lock_guard<std::mutex> lk(mu);
      abort = true;
    }
    cv.notify_all();
  }
};

inline thread_local Run* tl_run = nullptr;
inline thread_local int tl_stream = -1;

inline Run& current() {
  if (tl_run == nullptr)
    TVM_FFI_THROW(RuntimeError) << kSignal << "/" << kWait << " called outside a StreamExecutor run";
  return *tl_run;
}

inline size_t event_of(const Run& r, int64_t event) {
  if (event < 0 || event >= static_cast<int64_t>(r.events.size()))
    TVM_FFI_THROW(IndexError) << "stream " << tl_stream << ": event " << event
                              << " out of range: this run has " << r.events.size() << " events";
  return static_cast<size_t>(event);
}

inline void signal(int64_t event) {
  Run& r = current();
  if (r.diagnose) return;
  const size_t e = event_of(r, event);
  if (r.spec.on_signal.has_value()) (*r.spec.on_signal)(event, tl_stream);
  {
    std::lock_guard<std::mutex> lk(r.mu);
    r.events[e] = 1;
  }
  r.cv.notify_all();
}

inline void wait(int64_t event) {
  Run& r = current();
  if (r.diagnose) return;  // a lone re-run to find the failing kernel: nothing to wait for
  const size_t e = event_of(r, event);
  std::unique_lock<std::mutex> lk(r.mu);
  while (!r.events[e]) {
    if (!r.abort && Clock::now() >= r.deadline) {  // the first time-out stops every stream
      r.deadlocked = r.abort = true;
      r.cv.notify_all();
    }
    if (r.abort) {
      r.aborted.insert(tl_stream);
      r.blocked[tl_stream] = event;
      TVM_FFI_THROW(RuntimeError) << "stream " << tl_stream << " stopped while waiting for event "
                                  << event;
    }
    r.cv.wait_until(lk, r.deadline);
  }
}

inline void put(int64_t value, ffi::Any tensor) {
  Run& r = current();
  std::lock_guard<std::mutex> lk(r.mu);
  r.values[value] = std::move(tensor);
}

inline ffi::Any get(int64_t value) {
  Run& r = current();
  std::lock_guard<std::mutex> lk(r.mu);
  auto it = r.values.find(value);
  if (it == r.values.end())
    TVM_FFI_THROW(RuntimeError) << "stream " << tl_stream << " reads value " << value
                                << " before its producer handed it over: a missing event";
  return it->second;
}

// the event points as global functions, once per process (the core's static init, the driver)
inline void register_points() {
  static std::once_flag once;
  std::call_once(once, [] {
    namespace refl = ffi::reflection;
    refl::GlobalDef().def(kSignal, [](int64_t e) { signal(e); });
    refl::GlobalDef().def(kWait, [](int64_t e) { wait(e); });
    refl::GlobalDef().def(kPut, [](int64_t v, ffi::Any t) { put(v, std::move(t)); });
    refl::GlobalDef().def(kGet, [](int64_t v) { return get(v); });
  });
}

// what one stream's call gave: its result, or its error
struct Done {
  ffi::Any value;
  std::optional<ffi::Error> error;
};

// a run's outcome: results (one per stream), or a failure
struct Outcome {
  std::vector<ffi::Any> results;
  bool failed = false, deadlock = false;
  int stream = -1;  // the failing stream (deadlock: the first blocked one)
  std::string tenant, kernel;  // kernel: "" when unknown
  std::optional<ffi::Error> cause;
  std::map<int, int64_t> blocked;
};

}  // namespace mtc::streams
