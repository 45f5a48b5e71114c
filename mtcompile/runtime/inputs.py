"""Inputs against a tenant's signature: conversions to numpy, checks with clear errors, and
seeded random inputs (for profiling and verifying without user data)."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mtcompile.errors import InputError
from mtcompile.runtime.manifest import IOSpec, TenantSig, signature_text

INT_HIGH = 16  # random integer inputs (token ids, indices) are drawn from [0, INT_HIGH)


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype called `name`; bfloat16 comes from ml_dtypes (TVM's own dependency,
    which TVM's tensors use for it), registered with numpy on import."""
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes  # noqa: F401

        return np.dtype(name)


def to_array(x) -> np.ndarray:
    """A C-contiguous numpy array from a numpy array, torch tensor, scalar or list (a
    bfloat16 tensor gives an ml_dtypes bfloat16 array: numpy has no such dtype)."""
    # np.asarray(order="C"), not np.ascontiguousarray: that one turns a 0-d array into 1-d.
    if isinstance(x, np.ndarray):
        return np.asarray(x, order="C")
    torch = sys.modules.get("torch")  # a torch tensor means torch is loaded: no import here
    if torch is not None and isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(numpy_dtype("bfloat16"))
        return t.numpy()
    return np.asarray(x, order="C")


def _checked(name: str, x, s: IOSpec, sig: Sequence[IOSpec]) -> np.ndarray:
    torch = sys.modules.get("torch")
    if (
        torch is not None
        and isinstance(x, torch.Tensor)
        and (x.is_meta or x.layout != torch.strided)
    ):
        kind = (
            "a meta tensor, which has no data"
            if x.is_meta
            else f"a sparse tensor ({x.layout}); pass x.to_dense()"
        )
        raise InputError(
            f"tenant '{name}', input '{s.name}': expected dense "
            f"{s.dtype}{list(s.shape)} data, got {kind}"
        )
    try:
        a = to_array(x)
    except (TypeError, ValueError) as e:  # a float8 tensor, a ragged list
        raise InputError(
            f"tenant '{name}', input '{s.name}': cannot use a {type(x).__name__} "
            f"as an array ({e}); expected {s.dtype}{list(s.shape)}"
        ) from e
    if (
        len(a.shape) != len(s.shape)
        or str(a.dtype) != s.dtype
        or any(isinstance(d, int) and d != n for d, n in zip(s.shape, a.shape, strict=True))
    ):
        raise InputError(
            f"tenant '{name}', input '{s.name}': expected {s.dtype}"
            f"{_shape_text(s.shape)}, got {a.dtype}{list(a.shape)} (signature: "
            f"{signature_text(tuple(sig))})"
        )
    for axis, (d, n) in enumerate(zip(s.shape, a.shape, strict=True)):
        if isinstance(d, str) and d in (s.dims or {}):
            lo, hi = s.dims[d]
            if not lo <= n <= hi:
                raise InputError(
                    f"tenant '{name}', input '{s.name}': dim {axis} ('{d}') is "
                    f"{n}, outside its bounds [{lo}, {hi}] (signature: "
                    f"{signature_text(tuple(sig))})"
                )
    if s.index_range is not None and a.size:
        lo, hi = s.index_range
        if a.min() < lo or a.max() >= hi:
            what = f"index a table of {hi} rows" if lo in (0, -hi) else "index a table"
            raise InputError(
                f"tenant '{name}', input '{s.name}': values {what} and must be "
                f"in [{lo}, {hi}); got values in [{a.min()}, {a.max()}]"
            )
    return a


def _shape_text(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def check_inputs(name: str, sig: TenantSig, inputs: Sequence) -> list[np.ndarray]:
    """`inputs` of tenant `name` as numpy arrays, checked against its signature (a
    symbolic dim: within its bounds, and one size wherever its name appears)."""
    if len(inputs) != len(sig.inputs):
        raise InputError(
            f"tenant '{name}' takes {len(sig.inputs)} input(s) "
            f"({signature_text(sig.inputs)}), got {len(inputs)}"
        )
    arrays = [_checked(name, x, s, sig.inputs) for x, s in zip(inputs, sig.inputs, strict=True)]
    seen: dict[str, tuple[int, str, int]] = {}  # dim name -> (size, input, axis)
    for s, a in zip(sig.inputs, arrays, strict=True):
        for axis, (d, n) in enumerate(zip(s.shape, a.shape, strict=True)):
            if not isinstance(d, str):
                continue
            first = seen.setdefault(d, (n, s.name, axis))
            if first[0] != n:
                raise InputError(
                    f"tenant '{name}': dim '{d}' is {first[0]} in input "
                    f"'{first[1]}' (axis {first[2]}) but {n} in input "
                    f"'{s.name}' (axis {axis}); one name, one size"
                )
    return arrays


def run_all_arrays(
    inputs: Any,
    tenants: Mapping[str, TenantSig],
    order: Sequence[str],
    params: Sequence[Sequence[tuple[str, str]]],
    function: str = "run_all",
) -> list[np.ndarray]:
    """The flat arguments of ``run_all`` (or of `function`, a merged call over the tenants
    `order`) from ``{tenant: inputs}``: one per parameter (`params`: the (tenant, input)
    pairs each serves; the tenants of a shared input must give it one value)."""
    if not isinstance(inputs, dict):
        raise InputError(f"{function} takes a dict {{tenant name: tuple of inputs}}")
    unknown = sorted(set(inputs) - set(order))
    missing = [t for t in order if t not in inputs]
    if unknown or missing:
        raise InputError(
            f"{function} needs inputs for exactly the tenants {list(order)}; "
            f"missing {missing}, unknown {unknown}"
        )
    checked = {}
    for t in order:
        given = inputs[t]
        given = tuple(given) if isinstance(given, list | tuple) else (given,)
        arrays = check_inputs(t, tenants[t], given)
        checked.update({(t, s.name): a for s, a in zip(tenants[t].inputs, arrays, strict=True)})
    out = []
    for uses in params:
        first = checked[tuple(uses[0])]
        for use in uses[1:]:  # one shared tensor: the tenants must agree on its value
            other = checked[tuple(use)]
            if other is not first and not np.array_equal(other, first):
                raise InputError(
                    f"tenants '{uses[0][0]}' and '{use[0]}' share input "
                    f"'{uses[0][1]}'/'{use[1]}' but were given different values"
                )
        out.append(first)
    return out


def seeded_inputs(sig: TenantSig, seed: int) -> tuple[np.ndarray, ...]:
    """Random inputs matching a tenant's signature: normal floats, small non-negative ints."""
    rng = np.random.default_rng(seed)
    out = []
    for s in sig.inputs:
        # a symbolic dim at its upper bound (what the bundle's memory is planned for)
        shape = tuple(s.dims[d][1] if isinstance(d, str) else d for d in s.shape)
        dtype = numpy_dtype(s.dtype)
        if dtype.kind == "f" or s.dtype == "bfloat16":
            out.append(rng.standard_normal(shape).astype(dtype))
        elif dtype.kind == "b":
            out.append(rng.integers(0, 2, shape).astype(dtype))
        else:
            out.append(rng.integers(0, INT_HIGH, shape).astype(dtype))
    return tuple(out)
