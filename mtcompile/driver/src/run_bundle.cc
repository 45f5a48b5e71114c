// mtcompile-run: load a saved mtcompile bundle with TVM's runtime only (no Python, no compiler),
// run one tenant or run_all on inputs read from .npy files, write the outputs as .npy files.
//
//   mtcompile-run BUNDLE_DIR ENTRY INPUT_DIR OUTPUT_DIR [--threads N] [--timing]
//                 [--verify-key-file FILE] [--require-signature]
//
// ENTRY is a tenant's name or "run_all". Inputs are INPUT_DIR/<tenant>.<input>.npy (for run_all:
// every tenant's); outputs are written to OUTPUT_DIR/<file> under the file names the manifest
// records (<tenant>.<output>.npy made safe and unique at build time). The bundle is checked as the Python runtime checks it
// by the native runtime core the Python runtime calls too (mtcompile/core/src: library.h, under
// the rules of contract.h: library hash before dlopen, ELF headers, embedded manifest, weights
// table, and with --verify-key-file or MTCOMPILE_VERIFY_KEY the signature; manifest.h: fields),
// inputs by the core's inputs.h before the call (the checks and words of the Python runtime's
// calls: count, dtype, shape, dim bounds, index ranges). A run_all on several streams runs on
// the core's stream executor (executor.h), as the Python runtime runs it. --timing prints {"load_s", "first_call_s", "peak_rss_kib"} as JSON on
// stdout. Exit status: 0 ok, 2 usage, 3 bad input or bundle, 4 run-time error.
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <dirent.h>
#include <sys/stat.h>

#include "contract.h"
#include "executor.h"
#include "inputs.h"
#include "library.h"
#include "manifest.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

using mtc::BadInput;
using mtc::Bytes;
using mtc::check_shared;
using mtc::IO;
using mtc::Manifest;
using mtc::shape_str;
using mtc::Tenant;

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
};

// the value of `key` in a .npy header dict such as {'descr': '<f4', 'fortran_order': False, ...}
std::string header_field(const std::string& h, const std::string& key, const std::string& path) {
  const size_t k = h.find("'" + key + "'");
  const size_t c = k == std::string::npos ? k : h.find(':', k);
  const size_t s = c == std::string::npos ? c : h.find_first_not_of(' ', c + 1);
  if (s == std::string::npos) throw BadInput(path + ": .npy header has no '" + key + "'");
  const char open = h[s];
  const size_t e = open == '\'' ? h.find('\'', s + 1)
                   : open == '(' ? h.find(')', s) : h.find_first_of(",}", s);
  if (e == std::string::npos) throw BadInput(path + ": .npy header: '" + key + "' is malformed");
  return open == '\'' || open == '(' ? h.substr(s + 1, e - s - 1) : h.substr(s, e - s);
}

std::vector<int64_t> header_shape(const std::string& text, const std::string& path) {
  std::vector<int64_t> shape;
  std::stringstream dims(text);
  std::string tok;
  while (std::getline(dims, tok, ',')) {
    const size_t a = tok.find_first_not_of(' '), b = tok.find_last_not_of(' ');
    if (a == std::string::npos) continue;
    const std::string d = tok.substr(a, b - a + 1);
    int64_t v = -1;
    auto r = std::from_chars(d.data(), d.data() + d.size(), v);
    if (r.ec != std::errc() || r.ptr != d.data() + d.size() || v < 0)
      throw BadInput(path + ": .npy header: shape (" + text + ") is malformed");
    shape.push_back(v);
  }
  return shape;
}

