// The manifest as the runtime core reads it: the fields it uses, and what runtime/manifest.py
// requires of every manifest (rules library-name, run-all-inputs; contract.h).
#pragma once

#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/string.h>

#include <sys/stat.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "contract.h"

namespace mtc {

// ------------------------------------------------------------------ the manifest
struct IO {
  std::string name, dtype;
  std::string file;  // an output's file name, as the build recorded it
  std::vector<int64_t> shape;  // -1: a symbolic (dynamic) dim, its name in `dims`
  std::vector<std::string> dims;  // per axis: the dim's name, empty when static
  std::map<std::string, std::pair<int64_t, int64_t>> bounds;  // dim name -> [lo, hi]
  bool ranged = false;
  int64_t lo = 0, hi = 0;  // an index input's values lie in [lo, hi)
};

struct Tenant {
  std::string name;
  std::vector<IO> inputs, outputs;
};

inline std::vector<IO> read_ios(const ffi::Any& v, const std::string& where) {
  std::vector<IO> ios;
  auto items = as_array(v, where);
  for (size_t k = 0; k < items.size(); ++k) {
    const std::string at = where + "[" + std::to_string(k) + "]";
    auto m = as_map(items[k], at);
    IO io;
    io.name = str(field(m, "name", at), at + ".name");
    io.dtype = str(field(m, "dtype", at), at + ".dtype");
    auto b = m.find(ffi::String("dims"));
    if (b != m.end() && (*b).second != nullptr)
      for (const auto& kv : as_map((*b).second, at + ".dims")) {
        auto lh = as_array(kv.second, at + ".dims");
        if (lh.size() != 2) throw Corrupt(at + ".dims", "expected {dim name: [lo, hi]}");
        io.bounds[str(kv.first, at + ".dims")] = {
            integer(lh[0], at + ".dims"), integer(lh[1], at + ".dims")};
      }
    for (const ffi::Any& d : as_array(field(m, "shape", at), at + ".shape")) {
      auto name = d.try_cast<ffi::String>();
      io.shape.push_back(name ? -1 : integer(d, at + ".shape"));
      io.dims.push_back(name ? std::string(*name) : std::string());
    }
    auto r = m.find(ffi::String("index_range"));
    if (r != m.end() && (*r).second != nullptr) {
      auto lh = as_array((*r).second, at + ".index_range");
      if (lh.size() != 2) throw Corrupt(at + ".index_range", "expected [lo, hi]");
      io.ranged = true;
      io.lo = integer(lh[0], at + ".index_range");
      io.hi = integer(lh[1], at + ".index_range");
    }
    ios.push_back(io);
  }
  return ios;
}

struct Manifest {
  std::string dir, path;  // the bundle directory, its manifest.json
  std::string text;  // manifest.json as read
  ffi::Map<ffi::Any, ffi::Any> json;  // and parsed
  std::string library, target, library_sha256, tvm_version, cpu;
  std::vector<std::string> cpu_features;
  std::optional<WeightsTable> weights;
  std::vector<Tenant> tenants;  // in tenant_order
  std::vector<std::pair<std::string, std::string>> run_all_inputs;  // (tenant, input) each
  // run_all's parameters: the (tenant, input) uses each one serves (several: a shared input)
  std::vector<std::vector<std::pair<std::string, std::string>>> run_all_groups;
  bool streamed = false;
  bool verified = false;  // its signature checked with a key (open_checked)
  std::vector<std::string> torch_kernels;

