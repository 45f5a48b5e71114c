"""Module -> one Relax IRModule (an entry per tenant, ``run_all``, subsets, the manifest) -> TVM executable.

Every node is re-emitted generically with `relax.BlockBuilder`: the operator, attrs and
arguments it was lifted with. Each function of the module is emitted from its own graph:
a tenant's entry holds the nodes its outputs need; ``run_all`` (and a subset's function)
holds each node of its graph once, takes its tenants' inputs and returns their outputs in
one flat tuple. With a stream assignment, run_all's kernels are also
emitted as one function per stream (`StreamLayout`), their event points (waits, signals,
values handed between streams) placed here between the stages.
"""

from __future__ import annotations

import json
import re

import numpy as np
import tvm
from tvm import relax

from mtcompile.abi import (
    ARENA_FN,
    DIVISION_CHECK,
    GET,
    INDEX_CHECK,
    MANIFEST_FN,
    PUT,
    RUN_ALL,
    SIGNAL,
    WAIT,
)
from mtcompile.analysis.divisors import divisor_inputs, divisors
from mtcompile.analysis.index_ranges import (
    IndexRead,
    checked_by_inputs,
    index_reads,
    input_index_ranges,
    valid_range,
)
from mtcompile.analysis.memory import MemoryPlan
from mtcompile.backend import arena, kernels, nan_safe
from mtcompile.backend.arena import ATTR, STREAM_ATTR
from mtcompile.backend.stream_layout import StreamLayout, run_all_params, tuple_field
from mtcompile.errors import LoweringError, MTCompileError
from mtcompile.ir.graph import (
    GET_ITEM,
    INPUT,
    TUPLE,
    ConstRef,
    Graph,
    Opaque,
    Ref,
    Sym,
    TensorTy,
    iter_const_refs,
    iter_refs,
)
from mtcompile.ir.module import Module
from mtcompile.ir.ops import library_call
from mtcompile.ir.relax_types import (
    graph_bounds,
    lift_type,
    relax_type,
    undefined_size_vars,
)
from mtcompile.native import table

TARGETS = ("llvm", "cuda")


HOST_CPU, GENERIC_CPU = "host", "generic"


def resolve_cpu(cpu: str = HOST_CPU) -> str:
    """The LLVM CPU name for `cpu`: ``"host"`` -> the detected CPU of this machine (TVM 0.27's
    LLVM refuses ``mcpu=native``), ``"generic"`` (portable x86-64, SSE2 only), or a CPU
    name LLVM knows (``"skylake"``, ``"znver3"``...)."""
    from tvm.target import codegen

    if cpu == HOST_CPU:
        return str(codegen.llvm_get_system_cpu())
    if cpu != GENERIC_CPU and not codegen.llvm_is_valid_cpu(
        cpu, str(codegen.llvm_get_system_triple())
    ):
        raise MTCompileError(
            f"unknown CPU {cpu!r}: expected 'host', 'generic' or a CPU name "
            "LLVM knows (e.g. 'haswell', 'skylake-avx512', 'znver3')"
        )
    return cpu


def make_target(target: str, cpu: str = HOST_CPU) -> tvm.target.Target:
    """A TVM target from ``"llvm"`` or ``"cuda"`` (the GPU code gets a generic llvm host).
    cpu: what the llvm kernels are compiled for (`resolve_cpu`); the default, the host CPU,
    lets LLVM use its vector units (``Target("llvm")`` alone emits SSE code only)."""
    if target == "llvm":
        name = resolve_cpu(cpu)
        return tvm.target.Target("llvm" if name == GENERIC_CPU else {"kind": "llvm", "mcpu": name})
    if target == "cuda":
        return tvm.target.Target({"kind": "cuda"}, host={"kind": "llvm"})
    raise MTCompileError(f"unknown target {target!r}; expected one of {list(TARGETS)}")


_NONE = relax.TupleType([])


def _packed(name: str, *args, ty=_NONE) -> relax.Call:
    """A call of the packed function `name` (an event point of a stream function)."""
    return relax.Call(relax.ExternFunc(name), list(args), ty_args=[ty])


