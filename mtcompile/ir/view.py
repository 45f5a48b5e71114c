"""A compact JSON view of a Graph (nodes, tenants, fusion groups, per-pass rows): what the
manifest keeps so that reports and pictures of a saved bundle need no Graph and no TVM."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from mtcompile.ir.ops import library_call

_HFUSE = re.compile(r"^hfuse\d+\.")  # names fuse-horizontal gives the nodes it batches


def node_kind(name: str, tenants: Sequence[str]) -> str:
    """'hfused' (batched by fuse-horizontal), 'shared' (one node serving several tenants,
    e.g. made by dedup) or 'own'."""
    if _HFUSE.match(name):
        return "hfused"
    return "shared" if len(tenants) > 1 else "own"


def call_name(call) -> str:
    """A library call (`mtcompile.ir.ops.LibraryCall`, or a view row's ``call``) by kernel,
    variant and epilogue: ``matmul[packed]+bias+relu``."""
    get = call.get if isinstance(call, Mapping) else lambda k: getattr(call, k)
    return (
        f"{get('kernel')}{f'[{v}]' if (v := get('variant')) else ''}"
        f"{'+bias' if get('bias') else ''}{f'+{e}' if (e := get('epilogue')) else ''}"
    )


def graph_view(graph, records: Sequence | None = None) -> dict:
    """A compact JSON view of a Graph for manifests and reports: tenants, nodes (name, op,
    tenant indices, fusion group, inputs, type; a library call's op is its kernel and
    epilogue, `call_name`, and ``call`` its attributes) and, given pass records, one row
    per pass."""
    tenants = list(graph.tenants)
    index = {t: i for i, t in enumerate(tenants)}
    nodes = []
    for n in graph.nodes:
        row = {
            "name": n.name,
            "op": n.op.removeprefix("relax."),
            "tenants": [index[t] for t in n.tenants],
            "inputs": n.inputs,
            "type": str(n.ty),
        }
        call = library_call(n)
        if call is not None:  # named by its kernel and epilogue, not by a symbol
            row["op"] = call_name(call)
            row["call"] = {
                "provider": call.provider,
                "kernel": call.kernel,
                "variant": call.variant,
                "bias": call.bias,
                "epilogue": call.epilogue,
                "symbol": call.symbol,
            }
        if n.group:
            row["group"] = n.group
        nodes.append(row)
    view: dict[str, Any] = {"tenants": tenants, "nodes": nodes}
    if records is not None:
        view["passes"] = [pass_row(r) for r in records]
    return view


def pass_row(record) -> dict:
    """A `PassRecord` (or a compile report's pass dict) as a summary row."""
    get = record.get if isinstance(record, Mapping) else lambda k, d=None: getattr(record, k, d)
    return {
        "name": get("name"),
        "changed": bool(get("changed")),
        "nodes_after": get("nodes_after"),
        "kernels_after": get("kernels_after"),
        "weight_bytes_after": get("weight_bytes_after"),
    }