// the header of a .npy file, the file left at its data; a file that is not a regular file
// (a device, a FIFO: /dev/zero would be read forever) is refused
Npy read_npy_header(std::ifstream& f, const std::string& path, uint64_t* data_bytes) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) throw BadInput(path + ": cannot open (an input file is missing?)");
  if (!S_ISREG(st.st_mode)) throw BadInput(path + ": not a regular file");
  f.open(path, std::ios::binary);
  if (!f) throw BadInput(path + ": cannot open (an input file is missing?)");
  char pre[12] = {};
  f.read(pre, 10);
  if (f.gcount() < 10 || std::memcmp(pre, "\x93NUMPY", 6) != 0) throw BadInput(path + ": not a .npy file");
  const int major = static_cast<unsigned char>(pre[6]);
  size_t hlen = static_cast<unsigned char>(pre[8]) | (static_cast<unsigned char>(pre[9]) << 8);
  size_t off = 10;
  if (major != 1) {
    f.read(pre + 10, 2);
    if (f.gcount() < 2) throw BadInput(path + ": truncated .npy header");
    hlen = mtc::le(std::string(pre, 12), 8, 4);
    off = 12;
  }
  if (off + hlen > static_cast<uint64_t>(st.st_size)) throw BadInput(path + ": truncated .npy header");
  std::string h(hlen, '\0');
  f.read(h.data(), static_cast<std::streamsize>(hlen));
  Npy npy;
  npy.descr = header_field(h, "descr", path);
  if (header_field(h, "fortran_order", path) != "False")
    throw BadInput(path + ": Fortran-ordered arrays are not supported; save a C-ordered array");
  npy.shape = header_shape(header_field(h, "shape", path), path);
  *data_bytes = static_cast<uint64_t>(st.st_size) - off - hlen;
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

// ------------------------------------------------------------------ inputs
// the dtype a .npy file's descr names: the manifest's name, or the descr itself (numpy's name
// for what mtcompile has none, '<U3'), as the Python runtime names an array's dtype
std::string dtype_name(const std::string& descr) {
  for (const DType& d : kDTypes)
    if (descr == d.descr) return d.name;
  return descr;
}

// how many inputs the directory gives tenant `t`: its files <tenant>.*.npy (a missing or an
// extra one is a missing or an extra argument: rule input-count, the Python runtime's words)
size_t count_given(const std::string& dir, const Tenant& t) {
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) throw BadInput(dir + ": cannot open the input directory");
  const std::string prefix = t.name + ".";
  size_t n = 0;
  for (dirent* e = readdir(d); e != nullptr; e = readdir(d)) {
    const std::string f = e->d_name;
    n += f.size() > prefix.size() + 4 && f.rfind(prefix, 0) == 0 &&
         f.compare(f.size() - 4, 4, ".npy") == 0;
  }
  closedir(d);
  return n;
}

// the data of a checked header: the bytes it promises, checked against the file first
ffi::Tensor read_data(std::ifstream& f, const std::string& path, const mtc::Arg& a,
                      uint64_t have) {
  const DLDataType dl = dtype_named(a.dtype).dl;
  __int128 want = dl.bits / 8;
  for (int64_t d : a.shape) want = std::min<__int128>(want * d, (__int128)1 << 100);
  if (want != static_cast<__int128>(have))
    throw BadInput(path + ": " + std::to_string(have) + " data bytes, its header's " +
                   a.dtype + shape_str(a.shape) + " needs " +
                   (want < ((__int128)1 << 62) ? std::to_string(int64_t(want)) : "more"));
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::ShapeView(a.shape.data(), a.shape.size()),
                                           dl, DLDevice{kDLCPU, 0});
  f.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(have));
  if (static_cast<uint64_t>(f.gcount()) != have) throw BadInput(path + ": cannot read its data");
  return t;
}

