"""fuse-attention: native matmul(q, kt) -> scale (multiply or divide by a constant scalar) ->
native softmax -> native matmul(., v), each step its next one's sole input -> one native
``attention`` library call (`mtcompile.native.table`, ``src/attention.cc``).

The chain is what the importers leave of ``softmax(q @ k^T / sqrt(d)) @ v`` once
offload-library has made its matmuls and softmax library calls: batched matmuls over
(batch x heads; x tenants where fuse-horizontal stacked them), with reshapes (and a no-op ``broadcast_to``) between the steps. The fused
kernel keeps each block of scores in a task's buffer, so the scores never reach memory as a
tensor and one call replaces four. A chain with a masked score (an add before softmax), a
value read elsewhere, or any other shape stays as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mtcompile.ir import ops
from mtcompile.ir.graph import ConstRef, Graph, Node, Ref, TensorTy, const_key
from mtcompile.pass_infra import Pass, PassContext, PassResult, register

_VIEWS = ("relax.reshape", "relax.broadcast_to")  # steps that leave the values as they are


@dataclass(frozen=True)
class _Chain:
    """One matched attention: the nodes it replaces and the fused call's arguments."""

    last: Node  # the second matmul: the fused call takes its name
    dropped: tuple[str, ...]  # the chain's other nodes
    q: Ref
    kt: Ref
    v: Ref
    scale: float


class _Matcher:
    """Walks chains backwards from each native matmul, through sole-reader steps only."""

    def __init__(self, graph: Graph):
        self.graph = graph
        users = graph.users()
        outputs = graph.output_names()
        self.sole = {n: len(u) == 1 and n not in outputs for n, u in users.items()}

    def _node(self, a) -> Node | None:
        return self.graph.node(a.name) if isinstance(a, Ref) else None

    def _through_views(self, a, seen: list[str]) -> Node | None:
        """The node `a` is a view of (through reshapes and broadcasts that only it reads)."""
        n = self._node(a)
        while n is not None and n.op in _VIEWS and self.sole.get(n.name):
            seen.append(n.name)
            n = self._node(n.args[0])
        return n

    def _scalar(self, a) -> float | None:
        if not isinstance(a, ConstRef):
            return None
        c = np.asarray(self.graph.constants[a.key])
        return float(c.reshape(())) if c.size == 1 and c.dtype == np.float32 else None

    def _scale(self, n: Node) -> tuple[float, Ref] | None:
        """(scale, the scaled value) of a multiply or divide by a constant scalar."""
        if n.op == "relax.multiply":
            for i in (0, 1):
                s = self._scalar(n.args[i])
                if s is not None and isinstance(n.args[1 - i], Ref):
                    return s, n.args[1 - i]
        if n.op == "relax.divide" and isinstance(n.args[0], Ref):
            s = self._scalar(n.args[1])
            if s is not None and s != 0.0:
                return 1.0 / s, n.args[0]
        return None

    def match(self, last: Node) -> _Chain | None:
        call = ops.library_call(last)
        if not _plain_matmul(call) or not _batched(last):
            return None
        seen: list[str] = []
        soft = self._through_views(last.args[0], seen)
        if (
            soft is None
            or not self.sole.get(soft.name)
            or getattr(ops.library_call(soft), "kernel", None) != "softmax"
        ):
            return None
        seen.append(soft.name)
        scaled = self._node(soft.args[0])
        found = self._scale(scaled) if scaled is not None and self.sole.get(scaled.name) else None
        if found is None:
            return None
        seen.append(scaled.name)
        scale, product = found
        first = self._through_views(product, seen)
        if (
            first is None
            or not self.sole.get(first.name)
            or not _plain_matmul(ops.library_call(first))
            or not _batched(first)
        ):
            return None
        seen.append(first.name)
        q, kt, v = first.args[0], first.args[1], last.args[1]
        if not all(isinstance(a, Ref) and _batched(self.graph.node(a.name)) for a in (q, kt, v)):
            return None
        lead = {self.graph.node(a.name).ty.shape[:-2] for a in (q, kt, v)} | {last.ty.shape[:-2]}
        if len(lead) != 1:  # one batch of heads (the kernel checks symbolic dims at run time)
            return None
        return _Chain(last, tuple(seen), q, kt, v, scale)


def _plain_matmul(call) -> bool:
    """A native matmul of two activations: no packed weight, no bias, no epilogue."""
    return (
        call is not None
        and call.provider == "native"
        and call.kernel == "matmul"
        and not call.variant
        and not call.bias
        and not call.epilogue
    )


def _batched(n: Node) -> bool:
    """A float32 tensor of rank 3 or more: [..., rows, columns], the leading dims batched."""
    return isinstance(n.ty, TensorTy) and n.ty.dtype == "float32" and len(n.ty.shape) >= 3


@register
@dataclass(frozen=True)
class FuseAttention(Pass):
    """Replaces each matched chain by one native ``attention`` call taking q, the transposed
    keys, v and the scale (a 1-element constant); the chain's other nodes go."""

    name = "fuse-attention"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        matcher = _Matcher(graph)
        chains = [c for n in graph.nodes if (c := matcher.match(n)) is not None]
        if not chains:
            return PassResult(graph, False, {"attention_calls": 0})
        constants, fused, dropped = {}, {}, set()
        for c in chains:
            scale = np.array([c.scale], np.float32)
            key = const_key(scale)
            constants[key] = scale
            fused[c.last.name] = Node(
                c.last.name,
                ops.LIBRARY_CALL,
                (c.q, c.kt, c.v, ConstRef(key)),
                c.last.ty,
                c.last.tenants,
                ops.LibraryCall("native", "attention"),
            )
            dropped.update(c.dropped)
        out = Graph(graph.nodes, graph.tenants, {**graph.constants, **constants})
        nodes = [fused.get(n.name, n) for n in graph.nodes if n.name not in dropped]
        return PassResult(out.with_nodes(nodes), True, {"attention_calls": len(chains)})
