// A bundle's library opened under the artifact contract (contract.h), the one sequence both
// front-ends run (core.cc for Python, run_bundle.cc for mtcompile-run): the manifest, the host,
// a private copy of the library checked before dlopen (hash, signature, ELF headers), then the
// weights tables and the embedded manifest of the loaded library.
#pragma once

#include <tvm/ffi/any.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <dlfcn.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <string>

#include "contract.h"
#include "manifest.h"
#include "sha256.h"

namespace mtc {

// ------------------------------------------------------------------ the library (contract.h)
inline std::string read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw BadInput(path + " cannot be read");
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

// a key file's bytes, one trailing newline dropped (runtime/signing.py read_key_file)
inline std::string read_key_file(const std::string& path) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode))
    throw BadInput("--verify-key-file " + path + ": not a readable file");
  std::string key = read_all(path);
  if (key.size() >= 2 && key.compare(key.size() - 2, 2, "\r\n") == 0) key.resize(key.size() - 2);
  else if (!key.empty() && key.back() == '\n') key.pop_back();
  if (key.empty()) throw BadInput("--verify-key-file " + path + ": the key is empty");
  return key;
}

// the verify key: the one given, else MTCOMPILE_VERIFY_KEY (services), else none
inline std::optional<std::string> verify_key(const std::optional<std::string>& given) {
  if (given) return given;
  const char* env = std::getenv("MTCOMPILE_VERIFY_KEY");
  if (env != nullptr && *env != '\0') return std::string(env);
  return std::nullopt;
}

inline bool is_signed(const Manifest& man) {
  auto sig = man.json.find(ffi::String("bundle_signature"));
  return sig != man.json.end() && (*sig).second != nullptr;
}

// rule signature: a key given (or required) needs a signed bundle; its MAC starts with the
// canonical manifest (less its signature), the library's bytes follow (runtime/signing.py)
inline Hmac signature_mac(const Manifest& man, const std::string& key) {
  if (!is_signed(man))
    throw BadInput(man.path + ": the bundle is not signed, and a verify key was given; save it "
                   "with Bundle.save(path, sign_key=...)");
  std::string text;
  canonical_map(man.json, text, {"bundle_signature"});
  Hmac mac(key);
  mac.inner().update("hmac-sha256" + std::string(1, '\0') + std::to_string(text.size()) + '\0');
  mac.inner().update(text);
  return mac;
}

inline void check_signature(const Manifest& man, Hmac& mac) {
  auto found = (*man.json.find(ffi::String("bundle_signature"))).second.try_cast<ffi::String>();
  if (!found || std::string(*found) != "hmac-sha256:" + hex(mac.finish()))
    throw BadInput(man.path + ": signature does not match the manifest and library with this "
                   "key: the files were changed after signing, or were signed with another key");
}

