// The stream executor's threads (streams.h has the event points and a run's state): one
// persistent thread per stream, which makes its VM over the executable on first use and runs
// the calls posted to it; `Executor::run` runs every stream once and returns the outcome.
#pragma once

#include <deque>
#include <future>

#include "contract.h"
#include "streams.h"

namespace mtc::streams {

constexpr int kPooled = 2;  // TVM's pooled allocator, as relax.VirtualMachine uses

// at most `threads` threads in the calling thread's pool: the native kernels' pool once they
// are loaded (it runs TVM's parallel loops too), else TVM's (runtime.config_threadpool)
inline void limit_pool(int threads) {
  if (auto native = ffi::Function::GetGlobal("mtcompile.native.pool_threads")) {
    if ((*native)(0).cast<int64_t>() > threads) (*native)(threads);
    return;
  }
  auto num = ffi::Function::GetGlobal("runtime.NumThreads");
  auto config = ffi::Function::GetGlobal("runtime.config_threadpool");
  if (num && config && (*num)().cast<int64_t>() > threads) (*config)(1, threads);
}

// one stream's thread, its queue of calls, and what lives on it (its VM, looked-up functions)
struct Worker {
  Worker(int i, ffi::Module library, std::shared_ptr<const Spec> s)
      : index(i), lib(std::move(library)), spec(std::move(s)) {}
  const int index;
  const ffi::Module lib;
  const std::shared_ptr<const Spec> spec;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::function<void()>> jobs;
  bool stop = false;
  // on the worker's thread only
  std::optional<ffi::Module> vm;
  std::map<std::string, ffi::Function> fns;
  std::optional<ffi::Function> begin, end;  // the native pool's run marks

  void post(std::function<void()> job) {
    {
      std::lock_guard<std::mutex> lk(mu);
      jobs.push_back(std::move(job));
    }
    cv.notify_all();
  }

  void loop() {
    const std::string name = "mtc-stream" + std::to_string(index);
    pthread_setname_np(pthread_self(), name.substr(0, 15).c_str());
    for (;;) {
      std::function<void()> job;
      {
        std::unique_lock<std::mutex> lk(mu);
        cv.wait(lk, [this] { return stop || !jobs.empty(); });
        if (jobs.empty()) break;
        job = std::move(jobs.front());
        jobs.pop_front();
      }
      job();
    }
    fns.clear();  // the VM dies on its own thread
    vm.reset();
  }

  // the VM, made on first use after the thread is set up (hook, pool size)
  ffi::Module& the_vm() {
    if (vm.has_value()) return *vm;
    if (spec->on_start.has_value()) (*spec->on_start)(index);
    if (spec->device_type == kDLCPU) limit_pool(spec->threads);
    auto load = lib->GetFunction("vm_load_executable");
    if (!load.has_value()) TVM_FFI_THROW(ValueError) << "the executable has no vm_load_executable";
    ffi::Module m = (*load)().cast<ffi::Module>();
    auto init = m->GetFunction("vm_initialization").value();
    if (spec->device_type == kDLCPU)
      init(spec->device_type, spec->device_id, kPooled);
    else  // the host CPU runs shape computations
      init(spec->device_type, spec->device_id, kPooled, static_cast<int>(kDLCPU), 0, kPooled);
    begin = ffi::Function::GetGlobal("mtcompile.native.run_begin");
    end = ffi::Function::GetGlobal("mtcompile.native.run_end");
    if (!begin || !end) begin = end = std::nullopt;
    vm = m;
    return *vm;
  }