// tenant `t`'s inputs from `dir`, checked by the runtime core as the Python runtime's are
// (mtc::check_inputs, in two steps: the headers before a byte of data is read, then the values)
std::vector<ffi::Tensor> read_tenant(const std::string& dir, const Tenant& t) {
  mtc::check_count(t, count_given(dir, t));
  std::vector<std::ifstream> files(t.inputs.size());
  std::vector<mtc::Arg> args;
  std::vector<uint64_t> have(t.inputs.size());
  for (size_t k = 0; k < t.inputs.size(); ++k) {
    const std::string path = dir + "/" + mtc::file_name(t.name, t.inputs[k].name);
    Npy npy = read_npy_header(files[k], path, &have[k]);
    args.push_back(mtc::Arg{dtype_name(npy.descr), npy.shape, nullptr});
  }
  mtc::check_signature(t, args);
  std::vector<ffi::Tensor> out;
  for (size_t k = 0; k < t.inputs.size(); ++k) {
    const std::string path = dir + "/" + mtc::file_name(t.name, t.inputs[k].name);
    out.push_back(read_data(files[k], path, args[k], have[k]));
    args[k].data = out.back().data_ptr();
    mtc::check_range(t, t.inputs[k], args[k]);
  }
  return out;
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

// the entry's weights: views of the table the library carries (mapped, not copied)
void add_weights(const mtc::LibWeights& w, const std::string& entry, std::vector<ffi::Tensor>& args) {
  if (!w.table) return;
  auto wa = w.table->args.find(entry);
  if (wa == w.table->args.end()) return;
  for (int64_t i : wa->second) {
    const mtc::Weight& t = w.table->tensors[i];
    DLDataType dl = t.dtype == "bfloat16" ? DLDataType{kDLBfloat, 16, 1} : dtype_named(t.dtype).dl;
    args.push_back(ffi::Tensor::FromNDAlloc(Borrowed{w.base + t.offset},
                                            ffi::ShapeView(t.shape.data(), t.shape.size()), dl,
                                            DLDevice{kDLCPU, 0}));
  }
}

void check_runnable(const Manifest& man, const std::string& entry) {
  if (man.target != "llvm")
    throw BadInput("this bundle was built for target '" + man.target +
                   "'; mtcompile-run runs CPU (llvm) bundles");
  if (!man.torch_kernels.empty())
    throw BadInput("this bundle calls PyTorch kernels (provider 'torch' for " +
                   man.torch_kernels[0] + "), which need Python; rebuild with kernels='native'");
}

// the bundle opened by the runtime core (library.h: the sequence the Python runtime runs,
// checks before dlopen, then the weights tables and the embedded manifest of the loaded
// library); `entry` resolved (a streamed run_all: none, its stream functions run), `weights`
// its trailing arguments
struct Opened {
  mtc::Loaded loaded;
  std::optional<ffi::Function> fn;
};

Opened open_entry(const std::string& bundle, const std::optional<std::string>& key,
                  bool require_signature, const std::string& entry,
                  std::vector<ffi::Tensor>& weights) {
  const Manifest probe = mtc::read_manifest(bundle);
  mtc::PrivateCopy copy(probe.library);
  std::string src;
  const Manifest man = mtc::open_checked(bundle, key, require_signature, copy.path, &src);
  std::optional<mtc::Loaded> loaded;
  try {
    loaded = mtc::load_checked(man, copy.path, src);
  } catch (const BadInput&) {
    throw;
  } catch (const std::exception&) {
    if (man.target != "llvm") check_runnable(man, entry);  // a cuda bundle, said plainly
    throw;
  }
  check_runnable(man, entry);
  if (entry != "run_all") man.tenant(entry);  // names the tenants when there is no such one
  if (entry == "run_all" && man.streamed) return Opened{*loaded, std::nullopt};
  add_weights(loaded->weights, entry, weights);
  auto fn = loaded->exec->GetFunction(entry);
  if (!fn.has_value()) throw BadInput(src + ": has no entry '" + entry + "'");
  return Opened{*loaded, *fn};
}

int usage() {
  std::fprintf(stderr,
               "usage: mtcompile-run BUNDLE_DIR ENTRY INPUT_DIR OUTPUT_DIR [--threads N] "
               "[--timing] [--verify-key-file FILE] [--require-signature]\n"
               "  ENTRY: a tenant's name, or run_all\n"
               "  inputs: INPUT_DIR/<tenant>.<input>.npy; outputs: "
               "OUTPUT_DIR/<tenant>.<output>.npy\n"
               "  --verify-key-file: the bundle must carry a signature made with this key "
               "(default: the key in MTCOMPILE_VERIFY_KEY, if set)\n"
               "  --require-signature: refuse to run without a key to verify it with\n");
  return 2;
}

struct Options {
  std::vector<std::string> pos;
  int threads = 0;
  bool timing = false, help = false, require_signature = false;
  std::optional<std::string> key_file;
};

bool parse_options(int argc, char** argv, Options& o) {
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--timing") {
      o.timing = true;
    } else if (a == "--threads" && i + 1 < argc) {
      o.threads = std::atoi(argv[++i]);
      if (o.threads < 1) return false;
    } else if ((a == "--verify-key-file" || a == "--verify-key") && i + 1 < argc) {
      o.key_file = argv[++i];
    } else if (a == "--require-signature") {
      o.require_signature = true;
    } else if (a == "-h" || a == "--help") {
      o.help = true;
    } else {
      o.pos.push_back(a);
    }
  }
  return o.help || o.pos.size() == 4;
}

// a tensor's bytes (C order, as read from its .npy file)
Bytes bytes_of(const ffi::Tensor& t) {
  return {static_cast<const char*>(t.data_ptr()) + t.byte_offset(),
          static_cast<size_t>(ffi::GetDataSize(*t.GetDLTensorPtr()))};
}

