// A bundle's library opened under the artifact contract (contract.h): the host, the library's
// hash before dlopen, its signature, ELF headers, a private copy, the embedded manifest and the
// weights tables, in the order mtcompile.runtime.artifact checks them.
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

// rule signature: the HMAC of manifest.json (less its signature, canonical) and the library
inline void check_signature(const Manifest& man, const std::string& key, const std::string& bytes) {
  auto sig = man.json.find(ffi::String("bundle_signature"));
  if (sig == man.json.end() || (*sig).second == nullptr)
    throw BadInput(man.path + ": the bundle is not signed, and a verify key was given; save it "
                   "with Bundle.save(path, sign_key=...)");
  std::string text;
  canonical_map(man.json, text, {"bundle_signature"});
  Hmac mac(key);
  const std::string scheme = "hmac-sha256";
  mac.inner().update(scheme + '\0' + std::to_string(text.size()) + '\0');
  mac.inner().update(text);
  mac.inner().update(bytes);
  auto found = (*sig).second.try_cast<ffi::String>();
  if (!found || std::string(*found) != scheme + ":" + hex(mac.finish()))
    throw BadInput(man.path + ": signature does not match the manifest and library with this "
                   "key: the files were changed after signing, or were signed with another key");
}

// rules library-hash, signature, library-elf: the library's bytes, checked before any dlopen;
// `src` gets the file they came from (<name>.so, or its staged copy of a save that stopped)
inline std::string checked_library(const Manifest& man, const std::optional<std::string>& key,
                            std::string* src) {
  const std::string lib = man.dir + "/" + man.library, want = man.library_sha256;
  std::string found;
  for (const std::string& path : {lib, man.dir + "/." + man.library + "." + want.substr(0, 16)}) {
    struct stat st;
    if (stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
    std::string bytes = read_all(path);
    Sha256 h;
    h.update(bytes);
    const std::string digest = hex(h.digest());
    if (digest == want) {
      if (key) check_signature(man, *key, bytes);
      check_elf(bytes, path);
      *src = path;
      return bytes;
    }
    if (found.empty()) found = digest;
  }
  if (found.empty())
    throw BadInput(man.dir + ": the manifest names library '" + man.library + "', which is missing");
  throw BadInput(lib + " does not match " + man.path + ": library sha256 " + found.substr(0, 16) +
                 "..., manifest expects " + want.substr(0, 16) +
                 "...; the files come from different builds");
}

// the checked bytes in a private file (what is checked is what gets loaded), removed at exit
struct PrivateCopy {
  std::string dir, path;
  PrivateCopy(const std::string& bytes, const std::string& name) {
    const char* tmp = std::getenv("TMPDIR");
    std::string templ = std::string(tmp && *tmp ? tmp : "/tmp") + "/mtcompile-run-XXXXXX";
    if (mkdtemp(templ.data()) == nullptr) throw std::runtime_error("cannot make a temporary directory");
    dir = templ, path = dir + "/" + name;
    std::ofstream f(path, std::ios::binary);
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!f) throw std::runtime_error(path + ": cannot write a private copy of the library");
  }
  ~PrivateCopy() {
    std::remove(path.c_str());
    rmdir(dir.c_str());
  }
};

// rule embedded-manifest: the library's copy equals manifest.json less kBuiltAfter
inline void check_embedded(const Manifest& man, ffi::Module exec, const std::string& src) {
  auto fn = exec->GetFunction("mtcompile_manifest");
  if (!fn.has_value()) throw BadInput(src + ": has no readable embedded manifest");
  auto t = (*fn)().try_cast<ffi::Tensor>();
  if (!t) throw BadInput(src + ": has no readable embedded manifest");
  const char* data = static_cast<const char*>(t->data_ptr()) + t->byte_offset();
  ffi::String err;
  ffi::Any embedded = ffi::json::Parse(std::string(data, ffi::GetDataSize(*t->GetDLTensorPtr())), &err);
  auto m = embedded.try_cast<ffi::Map<ffi::Any, ffi::Any>>();
  if (!err.empty() || !m) throw BadInput(src + ": has no readable embedded manifest");
  const std::string diff = embedded_diff(*m, man.json);
  if (!diff.empty()) throw BadInput(src + " and " + man.path + " disagree on " + diff);
}

struct LibWeights {
  std::optional<WeightsTable> table;  // the library's own (none: it has no weights)
  char* base = nullptr;
};

// rules weights-*, weight-*: the library's table and manifest.json's, against its symbol
inline LibWeights checked_weights(const Manifest& man, const std::string& private_path,
                           const std::string& src) {
  void* handle = dlopen(private_path.c_str(), RTLD_NOW | RTLD_NOLOAD);  // the one TVM opened
  if (handle == nullptr) throw BadInput(src + ": cannot be opened: " + dlerror());
  LibWeights w;
  const char* text = static_cast<const char*>(dlsym(handle, kTableSymbol));
  int64_t size = 0;
  if (text != nullptr) {
    w.base = static_cast<char*>(dlsym(handle, kWeightsSymbol));
    char* end = static_cast<char*>(dlsym(handle, kEndSymbol));
    if (w.base == nullptr || end == nullptr || end < w.base)
      throw BadInput(src + ": carries a weights table but no weights symbol '" +
                     kWeightsSymbol + "' with its end '" + kEndSymbol + "'");
    ffi::String err;
    ffi::Any parsed = ffi::json::Parse(std::string(text), &err);
    if (!err.empty()) throw BadInput(src + ": its weights table is corrupt: not valid JSON");
    w.table = read_weights(parsed, src + ": its weights table is corrupt: ");
    size = end - w.base;
    if (reinterpret_cast<uintptr_t>(w.base) % kAlign)
      throw BadInput(src + ": weights table at a misaligned address");
    check_weights(*w.table, size, src);
  }
  if (man.weights) check_weights(*man.weights, size, man.path);
  check_same_weights(man.weights ? &*man.weights : nullptr, w.table ? &*w.table : nullptr,
                          man.path);
  return w;
}

#ifndef MTC_TVM_VERSION
#define MTC_TVM_VERSION ""  // unknown when built: not checked
#endif

// rules tvm-version, cpu-features: what the bundle needs of this host (runtime/artifact.py)
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

}  // namespace mtc
