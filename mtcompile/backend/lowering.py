"""Graph -> one Relax IRModule (an entry per tenant, ``run_all``, the manifest) -> TVM executable.

Every node is re-emitted generically with `relax.BlockBuilder`: the operator, attrs and
arguments it was lifted with. The entry of a tenant holds the nodes its outputs need;
``run_all`` holds every node once, takes every tenant's inputs and returns every
tenant's outputs in one flat tuple. With a stream assignment, run_all's kernels are also
emitted as one function per stream (`StreamLayout`), their event points (waits, signals,
values handed between streams) placed here between the stages.
"""

from __future__ import annotations

import json

import numpy as np
import tvm
from tvm import relax

from mtcompile.backend import arena
from mtcompile.backend.arena import ATTR, STREAM_ATTR
from mtcompile.errors import MTCompileError
from mtcompile.ir.graph import (
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
from mtcompile.ir.ops import is_library_call
from mtcompile.ir.relax_types import lift_type
from mtcompile.runtime.abi import GET, MANIFEST_FN, PUT, RUN_ALL, SIGNAL, WAIT
from mtcompile.runtime.manifest import StreamFunctions

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


_NONE = relax.TupleType([])


def _packed(name: str, *args, ty=_NONE) -> relax.Call:
    """A call of the packed function `name` (an event point of a stream function)."""
    return relax.Call(relax.ExternFunc(name), list(args), ty_args=[ty])


class _Emitter:
    def __init__(self, graph: Graph, consts: dict[str, relax.Expr]):
        self.graph = graph
        self.consts = consts  # one Relax constant per content key, shared by every entry
        self.var_names: dict[str, dict[str, str]] = {}  # function -> node -> Relax var name
        self.stream_attrs: dict[str, str] = {}  # stream function -> its STREAM_ATTR

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
        if is_library_call(n.op):  # a conv's params (attrs) are its kernel's last argument
            if n.attrs is not None:
                args.append(relax.ShapeExpr(n.attrs.flat()))
            out_ty = relax.TensorType(list(n.ty.shape), n.ty.dtype)
            return relax.op.call_dps_packed(n.op, relax.Tuple(args), out_ty)
        attrs = n.attrs.obj if n.attrs is not None else None
        return relax.Call(tvm.ir.Op.get(n.op), args, attrs, [t.obj for t in n.ty_args])

    def group(self, bb: relax.BlockBuilder, fname: str, members: list, env: dict,
              output: bool = False):
        """Emit a fusion group as one primitive function (TVM makes it one kernel) and call
        it (as an output of the dataflow block when `output`)."""
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
        emit = bb.emit_output if output else bb.emit
        return emit(relax.Call(gv, outer), name_hint=members[-1].name.replace(".", "_"))

    def function(self, bb: relax.BlockBuilder, fname: str, tenants: list[str],
                 params: list[tuple[str, str]]) -> None:
        """Emit `fname` computing `tenants`' outputs from `params` ((node, name) pairs)."""
        g = self.graph
        outputs = [o for t in tenants for o in g.tenants[t].outputs]
        live = g.live_nodes(tenants)
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

    def stream_function(self, bb: relax.BlockBuilder, layout: StreamLayout, i: int) -> None:
        """Emit stream `i` of `layout`. Per stage (a kernel of the stream, in stream order,
        with the free nodes it needs): the waits before it, a ``get`` of each value of
        another stream it reads first, its nodes in a dataflow block (stages with no event
        point between them share one), then a ``put`` of each value it hands to other
        streams and the signals after it. The event points are impure calls outside the
        dataflow blocks, so TVM's passes keep them in place and fuse nothing across them.
        Params: the shared arena storage, then the run_all inputs it reads. Returns its
        tenant outputs."""
        g, fname = self.graph, layout.functions[i]
        env: dict = {}
        self.var_names[fname] = names = {}
        storage = relax.Var("mtcompile_arena", relax.ObjectType())
        params = [storage]
        for node in layout.inputs[i]:
            ty = g.node(node).ty
            env[node] = relax.Var(node.replace(".", "_"), relax.TensorType(list(ty.shape), ty.dtype))
            params.append(env[node])
        stages = layout.emission[i]
        stage_of = {name: s for s, names_ in enumerate(stages) for name in names_}
        imports, exports = set(layout.imports[i]), layout.exports[i]
        # values read outside the dataflow block that computes them leave it as outputs
        escaping = {*exports, *(o.name for o in layout.outputs[i] if isinstance(o, Ref))}
        escaping |= {r for s, names_ in enumerate(stages) for name in names_
                     for r in layout.reads(name) if stage_of.get(r, s) != s}
        put: set[str] = set()
        with bb.function(fname, params, pure=False):
            for s, node_names in enumerate(stages):
                for e in layout.waits[i].get(s, ()):
                    bb.emit(_packed(WAIT, relax.prim_value(e)))
                for r in dict.fromkeys(r for name in node_names for r in layout.reads(name)):
                    if r in imports and r not in env:
                        ty = g.node(r).ty
                        env[r] = bb.emit(_packed(GET, relax.prim_value(layout.value_id[r]),
                                                 ty=relax.TensorType(list(ty.shape), ty.dtype)),
                                         name_hint=f"import_{r.replace('.', '_')}")
                if node_names:
                    with bb.dataflow():
                        for name in node_names:
                            env[name] = self._emit_node(bb, fname, layout, name, env,
                                                        name in escaping)
                            names[name] = env[name].name
                for x in exports:
                    if x in env and x not in put:
                        put.add(x)
                        bb.emit(_packed(PUT, relax.prim_value(layout.value_id[x]), env[x]))
                for e in layout.signals[i].get(s, ()):
                    bb.emit(_packed(SIGNAL, relax.prim_value(e)))
            missing = [x for x in exports if x not in put]
            if missing:
                raise LoweringError(f"{fname}: values handed to other streams are computed "
                                    f"by none of its stages: {missing}")
            outs = bb.emit(relax.Tuple([self.arg(o, env) for o in layout.outputs[i]]))
            bb.emit_func_output(outs)
        self.stream_attrs[fname] = json.dumps({  # arena.STREAM_ATTR: read by arena.realize
            "exports": {names[x]: layout.value_id[x] for x in exports}})

    def _emit_node(self, bb: relax.BlockBuilder, fname: str, layout: StreamLayout, name: str,
                   env: dict, output: bool) -> relax.Var:
        """One node of a stream function (a fusion group's call for a group's last node),
        as an output of its dataflow block when `output`."""
        n = self.graph.node(name)
        if n.group is not None:
            return self.group(bb, f"{fname}_{n.group}", layout.groups[n.group], env, output)
        emit = bb.emit_output if output else bb.emit
        try:
            return emit(self.expr(n, env), name_hint=name.replace(".", "_"))
        except Exception as e:
            raise LoweringError(f"tenant '{n.tenant}': cannot emit %{name} = {n.op}: "
                                f"{type(e).__name__}: {e}") from e


class StreamLayout:
    """How run_all's kernels are split into stream functions (``run_all__s{i}``): per
    stream the nodes to emit (per kernel, in stream order, each preceded by the free nodes
    it needs: views, tuples, items, constant-only values), the run_all inputs it reads, the
    values it imports from and exports to other streams, its tenant outputs (indices into
    run_all's flat outputs), and the event points: sync `e` = (producer, consumer) is
    signalled after the producer's stage and waited for before the consumer's."""

    def __init__(self, graph: Graph):
        from mtcompile.analysis.schedule import kernel_dag

        a = graph.analyses["streams"]
        self.assignment = a
        dag = kernel_dag(graph)
        self.dag = dag
        n = a.num_streams
        self.functions = [f"{RUN_ALL}__s{i}" for i in range(n)]
        stream_of = a.stream_of
        # nodes of kernels that compute (views are free: re-emitted where needed)
        self.owner = {node: stream_of[k.name] for k in dag.kernels if k.kind != "view"
                      for node in k.nodes}
        self.kernel_of = kernel_of = {node: k.name for k in dag.kernels for node in k.nodes}
        # a kernel's nodes, plus the items of its tuple result: computed on its stream, so
        # another stream imports a field (a tensor), never the tuple
        self.kernel_nodes = {k.name: list(k.nodes) for k in dag.kernels}
        for nd in graph.nodes:
            src = nd.inputs[0] if nd.op == GET_ITEM and nd.inputs else None
            if src in self.owner and nd.name not in self.owner and isinstance(nd.ty, TensorTy):
                self.owner[nd.name] = self.owner[src]
                kernel_of[nd.name] = kernel_of[src]
                self.kernel_nodes[kernel_of[src]].append(nd.name)
        outputs = [o for t in graph.tenants for o in graph.tenants[t].outputs]
        live = graph.live_nodes()
        groups: dict[str, list] = {}
        for nd in graph.nodes:
            if nd.group is not None and nd.name in live:
                groups.setdefault(nd.group, []).append(nd)
        self.group_of = {nd.name: nd.group for nd in graph.nodes if nd.group is not None}
        params = [node for node, _ in run_all_params(graph)]
        self.inputs: list[list[str]] = []
        self.imports: list[list[str]] = []
        self.emission: list[list[list[str]]] = []
        self.outputs: list[list] = [[] for _ in range(n)]
        self.output_index: list[list[int]] = [[] for _ in range(n)]
        self.exports: list[list[str]] = [[] for _ in range(n)]
        self.value_id: dict[str, int] = {}

        # each output: the stream owning the tensor it holds (inputs/constants: stream 0)
        for j, o in enumerate(outputs):
            s = 0
            if isinstance(o, Ref):
                srcs = [self.owner[t] for t in _holders(graph, o.name, dag) if t in self.owner]
                s = srcs[0] if srcs else 0
            self.outputs[s].append(o)
            self.output_index[s].append(j)

        self.graph, self.groups, self._before = graph, groups, _hb(a)
        for i in range(n):
            ins, imp, stages = self._stream_nodes(i)
            self.inputs.append(sorted(ins, key=params.index))
            self.imports.append(imp)
            self.emission.append(stages)
        for imp in self.imports:
            for x in imp:
                s = self.owner[x]
                if x not in self.value_id:
                    self.value_id[x] = len(self.value_id)
                    self.exports[s].append(x)
        self.input_index = [[params.index(x) for x in ins] for ins in self.inputs]
        pos = [{k: j for j, k in enumerate(ks)} for ks in a.streams]
        self.waits: list[dict[int, list[int]]] = [{} for _ in range(n)]
        self.signals: list[dict[int, list[int]]] = [{} for _ in range(n)]
        self.event_streams = []
        for e, (p, c) in enumerate(a.syncs):
            sp, sc = stream_of[p], stream_of[c]
            self.signals[sp].setdefault(pos[sp][p], []).append(e)
            self.waits[sc].setdefault(pos[sc][c], []).append(e)
            self.event_streams.append((sp, sc))

    def _stream_nodes(self, i: int) -> tuple[list[str], list[str], list[list[str]]]:
        """Stream `i`'s run_all inputs, imports, and nodes to emit per stage (one stage per
        kernel, in stream order; a last one for outputs that are views)."""
        graph, kernels = self.graph, self.assignment.streams[i]
        done: set[str] = set()
        ins: list[str] = []
        imp: list[str] = []

        def need(name: str, order: list[str], stage_kernel: str | None) -> None:
            if name in done:
                return
            nd = graph.node(name)
            if nd.op == INPUT:
                ins.append(name)
                done.add(name)
                return
            if self.owner.get(name, i) != i:  # computed on another stream: imported
                if not isinstance(nd.ty, TensorTy):
                    raise LoweringError(f"stream {i} reads %{name}, a {nd.ty} computed on "
                                        f"stream {self.owner[name]}: only tensors cross streams")
                producer = self.kernel_of[name]
                if stage_kernel is None or not self._before(producer, stage_kernel):
                    raise LoweringError(f"stream {i} reads %{name} of kernel {producer} "
                                        f"(stream {self.owner[name]}) where no event orders "
                                        "it first")
                imp.append(name)
                done.add(name)
                return
            members = self.groups[nd.group] if nd.group is not None else [nd]
            for r in self.reads(name):
                need(r, order, stage_kernel)
            order.append(members[-1].name)
            done.update(m.name for m in members)

        stages: list[list[str]] = []
        for k in kernels:
            order: list[str] = []
            for node in self.kernel_nodes[k]:
                need(node, order, k)
            stages.append(order)
        tail: list[str] = []
        for o in self.outputs[i]:
            if isinstance(o, Ref):
                need(o.name, tail, kernels[-1])
        if tail:
            stages.append(tail)
        return ins, imp, stages

    def reads(self, name: str) -> list[str]:
        """The nodes that emitting node `name` reads (for a group's last node: what the
        group reads from outside)."""
        nd = self.graph.node(name)
        members = self.groups[nd.group] if nd.group is not None else [nd]
        inside = {m.name for m in members}
        return [r for m in members for r in m.inputs if r not in inside]

    def manifest(self) -> StreamFunctions:
        """What the runtime needs to run the stream functions (the manifest's ``streams.run``)."""
        a = self.assignment
        kernel_tenant = {}  # VM symbol of a fused kernel -> its tenant(s)
        for s, ks in enumerate(a.streams):
            for k in ks:
                kn = self.dag.kernel(k)
                group = self.group_of.get(kn.nodes[-1])
                if group is not None:
                    kernel_tenant[f"{self.functions[s]}_{group}"] = kn.tenant
        return StreamFunctions(
            functions=tuple(self.functions), arena_function=ARENA_FN, num_events=a.num_syncs,
            event_streams=tuple(map(tuple, self.event_streams)),
            stream_inputs=tuple(map(tuple, self.input_index)),
            stream_outputs=tuple(map(tuple, self.output_index)),
            stream_tenants=tuple("+".join(dict.fromkeys(
                t for k in ks for t in self.dag.kernel(k).tenants)) or "?" for ks in a.streams),
            kernel_tenant=kernel_tenant)


ARENA_FN = f"{RUN_ALL}__arena"  # zero-argument entry: a fresh storage of run_all's arena size


def stream_layout(graph: Graph) -> StreamLayout | None:
    """The stream functions to emit, when the graph carries an assignment of > 1 stream
    and a memory plan (the one arena all streams share), made for that very assignment."""
    a = graph.analyses.get("streams")
    plan = graph.analyses.get("memory")
    if a is None or a.num_streams <= 1 or plan is None:
        return None
    if plan.streams != a.fingerprint():
        made_for = "program order" if plan.streams is None else f"assignment {plan.streams}"
        raise MTCompileError(
            f"run_all's memory plan was made for {made_for}, not for the {a.num_streams}-stream "
            f"assignment {a.fingerprint()} to lower: tensors live at once on two streams could "
            "share bytes. Run plan-memory after assign-streams.")
    return StreamLayout(graph)


def _hb(a):
    from mtcompile.analysis.streams import happens_before

    return happens_before(a)


def _holders(graph: Graph, name: str, dag) -> list[str]:
    from mtcompile.analysis.schedule import tensors_of

    return tensors_of(graph, name, dag.alias)


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
                entry_graph: Graph | None = None,
                streams: StreamLayout | None = None) -> tvm.IRModule:
    """One IRModule: an entry per tenant, ``run_all`` and (optionally) the manifest entry.

    Tenant entries come from `entry_graph` when given (the graph before passes whose
    result only ``run_all`` can use), ``run_all`` from `graph`. With a `streams` layout,
    also one function per stream and ``run_all__arena`` (the storage they share).
    """
    consts: dict[str, relax.Expr] = {}
    em, entries = _Emitter(graph, consts), _Emitter(entry_graph or graph, consts)
    bb = relax.BlockBuilder()
    for t, io in entries.graph.tenants.items():
        entries.function(bb, t, [t], [(node, local) for local, node in io.inputs])
    em.function(bb, RUN_ALL, list(graph.tenants),
                [(node, "__".join(uses[0])) for node, uses in run_all_params(graph)])
    if streams is not None:
        for i in range(len(streams.functions)):
            em.stream_function(bb, streams, i)
        size = max(graph.analyses["memory"].functions[RUN_ALL].arena_bytes, 64)
        with bb.function(ARENA_FN, []):
            bb.emit_func_output(bb.emit(relax.op.memory.alloc_storage(
                relax.ShapeExpr([size]), 0, "global", "uint8")))
    if manifest is not None:
        data = np.frombuffer(json.dumps(manifest, sort_keys=True).encode(), dtype=np.uint8)
        with bb.function(MANIFEST_FN, []):
            bb.emit_func_output(relax.const(data, dtype="uint8"))
    mod = bb.get()
    stream_fns = streams.functions if streams is not None else []
    for e, fnames in ((entries, list(entries.graph.tenants)), (em, [RUN_ALL, *stream_fns])):
        plans = e.graph.analyses.get("memory")
        for fname in fnames if plans is not None else ():
            gv = mod.get_global_var(fname)
            plan = plans.functions[RUN_ALL if fname in stream_fns else fname]
            mod[gv] = mod[gv].with_attr(ATTR, json.dumps(
                _arena_attr(plan, e.var_names[fname])))
            if fname in em.stream_attrs:
                mod[gv] = mod[gv].with_attr(STREAM_ATTR, em.stream_attrs[fname])
    return mod


