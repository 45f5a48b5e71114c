"""The multi-tenant graph: immutable nodes tagged with their tenants, in topological order.

A node keeps a Relax operator generically (op name, opaque attrs, result type, inputs),
so every operator TVM imports is carried without per-op code. This module imports no
TVM: TVM objects (attrs, literal arguments) travel inside `Opaque` wrappers that carry
a structural key and a printable text computed by whoever made them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from mtcompile.errors import VerifyError

# --------------------------------------------------------------------------- types


@dataclass(frozen=True)
class Sym:
    """A symbolic dimension (dynamic batch): an expression of size variables, each with
    bounds. text: the expression (``a_batch``, ``a_batch * 4``), its identity; lo, hi: its
    value at the variables' lower and upper bounds; bounds: ``((variable, lo, hi), ...)``
    of the variables it reads; obj: the TVM expression (compared by text)."""

    text: str
    lo: int
    hi: int
    bounds: tuple[tuple[str, int, int], ...] = ()
    obj: Any = field(default=None, compare=False, hash=False, repr=False)

    def __str__(self) -> str:
        return self.text


Dim = int | Sym


def dim_hi(d: Dim) -> int:
    """A dimension's value at its upper bound (itself when static)."""
    return d.hi if isinstance(d, Sym) else int(d)


