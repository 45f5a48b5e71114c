"""Graph -> one Relax IRModule (an entry per tenant, ``run_all``, the manifest) -> TVM executable.

Every node is re-emitted generically with `relax.BlockBuilder`: the operator, attrs and
arguments it was lifted with. The entry of a tenant holds the nodes its outputs need;
``run_all`` holds every node once, takes every tenant's inputs and returns every
tenant's outputs in one flat tuple.
"""

from __future__ import annotations

import json

import numpy as np
import tvm
from tvm import relax

from .abi import MANIFEST_FN, RUN_ALL
from .arena import ATTR
from .errors import MTCompileError
from .ir import (
    GET_ITEM,
    INPUT,
    TUPLE,
    ConstRef,
    Graph,
    Opaque,
    Ref,
    TensorTy,
    iter_const_refs,
    iter_refs,
)
from .lift import lift_type

TARGETS = ("llvm", "cuda")


class LoweringError(MTCompileError):
    """The graph could not be re-emitted as Relax."""


def make_target(target: str) -> tvm.target.Target:
    """A TVM target from ``"llvm"`` or ``"cuda"`` (the GPU code gets an llvm host)."""
    if target == "llvm":
        return tvm.target.Target("llvm")
    if target == "cuda":
        return tvm.target.Target({"kind": "cuda"}, host={"kind": "llvm"})
    raise MTCompileError(f"unknown target {target!r}; expected one of {list(TARGETS)}")


def device_for(target: str):
    """The runtime device of a target name."""
    return tvm.cuda(0) if target == "cuda" else tvm.cpu(0)


def run_all_params(graph: Graph) -> list[tuple[str, list[tuple[str, str]]]]:
    """``run_all``'s parameters in order: (input node, the (tenant, input name) pairs it
    serves). An input shared by several tenants is one parameter."""
    params: dict[str, list[tuple[str, str]]] = {}
    for t, io in graph.tenants.items():
        for local, node in io.inputs:
            params.setdefault(node, []).append((t, local))
    return list(params.items())


# Ops through which an index value keeps its meaning (casts, reshapes, the negative-index
# wrap that ONNX Gather imports as where(less(i, 0), i + n, i)).
_INDEX_PATH_OPS = {"relax.astype", "relax.reshape", "relax.expand_dims", "relax.squeeze",
                   "relax.permute_dims", "relax.broadcast_to", "relax.where", "relax.less",
                   "relax.add"}


def input_index_ranges(graph: Graph) -> dict[str, tuple[int, int]]:
    """Input node -> the [low, high) range of valid values, for inputs that index a table
    through a fast-mode ``take``: [0, rows), or [-rows, rows) where the import wraps
    negative indices (ONNX Gather).

    TVM's fast-mode take reads out of bounds (and may crash the process) on a bad index,
    so the runtime checks such inputs before calling into the executable.
    """
    ranges: dict[str, tuple[int, int]] = {}
    for n in graph.nodes:
        if n.op != "relax.take" or n.attrs is None or str(n.attrs.obj.mode) != "fast":
            continue
        table, idx = n.args
        rows = _rows(graph, table, int(n.attrs.obj.axis) if n.attrs.obj.axis is not None else 0)
        src = _index_source(graph, idx)
        if rows is None or src is None:
            continue
        name, wraps = src
        lo, hi = (-rows if wraps else 0), rows
        if name in ranges:  # several tables: the tightest range serves them all
            lo, hi = max(lo, ranges[name][0]), min(hi, ranges[name][1])
        ranges[name] = (lo, hi)
    return ranges


def _rows(graph: Graph, table, axis: int) -> int | None:
    if isinstance(table, ConstRef):
        shape = graph.constants[table.key].shape
    elif isinstance(table, Ref) and isinstance(graph.node(table.name).ty, TensorTy):
        shape = graph.node(table.name).ty.shape
    else:
        return None
    return int(shape[axis]) if shape else None


