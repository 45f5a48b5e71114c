"""The kernel model, read off what TVM emits: a function of our graph -> the kernels TVM runs
after its fusion, in order, as a `KernelDAG` over graph nodes (what stream assignment,
memory planning, stream lowering and the pictures work on).

The function is emitted as the build emits it (lowering's `_Emitter`), then goes through
the build's own passes up to where arena.py realizes plans (`kernels.prepare`, the weights
lifted, `kernels.relax_prefix`: legalize, FuseOps, FuseTIR, ``CallTIRRewrite``). Every TIR
or library call is a kernel; reshape views, tuples and items are aliases (arena.py's
`liveness` follows them). A kernel's result is the graph node whose Relax name its output
carries; where FuseOps named a fused result anew, it is the node the fused group computes
from what the kernel reads (the names TVM kept inside the fused function must be part of
it). A kernel's nodes are its result and every node folded into it: those its result
depends on that no other kernel writes and that are not views or constants.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import tvm
import tvm_ffi
from tvm import relax

from mtcompile.analysis.schedule import (
    Kernel,
    KernelDAG,
    constant_only,
    tenants_return,
    tensors_of,
)
from mtcompile.backend import arena, kernels, weights
from mtcompile.backend.lowering import _Emitter, make_target, with_var_bounds
from mtcompile.backend.stream_layout import run_all_params
from mtcompile.errors import MTCompileError
from mtcompile.ir.graph import INPUT, TUPLE, Graph, TensorTy
from mtcompile.ir.relax_types import graph_bounds
from mtcompile.native import table

FNAME = "mtcompile_model"  # the function emitted for the analysis
CACHE_SIZE = 8  # kernel DAGs kept (a build asks a few times per function)
# (graph text and constants' types, tenants, target) -> KernelDAG: by content, so that
# functions with equal graphs (a one-tenant module's entry and run_all) share one
_cache: OrderedDict = OrderedDict()


def forget() -> None:
    """Drop the cached DAGs."""
    _cache.clear()


def _content_key(graph: Graph, tenants: list[str], target: str) -> tuple:
    """What the kernels depend on: the graph as printed (nodes, tenants' inputs and
    outputs, constants by content key) and the constants' dtypes and shapes."""
    consts = sorted((k, str(a.dtype), a.shape) for k, a in graph.constants.items())
    text = str(graph) + repr(consts)
    return (hashlib.sha256(text.encode()).hexdigest(), tuple(tenants), target)


def kernel_dag(graph: Graph, tenants: list[str] | None = None, target: str = "llvm") -> KernelDAG:
    """The kernels TVM emits for `tenants`' outputs (all tenants: ``run_all``) on `target`,
    in the order they run. Cached by content (`_content_key`)."""
    tenants = list(graph.tenants) if tenants is None else list(tenants)
    key = _content_key(graph, tenants, target)
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    func, inner, names = fused_function(graph, tenants, target)
    dag = _Reader(graph, tenants, func, inner, names).dag()
    _cache[key] = dag
    while len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return dag


def fused_function(
    graph: Graph, tenants: list[str], target: str = "llvm"
) -> tuple[relax.Function, dict[str, set[str]], dict[str, str]]:
    """`tenants`' function as TVM has it where arena.py realizes plans; per result FuseOps
    named anew (its Relax name) the graph nodes fused into it; Relax name -> node
    (lowering's names, and the names FuseOps gave fused results, traced back)."""
    bb = relax.BlockBuilder()
    em = _Emitter(graph, {}, bb, checks=False)
    params = [
        (node, "__".join(uses[0]))
        for node, uses in run_all_params(graph)
        if any(t in tenants for t, _ in uses)
    ]
    em.function(bb, FNAME, tenants, params)
    mod = kernels.prepare(with_var_bounds(bb.get(), graph_bounds(graph)))
    mod = weights.lift(mod)[0]
    tgt = make_target(target)
    passes = kernels.relax_prefix(tgt)
    cut = next(i for i, p in enumerate(passes) if p.info.name == "FuseOps")
    by_name = {v: k for k, v in em.var_names[FNAME].items()}
    with tgt:
        pre = tvm.transform.Sequential(passes[:cut])(mod)
        fused = passes[cut](pre)
        final = tvm.transform.Sequential(passes[cut + 1 :])(fused)
    traced, inner = _traced(graph, pre, fused, by_name)
    return final[FNAME], inner, {**by_name, **traced}