  ffi::Function function(const std::string& name) {
    auto it = fns.find(name);
    if (it != fns.end()) return it->second;
    auto f = the_vm()->GetFunction(name);
    if (!f.has_value()) TVM_FFI_THROW(AttributeError) << "the executable has no function '" << name << "'";
    return fns.emplace(name, *f).first->second;
  }
};

// calls stream `w`'s function on its thread within `run` (instrument: around every VM call)
inline Done call_stream(Worker& w, Run& run, const std::vector<ffi::Any>& args,
                        const std::optional<ffi::Function>& instrument) {
  Done d;
  tl_run = &run;
  tl_stream = w.index;
  bool marked = false;
  try {
    ffi::Function fn = w.function(w.spec->functions[w.index]);
    if (instrument.has_value()) (*w.vm)->GetFunction("set_instrument").value()(*instrument);
    std::vector<ffi::AnyView> views(args.begin(), args.end());
    if (w.begin.has_value()) (*w.begin)(), marked = true;  // the pool spins while a run is on
    fn.CallPacked(views.data(), static_cast<int32_t>(views.size()), &d.value);
  } catch (const ffi::Error& e) {
    d.error = e;
  } catch (const std::exception& e) {
    d.error = ffi::Error("RuntimeError", e.what(), "");
  }
  if (marked) (*w.end)();
  tl_run = nullptr;
  tl_stream = -1;
  if (d.error.has_value() && !run.diagnose) run.stop();  // the other streams stop too
  return d;
}

// the VM symbol innermost among the calls still open when a lone re-run raised, skipping the
// VM's builtins and the event points; "" when none was open
inline std::string innermost(const std::vector<std::string>& open) {
  for (auto it = open.rbegin(); it != open.rend(); ++it)
    if (it->rfind("vm.builtin", 0) != 0 && it->rfind("mtcompile.streams.", 0) != 0) return *it;
  return open.empty() ? "" : open.back();
}

class Executor {
 public:
  Executor(ffi::Module lib, Spec spec) : spec_(std::make_shared<const Spec>(std::move(spec))) {
    register_points();
    for (size_t i = 0; i < spec_->functions.size(); ++i) {
      auto w = std::make_shared<Worker>(static_cast<int>(i), lib, spec_);
      workers_.push_back(w);
      threads_.emplace_back([w] { w->loop(); });
    }
  }
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;
  ~Executor() {  // not closed: the threads end by themselves (they own their state)
    for (size_t i = 0; i < threads_.size(); ++i)
      if (threads_[i].joinable()) stop(i), threads_[i].detach();
  }

  size_t streams() const { return spec_->functions.size(); }
  const Spec& spec() const { return *spec_; }

  // every stream's function on its arguments, at once; one run at a time
  Outcome run(const std::vector<std::vector<ffi::Any>>& args) {
    if (args.size() != streams())
      throw BadInput(std::to_string(args.size()) + " argument lists for " +
                     std::to_string(streams()) + " streams");
    std::lock_guard<std::mutex> one(mu_);
    if (closed_) throw BadInput("this stream executor is closed");
    Run run(*spec_, false);
    std::vector<std::future<Done>> futures;
    for (size_t i = 0; i < streams(); ++i)
      futures.push_back(on(i, [this, i, &run, &args] {
        return call_stream(*workers_[i], run, args[i], std::nullopt);
      }));
    std::vector<Done> done;
    for (auto& f : futures) done.push_back(f.get());
    Outcome o = outcome(run, done, args);
    if (o.failed || o.deadlock)  // the next run makes fresh VMs: they look functions up anew
      for (auto& w : workers_) w->post([w] { w->fns.clear(), w->vm.reset(); });
    return o;
  }

  // stop the threads after their queued calls (their VMs go with them); idempotent
  void close() {
    std::lock_guard<std::mutex> one(mu_);
    for (size_t i = 0; i < threads_.size(); ++i)
      if (threads_[i].joinable()) stop(i), threads_[i].join();
    closed_ = true;
  }

 private:
  template <typename F>
  std::future<Done> on(size_t i, F f) {
    auto task = std::make_shared<std::packaged_task<Done()>>(std::move(f));
    std::future<Done> fut = task->get_future();
    workers_[i]->post([task] { (*task)(); });
    return fut;
  }

  void stop(size_t i) {
    {
      std::lock_guard<std::mutex> lk(workers_[i]->mu);
      workers_[i]->stop = true;
    }
    workers_[i]->cv.notify_all();
  }

  Outcome outcome(Run& run, std::vector<Done>& done, const std::vector<std::vector<ffi::Any>>& args) {
    Outcome o;
    for (size_t i = 0; i < done.size() && !o.failed; ++i) {
      if (!done[i].error.has_value() || run.aborted.count(static_cast<int>(i))) continue;
      o.failed = true;
      o.stream = static_cast<int>(i);
      o.cause = done[i].error;
      o.kernel = spec_->diagnose ? locate(i, args[i], run) : "";
      auto k = spec_->kernel_tenant.find(o.kernel);
      o.tenant = k != spec_->kernel_tenant.end() ? k->second : label(i);
    }
    if (!o.failed && run.deadlocked) {
      o.deadlock = true;
      o.blocked = run.blocked;
      o.stream = o.blocked.empty() ? 0 : o.blocked.begin()->first;
      o.tenant = label(o.stream);
      o.kernel = kWait;
    }
    if (!o.failed && !o.deadlock)
      for (Done& d : done) o.results.push_back(std::move(d.value));
    return o;
  }

