"""Realizing memory plans in TVM: after ``CallTIRRewrite`` every intermediate is an
``R.builtin.alloc_tensor``; here they become tensors at offsets in one
``R.memory.alloc_storage`` per function (through ``ensure_zero_offset``, which folds the
offset into the pointer).

A plain function is planned here, on the Relax TVM produced after its fusion: liveness
follows every alias (reshape views, tuples, the returned value) and the tensors are placed
greedy by size over it (`memory.place`), the planner `plan-memory` runs on the graph.

A stream function is the exception: its values handed to other streams must sit where the
graph plan put them in the arena the streams share. That plan is made on the kernels TVM
emits (`mtcompile.backend.emitted`), so it fits by construction; it is still checked
against the stream function's own liveness (cheap), and a plan that would let two live
tensors share a byte fails with an `ArenaError` naming them: a bug of the kernel model.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import numpy as np
import tvm
import tvm.sym
from tvm import relax

from mtcompile.abi import PUT
from mtcompile.analysis.memory import (
    Lifetime,
    Slot,
    lower_bound,
    overlap_problems,
    place_best,
    place_naive,
)
from mtcompile.errors import MTCompileError

ATTR = "mtcompile.arena"  # function attribute, JSON: {"bytes": arena size, "alignment",
# "offsets": {Relax var name: byte offset}, "sizes": {Relax var name: planned bytes}}
ERROR = "error"  # key of the stats dict that holds an ArenaError raised inside TVM
STREAM_ATTR = "mtcompile.stream"  # function attribute of a stream function (its event
# points are emitted by lowering), JSON: {"exports": {Relax var name: value id}}: the
# values it hands to other streams, which must be in the shared arena. A TVM pass may
# rename such a var (FuseOps names a fused group's result anew); its put keeps the id.
_ALLOC = "relax.builtin.alloc_tensor"
_STORAGE = "relax.memory.alloc_storage"


class ArenaError(MTCompileError):
    """A memory plan does not fit the module TVM produced."""


def _op_name(value) -> str | None:
    if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
        return value.op.name
    return None


def _nbytes(ty, upper: dict[str, int] | None = None) -> int:
    """Bytes of a tensor type; a symbolic dim at its upper bound (`upper`: the function's
    ``tir_var_upper_bound``), as the plan sized it."""
    return (
        int(np.prod([_at_bound(s, upper or {}) for s in ty.shape], dtype=np.int64))
        * np.dtype(str(ty.dtype)).itemsize
    )


def _at_bound(dim, upper: dict[str, int]) -> int:
    if isinstance(dim, tvm.tirx.IntImm | int):
        return int(dim)
    ana = tvm.sym.Analyzer()
    for v in tvm.tirx.analysis.undefined_vars(dim):
        if v.name not in upper:
            raise ArenaError(f"symbolic dim {dim} has no upper bound (tir_var_upper_bound)")
        ana.bind(v, tvm.tirx.const(upper[v.name], "int64"))
    return int(ana.simplify(dim))


def _upper(func: relax.Function) -> dict[str, int]:
    """The function's ``tir_var_upper_bound`` (empty when it has none)."""
    keys = func.attrs.keys() if func.attrs is not None else ()
    return (
        {str(k): int(v) for k, v in func.attrs["tir_var_upper_bound"].items()}
        if "tir_var_upper_bound" in keys
        else {}
    )


def _is_kernel_call(b) -> bool:
    """A call that writes into the tensors it is given (a TIR kernel, a library call) or
    a stream's event point (signal, wait, put, get): its result aliases none of its
    arguments. A packed function that returns a tensor (a VM builtin such as a reshape
    view) may return one of its arguments: it counts as an alias."""
    v = b.value
    if not isinstance(v, relax.Call):
        return False
    if isinstance(v.op, tvm.ir.GlobalVar):
        return True
    return isinstance(v.op, relax.ExternFunc) and not _holds_tensor(b.var.ty)


def _holds_tensor(ty) -> bool:
    if isinstance(ty, relax.TensorType):
        return True
    return isinstance(ty, relax.TupleType) and any(_holds_tensor(f) for f in ty.fields)


class Liveness(NamedTuple):
    """Per allocation (its var): first and last binding index that touches it through any
    alias, the names of the vars that alias it; the allocations the function returns (they
    leave any arena); per var, the allocations whose memory it may hold."""

    first: dict
    last: dict
    names: dict
    returned: set
    roots: dict


def liveness(func: relax.Function) -> Liveness:
    """The `Liveness` of `func`'s allocations."""
    bindings = [b for blk in func.body.blocks for b in blk.bindings]
    roots: dict = {}  # var -> the allocation vars whose memory it may hold
    first, last, names = {}, {}, {}
    for i, b in enumerate(bindings):
        if _op_name(b.value) == _ALLOC:
            roots[b.var] = {b.var}
            first[b.var], last[b.var], names[b.var] = i, i, {b.var.name}
            continue
        used = set()
        for v in relax.analysis.free_vars(b.value):
            used |= roots.get(v, set())
        for r in used:
            last[r] = i
        if used and not _is_kernel_call(b):
            roots[b.var] = used  # a view, tuple, item or copy of the name: an alias
            for r in used:
                names[r].add(b.var.name)
    returned = set()
    for v in relax.analysis.free_vars(func.body.body):
        returned |= roots.get(v, set())
    return Liveness(first, last, names, returned, roots)