// rule library-elf, on a file: its ELF headers and segments lie inside it (else SIGBUS)
inline void check_elf_file(const std::string& path, const std::string& lib) {
  std::ifstream f(path, std::ios::binary);
  std::string head(64, '\0');
  f.read(head.data(), 64);
  head.resize(static_cast<size_t>(std::max<std::streamsize>(f.gcount(), 0)));
  struct stat st;
  const uint64_t size = stat(path.c_str(), &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
  if (head.size() < 64) return check_elf(head, lib);  // says "not ... ELF" in its words
  const uint64_t phoff = le(head, 0x20, 8), phentsize = le(head, 0x36, 2), phnum = le(head, 0x38, 2);
  // the headers and the program header table, then the segments checked against `size`
  std::string b = head;
  if (phoff <= size && phentsize * phnum <= size - phoff) {
    b.resize(std::max<uint64_t>(64, phoff + phentsize * phnum), '\0');
    f.clear();
    f.seekg(static_cast<std::streamoff>(phoff));
    f.read(b.data() + phoff, static_cast<std::streamsize>(phentsize * phnum));
  }
  check_elf(b, lib, size);
}

// rules library-hash, signature, library-elf: the library copied to `private_path` (what is
// checked is what gets loaded) and checked there before any dlopen; returns the file it came
// from (<name>.so, or its staged copy of a save that stopped)
inline std::string checked_library(const Manifest& man, const std::optional<std::string>& key,
                                   const std::string& private_path) {
  const std::string lib = man.dir + "/" + man.library, want = man.library_sha256;
  std::string found;
  for (const std::string& path : {lib, man.dir + "/." + man.library + "." + want.substr(0, 16)}) {
    struct stat st;
    if (stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
    std::optional<Hmac> mac;
    if (key) mac.emplace(signature_mac(man, *key));
    std::ifstream in(path, std::ios::binary);
    std::ofstream out(private_path, std::ios::binary | std::ios::trunc);
    if (!in) throw BadInput(path + " cannot be read");
    if (!out) throw std::runtime_error(private_path + ": cannot write a private copy of the library");
    Sha256 h;
    std::string chunk(1 << 20, '\0');
    while (in) {
      in.read(chunk.data(), static_cast<std::streamsize>(chunk.size()));
      const size_t n = static_cast<size_t>(in.gcount());
      h.update(chunk.data(), n);
      if (mac) mac->inner().update(chunk.data(), n);
      out.write(chunk.data(), static_cast<std::streamsize>(n));
    }
    out.close();
    if (!out) throw std::runtime_error(private_path + ": cannot write a private copy of the library");
    const std::string digest = hex(h.digest());
    if (digest == want) {
      if (mac) check_signature(man, *mac);
      check_elf_file(private_path, path);
      return path;
    }
    if (found.empty()) found = digest;
  }
  if (found.empty())
    throw BadInput(man.dir + ": the manifest names library '" + man.library + "', which is missing");
  throw BadInput(lib + " does not match " + man.path + ": library sha256 " + found.substr(0, 16) +
                 "..., manifest expects " + want.substr(0, 16) +
                 "...; the files come from different builds");
}

// a private directory for the checked copy, removed with it
struct PrivateCopy {
  std::string dir, path;
  explicit PrivateCopy(const std::string& name) {
    const char* tmp = std::getenv("TMPDIR");
    std::string templ = std::string(tmp && *tmp ? tmp : "/tmp") + "/mtcompile-XXXXXX";
    if (mkdtemp(templ.data()) == nullptr) throw std::runtime_error("cannot make a temporary directory");
    dir = templ, path = dir + "/" + name;
  }
  ~PrivateCopy() {
    std::remove(path.c_str());
    rmdir(dir.c_str());
  }
};

// rule embedded-manifest: the library's copy (`text`) equals manifest.json less kBuiltAfter
inline void check_embedded_text(const Manifest& man, const std::string& text, const std::string& src) {
  ffi::String err;
  ffi::Any embedded = ffi::json::Parse(text, &err);
  auto m = embedded.try_cast<ffi::Map<ffi::Any, ffi::Any>>();
  if (!err.empty() || !m) throw BadInput(src + ": has no readable embedded manifest");
  const std::string diff = embedded_diff(*m, man.json);
  if (!diff.empty()) throw BadInput(src + " and " + man.path + " disagree on " + diff);
}

inline void check_embedded(const Manifest& man, ffi::Module exec, const std::string& src) {
  auto fn = exec->GetFunction("mtcompile_manifest");
  if (!fn.has_value()) throw BadInput(src + ": has no readable embedded manifest");
  auto t = (*fn)().try_cast<ffi::Tensor>();
  if (!t) throw BadInput(src + ": has no readable embedded manifest");
  const char* data = static_cast<const char*>(t->data_ptr()) + t->byte_offset();
  check_embedded_text(man, std::string(data, ffi::GetDataSize(*t->GetDLTensorPtr())), src);
}

struct LibWeights {
  std::optional<WeightsTable> table;  // the library's own (none: it has no weights)
  std::string text;  // as the library carries it (empty: none)
  char* base = nullptr;
  int64_t size = 0;  // of the weights symbol
};

// the library's own weights table (rules weights-bytes, weight-*), against its symbol
inline LibWeights library_weights(const std::string& private_path, const std::string& src) {
  void* handle = dlopen(private_path.c_str(), RTLD_NOW | RTLD_NOLOAD);  // the one TVM opened
  if (handle == nullptr) throw BadInput(src + ": cannot be opened: " + dlerror());
  LibWeights w;
  const char* text = static_cast<const char*>(dlsym(handle, kTableSymbol));
  if (text != nullptr) {
    w.base = static_cast<char*>(dlsym(handle, kWeightsSymbol));
    char* end = static_cast<char*>(dlsym(handle, kEndSymbol));
    if (w.base == nullptr || end == nullptr || end < w.base)
      throw BadInput(src + ": carries a weights table but no weights symbol '" +
                     kWeightsSymbol + "' with its end '" + kEndSymbol + "'");
    w.text = text;
    ffi::String err;
    ffi::Any parsed = ffi::json::Parse(w.text, &err);
    if (!err.empty()) throw BadInput(src + ": its weights table is corrupt: not valid JSON");
    w.table = read_weights(parsed, src + ": its weights table is corrupt: ");
    w.size = end - w.base;
    if (reinterpret_cast<uintptr_t>(w.base) % kAlign)
      throw BadInput(src + ": weights table at a misaligned address");
    check_weights(*w.table, w.size, src);
  }
  dlclose(handle);  // the reference NOLOAD took; TVM's own keeps the library
  return w;
}

// rules weights-same, weights-bytes, weight-*: manifest.json's table against the library's
inline void check_manifest_weights(const Manifest& man, const LibWeights& w) {
  if (man.weights) check_weights(*man.weights, w.size, man.path);
  check_same_weights(man.weights ? &*man.weights : nullptr, w.table ? &*w.table : nullptr,
                     man.path);
}

// the checked private copy loaded by TVM's loader (dlopen), then, in this order for both
// front-ends: the weights tables (the library's, then manifest.json's) and the embedded manifest
struct Loaded {
  ffi::Module lib, exec;  // the library, its Relax VM (initialized on the host CPU)
  LibWeights weights;
};

inline Loaded load_checked(const Manifest& man, const std::string& private_path,
                           const std::string& src) {
  ffi::Module lib = ffi::Module::LoadFromFile(private_path);
  LibWeights weights = library_weights(private_path, src);
  check_manifest_weights(man, weights);
  auto load = lib->GetFunction("vm_load_executable");
  if (!load.has_value()) throw BadInput(src + ": has no readable embedded manifest");
  ffi::Module exec = (*load)().cast<ffi::Module>();
  constexpr int kPooled = 2;  // TVM's pooled allocator, as relax.VirtualMachine uses
  exec->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, kPooled,
                                                  static_cast<int>(kDLCPU), 0, kPooled);
  check_embedded(man, exec, src);
  return Loaded{lib, exec, std::move(weights)};
}

#ifndef MTC_TVM_VERSION
#define MTC_TVM_VERSION ""  // unknown when built: not checked
#endif

// rules tvm-version, cpu-features: what the bundle needs of this host
inline void check_host(const Manifest& man) {
  const std::string here = MTC_TVM_VERSION;
  if (!here.empty() && man.tvm_version != here)
    throw BadInput(man.path + ": built with TVM " + man.tvm_version + ", this process has TVM " +
                   here + "; TVM's executable format is not stable across versions: rebuild "
                   "the bundle with this TVM");
  const std::string missing = missing_features(man.cpu_features);
  if (!missing.empty())
    throw BadInput(man.path + ": built for CPU '" + man.cpu + "', whose features " + missing +
                   " this machine's CPU lacks; rebuild it here, or with cpu='generic' (CLI "
                   "--cpu generic) for any x86-64");
}

// Everything checked before dlopen, in one order for both front-ends: the manifest's fields
// (format, library-name, run-all-inputs, the weights table's form), the host (tvm-version,
// cpu-features), the signature required, the library (hash, signature, ELF) copied to
// `private_path`. `src` gets the file the library came from.
inline Manifest open_checked(const std::string& dir, const std::optional<std::string>& given_key,
                             bool require_signature, const std::string& private_path,
                             std::string* src) {
  Manifest man = read_manifest(dir);
  check_host(man);
  const std::optional<std::string> key = verify_key(given_key);
  if (require_signature && !key)
    throw BadInput(man.path + ": a verified signature is required, and no verify key was given "
                   "(a key file, or MTCOMPILE_VERIFY_KEY)");
  *src = checked_library(man, key, private_path);
  man.verified = key.has_value();
  return man;
}

}  // namespace mtc
