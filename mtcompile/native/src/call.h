// One library call as every native kernel receives it: its tensors, its bias, its epilogue
// and its conv parameters, unpacked once from the call's arguments by registration.cc after
// the row of kernels_table.h (generated from mtcompile/native/table.py) that names it.
// Argument order (destination-passing): inputs..., [bias], [residual], [conv params], out.
#pragma once

#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/function.h>

#include "common.h"

namespace mtc {

struct Call {
  const char* op;             // the symbol called, for errors
  tvm::ffi::PackedArgs args;  // all of them; inputs first
  const float* bias = nullptr;
  int64_t nbias = 0;
  Epilogue ep;
  tvm::ffi::Shape params;  // a conv's 9 parameters (empty otherwise)

  TensorView in(int i) const { return args[i].cast<TensorView>(); }
  TensorView out() const { return args[args.size() - 1].cast<TensorView>(); }
};

using KernelFn = void (*)(const Call&);

// one registered form of a kernel: its symbol, entry, input count and what follows them
struct KernelRow {
  const char* symbol;
  KernelFn fn;
  int inputs;
  bool bias, residual, params;
  Act act;
};

}  // namespace mtc
