// The artifact contract's rules, the one implementation both front-ends call (the Python runtime
// through core.cc, mtcompile-run by including it); runtime/contract.py lists them (RULES) and
// binds them. Every failure is a BadInput (Python: ArtifactError / InputError; driver: exit 3).
//   tvm-version, cpu-features, library-name, library-hash, library-elf, signature,
//   embedded-manifest, weights-same, weights-bytes, weight-dtype, weight-offset, weight-shape,
//   weight-extent, run-all-inputs, index-range, file-name
#pragma once

#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/string.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace mtc {

namespace ffi = tvm::ffi;

// an error in what the user gave (inputs, bundle): exit 3
struct BadInput : std::runtime_error {
  using std::runtime_error::runtime_error;
};

constexpr const char* kFormat = "mtcompile-bundle/5";  // runtime/manifest.py FORMAT
constexpr const char* kWeightsSymbol = "mtcompile_weights";
constexpr const char* kTableSymbol = "mtcompile_weights_table";
constexpr const char* kEndSymbol = "mtcompile_weights_end";
constexpr int64_t kAlign = 64;
// in manifest.json only, not embedded (runtime/manifest.py BUILT_AFTER)
const char* const kBuiltAfter[] = {"library_sha256", "memory", "weights", "bundle_signature"};
// a weight's dtype -> bytes per element (contract.py WEIGHT_DTYPES, in its order)
const std::pair<const char*, int64_t> kWeightDTypes[] = {
    {"float32", 4}, {"float64", 8}, {"float16", 2}, {"bfloat16", 2}, {"int64", 8},
    {"int32", 4},   {"int16", 2},   {"int8", 1},    {"uint8", 1},    {"bool", 1},
    {"uint16", 2}};

inline std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

// ------------------------------------------------------------------ reading JSON fields
// A bad field of manifest.json, in runtime/manifest.py's words: "key '<path>': <why>"
// (parse_manifest prefixes "<manifest.json> is corrupt: ").
struct Corrupt : BadInput {
  Corrupt(const std::string& path, const std::string& why)
      : BadInput("key '" + path + "': " + why) {}
};

inline std::string py_type(const ffi::Any& v);
inline std::string py_repr60(const ffi::Any& v);

inline std::string key_path(const std::string& where, const std::string& key) {
  return where.empty() ? key : where + "." + key;
}
inline Corrupt wrong_kind(const ffi::Any& v, const std::string& path, const char* kind) {
  return Corrupt(path, std::string("expected ") + kind + ", found " + py_type(v) + " " + py_repr60(v));
}
inline ffi::Map<ffi::Any, ffi::Any> as_map(const ffi::Any& v, const std::string& path) {
  auto m = v.try_cast<ffi::Map<ffi::Any, ffi::Any>>();
  if (!m || py_type(v) != "dict") throw wrong_kind(v, path, "dict");
  return *m;
}
inline ffi::Array<ffi::Any> as_array(const ffi::Any& v, const std::string& path) {
  auto a = v.try_cast<ffi::Array<ffi::Any>>();
  if (!a || py_type(v) != "list") throw wrong_kind(v, path, "list");
  return *a;
}
inline ffi::Any field(const ffi::Map<ffi::Any, ffi::Any>& m, const std::string& key,
                      const std::string& where) {
  auto it = m.find(ffi::String(key));
  if (it == m.end()) throw Corrupt(key_path(where, key), "missing");
  return (*it).second;
}
inline std::string str(const ffi::Any& v, const std::string& path) {
  if (py_type(v) != "str") throw wrong_kind(v, path, "str");
  return std::string(v.cast<ffi::String>());
}
inline int64_t integer(const ffi::Any& v, const std::string& path) {
  if (v.type_index() != kTVMFFIInt) throw wrong_kind(v, path, "int");
  return v.cast<int64_t>();
}

// ------------------------------------------------------------------ rule file-name
inline std::string file_name(const std::string& tenant, const std::string& name) {
  std::string safe = name;
  for (char& c : safe)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.' || c == '-'))
      c = '_';
  return tenant + "." + safe + ".npy";
}

