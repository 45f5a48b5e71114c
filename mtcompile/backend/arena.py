"""Realizing a memory plan in TVM: after ``CallTIRRewrite`` every intermediate is an
``R.builtin.alloc_tensor``; the planned ones become tensors at their offsets in one
``R.memory.alloc_storage`` per function (through ``ensure_zero_offset``, which folds the
offset into the pointer). TVM's ``StaticPlanBlockMemory`` still plans what is left.

The plan was made on our graph; here it meets the Relax TVM really produced. Liveness is
recomputed on that Relax (following every alias: reshape views, tuples, the returned
value), and a plan that would let two live tensors share a byte, or give a tensor fewer
bytes than TVM allocates, is refused with an error instead of computing wrong numbers.
"""

from __future__ import annotations

import json

import numpy as np
import tvm
from tvm import relax

from mtcompile.errors import MTCompileError
from mtcompile.runtime.executor import GET, PUT, SIGNAL, WAIT

ATTR = "mtcompile.arena"  # function attribute, JSON: {"bytes": arena size,
# "offsets": {Relax var name: byte offset}, "sizes": {Relax var name: planned bytes}}
ERROR = "error"  # key of the stats dict that holds an ArenaError raised inside TVM
STREAM_ATTR = "mtcompile.stream"  # function attribute of a stream function, JSON:
# {"imports": {param name: value id}, "outputs": how many of the returned tuple's fields
# are tenant outputs, "exports": [[value id, stage]] for the rest, "launches": TVM kernel
# launches per stage (a stage: one kernel of the stream, in order; a last one may hold the
# outputs' views), "num_stages", "waits"/"signals": {stage: [event ids]} (waited for
# before the stage, signalled after it)}
_ALLOC = "relax.builtin.alloc_tensor"
_STORAGE = "relax.memory.alloc_storage"


class ArenaError(MTCompileError):
    """A memory plan does not fit the module TVM produced."""


def _op_name(value) -> str | None:
    if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
        return value.op.name
    return None


def _nbytes(ty) -> int:
    return int(np.prod([int(s) for s in ty.shape], dtype=np.int64)) * np.dtype(
        str(ty.dtype)).itemsize


def _is_kernel_call(b) -> bool:
    """A call that writes into the tensors it is given (a TIR kernel, a library call)."""
    v = b.value
    return isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.GlobalVar | relax.ExternFunc)


def liveness(func: relax.Function) -> tuple[dict, dict, dict, set]:
    """For each allocation (its var): first and last binding index that touches it through
    any alias, the names of the vars that alias it, and the allocations the function
    returns (they leave any arena)."""
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
    return first, last, names, returned