def _index_source(graph: Graph, idx) -> tuple[str, bool] | None:
    """The one input node an index value is computed from, through index-keeping ops, and
    whether negative values are wrapped on the way (``where``)."""
    sources: set[str] = set()
    wraps = False
    stack = [idx]
    while stack:
        a = stack.pop()
        if not isinstance(a, Ref):
            continue  # constants (the n of the wrap) are fine
        node = graph.node(a.name)
        if node.op == INPUT:
            sources.add(node.name)
        elif node.op in _INDEX_PATH_OPS:
            wraps |= node.op == "relax.where"
            stack.extend(node.args)
        else:
            return None
    return (sources.pop(), wraps) if len(sources) == 1 else None


class _Emitter:
    def __init__(self, graph: Graph, consts: dict[str, relax.Expr]):
        self.graph = graph
        self.consts = consts  # one Relax constant per content key, shared by every entry
        self.var_names: dict[str, dict[str, str]] = {}  # function -> node -> Relax var name

    def const(self, key: str) -> relax.Expr:
        if key not in self.consts:
            arr = self.graph.constants[key]
            self.consts[key] = relax.const(arr, dtype=str(arr.dtype))  # keep int64/float64
        return self.consts[key]

    def arg(self, a, env):
        """The Relax value of an argument; `env` maps node names (and, inside a group
        function, constant keys) to Relax values."""
        if isinstance(a, Ref):
            return env[a.name]
        if isinstance(a, ConstRef):
            return env[a.key] if a.key in env else self.const(a.key)
        if isinstance(a, Opaque):
            return a.obj
        if isinstance(a, tuple):
            return relax.Tuple([self.arg(x, env) for x in a])
        raise LoweringError(f"cannot emit argument {a!r}")

    def expr(self, n, env):
        if n.op == TUPLE:
            return relax.Tuple([self.arg(a, env) for a in n.args])
        if n.op == GET_ITEM:
            return relax.TupleGetItem(self.arg(n.args[0], env), n.attrs)
        args = [self.arg(a, env) for a in n.args]
        attrs = n.attrs.obj if n.attrs is not None else None
        return relax.Call(tvm.ir.Op.get(n.op), args, attrs, [t.obj for t in n.ty_args])

    def group(self, bb: relax.BlockBuilder, fname: str, members: list, env: dict):
        """Emit a fusion group as one primitive function (TVM makes it one kernel) and call it."""
        inputs = _group_inputs(members)
        params, local = [], {}
        for i, a in enumerate(inputs):
            ty = self.graph.node(a.name).ty if isinstance(a, Ref) else TensorTy(
                tuple(self.graph.constants[a.key].shape), str(self.graph.constants[a.key].dtype))
            v = relax.Var(f"p{i}", relax.TensorType(list(ty.shape), ty.dtype))
            local[a.name if isinstance(a, Ref) else a.key] = v
            params.append(v)
        gbb = relax.BlockBuilder()
        with gbb.function(fname, params, attrs={"Primitive": 1}, private=True):
            with gbb.dataflow():
                for m in members[:-1]:
                    local[m.name] = gbb.emit(self.expr(m, local))
                out = gbb.emit_output(self.expr(members[-1], local))
            gbb.emit_func_output(out)
        gv = bb.add_func(gbb.get()[fname], fname)
        outer = [self.arg(a, env) for a in inputs]
        return bb.emit(relax.Call(gv, outer), name_hint=members[-1].name.replace(".", "_"))

    def function(self, bb: relax.BlockBuilder, fname: str, tenants: list[str],
                 params: list[tuple[str, str]]) -> None:
        """Emit `fname` computing `tenants`' outputs from `params` ((node, name) pairs)."""
        g = self.graph
        outputs = [o for t in tenants for o in g.tenants[t].outputs]
        live = {o.name for o in outputs if isinstance(o, Ref)}
        for n in reversed(g.nodes):
            if n.name in live:
                live.update(n.inputs)
        env = {}
        self.var_names[fname] = names = {}
        for node_name, pname in params:
            ty = g.node(node_name).ty
            assert isinstance(ty, TensorTy)
            env[node_name] = relax.Var(pname, relax.TensorType(list(ty.shape), ty.dtype))
        with bb.function(fname, [env[node] for node, _ in params]):
            with bb.dataflow():
                groups: dict[str, list] = {}
                for n in g.nodes:
                    if n.group is not None and n.name in live:
                        groups.setdefault(n.group, []).append(n)
                tails = {members[-1].name: members for members in groups.values()}
                for n in g.nodes:
                    if n.name not in live or n.op == INPUT:
                        continue
                    if n.group is not None:
                        if n.name in tails:
                            env[n.name] = self.group(bb, f"{fname}_{n.group}", tails[n.name], env)
                            names[n.name] = env[n.name].name
                        continue
                    try:
                        env[n.name] = bb.emit(self.expr(n, env), name_hint=n.name.replace(".", "_"))
                    except Exception as e:
                        raise LoweringError(f"tenant '{n.tenant}': cannot emit %{n.name} = "
                                            f"{n.op}: {type(e).__name__}: {e}") from e
                    names[n.name] = env[n.name].name
                    got = lift_type(env[n.name].ty, n.name)
                    if got != n.ty:
                        raise LoweringError(f"tenant '{n.tenant}': %{n.name} = {n.op} has type "
                                            f"{got} after emission, the graph says {n.ty}")
                out = bb.emit_output(relax.Tuple([self.arg(o, env) for o in outputs]))
            bb.emit_func_output(out)