class _Emitter:
    def __init__(
        self,
        graph: Graph,
        consts: dict[str, relax.Expr],
        top: relax.BlockBuilder | None = None,
        ranges: dict[str, tuple[int, int]] | None = None,
        checks: bool = True,
    ):
        self.graph = graph
        self.consts = consts  # one Relax constant per content key, shared by every entry
        # the module's builder, where the PrimFuncs of bounds checks and NaN-keeping ops go
        # (None: the builder of the first function emitted)
        self.top = top
        # gathers the run-time input check (`ranges`) does not keep in bounds: checked here
        self.checks = {
            r.node: r
            for r in index_reads(graph)
            if checks and not checked_by_inputs(r, ranges or {})
        }
        # integer divisions whose divisor may be 0 at run time: checked here (`divisors`)
        self.divisors = set(divisors(graph)) if checks else set()
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

    def expr(self, n, env, bb: relax.BlockBuilder, check: bool = True):
        """The Relax expression of node `n` (a bounds check it needs is emitted into `bb`,
        unless `check` is False: its index was checked already)."""
        if n.op == TUPLE:
            return relax.Tuple([self.arg(a, env) for a in n.args])
        if n.op == GET_ITEM:
            field = tuple_field(self.graph, n)
            if field is not None:  # a field of a tuple node: the field itself
                return self.arg(field, env)
            return relax.TupleGetItem(self.arg(n.args[0], env), n.attrs)
        args = [self.arg(a, env) for a in n.args]
        read = self.checks.get(n.name) if check else None
        if read is not None:
            args[read.arg] = self.checked_index(bb, n, read, args[read.arg])
        if n.name in self.divisors:
            args[1] = self.checked_divisor(bb, n, args[1])
        if n.op in nan_safe.OPS and isinstance(n.ty, TensorTy):
            call = nan_safe.emit(
                self.top,
                n.op,
                args,
                n.attrs.obj if n.attrs is not None else None,
                n.ty.shape,
                n.ty.dtype,
            )
            if call is not None:
                return call
        call = library_call(n)
        if call is not None:  # the kernel offload-library chose; a conv's params come last
            if call.conv is not None:
                args.append(relax.ShapeExpr(call.conv.flat()))
            return relax.op.call_dps_packed(call.symbol, relax.Tuple(args), relax_type(n.ty))
        attrs = n.attrs.obj if n.attrs is not None else None
        return relax.Call(tvm.ir.Op.get(n.op), args, attrs, [t.obj for t in n.ty_args])

    def checked_index(self, bb: relax.BlockBuilder, n, read: IndexRead, idx: relax.Expr):
        """`idx` through a kernel that raises (naming the tenant and the inputs the index
        comes from) unless every value lies in [low, bound): TVM's gathers and scatters
        access memory at whatever index they get. A constant index is checked here, once."""
        a = n.args[read.arg]
        if isinstance(a, ConstRef):
            values = self.graph.constants[a.key]
            lo, hi = valid_range(read, always=False)
            if values.size and (values.min() < lo or values.max() >= hi):
                raise LoweringError(
                    f"tenant '{n.tenant}': %{n.name} = {n.op} indexes a "
                    f"table of {read.bound} rows at constant indices in "
                    f"[{values.min()}, {values.max()}]"
                )
            lo, hi = valid_range(read, always=True)
            if not values.size or (lo <= values.min() and values.max() < hi):
                return idx
            # valid at some extents of a symbolic table only: checked when it runs
            ty = TensorTy(tuple(values.shape), str(values.dtype))
        else:
            ty = self.graph.node(a.name).ty
        # a 0-d index is checked as one element; a symbolic dim (dynamic batch) is a size
        # variable of the check, bound from the index tensor's shape when it runs
        shape = list(ty.shape) or [1]
        func, scalars = _bounds_check(
            tuple(_expr(d) for d in shape),
            ty.dtype,
            _expr(read.low),
            _expr(read.bound),
            _index_message(self.graph, n, read),
        )
        return self._check_call(bb, func, "check_index", idx, ty, scalars, f"{n.name}_index")

    def checked_divisor(self, bb: relax.BlockBuilder, n, b: relax.Expr):
        """Divisor `b` of integer division `n` through a kernel that raises (naming the
        tenant and the inputs it comes from) where a value is 0: the CPU's integer divide
        would stop the process (SIGFPE)."""
        ty = self.graph.node(n.args[1].name).ty
        shape = list(ty.shape) or [1]
        func, scalars = _bounds_check(
            tuple(_expr(d) for d in shape), ty.dtype, 0, 1, _divisor_message(self.graph, n), True
        )
        return self._check_call(bb, func, "check_divisor", b, ty, scalars, f"{n.name}_divisor")

    def _check_call(self, bb, func, fname: str, x: relax.Expr, ty: TensorTy, scalars, name: str):
        """`x` (of type `ty`) through the check kernel `func`: a 0-d value is checked as one
        element; the kernel's size variables come as trailing scalars."""
        shape = list(ty.shape) or [1]
        gv = self.top.add_func(func, fname)
        flat = x if ty.shape else bb.emit(relax.op.reshape(x, shape))
        out = bb.emit(
            relax.op.call_tir(
                gv,
                [flat, *map(relax.prim_value, scalars)],
                relax_type(TensorTy(tuple(shape), ty.dtype)),
            ),
            name_hint=name.replace(".", "_"),
        )
        return out if ty.shape else bb.emit(relax.op.reshape(out, []))

    def arg_ty(self, a) -> TensorTy:
        """Our type of a group input (a node's value or a constant)."""
        if isinstance(a, Ref):
            return self.graph.node(a.name).ty
        c = self.graph.constants[a.key]
        return TensorTy(tuple(c.shape), str(c.dtype))

    def group(
        self, bb: relax.BlockBuilder, fname: str, members: list, env: dict, output: bool = False
    ):
        """Emit a fusion group as one primitive function (TVM makes it one kernel) and call
        it (as an output of the dataflow block when `output`)."""
        inputs = _group_inputs(members)
        params, local = [], {}
        for i, a in enumerate(inputs):
            ty = self.arg_ty(a)
            v = relax.Var(f"p{i}", relax_type(ty))
            local[a.name if isinstance(a, Ref) else a.key] = v
            params.append(v)
        outer = [self.arg(a, env) for a in inputs]
        # symbolic dims: size variables no parameter's shape defines come in as a shape
        free = undefined_size_vars([self.arg_ty(a) for a in inputs], [m.ty for m in members])
        if free:
            params.append(relax.Var("mtcompile_dims", relax.ShapeType(free)))
            outer.append(relax.ShapeExpr(free))
        # an index the group takes from outside is checked outside: TVM cannot fuse the
        # check with an extern kernel (scatter), and the group then gets checked values
        outside = set()
        for m in members:
            read = self.checks.get(m.name)
            a = m.args[read.arg] if read is not None else None
            if a in inputs:
                outer[inputs.index(a)] = self.checked_index(bb, m, read, outer[inputs.index(a)])
                outside.add(m.name)
        gbb = relax.BlockBuilder()
        with gbb.function(fname, params, attrs={"Primitive": 1}, private=True):
            with gbb.dataflow():
                for m in members[:-1]:
                    local[m.name] = gbb.emit(self.expr(m, local, gbb, m.name not in outside))
                out = gbb.emit_output(
                    self.expr(members[-1], local, gbb, members[-1].name not in outside)
                )
            gbb.emit_func_output(out)
        gv = bb.add_func(gbb.get()[fname], fname)
        emit = bb.emit_output if output else bb.emit
        return emit(relax.Call(gv, outer), name_hint=members[-1].name.replace(".", "_"))

    def function(
        self, bb: relax.BlockBuilder, fname: str, tenants: list[str], params: list[tuple[str, str]]
    ) -> None:
        """Emit `fname` computing `tenants`' outputs from `params` ((node, name) pairs)."""
        g = self.graph
        self.top = self.top or bb
        outputs = [o for t in tenants for o in g.tenants[t].outputs]
        live = g.live_nodes(tenants)
        bounds = graph_bounds(g)  # symbolic dims' size variables
        env = {}
        self.var_names[fname] = names = {}
        for node_name, pname in params:
            ty = g.node(node_name).ty
            assert isinstance(ty, TensorTy)
            env[node_name] = relax.Var(pname, relax_type(ty))
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
                        env[n.name] = bb.emit(
                            self.expr(n, env, bb), name_hint=n.name.replace(".", "_")
                        )
                    except Exception as e:
                        raise LoweringError(
                            f"tenant '{n.tenant}': cannot emit %{n.name} = "
                            f"{n.op}: {type(e).__name__}: {e}"
                        ) from e
                    names[n.name] = env[n.name].name
                    got = lift_type(env[n.name].ty, n.name, bounds)
                    if got != n.ty:
                        raise LoweringError(
                            f"tenant '{n.tenant}': %{n.name} = {n.op} has type "
                            f"{got} after emission, the graph says {n.ty}"
                        )
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
        fname = layout.functions[i]
        self.top = self.top or bb
        env: dict = {}
        self.var_names[fname] = names = {}
        params = self._stream_params(layout, i, env)
        exports, escaping = layout.exports[i], _escaping(layout, i)
        put: set[str] = set()
        with bb.function(fname, params, pure=False):
            for s, node_names in enumerate(layout.emission[i]):
                for e in layout.waits[i].get(s, ()):
                    bb.emit(_packed(WAIT, relax.prim_value(e)))
                self._emit_imports(bb, layout, i, node_names, env)
                if node_names:
                    with bb.dataflow():
                        for name in node_names:
                            env[name] = self._emit_node(
                                bb, fname, layout, name, env, name in escaping
                            )
                            names[name] = env[name].name
                _emit_puts(bb, layout, i, env, put)
                for e in layout.signals[i].get(s, ()):
                    bb.emit(_packed(SIGNAL, relax.prim_value(e)))
            missing = [x for x in exports if x not in put]
            if missing:
                raise LoweringError(
                    f"{fname}: values handed to other streams are computed "
                    f"by none of its stages: {missing}"
                )
            outs = bb.emit(relax.Tuple([self.arg(o, env) for o in layout.outputs[i]]))
            bb.emit_func_output(outs)
        self.stream_attrs[fname] = json.dumps(
            {  # arena.STREAM_ATTR: read by arena.realize
                "exports": {names[x]: layout.value_id[x] for x in exports}
            }
        )

    def _stream_params(self, layout: StreamLayout, i: int, env: dict) -> list[relax.Var]:
        """Stream `i`'s params: the shared arena storage, then a var per run_all input it
        reads (also bound in `env`)."""
        params = [relax.Var("mtcompile_arena", relax.ObjectType())]
        for node in layout.inputs[i]:
            ty = self.graph.node(node).ty
            env[node] = relax.Var(node.replace(".", "_"), relax_type(ty))
            params.append(env[node])
        return params

    def _emit_imports(
        self, bb: relax.BlockBuilder, layout: StreamLayout, i: int, node_names, env: dict
    ) -> None:
        """A ``get`` of each value of another stream that the stage's nodes read and that
        stream `i` has not got yet, bound in `env`."""
        imports = set(layout.imports[i])
        for r in dict.fromkeys(r for name in node_names for r in layout.reads(name)):
            if r in imports and r not in env:
                ty = self.graph.node(r).ty
                env[r] = bb.emit(
                    _packed(GET, relax.prim_value(layout.value_id[r]), ty=relax_type(ty)),
                    name_hint=f"import_{r.replace('.', '_')}",
                )

    def _emit_node(
        self,
        bb: relax.BlockBuilder,
        fname: str,
        layout: StreamLayout,
        name: str,
        env: dict,
        output: bool,
    ) -> relax.Var:
        """One node of a stream function (a fusion group's call for a group's last node),
        as an output of its dataflow block when `output`."""
        n = self.graph.node(name)
        if n.group is not None:
            return self.group(bb, f"{fname}_{n.group}", layout.groups[n.group], env, output)
        emit = bb.emit_output if output else bb.emit
        try:
            return emit(self.expr(n, env, bb), name_hint=name.replace(".", "_"))
        except Exception as e:
            raise LoweringError(
                f"tenant '{n.tenant}': cannot emit %{name} = {n.op}: {type(e).__name__}: {e}"
            ) from e


