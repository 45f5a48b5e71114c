// mtcompile-run: load a saved mtcompile bundle with TVM's runtime only (no Python, no compiler),
// run one tenant or run_all on inputs read from .npy files, write the outputs as .npy files.
//
//   mtcompile-run BUNDLE_DIR ENTRY INPUT_DIR OUTPUT_DIR [--threads N] [--timing]
//
// ENTRY is a tenant's name or "run_all". Inputs are INPUT_DIR/<tenant>.<input>.npy (for run_all:
// every tenant's); outputs are written to OUTPUT_DIR/<tenant>.<output>.npy. Inputs are checked
// against the manifest (shape, dtype, index ranges) before the call, as the Python runtime does.
// --timing prints {"load_s", "first_call_s", "peak_rss_kib"} as JSON on stdout. Exit status: 0 ok, 2 usage,
// 3 bad input or bundle, 4 run-time error.
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

// an error in what the user gave (inputs, bundle): exit 3
struct BadInput : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ------------------------------------------------------------------ dtypes and .npy files
struct DType {
  const char* name;   // the manifest's name
  const char* descr;  // numpy's array-protocol type string
  DLDataType dl;
};
const DType kDTypes[] = {
    {"float32", "<f4", {kDLFloat, 32, 1}}, {"float64", "<f8", {kDLFloat, 64, 1}},
    {"float16", "<f2", {kDLFloat, 16, 1}}, {"int64", "<i8", {kDLInt, 64, 1}},
    {"int32", "<i4", {kDLInt, 32, 1}},     {"int16", "<i2", {kDLInt, 16, 1}},
    {"int8", "|i1", {kDLInt, 8, 1}},       {"uint8", "|u1", {kDLUInt, 8, 1}},
    {"bool", "|b1", {kDLBool, 8, 1}},
};

const DType& dtype_named(const std::string& name) {
  for (const DType& d : kDTypes)
    if (name == d.name) return d;
  throw BadInput("dtype " + name + " is not supported by mtcompile-run");
}