def realize(func: relax.Function, fname: str, stats: dict) -> relax.Function:
    """Place `func`'s planned allocations in one storage; fill `stats[fname]`.

    A stream function (`STREAM_ATTR`) first gets its event points (`_with_events`), and
    its storage is its first parameter (one arena shared by all streams, made per run by
    ``run_all__arena``) instead of an ``alloc_storage`` of its own."""
    streamed = STREAM_ATTR in func.attrs.keys()
    if streamed:
        func = _with_events(func, fname, json.loads(str(func.attrs[STREAM_ATTR])))
    plan = json.loads(str(func.attrs[ATTR]))
    offsets, arena = plan["offsets"], int(plan["bytes"])
    first, last, names, returned = liveness(func)
    placed = {}  # alloc var -> (offset, bytes)
    for var in first:
        hits = [offsets[n] for n in names[var] if n in offsets]
        if hits and var not in returned:
            placed[var] = (int(hits[0]), _nbytes(var.ty))
    problems, offenders = _check(placed, first, last, arena, plan["sizes"], names)
    if problems and streamed:  # other streams rely on these offsets: no repair
        stats[ERROR] = (f"function '{fname}': the memory plan does not fit the module TVM "
                        "produced:\n  " + "\n  ".join(problems[:10]))
        raise ArenaError(stats[ERROR])  # TVM turns it into RuntimeError; build re-raises
    for var in offenders:  # left to TVM's own plan: never two live tensors in one byte
        del placed[var]
    unplanned = [v for v in first if v not in placed and v not in returned]
    stats[fname] = {"arena_bytes": arena, "planned_tensors": len(placed),
                    "unplanned_tensors": len(unplanned),
                    "unplanned_bytes": sum(_nbytes(v.ty) for v in unplanned),
                    "output_bytes": sum(_nbytes(v.ty) for v in returned),
                    "mismatched_tensors": len(offenders)}
    if problems:
        stats.setdefault("mismatches", {})[fname] = problems[:10]
    if streamed:
        exported = {b.value.args[1] for blk in func.body.blocks for b in blk.bindings
                    if isinstance(b.value, relax.Call) and isinstance(b.value.op, relax.ExternFunc)
                    and str(b.value.op.global_symbol) == PUT}
        lost = [n for v in first if v not in placed and v not in returned
                for n in [sorted(names[v])[-1]] if names[v] & {x.name for x in exported}]
        if lost:  # TVM's own plan could reuse its bytes while another stream reads it
            raise ArenaError(f"function '{fname}': values handed to other streams are not in "
                             f"the shared arena: {lost}")
    if not placed:
        return func
    if streamed:
        storage, new = func.params[0], []
    else:
        storage = relax.Var("mtcompile_arena", relax.ObjectType())
        new = [relax.VarBinding(storage, relax.op.memory.alloc_storage(
            relax.ShapeExpr([arena]), 0, "global", "uint8"))]
    for blk in func.body.blocks:
        for b in blk.bindings:
            if b.var not in placed:
                new.append(b)
                continue
            offset, _ = placed[b.var]
            raw = relax.Var(b.var.name + "_at", b.var.ty)
            new.append(relax.VarBinding(raw, relax.op.memory.alloc_tensor(
                storage, offset, b.value.args[0], str(b.var.ty.dtype))))
            new.append(relax.VarBinding(b.var, relax.op.memory.ensure_zero_offset(raw)))
    body = relax.SeqExpr([relax.BindingBlock(new)], func.body.body)
    return relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs)


_NONE = relax.TupleType([])


def _packed(name: str, *args, ty=_NONE) -> relax.Call:
    return relax.Call(relax.ExternFunc(name), list(args), ty_args=[ty])


def _with_events(func: relax.Function, fname: str, info: dict) -> relax.Function:
    """Event points of a stream function: each binding belongs to the stage (kernel of the
    stream) its var names, or to the next named one; before a stage's first binding, wait
    for its events; after its last, signal its events. An imported parameter becomes a
    fetch (``get``) right before its first use, an exported value is handed over (``put``)
    right after it is computed; the exports leave the returned tuple."""
    bindings = [b for blk in func.body.blocks for b in blk.bindings]
    imports = {p: int(info["imports"][p.name]) for p in func.params[1:]
               if p.name in info["imports"]}
    n_stages = int(info["num_stages"])
    waits = {int(k): v for k, v in info["waits"].items()}
    signals = {int(k): v for k, v in info["signals"].items()}
    # the returned tuple: tenant outputs, then exports (drop those)
    ret = func.body.body
    tuple_of = {b.var: b.value for b in bindings}
    fields = tuple_of.get(ret, ret)
    if not isinstance(fields, relax.Tuple):
        raise ArenaError(f"function '{fname}': unexpected return value {type(fields).__name__}")
    # exports outside the plan stay returned: TVM's own plan (per function) must not reuse
    # their bytes while another stream may still read them
    planned = json.loads(str(func.attrs[ATTR]))["offsets"]
    n_out = int(info["outputs"])
    kept = [*fields.fields[:n_out], *(f for f in fields.fields[n_out:]
                                      if getattr(f, "name_hint", None) not in planned)]
    outs = relax.Var("mtcompile_outputs", relax.TupleType([f.ty for f in kept]))
    # stage of each binding: our kernel model says each kernel of the stream is one launch
    # (a call of a TIR kernel or a library function), in order; other bindings belong to
    # the next launch (allocations, views), trailing ones to the last stage
    slots = [st for st, n in enumerate(info["launches"]) for _ in range(n)]
    launch_at = [i for i, b in enumerate(bindings) if _is_kernel_call(b)]
    if len(launch_at) != len(slots):
        raise ArenaError(f"function '{fname}': {len(launch_at)} kernel launches after TVM's "
                         f"passes, the stream's kernels are {len(slots)}")
    stage_of, j = [], 0
    for i in range(len(bindings)):
        stage_of.append(slots[j] if j < len(slots) else n_stages - 1)
        if j < len(launch_at) and launch_at[j] == i:
            j += 1
    # each export: handed over right after the launch that writes it (through aliases)
    value_of = {b.var: b.value for b in bindings}
    put_after: dict[int, list] = {}
    for (vid, stage), var in zip(info["exports"], fields.fields[n_out:], strict=True):
        root = var
        while isinstance(value_of.get(root), relax.Var):
            root = value_of[root]
        at = next((i for i in launch_at if any(a.same_as(root) for a in bindings[i].value.args)),
                  None)
        if at is None or stage_of[at] != stage:
            raise ArenaError(f"function '{fname}': cannot find the kernel that writes the "
                             f"value handed to other streams as {vid} ({var.name_hint})")
        put_after.setdefault(at, []).append(relax.VarBinding(relax.Var("_", _NONE), _packed(
            PUT, relax.prim_value(int(vid)), root)))
    new, cur, fetched = [], -1, set()

    def advance(to: int) -> None:
        nonlocal cur
        while cur < to:
            for e in signals.get(cur, ()) if cur >= 0 else ():
                new.append(relax.VarBinding(relax.Var("_", _NONE), _packed(
                    SIGNAL, relax.prim_value(e))))
            cur += 1
            for e in waits.get(cur, ()):
                new.append(relax.VarBinding(relax.Var("_", _NONE), _packed(
                    WAIT, relax.prim_value(e))))

    for i, (b, st) in enumerate(zip(bindings, stage_of, strict=True)):
        if b.var.same_as(ret):
            continue  # the returned tuple: rebuilt below without the exports
        advance(st)
        for v in relax.analysis.free_vars(b.value):
            if v in imports and v not in fetched:
                fetched.add(v)
                new.append(relax.VarBinding(v, _packed(GET, relax.prim_value(imports[v]),
                                                       ty=v.ty)))
        new.append(b)
        new.extend(put_after.get(i, ()))
    advance(n_stages)
    new.append(relax.VarBinding(outs, relax.Tuple(kept)))
    params = [p for p in func.params if p not in imports]
    body = relax.SeqExpr([relax.BindingBlock(new)], outs)
    return relax.Function(params, body, outs.ty, False, func.attrs)