def _escaping(layout: StreamLayout, i: int) -> set[str]:
    """The values of stream `i` read outside the dataflow block that computes them (its
    exports, its outputs, those a later stage reads): they leave their block as outputs."""
    stages = layout.emission[i]
    stage_of = {name: s for s, names_ in enumerate(stages) for name in names_}
    escaping = {*layout.exports[i], *(o.name for o in layout.outputs[i] if isinstance(o, Ref))}
    escaping |= {
        r
        for s, names_ in enumerate(stages)
        for name in names_
        for r in layout.reads(name)
        if stage_of.get(r, s) != s
    }
    return escaping


def _emit_puts(
    bb: relax.BlockBuilder, layout: StreamLayout, i: int, env: dict, put: set[str]
) -> None:
    """A ``put`` of each value stream `i` hands to other streams once it is computed (each
    once: `put` keeps those done)."""
    for x in layout.exports[i]:
        if x in env and x not in put:
            put.add(x)
            bb.emit(_packed(PUT, relax.prim_value(layout.value_id[x]), env[x]))


def _expr(d):
    """An int as it is, a symbolic size (`Sym`) as its TVM expression."""
    return d.obj if isinstance(d, Sym) else d


def _divisor_message(graph: Graph, n) -> str:
    """What a failed divisor check of integer division `n` says: `DIVISION_CHECK`, then the
    tenant(s) and the inputs the divisor comes from."""
    owner = {node: (t, local) for t, io in graph.tenants.items() for local, node in io.inputs}
    names = [f"'{owner[i][1]}'" for i in divisor_inputs(graph, n) if i in owner]
    where = f"input{'s' if len(names) > 1 else ''} {', '.join(names)}" if names else "a value"
    who = ", ".join(f"'{t}'" for t in n.tenants)
    return (
        f"{DIVISION_CHECK} tenant{'s' if len(n.tenants) > 1 else ''} {who}, {where}: integer "
        f"division by zero: {n.op.removeprefix('relax.')} (%{n.name}) divides by a value of 0"
    )