const DType& dtype_of(DLDataType dl) {
  for (const DType& d : kDTypes)
    if (d.dl.code == dl.code && d.dl.bits == dl.bits && d.dl.lanes == dl.lanes) return d;
  throw BadInput("an output has a dtype mtcompile-run cannot write (code " +
                 std::to_string(dl.code) + ", bits " + std::to_string(dl.bits) + ")");
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

// 64-byte aligned CPU memory, as TVM's own allocator gives (generated kernels may assume it)
struct AlignedAlloc {
  void AllocData(DLTensor* t) {
    size_t n = std::max<size_t>(ffi::GetDataSize(*t), 1);
    t->data = std::aligned_alloc(64, (n + 63) / 64 * 64);
    if (t->data == nullptr) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

// a tensor over memory someone else owns (a weight in the bundle's mapped library)
struct Borrowed {
  void* data;
  void AllocData(DLTensor* t) { t->data = data; }
  void FreeData(DLTensor*) {}
};

struct Npy {
  std::string descr;
  std::vector<int64_t> shape;
  std::string data;
};

// the value of `key` in a .npy header dict such as {'descr': '<f4', 'fortran_order': False, ...}
std::string header_field(const std::string& h, const std::string& key, const std::string& path) {
  size_t k = h.find("'" + key + "'");
  if (k == std::string::npos) throw BadInput(path + ": .npy header has no '" + key + "'");
  size_t c = h.find(':', k);
  size_t s = h.find_first_not_of(' ', c + 1);
  if (h[s] == '\'') return h.substr(s + 1, h.find('\'', s + 1) - s - 1);
  if (h[s] == '(') return h.substr(s + 1, h.find(')', s) - s - 1);
  return h.substr(s, h.find_first_of(",}", s) - s);
}

Npy read_npy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw BadInput(path + ": cannot open (an input file is missing?)");
  std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (all.size() < 10 || all.compare(0, 6, "\x93NUMPY") != 0)
    throw BadInput(path + ": not a .npy file");
  const int major = static_cast<unsigned char>(all[6]);
  size_t hlen, off;
  if (major == 1) {
    hlen = static_cast<unsigned char>(all[8]) | (static_cast<unsigned char>(all[9]) << 8);
    off = 10;
  } else {
    if (all.size() < 12) throw BadInput(path + ": truncated .npy header");
    hlen = 0;
    for (int i = 0; i < 4; ++i) hlen |= size_t(static_cast<unsigned char>(all[8 + i])) << (8 * i);
    off = 12;
  }
  if (off + hlen > all.size()) throw BadInput(path + ": truncated .npy header");
  const std::string h = all.substr(off, hlen);
  Npy npy;
  npy.descr = header_field(h, "descr", path);
  if (header_field(h, "fortran_order", path) != "False")
    throw BadInput(path + ": Fortran-ordered arrays are not supported; save a C-ordered array");
  std::stringstream dims(header_field(h, "shape", path));
  std::string tok;
  while (std::getline(dims, tok, ','))
    if (tok.find_first_not_of(' ') != std::string::npos) npy.shape.push_back(std::stoll(tok));
  npy.data = all.substr(off + hlen);
  return npy;
}

void write_npy(const std::string& path, const ffi::Tensor& t) {
  const DType& d = dtype_of(t.dtype());
  std::vector<int64_t> shape(t.shape().begin(), t.shape().end());
  std::string dims;
  for (size_t i = 0; i < shape.size(); ++i) dims += std::to_string(shape[i]) + ",";
  if (shape.size() > 1) dims.pop_back();
  std::string h = std::string("{'descr': '") + d.descr + "', 'fortran_order': False, 'shape': (" +
                  dims + "), }";
  h += std::string(63 - (10 + h.size()) % 64, ' ') + "\n";  // 64-byte aligned data
  std::ofstream f(path, std::ios::binary);
  if (!f) throw BadInput(path + ": cannot write");
  const uint16_t hl = static_cast<uint16_t>(h.size());
  f.write("\x93NUMPY\x01\x00", 8);
  f.put(static_cast<char>(hl & 0xff));
  f.put(static_cast<char>(hl >> 8));
  f << h;
  const char* data = static_cast<const char*>(t.data_ptr()) + t.byte_offset();
  f.write(data, static_cast<std::streamsize>(ffi::GetDataSize(*t.GetDLTensorPtr())));
  if (!f) throw BadInput(path + ": write failed");
}

// ------------------------------------------------------------------ the manifest
ffi::Map<ffi::Any, ffi::Any> as_map(const ffi::Any& v, const std::string& key) {
  auto m = v.try_cast<ffi::Map<ffi::Any, ffi::Any>>();
  if (!m) throw BadInput("manifest: " + key + " is not an object");
  return *m;
}
ffi::Array<ffi::Any> as_array(const ffi::Any& v, const std::string& key) {
  auto a = v.try_cast<ffi::Array<ffi::Any>>();
  if (!a) throw BadInput("manifest: " + key + " is not a list");
  return *a;
}
ffi::Any field(const ffi::Map<ffi::Any, ffi::Any>& m, const std::string& key,
               const std::string& where) {
  auto it = m.find(ffi::String(key));
  if (it == m.end()) throw BadInput("manifest: " + where + " has no '" + key + "'");
  return (*it).second;
}
std::string str(const ffi::Any& v, const std::string& key) {
  auto s = v.try_cast<ffi::String>();
  if (!s) throw BadInput("manifest: " + key + " is not a string");
  return std::string(*s);
}
int64_t integer(const ffi::Any& v, const std::string& key) {
  auto i = v.try_cast<int64_t>();
  if (!i) throw BadInput("manifest: " + key + " is not an integer");
  return *i;
}

struct IO {
  std::string name, dtype;
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

std::vector<IO> read_ios(const ffi::Any& v, const std::string& where) {
  std::vector<IO> ios;
  for (const ffi::Any& e : as_array(v, where)) {
    auto m = as_map(e, where);
    IO io;
    io.name = str(field(m, "name", where), where + ".name");
    io.dtype = str(field(m, "dtype", where), where + ".dtype");
    auto b = m.find(ffi::String("dims"));
    if (b != m.end() && (*b).second != nullptr)
      for (const auto& kv : as_map((*b).second, where + ".dims")) {
        auto lh = as_array(kv.second, where + ".dims");
        io.bounds[str(kv.first, where + ".dims")] = {
            integer(lh[0], where + ".dims"), integer(lh[1], where + ".dims")};
      }
    for (const ffi::Any& d : as_array(field(m, "shape", where), where + ".shape")) {
      auto name = d.try_cast<ffi::String>();
      io.shape.push_back(name ? -1 : integer(d, where + ".shape"));
      io.dims.push_back(name ? std::string(*name) : std::string());
    }
    auto r = m.find(ffi::String("index_range"));
    if (r != m.end() && (*r).second != nullptr) {
      auto lh = as_array((*r).second, where + ".index_range");
      io.ranged = true;
      io.lo = integer(lh[0], where + ".index_range");
      io.hi = integer(lh[1], where + ".index_range");
    }
    ios.push_back(io);
  }
  return ios;
}

struct Weight {
  int64_t offset;
  std::vector<int64_t> shape;
  std::string dtype;
};

struct Manifest {
  std::string library, target;
  std::string weights_symbol;  // the library's weights table (empty: none)
  int64_t weights_bytes = 0;
  std::vector<Weight> weights;
  std::map<std::string, std::vector<int64_t>> weight_args;  // function -> weight indices
  std::vector<Tenant> tenants;  // in tenant_order
  std::vector<std::pair<std::string, std::string>> run_all_inputs;  // (tenant, input) each
  bool streamed = false;
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

Manifest read_manifest(const std::string& dir) {
  const std::string path = dir + "/manifest.json";
  std::ifstream f(path);
  if (!f) throw BadInput(path + ": cannot open (is " + dir + " a saved bundle?)");
  std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  ffi::String err;
  ffi::Any root = ffi::json::Parse(text, &err);
  if (!err.empty()) throw BadInput(path + ": not JSON: " + std::string(err));
  auto m = as_map(root, "the manifest");
  const std::string format = str(field(m, "format", "the manifest"), "format");
  if (format != "mtcompile-bundle/3")
    throw BadInput(path + ": format " + format + ", this driver reads mtcompile-bundle/3");
  Manifest man;
  man.library = str(field(m, "library", "the manifest"), "library");
  man.target = str(field(m, "target", "the manifest"), "target");
  auto tenants = as_map(field(m, "tenants", "the manifest"), "tenants");
  for (const ffi::Any& n : as_array(field(m, "tenant_order", "the manifest"), "tenant_order")) {
    Tenant t;
    t.name = str(n, "tenant_order");
    auto tm = as_map(field(tenants, t.name, "tenants"), "tenants." + t.name);
    t.inputs = read_ios(field(tm, "inputs", "tenants." + t.name), "tenants." + t.name + ".inputs");
    t.outputs =
        read_ios(field(tm, "outputs", "tenants." + t.name), "tenants." + t.name + ".outputs");
    man.tenants.push_back(t);
  }
  // each run_all input is a group of (tenant, input) pairs fed by one array: take the first
  for (const ffi::Any& g : as_array(field(m, "run_all_inputs", "the manifest"), "run_all_inputs")) {
    auto first = as_array(as_array(g, "run_all_inputs")[0], "run_all_inputs");
    man.run_all_inputs.emplace_back(str(first[0], "run_all_inputs"),
                                    str(first[1], "run_all_inputs"));
  }
  auto streams = as_map(field(m, "streams", "the manifest"), "streams");
  auto run = streams.find(ffi::String("run"));
  man.streamed = run != streams.end() && (*run).second != nullptr;
  auto kernels = as_map(field(m, "kernels", "the manifest"), "kernels");
  for (const auto& kv : kernels)
    if (str(kv.second, "kernels") == "torch") man.torch_kernels.push_back(str(kv.first, "kernels"));
  auto w = m.find(ffi::String("weights"));
  if (w != m.end() && (*w).second != nullptr) {
    auto wm = as_map((*w).second, "weights");
    man.weights_symbol = str(field(wm, "symbol", "weights"), "weights.symbol");
    man.weights_bytes = integer(field(wm, "bytes", "weights"), "weights.bytes");
    for (const ffi::Any& row : as_array(field(wm, "tensors", "weights"), "weights.tensors")) {
      auto r = as_array(row, "weights.tensors");
      if (r.size() != 3) throw BadInput("manifest: weights.tensors: expected [offset, shape, dtype]");
      Weight wt;
      wt.offset = integer(r[0], "weights.tensors");
      for (const ffi::Any& d : as_array(r[1], "weights.tensors")) wt.shape.push_back(integer(d, "weights.tensors"));
      wt.dtype = str(r[2], "weights.tensors");
      man.weights.push_back(wt);
    }
    for (const auto& kv : as_map(field(wm, "args", "weights"), "weights.args")) {
      std::vector<int64_t>& idx = man.weight_args[str(kv.first, "weights.args")];
      for (const ffi::Any& i : as_array(kv.second, "weights.args")) {
        idx.push_back(integer(i, "weights.args"));
        if (idx.back() < 0 || idx.back() >= static_cast<int64_t>(man.weights.size()))
          throw BadInput("manifest: weights.args: an index outside the weights table");
      }
    }
  }
  return man;
}

// ------------------------------------------------------------------ inputs
template <typename T>
void check_range(const char* data, size_t n, const IO& io, const std::string& tenant) {
  const T* v = reinterpret_cast<const T*>(data);
  for (size_t i = 0; i < n; ++i)
    if (static_cast<int64_t>(v[i]) < io.lo || static_cast<int64_t>(v[i]) >= io.hi)
      throw BadInput("tenant '" + tenant + "', input '" + io.name + "': index " +
                     std::to_string(static_cast<int64_t>(v[i])) + " at flat position " +
                     std::to_string(i) + " is outside [" + std::to_string(io.lo) + ", " +
                     std::to_string(io.hi) + ")");
}

ffi::Tensor load_input(const std::string& dir, const std::string& tenant, const IO& io) {
  const std::string path = dir + "/" + tenant + "." + io.name + ".npy";
  Npy npy = read_npy(path);
  const DType& d = dtype_named(io.dtype);
  if (npy.descr != d.descr)
    throw BadInput("tenant '" + tenant + "', input '" + io.name + "' (" + path + "): expected " +
                   io.dtype + " ('" + d.descr + "'), found '" + npy.descr + "'");
  bool fits = npy.shape.size() == io.shape.size();
  for (size_t i = 0; fits && i < io.shape.size(); ++i)
    fits = io.shape[i] == -1 || io.shape[i] == npy.shape[i];
  if (!fits)
    throw BadInput("tenant '" + tenant + "', input '" + io.name + "' (" + path +
                   "): expected shape " + shape_str(io.shape) +
                   (std::count(io.shape.begin(), io.shape.end(), -1) ? " (-1: dynamic)" : "") +
                   ", found " +
                   shape_str(npy.shape));
  for (size_t i = 0; i < io.shape.size(); ++i) {  // a dynamic dim: within its bounds
    auto b = io.bounds.find(io.dims[i]);
    if (io.shape[i] == -1 && b != io.bounds.end() &&
        (npy.shape[i] < b->second.first || npy.shape[i] > b->second.second))
      throw BadInput("tenant '" + tenant + "', input '" + io.name + "': dim " +
                     std::to_string(i) + " ('" + io.dims[i] + "') is " +
                     std::to_string(npy.shape[i]) + ", outside its bounds [" +
                     std::to_string(b->second.first) + ", " + std::to_string(b->second.second) +
                     "]");
  }
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::ShapeView(npy.shape.data(), npy.shape.size()), d.dl,
                                           DLDevice{kDLCPU, 0});
  const size_t bytes = ffi::GetDataSize(*t.GetDLTensorPtr());
  if (npy.data.size() != bytes)
    throw BadInput(path + ": " + std::to_string(npy.data.size()) + " data bytes, expected " +
                   std::to_string(bytes));
  std::memcpy(t.data_ptr(), npy.data.data(), bytes);
  if (io.ranged) {
    const size_t n = static_cast<size_t>(t.numel());
    if (io.dtype == "int64") check_range<int64_t>(npy.data.data(), n, io, tenant);
    else if (io.dtype == "int32") check_range<int32_t>(npy.data.data(), n, io, tenant);
  }
  return t;
}

std::vector<ffi::Tensor> results(const ffi::Any& r) {
  std::vector<ffi::Tensor> out;
  if (auto t = r.try_cast<ffi::Tensor>()) {
    out.push_back(*t);
  } else if (auto a = r.try_cast<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& e : *a) {
      auto t2 = e.try_cast<ffi::Tensor>();
      if (!t2) throw std::runtime_error("an entry returned a non-tensor value");
      out.push_back(*t2);
    }
  } else {
    throw std::runtime_error("an entry returned neither a tensor nor a tuple of tensors");
  }
  return out;
}

// the process's peak resident set (Linux: VmHWM), -1 where /proc is not there
int64_t peak_rss_kib() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6));
  return -1;
}