def _primitive(mod: tvm.IRModule) -> list:
    return [
        (gv, f)
        for gv, f in mod.functions_items()
        if isinstance(f, relax.Function) and f.attrs is not None and "Primitive" in f.attrs
    ]


def _key(e, name) -> tuple:
    """A call's identity: callee and arguments (vars by `name`, the rest by structure)."""
    if isinstance(e, relax.Var):
        return name(e)
    if isinstance(e, relax.Tuple):
        return ("t", *(_key(f, name) for f in e.fields))
    if isinstance(e, relax.Call):
        op = e.op.name_hint if isinstance(e.op, tvm.ir.GlobalVar) else str(e.op)
        return ("c", op, *(_key(a, name) for a in e.args))
    return ("x", tvm_ffi.structural_hash(e))


def _plain(v) -> tuple:
    return ("v", v.name)


def _traced(graph: Graph, before: tvm.IRModule, fused: tvm.IRModule, by_name) -> tuple:
    """Relax name FuseOps gave a fused result -> the node it computes, and -> the nodes
    fused into it: each binding of the fused function is matched, call by call (FuseOps
    shares one function between equal groups), to the binding before FuseOps it copies (a
    name of ours, or a temporary TVM made that a named binding reads in place of a node)."""
    pre = before[FNAME]
    calls = {_key(b.value, _plain): b.var.name for b in _bindings(pre)}
    made = {gv: f for gv, f in _primitive(fused) if not _has(before, gv.name_hint)}
    renamed: dict[str, str] = {}  # fused result name -> name before FuseOps
    inner: dict[str, set[str]] = {}  # fused result name -> nodes fused into it
    for b in _bindings(fused[FNAME]):
        v = b.value
        if not isinstance(v, relax.Call) or v.op not in made:
            continue
        f = made[v.op]
        local = _trace_call(f, v.args, calls, renamed)
        out = local.pop(f.body.body.name, None) if isinstance(f.body.body, relax.Var) else None
        if out is not None:
            renamed[b.var.name] = out
        inner[b.var.name] = {by_name[x] for x in local.values() if x in by_name}
    temps = _temporaries(graph, pre, by_name)
    names = {
        post: by_name.get(was) or temps[was]
        for post, was in renamed.items()
        if was in by_name or was in temps
    }
    return names, inner


def _trace_call(f: relax.Function, args, calls: dict, renamed: dict) -> dict[str, str]:
    """Per binding of fused function `f` called with `args`: the name before FuseOps of
    the binding it copies (those found)."""
    env = {p.name: a for p, a in zip(f.params, args, strict=False)}
    local: dict[str, str] = {}

    def name(x):
        if x.name in local:
            return ("v", local[x.name])
        outer = env.get(x.name)
        if outer is None:
            return _plain(x)
        if isinstance(outer, relax.Var):
            return ("v", renamed.get(outer.name, outer.name))
        return _key(outer, _plain)

    for x in _bindings(f):
        found = calls.get(_key(x.value, name))
        if found is not None:
            local[x.var.name] = found
    return local


def _has(mod: tvm.IRModule, name: str) -> bool:
    return any(gv.name_hint == name for gv in mod.get_global_vars())