def _index_message(graph: Graph, n, read: IndexRead) -> str:
    """What a failed bounds check of `read` says: `INDEX_CHECK`, then the tenant(s), the
    inputs the index comes from, and the valid range."""
    owner = {node: (t, local) for t, io in graph.tenants.items() for local, node in io.inputs}
    many = len(n.tenants) > 1
    names = [
        f"'{owner[i][0]}.{owner[i][1]}'" if many else f"'{owner[i][1]}'"
        for i in read.inputs
        if i in owner
    ]
    where = (
        f"input {names[0]}"
        if len(names) == 1
        else f"inputs {', '.join(names)}"
        if names
        else "a constant index"
        if isinstance(n.args[read.arg], ConstRef)
        else "an index computed inside the model"
    )
    who = (
        "tenants " + ", ".join(f"'{t}'" for t in n.tenants) if many else f"tenant '{n.tenants[0]}'"
    )
    verb = "writes" if "scatter" in n.op else "reads"

    def size(d) -> str:  # a symbolic extent by the dim names the user gave (batch, not t_batch)
        return str(d) if many else re.sub(rf"\b{re.escape(n.tenants[0])}_", "", str(d))

    bound, low = size(read.bound), size(read.low)
    return (
        f"{INDEX_CHECK} {who}, {where}: index out of range: {n.op.removeprefix('relax.')} "
        f"(%{n.name}) {verb} a table of {bound} rows along axis {read.axis}, so its "
        f"indices must be in [{low}, {bound})"
    )


