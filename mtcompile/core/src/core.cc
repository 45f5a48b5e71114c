// The runtime core's entry points for the Python runtime: the artifact contract of library.h /
// contract.h / manifest.h (the code mtcompile-run includes) as TVM global functions, bound by
// mtcompile.runtime.contract. Each returns [kind, message, values...]: kind "" (passed), "bad"
// (refused: the user's bundle or input; the message is the driver's exit-3 line) or "error".
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/optional.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/ffi/string.h>

#include <exception>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "contract.h"
#include "executor.h"
#include "inputs.h"
#include "library.h"
#include "manifest.h"

namespace {

namespace ffi = tvm::ffi;
using Result = ffi::Array<ffi::Any>;

template <typename F>
Result guarded(F f) {
  try {
    return f();
  } catch (const mtc::BadInput& e) {
    return Result({ffi::String("bad"), ffi::String(e.what())});
  } catch (const std::exception& e) {
    return Result({ffi::String("error"), ffi::String(e.what())});
  }
}

Result ok(std::initializer_list<ffi::Any> values) {
  Result r({ffi::String(""), ffi::String("")});
  for (const ffi::Any& v : values) r.push_back(v);
  return r;
}

// the library's own table from its text (as library_weights read it) and its symbol's size
mtc::LibWeights table_of(const std::string& text, int64_t size, const std::string& src) {
  mtc::LibWeights w;
  w.size = size;
  if (!text.empty()) {
    w.text = text;
    w.table = mtc::read_weights(ffi::json::Parse(text), src + ": its weights table is corrupt: ");
  }
  return w;
}

// a call's inputs as the checker gets them, per input: dtype name, data address (0: values not
// checked), ndim, then the dims; the count of records is the count of inputs given
std::vector<mtc::Arg> args_of(ffi::PackedArgs a) {
  std::vector<mtc::Arg> out;
  for (int i = 0; i < a.size();) {
    if (i + 3 > a.size()) throw std::runtime_error("input_checker: truncated input record");
    mtc::Arg arg;
    arg.dtype = a[i].cast<std::string>();
    arg.data = reinterpret_cast<const void*>(a[i + 1].cast<int64_t>());
    const int64_t ndim = a[i + 2].cast<int64_t>();
    if (ndim < 0 || i + 3 + ndim > a.size())
      throw std::runtime_error("input_checker: bad ndim in an input record");
    for (int64_t d = 0; d < ndim; ++d) arg.shape.push_back(a[i + 3 + d].cast<int64_t>());
    out.push_back(std::move(arg));
    i += 3 + static_cast<int>(ndim);
  }
  return out;
}

// shared_checker(run_all_inputs' JSON: lists of [tenant, input] uses) -> a function of one
// run_all call's bytes, per use of each group of several uses in order: data address, byte
// count; it returns None, or the refusal's message (mtcompile-run's exit-3 line)
ffi::Function shared_checker(const std::string& groups_json) {
  std::vector<std::vector<std::pair<std::string, std::string>>> groups;
  for (const ffi::Any& g : ffi::json::Parse(groups_json).cast<ffi::Array<ffi::Any>>()) {
    auto uses = g.cast<ffi::Array<ffi::Any>>();
    if (uses.size() < 2) continue;
    groups.emplace_back();
    for (const ffi::Any& u : uses) {
      auto pair = u.cast<ffi::Array<ffi::Any>>();
      groups.back().emplace_back(pair[0].cast<std::string>(), pair[1].cast<std::string>());
    }
  }
  return ffi::Function::FromPacked([groups](ffi::PackedArgs a, ffi::Any* rv) {
    *rv = nullptr;
    int i = 0;
    try {
      for (const auto& group : groups) {
        std::vector<mtc::Bytes> uses;
        for (size_t k = 0; k < group.size() && i + 1 < a.size(); ++k, i += 2)
          uses.emplace_back(reinterpret_cast<const void*>(a[i].cast<int64_t>()),
                            static_cast<size_t>(a[i + 1].cast<int64_t>()));
        mtc::check_shared(group, uses);
      }
    } catch (const mtc::BadInput& e) {
      *rv = ffi::String(e.what());
    }
  });
}

// input_checker(tenant, its inputs' JSON) -> a function of one call's input records (args_of)
// that returns None, or the refusal's message (mtcompile-run's exit-3 line)
ffi::Function input_checker(const std::string& tenant, const std::string& inputs) {
  mtc::Tenant t;
  t.name = tenant;
  t.inputs = mtc::read_ios(ffi::json::Parse(inputs), "tenants." + tenant + ".inputs");
  return ffi::Function::FromPacked([t](ffi::PackedArgs a, ffi::Any* rv) {
    try {
      mtc::check_inputs(t, args_of(a));
      *rv = nullptr;
    } catch (const mtc::BadInput& e) {
      *rv = ffi::String(e.what());
    }
  });
}

}  // namespace

