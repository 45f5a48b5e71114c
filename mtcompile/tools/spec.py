"""TOML build specs: the tenants of a bundle, its target and its pass pipeline.

name = "demo"                  # bundle name: OUT/<name>.so
target = "llvm"                # or "cuda"

[pipeline]                     # optional; the default pipeline when absent
passes = ["eliminate-dead-nodes"]
[pipeline.options.eliminate-dead-nodes]

[[tenants]]
name = "vision"
factory = "mtcompile.models:resnet_cnn"   # returns (module, example_inputs) or a Tenant
args = { seed = 0 }

[[tenants]]
name = "text"
onnx = "encoder.onnx"                      # relative to this file
input_shapes = { input_ids = [[1, 16], "int64"] }   # optional for ONNX
shared_inputs = { input_ids = "tokens" }   # inputs of several tenants that are one tensor

[[tenants]]                                # dynamic batch: one bundle, any size in bounds
name = "dyn"
factory = "mtcompile.models:resnet_cnn"
dynamic_shapes = { x = { 0 = "batch" } }   # torch.export's dynamic_shapes, dims by name
dim_bounds = { batch = [1, 16] }           # ONNX dim_param / input_shapes names too
"""

from __future__ import annotations

import importlib
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mtcompile.errors import MTCompileError, SpecError
from mtcompile.tenant import Tenant

_TOP_KEYS = {"name", "target", "pipeline", "tenants", "subsets"}
_TENANT_KEYS = {
    "name",
    "factory",
    "args",
    "onnx",
    "input_shapes",
    "shared_inputs",
    "dynamic_shapes",
    "dim_bounds",
}


@dataclass
class BuildSpec:
    """A parsed spec: bundle name, target, pipeline and the tenants, ready to compile."""

    name: str
    target: str
    tenants: list[Tenant]
    passes: list[str] | None = None
    pass_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # groups of tenants that get a merged function of their own (`compile(subsets=...)`)
    subsets: list[tuple[str, ...]] = field(default_factory=list)


def _shapes(raw: Any, where: str) -> dict[str, tuple[tuple[int | str, ...], str]]:
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: input_shapes must be a table {{name = [[dims...], dtype]}}")
    out = {}
    for k, v in raw.items():
        if (
            not isinstance(v, list)
            or len(v) != 2
            or not isinstance(v[0], list)
            or not all(isinstance(d, int | str) for d in v[0])
            or not isinstance(v[1], str)
        ):
            raise SpecError(
                f'{where}: input_shapes.{k} must be [[dims...], "dtype"] (a dim '
                f"an integer or a name), got {v!r}"
            )
        out[k] = (tuple(v[0]), v[1])
    return out


def _dim_bounds(raw: Any, where: str) -> dict[str, tuple[int, int]]:
    if not isinstance(raw, dict) or not all(
        isinstance(b, list) and len(b) == 2 and all(isinstance(x, int) for x in b)
        for b in raw.values()
    ):
        raise SpecError(f"{where}: dim_bounds must be a table {{name = [lo, hi]}}, got {raw!r}")
    return {k: (b[0], b[1]) for k, b in raw.items()}


def _dynamic_shapes(raw: Any, bounds: dict[str, tuple[int, int]], where: str) -> dict:
    """torch.export's ``dynamic_shapes`` from ``{input = {axis = "dim name"}}`` and the
    names' `bounds`."""
    from torch.export import Dim

    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise SpecError(
            f'{where}: dynamic_shapes must be a table {{input = {{axis = "name"}}}}, got {raw!r}'
        )
    dims, out = {}, {}
    for inp, axes in raw.items():
        out[inp] = {}
        for axis, name in axes.items():
            if not str(axis).isdigit() or not isinstance(name, str):
                raise SpecError(
                    f'{where}: dynamic_shapes.{inp}: expected axis = "dim name", '
                    f"got {axis} = {name!r}"
                )
            if name not in bounds:
                raise SpecError(
                    f"{where}: dynamic_shapes.{inp}.{axis}: dim {name!r} has no "
                    f"bounds; add dim_bounds = {{ {name} = [lo, hi] }}"
                )
            if name not in dims:
                dims[name] = Dim(name, min=bounds[name][0], max=bounds[name][1])
            out[inp][int(axis)] = dims[name]
    return out


def call_factory(ref: str, kwargs: dict[str, Any], where: str) -> Any:
    """Import ``package.module:function`` and call it with `kwargs`."""
    if ":" not in ref:
        raise SpecError(f"{where}: factory {ref!r} must look like 'package.module:function'")
    mod_name, fn_name = ref.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise SpecError(f"{where}: cannot import factory {ref!r}: {e}") from e
    try:
        return fn(**kwargs)
    except TypeError as e:
        raise SpecError(f"{where}: factory {ref!r} rejected args {kwargs}: {e}") from e