  const Tenant& tenant(const std::string& name) const {
    for (const Tenant& t : tenants)
      if (t.name == name) return t;
    std::string names;
    for (const Tenant& t : tenants) names += (names.empty() ? "" : ", ") + t.name;
    throw BadInput("no tenant '" + name + "' in this bundle (tenants: " + names +
                   "; or run_all)");
  }
};

// what runtime/manifest.py requires of every manifest (and artifact.py: library_sha256)
const char* const kRequired[] = {"name", "library", "target", "versions", "pipeline",
                                 "kernels", "tenant_order", "run_all_inputs", "tenants",
                                 "graph", "graph_view", "streams", "subsets", "library_sha256"};

inline std::string pairs_repr(const std::vector<std::pair<std::string, std::string>>& v) {
  std::string r = "[";
  for (size_t i = 0; i < v.size(); ++i)
    r += (i ? ", ('" : "('") + v[i].first + "', '" + v[i].second + "')";
  return (r + "]").substr(0, 200);
}

// rule run-all-inputs: each tenant input served once (runtime/manifest.py)
inline void read_run_all_inputs(Manifest& man, const ffi::Map<ffi::Any, ffi::Any>& m) {
  std::vector<std::pair<std::string, std::string>> want, found;
  for (const Tenant& t : man.tenants)
    for (const IO& io : t.inputs) want.emplace_back(t.name, io.name);
  bool empty_group = false;
  for (const ffi::Any& g : as_array(field(m, "run_all_inputs", ""), "run_all_inputs")) {
    auto group = as_array(g, "run_all_inputs");
    empty_group = empty_group || group.empty();
    man.run_all_groups.emplace_back();
    for (size_t i = 0; i < group.size(); ++i) {
      auto pair = as_array(group[i], "run_all_inputs");
      if (pair.size() != 2)
        throw BadInput(man.path + " is corrupt: key 'run_all_inputs': expected lists of [tenant, input] pairs");
      found.emplace_back(str(pair[0], "run_all_inputs"), str(pair[1], "run_all_inputs"));
      man.run_all_groups.back().push_back(found.back());
      if (i == 0) man.run_all_inputs.push_back(found.back());  // one array feeds the group
    }
  }
  auto w = want, f = found;
  std::sort(w.begin(), w.end()), std::sort(f.begin(), f.end());
  if (w != f || empty_group)
    throw BadInput(man.path + " is corrupt: key 'run_all_inputs': expected each tenant input "
                   "once (" + pairs_repr(want) + "), found " + pairs_repr(found));
}

// rule file-name: an output's recorded file, a plain safe name ending in .npy, unique in the
// bundle (case-insensitively: one file per name on any disk)
inline std::string output_file(const ffi::Map<ffi::Any, ffi::Any>& io, const std::string& mpath,
                               const std::string& key, std::set<std::string>& files) {
  auto f = io.find(ffi::String("file"));
  if (f == io.end() || (*f).second == nullptr)
    throw BadInput(mpath + " is corrupt: key '" + key + "': missing");
  auto s = (*f).second.try_cast<ffi::String>();
  std::string name = s && (*f).second.type_index() != kTVMFFIBool ? std::string(*s) : "";
  bool safe = name.size() > 4 && name.compare(name.size() - 4, 4, ".npy") == 0 && name[0] != '.';
  for (char c : name)
    safe = safe && (std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.' || c == '-');
  if (!safe)
    throw BadInput(mpath + " is corrupt: key '" + key + "': expected a file name of "
                   "[A-Za-z0-9_.-] ending in .npy, found " + py_repr60((*f).second));
  std::string lower = name;
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (!files.insert(lower).second)
    throw BadInput(mpath + " is corrupt: key '" + key + "': '" + name + "' is the file of "
                   "another output");
  return name;
}

inline void read_tenants(Manifest& man, const ffi::Map<ffi::Any, ffi::Any>& m) {
  std::set<std::string> files;
  auto tenants = as_map(field(m, "tenants", ""), "tenants");
  for (const ffi::Any& n : as_array(field(m, "tenant_order", ""), "tenant_order")) {
    Tenant t;
    t.name = str(n, "tenant_order");
    auto tm = as_map(field(tenants, t.name, "tenants"), "tenants." + t.name);
    t.inputs = read_ios(field(tm, "inputs", "tenants." + t.name), "tenants." + t.name + ".inputs");
    t.outputs =
        read_ios(field(tm, "outputs", "tenants." + t.name), "tenants." + t.name + ".outputs");
    auto outs = as_array(field(tm, "outputs", "tenants." + t.name), "tenants." + t.name + ".outputs");
    for (size_t i = 0; i < outs.size(); ++i)
      t.outputs[i].file = output_file(as_map(outs[i], "outputs"), man.path,
                                      "tenants." + t.name + ".outputs[" + std::to_string(i) + "].file",
                                      files);
    man.tenants.push_back(t);
  }
  if (man.tenants.size() != tenants.size())
    throw BadInput(man.path + " is corrupt: key 'tenant_order': does not list the tenants");
}

// manifest.json of the bundle in `dir`, as read (checked by parse_manifest)
inline std::string manifest_text(const std::string& dir) {
  const std::string path = dir + "/manifest.json";
  struct stat st;
  if (stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode))
    throw BadInput(dir + ": no manifest.json; is this a directory written by Bundle.save?");
  std::ifstream f(path);
  if (!f) throw BadInput(path + " cannot be read");
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

// the manifest `text` of the bundle in `dir`, checked field by field
inline Manifest parse_manifest(const std::string& dir, const std::string& text) {
  Manifest man;
  man.dir = dir, man.path = dir + "/manifest.json", man.text = text;
  ffi::String err;
  ffi::Any root = ffi::json::Parse(text, &err);
  if (!err.empty()) throw BadInput(man.path + " is corrupt: not valid JSON (" + std::string(err) + ")");
  auto root_map = root.try_cast<ffi::Map<ffi::Any, ffi::Any>>();
  if (!root_map || py_type(root) != "dict")
    throw BadInput(man.path + " is corrupt: expected a JSON object, found " + py_type(root));
  auto m = man.json = *root_map;
  auto fmt = m.find(ffi::String("format"));
  std::string format = "None";
  if (fmt != m.end()) {
    format.clear();
    py_repr((*fmt).second, format);  // as Python prints it: 'x', None, 5
  }
  if (format != "'" + std::string(kFormat) + "'")
    throw BadInput(man.path + ": format " + format + ", this mtcompile reads '" + kFormat +
                   "'" + (format.rfind("'mtcompile-bundle/", 0) == 0
                              ? "; rebuild the bundle with this mtcompile" : ""));
  try {
  for (const char* k : kRequired)
    if (m.find(ffi::String(k)) == m.end()) throw Corrupt(k, "missing");
  man.library = str(field(m, "library", ""), "library");
  check_library_name(man.library, man.path);
  man.target = str(field(m, "target", ""), "target");
  man.library_sha256 = str(field(m, "library_sha256", ""), "library_sha256");
  man.tvm_version = str(field(as_map(field(m, "versions", ""), "versions"), "tvm",
                              "versions"), "versions.tvm");
  auto cpu = m.find(ffi::String("cpu"));
  if (cpu != m.end() && (*cpu).second != nullptr) man.cpu = str((*cpu).second, "cpu");
  auto features = m.find(ffi::String("cpu_features"));
  if (features != m.end() && (*features).second != nullptr)
    for (const ffi::Any& f : as_array((*features).second, "cpu_features"))
      man.cpu_features.push_back(str(f, "cpu_features"));
  read_tenants(man, m);
  read_run_all_inputs(man, m);
  auto streams = as_map(field(m, "streams", ""), "streams");
  auto run = streams.find(ffi::String("run"));
  man.streamed = run != streams.end() && (*run).second != nullptr;
  for (const auto& kv : as_map(field(m, "kernels", ""), "kernels"))
    if (str(kv.second, "kernels") == "torch") man.torch_kernels.push_back(str(kv.first, "kernels"));
  auto w = m.find(ffi::String("weights"));
  if (w != m.end() && (*w).second != nullptr) man.weights = read_weights((*w).second, man.path + " is corrupt: ");
  } catch (const Corrupt& e) {
    throw BadInput(man.path + " is corrupt: " + e.what());
  }
  return man;
}

inline Manifest read_manifest(const std::string& dir) { return parse_manifest(dir, manifest_text(dir)); }

}  // namespace mtc