namespace {

// open, the weights tables and the loaded library
void def_bundle_checks() {
  namespace refl = tvm::ffi::reflection;
  // open(dir, private_path, key or None, require_signature) -> [.., src, manifest text, verified]
  refl::GlobalDef().def("mtcompile.core.open", [](ffi::String dir, ffi::String private_path,
                                                  ffi::Optional<ffi::Bytes> key, bool require) {
    return guarded([&] {
      std::optional<std::string> k;
      if (key.has_value()) k = std::string(key.value().data(), key.value().size());
      std::string src;
      const mtc::Manifest man = mtc::open_checked(dir, k, require, private_path, &src);
      return ok({ffi::String(src), ffi::String(man.text), man.verified});
    });
  });
  // library_weights(private path of a loaded library, its name) -> [.., base, size, table text]
  refl::GlobalDef().def("mtcompile.core.library_weights", [](ffi::String path, ffi::String src) {
    return guarded([&] {
      const mtc::LibWeights w = mtc::library_weights(path, src);
      return ok({reinterpret_cast<int64_t>(w.base), w.size, ffi::String(w.text)});
    });
  });
  // check_weights(dir, manifest text, the library's table text, its symbol's size, lib name)
  refl::GlobalDef().def("mtcompile.core.check_weights",
                        [](ffi::String dir, ffi::String text, ffi::String table, int64_t size,
                           ffi::String src) {
    return guarded([&] {
      mtc::check_manifest_weights(mtc::parse_manifest(dir, text), table_of(table, size, src));
      return ok({});
    });
  });
  // check_loaded(dir, manifest text, private path, lib name): what mtcompile-run checks after
  // open (library.h load_checked: dlopen, weights tables, embedded manifest), for a manifest
  // the Python reader refuses, so that both name the first rule broken in one order
  refl::GlobalDef().def("mtcompile.core.check_loaded",
                        [](ffi::String dir, ffi::String text, ffi::String path, ffi::String src) {
    return guarded([&] {
      mtc::load_checked(mtc::parse_manifest(dir, text), path, src);
      return ok({});
    });
  });
}

// the embedded manifest, one table, the host, file names, inputs
void def_other_checks() {
  namespace refl = tvm::ffi::reflection;
  // check_embedded(dir, manifest text, the embedded manifest's text, lib name)
  refl::GlobalDef().def("mtcompile.core.check_embedded",
                        [](ffi::String dir, ffi::String text, ffi::String embedded, ffi::String src) {
    return guarded([&] {
      mtc::check_embedded_text(mtc::parse_manifest(dir, text), embedded, src);
      return ok({});
    });
  });
  // check_table(table text, symbol size, where): one table against its symbol
  refl::GlobalDef().def("mtcompile.core.check_table",
                        [](ffi::String table, int64_t size, ffi::String where) {
    return guarded([&] {
      ffi::String err;
      ffi::Any parsed = ffi::json::Parse(table, &err);
      if (!err.empty()) throw mtc::BadInput(std::string(where) + ": its weights table is corrupt: not valid JSON");
      mtc::check_weights(mtc::read_weights(parsed, std::string(where) + ": its weights table is corrupt: "), size, where);
      return ok({});
    });
  });
  // missing_features(LLVM features, cpuinfo flags or None: this host's) -> "['avx2']" or ""
  refl::GlobalDef().def("mtcompile.core.missing_features",
                        [](ffi::Array<ffi::String> features,
                           ffi::Optional<ffi::Array<ffi::String>> flags) {
    std::vector<std::string> f(features.begin(), features.end());
    std::optional<std::set<std::string>> given;
    if (flags.has_value()) given = std::set<std::string>(flags.value().begin(), flags.value().end());
    return ffi::String(mtc::missing_features(f, given));
  });
  refl::GlobalDef().def("mtcompile.core.file_name", [](ffi::String tenant, ffi::String name) {
    return ffi::String(mtc::file_name(tenant, name));
  });
  refl::GlobalDef().def("mtcompile.core.input_checker", [](ffi::String tenant, ffi::String inputs) {
    return input_checker(tenant, inputs);
  });
  refl::GlobalDef().def("mtcompile.core.shared_checker",
                        [](ffi::String groups) { return shared_checker(groups); });
  refl::GlobalDef().def("mtcompile.core.tvm_version", []() { return ffi::String(MTC_TVM_VERSION); });
}

// a run's outcome for the Python runtime (mtcompile.runtime.executor): ["", results...],
// ["failed", stream, tenant, kernel ("": unknown), cause (the error)] or
// ["deadlock", stream, tenant, blocked stream, its event, ...]
Result outcome_of(const mtc::streams::Outcome& o) {
  if (o.failed)
    return Result({ffi::String("failed"), o.stream, ffi::String(o.tenant), ffi::String(o.kernel),
                   *o.cause});
  if (o.deadlock) {
    Result r({ffi::String("deadlock"), o.stream, ffi::String(o.tenant)});
    for (const auto& [stream, event] : o.blocked) r.push_back(stream), r.push_back(event);
    return r;
  }
  Result r({ffi::String("")});
  for (const ffi::Any& v : o.results) r.push_back(v);
  return r;
}

// stream_executor(executable module, streams.run record's JSON, device type, device id, threads
// per stream, timeout_s, diagnose, on_start or None, on_signal or None) -> [run, close]:
// run(argument list per stream) -> outcome_of; close() stops the stream threads
Result stream_executor(ffi::Module lib, const std::string& record, int device_type, int device_id,
                       int threads, double timeout_s, bool diagnose,
                       ffi::Optional<ffi::Function> on_start, ffi::Optional<ffi::Function> on_signal) {
  mtc::streams::Spec spec =
      mtc::streams::read_spec(mtc::as_map(ffi::json::Parse(record), "streams.run"), "streams.run");
  spec.device_type = device_type, spec.device_id = device_id;
  spec.threads = threads, spec.timeout_s = timeout_s, spec.diagnose = diagnose;
  if (on_start.has_value()) spec.on_start = on_start.value();
  if (on_signal.has_value()) spec.on_signal = on_signal.value();
  auto ex = std::make_shared<mtc::streams::Executor>(lib, std::move(spec));
  ffi::Function run = ffi::Function::FromTyped([ex](ffi::Array<ffi::Array<ffi::Any>> args) {
    std::vector<std::vector<ffi::Any>> lists;
    for (const auto& a : args) lists.emplace_back(a.begin(), a.end());
    return outcome_of(ex->run(lists));
  });
  ffi::Function close = ffi::Function::FromTyped([ex]() { ex->close(); });
  return Result({run, close});
}

}  // namespace

TVM_FFI_STATIC_INIT_BLOCK() {
  def_bundle_checks();
  def_other_checks();
  mtc::streams::register_points();
  tvm::ffi::reflection::GlobalDef().def("mtcompile.core.stream_executor", stream_executor);
}
