"""The bundle manifest as typed records: the one place that writes and reads its JSON.

`Manifest.to_dict` gives the JSON layout (``manifest.json`` and the copy embedded in the
library); `Manifest.from_dict` checks it and raises one `ArtifactError` naming the key
that is missing or of the wrong kind. Views drawn by `mtcompile.tools.viz` (the graph
view, stream lanes, the memory timeline) stay plain JSON dicts inside the records: viz
draws from JSON so that a saved bundle draws like a fresh one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mtcompile.abi import StreamFunctions  # the streams' record lowering fills
from mtcompile.errors import ArtifactError

FORMAT = "mtcompile-bundle/5"  # bump when this layout or the entries' layout changes
# versions that must match where a bundle is loaded: TVM's executable format is not
# stable across TVM versions (the others, torch and onnx, are recorded for information)
MUST_MATCH = ("tvm",)


class _Corrupt(Exception):
    """A bad field: `key` is its path (``tenants.lin.inputs[0].shape``), `why` the fault."""

    def __init__(self, key: str, why: str):
        super().__init__(f"key {key!r}: {why}")


def _get(d: Mapping, key: str, kind, where: str, default: Any = ...) -> Any:
    """``d[key]`` checked to be a `kind` (a type or tuple of types); `where` names `d`."""
    path = f"{where}.{key}" if where else key
    if key not in d:
        if default is not ...:
            return default
        raise _Corrupt(path, "missing")
    v = d[key]
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    bad_bool = isinstance(v, bool) and kind in (int, float)
    if not isinstance(v, kind) or bad_bool:
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise _Corrupt(path, f"expected {names}, found {type(v).__name__} {v!r:.60}")
    return v


def _ints(v: Any, path: str) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) for x in v
    ):
        raise _Corrupt(path, f"expected a list of integers, found {v!r:.60}")
    return tuple(v)


def _shape(v: Any, dims: dict | None, path: str) -> tuple[int | str, ...]:
    """A shape: integers and, with `dims`, symbolic dims: names (or, for an output,
    expressions) of the dims `dims` bounds."""
    if not dims:
        return _ints(v, path)
    if not isinstance(v, list) or not all(
        (isinstance(x, int) and not isinstance(x, bool))
        or (
            isinstance(x, str)
            and re.findall(r"[A-Za-z_]\w*", x)
            and set(re.findall(r"[A-Za-z_]\w*", x)) <= set(dims)
        )
        for x in v
    ):
        raise _Corrupt(
            path, f"expected a list of integers and names of {sorted(dims)}, found {v!r:.60}"
        )
    return tuple(v)


def _bounds(v: Any, path: str) -> dict[str, tuple[int, int]]:
    if not isinstance(v, dict) or not all(
        isinstance(b, list) and len(_ints(b, f"{path}.{k}")) == 2 for k, b in v.items()
    ):
        raise _Corrupt(path, f"expected {{dim name: [lo, hi]}}, found {v!r:.60}")
    return {str(k): (b[0], b[1]) for k, b in v.items()}


@dataclass(frozen=True)
class IOSpec:
    """One input or output of a tenant. index_range: values an index input must lie in
    ``[lo, hi)``; shared_as: the name of the run_all input several tenants share.
    A symbolic (dynamic) dim is a string in `shape`: a dim name (``"batch"``) or, for an
    output, an expression of them (``"batch * 4"``); dims: ``{dim name: (lo, hi)}``,
    the sizes each name may take (inclusive). file: an output's file name
    (``<tenant>.<name>.npy`` made safe and unique in the bundle: `output_files`), which
    ``mtcompile run -o`` and ``mtcompile-run`` write."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str
    index_range: tuple[int, int] | None = None
    shared_as: str | None = None
    dims: dict[str, tuple[int, int]] | None = None
    file: str | None = None

    def __str__(self) -> str:
        text = f"{self.name}: {self.dtype}[{', '.join(map(str, self.shape))}]"
        if self.dims:
            text += (
                " (" + ", ".join(f"{k} in [{lo}, {hi}]" for k, (lo, hi) in self.dims.items()) + ")"
            )
        return text

    def to_dict(self) -> dict:
        return _to_json(self)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> IOSpec:
        if not isinstance(d, dict):
            raise _Corrupt(where, f"expected an object, found {d!r:.60}")
        rng = _get(d, "index_range", list, where, None)
        if rng is not None and len(_ints(rng, f"{where}.index_range")) != 2:
            raise _Corrupt(f"{where}.index_range", f"expected [lo, hi], found {rng!r}")
        dims = _get(d, "dims", dict, where, None)
        dims = _bounds(dims, f"{where}.dims") if dims is not None else None
        return cls(
            _get(d, "name", str, where),
            _shape(_get(d, "shape", list, where), dims, f"{where}.shape"),
            _get(d, "dtype", str, where),
            tuple(rng) if rng is not None else None,
            _get(d, "shared_as", str, where, None),
            dims,
            _file(_get(d, "file", str, where, None), f"{where}.file"),
        )