def _figures(func, live, plan: dict, arena: int, placed, unplanned) -> dict:
    """A function's arena figures for the build's stats."""
    upper = _upper(func)
    return {
        "arena_bytes": arena,
        "graph_arena_bytes": int(plan["bytes"]),
        "planned_tensors": len(placed),
        "unplanned_tensors": len(unplanned),
        "unplanned_bytes": sum(_nbytes(v.ty, upper) for v in unplanned),
        "output_bytes": sum(_nbytes(v.ty, upper) for v in live.returned),
    }


def realize(
    func: relax.Function, fname: str, stats: dict, tvm_bytes: int | None = None
) -> relax.Function:
    """Place `func`'s intermediates in one storage; fill `stats[fname]`.

    A plain function is planned here, on its own liveness (`plan_on_tvm`); where TVM's own
    block reuse needs fewer bytes (`tvm_bytes`), the function keeps TVM's plan
    (``tvm_plan_kept``). A stream
    function (`STREAM_ATTR`, its event points already in place from lowering) keeps the
    graph plan's offsets, checked against that liveness, and takes its storage as its
    first parameter (one arena shared by all streams, made per run by ``run_all__arena``)."""
    plan = json.loads(str(func.attrs[ATTR]))
    live = liveness(func)
    if STREAM_ATTR in func.attrs.keys():
        placed, arena, problems = _graph_offsets(func, plan, live)
        if problems:
            _fail(
                stats,
                f"function '{fname}': the memory plan does not fit the module TVM "
                "produced (the kernel model missed something):\n  " + "\n  ".join(problems[:10]),
            )
        bound = None
    else:
        placed, arena, bound = plan_on_tvm(
            func, live, int(plan["alignment"]), plan.get("strategy", "greedy")
        )
    unplanned = [v for v in live.first if v not in placed and v not in live.returned]
    stats[fname] = _figures(func, live, plan, arena, placed, unplanned)
    if bound is not None:
        stats[fname]["lower_bound_bytes"] = bound
    keep_tvm = (
        bound is not None
        and plan.get("strategy", "greedy") == "greedy"
        and tvm_bytes is not None
        and tvm_bytes < arena
    )
    stats[fname]["tvm_plan_kept"] = int(keep_tvm)
    if keep_tvm:  # TVM's block reuse fits in fewer bytes here: it plans the function
        stats[fname].update(
            arena_bytes=tvm_bytes, planned_tensors=0, unplanned_tensors=len(placed) + len(unplanned)
        )
        return func
    return _rewrite(func, placed, arena, streamed=bound is None)


def plan_on_tvm(
    func: relax.Function, live: Liveness, alignment: int, strategy: str = "greedy"
) -> tuple[dict, int, int]:
    """Offsets for every intermediate `func` allocates (returned tensors leave the arena),
    over its liveness in binding order: (alloc var -> (offset, bytes), arena bytes, lower
    bound). `strategy`: ``greedy`` (by size, best fit) or ``naive`` (no reuse)."""
    upper = _upper(func)
    by_name, lives = {}, []
    for i, var in enumerate(v for v in live.first if v not in live.returned):
        name = f"{var.name}#{i}"  # Relax names need not be unique
        by_name[name] = var
        lo, hi = live.first[var], live.last[var]
        lives.append(Lifetime(name, "", _nbytes(var.ty, upper), lo, hi, (hi,) if hi > lo else ()))
    slots, arena = (
        place_best(lives, alignment) if strategy == "greedy" else place_naive(lives, alignment)
    )
    n = max((lt.last for lt in lives), default=0) + 1
    return ({by_name[s.tensor]: (s.offset, s.size) for s in slots}, arena, lower_bound(lives, n))


def _graph_offsets(func: relax.Function, plan: dict, live: Liveness) -> tuple[dict, int, list[str]]:
    """The graph plan's offsets for `func`'s allocations (alloc var -> (offset, bytes)),
    its arena size, and what is wrong with them against `func`'s own liveness."""
    offsets = plan["offsets"]
    first, last, names, returned, roots = live
    names = {v: set(ns) for v, ns in names.items()}
    handed = {}  # alloc var -> the names lowering gave the values handed over from it
    if STREAM_ATTR in func.attrs.keys():  # a put names its value by id, which no TVM pass renames
        exported = {
            int(v): n for n, v in json.loads(str(func.attrs[STREAM_ATTR]))["exports"].items()
        }
        for arg, vid in _puts(func):
            for var in roots.get(arg, ()):
                names[var].add(exported[vid])
                handed.setdefault(var, []).append(exported[vid])
    placed, problems = {}, []
    for var in first:
        hits = sorted(n for n in names[var] if n in offsets)
        if hits and var not in returned:
            placed[var] = (int(offsets[hits[0]]), _nbytes(var.ty, _upper(func)))
            if len({offsets[n] for n in hits}) > 1:
                problems.append(
                    f"{' and '.join(hits)} are one tensor in TVM's Relax, the "
                    f"plan gives them offsets {[offsets[n] for n in hits]}"
                )
    problems += _check(placed, first, last, plan, names)
    # a value handed over outside the arena: TVM's own plan could reuse its bytes while
    # another stream still reads it
    problems += [
        f"{n}: handed to other streams but not in the shared arena"
        for v, ns in handed.items()
        if v not in placed and v not in returned
        for n in ns
    ]
    return placed, int(plan["bytes"]), problems