int usage() {
  std::fprintf(stderr,
               "usage: mtcompile-run BUNDLE_DIR ENTRY INPUT_DIR OUTPUT_DIR [--threads N] "
               "[--timing]\n"
               "  ENTRY: a tenant's name, or run_all\n"
               "  inputs: INPUT_DIR/<tenant>.<input>.npy; outputs: "
               "OUTPUT_DIR/<tenant>.<output>.npy\n");
  return 2;
}

int run(int argc, char** argv) {
  std::vector<std::string> pos;
  int threads = 0;
  bool timing = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--timing") {
      timing = true;
    } else if (a == "--threads" && i + 1 < argc) {
      threads = std::atoi(argv[++i]);
      if (threads < 1) return usage();
    } else if (a == "-h" || a == "--help") {
      usage();
      return 0;
    } else {
      pos.push_back(a);
    }
  }
  if (pos.size() != 4) return usage();
  const std::string bundle = pos[0], entry = pos[1], in_dir = pos[2], out_dir = pos[3];
  const Manifest man = read_manifest(bundle);
  if (man.target != "llvm")
    throw BadInput("this bundle was built for target '" + man.target +
                   "'; mtcompile-run runs CPU (llvm) bundles");
  if (!man.torch_kernels.empty())
    throw BadInput("this bundle calls PyTorch kernels (provider 'torch' for " +
                   man.torch_kernels[0] + "), which need Python; rebuild with kernels='native'");
  if (entry == "run_all" && man.streamed)
    throw BadInput("this bundle's run_all runs on several streams (the Python StreamExecutor); "
                   "mtcompile-run runs its tenants one by one, or rebuild with one stream");
  // one pool, sized before its first use; nothing spins after a call (as the Python runtime)
  const std::string n = std::to_string(threads ? threads : std::thread::hardware_concurrency());
  setenv("TVM_NUM_THREADS", n.c_str(), threads != 0);
  setenv("TVM_THREAD_POOL_SPIN_COUNT", "0", 0);

  // inputs first: a bad input costs no load
  std::vector<ffi::Tensor> args;
  std::vector<std::pair<std::string, std::string>> outs;  // (tenant, output) per result
  if (entry == "run_all") {
    for (const auto& [t, i] : man.run_all_inputs)
      for (const IO& io : man.tenant(t).inputs)
        if (io.name == i) args.push_back(load_input(in_dir, t, io));
    for (const Tenant& t : man.tenants)
      for (const IO& o : t.outputs) outs.emplace_back(t.name, o.name);
  } else {
    const Tenant& t = man.tenant(entry);
    for (const IO& io : t.inputs) args.push_back(load_input(in_dir, t.name, io));
    for (const IO& o : t.outputs) outs.emplace_back(t.name, o.name);
  }

  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  ffi::Module lib = ffi::Module::LoadFromFile(bundle + "/" + man.library);
  ffi::Module exec = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
  constexpr int kPooled = 2;  // TVM's pooled allocator, as relax.VirtualMachine uses
  exec->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, kPooled,
                                                  static_cast<int>(kDLCPU), 0, kPooled);
  ffi::Function fn = exec->GetFunction(entry).value();
  // the entry's weights: views of the table the library carries (mapped, not copied)
  auto wa = man.weight_args.find(entry);
  if (wa != man.weight_args.end() && !wa->second.empty()) {
    const std::string path = bundle + "/" + man.library;
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_NOLOAD);  // the one TVM opened
    char* base = handle ? static_cast<char*>(dlsym(handle, man.weights_symbol.c_str())) : nullptr;
    if (base == nullptr)
      throw BadInput(path + ": carries no weights table '" + man.weights_symbol + "'");
    for (int64_t i : wa->second) {
      const Weight& w = man.weights[i];
      ffi::Tensor t = ffi::Tensor::FromNDAlloc(
          Borrowed{base + w.offset}, ffi::ShapeView(w.shape.data(), w.shape.size()),
          dtype_named(w.dtype).dl, DLDevice{kDLCPU, 0});
      if (w.offset < 0 || w.offset + static_cast<int64_t>(ffi::GetDataSize(*t.GetDLTensorPtr())) >
                              man.weights_bytes)
        throw BadInput(path + ": a weight lies outside the weights table");
      args.push_back(t);
    }
  }
  std::vector<ffi::AnyView> views(args.begin(), args.end());
  const auto t1 = clock::now();
  ffi::Any r;
  // a run in progress: the native kernels' pool spins between parallel regions until its end
  auto begin = ffi::Function::GetGlobal("mtcompile.native.run_begin");
  auto end = ffi::Function::GetGlobal("mtcompile.native.run_end");
  if (begin.has_value() && end.has_value()) (*begin)();
  try {
    fn.CallPacked(views.data(), static_cast<int32_t>(views.size()), &r);
  } catch (...) {
    if (begin.has_value() && end.has_value()) (*end)();
    throw;
  }
  if (begin.has_value() && end.has_value()) (*end)();
  const auto t2 = clock::now();
  std::vector<ffi::Tensor> got = results(r);
  if (got.size() < outs.size())
    throw std::runtime_error("entry " + entry + " returned " + std::to_string(got.size()) +
                             " tensors, the manifest lists " + std::to_string(outs.size()));
  for (size_t i = 0; i < outs.size(); ++i)
    write_npy(out_dir + "/" + outs[i].first + "." + outs[i].second + ".npy", got[i]);
  if (timing)
    std::printf("{\"load_s\": %.6f, \"first_call_s\": %.6f, \"peak_rss_kib\": %lld}\n",
                std::chrono::duration<double>(t1 - t0).count(),
                std::chrono::duration<double>(t2 - t1).count(),
                static_cast<long long>(peak_rss_kib()));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const BadInput& e) {
    std::fprintf(stderr, "mtcompile-run: %s\n", e.what());
    return 3;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mtcompile-run: error: %s\n", e.what());
    return 4;
  }
}
