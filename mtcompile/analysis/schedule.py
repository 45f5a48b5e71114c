"""The kernels that run: a grouped Graph -> kernels in execution order and the tensors they
write and read (the DAG that stream assignment and memory planning work on).

It mirrors what lowering and TVM make of the graph: a fusion group is one kernel, a
library call is one kernel (a constant bias added after it, or a batch-norm after a conv,
joins the call), a group of reshapes only is a view of its input (TVM's
``RewriteDataflowReshape``), values computed from constants alone are folded away, and
tuples are no kernels. Lowering checks the memory plan made from this model against the
Relax TVM really produced, so a mismatch fails loudly instead of reading stale bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mtcompile.ir.graph import GET_ITEM, INPUT, TUPLE, ConstRef, Graph, Node, TensorTy

ELEMWISE = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.power",
            "relax.maximum", "relax.minimum", "relax.less", "relax.greater", "relax.equal",
            "relax.where", "relax.nn.relu", "relax.nn.gelu", "relax.nn.silu", "relax.tanh",
            "relax.exp", "relax.erf", "relax.sigmoid", "relax.sqrt", "relax.rsqrt",
            "relax.negative", "relax.astype", "relax.abs", "relax.log", "relax.clip"}
INJECTIVE = {"relax.reshape", "relax.permute_dims", "relax.broadcast_to", "relax.expand_dims",
             "relax.squeeze", "relax.strided_slice", "relax.concat", "relax.stack",
             "relax.take"}
REDUCTION = {"relax.sum", "relax.mean", "relax.max", "relax.min", "relax.nn.softmax",
             "relax.nn.layer_norm", "relax.nn.batch_norm"}
HEAVY = {"relax.matmul": "matmul", "relax.nn.conv2d": "conv2d"}
# ops that only reinterpret the shape of a row-major tensor: TVM turns a kernel made of
# them alone into a view of its input (no copy, no new tensor). Inference dropout is an
# identity copy, which RewriteDataflowReshape also makes a view (seen on SqueezeNet); where
# TVM copies instead, treating it as a view only keeps its input alive longer.
VIEW_OPS = {"relax.reshape", "relax.expand_dims", "relax.squeeze", "relax.flatten",
            "relax.nn.dropout"}


def op_kind(n: Node, kernels: dict[str, str]) -> str | None:
    """'library', 'anchor', 'reduce', 'elemwise' (elementwise or injective), or None."""
    if n.op in HEAVY:
        return "library" if kernels.get(HEAVY[n.op]) == "library" else "anchor"
    if not isinstance(n.ty, TensorTy) or n.op in (TUPLE, GET_ITEM):
        return None  # tuples and their items stay out of groups
    if n.op in REDUCTION:
        return "reduce"
    if n.op in ELEMWISE or n.op in INJECTIVE:
        return "elemwise"
    return "anchor"  # any other op: a kernel of its own that may take followers


def constant_only(graph: Graph) -> set[str]:
    """Nodes computed from constants alone (TVM folds them at compile time)."""
    const: set[str] = set()
    for n in graph.nodes:
        if n.op != INPUT and all(i in const for i in n.inputs):
            const.add(n.name)
    return const


def folded_into_call(graph: Graph, kinds: dict, users: dict) -> dict[str, str]:
    """Node -> the node whose kernel absorbs it: a batch-norm right after a convolution
    (and its items) folds into the conv's weights; a constant bias added right after a
    library call alone joins the call (addmm / conv bias)."""
    const = constant_only(graph)
    out: dict[str, str] = {}
    for n in graph.nodes:
        srcs = n.inputs
        srcs = [s for s in srcs if s not in const] or srcs
        if not srcs or srcs[0] not in graph or users[srcs[0]] != [n.name]:
            continue
        src = graph.node(srcs[0])
        if n.op == "relax.nn.batch_norm" and src.op == "relax.nn.conv2d":
            out[n.name] = src.name
            out.update({u: src.name for u in users[n.name] if graph.node(u).op == GET_ITEM})
        elif n.op == "relax.add" and kinds.get(src.name) == "library" and any(
                _is_bias(graph, a, src, const) for a in n.args):
            out[n.name] = src.name
    return out


def _is_bias(graph: Graph, arg, producer: Node, const: set[str]) -> bool:
    """A constant (or a value computed from constants alone, which TVM folds first)
    holding one value per output channel of a matmul (last axis) or a convolution
    (axis 1): the offload folds it into the library call."""
    if isinstance(arg, ConstRef):
        have = tuple(graph.constants[arg.key].shape)
    elif getattr(arg, "name", None) in const and isinstance(graph.node(arg.name).ty, TensorTy):
        have = graph.node(arg.name).ty.shape
    else:
        return False
    if not isinstance(producer.ty, TensorTy):
        return False
    shape = producer.ty.shape
    axis = 1 if producer.op == "relax.nn.conv2d" else len(shape) - 1
    channels = shape[axis] if shape else 0
    padded = (1,) * (len(shape) - len(have)) + tuple(have)
    size = int(np.prod(have, dtype=np.int64))
    return size == channels and len(padded) == len(shape) and padded[axis] == channels


def left_to_tvm(graph: Graph, kinds: dict, users: dict) -> set[str]:
    """Nodes that must stay outside fusion groups so TVM's preparation can remove them."""
    return constant_only(graph) | set(folded_into_call(graph, kinds, users))


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

    @property
    def _by_name(self) -> dict[str, Kernel]:
        cache = self.__dict__.get("_cache")
        if cache is None:
            cache = {k.name: k for k in self.kernels}
            object.__setattr__(self, "_cache", cache)
        return cache

    def to_networkx(self):
        """A `networkx.DiGraph` over kernel names (attrs kind, tenants, nbytes)."""
        import networkx as nx

        g = nx.DiGraph()
        for k in self.kernels:
            g.add_node(k.name, kind=k.kind, tenants=k.tenants, nbytes=k.nbytes)
        for k, ds in self.deps.items():
            g.add_edges_from((d, k) for d in ds)
        return g