def _group_inputs(members) -> list:
    """The Refs (to nodes outside the group) and ConstRefs a group reads, each once."""
    inside = {m.name for m in members}
    seen, out = set(), []
    for m in members:
        for a in [*iter_refs(m.args), *iter_const_refs(m.args)]:
            key = a.name if isinstance(a, Ref) else a.key
            if key not in seen and not (isinstance(a, Ref) and a.name in inside):
                seen.add(key)
                out.append(a)
    return out


def emit_module(graph: Graph, manifest: dict | None = None,
                entry_graph: Graph | None = None) -> tvm.IRModule:
    """One IRModule: an entry per tenant, ``run_all`` and (optionally) the manifest entry.

    Tenant entries come from `entry_graph` when given (the graph before passes whose
    result only ``run_all`` can use), ``run_all`` from `graph`.
    """
    consts: dict[str, relax.Expr] = {}
    em, entries = _Emitter(graph, consts), _Emitter(entry_graph or graph, consts)
    bb = relax.BlockBuilder()
    for t, io in entries.graph.tenants.items():
        entries.function(bb, t, [t], [(node, local) for local, node in io.inputs])
    em.function(bb, RUN_ALL, list(graph.tenants),
                [(node, "__".join(uses[0])) for node, uses in run_all_params(graph)])
    if manifest is not None:
        data = np.frombuffer(json.dumps(manifest, sort_keys=True).encode(), dtype=np.uint8)
        with bb.function(MANIFEST_FN, []):
            bb.emit_func_output(relax.const(data, dtype="uint8"))
    mod = bb.get()
    for e, fnames in ((entries, list(entries.graph.tenants)), (em, [RUN_ALL])):
        plans = e.graph.analyses.get("memory")
        for fname in fnames if plans is not None else ():
            gv = mod.get_global_var(fname)
            mod[gv] = mod[gv].with_attr(ATTR, json.dumps(
                _arena_attr(plans.functions[fname], e.var_names[fname])))
    return mod


def _arena_attr(plan, var_names: dict[str, str]) -> dict:
    """A function's memory plan keyed by the Relax var names lowering emitted."""
    slots = [s for s in plan.slots if s.tensor in var_names]
    return {"bytes": plan.arena_bytes,
            "offsets": {var_names[s.tensor]: s.offset for s in slots},
            "sizes": {var_names[s.tensor]: s.size for s in slots}}


def build(mod: tvm.IRModule, target: str, providers: dict[str, str], database=None):
    """Compile the module for `target` with the heavy-op `providers`.

    Returns the executable and facts for the manifest (library calls per entry).
    """
    from . import kernels, library

    mod = kernels.prepare(mod)
    mod, calls = kernels.offload(mod, providers)
    if calls:
        library.register()
    tgt = make_target(target)
    memory: dict[str, dict] = {}  # per function: planned and left-to-TVM bytes
    if target == "llvm":
        executable = tvm.compile(mod, tgt, relax_pipeline=kernels.cpu_pipeline(
            tgt, database, memory))
    else:
        if database is not None:
            raise MTCompileError("tuning databases are applied for target llvm only")
        executable = tvm.compile(mod, tgt, relax_pipeline=kernels.gpu_pipeline(tgt, memory))
    return executable, {"library_calls": calls, "memory": memory}
