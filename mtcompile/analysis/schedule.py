"""The kernels that run: a grouped Graph -> kernels in execution order and the tensors they
write and read (the DAG that stream assignment and memory planning work on).

It mirrors what lowering and TVM make of the graph: a fusion group is one kernel, a
library call node (made by offload-library) is one kernel, a group of reshapes only is a
view of its input (TVM's ``RewriteDataflowReshape``), values computed from constants
alone are folded away, and tuples are no kernels. Op facts come from `mtcompile.ir.ops`.
The build checks the memory plan made from this model against the Relax TVM really
produced, so a mismatch fails loudly instead of reading stale bytes.
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
    """Nodes computed from constants alone (TVM folds them at compile time)."""
    const: set[str] = set()
    for n in graph.nodes:
        if n.op != INPUT and all(i in const for i in n.inputs):
            const.add(n.name)
    return const


@dataclass(frozen=True)
class Kernel:
    """One launch: the graph nodes it computes (the last is its result), what it reads.

    kind: ``tvm`` (a fused TVM kernel), ``library`` (a PyTorch call) or ``view`` (a reshape
    TVM makes a view of its input: it writes nothing). `tensor` is the node whose value it
    writes into memory of its own (None for views and tuple results).
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


def _kernel_members(graph: Graph, live, const) -> tuple[dict[str, list[Node]], dict[str, str]]:
    """The live computed nodes grouped into kernels (a fusion group is one, any other node
    its own): (kernel name -> its nodes in graph order, node -> its kernel name)."""
    members: dict[str, list[Node]] = {}
    kernel_of: dict[str, str] = {}
    for n in graph.nodes:
        if n.name not in live or n.op in (INPUT, TUPLE) or n.name in const:
            continue
        if n.op == GET_ITEM:
            src = n.inputs[0] if n.inputs else None
            if n.attrs == 0 and src in kernel_of and graph.node(src).op == "relax.nn.batch_norm":
                # an inference batch-norm writes item 0 alone (TVM decomposes it; the other
                # items are its constant statistics): that item is the kernel's tensor
                kernel_of[n.name] = kernel_of[src]
                members[kernel_of[src]].append(n)
            continue
        key = n.group or n.name
        kernel_of[n.name] = key
        members.setdefault(key, []).append(n)
    return members, kernel_of


def _kernel_reads(graph: Graph, nodes: list[Node], const, alias: dict[str, str]) -> list[str]:
    """The tensors a kernel of `nodes` reads from outside it (other kernels' or graph
    inputs, no constants), each once, in order of reading."""
    inside = {n.name for n in nodes}
    reads: list[str] = []
    for n in nodes:
        for i in n.inputs:
            if i in inside or i in const:
                continue
            for src in tensors_of(graph, i, alias):
                if src not in reads and src not in const:
                    reads.append(src)
    return reads


def _make_kernel(
    graph: Graph, key: str, nodes: list[Node], reads: list[str], alias: dict[str, str]
) -> Kernel:
    """The kernel `key` of `nodes`: a view of its one read when they only reinterpret bytes,
    else a library call or TVM kernel writing its last node's tensor. Records in `alias`
    the tensor that holds each node's value."""
    tail = nodes[-1]
    if all(_is_view(graph, n) for n in nodes) and len(reads) == 1:
        alias.update({n.name: reads[0] for n in nodes})
        kind, tensor, nbytes = "view", None, 0
    else:
        kind = "library" if ops.is_library_call(tail.op) else "tvm"
        tensor = tail.name if isinstance(tail.ty, TensorTy) else None
        nbytes = tail.ty.nbytes if tensor else 0
        alias.update({n.name: tail.name for n in nodes})
    return Kernel(
        key, tuple(n.name for n in nodes), kind, tail.tenants, tuple(reads), tensor, nbytes
    )


def kernel_dag(graph: Graph, tenants: list[str] | None = None) -> KernelDAG:
    """The kernels that compute `tenants`' outputs (all tenants: ``run_all``), in the order
    lowering emits them (a kernel runs where its last node stands in the graph)."""
    tenants = list(graph.tenants) if tenants is None else tenants
    live = graph.live_nodes(tenants)
    const = constant_only(graph)
    position = {n.name: i for i, n in enumerate(graph.nodes)}
    members, kernel_of = _kernel_members(graph, live, const)
    alias: dict[str, str] = {}  # node -> the node whose tensor holds its value
    out: list[Kernel] = []
    deps: dict[str, tuple[str, ...]] = {}
    for key in sorted(members, key=lambda k: position[members[k][-1].name]):
        reads = _kernel_reads(graph, members[key], const, alias)
        out.append(_make_kernel(graph, key, members[key], reads, alias))
        deps[key] = tuple(dict.fromkeys(kernel_of[r] for r in reads if r in kernel_of))
    outputs = frozenset(
        t
        for name in graph.output_names()
        if name in live
        for t in tensors_of(graph, name, alias)
        if tenants_return(graph, tenants, name)
    )
    return KernelDAG(tuple(out), deps, alias, outputs)


def _is_view(graph: Graph, n: Node) -> bool:
    """Whether `n` only reinterprets its input's bytes (a kernel of such nodes alone is a
    view: TVM's ``RewriteDataflowReshape``)."""
    if n.op in ops.VIEW:
        return True
    if n.op in ops.VIEW_IF_SAME_SHAPE and n.inputs:
        return graph.node(n.inputs[0]).ty == n.ty
    return False


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