_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def _file(name: str | None, path: str) -> str | None:
    if name is not None and (
        _SAFE.search(name) or not name.endswith(".npy") or name.startswith(".")
    ):
        raise _Corrupt(
            path, f"expected a file name of [A-Za-z0-9_.-] ending in .npy, found {name!r:.60}"
        )
    return name


def output_files(tenants: dict[str, list[str]]) -> dict[str, list[str]]:
    """Each tenant's output files (`tenants`: output names by tenant, in tenant order):
    ``<tenant>.<name>.npy`` with every character outside ``[A-Za-z0-9_.-]`` made ``_``;
    a name taken already in the bundle (``a/b`` and ``a_b`` of one tenant) gets ``_2``,
    ``_3``... before ``.npy``, in tenant and output order (deterministic)."""
    used: set[str] = set()
    out: dict[str, list[str]] = {}
    for t, names in tenants.items():
        files = out[t] = []
        for name in names:
            stem = _SAFE.sub("_", f"{t}.{name}").lstrip(".") or "_"
            file, n = f"{stem}.npy", 1
            while file.lower() in used:  # one name per file on case-insensitive disks too
                n += 1
                file = f"{stem}_{n}.npy"
            used.add(file.lower())
            files.append(file)
    return out


def signature_text(specs: tuple[IOSpec, ...]) -> str:
    """``x: float32[2, 8], y: int64[3]``."""
    return ", ".join(map(str, specs))


@dataclass(frozen=True)
class TenantSig:
    """A tenant's entry: where it came from and its inputs and outputs, in order."""

    source: str  # the frontend that imported it: torch.export, torch.fx, onnx
    source_sha256: str  # content hash of the source model
    inputs: tuple[IOSpec, ...]
    outputs: tuple[IOSpec, ...]

    def to_dict(self) -> dict:
        return _to_json(self)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> TenantSig:
        if not isinstance(d, dict):
            raise _Corrupt(where, f"expected an object, found {d!r:.60}")
        sig = cls(
            _get(d, "source", str, where),
            _get(d, "source_sha256", str, where),
            *(
                tuple(
                    IOSpec.from_dict(x, f"{where}.{k}[{i}]")
                    for i, x in enumerate(_get(d, k, list, where))
                )
                for k in ("inputs", "outputs")
            ),
        )
        for i, o in enumerate(sig.outputs):
            if o.file is None:
                raise _Corrupt(f"{where}.outputs[{i}].file", "missing")
        return sig


@dataclass(frozen=True)
class GraphStats:
    """The merged graph after passes: counts, and the weights stored against the tenants'
    own (`weight_bytes` counts run_all's and the tenant entries' constants)."""

    nodes: int
    nodes_per_tenant: dict[str, int]
    ops: dict[str, int]
    constants: int
    weight_bytes: int
    weight_bytes_before_merge: int