def tenant_from_factory(name: str, made: Any, shapes, where: str) -> Tenant:
    """A Tenant from what a factory returned: a Tenant, (model, inputs) or (model, shapes)."""
    if isinstance(made, Tenant):
        return replace(made, name=name)
    if isinstance(made, tuple) and len(made) == 2:
        model, extra = made
        if isinstance(extra, dict):
            return Tenant(name, model, input_shapes=shapes or extra)
        return Tenant(name, model, example_inputs=tuple(extra), input_shapes=shapes)
    if shapes is not None:
        return Tenant(name, made, input_shapes=shapes)
    raise SpecError(
        f"{where}: the factory returned a {type(made).__name__}; expected a Tenant, "
        "(model, example_inputs) or (model, input_shapes)"
    )


def _read_toml(path: Path) -> dict:
    """The spec file's TOML as a dict, with errors that name the file."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise SpecError(f"spec file {str(path)!r} does not exist") from e
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: invalid TOML: {e}") from e


def _tenant_entries(raw: dict, path: Path) -> list:
    """The [[tenants]] tables, once the top-level keys are known to be allowed."""
    stray = set(raw) - _TOP_KEYS
    if stray:
        raise SpecError(f"{path}: unknown key(s) {sorted(stray)}; allowed: {sorted(_TOP_KEYS)}")
    entries = raw.get("tenants")
    if not isinstance(entries, list) or not entries:
        raise SpecError(f"{path}: needs at least one [[tenants]] table")
    return entries


def _load_tenant(path: Path, i: int, e: dict) -> Tenant:
    """The `i`-th [[tenants]] table `e` as a Tenant, with errors that name it and the key."""
    name = e.get("name")
    where = f"{path}: tenant #{i + 1}" + (f" ({name!r})" if name else "")
    if not isinstance(name, str):
        raise SpecError(f"{where}: needs a name")
    bad = set(e) - _TENANT_KEYS
    if bad:
        raise SpecError(f"{where}: unknown key(s) {sorted(bad)}; allowed: {sorted(_TENANT_KEYS)}")
    if ("factory" in e) == ("onnx" in e):
        raise SpecError(f"{where}: give exactly one of 'factory' or 'onnx'")
    shapes = _shapes(e["input_shapes"], where) if "input_shapes" in e else None
    shared = e.get("shared_inputs", {})
    if not isinstance(shared, dict):
        raise SpecError(f'{where}: shared_inputs must be a table {{input = "shared name"}}')
    bounds = _dim_bounds(e["dim_bounds"], where) if "dim_bounds" in e else {}
    dynamic = _dynamic_shapes(e["dynamic_shapes"], bounds, where) if "dynamic_shapes" in e else None
    try:
        if "onnx" in e:
            tenant = Tenant(name, str((path.parent / e["onnx"]).resolve()), input_shapes=shapes)
        else:
            made = call_factory(e["factory"], dict(e.get("args", {})), where)
            tenant = tenant_from_factory(name, made, shapes, where)
        if shared:
            tenant = replace(tenant, shared_inputs=dict(shared))
        if dynamic is not None:
            tenant = replace(tenant, dynamic_shapes=dynamic)
        elif bounds:  # names of ONNX dim_params or input_shapes dims
            tenant = replace(tenant, dim_bounds=bounds)
        return tenant
    except SpecError:
        raise
    except MTCompileError as err:
        raise SpecError(f"{where}: {err}") from err


def _subsets(raw: dict, path: Path) -> list:
    """The `subsets` key: a list of lists of tenant names."""
    subsets = raw.get("subsets", [])
    if not isinstance(subsets, list) or not all(
        isinstance(g, list) and all(isinstance(t, str) for t in g) for g in subsets
    ):
        raise SpecError(
            f'{path}: subsets must be a list of lists of tenant names, e.g. subsets = [["a", "b"]]'
        )
    return subsets


def load_spec(path: str | Path) -> BuildSpec:
    """Parse a TOML spec into a BuildSpec, with errors that name the file and the key."""
    path = Path(path)
    raw = _read_toml(path)
    tenants = [_load_tenant(path, i, e) for i, e in enumerate(_tenant_entries(raw, path))]
    pipeline = raw.get("pipeline", {})
    subsets = _subsets(raw, path)
    return BuildSpec(
        name=str(raw.get("name", path.stem)),
        target=str(raw.get("target", "llvm")),
        tenants=tenants,
        passes=pipeline.get("passes"),
        pass_options=dict(pipeline.get("options", {})),
        subsets=[tuple(g) for g in subsets],
    )
