"""N tenant graphs -> one multi-tenant Graph; names stay namespaced, equal constants stored once."""

from __future__ import annotations

from dataclasses import replace

from mtcompile.errors import TenantError
from mtcompile.ir.graph import Graph, Node, Ref, TenantIO, TensorTy, map_refs


def merge(graphs: list[Graph], shared: dict[str, dict[str, str]] | None = None) -> Graph:
    """Concatenate tenant graphs into one; a constant shared by content is kept once.

    shared: ``{tenant: {input name: shared name}}``; the inputs declared under one shared
    name become one input node ``shared.<name>`` serving all those tenants.
    """
    nodes, tenants, constants = [], {}, {}
    names: set[str] = set()
    for g in graphs:
        for t in g.tenants:
            if t in tenants:
                raise TenantError(f"duplicate tenant name {t!r}: every tenant needs its own name")
        clash = names.intersection(n.name for n in g.nodes)
        if clash:
            raise TenantError(f"node names {sorted(clash)[:3]} appear in two tenant graphs")
        names.update(n.name for n in g.nodes)
        nodes.extend(g.nodes)
        tenants.update(g.tenants)
        for k, v in g.constants.items():
            constants.setdefault(k, v)
    merged = Graph(tuple(nodes), tenants, constants)
    if shared:
        merged = share_inputs(merged, shared)
    merged.verify()
    return merged


def _shared_targets(graph: Graph, shared: dict[str, dict[str, str]]) -> dict[str, str]:
    """Input node name -> the shared node that replaces it; each declared input checked (an
    input of its tenant, of fixed shape, of the type of the others under its name)."""
    target: dict[str, str] = {}  # input node name -> shared node name
    first: dict[str, tuple[str, str, Node]] = {}  # shared name -> (tenant, local, node)
    for t, decl in shared.items():
        io = graph.tenants[t]
        locals_ = dict(io.inputs)
        for local, key in decl.items():
            if local not in locals_:
                raise TenantError(
                    f"tenant '{t}': shared_inputs names {local!r}, which is not "
                    f"an input (inputs: {list(locals_)})"
                )
            node = graph.node(locals_[local])
            if isinstance(node.ty, TensorTy) and node.ty.symbolic:
                # each tenant's dims are its own size variables: sizes could disagree
                raise TenantError(
                    f"tenant '{t}': shared input {local!r} ({key!r}) has "
                    f"dynamic dims {node.ty}; a shared input needs a fixed "
                    "shape (dynamic tenants each take their own inputs)"
                )
            if key in first and first[key][2].ty != node.ty:
                t0, l0, n0 = first[key]
                raise TenantError(
                    f"shared input {key!r}: tenant '{t0}' input {l0!r} is {n0.ty} "
                    f"but tenant '{t}' input {local!r} is {node.ty}"
                )
            first.setdefault(key, (t, local, node))
            target[node.name] = f"shared.{key}"
    return target


def share_inputs(graph: Graph, shared: dict[str, dict[str, str]]) -> Graph:
    """Unify the input nodes declared under one shared name (types must agree)."""
    target = _shared_targets(graph, shared)
    users: dict[str, set[str]] = {}
    for name, shared_name in target.items():
        users.setdefault(shared_name, set()).update(graph.node(name).tenants)
    nodes, placed = [], set()
    for n in graph.nodes:
        if n.name in target:
            shared_name = target[n.name]
            if shared_name not in placed:
                placed.add(shared_name)
                nodes.append(
                    replace(
                        n,
                        name=shared_name,
                        tenants=tuple(t for t in graph.tenants if t in users[shared_name]),
                    )
                )
            continue
        nodes.append(replace(n, args=map_refs(n.args, lambda r: Ref(target.get(r.name, r.name)))))
    tenants = {
        t: TenantIO(
            tuple((local, target.get(name, name)) for local, name in io.inputs),
            tuple(Ref(target.get(o.name, o.name)) if isinstance(o, Ref) else o for o in io.outputs),
        )
        for t, io in graph.tenants.items()
    }
    return Graph(tuple(nodes), tenants, graph.constants)


def constant_bytes_before_merge(graphs: list[Graph]) -> int:
    """Bytes of constants if each tenant stored its own copy."""
    return int(sum(g.weight_bytes() for g in graphs))