def _rewrite(func: relax.Function, placed: dict, arena: int, streamed: bool) -> relax.Function:
    """`func` with each placed allocation a tensor at its offset in one storage (a stream
    function's first parameter, else an ``alloc_storage`` of its own)."""
    if not placed:
        return func
    if streamed:
        storage, new = func.params[0], []
    else:
        storage = relax.Var("mtcompile_arena", relax.ObjectType())
        new = [
            relax.VarBinding(
                storage,
                relax.op.memory.alloc_storage(
                    relax.ShapeExpr([max(arena, 64)]), 0, "global", "uint8"
                ),
            )
        ]
    for blk in func.body.blocks:
        for b in blk.bindings:
            if b.var not in placed:
                new.append(b)
                continue
            offset, _ = placed[b.var]
            raw = relax.Var(b.var.name + "_at", b.var.ty)
            new.append(
                relax.VarBinding(
                    raw,
                    relax.op.memory.alloc_tensor(
                        storage, offset, b.value.args[0], str(b.var.ty.dtype)
                    ),
                )
            )
            new.append(relax.VarBinding(b.var, relax.op.memory.ensure_zero_offset(raw)))
    body = relax.SeqExpr([relax.BindingBlock(new)], func.body.body)
    return relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs)


def _puts(func: relax.Function) -> list[tuple[relax.Expr, int]]:
    """(the value handed over, its id) of every ``put`` event point of `func`."""
    return [
        (b.value.args[1], int(b.value.args[0].value))
        for blk in func.body.blocks
        for b in blk.bindings
        if isinstance(b.value, relax.Call)
        and isinstance(b.value.op, relax.ExternFunc)
        and str(b.value.op.global_symbol) == PUT
    ]


def _fail(stats: dict, message: str) -> None:
    stats[ERROR] = message  # TVM turns the error into a RuntimeError; build re-raises this
    raise ArenaError(message)


def _check(placed: dict, first: dict, last: dict, plan: dict, names: dict) -> list[str]:
    """What is wrong with `placed` (alloc var -> (offset, bytes TVM allocates)) against
    the Relax's own liveness (binding indices): a tensor TVM allocates more bytes for than
    the plan gives, and what `memory.overlap_problems` finds (two tensors live together
    sharing a byte, a misaligned offset, bytes outside the arena)."""
    sizes = plan["sizes"]
    problems, lives, slots = [], [], []
    for var, (off, n) in placed.items():
        name = min(x for x in names[var] if x in sizes)
        if n > sizes[name]:
            problems.append(f"{name}: TVM allocates {n} bytes, the plan gives {sizes[name]}")
        lo, hi = first[var], last[var]
        lives.append(Lifetime(name, "", n, lo, hi, (hi,) if hi > lo else ()))
        slots.append(Slot(name, "", n, off, lo, hi))
    return problems + overlap_problems(slots, lives, int(plan["bytes"]), int(plan["alignment"]))


def storage_bytes(func: relax.Function) -> int:
    """Bytes of every ``alloc_storage`` in `func` (what a function plans to hold)."""
    total = 0
    for blk in func.body.blocks:
        for b in blk.bindings:
            if _op_name(b.value) == _STORAGE:
                shape = b.value.args[0]
                total += int(np.prod([int(v) for v in shape.values], dtype=np.int64))
    return total


def realize_pass(stats: dict):
    """Module pass: realize every function's plan; record per function what TVM's own
    ``StaticPlanBlockMemory`` would plan (``tvm_plan_bytes``) beside ours."""

    @tvm.transform.module_pass(opt_level=0, name="mtcompile.RealizeArena")
    def _realize(mod, _ctx):
        tvm_plan = relax.transform.StaticPlanBlockMemory()(mod)
        out = mod
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function) or "global_symbol" not in (
                func.attrs.keys() if func.attrs is not None else ()
            ):
                continue  # private helpers: not an entry
            name = gv.name_hint
            if ATTR in func.attrs.keys():
                out[gv] = realize(func, name, stats, storage_bytes(tvm_plan[gv]))
            else:
                live = liveness(func)
                left = [v for v in live.first if v not in live.returned]
                stats[name] = {
                    "arena_bytes": 0,
                    "planned_tensors": 0,
                    "unplanned_tensors": len(left),
                    "unplanned_bytes": sum(_nbytes(v.ty, _upper(func)) for v in left),
                    "output_bytes": sum(_nbytes(v.ty, _upper(func)) for v in live.returned),
                }
            stats[name]["tvm_plan_bytes"] = storage_bytes(tvm_plan[gv])
        return out

    return _realize
