// Row kernels: softmax and layer norm over the last axis of x (rows_avx2.h), rows split over
// the pool: the kernels of table rows "softmax" and "layer_norm".
#include <cstdint>

#include "call.h"
#include "rows_avx2.h"

namespace mtc {
namespace {

void check_same_shape(const char* op, const TensorView& x, const TensorView& out) {
  if (!same_shape(x, out))
    TVM_FFI_THROW(ValueError) << op << ": out has shape " << shape_str(out) << ", expected x's "
                              << shape_str(x);
}

template <typename F>
void over_rows(const TensorView& x, int64_t cost_per_element, const F& row) {
  const int64_t n = x.size(x.ndim() - 1), rows = n == 0 ? 0 : x.numel() / n;
  if (rows == 0) return;
  parallel(x.numel() * cost_per_element, rows, [&](int64_t task, int64_t ntask) {
    auto [r0, r1] = part(rows, task, ntask, 1);
    for (int64_t r = r0; r < r1; ++r) row(r * n, n);
  });
}

}  // namespace

void softmax_run(const Call& c) {
  TensorView x = c.in(0), out = c.out();
  check_tensor(c.op, "x", x, 1, 8);
  check_tensor(c.op, "out", out, 1, 8);
  check_same_shape(c.op, x, out);
  const float* px = fdata(x);
  float* py = fdata_mut(out);
  over_rows(x, 8, [&](int64_t at, int64_t n) {
    (kHasAvx2 ? softmax_row_avx2 : softmax_row_generic)(px + at, py + at, n);
  });
}

void layer_norm_run(const Call& c) {
  TensorView x = c.in(0), gamma = c.in(1), beta = c.in(2), eps = c.in(3), out = c.out();
  check_tensor(c.op, "x", x, 1, 8);
  check_tensor(c.op, "gamma", gamma, 1, 1);
  check_tensor(c.op, "beta", beta, 1, 1);
  check_tensor(c.op, "epsilon", eps, 1, 1);
  check_tensor(c.op, "out", out, 1, 8);
  check_same_shape(c.op, x, out);
  // gamma and beta of n values, or n per slice of x's first dimension (the stacked scales
  // and shifts of horizontally fused tenants: slice b takes values [b * n, (b + 1) * n))
  const int64_t n = x.size(x.ndim() - 1), slices = x.ndim() > 1 ? x.size(0) : 1;
  const bool stacked = slices > 1 && gamma.size(0) == slices * n;
  if ((gamma.size(0) != n && !stacked) || beta.size(0) != gamma.size(0) || eps.size(0) != 1)
    TVM_FFI_THROW(ValueError) << c.op << ": gamma " << shape_str(gamma) << ", beta "
                              << shape_str(beta) << " and epsilon " << shape_str(eps)
                              << " do not fit x " << shape_str(x) << " (expected [" << n
                              << "] or [" << slices * n << "] twice, and [1])";
  const float *px = fdata(x), *pg = fdata(gamma), *pb = fdata(beta);
  const float e = fdata(eps)[0];
  float* py = fdata_mut(out);
  const int64_t per_slice = stacked ? x.numel() / slices : x.numel() + 1;
  over_rows(x, 4, [&](int64_t at, int64_t len) {
    const int64_t off = at / per_slice * n;
    (kHasAvx2 ? layer_norm_row_avx2 : layer_norm_row_generic)(px + at, pg + off, pb + off, e,
                                                              py + at, len);
  });
}

}  // namespace mtc