  std::string label(size_t i) const {
    return i < spec_->stream_tenants.size() ? spec_->stream_tenants[i] : "?";
  }

  // the VM symbol that raises when stream `i` runs again alone (waits skipped; the values
  // other streams handed over in the failed run are given again)
  std::string locate(size_t i, const std::vector<ffi::Any>& args, Run& failed) {
    Run again(*spec_, true);
    again.values = failed.values;
    auto open = std::make_shared<std::vector<std::string>>();
    ffi::Function instrument = ffi::Function::FromPacked([open](ffi::PackedArgs a, ffi::Any* rv) {
      if (a[2].cast<bool>())
        open->push_back(a[1].cast<std::string>());
      else if (!open->empty())
        open->pop_back();
      *rv = static_cast<int64_t>(0);
    });
    Worker* w = workers_[i].get();
    // (the instrument stays with this VM: `run` has every stream make a fresh one next)
    Done d = on(i, [w, &again, &args, &instrument] {
               return call_stream(*w, again, args, instrument);
             }).get();
    return d.error.has_value() ? innermost(*open) : "";
  }

  std::shared_ptr<const Spec> spec_;
  std::vector<std::shared_ptr<Worker>> workers_;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  bool closed_ = false;
};

// ------------------------------------------------------------------ the record and messages
// the stream functions' record (the manifest's streams.run, mtcompile.abi.StreamFunctions):
// what an executor needs of it; `where` names it in errors
inline Spec read_spec(const ffi::Map<ffi::Any, ffi::Any>& m, const std::string& where) {
  Spec s;
  for (const ffi::Any& f : as_array(field(m, "functions", where), where + ".functions"))
    s.functions.push_back(str(f, where + ".functions"));
  s.num_events = integer(field(m, "num_events", where), where + ".num_events");
  if (s.num_events < 0) throw Corrupt(where + ".num_events", "expected a count >= 0");
  auto es = m.find(ffi::String("event_streams"));
  if (es != m.end() && (*es).second != nullptr)
    for (const ffi::Any& p : as_array((*es).second, where + ".event_streams")) {
      auto pair = as_array(p, where + ".event_streams");
      if (pair.size() != 2) throw Corrupt(where + ".event_streams", "expected [[from, to], ...]");
      s.event_streams.emplace_back(integer(pair[0], where + ".event_streams"),
                                   integer(pair[1], where + ".event_streams"));
    }
  auto st = m.find(ffi::String("stream_tenants"));
  if (st != m.end() && (*st).second != nullptr)
    for (const ffi::Any& t : as_array((*st).second, where + ".stream_tenants"))
      s.stream_tenants.push_back(str(t, where + ".stream_tenants"));
  auto kt = m.find(ffi::String("kernel_tenant"));
  if (kt != m.end() && (*kt).second != nullptr)
    for (const auto& kv : as_map((*kt).second, where + ".kernel_tenant"))
      s.kernel_tenant[str(kv.first, where)] = str(kv.second, where + ".kernel_tenant");
  return s;
}

// a failed run's message, as the Python runtime's StreamError / DeadlockError words it
inline std::string message(const Outcome& o, const Spec& s) {
  std::ostringstream out;
  if (o.deadlock) {
    out << "deadlock: no progress for " << py_float(s.timeout_s) << " s";
    const char* sep = "; ";
    for (const auto& [stream, event] : o.blocked) {
      out << sep << "stream " << stream << " (tenant " << s.stream_tenants.at(stream)
          << ") waits for event " << event << " (signalled by ";
      if (event >= 0 && event < static_cast<int64_t>(s.event_streams.size()))
        out << "stream " << s.event_streams[event].first << ")";
      else
        out << "an unknown stream)";
    }
    out << ": a missing signal?";
    return out.str();
  }
  const std::string where = o.kernel.empty() ? "an unknown kernel (did not recur alone)"
                                             : "kernel '" + o.kernel + "'";
  out << "stream " << o.stream << " (tenant " << o.tenant << ") failed in " << where << ": "
      << (o.cause ? o.cause->kind() + ": " + o.cause->message() : std::string("?"));
  return out.str();
}

}  // namespace mtc::streams