def _size_vars(shape: tuple, low, bound) -> dict:
    """The size variables that the dims, `low` and `bound` use, by name, in order of use."""
    from tvm import tirx

    size_vars: dict[str, object] = {}
    for e in (*shape, low, bound):
        if not isinstance(e, int):
            for v in tirx.analysis.undefined_vars(e):
                size_vars.setdefault(v.name, v)
    return size_vars


def _check_header(
    shape: tuple, dims: list[str], dtype: str, size_vars: dict
) -> tuple[list[str], str, str, list]:
    """The index check's ``def`` and buffers: fixed-shape buffer args with no size variables;
    otherwise handles matched to buffers of the caller's expressions, a variable that is a
    dim of its own bound from the index's shape and the others as trailing scalar args.
    Returns its lines, the names of the index and output buffers, and those scalars."""
    from tvm import tirx

    if not size_vars:
        buf = f'T.Buffer(({", ".join(dims)},), "{dtype}")'
        return (
            [f"def check_index(a: {buf}, out: {buf}):", '    T.func_attr({"tirx.noalias": True})'],
            "a",
            "out",
            [],
        )
    # size variables are named <tenant>_<dim>, never mtcompile_* (a reserved prefix)
    plain = {d.name for d in shape if isinstance(d, tirx.Var)}
    scalars = [v for name, v in size_vars.items() if name not in plain]
    args = "".join(f", {v.name}: T.{v.ty.dtype}" for v in scalars)
    a, out = "mtcompile_a", "mtcompile_out"
    # TVM's order: inputs (the index, then scalars), then the output
    lines = [
        f"def check_index(mtcompile_pa: T.handle{args}, mtcompile_pout: T.handle):",
        '    T.func_attr({"tirx.noalias": True})',
    ]
    lines += [f"    {name} = T.{v.ty.dtype}()" for name, v in size_vars.items() if name in plain]
    lines += [
        f'    {b} = T.match_buffer({p}, ({", ".join(dims)},), "{dtype}")'
        for b, p in ((a, "mtcompile_pa"), (out, "mtcompile_pout"))
    ]
    return lines, a, out, scalars


