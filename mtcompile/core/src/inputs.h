// The input checks of a tenant's call, for both front-ends (the Python runtime through core.cc's
// mtcompile.core.input_checker, mtcompile-run on the .npy files it reads): the number of inputs,
// each one's dtype and shape, a dynamic dim within its bounds and of one size wherever its name
// appears, an index input's values within its index_range. One message per refusal, the same
// words from both.
#pragma once

#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "contract.h"
#include "manifest.h"

namespace mtc {

// one input as given: its dtype's name (numpy's: "float32", "<U3" for what mtcompile has no name
// for), shape, and data (C-contiguous; null until read: the driver checks headers first)
struct Arg {
  std::string dtype;
  std::vector<int64_t> shape;
  const void* data = nullptr;
};

// "float32[batch, 3]": a dynamic dim by its name
inline std::string io_shape_str(const IO& io) {
  std::string r = "[";
  for (size_t i = 0; i < io.shape.size(); ++i)
    r += (i ? ", " : "") + (io.shape[i] == -1 ? io.dims[i] : std::to_string(io.shape[i]));
  return r + "]";
}

// "x: float32[batch, 8] (batch in [1, 16]), y: int64[3]"
inline std::string signature_str(const std::vector<IO>& ios) {
  std::string r;
  for (const IO& io : ios) {
    r += (r.empty() ? "" : ", ") + io.name + ": " + io.dtype + io_shape_str(io);
    std::string dims;
    for (const auto& [d, b] : io.bounds)
      dims += (dims.empty() ? "" : ", ") + d + " in [" + std::to_string(b.first) + ", " +
              std::to_string(b.second) + "]";
    if (!dims.empty()) r += " (" + dims + ")";
  }
  return r;
}

inline std::string input_at(const Tenant& t, const IO& io) {
  return "tenant '" + t.name + "', input '" + io.name + "': ";
}

// rule input-count
inline void check_count(const Tenant& t, size_t given) {
  if (given != t.inputs.size())
    throw BadInput("tenant '" + t.name + "' takes " + std::to_string(t.inputs.size()) +
                   " input(s) (" + signature_str(t.inputs) + "), got " + std::to_string(given));
}

// rules input-type, input-bounds: one input's dtype, shape and dynamic dims
inline void check_arg(const Tenant& t, const IO& io, const Arg& a) {
  bool fits = a.dtype == io.dtype && a.shape.size() == io.shape.size();
  for (size_t i = 0; fits && i < io.shape.size(); ++i)
    fits = io.shape[i] == -1 || io.shape[i] == a.shape[i];
  if (!fits)
    throw BadInput(input_at(t, io) + "expected " + io.dtype + io_shape_str(io) + ", got " +
                   a.dtype + shape_str(a.shape) + " (signature: " + signature_str(t.inputs) + ")");
  for (size_t i = 0; i < io.shape.size(); ++i) {
    auto b = io.shape[i] == -1 ? io.bounds.find(io.dims[i]) : io.bounds.end();
    if (b != io.bounds.end() && (a.shape[i] < b->second.first || a.shape[i] > b->second.second))
      throw BadInput(input_at(t, io) + "dim " + std::to_string(i) + " ('" + io.dims[i] +
                     "') is " + std::to_string(a.shape[i]) + ", outside its bounds [" +
                     std::to_string(b->second.first) + ", " + std::to_string(b->second.second) +
                     "] (signature: " + signature_str(t.inputs) + ")");
  }
}

// rule input-dims: a dim name has one size in every input of the call
inline void check_same_dims(const Tenant& t, const std::vector<Arg>& args) {
  std::map<std::string, std::pair<int64_t, std::string>> seen;  // name -> (size, "input (axis)")
  for (size_t k = 0; k < t.inputs.size(); ++k) {
    const IO& io = t.inputs[k];
    for (size_t i = 0; i < io.shape.size(); ++i) {
      if (io.shape[i] != -1) continue;
      const std::string where = "input '" + io.name + "' (axis " + std::to_string(i) + ")";
      auto [it, fresh] = seen.try_emplace(io.dims[i], args[k].shape[i], where);
      if (!fresh && it->second.first != args[k].shape[i])
        throw BadInput("tenant '" + t.name + "': dim '" + io.dims[i] + "' is " +
                       std::to_string(it->second.first) + " in " + it->second.second + " but " +
                       std::to_string(args[k].shape[i]) + " in " + where +
                       "; one name, one size");
    }
  }
}

template <typename T>
void check_values(const Tenant& t, const IO& io, const void* data, size_t n) {
  const T* v = static_cast<const T*>(data);
  int64_t lo = static_cast<int64_t>(v[0]), hi = lo;
  for (size_t i = 1; i < n; ++i) {
    const int64_t x = static_cast<int64_t>(v[i]);
    lo = x < lo ? x : lo;
    hi = x > hi ? x : hi;
  }
  if (lo >= io.lo && hi < io.hi) return;
  const std::string what = io.lo == 0 || io.lo == -io.hi
                               ? "index a table of " + std::to_string(io.hi) + " rows"
                               : std::string("index a table");
  throw BadInput(input_at(t, io) + "values " + what + " and must be in [" + std::to_string(io.lo) +
                 ", " + std::to_string(io.hi) + "); got values in [" + std::to_string(lo) + ", " +
                 std::to_string(hi) + "]");
}

// rule index-range: an index input's values lie in [lo, hi) (its dtype checked first)
inline void check_range(const Tenant& t, const IO& io, const Arg& a) {
  size_t n = 1;
  for (int64_t d : a.shape) n *= static_cast<size_t>(d);
  if (!io.ranged || n == 0 || a.data == nullptr) return;
  if (io.dtype == "int64") check_values<int64_t>(t, io, a.data, n);
  else if (io.dtype == "int32") check_values<int32_t>(t, io, a.data, n);
  else if (io.dtype == "int16") check_values<int16_t>(t, io, a.data, n);
  else if (io.dtype == "int8") check_values<int8_t>(t, io, a.data, n);
  else if (io.dtype == "uint8") check_values<uint8_t>(t, io, a.data, n);
}

// everything but the values: what the driver checks from the .npy headers, before reading
inline void check_signature(const Tenant& t, const std::vector<Arg>& args) {
  check_count(t, args.size());
  for (size_t k = 0; k < args.size(); ++k) check_arg(t, t.inputs[k], args[k]);
  check_same_dims(t, args);
}

// the whole check of one call's inputs
inline void check_inputs(const Tenant& t, const std::vector<Arg>& args) {
  check_signature(t, args);
  for (size_t k = 0; k < args.size(); ++k) check_range(t, t.inputs[k], args[k]);
}

// one input's bytes as given: where they are and how many (C order, after its checks)
using Bytes = std::pair<const void*, size_t>;

// rule shared-inputs: the tenants that share one run_all input (`group`: its (tenant, input)
// uses) give it one value, byte for byte (`uses`: their bytes, in the group's order)
inline void check_shared(const std::vector<std::pair<std::string, std::string>>& group,
                         const std::vector<Bytes>& uses) {
  for (size_t k = 1; k < uses.size() && k < group.size(); ++k) {
    const bool same = uses[k].second == uses[0].second &&
                      (uses[k].first == uses[0].first ||
                       std::memcmp(uses[k].first, uses[0].first, uses[0].second) == 0);
    if (!same)
      throw BadInput("tenants '" + group[0].first + "' and '" + group[k].first + "' share input '" +
                     group[0].second + "'/'" + group[k].second +
                     "' but were given different values");
  }
}

}  // namespace mtc