def _live(graph: Graph, tenants: list[str]) -> set[str]:
    live = {o.name for t in tenants for o in graph.tenants[t].outputs if hasattr(o, "name")}
    for n in reversed(graph.nodes):
        if n.name in live:
            live.update(n.inputs)
    return live


def kernel_dag(graph: Graph, kernels: dict[str, str],
               tenants: list[str] | None = None) -> KernelDAG:
    """The kernels that compute `tenants`' outputs (all tenants: ``run_all``), in the order
    lowering emits them (a kernel runs where its last node stands in the graph)."""
    tenants = list(graph.tenants) if tenants is None else tenants
    live = _live(graph, tenants)
    users = graph.users()
    for o in graph.output_names():
        users[o].append("<output>")
    kinds = {n.name: op_kind(n, kernels) for n in graph.nodes}
    const = constant_only(graph)
    folded = folded_into_call(graph, kinds, users)

    members: dict[str, list[Node]] = {}  # kernel name -> its nodes, in graph order
    kernel_of: dict[str, str] = {}  # node -> kernel name
    for n in graph.nodes:
        if n.name not in live or n.op == INPUT or n.name in const:
            continue
        if n.op in (TUPLE, GET_ITEM) and n.name not in folded:
            continue
        key = kernel_of.get(folded[n.name], n.name) if n.name in folded else (n.group or n.name)
        kernel_of[n.name] = key
        members.setdefault(key, []).append(n)

    alias: dict[str, str] = {}  # node -> the node whose tensor holds its value
    out: list[Kernel] = []
    deps: dict[str, tuple[str, ...]] = {}
    for key in sorted(members, key=lambda k: _pos(graph, members[k][-1].name)):
        nodes = members[key]
        tail, inside = nodes[-1], {n.name for n in nodes}
        reads: list[str] = []
        for n in nodes:
            for i in n.inputs:
                if i in inside or i in const:
                    continue
                for src in _tensors(graph, i, alias):
                    if src not in reads and src not in const:
                        reads.append(src)
        if all(n.op in VIEW_OPS for n in nodes) and len(reads) == 1:
            alias.update({n.name: reads[0] for n in nodes})
            kind, tensor, nbytes = "view", None, 0
        else:
            kind = "library" if op_kind(nodes[0], kernels) == "library" else "tvm"
            tensor = tail.name if isinstance(tail.ty, TensorTy) else None
            nbytes = tail.ty.nbytes if tensor else 0
            alias.update({n.name: tail.name for n in nodes})
        deps[key] = tuple(dict.fromkeys(kernel_of[r] for r in reads if r in kernel_of))
        out.append(Kernel(key, tuple(n.name for n in nodes), kind, tail.tenants, tuple(reads),
                          tensor, nbytes))
    outputs = frozenset(t for name in graph.output_names() if name in live
                        for t in _tensors(graph, name, alias) if tenants_return(graph, tenants, name))
    return KernelDAG(tuple(out), deps, alias, outputs)


def tenants_return(graph: Graph, tenants: list[str], name: str) -> bool:
    """Whether one of `tenants` returns node `name`."""
    return any(getattr(o, "name", None) == name for t in tenants for o in graph.tenants[t].outputs)


def _pos(graph: Graph, name: str) -> int:
    index = graph.__dict__.get("_cache_index")
    if index is None:
        index = {n.name: i for i, n in enumerate(graph.nodes)}
        object.__setattr__(graph, "_cache_index", index)
    return index[name]


def _tensors(graph: Graph, name: str, alias: dict[str, str]) -> list[str]:
    """The node(s) whose memory holds node `name`'s value: views and folded nodes lead to
    their kernel's tensor, a tuple to its fields, an item of a tuple built by a `tuple` node
    to that field (items of a tuple-valued kernel lead to the kernel's node)."""
    if name in alias:
        return [alias[name]]
    n = graph.node(name)
    if n.op == TUPLE:
        return [t for i in n.inputs for t in _tensors(graph, i, alias)]
    if n.op == GET_ITEM:
        src = graph.node(n.inputs[0]) if n.inputs else None
        if src is not None and src.op == TUPLE:
            field = src.args[n.attrs]
            return _tensors(graph, field.name, alias) if hasattr(field, "name") else []
        return _tensors(graph, n.inputs[0], alias) if n.inputs else []
    return [name]  # an input, or a node of a kernel not yet seen
