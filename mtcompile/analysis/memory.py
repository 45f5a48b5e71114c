"""Memory planning: liveness over the kernels that run, then offsets in one arena.

Tensors are placed greedily by size with best-fit offsets ("Greedy by Size", Pisarchyk &
Lee 2020): the largest tensor first, each at the lowest-waste gap between the tensors it
conflicts with. Two tensors conflict unless every access of one happens before the
other is written: in a sequential function that is interval overlap over the kernel
order; with streams it is the happens-before order that stream program order and
event waits define (`happens_before` argument).

A tensor of symbolic (dynamic) dims is sized at their upper bounds (`TensorTy.nbytes`): the
arena serves every size within the bounds, and the plan reports that size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mtcompile.analysis.schedule import KernelDAG

ALIGNMENT = {"llvm": 64, "cuda": 256}  # what ensure_zero_offset needs to fold an offset


def align(n: int, a: int) -> int:
    return -(-n // a) * a


@dataclass(frozen=True)
class Lifetime:
    """A tensor to place: who writes it (kernel index) and who reads it (kernel indices)."""

    tensor: str
    tenant: str
    size: int
    first: int  # index of the kernel that writes it
    last: int  # index of the last kernel that reads it (== first if none does)
    readers: tuple[int, ...] = ()


@dataclass(frozen=True)
class Slot:
    """A placed tensor: its lifetime and its byte offset in the arena."""

    tensor: str
    tenant: str
    size: int
    offset: int
    first: int
    last: int


@dataclass(frozen=True)
class FunctionPlan:
    """The arena of one function (``run_all`` or a tenant's entry)."""

    function: str
    kernels: tuple[str, ...]  # kernel names in execution order (the timeline's x axis)
    slots: tuple[Slot, ...]
    arena_bytes: int
    lower_bound_bytes: int  # the largest sum of live bytes at any kernel of the order
    naive_bytes: int  # every intermediate in memory of its own
    alignment: int
    strategy: str = "greedy"  # how offsets were placed: greedy (by size) or naive

    def offsets(self) -> dict[str, int]:
        return {s.tensor: s.offset for s in self.slots}

    def timeline(self) -> dict:
        """JSON view for reports and notebooks."""
        return {
            "function": self.function,
            "kernels": list(self.kernels),
            "arena_bytes": self.arena_bytes,
            "lower_bound_bytes": self.lower_bound_bytes,
            "naive_bytes": self.naive_bytes,
            "alignment": self.alignment,
            "tensors": [
                {
                    "tensor": s.tensor,
                    "tenant": s.tenant,
                    "offset": s.offset,
                    "size": s.size,
                    "first": s.first,
                    "last": s.last,
                }
                for s in self.slots
            ],
        }


@dataclass(frozen=True)
class MemoryPlan:
    """One `FunctionPlan` per function; the value the ``plan-memory`` pass attaches.

    streams: the `StreamAssignment.fingerprint` of the stream order run_all's plan was made
    for (None: program order); lowering refuses to build streams over a plan made for
    another assignment, whose tensors live at once on two streams might share bytes.
    """

    functions: dict[str, FunctionPlan] = field(default_factory=dict)
    streams: str | None = None


# --------------------------------------------------------------------------- liveness


def lifetimes(dag: KernelDAG) -> list[Lifetime]:
    """Every intermediate tensor of `dag` (written by a kernel, not returned) and the
    kernels that write and read it, by index in ``dag.kernels``."""
    index = {k.name: i for i, k in enumerate(dag.kernels)}
    writer = {k.tensor: index[k.name] for k in dag.kernels if k.tensor is not None}
    readers: dict[str, list[int]] = {t: [] for t in writer}
    for i, k in enumerate(dag.kernels):
        for t in k.reads:
            if t in readers:
                readers[t].append(i)
    out = []
    for k in dag.kernels:
        t = k.tensor
        if t is None or t in dag.outputs:
            continue
        r = tuple(readers[t])
        out.append(Lifetime(t, k.tenant, k.nbytes, writer[t], max(r, default=writer[t]), r))
    return out


@dataclass(frozen=True)
class Liveness:
    """The liveness analysis of a function: its kernels in execution order and every
    intermediate's lifetime over them (`lifetimes`), derived from its `KernelDAG`."""

    kernels: tuple[str, ...]
    lifetimes: tuple[Lifetime, ...]

    @classmethod
    def of(cls, dag: KernelDAG) -> Liveness:
        return cls(tuple(k.name for k in dag.kernels), tuple(lifetimes(dag)))


HappensBefore = Callable[[int, int], bool]


def sequential(a: int, b: int) -> bool:
    """Kernel `a` happens before kernel `b` when it runs earlier on the one stream."""
    return a < b


def conflicts(x: Lifetime, y: Lifetime, hb: HappensBefore = sequential) -> bool:
    """True unless every access of one happens before the other is written."""

    def done_before(p: Lifetime, q: Lifetime) -> bool:
        return all(hb(a, q.first) for a in (p.first, *p.readers))

    return not (done_before(x, y) or done_before(y, x))


def lower_bound(lives: Sequence[Lifetime], n_kernels: int) -> int:
    """The largest sum of live bytes at any kernel of the order (no arena can be smaller)."""
    delta = [0] * (n_kernels + 1)
    for lt in lives:
        delta[lt.first] += lt.size
        delta[lt.last + 1] -= lt.size
    best = live = 0
    for d in delta:
        live += d
        best = max(best, live)
    return best


# --------------------------------------------------------------------------- offsets


ORDERS = {  # the order tensors are placed in: by size (largest first), or by first use
    "size": lambda lt: (-lt.size, lt.first, lt.tensor),
    "first": lambda lt: (lt.first, -lt.size, lt.tensor),
}


def place_best(
    lives: Sequence[Lifetime], alignment: int, hb: HappensBefore = sequential
) -> tuple[list[Slot], int]:
    """`place` in each of `ORDERS`; the smaller arena (neither order wins everywhere)."""
    return min((place(lives, alignment, hb, order) for order in ORDERS), key=lambda r: r[1])


def place(
    lives: Sequence[Lifetime], alignment: int, hb: HappensBefore = sequential, order: str = "size"
) -> tuple[list[Slot], int]:
    """Greedy with best-fit offsets, tensors taken in `order` (`ORDERS`: by size, the
    default, or by first use); returns the slots and the arena size."""
    placed: list[tuple[Lifetime, int]] = []
    order = sorted(lives, key=ORDERS[order])
    for lt in order:
        need = align(lt.size, alignment)
        busy = sorted(
            (off, off + align(o.size, alignment)) for o, off in placed if conflicts(lt, o, hb)
        )
        best, best_gap, prev_end = None, None, 0
        for start, end in busy:
            gap = start - prev_end
            if gap >= need and (best_gap is None or gap < best_gap):
                best, best_gap = prev_end, gap
            prev_end = max(prev_end, end)
        placed.append((lt, prev_end if best is None else best))
    slots = [Slot(lt.tensor, lt.tenant, lt.size, off, lt.first, lt.last) for lt, off in placed]
    slots.sort(key=lambda s: (s.first, s.offset))
    arena = align(max((s.offset + s.size for s in slots), default=0), alignment)
    return slots, arena


def place_naive(lives: Sequence[Lifetime], alignment: int) -> tuple[list[Slot], int]:
    """Every tensor in bytes of its own, one after another (no reuse: the baseline)."""
    slots, offset = [], 0
    for lt in lives:
        slots.append(Slot(lt.tensor, lt.tenant, lt.size, offset, lt.first, lt.last))
        offset += align(lt.size, alignment)
    return slots, offset


def plan_function(
    function: str,
    dag: KernelDAG,
    alignment: int,
    hb: HappensBefore = sequential,
    strategy: str = "greedy",
    liveness: Liveness | None = None,
) -> FunctionPlan:
    """Offsets for one function's kernels (`strategy` greedy or naive), over `liveness`
    (the `Liveness` of `dag`; computed here when None)."""
    lives = list((liveness or Liveness.of(dag)).lifetimes)
    slots, arena = (
        place_best(lives, alignment, hb) if strategy == "greedy" else place_naive(lives, alignment)
    )
    return FunctionPlan(
        function,
        tuple(k.name for k in dag.kernels),
        tuple(slots),
        arena,
        lower_bound(lives, len(dag.kernels)),
        sum(align(lt.size, alignment) for lt in lives),
        alignment,
        strategy,
    )


def overlap_problems(
    slots: Sequence[Slot],
    lives: Sequence[Lifetime],
    arena: int,
    alignment: int,
    hb: HappensBefore = sequential,
) -> list[str]:
    """Everything wrong with a placement: a misaligned or out-of-arena slot, or two
    conflicting tensors sharing a byte. Empty when the plan is safe."""
    by_name = {lt.tensor: lt for lt in lives}
    problems = []
    for s in slots:
        if s.offset % alignment:
            problems.append(f"{s.tensor}: offset {s.offset} is not a multiple of {alignment}")
        if s.offset < 0 or s.offset + s.size > arena:
            problems.append(
                f"{s.tensor}: bytes [{s.offset}, {s.offset + s.size}) leave the "
                f"arena of {arena} bytes"
            )
    ordered = sorted(slots, key=lambda s: s.offset)
    for i, a in enumerate(ordered):
        for b in ordered[i + 1 :]:
            if b.offset >= a.offset + a.size:
                break
            if conflicts(by_name[a.tensor], by_name[b.tensor], hb):
                problems.append(
                    f"{a.tensor} [{a.offset}, {a.offset + a.size}) and {b.tensor} "
                    f"[{b.offset}, {b.offset + b.size}) are live together and "
                    "share bytes"
                )
    missing = set(by_name) - {s.tensor for s in slots}
    problems += [f"{t}: not placed" for t in sorted(missing)]
    return problems
