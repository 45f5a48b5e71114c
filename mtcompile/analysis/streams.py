"""Stream assignment on the kernel DAG (Nimble, NeurIPS'20), its syncs, and its estimate.

Pure Python + networkx, no TVM. A DAG is given as ``order`` (kernel names in program order,
a topological order) and ``deps`` (kernel -> the kernels it reads from). The assignment is
a value: lowering emits one function per stream and an event per sync, the memory planner
asks `happens_before` which kernels can never overlap in time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import networkx as nx

Deps = Mapping[str, Sequence[str]]
# per-kernel cost (us) while streams run at once, or a function of the stream count to it
CostFor = Mapping[str, float] | Callable[[int], Mapping[str, float]]
# what running several streams costs per run besides the kernels: (streams, syncs) -> us
Overhead = Callable[[int, int], float]
# `auto` keeps several streams only when they are predicted at least this much faster than
# one: below it the threads, events and split core counts cost more than they may win.
AUTO_MIN_SPEEDUP = 1.10
POLICIES = ("auto", "max", "sequential")


@dataclass(frozen=True)
class StreamAssignment:
    """Kernels per stream in program order, and the cross-stream waits that remain.

    syncs: ``(producer, consumer)`` pairs: `consumer`'s stream waits until `producer` is
    done; every other dependency is implied by these and each stream's program order.
    logical_concurrency: Nimble's maximum logical concurrency, the DAG's width (the most
    kernels that may run at once); estimated_speedup: one-stream makespan over this one's.
    """

    streams: tuple[tuple[str, ...], ...]
    syncs: tuple[tuple[str, str], ...]
    policy: str = "max"
    estimated_speedup: float = 1.0
    logical_concurrency: int = 1
    info: Mapping[str, float] = field(default_factory=dict)  # estimate details
    # per kernel, the estimated microseconds the assignment was made with while all its
    # streams run (reports draw the lanes of the simulated schedule from it)
    kernel_us: Mapping[str, float] = field(default_factory=dict)

    @property
    def num_streams(self) -> int:
        return len(self.streams)

    @property
    def num_syncs(self) -> int:
        return len(self.syncs)

    @property
    def stream_of(self) -> dict[str, int]:
        """Kernel name -> its stream index."""
        return {k: s for s, ks in enumerate(self.streams) for k in ks}

    def fingerprint(self) -> str:
        """A short hash of the streams and syncs (what a memory plan made for this
        assignment records; the estimate does not enter it)."""
        text = json.dumps([self.streams, self.syncs])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def summary(self) -> dict:
        """JSON-able facts for reports: counts, policy, estimate."""
        return {
            "num_streams": self.num_streams,
            "num_syncs": self.num_syncs,
            "policy": self.policy,
            "estimated_speedup": round(self.estimated_speedup, 4),
            "logical_concurrency": self.logical_concurrency,
            "kernels_per_stream": [len(s) for s in self.streams],
            **dict(self.info),
        }


def _check_order(order: Sequence[str], deps: Deps) -> dict[str, int]:
    pos = {k: i for i, k in enumerate(order)}
    if len(pos) != len(order):
        raise ValueError("kernel names in `order` are not unique")
    for k, ds in deps.items():
        for d in ds:
            if d not in pos or k not in pos:
                raise ValueError(f"dependency {d!r} -> {k!r} names a kernel not in `order`")
            if pos[d] >= pos[k]:
                raise ValueError(f"`order` is not topological: {k!r} reads {d!r} run after it")
    return pos


def _dag(order: Sequence[str], deps: Deps) -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_nodes_from(order)
    g.add_edges_from((d, k) for k, ds in deps.items() for d in ds)
    return g


def min_chain_cover(order: Sequence[str], deps: Deps) -> list[list[str]]:
    """Fewest chains covering the DAG (their number is its width, Dilworth): a maximum
    matching of the bipartite graph of the transitive closure links each kernel to the next
    of its chain. A chain may skip kernels (a closure edge is a path); kernels are listed
    in program order, which is a valid order for each chain."""
    pos = _check_order(order, deps)
    closure = nx.transitive_closure_dag(_dag(order, deps))
    # a maximum matching by augmenting paths (Kuhn), visiting kernels in program order:
    # deterministic, unlike networkx's Hopcroft-Karp, which iterates over sets
    succ = {u: sorted(closure.successors(u), key=pos.__getitem__) for u in order}
    prev: dict[str, str] = {}  # matched: kernel -> the kernel before it in its chain

    def augment(u: str, seen: set[str]) -> bool:
        stack = [(u, iter(succ[u]))]
        path: list[tuple[str, str]] = []
        while stack:
            x, it = stack[-1]
            for v in it:
                if v in seen:
                    continue
                seen.add(v)
                path.append((x, v))
                if v not in prev:
                    for a, b in path:  # flip the augmenting path
                        prev[b] = a
                    return True
                stack.append((prev[v], iter(succ[prev[v]])))
                break
            else:
                stack.pop()
                if path:
                    path.pop()
        return False

    for u in order:
        augment(u, set())
    nxt = {a: b for b, a in prev.items()}
    has_prev = set(nxt.values())
    chains = []
    for k in order:
        if k in has_prev:
            continue
        chain = [k]
        while chain[-1] in nxt:
            chain.append(nxt[chain[-1]])
        chains.append(chain)
    assert all(pos[a] < pos[b] for c in chains for a, b in zip(c, c[1:], strict=False))
    return chains


def merge_chains(
    chains: list[list[str]], max_streams: int, order: Sequence[str], cost_us: Mapping[str, float]
) -> list[list[str]]:
    """Merge rule: while there are more than `max_streams` chains, the two with the least
    total estimated time become one (ties: the later-starting ones), its kernels in program
    order (both are subsequences of one topological order, so the merge is one too)."""
    if max_streams < 1:
        raise ValueError(f"max_streams must be >= 1, got {max_streams}")
    pos = {k: i for i, k in enumerate(order)}
    chains = [list(c) for c in chains]
    while len(chains) > max_streams:
        ranked = sorted(
            range(len(chains)),
            key=lambda i: (sum(cost_us.get(k, 0.0) for k in chains[i]), -pos[chains[i][0]]),
        )
        a, b = sorted(ranked[:2])
        merged = sorted(chains[a] + chains[b], key=pos.__getitem__)
        chains = [c for i, c in enumerate(chains) if i not in (a, b)] + [merged]
    return sorted(chains, key=lambda c: pos[c[0]])


def minimal_syncs(
    streams: Sequence[Sequence[str]], order: Sequence[str], deps: Deps
) -> list[tuple[str, str]]:
    """Cross-stream DAG edges left in the transitive reduction of DAG edges + stream
    program order: exactly those not implied by program order and other syncs. A smaller
    set made of DAG edges cannot exist (a reduction edge is the only path between its ends)."""
    g = _dag(order, deps)
    stream_of = {k: s for s, ks in enumerate(streams) for k in ks}
    for ks in streams:
        g.add_edges_from(zip(ks, ks[1:], strict=False))
    pos = {k: i for i, k in enumerate(order)}
    reduced = nx.transitive_reduction(g)
    syncs = [(u, v) for u, v in reduced.edges if stream_of[u] != stream_of[v]]
    return sorted(syncs, key=lambda e: (pos[e[1]], pos[e[0]]))


def assign(
    order: Sequence[str],
    deps: Deps,
    *,
    streams: int | None = None,
    max_streams: int | None = None,
    policy: str = "auto",
    cost_us: Mapping[str, float] | None = None,
    concurrent_cost_us: CostFor | None = None,
    lanes: int | None = None,
    min_speedup: float = AUTO_MIN_SPEEDUP,
    overhead_us: Overhead | None = None,
) -> StreamAssignment:
    """The stream assignment of a kernel DAG.

    streams=1 or policy ``sequential``: everything on one stream in program order.
    policy ``max``: one stream per chain of a minimum chain cover, at most `max_streams`
    by `merge_chains`; ``streams=N`` means ``max`` with at most N streams. ``auto``:
    ``max``, unless its estimated speedup over one stream is below `min_speedup`, then one
    stream. Costs (microseconds per kernel;
    1 each when None) drive merging and the estimate; `concurrent_cost_us` is a kernel's
    cost while streams run at once (e.g. with its share of the CPU cores), or a function
    of the stream count giving them; `lanes`: kernels the device runs at once (`simulate`);
    `overhead_us(streams, syncs)`: the executor's cost per run, added to a multi-stream
    makespan.
    """
    policy = _policy(policy, streams)
    cost = dict(cost_us) if cost_us is not None else dict.fromkeys(order, 1.0)
    chains = min_chain_cover(order, deps) if order else []
    width = len(chains)
    cap = min(x for x in (streams, max_streams, width or 1) if x is not None)
    if policy == "sequential" or cap == 1:
        chains = [list(order)] if order else []
    else:
        chains = merge_chains(chains, cap, order, cost)
    a = StreamAssignment(
        tuple(map(tuple, chains)),
        tuple(minimal_syncs(chains, order, deps)),
        policy=policy,
        logical_concurrency=max(width, 1),
    )
    est = estimate(a, order, cost, concurrent_cost_us, lanes, overhead_us)
    a = _with_estimate(a, est)
    if policy == "auto" and a.num_streams > 1 and a.estimated_speedup < min_speedup:
        seq = StreamAssignment(((*order,),), (), policy=policy, logical_concurrency=width)
        a = _with_estimate(seq, estimate(seq, order, cost), fell_back_from=est["speedup"])
    return a


def _policy(policy: str, streams: int | None) -> str:
    """The policy `assign` follows: `policy`, or what a stream count orders."""
    if policy not in POLICIES:
        raise ValueError(f"unknown stream policy {policy!r}; expected one of {POLICIES}")
    if streams is None:
        return policy
    if streams < 1:
        raise ValueError(f"streams must be >= 1, got {streams}")
    return "sequential" if streams == 1 else "max"  # a stream count is an order


def _with_estimate(a: StreamAssignment, est: dict, **extra) -> StreamAssignment:
    info = {
        "estimated_makespan_us": round(est["makespan_us"], 3),
        "sequential_us": round(est["sequential_us"], 3),
        "estimated_concurrency": round(est["concurrency"], 4),
        **extra,
    }
    return StreamAssignment(
        a.streams, a.syncs, a.policy, est["speedup"], a.logical_concurrency, info
    )


@dataclass(frozen=True)
class Schedule:
    """A simulated run: start and end time (us) of every kernel, and the makespan."""

    start: dict[str, float]
    end: dict[str, float]

    @property
    def makespan(self) -> float:
        return max(self.end.values(), default=0.0)


class DeadlockError(RuntimeError):
    """The streams wait on each other: the assignment cannot run."""


def simulate(
    a: StreamAssignment, cost_us: Mapping[str, float], lanes: int | None = None
) -> Schedule:
    """What the executor does, as a list schedule: each stream runs its kernels in order,
    a kernel may start when its stream's previous kernel and every producer it syncs on
    are done, and at most `lanes` kernels run at once (None: no limit; on CPU, the cores).
    Uses only program order and syncs (not the DAG), so `check` can test them."""
    waits: dict[str, list[str]] = {}
    for p, c in a.syncs:
        waits.setdefault(c, []).append(p)
    start: dict[str, float] = {}
    end: dict[str, float] = {}
    heads, free = [0] * a.num_streams, [0.0] * a.num_streams  # next kernel, stream idle at
    running: list[float] = []  # end times of the kernels running now
    t, left = 0.0, sum(map(len, a.streams))
    while left:
        running = [e for e in running if e > t]
        ready = []  # (time it may start, stream)
        for s, ks in enumerate(a.streams):
            if heads[s] < len(ks) and all(p in end for p in waits.get(ks[heads[s]], ())):
                ready.append((max([free[s], *(end[p] for p in waits.get(ks[heads[s]], ()))]), s))
        now = sorted(r for r in ready if r[0] <= t)
        if now and (lanes is None or len(running) < lanes):
            s = now[0][1]
            k = a.streams[s][heads[s]]
            start[k], end[k] = t, t + float(cost_us.get(k, 1.0))
            free[s] = end[k]
            running.append(end[k])
            heads[s] += 1
            left -= 1
            continue
        later = [e for e in running if e > t] + [r[0] for r in ready if r[0] > t]
        if not later:
            stuck = {s: a.streams[s][h] for s, h in enumerate(heads) if h < len(a.streams[s])}
            raise DeadlockError(f"streams wait on each other: stream -> blocked kernel {stuck}")
        t = min(later)
    return Schedule(start, end)


def lanes_view(
    a: StreamAssignment, tenant_of: Mapping[str, str], cost_us: Mapping[str, float]
) -> dict:
    """JSON for reports and notebooks: the simulated schedule of `a` with `cost_us`,
    ``{"lanes": [{kernel, stream, tenant, start_us, end_us}], "syncs": [[p, c], ...]}``."""
    sched = simulate(a, cost_us)
    return {
        "lanes": [
            {
                "kernel": k,
                "stream": s,
                "tenant": tenant_of.get(k, "?"),
                "start_us": round(sched.start[k], 3),
                "end_us": round(sched.end[k], 3),
            }
            for s, ks in enumerate(a.streams)
            for k in ks
        ],
        "syncs": [list(e) for e in a.syncs],
    }


def check(
    a: StreamAssignment,
    order: Sequence[str],
    deps: Deps,
    cost_us: Mapping[str, float] | None = None,
) -> Schedule:
    """Raises unless `a` runs every kernel once, without deadlock, and every dependency
    is ordered by program order and syncs (checked on the simulated schedule and by
    `happens_before`). Returns the schedule."""
    ran = [k for ks in a.streams for k in ks]
    if sorted(ran) != sorted(order):
        raise AssertionError(f"kernels run != kernels of the DAG: {sorted(set(ran) ^ set(order))}")
    pos = _check_order(order, deps)
    for s, ks in enumerate(a.streams):
        if any(pos[x] >= pos[y] for x, y in zip(ks, ks[1:], strict=False)):
            raise AssertionError(f"stream {s} is not in program order: {ks}")
    sched = simulate(a, cost_us or dict.fromkeys(order, 1.0))
    before = happens_before(a)
    for k, ds in deps.items():
        for d in ds:
            if sched.start[k] < sched.end[d] or not before(d, k):
                raise AssertionError(f"dependency {d!r} -> {k!r} is not enforced")
    return sched


def estimate(
    a: StreamAssignment,
    order: Sequence[str],
    cost_us: Mapping[str, float],
    concurrent_cost_us: CostFor | None = None,
    lanes: int | None = None,
    overhead_us: Overhead | None = None,
) -> dict[str, float]:
    """Predicted makespan of `a` vs one stream, from per-kernel times (e.g. measured by
    `Bundle.profile`). One stream: the sum of `cost_us`. Several: the simulated makespan
    with `concurrent_cost_us` (default `cost_us`: streams don't slow each other, as on a
    GPU with room to spare) and at most `lanes` kernels at once, plus `overhead_us`
    (streams, syncs) when given. Also the estimated
    concurrency: busy time over makespan."""
    seq = float(sum(cost_us.get(k, 1.0) for k in order))
    if a.num_streams <= 1:
        return {
            "makespan_us": seq,
            "sequential_us": seq,
            "speedup": 1.0,
            "concurrency": 1.0 if seq else 0.0,
        }
    cc = concurrent_cost_us if concurrent_cost_us is not None else cost_us
    cc = cc(a.num_streams) if callable(cc) else cc
    span = simulate(a, cc, lanes).makespan
    if overhead_us is not None:  # the executor's own cost per run: threads, events
        span += float(overhead_us(a.num_streams, a.num_syncs))
    busy = float(sum(cc.get(k, 1.0) for k in order))
    return {
        "makespan_us": span,
        "sequential_us": seq,
        "speedup": seq / span if span else 1.0,
        "concurrency": busy / span if span else 0.0,
    }


def happens_before(a: StreamAssignment) -> Callable[[str, str], bool]:
    """``before(x, y)``: kernel `x` surely ends before kernel `y` starts, in every run: a
    path from `x` to `y` through stream program order and sync edges. Kernels for which it
    is False both ways may run at the same time (a memory planner must not let their
    tensors share bytes). Every DAG dependency is such a path (`check` tests it)."""
    succ: dict[str, list[str]] = {k: [] for ks in a.streams for k in ks}
    for ks in a.streams:
        for x, y in zip(ks, ks[1:], strict=False):
            succ[x].append(y)
    for p, c in a.syncs:
        succ[p].append(c)
    g = nx.DiGraph()
    g.add_nodes_from(succ)
    g.add_edges_from((x, y) for x, ys in succ.items() for y in ys)
    bit = {k: 1 << i for i, k in enumerate(succ)}
    reach: dict[str, int] = {}  # kernel -> bitset of kernels that run strictly after it
    for k in reversed(list(nx.topological_sort(g))):
        r = 0
        for y in succ[k]:
            r |= bit[y] | reach[y]
        reach[k] = r

    def before(x: str, y: str) -> bool:
        return bool(reach[x] & bit[y])

    return before