def _bounds_check(shape: tuple, dtype: str, low, bound, message: str, nonzero: bool = False):
    """A PrimFunc copying an index tensor of `shape` (not 0-d) and `dtype` that asserts each
    value lies in [low, bound) (a failed assert raises `message` from the VM before any
    access), and the size variables it takes as trailing scalar arguments.

    Dims, `low` and `bound` are ints or, for symbolic (dynamic) sizes, TVM expressions of
    the caller's size variables: the loops then run over the index's actual extent and the
    range is the table's actual extent. The buffers keep the caller's expressions (TVM's
    FuseTIR maps a fused group's buffers by structure: ``(n * 16,)`` must stay ``n * 16``);
    a variable that is a dim of its own is bound from the index's shape, any other one
    comes in as a scalar argument (as TVM's legalized kernels take them)."""
    from tvm.script import from_source

    def text(e) -> str:
        return f"T.int64({e})" if isinstance(e, int) else " ".join(str(e).split())

    def limit(e) -> str:
        return f"T.{dtype}({e})" if isinstance(e, int) else f'T.Cast("{dtype}", {text(e)})'

    dims = [text(d) for d in shape]
    at = "[" + ", ".join(f"v{i}" for i in range(len(dims))) + "]"
    header, a, out, scalars = _check_header(shape, dims, dtype, _size_vars(shape, low, bound))
    lines = ["@T.prim_func(private=True, s_tir=True)", *header]
    pad = "    "
    for i, d in enumerate(dims):
        lines.append(f"{pad}for i{i} in range({d}):")
        pad += "    "
    lines.append(f'{pad}with T.sblock("check_index"):')
    pad += "    "
    # opaque, not spatial: schedules then leave the loops serial (a vectorized assert does
    # not compile, and the check is a few compares per index)
    lines += [f"{pad}v{i} = T.axis.opaque({d}, i{i})" for i, d in enumerate(dims)]
    lines += [
        f"{pad}T.reads({a}{at})",
        f"{pad}T.writes({out}{at})",
        f"{pad}assert {a}{at} != {limit(0)}, {message!r}"
        if nonzero  # a divisor check
        else f"{pad}assert {limit(low)} <= {a}{at} and {a}{at} < {limit(bound)}, {message!r}",
        f"{pad}{out}{at} = {a}{at}",
    ]
    return from_source("\n".join(lines)), scalars


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