// ------------------------------------------------------------------ rule cpu-features
// LLVM feature name -> the /proc/cpuinfo flag of the same instructions (runtime/cpu.py
// LLVM_TO_CPUINFO, the same table)
const std::pair<const char*, const char*> kLlvmToCpuinfo[] = {
    {"sse", "sse"}, {"sse2", "sse2"}, {"sse3", "pni"}, {"ssse3", "ssse3"},
    {"sse4.1", "sse4_1"}, {"sse4.2", "sse4_2"}, {"sse4a", "sse4a"}, {"avx", "avx"},
    {"avx2", "avx2"}, {"fma", "fma"}, {"fma4", "fma4"}, {"xop", "xop"}, {"f16c", "f16c"},
    {"bmi", "bmi1"}, {"bmi2", "bmi2"}, {"lzcnt", "abm"}, {"popcnt", "popcnt"},
    {"movbe", "movbe"}, {"aes", "aes"}, {"pclmul", "pclmulqdq"}, {"vaes", "vaes"},
    {"vpclmulqdq", "vpclmulqdq"}, {"sha", "sha_ni"}, {"adx", "adx"}, {"cx16", "cx16"},
    {"gfni", "gfni"}, {"avx512f", "avx512f"}, {"avx512cd", "avx512cd"},
    {"avx512bw", "avx512bw"}, {"avx512dq", "avx512dq"}, {"avx512vl", "avx512vl"},
    {"avx512ifma", "avx512ifma"}, {"avx512vbmi", "avx512vbmi"},
    {"avx512vbmi2", "avx512_vbmi2"}, {"avx512vnni", "avx512_vnni"},
    {"avx512bitalg", "avx512_bitalg"}, {"avx512vpopcntdq", "avx512_vpopcntdq"},
    {"avx512bf16", "avx512_bf16"}, {"avx512fp16", "avx512_fp16"}, {"avxvnni", "avx_vnni"},
    {"amx-tile", "amx_tile"}, {"amx-int8", "amx_int8"}, {"amx-bf16", "amx_bf16"}};

// the host's cpuinfo flags (of the first processor); none where /proc/cpuinfo has none
inline std::optional<std::set<std::string>> host_flags() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    const size_t c = line.find(':');
    if (c == std::string::npos || c == 0 ||
        line.substr(0, line.find_last_not_of(" \t", c - 1) + 1) != "flags")
      continue;
    std::set<std::string> flags;
    std::istringstream words(line.substr(c + 1));
    for (std::string w; words >> w;) flags.insert(w);
    return flags;
  }
  return std::nullopt;
}

// the checked LLVM `features` whose cpuinfo flag is not in `flags` (default: this host's), as
// Python prints a sorted list; empty where there are no flags (nothing is checked there).
// LLVM's tuning hints (fast-*, slow-*...) have no flag and are not checked.
inline std::string missing_features(const std::vector<std::string>& features,
                                    std::optional<std::set<std::string>> flags = std::nullopt) {
  if (!flags) flags = host_flags();
  std::set<std::string> missing;
  for (std::string feat : features) {
    if (!feat.empty() && feat[0] == '+') feat.erase(0, 1);
    for (const auto& [llvm, flag] : kLlvmToCpuinfo)
      if (flags && feat == llvm && !flags->count(flag)) missing.insert(feat);
  }
  std::string out;
  for (const std::string& m : missing) out += (out.empty() ? "'" : ", '") + m + "'";
  return missing.empty() ? "" : "[" + out + "]";
}

// ------------------------------------------------------------------ rule library-name
inline void check_library_name(const std::string& lib, const std::string& mpath) {
  if (lib.empty() || lib == "." || lib == ".." || lib.find('/') != std::string::npos ||
      lib.find('\0') != std::string::npos)
    throw BadInput(mpath + " is corrupt: key 'library': '" + lib + "' is not a file name");
}

// ------------------------------------------------------------------ rule library-elf
inline uint64_t le(const std::string& b, size_t at, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v |= uint64_t(static_cast<unsigned char>(b[at + i])) << (8 * i);
  return v;
}

