"""Inputs against a tenant's signature: conversions to numpy, checks with clear errors, and
seeded random inputs (for profiling and verifying without user data)."""

from __future__ import annotations

import sys
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mtcompile.errors import InputError
from mtcompile.runtime import contract
from mtcompile.runtime.manifest import IOSpec, TenantSig

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


def _array(name: str, x, s: IOSpec) -> np.ndarray:
    """`x` as a numpy array, or why it cannot be one (what only Python objects can be: a
    meta or sparse torch tensor, a ragged list); the checks of its contents are the core's."""
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
        return to_array(x)
    except (TypeError, ValueError) as e:  # a float8 tensor, a ragged list
        raise InputError(
            f"tenant '{name}', input '{s.name}': cannot use a {type(x).__name__} "
            f"as an array ({e}); expected {s.dtype}{list(s.shape)}"
        ) from e


_checkers: dict[tuple[str, int], Any] = {}  # (tenant, id(signature)) -> the core's checker


def _checker(name: str, sig: TenantSig):
    key = (name, id(sig))
    checker = _checkers.get(key)
    if checker is None:  # once per signature: the core parses it
        checker = _checkers[key] = contract.input_checker(name, [s.to_dict() for s in sig.inputs])
        weakref.finalize(sig, _checkers.pop, key, None)
    return checker


def check_inputs(name: str, sig: TenantSig, inputs: Sequence) -> list[np.ndarray]:
    """`inputs` of tenant `name` as numpy arrays, checked against its signature by the
    runtime core (`contract.input_checker`: the checks mtcompile-run makes, in its words):
    their number, dtypes and shapes, a symbolic dim within its bounds and of one size
    wherever its name appears, an index input's values within its range."""
    checker = _checker(name, sig)
    if len(inputs) != len(sig.inputs):
        raise InputError(checker(*(("", 0, 0) * len(inputs))))
    arrays = [_array(name, x, s) for x, s in zip(inputs, sig.inputs, strict=True)]
    records: list = []
    for a, s in zip(arrays, sig.inputs, strict=True):  # dtype, data (index inputs), ndim, dims
        data = a.ctypes.data if s.index_range is not None else 0
        records += (str(a.dtype), data, a.ndim, *a.shape)
    refusal = checker(*records)
    if refusal is not None:
        raise InputError(str(refusal))
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
    shared = [(u, checked[tuple(u)]) for uses in params if len(uses) > 1 for u in uses]
    if shared:  # one tensor for several tenants: they must give it one value (the core's check)
        records = [x for _, a in shared for x in (a.ctypes.data, a.nbytes)]
        refusal = _shared_checker(params)(*records)
        if refusal is not None:
            raise InputError(str(refusal))
    return [checked[tuple(uses[0])] for uses in params]


_shared: dict[tuple, Any] = {}  # run_all's parameters -> the core's shared-input checker


def _shared_checker(params):
    key = tuple(tuple(tuple(u) for u in uses) for uses in params)
    checker = _shared.get(key)
    if checker is None:
        checker = _shared[key] = contract.shared_checker(params)
    return checker


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