def _check(placed, first, last, arena, sizes, names) -> tuple[list[str], list]:
    """What is wrong with `placed` against the Relax's own liveness, and the allocations to
    take out of the arena so that nothing is: a tensor TVM allocates more bytes for than
    the plan gives, or the later-written of two tensors that are live together and share
    bytes (the plan's model of TVM missed an alias or a kernel)."""
    problems, offenders = [], {}
    for var, (off, n) in placed.items():
        name = next(n for n in sorted(names[var]) if n in sizes)
        if n > sizes[name] or off + n > arena:
            problems.append(f"{name}: TVM allocates {n} bytes, the plan gives {sizes[name]} "
                            f"at offset {off} in an arena of {arena}")
            offenders[var] = True
    items = sorted(((v, p) for v, p in placed.items() if v not in offenders),
                   key=lambda kv: kv[1][0])
    for i, (a, (oa, na)) in enumerate(items):
        for b, (ob, nb) in items[i + 1:]:
            if ob >= oa + na:
                break
            if a in offenders or b in offenders:
                continue
            if not (last[a] < first[b] or last[b] < first[a]):
                problems.append(f"{sorted(names[a])[-1]} and {sorted(names[b])[-1]} are live "
                                f"together but share bytes [{ob}, {min(oa + na, ob + nb)})")
                offenders[b if first[b] > first[a] else a] = True
    return problems, list(offenders)


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
                    func.attrs.keys() if func.attrs is not None else ()):
                continue  # private helpers: not an entry
            name = gv.name_hint
            if ATTR in func.attrs.keys():
                out[gv] = realize(func, name, stats)
            else:
                first, _, _, returned = liveness(func)
                left = [v for v in first if v not in returned]
                stats[name] = {"arena_bytes": 0, "planned_tensors": 0,
                               "unplanned_tensors": len(left),
                               "unplanned_bytes": sum(_nbytes(v.ty) for v in left),
                               "output_bytes": sum(_nbytes(v.ty) for v in returned)}
            stats[name]["tvm_plan_bytes"] = storage_bytes(tvm_plan[gv])
        return out

    return _realize