@dataclass(frozen=True)
class TensorTy:
    """A tensor; a dimension is an int or a `Sym` (bounded symbolic size)."""

    shape: tuple[Dim, ...]
    dtype: str

    def __str__(self) -> str:
        return f"{_short_dtype(self.dtype)}[{','.join(map(str, self.shape))}]"

    @property
    def symbolic(self) -> bool:
        """Whether some dimension is a `Sym`."""
        return any(isinstance(d, Sym) for d in self.shape)

    @property
    def bound_shape(self) -> tuple[int, ...]:
        """The shape with every symbolic dimension at its upper bound."""
        return tuple(dim_hi(d) for d in self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor (at the upper bounds of symbolic dimensions: what memory
        plans reserve)."""
        return int(np.prod(self.bound_shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class TupleTy:
    """A tuple of values."""

    fields: tuple[Ty, ...]

    def __str__(self) -> str:
        return "(" + ", ".join(map(str, self.fields)) + ")"


@dataclass(frozen=True)
class OtherTy:
    """Any other Relax type (shape values, objects), carried by its text."""

    text: str

    def __str__(self) -> str:
        return self.text


Ty = TensorTy | TupleTy | OtherTy

_DTYPE_SHORT = {
    "float32": "f32",
    "float16": "f16",
    "bfloat16": "bf16",
    "float64": "f64",
    "int64": "i64",
    "int32": "i32",
    "int8": "i8",
    "uint8": "u8",
    "bool": "bool",
}


def _short_dtype(dtype: str) -> str:
    return _DTYPE_SHORT.get(dtype, dtype)


# --------------------------------------------------------------------------- arguments


@dataclass(frozen=True)
class Ref:
    """A use of the value a node produces."""

    name: str

    def __str__(self) -> str:
        return f"%{self.name}"


@dataclass(frozen=True)
class ConstRef:
    """A use of a constant, named by the hash of its contents."""

    key: str

    def __str__(self) -> str:
        return f"@{self.key[:8]}"


@dataclass(frozen=True, eq=False)
class Opaque:
    """A foreign object (TVM attrs, shape literal, ...) compared by its structural key."""

    obj: Any
    key: str
    text: str

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __str__(self) -> str:
        return self.text


Arg = Ref | ConstRef | Opaque | tuple  # a tuple holds Args, recursively


def _iter_args(args: tuple, kind: type) -> Iterator:
    for a in args:
        if isinstance(a, kind):
            yield a
        elif isinstance(a, tuple):
            yield from _iter_args(a, kind)


def iter_refs(args: tuple) -> Iterator[Ref]:
    """Every `Ref` inside a (nested) argument tuple, in order."""
    return _iter_args(args, Ref)


def iter_const_refs(args: tuple) -> Iterator[ConstRef]:
    """Every `ConstRef` inside a (nested) argument tuple, in order."""
    return _iter_args(args, ConstRef)


def map_refs(args: tuple, fn) -> tuple:
    """`args` with every `Ref` r replaced by `fn(r)`."""
    return tuple(
        fn(a) if isinstance(a, Ref) else map_refs(a, fn) if isinstance(a, tuple) else a
        for a in args
    )


def _arg_str(a: Any) -> str:
    if isinstance(a, tuple):
        return "(" + ", ".join(_arg_str(x) for x in a) + ")"
    return str(a)


# --------------------------------------------------------------------------- nodes

INPUT = "input"
TUPLE = "tuple"
GET_ITEM = "get_item"
STACK = "relax.stack"


@dataclass(frozen=True)
class Node:
    """One value of the graph.

    op: ``"input"``, ``"tuple"``, ``"get_item"`` (attrs = index) or a Relax operator
    name such as ``"relax.nn.conv2d"``. tenants: the tenants this value serves (one,
    unless a pass shared it on purpose).
    """

    name: str
    op: str
    args: tuple
    ty: Ty
    tenants: tuple[str, ...]
    attrs: Any = None
    ty_args: tuple = ()
    group: str | None = None  # fusion group (one kernel), set by fuse-vertical

    @property
    def tenant(self) -> str:
        """The tenant of an unshared node; the '+'-joined tenants of a shared one."""
        return "+".join(self.tenants)

    @property
    def inputs(self) -> list[str]:
        """Names of the nodes this node reads."""
        return [r.name for r in iter_refs(self.args)]

    def __str__(self) -> str:
        op = self.op.removeprefix("relax.")
        parts = [f"%{self.name} = {op}({', '.join(_arg_str(a) for a in self.args)})"]
        if self.attrs is not None:
            parts.append(f"{{{self.attrs}}}")
        if self.ty_args:
            parts.append("<" + ", ".join(map(str, self.ty_args)) + ">")
        group = f", group={self.group}" if self.group else ""
        parts.append(f"{{tenant={self.tenant}{group}}} : {self.ty}")
        return " ".join(parts)


@dataclass(frozen=True)
class TenantIO:
    """A tenant's signature inside the graph.

    inputs: ``(signature name, node name)`` pairs in the tenant's input order.
    outputs: one `Ref` or `ConstRef` per output, in the tenant's output order.
    """

    inputs: tuple[tuple[str, str], ...]
    outputs: tuple[Ref | ConstRef, ...]


# constants of at least this many bytes are weights: a bundle passes them to its functions as
# parameters (the weights table); smaller ones are literals of the generated code
WEIGHT_MIN_BYTES = 1024


def const_key(array: np.ndarray) -> str:
    """Content hash of a constant: dtype, shape and bytes."""
    h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()[:24]


# --------------------------------------------------------------------------- graph


@dataclass(frozen=True)
class Graph:
    """Nodes in topological order, each tenant's inputs and outputs, and the constants.

    Treat it as immutable: passes build a new Graph (see `with_nodes`).
    """

    nodes: tuple[Node, ...]
    tenants: Mapping[str, TenantIO]
    constants: Mapping[str, np.ndarray] = field(default_factory=dict)
    # analyses about a graph (kernel DAG, streams, memory plan) are not kept on it: an
    # `AnalysisManager` (mtcompile.analysis.manager) holds them by function and type

    # -- lookup
    def node(self, name: str) -> Node:
        return self._by_name[name]

    @property
    def _by_name(self) -> dict[str, Node]:
        cache = self.__dict__.get("_cache_by_name")
        if cache is None:
            cache = {n.name: n for n in self.nodes}
            object.__setattr__(self, "_cache_by_name", cache)
        return cache

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self.nodes)

    def users(self) -> dict[str, list[str]]:
        """For each node name, the names of the nodes that read it."""
        out: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                out[i].append(n.name)
        return out

    def output_names(self) -> set[str]:
        """Names of the nodes some tenant returns."""
        return {o.name for io in self.tenants.values() for o in io.outputs if isinstance(o, Ref)}

    def live_nodes(self, tenants: Iterable[str] | None = None) -> set[str]:
        """Names of the nodes the outputs of `tenants` (every tenant when None) depend on,
        those outputs included (the one liveness walk: entries, run_all, dead nodes)."""
        names = self.tenants if tenants is None else tenants
        live = {o.name for t in names for o in self.tenants[t].outputs if isinstance(o, Ref)}
        for n in reversed(self.nodes):
            if n.name in live:
                live.update(n.inputs)
        return live

    def used_constants(self) -> set[str]:
        """Keys of the constants some node or output reads."""
        keys = {c.key for n in self.nodes for c in iter_const_refs(n.args)}
        keys |= {
            o.key for io in self.tenants.values() for o in io.outputs if isinstance(o, ConstRef)
        }
        return keys

    def tenant_nodes(self, tenant: str) -> list[Node]:
        """The nodes that serve `tenant`, in order."""
        return [n for n in self.nodes if tenant in n.tenants]

    def with_nodes(self, nodes, tenants: Mapping[str, TenantIO] | None = None) -> Graph:
        """A new graph with these nodes (and tenants), keeping only constants still used."""
        g = Graph(tuple(nodes), dict(self.tenants if tenants is None else tenants), self.constants)
        used = g.used_constants()
        return replace(g, constants={k: v for k, v in self.constants.items() if k in used})

    # -- sizes
    def weight_bytes(self) -> int:
        """Bytes of all constants, each stored once."""
        return int(sum(a.nbytes for a in self.constants.values()))

    def stats(self) -> dict[str, Any]:
        """Counts for reports: nodes per op kind and per tenant, constants and bytes."""
        ops: dict[str, int] = {}
        for n in self.nodes:
            ops[n.op] = ops.get(n.op, 0) + 1
        return {
            "nodes": len(self.nodes),
            "nodes_per_tenant": {t: len(self.tenant_nodes(t)) for t in self.tenants},
            "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
            "constants": len(self.constants),
            "weight_bytes": self.weight_bytes(),
        }

    # -- views
    def to_networkx(self):
        """A `networkx.DiGraph`: one vertex per node (attrs op, tenants, type), edges = uses."""
        import networkx as nx

        g = nx.DiGraph()
        for n in self.nodes:
            g.add_node(n.name, op=n.op, tenants=n.tenants, ty=str(n.ty))
        for n in self.nodes:
            for i in n.inputs:
                g.add_edge(i, n.name)
        return g

    def __str__(self) -> str:
        lines = [
            f"dim {d.text} = [{d.lo}, {d.hi}]"
            + "".join(f" {v}:{lo}:{hi}" for v, lo, hi in d.bounds)
            for d in self.syms()
        ]
        for t, io in self.tenants.items():
            ins = ", ".join(f"{local}=%{node}" for local, node in io.inputs)
            lines.append(f"tenant {t}({ins})")
        lines += [str(n) for n in self.nodes]
        for t, io in self.tenants.items():
            lines.append(f"return {t}: (" + ", ".join(map(str, io.outputs)) + ")")
        return "\n".join(lines)

    def syms(self) -> list[Sym]:
        """The symbolic dimensions of the nodes' types, each once, in order of appearance."""
        found: dict[str, Sym] = {}

        def visit(ty) -> None:
            if isinstance(ty, TensorTy):
                found.update((d.text, d) for d in ty.shape if isinstance(d, Sym))
            elif isinstance(ty, TupleTy):
                for f in ty.fields:
                    visit(f)

        for n in self.nodes:
            visit(n.ty)
        return list(found.values())

    def verify(self) -> None:
        """Check the invariants; raise `VerifyError` naming the first broken one."""
        problems = verify_problems(self)
        if problems:
            text = str(self)
            if len(text) > 20000:
                text = text[:20000] + "\n... (graph truncated)"
            raise VerifyError(
                "graph verification failed:\n  "
                + "\n  ".join(problems)
                + "\n--- graph ---\n"
                + text
            )


def verify_problems(g: Graph) -> list[str]:
    """All broken invariants of `g` (empty when it is valid)."""
    problems: list[str] = []
    seen: dict[str, Node] = {}
    for n in g.nodes:
        if n.name in seen:
            problems.append(f"duplicate node name %{n.name}")
        if not n.tenants:
            problems.append(f"%{n.name} serves no tenant")
        unknown = [t for t in n.tenants if t not in g.tenants]
        if unknown:
            problems.append(f"%{n.name} names unknown tenant(s) {unknown}")
        for i in n.inputs:
            src = seen.get(i)
            if src is None:
                where = "later" if i in g else "nowhere"
                problems.append(f"%{n.name} reads %{i}, which is defined {where}")
            elif n.op == STACK and set(src.tenants) & set(n.tenants):
                pass  # a stack gathers one value per tenant of a batched region
            elif not set(n.tenants) <= set(src.tenants):
                problems.append(
                    f"%{n.name} (tenant {n.tenant}) reads %{i} of tenant "
                    f"{src.tenant}: a cross-tenant edge no pass declared"
                )
        for c in iter_const_refs(n.args):
            if c.key not in g.constants:
                problems.append(f"%{n.name} reads missing constant @{c.key}")
        problems += _type_problems(n, seen)
        seen[n.name] = n
    for t, io in g.tenants.items():
        for local, name in io.inputs:
            if name not in seen or seen[name].op != INPUT:
                problems.append(f"tenant {t}: input {local!r} is not an input node (%{name})")
            elif t not in seen[name].tenants:
                problems.append(f"tenant {t}: input node %{name} does not serve it")
        for o in io.outputs:
            if isinstance(o, Ref) and o.name not in seen:
                problems.append(f"tenant {t}: output %{o.name} is not defined")
            elif isinstance(o, ConstRef) and o.key not in g.constants:
                problems.append(f"tenant {t}: output constant @{o.key} is missing")
    return problems


def _type_problems(n: Node, seen: Mapping[str, Node]) -> list[str]:
    if n.op == INPUT and not isinstance(n.ty, TensorTy):
        return [f"input %{n.name} is not a tensor: {n.ty}"]
    if n.op == GET_ITEM:
        if len(n.args) != 1 or not isinstance(n.attrs, int):
            return [
                f"get_item %{n.name} needs one tuple argument and an integer index, "
                f"has {len(n.args)} argument(s) and index {n.attrs!r}"
            ]
        (src,) = n.args
        ty = seen[src.name].ty if isinstance(src, Ref) and src.name in seen else None
        if ty is not None and (not isinstance(ty, TupleTy) or not 0 <= n.attrs < len(ty.fields)):
            return [f"%{n.name} takes item {n.attrs} of %{src.name} of type {ty}"]
        if ty is not None and ty.fields[n.attrs] != n.ty:
            return [
                f"%{n.name} has type {n.ty}, item {n.attrs} of %{src.name} is {ty.fields[n.attrs]}"
            ]
    if n.op == TUPLE and isinstance(n.ty, TupleTy) and len(n.ty.fields) != len(n.args):
        return [f"tuple %{n.name} has {len(n.args)} items but type {n.ty}"]
    return []