def _temporaries(graph: Graph, pre: relax.Function, by_name) -> dict[str, str]:
    """A temporary TVM bound (a decomposed batch-norm's result) -> the node it stands for:
    the one input of a node bound by name that has no binding of its own any more."""
    bound = {b.var.name for b in _bindings(pre)}
    out = {}
    for b in _bindings(pre):
        node = by_name.get(b.var.name)
        if node is None:
            continue
        gone = [i for i in _outside_inputs(graph, node) if _relax_name(i, by_name) not in bound]
        temps = [v.name for v in relax.analysis.free_vars(b.value) if v.name not in by_name]
        temps = [t for t in temps if t in bound]
        if len(gone) == 1 and len(temps) == 1:
            out[temps[0]] = gone[0]
    return out


def _outside_inputs(graph: Graph, node: str) -> list[str]:
    """What emitting `node` reads: for a fusion group's last node, the group's inputs."""
    n = graph.node(node)
    if n.group is None:
        return list(n.inputs)
    members = {m.name for m in graph.nodes if m.group == n.group}
    ins = [i for m in graph.nodes if m.name in members for i in m.inputs]
    return [i for i in dict.fromkeys(ins) if i not in members]


def _relax_name(node: str, by_name) -> str | None:
    return next((r for r, n in by_name.items() if n == node), None)


def _bindings(func: relax.Function) -> list:
    return [b for blk in func.body.blocks for b in blk.bindings]


@dataclass
class _Call:
    """A kernel call of the Relax: its binding index, callee, what it reads and writes."""

    index: int
    callee: str
    library: bool
    reads: list  # Relax vars (and constants) it reads
    writes: list  # the allocations it writes
    result: list[str] = field(default_factory=list)  # graph nodes of `writes`