@dataclass(frozen=True)
class StreamsInfo:
    """The stream assignment of run_all: its summary, the lanes and syncs of its simulated
    schedule (compile-time cost estimate, for reports) and, when run_all was lowered onto
    the streams, the stream functions (`run`). Default: one stream, no assignment."""

    num_streams: int = 1
    num_syncs: int = 0
    estimated_speedup: float = 1.0
    policy: str | None = None  # None: assign-streams did not run
    logical_concurrency: int = 1
    kernels_per_stream: tuple[int, ...] = ()
    estimate: dict[str, float] = field(default_factory=dict)  # the cost model's details
    lanes: tuple[dict, ...] = ()  # {kernel, stream, tenant, start_us, end_us}: viz's input
    syncs: tuple[tuple[str, str], ...] = ()  # (producer kernel, consumer kernel)
    run: StreamFunctions | None = None

    def view(self) -> dict:
        """The JSON view `mtcompile.tools.viz.draw_streams` and reports take."""
        return _to_json(self)


@dataclass(frozen=True)
class MemoryInfo:
    """Memory of the built bundle (known once TVM has built it, so not embedded): run_all's
    arena against its lower bound, TVM's own plan and no planning, per function figures
    and run_all's timeline (viz's input). (Manifests of older builds also carry
    ``mismatches``: what the predicted kernel model got wrong; it is ignored.)"""

    arena_bytes: int
    lower_bound_bytes: int
    naive_bytes: int
    tvm_plan_bytes: int
    unplanned_bytes: int
    separate_plans_bytes: int
    separate_arena_bytes: int
    weight_bytes: int
    weight_bytes_before_dedup: int
    planned: bool
    functions: dict[str, dict[str, int]]
    timeline: dict | None = None


@dataclass(frozen=True)
class WeightsInfo:
    """The weights the library carries as raw data under `symbol` (`runtime.weights`):
    per tensor (byte offset, shape, dtype), and per entry function the indices of the
    tensors it takes as trailing parameters."""

    symbol: str
    bytes: int
    tensors: tuple[tuple[int, tuple[int, ...], str], ...]
    args: dict[str, tuple[int, ...]]

    def to_dict(self) -> dict:
        return _to_json(self)


@dataclass(frozen=True)
class SubsetFunction:
    """A merged function over a subset of the tenants (``run_some__a__b``): its tenants in
    bundle order, and per parameter the (tenant, input) pairs it serves, as
    ``run_all_inputs`` does for run_all."""

    tenants: tuple[str, ...]
    inputs: tuple[tuple[tuple[str, str], ...], ...]


# library call variants that compute in bfloat16 (mtcompile.native.table)
BF16_VARIANTS = ("bf16", "winograd_bf16", "patch_bf16")


@dataclass(frozen=True)
class PassSpec:
    """One pass of the pipeline the bundle was built with, and its options."""

    name: str
    options: dict[str, Any]


