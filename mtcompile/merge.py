"""N tenant graphs -> one multi-tenant Graph; names stay namespaced, equal constants stored once."""

from __future__ import annotations

from .errors import TenantError
from .ir import Graph


def merge(graphs: list[Graph]) -> Graph:
    """Concatenate tenant graphs into one; a constant shared by content is kept once."""
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
    merged.verify()
    return merged


def constant_bytes_before_merge(graphs: list[Graph]) -> int:
    """Bytes of constants if each tenant stored its own copy."""
    return int(sum(g.weight_bytes() for g in graphs))