// a library whose ELF headers point past its end: dlopen would die with SIGBUS
// (`b`: the file's first bytes, its headers; `size`: the file's, when more than `b`)
inline void check_elf(const std::string& b, const std::string& lib, uint64_t file_size = 0) {
  const std::string pre = lib + ": cannot be loaded by TVM: ";
  const uint64_t size = std::max<uint64_t>(file_size, b.size());
  if (size < 64 || b.compare(0, 4, "\x7f" "ELF") != 0 || b[4] != 2 || b[5] != 1)
    throw BadInput(pre + "not a 64-bit little-endian ELF shared library (" +
                   std::to_string(size) + " bytes)");
  const uint64_t phoff = le(b, 0x20, 8), shoff = le(b, 0x28, 8);
  const uint64_t phentsize = le(b, 0x36, 2), phnum = le(b, 0x38, 2);
  const uint64_t need = std::max(phoff + phentsize * phnum, shoff + le(b, 0x3a, 2) * le(b, 0x3c, 2));
  if (need > size || phoff > size || shoff > size)
    throw BadInput(pre + "truncated: its ELF headers need " + std::to_string(need) +
                   " bytes, the file has " + std::to_string(size));
  for (uint64_t i = 0; i < phnum; ++i) {
    if (phentsize < 40 || phoff + (i + 1) * phentsize > b.size()) break;
    const uint64_t off = le(b, phoff + i * phentsize + 8, 8);
    const uint64_t filesz = le(b, phoff + i * phentsize + 32, 8);
    if (off > size || filesz > size - off)
      throw BadInput(pre + "truncated: ELF segment " + std::to_string(i) + " ends at byte " +
                     std::to_string(off + filesz) + ", the file has " + std::to_string(size));
  }
}

// ------------------------------------------------------------------ canonical JSON
// Python's json.dumps(v, sort_keys=True, separators=(",", ":")) (ensure_ascii): what the
// bundle signature is computed over (runtime/signing.py _canonical)
inline std::string py_float(double d) {
  if (std::isnan(d)) return "NaN";
  if (std::isinf(d)) return d > 0 ? "Infinity" : "-Infinity";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof(buf), d, std::chars_format::scientific);
  std::string s(buf, r.ptr);  // shortest round trip: [-]d[.ddd]e[+-]XX
  const bool neg = s[0] == '-';
  if (neg) s.erase(0, 1);
  const size_t e = s.find('e');
  const int exp = std::stoi(s.substr(e + 1));
  std::string digits;
  for (char c : s.substr(0, e))
    if (c != '.') digits += c;
  std::string out;
  if (exp < -4 || exp >= 16) {  // repr's switch to exponent notation
    out = digits.substr(0, 1) + (digits.size() > 1 ? "." + digits.substr(1) : "");
    const std::string ex = std::to_string(std::abs(exp));
    out += std::string("e") + (exp < 0 ? "-" : "+") + (ex.size() < 2 ? "0" : "") + ex;
  } else if (exp >= 0) {
    const size_t whole = static_cast<size_t>(exp) + 1;
    out = digits.size() <= whole ? digits + std::string(whole - digits.size(), '0') + ".0"
                                 : digits.substr(0, whole) + "." + digits.substr(whole);
  } else {
    out = "0." + std::string(static_cast<size_t>(-exp - 1), '0') + digits;
  }
  return (neg ? "-" : "") + out;
}

inline void py_escape_unit(uint32_t u, std::string& out) {
  char buf[8];
  std::snprintf(buf, sizeof(buf), "\\u%04x", u);
  out += buf;
}

inline void py_string(const std::string& s, std::string& out) {
  out += '"';
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    const int n = c < 0x80 ? 1 : c < 0xe0 ? 2 : c < 0xf0 ? 3 : 4;
    uint32_t cp = n == 1 ? c : n == 2 ? c & 0x1f : n == 3 ? c & 0x0f : c & 0x07;
    for (int k = 1; k < n && i + k < s.size(); ++k) cp = cp << 6 | (s[i + k] & 0x3f);
    i += n;
    const char* esc = cp == '"' ? "\\\"" : cp == '\\' ? "\\\\" : cp == '\n' ? "\\n"
                    : cp == '\r' ? "\\r" : cp == '\t' ? "\\t" : cp == '\b' ? "\\b"
                    : cp == '\f' ? "\\f" : nullptr;
    if (esc != nullptr) {
      out += esc;
    } else if (cp < 0x20 || (cp > 0x7e && cp < 0x10000)) {
      py_escape_unit(cp, out);
    } else if (cp >= 0x10000) {  // a surrogate pair, as Python writes it
      py_escape_unit(0xd800 + ((cp - 0x10000) >> 10), out);
      py_escape_unit(0xdc00 + ((cp - 0x10000) & 0x3ff), out);
    } else {
      out += static_cast<char>(cp);
    }
  }
  out += '"';
}

