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

namespace refl = tvm::ffi::reflection;

// Opening a bundle's library (every check of the contract) and reading its weights table.
void register_library() {
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
}

// The checks of a manifest against the library's weights tables and embedded manifest, and
// of one weights table against its symbol.
void register_checks() {
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
}

// What the host offers (CPU features), file names for outputs, and the TVM version built
// against.
void register_host() {
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
  refl::GlobalDef().def("mtcompile.core.tvm_version", []() { return ffi::String(MTC_TVM_VERSION); });
}

}  // namespace

TVM_FFI_STATIC_INIT_BLOCK() {
  register_library();
  register_checks();
  register_host();
}