@dataclass(frozen=True)
class Manifest:
    """Everything a bundle says about itself. `memory`, `library_sha256` and
    `bundle_signature` are known only after the build: in ``manifest.json``, not in the
    library's embedded copy."""

    name: str
    library: str  # file name of the shared library, beside manifest.json
    target: str
    versions: dict[str, str]  # mtcompile, tvm, torch, onnx at build time
    pipeline: tuple[PassSpec, ...]
    kernels: dict[str, str]  # heavy op kind -> provider (native, torch, tvm)
    tuning_db: str | None
    tenant_order: tuple[str, ...]
    # per run_all parameter, the (tenant, input) pairs it serves (several: a shared input)
    run_all_inputs: tuple[tuple[tuple[str, str], ...], ...]
    tenants: dict[str, TenantSig]
    graph: GraphStats
    graph_view: dict  # nodes and per-pass rows (`mtcompile.ir.view.graph_view`)
    streams: StreamsInfo = StreamsInfo()
    # function name -> the merged function over a subset of tenants (`Bundle.run_some`)
    subsets: dict[str, SubsetFunction] = field(default_factory=dict)
    # the LLVM CPU the TVM kernels were compiled for ("generic": portable x86-64; None: no
    # CPU kernels, or a bundle written before CPU targets) and its LLVM feature names;
    # load refuses a host that lacks one (`mtcompile.runtime.cpu`)
    cpu: str | None = None
    cpu_features: tuple[str, ...] | None = None  # None where `cpu` is None
    memory: MemoryInfo | None = None
    weights: WeightsInfo | None = None
    library_sha256: str | None = None
    # HMAC of this manifest (less this field) and the library, with the key given to
    # save (`mtcompile.runtime.signing`); None: not signed
    bundle_signature: str | None = None
    format: str = FORMAT

    @property
    def kernel_precision(self) -> str:
        """What the bundle's native dense layers and Winograd convs compute in: ``float32``,
        or ``bfloat16`` where offload-library's `precision` said so."""
        for p in self.pipeline:
            if p.name == "offload-library":
                return str(p.options.get("precision", "float32"))
        return "float32"

    def bf16_tenants(self) -> frozenset[str]:
        """The tenants with a library call that computes in bfloat16 (variants `BF16_VARIANTS`;
        `mtcompile.tools.verify` allows them bfloat16's error); without a graph view, every
        tenant where `kernel_precision` is bfloat16."""
        names, nodes = self.graph_view.get("tenants", []), self.graph_view.get("nodes", [])
        if not nodes:
            return frozenset(self.tenant_order if self.kernel_precision == "bfloat16" else ())
        return frozenset(
            names[i]
            for n in nodes
            if n.get("call", {}).get("variant") in BF16_VARIANTS
            for i in n["tenants"]
        )

    def signature(self, tenant: str) -> TenantSig | None:
        return self.tenants.get(tenant)

    def with_(self, **changes) -> Manifest:
        return replace(self, **changes)

    # -- JSON
    def to_dict(self) -> dict:
        """The JSON layout of ``manifest.json`` (fields that are None are left out)."""
        return _to_json(self)

    def embedded(self) -> dict:
        """The copy embedded in the library: what is known before TVM builds it."""
        return {k: v for k, v in self.to_dict().items() if k not in BUILT_AFTER}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str | Path = "manifest") -> Manifest:
        """Parse and check a manifest; `where` (its path) prefixes every error."""
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ArtifactError(f"{where} is corrupt: not valid JSON ({e})") from e
        return cls.from_dict(d, where)

    @classmethod
    def from_dict(cls, d: Any, where: str | Path = "manifest") -> Manifest:
        if not isinstance(d, dict):
            raise ArtifactError(
                f"{where} is corrupt: expected a JSON object, found {type(d).__name__}"
            )
        if d.get("format") != FORMAT:
            hint = (
                "; rebuild the bundle with this mtcompile"
                if str(d.get("format", "")).startswith("mtcompile-bundle/")
                else ""
            )
            raise ArtifactError(
                f"{where}: format {d.get('format')!r}, this mtcompile reads {FORMAT!r}{hint}"
            )
        try:
            return _parse(d)
        except _Corrupt as e:
            raise ArtifactError(f"{where} is corrupt: {e}") from None
        except (TypeError, AttributeError, KeyError, ValueError) as e:
            # a value of a kind no field check foresaw (the artifact fuzzer: a pass of the
            # pipeline replaced by null): refused, never a raw error
            raise ArtifactError(f"{where} is corrupt: {type(e).__name__}: {e}") from None


# in manifest.json only, not embedded
BUILT_AFTER = ("library_sha256", "memory", "weights", "bundle_signature")


def _library(d: dict) -> str:
    """The library's file name (a bare name: no directory, not . or ..)."""
    lib = _get(d, "library", str, "")
    if not lib or Path(lib).name != lib or lib in (".", ".."):
        raise _Corrupt("library", f"{lib!r} is not a file name")
    return lib


def _tenant_sigs(d: dict) -> tuple[tuple[str, ...], dict[str, TenantSig]]:
    """(tenant order, tenant signatures by name); the order lists each tenant once."""
    order = tuple(_get(d, "tenant_order", list, ""))
    if not all(isinstance(t, str) for t in order):
        raise _Corrupt("tenant_order", f"expected a list of names, found {list(order)!r:.60}")
    tenants = {
        t: TenantSig.from_dict(s, f"tenants.{t}") for t, s in _get(d, "tenants", dict, "").items()
    }
    if sorted(order) != sorted(tenants):
        raise _Corrupt("tenant_order", f"{list(order)} does not list the tenants {sorted(tenants)}")
    return order, tenants