class _Reader:
    """Reads a `KernelDAG` over `graph`'s nodes off `func` (see the module's docstring)."""

    def __init__(self, graph, tenants, func, inner: dict[str, set[str]], names: dict[str, str]):
        self.graph, self.tenants, self.func, self.inner = graph, tenants, func, inner
        self.live = graph.live_nodes(tenants)
        self.const = constant_only(graph)
        self.by_name = {r: n for r, n in names.items() if n in self.live}
        self.liveness = arena.liveness(func)
        self.param_node = {
            p.name: n for p, n in zip(func.params, self._param_nodes(), strict=False)
        }
        self.calls = self._calls()
        self.copies = self._copies()
        self.var_of = {
            self.by_name[b.var.name]: b.var for b in _bindings(func) if b.var.name in self.by_name
        }
        self.node_of: dict = {}  # alloc var -> the graph node it holds

    def _param_nodes(self) -> list[str]:
        return [
            node
            for node, uses in run_all_params(self.graph)
            if any(t in self.tenants for t, _ in uses)
        ]

    def _calls(self) -> list[_Call]:
        """The kernel calls in order, each with the allocations it writes first."""
        written: set = set()
        out = []
        for i, b in enumerate(_bindings(self.func)):
            if arena._op_name(b.value) == arena._ALLOC or not arena._is_kernel_call(b):
                continue
            op = b.value.op
            args = list(b.value.args)
            if isinstance(op, relax.ExternFunc):
                callee, library = str(op.global_symbol), str(op.global_symbol) in table.SYMBOLS
            else:
                callee, library = op.name_hint, False
            allocs = [r for a in args for r in sorted(self._roots(a), key=str) if r not in written]
            written.update(allocs)
            reads = [a for a in args if not (self._roots(a) & set(allocs))]
            out.append(_Call(i, callee, library, reads, allocs))
        return out

    def _roots(self, e) -> set:
        roots: set = set()
        for v in relax.analysis.free_vars(e) if not isinstance(e, relax.Var) else [e]:
            roots |= self.liveness.roots.get(v, set())
        return roots

    def dag(self) -> KernelDAG:
        """Results, then each kernel's reads and nodes, in the order TVM runs them."""
        self._resolve_named()
        for c in self.calls:
            if not c.result:
                c.result = [self._fused_result(c)]
            if len(c.result) == 1:  # one node for all it writes: a tuple (split's parts)
                self.node_of.update({alloc: c.result[0] for alloc in c.writes})
            for alloc, node in zip(c.writes, c.result, strict=False):
                self.node_of[alloc] = node
        return self._assemble()

    def _resolve_named(self) -> None:
        for c in self.calls:
            found = [self._named(a) for a in c.writes]
            if all(found):
                c.result = found
            elif len(c.writes) > 1 and (whole := self._tuple_named(c)) is not None:
                c.result = [whole]

    def _tuple_named(self, c: _Call) -> str | None:
        """The tuple-valued node (``split``) a kernel writing several tensors computes: the
        one whose Relax var is bound to the tuple of exactly those tensors."""
        for b in _bindings(self.func):
            if isinstance(b.value, relax.Tuple) and b.var.name in self.by_name:
                if self._roots(b.value) == set(c.writes):
                    return self.by_name[b.var.name]
        return None

    def _named(self, alloc) -> str | None:
        """The node whose name a var bound to `alloc` itself carries (not a view of it)."""
        hits = sorted(n for n in self.copies.get(alloc, ()) if n in self.by_name)
        return self.by_name[hits[0]] if hits else None

    def _names(self, alloc) -> list[str]:
        return self.copies.get(alloc, [])

    def _copies(self) -> dict:
        """alloc var -> names of the vars bound to it as it is (``lv = alloc``, chains)."""
        of: dict = {v: v for v in self.liveness.first}
        out: dict = {}
        for b in _bindings(self.func):
            if isinstance(b.value, relax.Var) and b.value in of:
                of[b.var] = of[b.value]
                out.setdefault(of[b.value], []).append(b.var.name)
        return out

    def _tensors(self, e) -> list[str]:
        """The graph tensors (kernel results, inputs) Relax expression `e` may hold."""
        out = [self.node_of[r] for r in sorted(self._roots(e), key=str) if r in self.node_of]
        vs = [e] if isinstance(e, relax.Var) else relax.analysis.free_vars(e)
        out += [self.param_node[v.name] for v in vs if v.name in self.param_node]
        return list(dict.fromkeys(out))

    def _fused_result(self, c: _Call) -> str:
        """The node a kernel whose result FuseOps renamed computes: of the nodes no Relax
        name claims, the one computed from `c`'s reads alone that folds in every node
        TVM kept the name of inside the kernel, with the fewest nodes folded in."""
        reads = {t for a in c.reads for t in self._tensors(a)}
        must = set().union(*(self.inner.get(n, set()) for a in c.writes for n in self._names(a)))
        claimed = set(self.var_of).union(*self.inner.values())
        best = None
        for n in self.graph.nodes:
            if n.name not in self.live or n.name in claimed or n.name in self.const:
                continue
            if n.op in (INPUT, TUPLE) or (len(c.writes) == 1 and not isinstance(n.ty, TensorTy)):
                continue  # a tuple-valued node (split) writes several tensors
            folded = self._folded(n.name, reads, claimed - must)
            if folded is not None and must <= folded and (best is None or len(folded) < best[0]):
                best = (len(folded), n.name)
        if best is None:  # it writes a value lowering made inside a node's expansion (a
            # float16 mean's float32 cast): the last node TVM kept the name of inside it
            inside = [n.name for n in self.graph.nodes if n.name in must and n.name in self.live]
            best = (0, inside[-1]) if inside else None
        if best is None:
            raise MTCompileError(
                f"the kernel model: TVM's kernel {c.callee} (binding {c.index}) writes a "
                f"tensor no node of tenants {self.tenants} computes from what it reads "
                f"({sorted(reads)})"
            )
        return best[1]

    def _folded(self, name: str, reads: set[str], stops: set[str]) -> set[str] | None:
        """The nodes computing `name` from `reads` and constants (None if it needs more)."""
        seen, stack = set(), [name]
        while stack:
            x = stack.pop()
            if x in seen or x in reads or x in self.const:
                continue
            n = self.graph.node(x)
            if n.op == INPUT or (x in stops and x != name and not self._views(x, reads)):
                return None
            seen.add(x)
            stack.extend(n.inputs)
        return seen

    def _views(self, name: str, reads: set[str]) -> bool:
        """Whether node `name` is bound in the Relax as an alias (a view, tuple or item)
        of kernel results among `reads` or of inputs."""
        var = self.var_of.get(name)
        if var is None:
            return False
        roots = self.liveness.roots.get(var, set())
        held = self._tensors(var)
        return all(r in self.node_of for r in roots) and bool(held) and set(held) <= reads

    def _assemble(self) -> KernelDAG:
        names: list[str] = []
        for c in self.calls:  # a kernel is named by its fusion group, else by its result
            group = self.graph.node(c.result[0]).group
            names.append(group if group and group not in names else c.result[0])
        if len(set(names)) < len(names):
            raise MTCompileError(
                f"the kernel model: two of TVM's kernels for tenants {self.tenants} write one "
                f"node: {sorted(n for n in names if names.count(n) > 1)}"
            )
        results = {n: names[i] for i, c in enumerate(self.calls) for n in c.result}
        alias = self._aliases(results)
        assigned: set[str] = set()
        out, deps = [], {}
        for i, c in enumerate(self.calls):
            name = names[i]
            nodes = self._members(c.result, results, alias, assigned)
            reads = [t for a in c.reads for t in self._tensors(a)]
            reads = list(dict.fromkeys(reads + self._graph_reads(nodes, results, alias)))
            alias.update({n: c.result[0] for n in nodes if n not in alias})
            tail = self.graph.node(c.result[0])
            kind = "library" if c.library else "tvm"
            tensor = tail.name if isinstance(tail.ty, TensorTy) else None  # None: a tuple
            nbytes = tail.ty.nbytes if tensor else 0
            out.append(Kernel(name, nodes, kind, tail.tenants, tuple(reads), tensor, nbytes))
            deps[name] = tuple(dict.fromkeys(results[r] for r in reads if r in results))
        outputs = frozenset(
            t
            for name in self.graph.output_names()
            if name in self.live and tenants_return(self.graph, self.tenants, name)
            for t in tensors_of(self.graph, name, alias)
        )
        return KernelDAG(tuple(out), deps, alias, outputs)

    def _graph_reads(self, nodes: tuple, results, alias) -> list[str]:
        """The tensors the graph says `nodes` read from outside them: TVM may simplify a
        read away (a product by zero), but emitting the nodes again still needs it."""
        inside, out = set(nodes), []
        for x in nodes:
            for i in self.graph.node(x).inputs:
                if i in inside or i in self.const:
                    continue
                for t in tensors_of(self.graph, i, alias):
                    if t in results or self.graph.node(t).op == INPUT:
                        out.append(t)
        return out

    def _aliases(self, results: dict[str, str]) -> dict[str, str]:
        """node -> the tensor holding its value, for nodes Relax binds as aliases (views)."""
        alias = {}
        for b in _bindings(self.func):
            node = self.by_name.get(b.var.name)
            if node is None or node in results or arena._is_kernel_call(b):
                continue
            held = self._tensors(b.var)
            if len(held) == 1 and isinstance(self.graph.node(node).ty, TensorTy):
                alias[node] = held[0]
        return alias

    def _members(self, result: list[str], results, alias, assigned: set[str]) -> tuple:
        """The nodes a kernel computes: its results and what is folded into them."""
        seen, stack = set(), list(result)
        while stack:
            x = stack.pop()
            if x in seen or x in assigned or x in self.const:
                continue
            n = self.graph.node(x)
            if n.op == INPUT or (x not in result and (x in results or x in alias)):
                continue
            seen.add(x)
            stack.extend(n.inputs)
        assigned |= seen
        return tuple(n.name for n in self.graph.nodes if n.name in seen and n.op != TUPLE)
