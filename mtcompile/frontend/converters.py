"""Converters of ours for core ATen ops that TVM's torch.export importer lacks or converts
with other results than PyTorch's (their entries replace TVM's).

Each maps an op name (``"op.overload"``, as the importer's table keys it) to a function
``(node, importer) -> relax.Expr`` and goes in through the importer's
``custom_convert_map``. Every converter is tested against PyTorch (tests/test_frontends.py).
"""

from __future__ import annotations

from collections.abc import Callable


def _torch_dtype(node) -> str | None:
    """The dtype of `node`'s PyTorch output (``meta["val"]``), as TVM names it, or None."""
    val = node.meta.get("val")
    return str(val.dtype).removeprefix("torch.") if hasattr(val, "dtype") else None


def _scan(relax_op: Callable) -> Callable:
    """A converter of ``cumsum.default`` / ``cumprod.default`` that keeps PyTorch's type
    promotion. TVM's own passes ``dtype=None`` unless the call names one, and Relax then
    scans in the input's dtype, while PyTorch accumulates bool and integer inputs in
    int64: transformers' ``(position_diff != 1).cumsum(-1)`` (every decoder's packed
    sequence mask) became a bool scan, an add of bools that TVM's LLVM codegen refuses
    (``CreateAdd``: ``t.MatchesCode(kDLFloat)``), and an int32 ``cumsum`` an int32 one (a
    different dtype than PyTorch's, and a sum that can overflow)."""

    def convert(node, importer):
        x = importer.env[node.args[0]]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dtype = node.kwargs.get("dtype")
        if dtype is not None:
            dtype = importer._convert_data_type(str(dtype), importer.env)
        else:  # PyTorch's result dtype (int64 for bool and integer inputs)
            dtype = _torch_dtype(node)
            if dtype is None:  # no recorded value: PyTorch's rule
                src = str(x.ty.dtype)
                dtype = "int64" if src == "bool" or src.startswith(("int", "uint")) else src
        return importer.block_builder.emit(relax_op(x, dim, dtype))

    return convert


def _converters() -> dict[str, Callable]:
    from tvm import relax

    return {"cumsum.default": _scan(relax.op.cumsum), "cumprod.default": _scan(relax.op.cumprod)}


CONVERTERS: dict[str, Callable] = _converters()