def _run_all_inputs(d: dict, tenants: dict[str, TenantSig], order) -> tuple:
    """The run_all parameters as (tenant, input) pairs each, checked against the tenants."""
    uses = _get(d, "run_all_inputs", list, "")
    try:
        run_all_inputs = tuple(tuple((str(t), str(n)) for t, n in u) for u in uses)
    except (TypeError, ValueError):
        raise _Corrupt("run_all_inputs", "expected lists of [tenant, input] pairs") from None
    _check_run_all_inputs(run_all_inputs, tenants, order)
    return run_all_inputs


def _parse(d: dict) -> Manifest:
    """The manifest of a JSON document, every field checked (a `_Corrupt` names the first
    bad one)."""
    lib = _library(d)
    order, tenants = _tenant_sigs(d)
    versions = _get(d, "versions", dict, "")
    for k in MUST_MATCH:
        _get(versions, k, str, "versions")
    run_all_inputs = _run_all_inputs(d, tenants, order)
    pipeline = tuple(
        PassSpec(_get(p, "name", str, f"pipeline[{i}]"), _get(p, "options", dict, f"pipeline[{i}]"))
        for i, p in enumerate(_get(d, "pipeline", list, ""))
    )
    memory = _get(d, "memory", dict, "", None)
    weights = d.get("weights")
    features = _get(d, "cpu_features", list, "", None)
    if features is not None and not all(isinstance(f, str) for f in features):
        raise _Corrupt("cpu_features", f"expected a list of names, found {features!r:.60}")
    digest = _get(d, "library_sha256", str, "", None)
    signature = _get(d, "bundle_signature", str, "", None)
    return Manifest(
        name=_get(d, "name", str, ""),
        library=lib,
        target=_get(d, "target", str, ""),
        versions=versions,
        pipeline=pipeline,
        kernels=_get(d, "kernels", dict, ""),
        tuning_db=_get(d, "tuning_db", str, "", None),
        tenant_order=order,
        run_all_inputs=run_all_inputs,
        tenants=tenants,
        graph=_record(GraphStats, _get(d, "graph", dict, ""), "graph"),
        graph_view=_get(d, "graph_view", dict, ""),
        streams=_streams(_get(d, "streams", dict, "")),
        subsets=_subsets(_get(d, "subsets", dict, ""), tenants, order),
        cpu=_get(d, "cpu", str, "", None),
        cpu_features=tuple(features) if features is not None else None,
        memory=_record(MemoryInfo, memory, "memory") if memory is not None else None,
        weights=_weights(weights) if weights is not None else None,
        library_sha256=digest,
        bundle_signature=signature,
    )


def _check_run_all_inputs(uses, tenants: dict[str, TenantSig], order) -> None:
    """Rule "run-all-inputs": the run_all parameters serve each tenant input exactly once
    (a shared input: one parameter, several pairs). Their order is the library's: the
    embedded manifest check covers it."""
    want = [(t, s.name) for t in order for s in tenants[t].inputs]
    found = [pair for group in uses for pair in group]
    if sorted(found) != sorted(want) or any(not g for g in uses):
        raise _Corrupt(
            "run_all_inputs",
            f"expected each tenant input once ({want!r:.200}), found {found!r:.200}",
        )


def _subsets(d: dict, tenants: dict[str, TenantSig], order) -> dict[str, SubsetFunction]:
    """The subset functions: each names known tenants in bundle order, and its parameters
    serve each of their inputs exactly once (rule "run-all-inputs")."""
    out = {}
    for f, v in d.items():
        where = f"subsets.{f}"
        if not isinstance(v, dict):
            raise _Corrupt(where, f"expected an object, found {v!r:.60}")
        ts = _get(v, "tenants", list, where)
        if [t for t in order if t in ts] != ts or len(ts) < 2:
            raise _Corrupt(
                f"{where}.tenants",
                f"expected two or more of {list(order)} in that order, found {ts!r:.60}",
            )
        try:
            uses = tuple(
                tuple((str(t), str(n)) for t, n in u) for u in _get(v, "inputs", list, where)
            )
        except (TypeError, ValueError):
            raise _Corrupt(f"{where}.inputs", "expected lists of [tenant, input] pairs") from None
        try:
            _check_run_all_inputs(uses, tenants, ts)
        except _Corrupt as e:
            raise _Corrupt(f"{where}.inputs", str(e)) from None
        out[f] = SubsetFunction(tuple(ts), uses)
    return out


