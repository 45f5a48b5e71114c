"""The text form of a `Graph`, parsed back: ``parse_graph(str(g), g.constants)`` is a graph
equal to `g` (`graph_diff` finds no difference), so that pass tests can state a whole
expected graph as text (FileCheck / TVMScript style, `assert_graph`).

What the text cannot carry comes back as a stand-in: TVM objects (attrs, literal
arguments) as `Opaque` values with their printed text as key and no object, constants by
the prefix of their key (resolved against `constants` when given). `graph_diff` compares
those by text and by key prefix. Imports no TVM.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from mtcompile.ir.graph import (
    _DTYPE_SHORT,
    GET_ITEM,
    ConstRef,
    Graph,
    Node,
    Opaque,
    OtherTy,
    Ref,
    Sym,
    TenantIO,
    TensorTy,
    TupleTy,
)
from mtcompile.ir.ops import LIBRARY_CALL, ConvParams, LibraryCall

_DTYPE_LONG = {v: k for k, v in _DTYPE_SHORT.items()}
_OPEN, _CLOSE = "([{<", ")]}>"
_BARE_OPS = ("input", "tuple", GET_ITEM, LIBRARY_CALL)  # printed without the relax. prefix
_NODE = re.compile(r"^%(\S+) = ([\w.]+)\((.*)$")
_TENANT = re.compile(r"^tenant (\S+)\((.*)\)$")
_RETURN = re.compile(r"^return (\S+): \((.*)\)$")
_DIM = re.compile(r"^dim (.+) = \[(-?\d+), (-?\d+)\]((?: \S+:-?\d+:-?\d+)*)$")


class ParseError(ValueError):
    """A line of graph text that does not parse."""


def _close(text: str, start: int) -> int:
    """The index of the bracket closing the one at `start` (brackets of any kind nest)."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
            if depth == 0:
                return i
    raise ParseError(f"unbalanced brackets in {text!r}")


def split_top(text: str, sep: str = ",") -> list[str]:
    """`text` split at `sep` outside brackets, each part stripped (none for empty text)."""
    parts, depth, cur = [], 0, []
    for c in text:
        depth += c in _OPEN
        depth -= c in _CLOSE
        if c == sep and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
    tail = "".join(cur).strip()
    return parts + [tail] if tail or parts else parts


class _Parser:
    """One graph's text: symbolic dims first, then tenants, nodes and returns."""

    def __init__(self, constants: Mapping[str, np.ndarray] | None):
        self.constants = dict(constants or {})
        self.dims: dict[str, Sym] = {}

    # -- leaves
    def const(self, text: str) -> ConstRef:
        key = text[1:]
        full = [k for k in self.constants if k.startswith(key)]
        if len(full) > 1:
            raise ParseError(f"constant @{key} is ambiguous: {sorted(full)}")
        return ConstRef(full[0] if full else key)

    def arg(self, text: str):
        if text.startswith("%"):
            return Ref(text[1:])
        if text.startswith("@"):
            return self.const(text)
        if text.startswith("(") and _close(text, 0) == len(text) - 1:
            return tuple(self.arg(a) for a in split_top(text[1:-1]))
        return Opaque(None, text, text)

    def dim(self, text: str):
        if re.fullmatch(r"-?\d+", text):
            return int(text)
        if text not in self.dims:
            raise ParseError(f"symbolic dim {text!r} has no 'dim' line")
        return self.dims[text]

    def ty(self, text: str):
        text = text.strip()
        m = re.fullmatch(r"(\w+)\[(.*)\]", text)
        if m:
            dims = split_top(m.group(2))
            return TensorTy(
                tuple(self.dim(d) for d in dims), _DTYPE_LONG.get(m.group(1), m.group(1))
            )
        if text.startswith("(") and _close(text, 0) == len(text) - 1:
            return TupleTy(tuple(self.ty(f) for f in split_top(text[1:-1])))
        return OtherTy(text)

    # -- lines
    def dim_line(self, m: re.Match) -> None:
        bounds = tuple(
            (v, int(lo), int(hi)) for v, lo, hi in (b.split(":") for b in m.group(4).split())
        )
        self.dims[m.group(1)] = Sym(m.group(1), int(m.group(2)), int(m.group(3)), bounds)

    def attrs(self, op: str, text: str):
        if op == GET_ITEM:
            return int(text)
        if op == LIBRARY_CALL:
            return library_call_attrs(text)
        return Opaque(None, text, text)

    def node(self, line: str) -> Node:
        m = _NODE.match(line)
        if m is None:
            raise ParseError(f"not a node: {line!r}")
        name, op, rest = m.groups()
        end = _close("(" + rest, 0) - 1
        args = tuple(self.arg(a) for a in split_top(rest[:end]))
        rest = rest[end + 1 :]
        head, _, ty = rest.rpartition(" : ")
        groups = _bracketed(head)
        meta = dict(kv.split("=", 1) for kv in split_top(groups.pop()[1:-1]))
        attrs, ty_args = None, ()
        for g in groups:
            if g.startswith("<"):
                ty_args = tuple(Opaque(None, t, t) for t in split_top(g[1:-1]))
            else:
                attrs = self.attrs(op if op in _BARE_OPS else "relax." + op, g[1:-1])
        op = op if op in _BARE_OPS else "relax." + op
        return Node(
            name,
            op,
            args,
            self.ty(ty),
            tuple(meta["tenant"].split("+")),
            attrs,
            ty_args,
            meta.get("group"),
        )