def _input_ranges(module: Module) -> dict[str, tuple[int, int]]:
    """The inputs the runtime range-checks: the manifest's ranges, from the tenants' entries
    (an input several tenants read keeps the intersection of their ranges)."""
    ranges: dict[str, tuple[int, int]] = {}
    for t in module.functions[RUN_ALL].tenants:
        for node, (lo, hi) in input_index_ranges(module.functions[t]).items():
            old = ranges.get(node, (lo, hi))
            ranges[node] = (max(lo, old[0]), min(hi, old[1]))
    return ranges


def _attach_plans(
    mod: tvm.IRModule,
    module: Module,
    emitters: dict,
    streams: StreamLayout | None,
    memory: MemoryPlan | None,
) -> None:
    """Give each function with a memory plan (a stream function: run_all's) its arena attr,
    and each stream function its exports attr."""
    stream_fns = {f: RUN_ALL for f in (streams.functions if streams is not None else [])}
    plans = memory.functions if memory is not None else {}
    for fname, of in [*((f, f) for f in module.functions), *stream_fns.items()]:
        if of not in plans:
            continue
        em, gv = emitters[of], mod.get_global_var(fname)
        mod[gv] = mod[gv].with_attr(ATTR, json.dumps(_arena_attr(plans[of], em.var_names[fname])))
        if fname in em.stream_attrs:
            mod[gv] = mod[gv].with_attr(STREAM_ATTR, em.stream_attrs[fname])


def emit_module(
    ir: Graph | Module,
    manifest: dict | None = None,
    streams: StreamLayout | None = None,
    target: str = "llvm",
    memory: MemoryPlan | None = None,
) -> tvm.IRModule:
    """One IRModule: each function of the module (a tenant's entry takes its inputs and
    returns its outputs; ``run_all`` and a subset's function take their tenants' inputs
    and return their outputs in one flat tuple) and (optionally) the manifest entry. A
    `Graph` is emitted as the module of its tenants' entries and ``run_all``.

    With a `streams` layout, also one function per stream of ``run_all`` and
    ``run_all__arena`` (the storage they share). `memory`: the functions' memory plans
    (plan-memory's, merged by function; each planned function gets its arena). Gathers that the run-time input check does
    not cover get a bounds check in the kernel on llvm; on cuda they get none yet (a
    device-side assert neither schedules nor raises there).
    """
    module = Module.of(ir, RUN_ALL) if isinstance(ir, Graph) else ir
    consts: dict[str, relax.Expr] = {}
    bb = relax.BlockBuilder()
    ranges = _input_ranges(module)
    emitters = {}
    for fname, g in module.functions.items():
        em = emitters[fname] = _Emitter(g, consts, bb, ranges, target == "llvm")
        params = (
            [(node, local) for local, node in g.tenants[fname].inputs]
            if fname in g.tenants
            else [(node, "__".join(uses[0])) for node, uses in run_all_params(g)]
        )
        em.function(bb, fname, list(g.tenants), params)
    run_all = module.functions[RUN_ALL]
    if streams is not None:
        for i in range(len(streams.functions)):
            emitters[RUN_ALL].stream_function(bb, streams, i)
        _emit_arena(bb, memory)
    if manifest is not None:
        data = np.frombuffer(json.dumps(manifest, sort_keys=True).encode(), dtype=np.uint8)
        with bb.function(MANIFEST_FN, []):
            bb.emit_func_output(relax.const(data, dtype="uint8"))
    mod = with_var_bounds(bb.get(), graph_bounds(run_all))
    _attach_plans(mod, module, emitters, streams, memory)
    return mod