inline void canonical(const ffi::Any& v, std::string& out);

inline void canonical_map(const ffi::Map<ffi::Any, ffi::Any>& m, std::string& out,
                          const std::vector<std::string>& skip = {}) {
  std::vector<std::pair<std::string, ffi::Any>> items;
  for (const auto& kv : m) {
    std::string k = std::string(kv.first.cast<ffi::String>());
    if (std::find(skip.begin(), skip.end(), k) == skip.end()) items.emplace_back(k, kv.second);
  }
  std::sort(items.begin(), items.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  out += '{';
  for (size_t i = 0; i < items.size(); ++i) {
    if (i) out += ',';
    py_string(items[i].first, out);
    out += ':';
    canonical(items[i].second, out);
  }
  out += '}';
}

inline void canonical(const ffi::Any& v, std::string& out) {
  switch (v.type_index()) {
    case kTVMFFINone: out += "null"; return;
    case kTVMFFIBool: out += v.cast<bool>() ? "true" : "false"; return;
    case kTVMFFIInt: out += std::to_string(v.cast<int64_t>()); return;
    case kTVMFFIFloat: out += py_float(v.cast<double>()); return;
    default: break;
  }
  if (auto s = v.try_cast<ffi::String>()) return py_string(std::string(*s), out);
  if (auto m = v.try_cast<ffi::Map<ffi::Any, ffi::Any>>()) return canonical_map(*m, out);
  auto a = v.try_cast<ffi::Array<ffi::Any>>();
  if (!a) throw BadInput("manifest: a JSON value of an unknown kind");
  out += '[';
  for (size_t i = 0; i < a->size(); ++i) {
    if (i) out += ',';
    canonical((*a)[i], out);
  }
  out += ']';
}

inline std::string canonical(const ffi::Any& v) {
  std::string out;
  canonical(v, out);
  return out;
}

// ------------------------------------------------------------------ rule embedded-manifest
// the keys on which the embedded manifest and manifest.json (less kBuiltAfter) differ, as
// Python prints a sorted list of names: ['run_all_inputs', 'tenants']
inline std::string embedded_diff(const ffi::Map<ffi::Any, ffi::Any>& embedded,
                                 const ffi::Map<ffi::Any, ffi::Any>& readable) {
  std::map<std::string, std::pair<std::string, std::string>> by_key;  // key -> (emb, read)
  for (const auto& kv : embedded)
    if (kv.second != nullptr) by_key[std::string(kv.first.cast<ffi::String>())].first = canonical(kv.second);
  for (const auto& kv : readable)
    if (kv.second != nullptr) by_key[std::string(kv.first.cast<ffi::String>())].second = canonical(kv.second);
  std::string diff;
  for (const auto& [k, v] : by_key) {
    if (std::find(std::begin(kBuiltAfter), std::end(kBuiltAfter), k) != std::end(kBuiltAfter))
      continue;
    if (v.first != v.second) diff += (diff.empty() ? "'" : ", '") + k + "'";
  }
  return diff.empty() ? diff : "[" + diff + "]";
}

// ------------------------------------------------------------------ the weights rules
struct Weight {
  int64_t offset;
  std::vector<int64_t> shape;
  std::string dtype;
};

struct WeightsTable {
  std::string symbol;
  int64_t bytes = 0;
  std::vector<Weight> tensors;
  std::map<std::string, std::vector<int64_t>> args;  // function -> weight indices
};

inline int64_t weight_itemsize(const std::string& dtype) {
  for (const auto& [name, size] : kWeightDTypes)
    if (dtype == name) return size;
  return 0;
}

// rules weights-bytes, weight-dtype, weight-offset, weight-shape, weight-extent
inline void check_weights(const WeightsTable& t, int64_t size, const std::string& where) {
  const std::string sym = "the " + std::to_string(size) +
                          " bytes of the library's weights symbol '" + t.symbol + "'";
  if (t.bytes < 0 || t.bytes > size)
    throw BadInput(where + ": weights.bytes: expected at most " + sym + ", found " +
                   std::to_string(t.bytes));
  for (size_t i = 0; i < t.tensors.size(); ++i) {
    const Weight& w = t.tensors[i];
    const std::string field = where + ": weights.tensors[" + std::to_string(i) + "] (weight " +
                              std::to_string(i) + ")";
    const int64_t item = weight_itemsize(w.dtype);
    if (item == 0) {
      std::string names;
      for (const auto& [name, _] : kWeightDTypes) names += (names.empty() ? "" : ", ") + std::string(name);
      throw BadInput(field + ": dtype: expected one of " + names + ", found '" + w.dtype + "'");
    }
    if (w.offset < 0 || w.offset % kAlign)
      throw BadInput(field + ": offset: expected >= 0 and a multiple of 64, found " +
                     std::to_string(w.offset));
    if (std::any_of(w.shape.begin(), w.shape.end(), [](int64_t d) { return d < 0; }))
      throw BadInput(field + ": shape: expected dims >= 0, found " + shape_str(w.shape));
    __int128 end = item;
    for (int64_t d : w.shape) end = std::min<__int128>(end * d, (__int128)1 << 100);
    end += w.offset;
    if (end > size) {
      const std::string at = end < ((__int128)1 << 62) ? "at byte " + std::to_string(int64_t(end))
                                                        : "beyond byte 2**62";
      throw BadInput(field + ": extent: expected " + w.dtype + shape_str(w.shape) +
                     " at offset " + std::to_string(w.offset) + " to end within " + sym +
                     ", found its end " + at);
    }
  }
}

// Python's type(v).__name__ and repr(v) of a JSON value (what runtime/manifest.py prints)
inline std::string py_type(const ffi::Any& v) {
  switch (v.type_index()) {
    case kTVMFFINone: return "NoneType";
    case kTVMFFIBool: return "bool";
    case kTVMFFIInt: return "int";
    case kTVMFFIFloat: return "float";
    default: break;
  }
  if (v.try_cast<ffi::String>()) return "str";
  return v.try_cast<ffi::Map<ffi::Any, ffi::Any>>() ? "dict" : "list";
}

inline void py_repr(const ffi::Any& v, std::string& out) {
  switch (v.type_index()) {
    case kTVMFFINone: out += "None"; return;
    case kTVMFFIBool: out += v.cast<bool>() ? "True" : "False"; return;
    case kTVMFFIInt: out += std::to_string(v.cast<int64_t>()); return;
    case kTVMFFIFloat: out += py_float(v.cast<double>()); return;
    default: break;
  }
  if (auto s = v.try_cast<ffi::String>()) {
    out += "'" + std::string(*s) + "'";
  } else if (auto m = v.try_cast<ffi::Map<ffi::Any, ffi::Any>>()) {
    out += '{';
    bool first = true;
    for (const auto& kv : *m) {
      out += first ? "" : ", ";
      py_repr(kv.first, out), out += ": ", py_repr(kv.second, out), first = false;
    }
    out += '}';
  } else if (auto a = v.try_cast<ffi::Array<ffi::Any>>()) {
    out += '[';
    for (size_t i = 0; i < a->size(); ++i) out += i ? ", " : "", py_repr((*a)[i], out);
    out += ']';
  }
}

inline std::string py_repr60(const ffi::Any& v) {
  std::string out;
  py_repr(v, out);
  return out.substr(0, 60);
}

// runtime/manifest.py _ints: a list of integers (bools are not)
inline std::vector<int64_t> ints(const ffi::Any& v, const std::string& prefix,
                                 const std::string& key) {
  auto a = v.try_cast<ffi::Array<ffi::Any>>();
  bool ok = a.has_value();
  for (size_t i = 0; ok && i < a->size(); ++i) ok = (*a)[i].type_index() == kTVMFFIInt;
  if (!ok) throw BadInput(prefix + "key '" + key + "': expected a list of integers, found " + py_repr60(v));
  std::vector<int64_t> out;
  for (const ffi::Any& x : *a) out.push_back(x.cast<int64_t>());
  return out;
}

// a field of the weights table, of the JSON kind runtime/manifest.py's _record requires
inline ffi::Any weights_field(const ffi::Map<ffi::Any, ffi::Any>& m, const std::string& key,
                              const char* kind, const std::string& prefix) {
  auto it = m.find(ffi::String(key));
  if (it == m.end()) throw BadInput(prefix + "key 'weights." + key + "': missing");
  const ffi::Any v = (*it).second;
  if (py_type(v) != kind)
    throw BadInput(prefix + "key 'weights." + key + "': expected " + kind + ", found " +
                   py_type(v) + " " + py_repr60(v));
  return v;
}

// the weights table, checked in the order and words of runtime/manifest.py _weights;
// `prefix` names it ("<manifest.json> is corrupt: ", "<lib>: its weights table is corrupt: ")
inline WeightsTable read_weights(const ffi::Any& v, const std::string& prefix) {
  auto wm = v.try_cast<ffi::Map<ffi::Any, ffi::Any>>();
  if (!wm) throw BadInput(prefix + "key 'weights': expected dict, found " + py_type(v) + " " + py_repr60(v));
  WeightsTable t;
  t.symbol = std::string(weights_field(*wm, "symbol", "str", prefix).cast<ffi::String>());
  t.bytes = weights_field(*wm, "bytes", "int", prefix).cast<int64_t>();
  auto rows = weights_field(*wm, "tensors", "list", prefix).cast<ffi::Array<ffi::Any>>();
  auto args = weights_field(*wm, "args", "dict", prefix).cast<ffi::Map<ffi::Any, ffi::Any>>();
  for (size_t i = 0; i < rows.size(); ++i) {
    const std::string path = "weights.tensors[" + std::to_string(i) + "]";
    auto r = rows[i].try_cast<ffi::Array<ffi::Any>>();
    if (!r || r->size() != 3 || py_type((*r)[2]) != "str")
      throw BadInput(prefix + "key '" + path + "': expected [offset, shape, dtype], found " + py_repr60(rows[i]));
    if ((*r)[0].type_index() != kTVMFFIInt)
      throw BadInput(prefix + "key '" + path + ".offset': expected an integer, found " + py_repr60((*r)[0]));
    t.tensors.push_back({(*r)[0].cast<int64_t>(), ints((*r)[1], prefix, path + ".shape"),
                         std::string((*r)[2].cast<ffi::String>())});
  }
  for (const auto& kv : args) {
    const std::string f = std::string(kv.first.cast<ffi::String>());
    t.args[f] = ints(kv.second, prefix, "weights.args." + f);
    for (int64_t i : t.args[f])
      if (i < 0 || i >= static_cast<int64_t>(t.tensors.size()))
        throw BadInput(prefix + "key 'weights.args': an index outside the " +
                       std::to_string(t.tensors.size()) + " tensors");
  }
  return t;
}

// (field, value as text) of every field of a table, in one order (contract.py _rows)
inline std::vector<std::pair<std::string, std::string>> rows(const WeightsTable& t) {
  std::vector<std::pair<std::string, std::string>> r = {
      {"symbol", t.symbol}, {"bytes", std::to_string(t.bytes)},
      {"tensors (count)", std::to_string(t.tensors.size())}};
  for (size_t i = 0; i < t.tensors.size(); ++i) {
    const std::string f = "tensors[" + std::to_string(i) + "].";
    r.emplace_back(f + "offset", std::to_string(t.tensors[i].offset));
    r.emplace_back(f + "shape", shape_str(t.tensors[i].shape));
    r.emplace_back(f + "dtype", t.tensors[i].dtype);
  }
  std::string names;
  for (const auto& kv : t.args) names += (names.empty() ? "'" : ", '") + kv.first + "'";
  r.emplace_back("args (functions)", "[" + names + "]");
  for (const auto& kv : t.args) r.emplace_back("args." + kv.first, shape_str(kv.second));
  return r;
}

// rule weights-same: manifest.json's table (`found`, null: none) is the library's own
inline void check_same_weights(const WeightsTable* found, const WeightsTable* library,
                               const std::string& where) {
  const std::string tail = "; the manifest was edited or comes from another build";
  if (found == nullptr || library == nullptr) {
    const size_t n = library ? library->tensors.size() : 0, m = found ? found->tensors.size() : 0;
    if (n == 0 && m == 0) return;
    throw BadInput(where + ": weights: expected " + std::to_string(n) +
                   " weights (the table the library carries), found " + std::to_string(m) + tail);
  }
  const auto mine = rows(*found), theirs = rows(*library);
  for (size_t i = 0; i < std::min(mine.size(), theirs.size()); ++i)
    if (mine[i].second != theirs[i].second)
      throw BadInput(where + ": weights." + mine[i].first + ": expected " + theirs[i].second +
                     " (the table the library carries), found " + mine[i].second + tail);
}

}  // namespace mtc