// the entry's inputs, read and checked; `outs` gets the file of each result. run_all reads every
// tenant's inputs (each checked as that tenant's call is) and passes each shared one once.
std::vector<ffi::Tensor> read_inputs(const Manifest& man, const std::string& entry,
                                     const std::string& in_dir,
                                     std::vector<std::string>& outs) {
  std::vector<ffi::Tensor> args;
  if (entry == "run_all") {
    std::map<std::pair<std::string, std::string>, ffi::Tensor> given;
    for (const Tenant& t : man.tenants) {
      std::vector<ffi::Tensor> ts = read_tenant(in_dir, t);
      for (size_t k = 0; k < ts.size(); ++k) given.emplace(std::make_pair(t.name, t.inputs[k].name), ts[k]);
      for (const IO& o : t.outputs) outs.push_back(o.file);
    }
    for (const auto& group : man.run_all_groups) {  // tenants sharing an input: one value
      std::vector<Bytes> uses;
      for (const auto& use : group) uses.push_back(bytes_of(given.at(use)));
      check_shared(group, uses);
    }
    for (const auto& use : man.run_all_inputs) args.push_back(given.at(use));
  } else {
    const Tenant& t = man.tenant(entry);
    args = read_tenant(in_dir, t);
    for (const IO& o : t.outputs) outs.push_back(o.file);
  }
  return args;
}

ffi::Any call(ffi::Function fn, const std::vector<ffi::Tensor>& args) {
  std::vector<ffi::AnyView> views(args.begin(), args.end());
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
  return r;
}

// ------------------------------------------------------------------ run_all on streams
// each stream's run_all inputs, or flat outputs (indices): the manifest's streams.run.<key>
std::vector<std::vector<int64_t>> index_lists(const ffi::Map<ffi::Any, ffi::Any>& rec,
                                              const std::string& key) {
  std::vector<std::vector<int64_t>> out;
  const std::string at = "streams.run." + key;
  for (const ffi::Any& l : mtc::as_array(mtc::field(rec, key, "streams.run"), at)) {
    out.emplace_back();
    for (const ffi::Any& i : mtc::as_array(l, at)) out.back().push_back(mtc::integer(i, at));
  }
  return out;
}

// each stream's arguments: the arena, its run_all inputs, its function's weights
std::vector<std::vector<ffi::Any>> stream_args(const mtc::streams::Spec& spec,
                                               const std::vector<std::vector<int64_t>>& ins,
                                               const mtc::Loaded& loaded, const ffi::Any& storage,
                                               const std::vector<ffi::Tensor>& inputs) {
  std::vector<std::vector<ffi::Any>> args(spec.functions.size());
  for (size_t i = 0; i < args.size(); ++i) {
    std::vector<ffi::Tensor> w;
    add_weights(loaded.weights, spec.functions[i], w);
    args[i].push_back(storage);
    for (int64_t j : ins.at(i)) args[i].push_back(inputs.at(j));
    args[i].insert(args[i].end(), w.begin(), w.end());
  }
  return args;
}

// run_all on its stream functions with the runtime core's executor, as the Python runtime runs
// it (one arena, made by the entry's VM; `threads` split among the streams); its flat outputs
std::vector<ffi::Tensor> run_streams(const Manifest& man, const mtc::Loaded& loaded,
                                     const std::vector<ffi::Tensor>& inputs, int threads) {
  const auto rec = mtc::as_map(mtc::field(mtc::as_map(mtc::field(man.json, "streams", ""),
                                                      "streams"), "run", "streams"), "streams.run");
  mtc::streams::Spec spec = mtc::streams::read_spec(rec, "streams.run");
  const auto ins = index_lists(rec, "stream_inputs"), outs = index_lists(rec, "stream_outputs");
  spec.threads = std::max(1, threads / static_cast<int>(std::max<size_t>(spec.functions.size(), 1)));
  const std::string arena = mtc::str(mtc::field(rec, "arena_function", "streams.run"),
                                     "streams.run.arena_function");
  const ffi::Any storage = loaded.exec->GetFunction(arena).value()();
  mtc::streams::Executor ex(loaded.lib, spec);
  const mtc::streams::Outcome o = ex.run(stream_args(spec, ins, loaded, storage, inputs));
  ex.close();
  if (o.failed || o.deadlock) throw std::runtime_error(mtc::streams::message(o, ex.spec()));
  std::vector<std::optional<ffi::Tensor>> flat;
  for (size_t i = 0; i < outs.size(); ++i) {
    const std::vector<ffi::Tensor> got = results(o.results.at(i));
    for (size_t k = 0; k < outs[i].size(); ++k) {
      if (flat.size() <= static_cast<size_t>(outs[i][k])) flat.resize(outs[i][k] + 1);
      flat[outs[i][k]] = got.at(k);
    }
  }
  std::vector<ffi::Tensor> out;
  for (auto& t : flat)
    if (t.has_value()) out.push_back(*t);
  return out;
}