def _emit_arena(bb: relax.BlockBuilder, memory: MemoryPlan | None) -> None:
    """``run_all__arena``: the storage run_all's stream functions share, of the size of
    run_all's planned arena."""
    if memory is None or RUN_ALL not in memory.functions:
        raise LoweringError("a stream layout needs run_all's memory plan (the shared arena)")
    size = max(memory.functions[RUN_ALL].arena_bytes, 64)
    with bb.function(ARENA_FN, []):
        bb.emit_func_output(
            bb.emit(relax.op.memory.alloc_storage(relax.ShapeExpr([size]), 0, "global", "uint8"))
        )


def with_var_bounds(mod: tvm.IRModule, bounds: dict[str, tuple[int, int]]) -> tvm.IRModule:
    """Symbolic dims: every Relax function gets TVM's ``tir_var_lower/upper_bound`` attrs
    for the size variables it reads (TVM plans memory at the upper bounds) and its own
    copy of them (a size variable may be defined in one function only)."""
    if not bounds:
        return mod
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, relax.Function):
            continue
        used = {v.name for v in relax.analysis.defined_symbolic_vars(func)}
        if used & set(bounds):
            func = func.with_attr(
                "tir_var_lower_bound", {n: bounds[n][0] for n in used if n in bounds}
            )
            func = func.with_attr(
                "tir_var_upper_bound", {n: bounds[n][1] for n in used if n in bounds}
            )
            mod[gv] = relax.utils.copy_with_new_vars(func)
    return mod


def _arena_attr(plan, var_names: dict[str, str]) -> dict:
    """A function's memory plan keyed by the Relax var names lowering emitted."""
    slots = [s for s in plan.slots if s.tensor in var_names]
    return {
        "bytes": plan.arena_bytes,
        "alignment": plan.alignment,
        "strategy": plan.strategy,
        "offsets": {var_names[s.tensor]: s.offset for s in slots},
        "sizes": {var_names[s.tensor]: s.size for s in slots},
    }


def cpu_facts(target: str, cpu: str = HOST_CPU) -> tuple[str | None, tuple[str, ...] | None]:
    """The LLVM CPU name and feature names the manifest records for a build (None, None
    for cuda: its kernels run on the GPU, its host code is generic)."""
    if target != "llvm":
        return None, None
    from tvm.target import codegen

    return resolve_cpu(cpu), tuple(
        sorted(str(f).lstrip("+") for f in codegen.llvm_get_cpu_features(make_target(target, cpu)))
    )


def build(
    mod: tvm.IRModule,
    target: str,
    database=None,
    cpu: str = HOST_CPU,
    external_weights: bool = False,
):
    """Compile the module for `target` (its library call nodes are already emitted) and,
    on llvm, for `cpu` (`make_target`).

    Returns the executable and facts for the manifest (library calls over all entries;
    with `external_weights`, ``weights``: the constants the entries now take as trailing
    parameters and which function takes which, `mtcompile.backend.weights.lift`).
    """

    mod = kernels.prepare(mod)
    lifted = None
    if external_weights:
        from mtcompile.backend import weights

        mod, arrays, args = weights.lift(mod)
        lifted = (arrays, args)
    calls = library_calls(mod)
    if any(table.SYMBOLS[c].provider == "native" for c in calls):
        register_native()
    tgt = make_target(target, cpu)
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
    return executable, {"library_calls": len(calls), "memory": memory, "weights": lifted}


def register_native() -> None:
    """Register the native kernels as global functions, so that an executable `build` made
    runs in this process before it is saved (a saved library registers those linked into
    it). Compiling needs no kernel registered; the runtime registers PyTorch's
    (`mtcompile.runtime.library`) when a bundle that calls them makes its VMs."""
    from mtcompile import native

    native.register()


def library_calls(mod: tvm.IRModule) -> list[str]:
    """The library kernel calls the Relax functions of `mod` make, over all entries."""
    dps = tvm.ir.Op.get("relax.call_dps_packed")
    found: list[str] = []

    def visit(e) -> None:
        if (
            isinstance(e, relax.Call)
            and e.op.same_as(dps)
            and isinstance(e.args[0], relax.ExternFunc)
            and str(e.args[0].global_symbol) in table.SYMBOLS
        ):
            found.append(str(e.args[0].global_symbol))

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return found
