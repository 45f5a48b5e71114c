"""fuse-horizontal: op(x_i, W_i) at matching positions of N same-architecture tenants ->
op(stack(x), stack(W)), split back (take) only where the tenants' results leave the region.

Tenants are grouped when their own nodes form the same sequence (ops, attrs, shapes; weights
and inputs may differ). Position by position, a node is batched if its operator has a rule
below and its tensor arguments are batched values, shared values or constants. The stacked
values flow through the whole matching region; only a value read outside it is split.
Runs on functions over several tenants (``run_all``, subsets): each tenant's own entry
keeps its unfused graph. A subset's function holds only its tenants, so its groups batch
present tenants only and no batched node reads an absent tenant's input.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
from tvm import relax

from mtcompile.ir import ops
from mtcompile.ir.builder import graph_types, make, op_of
from mtcompile.ir.graph import (
    INPUT,
    ConstRef,
    Graph,
    Node,
    Opaque,
    Ref,
    TenantIO,
    TensorTy,
    const_key,
    map_refs,
)
from mtcompile.pass_infra import Pass, PassContext, PassResult, option, register

from .eliminate_dead_nodes import EliminateDeadNodes

UNARY = ops.UNARY  # batched as they are: the leading tenant axis is one more element axis
BROADCAST = ops.BROADCAST | {"relax.matmul"}  # batched values broadcast against shared ones


def _shift(axis: int) -> int:
    """An axis of the unbatched value, on the batched one (a leading axis was added)."""
    return axis + 1 if axis >= 0 else axis


def _signature(graph: Graph, own: list[Node]) -> tuple:
    pos = {n.name: i for i, n in enumerate(own)}

    def arg(a):
        if isinstance(a, Ref):
            return ("own", pos[a.name]) if a.name in pos else ("shared", a.name)
        if isinstance(a, ConstRef):
            c = graph.constants[a.key]
            return ("const", c.shape, str(c.dtype))
        if isinstance(a, tuple):
            return tuple(arg(x) for x in a)
        return a

    return tuple((n.op, n.ty, n.attrs, n.ty_args, tuple(arg(a) for a in n.args)) for n in own)


class _Group:
    """Builds the batched region of one group of K isomorphic tenants."""

    def __init__(
        self,
        graph: Graph,
        tenants: list[str],
        seqs: list[list[Node]],
        prefix: str,
        ops: tuple[str, ...] = (),
    ):
        self.graph, self.tenants, self.seqs, self.prefix = graph, tuple(tenants), seqs, prefix
        self.ops = set(ops)
        self.k = len(tenants)
        self.added: dict[str, Node] = {}
        self.constants: dict[str, np.ndarray] = {}
        self.batched: dict[int, Ref] = {}  # position -> value with a leading K axis
        self.stacked: dict[int, Ref] = {}  # position -> stack of the tenants' unbatched values
        self.typeof = graph_types(graph, self.added, self.constants)
        self.counter = 0

    def node(self, fn, args, **kw) -> Ref:
        self.counter += 1
        n = make(self.typeof, f"{self.prefix}.{self.counter}", self.tenants, fn, args, **kw)
        self.added[n.name] = n
        return Ref(n.name)

    def const(self, array: np.ndarray) -> ConstRef:
        key = const_key(array)
        self.constants.setdefault(key, array)
        return ConstRef(key)

    def operand(self, j: int, i: int, rank: int | None = None):
        """Argument i of position j across the group: a batched Ref (padded to `rank`+1
        dims when given), a common Ref/ConstRef, or an opaque literal; None if unbatchable."""
        args = [seq[j].args[i] for seq in self.seqs]
        a0 = args[0]
        if isinstance(a0, Opaque):
            return a0 if all(a == a0 for a in args) else None
        if isinstance(a0, ConstRef):
            if all(a == a0 for a in args):
                return a0
            arr = np.stack([self.graph.constants[a.key] for a in args])
            if rank is not None:
                arr = arr.reshape((self.k,) + (1,) * (rank - arr.ndim + 1) + arr.shape[1:])
            return self.const(arr)
        if not isinstance(a0, Ref):
            return None
        own = [{n.name: p for p, n in enumerate(seq)} for seq in self.seqs]
        if all(a == a0 for a in args) and a0.name not in own[0]:
            return a0  # a value every tenant of the group reads (shared input, dedup)
        positions = {own[t].get(a.name) for t, a in enumerate(args)}
        if len(positions) != 1 or None in positions:
            return None
        p = positions.pop()
        b = self.batched.get(p) or self.stacked.get(p)
        if b is None:  # not batched there (no rule): stack the tenants' own values
            if not isinstance(self.seqs[0][p].ty, TensorTy):
                return None
            b = self.stacked[p] = self.node(relax.op.stack, [list(args)], axis=0)
        ty = self.typeof(b)
        if rank is not None and len(ty.shape) - 1 < rank:
            pad = (self.k,) + (1,) * (rank - len(ty.shape) + 1) + ty.shape[1:]
            b = self.node(relax.op.reshape, [b], shape=list(pad))
        return b

    def batch(self, j: int) -> Ref | None:
        """The batched value of position j, or None where no rule applies."""
        b = self._rule(j)
        n = self.seqs[0][j]
        want = TensorTy((self.k, *n.ty.shape), n.ty.dtype) if isinstance(n.ty, TensorTy) else None
        return b if b is not None and self.typeof(b) == want else None

    def _rule(self, j: int) -> Ref | None:
        n = self.seqs[0][j]
        if self.ops and n.op != INPUT and n.op not in self.ops:
            return None
        if n.op == INPUT:
            return self.node(relax.op.stack, [[Ref(seq[j].name) for seq in self.seqs]], axis=0)
        if not isinstance(n.ty, TensorTy):
            return None
        rank, k, a = len(n.ty.shape), self.k, n.attrs.obj if isinstance(n.attrs, Opaque) else None
        if n.op == "relax.take":
            return self._take(j, a)
        if n.op in UNARY or n.op in BROADCAST:
            if n.op == "relax.matmul" and any(
                len(self.typeof(x).shape) < 2 for x in n.args if isinstance(x, Ref | ConstRef)
            ):
                return None
            args = [self.operand(j, i, rank) for i in range(len(n.args))]
            if None in args:
                return None
            return self.node(op_of(n), args)
        x = self.operand(j, 0)
        if (
            x is None
            or isinstance(x, ConstRef)
            or x.name in {r.name for r in n.args if isinstance(r, Ref)}
        ):
            return None  # the first argument must be a batched value
        if n.op in ("relax.reshape", "relax.broadcast_to"):
            fn = relax.op.reshape if n.op == "relax.reshape" else relax.op.broadcast_to
            return self.node(fn, [x], **{"shape": [k, *n.ty.shape]})
        in_rank = len(self.typeof(x).shape) - 1
        if n.op == "relax.permute_dims":
            axes = list(a.axes) if a.axes is not None else list(reversed(range(in_rank)))
            return self.node(
                relax.op.permute_dims, [x], axes=[0] + [int(ax) % in_rank + 1 for ax in axes]
            )
        if n.op == "relax.nn.softmax":
            return self.node(relax.op.nn.softmax, [x], axis=_shift(int(a.axis)))
        if n.op in ("relax.mean", "relax.sum", "relax.max") and a.axis is not None:
            fn = {
                "relax.mean": relax.op.mean,
                "relax.sum": relax.op.sum,
                "relax.max": relax.op.max,
            }[n.op]
            return self.node(
                fn, [x], axis=[_shift(int(ax)) for ax in a.axis], keepdims=bool(a.keepdims)
            )
        if n.op == "relax.nn.layer_norm":
            return self._layer_norm(j, x, a)
        return None

    def _take(self, j: int, a) -> Ref | None:
        """take(table_i, idx_i, axis=0) -> take(concat(tables), stack(idx) + i * rows)."""
        tables = [seq[j].args[0] for seq in self.seqs]
        idx = self.operand(j, 1)
        if (
            a.axis is None
            or int(a.axis) != 0
            or not isinstance(idx, Ref)
            or not all(isinstance(t, ConstRef) for t in tables)
            or idx.name not in {b.name for b in self.batched.values()}
        ):
            return None
        mode = str(a.mode)
        if all(t == tables[0] for t in tables):
            return self.node(relax.op.take, [tables[0], idx], axis=0, mode=mode)
        arrays = [self.graph.constants[t.key] for t in tables]
        rows = arrays[0].shape[0]
        ity = self.typeof(idx)
        offsets = (
            (np.arange(self.k) * rows)
            .astype(ity.dtype)
            .reshape((self.k,) + (1,) * (len(ity.shape) - 1))
        )
        shifted = self.node(relax.op.add, [idx, self.const(offsets)])
        return self.node(
            relax.op.take, [self.const(np.concatenate(arrays)), shifted], axis=0, mode=mode
        )

    def _layer_norm(self, j: int, x: Ref, a) -> Ref | None:
        gamma, beta = self.operand(j, 1), self.operand(j, 2)
        axes = [_shift(int(ax)) for ax in a.axes]
        kw = {
            "axes": axes,
            "epsilon": float(a.epsilon),
            "center": bool(a.center),
            "scale": bool(a.scale),
        }
        args0 = self.seqs[0][j].args
        if gamma == args0[1] and beta == args0[2]:  # same parameters for all tenants
            return self.node(relax.op.nn.layer_norm, [x, gamma, beta], **kw)
        if not all(isinstance(p, ConstRef) for p in (gamma, beta)) or list(a.axes) != [-1]:
            return None
        d = self.typeof(x).shape[-1]
        ones, zeros = self.const(np.ones(d, np.float32)), self.const(np.zeros(d, np.float32))
        normed = self.node(relax.op.nn.layer_norm, [x, ones, zeros], **kw)
        rank = len(self.typeof(x).shape) - 1
        g, b = self.operand(j, 1, rank), self.operand(j, 2, rank)
        return self.node(relax.op.add, [self.node(relax.op.multiply, [normed, g]), b])


@register
@dataclass(frozen=True)
class FuseHorizontal(Pass):
    """Batches the matching regions of same-architecture tenants (different weights/inputs)."""

    name = "fuse-horizontal"
    scope: ClassVar[str] = "multi-tenant"
    min_group: int = option(2, minimum=2, doc="the fewest tenants batched together")
    max_group: int = option(64, minimum=2, maximum=4096, doc="the most tenants in one batch")
    ops: tuple[str, ...] = option(
        (), doc="op names to batch (e.g. relax.matmul); empty: every rule"
    )

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        seqs = {t: [n for n in graph.nodes if n.tenants == (t,)] for t in graph.tenants}
        groups = self._groups(graph, seqs)
        if not groups:
            return PassResult(graph, False)
        added, constants, redirect, fused = self._batch(graph, groups, seqs)
        if not fused:
            return PassResult(graph, False)
        out, splits = _split_uses(graph, added, constants, redirect)
        out = EliminateDeadNodes().run(out, ctx).graph
        return PassResult(
            out,
            True,
            {"groups": [list(g) for g in groups], "batched_nodes": fused, "splits": splits},
        )

    def _groups(self, graph: Graph, seqs: dict[str, list[Node]]) -> list[list[str]]:
        """The tenants batched together: those of one signature, in chunks of at most
        max_group, each of at least min_group."""
        by_sig: dict[tuple, list[str]] = {}
        for t, own in seqs.items():
            # a tenant of symbolic (dynamic) dims takes its own size each run: never stacked
            if own and not any(isinstance(n.ty, TensorTy) and n.ty.symbolic for n in own):
                by_sig.setdefault(_signature(graph, own), []).append(t)
        groups = [
            ts[i : i + self.max_group]
            for ts in by_sig.values()
            for i in range(0, len(ts), self.max_group)
        ]
        return [g for g in groups if len(g) >= self.min_group]

    def _batch(self, graph: Graph, groups: list[list[str]], seqs: dict[str, list[Node]]):
        """Batch each group's matching nodes: (the nodes added, their constants, each
        replaced tenant node -> (batched node, its index in the group, tenant), the number
        of batched nodes that are not inputs)."""
        added, constants, redirect, fused = {}, {}, {}, 0
        for gi, tenants in enumerate(groups):
            grp = _Group(graph, tenants, [seqs[t] for t in tenants], f"hfuse{gi}", tuple(self.ops))
            for j in range(len(seqs[tenants[0]])):
                b = grp.batch(j)
                if b is None:
                    continue
                grp.batched[j] = b
                if seqs[tenants[0]][j].op != INPUT:
                    fused += 1
                    for i, t in enumerate(tenants):
                        redirect[seqs[t][j].name] = (b, i, t)
            added.update(grp.added)
            constants.update(grp.constants)
        return added, constants, redirect, fused


def _split_uses(graph: Graph, added: dict, constants: dict, redirect: dict) -> tuple[Graph, int]:
    """The graph without the `redirect`ed nodes, each use of one reading its tenant's slice
    of the batched node (a take, added once per node); and the number of such slices."""
    typeof = graph_types(graph, added, constants)
    splits: dict[str, str] = {}

    def split(ref: Ref) -> Ref:
        if ref.name not in redirect:
            return ref
        if ref.name not in splits:
            b, i, t = redirect[ref.name]
            idx = ConstRef(const_key(np.array(i, np.int64)))
            constants[idx.key] = np.array(i, np.int64)
            n = make(typeof, f"{ref.name}.split", (t,), relax.op.take, [b, idx], axis=0)
            added[n.name] = n
            splits[ref.name] = n.name
        return Ref(splits[ref.name])

    rest = [replace(n, args=map_refs(n.args, split)) for n in graph.nodes if n.name not in redirect]
    tenants = {
        t: TenantIO(io.inputs, tuple(split(o) if isinstance(o, Ref) else o for o in io.outputs))
        for t, io in graph.tenants.items()
    }
    nodes = _topological([*rest, *added.values()], [n.name for n in graph.nodes])
    return Graph(tuple(nodes), tenants, {**graph.constants, **constants}), len(splits)


def _topological(nodes: list[Node], original: list[str]) -> list[Node]:
    """Nodes in an order where every input comes first, original order where possible."""
    rank = {name: i for i, name in enumerate(original)}
    by_name = {n.name: n for n in nodes}
    done: set[str] = set()
    order: list[Node] = []

    def visit(n: Node) -> None:
        stack = [(n, False)]
        while stack:
            cur, expanded = stack.pop()
            if cur.name in done:
                continue
            if expanded:
                done.add(cur.name)
                order.append(cur)
                continue
            stack.append((cur, True))
            for i in reversed(cur.inputs):
                if i in by_name and i not in done:
                    stack.append((by_name[i], False))

    for n in sorted(nodes, key=lambda n: rank.get(n.name, len(rank))):
        visit(n)
    return order