def _bracketed(text: str) -> list[str]:
    """The top-level ``{...}`` and ``<...>`` groups of `text`, in order."""
    out, i = [], 0
    while i < len(text):
        if text[i] in "{<":
            j = _close(text, i)
            out.append(text[i : j + 1])
            i = j + 1
        elif text[i] == " ":
            i += 1
        else:
            raise ParseError(f"unexpected {text[i:]!r} after a node's arguments")
    if not out or not out[-1].startswith("{tenant="):
        raise ParseError(f"no {{tenant=...}} in {text!r}")
    return out


def library_call_attrs(text: str) -> LibraryCall:
    """A library call's printed attrs (``kernel=matmul, provider=native, ...``) as its
    `LibraryCall`."""
    kv = dict(p.split("=", 1) for p in split_top(text))

    def ints(key: str) -> tuple[int, ...]:
        return tuple(int(x) for x in split_top(kv[key][1:-1]))

    conv = (
        ConvParams(ints("strides"), ints("padding"), ints("dilation"), int(kv["groups"]))
        if "strides" in kv
        else None
    )
    return LibraryCall(
        kv["provider"],
        kv["kernel"],
        kv.get("variant", ""),
        kv.get("bias") == "true",
        kv.get("epilogue", ""),
        conv,
    )


def parse_graph(text: str, constants: Mapping[str, np.ndarray] | None = None) -> Graph:
    """The graph `text` (``str(graph)``) describes. Constants are named by their key or a
    prefix of it; `constants` (by full key) become the graph's constants."""
    p = _Parser(constants)
    inputs: dict[str, tuple] = {}
    outputs: dict[str, tuple] = {}
    nodes = []
    for raw in text.strip().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if m := _DIM.match(line):
            p.dim_line(m)
        elif m := _TENANT.match(line):
            inputs[m.group(1)] = tuple(tuple(x.split("=%", 1)) for x in split_top(m.group(2)))
        elif m := _RETURN.match(line):
            outputs[m.group(1)] = tuple(p.arg(x) for x in split_top(m.group(2)))
        else:
            nodes.append(p.node(line))
    tenants = {t: TenantIO(ins, outputs.get(t, ())) for t, ins in inputs.items()}
    return Graph(tuple(nodes), tenants, p.constants)


def _norm(x):
    """A value as the text form keeps it: TVM objects by text, constants by key prefix."""
    if isinstance(x, Opaque):
        return ("opaque", x.text)
    if isinstance(x, ConstRef):
        return ("const", x.key[:8])
    if isinstance(x, tuple):
        return tuple(_norm(v) for v in x)
    if isinstance(x, TensorTy):
        return ("tensor", tuple(_norm(d) for d in x.shape), x.dtype)
    if isinstance(x, TupleTy):
        return ("tuple", tuple(_norm(f) for f in x.fields))
    if isinstance(x, Sym):
        return ("sym", x.text, x.lo, x.hi, x.bounds)
    return x


def graph_diff(a: Graph, b: Graph) -> list[str]:
    """The differences between two graphs as their text forms keep them (empty: equal)."""
    diffs = []
    for t in dict.fromkeys([*a.tenants, *b.tenants]):
        ia, ib = a.tenants.get(t), b.tenants.get(t)
        if (
            ia is None
            or ib is None
            or ia.inputs != ib.inputs
            or _norm(ia.outputs) != _norm(ib.outputs)
        ):
            diffs.append(f"tenant {t}: {ia} != {ib}")
    for i in range(max(len(a.nodes), len(b.nodes))):
        na = a.nodes[i] if i < len(a.nodes) else None
        nb = b.nodes[i] if i < len(b.nodes) else None
        if na is None or nb is None or _node_key(na) != _node_key(nb):
            diffs.append(f"node {i}:\n  - {na}\n  + {nb}")
    return diffs


def _node_key(n: Node) -> tuple:
    return (
        n.name,
        n.op,
        _norm(n.args),
        _norm(n.ty),
        n.tenants,
        _norm(n.attrs),
        tuple(map(str, n.ty_args)),
        n.group,
    )


def assert_graph(graph: Graph, expected: str) -> None:
    """Raise AssertionError, listing the differences, unless `graph` is the graph the text
    `expected` describes (constants by key prefix, TVM attrs by their text)."""
    diffs = graph_diff(graph, parse_graph(expected, graph.constants))
    if diffs:
        raise AssertionError(
            "graph differs from the expected text:\n"
            + "\n".join(diffs)
            + "\n--- graph ---\n"
            + str(graph)
        )
