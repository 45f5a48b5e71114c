"""The ``torch`` library provider: PyTorch's MKL/oneDNN matmul and convolution, called from
TVM code as ``mtcompile.torch.*``.

Compiled bundles call these through ``R.call_dps_packed`` by name (the offload-library pass
makes the library call nodes, lowering emits them); the tensors cross by
DLPack without copies. They are registered before any VM is created (compile, load), so
a saved bundle that uses them runs in a fresh process that has torch. Kept beside the
default ``native`` provider as a reference the native kernels are checked against, and for
float32 shapes or machines where PyTorch's oneDNN/MKL kernels are faster.
"""

from __future__ import annotations

from mtcompile.native.table import find

# the symbols of the table's torch forms (`mtcompile.native.table`): one place for both sides
MATMUL, MATMUL_BIAS = find("torch", "matmul").symbol, find("torch", "matmul", bias=True).symbol
CONV2D, CONV2D_BIAS = find("torch", "conv2d").symbol, find("torch", "conv2d", bias=True).symbol

__all__ = ["CONV2D", "CONV2D_BIAS", "MATMUL", "MATMUL_BIAS", "register"]
_registered = False


def register() -> None:
    """Register PyTorch's kernels as TVM global functions (idempotent)."""
    global _registered
    if _registered:
        return
    import torch
    import tvm_ffi

    _register_matmuls(torch, tvm_ffi)
    _register_convs(torch, tvm_ffi)
    _registered = True


def _register_matmuls(torch, tvm_ffi) -> None:
    """Register the matmul kernels (without and with a bias)."""
    from_dlpack = torch.from_dlpack
    addmm = torch.addmm

    @tvm_ffi.register_global_func(MATMUL, override=True)
    def _matmul(a, b, out):
        torch.matmul(from_dlpack(a), from_dlpack(b), out=from_dlpack(out))

    @tvm_ffi.register_global_func(MATMUL_BIAS, override=True)
    def _matmul_bias(a, w, bias, out):
        # w is 2-D, bias 1-D: one addmm over the rows of a (a view, no copy)
        a, w, o = from_dlpack(a), from_dlpack(w), from_dlpack(out)
        addmm(from_dlpack(bias), a.reshape(-1, a.shape[-1]), w, out=o.view(-1, o.shape[-1]))


def _register_convs(torch, tvm_ffi) -> None:
    """Register the conv2d kernels (without and with a bias)."""
    from_dlpack = torch.from_dlpack
    aten_conv = torch.ops.aten.convolution.out
    pad = torch.nn.functional.pad

    def conv(x, w, bias, params, out):
        # params: stride h/w, padding top/left/bottom/right, dilation h/w, groups
        sh, sw, pt, pl, pb, pr, dh, dw, groups = (int(v) for v in params)
        x = from_dlpack(x)
        if pt != pb or pl != pr:  # torch pads symmetrically; pad the odd side first
            x = pad(x, (pl, pr, pt, pb))
            pt = pl = 0
        aten_conv(
            x,
            from_dlpack(w),
            bias,
            [sh, sw],
            [pt, pl],
            [dh, dw],
            False,
            [0, 0],
            groups,
            out=from_dlpack(out),
        )

    @tvm_ffi.register_global_func(CONV2D, override=True)
    def _conv2d(x, w, params, out):
        conv(x, w, None, params, out)

    @tvm_ffi.register_global_func(CONV2D_BIAS, override=True)
    def _conv2d_bias(x, w, bias, params, out):
        conv(x, w, from_dlpack(bias), params, out)