def _arena_attr(plan, var_names: dict[str, str]) -> dict:
    """A function's memory plan keyed by the Relax var names lowering emitted."""
    slots = [s for s in plan.slots if s.tensor in var_names]
    return {"bytes": plan.arena_bytes, "alignment": plan.alignment,
            "offsets": {var_names[s.tensor]: s.offset for s in slots},
            "sizes": {var_names[s.tensor]: s.size for s in slots}}


def build(mod: tvm.IRModule, target: str, database=None):
    """Compile the module for `target` (its library call nodes are already emitted).

    Returns the executable and facts for the manifest (library calls over all entries).
    """
    from mtcompile.backend import kernels
    from mtcompile.runtime import library

    mod = kernels.prepare(mod)
    calls = library_calls(mod)
    if calls:
        library.register()
    tgt = make_target(target)
    memory: dict[str, dict] = {}  # per function: planned and left-to-TVM bytes
    if target == "llvm":
        pipeline = kernels.cpu_pipeline(tgt, database, memory)
    else:
        if database is not None:
            raise MTCompileError("tuning databases are applied for target llvm only")
        pipeline = kernels.gpu_pipeline(tgt, memory)
    try:
        executable = tvm.compile(mod, tgt, relax_pipeline=pipeline)
    except Exception as e:
        if arena.ERROR in memory:
            raise arena.ArenaError(memory[arena.ERROR]) from e
        raise
    return executable, {"library_calls": calls, "memory": memory}


def library_calls(mod: tvm.IRModule) -> int:
    """How many library kernel calls the Relax functions of `mod` make, over all entries."""
    dps = tvm.ir.Op.get("relax.call_dps_packed")
    found: list[str] = []

    def visit(e) -> None:
        if isinstance(e, relax.Call) and e.op.same_as(dps) and isinstance(
                e.args[0], relax.ExternFunc) and is_library_call(str(e.args[0].global_symbol)):
            found.append(str(e.args[0].global_symbol))

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return len(found)