int run(int argc, char** argv) {
  Options o;
  if (!parse_options(argc, argv, o)) return usage();
  if (o.help) return usage(), 0;
  const std::string bundle = o.pos[0], entry = o.pos[1], in_dir = o.pos[2], out_dir = o.pos[3];
  const std::optional<std::string> key =
      o.key_file ? std::optional<std::string>(mtc::read_key_file(*o.key_file)) : std::nullopt;
  const Manifest man = mtc::read_manifest(bundle);
  if (!mtc::verify_key(key) && !o.require_signature && mtc::is_signed(man))
    std::fprintf(stderr, "mtcompile-run: warning: %s: the bundle is signed; its signature is NOT "
                 "verified (no --verify-key-file)\n", bundle.c_str());
  // one pool, sized before its first use; nothing spins after a call (as the Python runtime)
  const std::string n = std::to_string(o.threads ? o.threads : std::thread::hardware_concurrency());
  setenv("TVM_NUM_THREADS", n.c_str(), o.threads != 0);
  setenv("TVM_THREAD_POOL_SPIN_COUNT", "0", 0);
  const int pool = std::max(1, std::atoi(std::getenv("TVM_NUM_THREADS")));  // the user's wins
  // the bundle first, as the Python runtime's load: both refuse a damaged artifact alike
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  std::vector<ffi::Tensor> weights;
  mtc::streams::register_points();  // a streamed bundle's VM looks them up when it is made
  const Opened opened = open_entry(bundle, key, o.require_signature, entry, weights);
  const auto t1 = clock::now();
  std::vector<std::string> outs;  // the output files the manifest records
  std::vector<ffi::Tensor> args = read_inputs(man, entry, in_dir, outs);
  args.insert(args.end(), weights.begin(), weights.end());
  const auto tc = clock::now();
  std::vector<ffi::Tensor> got = opened.fn ? results(call(*opened.fn, args))
                                           : run_streams(man, opened.loaded, args, pool);
  const auto t2 = clock::now();
  if (got.size() < outs.size())
    throw std::runtime_error("entry " + entry + " returned " + std::to_string(got.size()) +
                             " tensors, the manifest lists " + std::to_string(outs.size()));
  for (size_t i = 0; i < outs.size(); ++i)
    write_npy(out_dir + "/" + outs[i], got[i]);
  if (o.timing)
    std::printf("{\"load_s\": %.6f, \"first_call_s\": %.6f, \"peak_rss_kib\": %lld}\n",
                std::chrono::duration<double>(t1 - t0).count(),
                std::chrono::duration<double>(t2 - tc).count(),
                static_cast<long long>(peak_rss_kib()));
  return 0;
}

// a failed check of the generated code (mtcompile.abi INDEX_CHECK, DIVISION_CHECK): the line
// after its marker (what the Python runtime raises), else ""
std::string failed_check(const std::string& what) {
  for (const char* marker : {"mtcompile.IndexOutOfRange:", "mtcompile.DivisionByZero:"}) {
    const size_t at = what.find(marker);
    if (at == std::string::npos) continue;
    std::string line = what.substr(at + std::strlen(marker));
    line = line.substr(0, line.find('\n'));
    return line.substr(std::min(line.find_first_not_of(' '), line.size()));
  }
  return "";
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const BadInput& e) {
    std::fprintf(stderr, "mtcompile-run: %s\n", e.what());
    return 3;
  } catch (const std::exception& e) {
    const std::string bad = failed_check(e.what());  // bad input found while running
    if (!bad.empty()) {
      std::fprintf(stderr, "mtcompile-run: %s\n", bad.c_str());
      return 3;
    }
    std::fprintf(stderr, "mtcompile-run: error: %s\n", e.what());
    return 4;
  }
}