# record field type -> what its JSON value must be
_KINDS = {"int": int, "float": float, "bool": bool, "str": str}


def _record(cls, d: dict, where: str):
    """A flat record of `cls` from `d`: every field is required (`to_dict` writes each one)
    except those that may be None; scalars are checked by their annotation, the rest
    (dicts, lists of rows) taken as they are once their container kind is right."""
    out = {}
    for f in fields(cls):
        ann = str(f.type)
        base = ann.split(" |")[0]
        kind = _KINDS.get(base) or (
            dict if base.startswith("dict") else list if base.startswith("tuple") else object
        )
        optional = "None" in ann
        v = _get(
            d, f.name, (kind, type(None)) if optional else kind, where, None if optional else ...
        )
        if v is not None:
            out[f.name] = _freeze(v) if base.startswith("tuple") else v
    return cls(**out)


def _freeze(v):
    return tuple(_freeze(x) for x in v) if isinstance(v, list) else v


def _int(v: Any, path: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise _Corrupt(path, f"expected an integer, found {v!r:.60}")
    return v


def _weights(d: Any) -> WeightsInfo:
    """The weights table, checked in the order and words of the driver's `read_weights`
    (mtcompile/driver/src/contract.h)."""
    if not isinstance(d, dict):
        raise _Corrupt("weights", f"expected dict, found {type(d).__name__} {d!r:.60}")
    w = _record(WeightsInfo, d, "weights")
    rows = []
    for i, row in enumerate(d["tensors"]):  # as written (lists), not frozen
        path = f"weights.tensors[{i}]"
        if not isinstance(row, list) or len(row) != 3 or not isinstance(row[2], str):
            raise _Corrupt(path, f"expected [offset, shape, dtype], found {row!r:.60}")
        rows.append((_int(row[0], f"{path}.offset"), _ints(row[1], f"{path}.shape"), row[2]))
    args = {str(f): _ints(idx, f"weights.args.{f}") for f, idx in w.args.items()}
    if any(i < 0 or i >= len(rows) for idx in args.values() for i in idx):
        raise _Corrupt("weights.args", f"an index outside the {len(rows)} tensors")
    return replace(w, tensors=tuple(rows), args=args)


def weights_from_json(text: str, where: str | Path) -> WeightsInfo:
    """A weights table from its JSON (the copy a library carries); `where` names it."""
    try:
        return _weights(json.loads(text))
    except ValueError as e:
        raise ArtifactError(
            f"{where}: its weights table is corrupt: not valid JSON ({e})"
        ) from None
    except (_Corrupt, TypeError) as e:
        raise ArtifactError(f"{where}: its weights table is corrupt: {e}") from None


def _streams(d: dict) -> StreamsInfo:
    run = d.get("run")
    info = _record(StreamsInfo, {k: v for k, v in d.items() if k != "run"}, "streams")
    if run is not None:
        if not isinstance(run, dict):
            raise _Corrupt("streams.run", f"expected an object, found {run!r:.60}")
        info = replace(info, run=_record(StreamFunctions, run, "streams.run"))
    return info


def _to_json(obj) -> Any:
    """Records -> dicts (None fields left out), tuples -> lists, recursively."""
    if hasattr(obj, "__dataclass_fields__"):
        return {
            f.name: _to_json(getattr(obj, f.name))
            for f in fields(obj)
            if getattr(obj, f.name) is not None
        }
    if isinstance(obj, dict):
        return {k: _to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_json(v) for v in obj]
    return obj
