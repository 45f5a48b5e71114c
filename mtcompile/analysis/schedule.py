"""The kernel DAG's types (a `Kernel` per launch, the `KernelDAG` stream assignment and
memory planning work on) and the op facts our own fusion decides by.

The DAG itself is read off what TVM emits (`mtcompile.backend.emitted.kernel_dag`, given
to passes as ``PassContext.kernel_model``): nothing here predicts TVM's kernels. `op_kind`
and `constant_only` are what fuse-vertical and offload-library group and skip by.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from mtcompile.ir import ops
from mtcompile.ir.graph import GET_ITEM, INPUT, TUPLE, Graph, Node, TensorTy


def op_kind(n: Node) -> str | None:
    """'library' (a library call node), 'anchor' (a TVM heavy op, or any op that starts a
    kernel of its own), 'opaque' (an op TVM computes by an extern kernel: a kernel of its
    own that nothing fuses with), 'reduce', 'elemwise' (elementwise or injective), or None
    (tuples and their items: no kernel)."""
    if ops.is_library_call(n.op):
        return "library"
    if n.op in ops.HEAVY:
        return "anchor"
    if not isinstance(n.ty, TensorTy) or n.op in (TUPLE, GET_ITEM):
        return None  # tuples and their items stay out of groups
    if n.op in ops.OPAQUE:
        return "opaque"
    if n.op in ops.REDUCTION:
        return "reduce"
    if n.op in ops.ELEMWISE or n.op in ops.INJECTIVE:
        return "elemwise"
    return "anchor"  # any other op: a kernel of its own that may take followers


def constant_only(graph: Graph) -> set[str]:
    """Nodes computed from constants alone (TVM folds them at compile time: our passes
    leave them out of groups and calls, and the kernel model out of kernels)."""
    const: set[str] = set()
    for n in graph.nodes:
        if n.op != INPUT and all(i in const for i in n.inputs):
            const.add(n.name)
    return const


@dataclass(frozen=True)
class Kernel:
    """One launch: the graph nodes it computes (the last is its result), what it reads.

    kind: ``tvm`` (a fused TVM kernel) or ``library`` (a library call); ``view`` (writes
    nothing) is for models that count views as kernels, the emitted one makes them aliases.
    `tensor` is the node whose value it writes into memory of its own (None: nothing).
    """

    name: str
    nodes: tuple[str, ...]
    kind: str
    tenants: tuple[str, ...]
    reads: tuple[str, ...]  # tensors (node names) it reads: other kernels' or graph inputs
    tensor: str | None
    nbytes: int = 0

    @property
    def tenant(self) -> str:
        return "+".join(self.tenants)


@dataclass(frozen=True)
class KernelDAG:
    """Kernels in execution order; ``deps[k]``: the kernels whose results `k` reads."""

    kernels: tuple[Kernel, ...]
    deps: dict[str, tuple[str, ...]]
    alias: dict[str, str] = field(default_factory=dict)  # node -> the tensor holding its value
    outputs: frozenset[str] = frozenset()  # tensors that leave the function (returned)

    def kernel(self, name: str) -> Kernel:
        return self._by_name[name]

    @cached_property
    def _by_name(self) -> dict[str, Kernel]:
        return {k.name: k for k in self.kernels}


def tenants_return(graph: Graph, tenants: list[str], name: str) -> bool:
    """Whether one of `tenants` returns node `name`."""
    return any(getattr(o, "name", None) == name for t in tenants for o in graph.tenants[t].outputs)


def tensors_of(graph: Graph, name: str, alias: dict[str, str]) -> list[str]:
    """The node(s) whose memory holds node `name`'s value: views lead to their input's
    tensor and a kernel's nodes to its result (`alias`, as `KernelDAG.alias`), a tuple to
    its fields, an item of a tuple built by a `tuple` node to that field (items of a
    tuple-valued kernel lead to the kernel's node)."""
    if name in alias:
        return [alias[name]]
    n = graph.node(name)
    if n.op == TUPLE:
        return [t for i in n.inputs for t in tensors_of(graph, i, alias)]
    if n.op == GET_ITEM:
        src = graph.node(n.inputs[0]) if n.inputs else None
        if src is not None and src.op == TUPLE:
            field = src.args[n.attrs]
            return tensors_of(graph, field.name, alias) if hasattr(field, "name") else []
        return tensors_of(graph, n.inputs[0], alias) if n.inputs else []
    return [name]  # an input, or a node of a kernel not yet seen
