"""Pictures of merged graphs and bundles: layered graph drawing, summaries, stream lanes,
memory timeline and per-pass summary (matplotlib + networkx; SVG, no system graphviz).

Every drawing takes plain JSON dicts (`graph_view`, a memory timeline, stream lanes, pass
rows) so that a saved bundle, which has only its manifest, draws like a fresh one. Figures
are made without pyplot: no global state, no GUI backend.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from typing import Any

from mtcompile.errors import MTCompileError
from mtcompile.ir.graph import Graph
from mtcompile.ir.view import graph_view, node_kind, pass_row

TENANT_COLORS = [
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#af7aa1",
    "#ff9da7",
    "#9c755f",
    "#17becf",
    "#bcbd22",
]
SHARED_COLOR, SHARED_DARK, HFUSED_COLOR = "#d4d4d4", "#8c8c8c", "#edc948"
MAX_NODES = 100  # above this a whole-graph drawing is a hairball: summarize instead
_RC = {"svg.fonttype": "none", "svg.hashsalt": "mtcompile", "font.size": 8}


class Picture:
    """A drawn figure; shows itself in Jupyter and gives its SVG text."""

    def __init__(self, figure):
        self.figure = figure
        self._svg: str | None = None

    @property
    def svg(self) -> str:
        if self._svg is None:
            import matplotlib

            buf = io.StringIO()
            with matplotlib.rc_context(_RC):
                self.figure.savefig(
                    buf, format="svg", bbox_inches="tight", metadata={"Date": None}
                )  # same figure, same text
            text = buf.getvalue()
            self._svg = text[text.index("<svg") :]  # drop the XML prolog: it embeds in HTML
        return self._svg

    def _repr_svg_(self) -> str:
        return self.svg

    def save(self, path: str) -> None:
        """Write the picture as SVG (or PNG etc., by the file name's suffix)."""
        self.figure.savefig(path, bbox_inches="tight")


def _figure(width: float, height: float):
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_RC):
        return Figure(figsize=(width, height))


def _gid(kind: str, name: str) -> str:
    return f"{kind}-" + re.sub(r"[^A-Za-z0-9_.-]", "_", str(name))


def _mark_tenants(legend, tenants: Sequence[str]) -> None:
    """Give the legend's tenant swatches ids (``legend-<tenant>``) so the SVG says who is in it."""
    for patch, text in zip(legend.get_patches(), legend.get_texts(), strict=True):
        if text.get_text() in tenants:
            patch.set_gid(_gid("legend", text.get_text()))


def _tenant_legend(ax, colors: dict[str, str], tenants: Sequence[str]) -> None:
    """One swatch per tenant under the axes, marked (`_mark_tenants`)."""
    from matplotlib.patches import Patch

    handles = [Patch(color=colors[t], label=t) for t in tenants]
    legend = ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.16),
        ncol=min(len(handles), 6),
        frameon=False,
    )
    _mark_tenants(legend, tenants)


def tenant_colors(tenants: Sequence[str]) -> dict[str, str]:
    """One colour per tenant, in tenant order; a '+'-joined set of tenants (a shared kernel
    or tensor) is grey, as shared nodes are in the graph drawing."""
    singles = [t for t in tenants if "+" not in t]
    colors = {t: TENANT_COLORS[i % len(TENANT_COLORS)] for i, t in enumerate(singles)}
    return {t: colors.get(t, SHARED_DARK) for t in tenants}


def _tenant_order(names) -> list[str]:
    """Tenants as they first appear, single tenants first (so they keep their colours)."""
    names = list(dict.fromkeys(names))
    return [t for t in names if "+" not in t] + [t for t in names if "+" in t]


# --------------------------------------------------------------------------- graph view


def as_view(graph) -> dict:
    """`graph` as a view: a Graph is converted, a view dict is checked and returned."""
    if isinstance(graph, Mapping):
        if "nodes" not in graph or "tenants" not in graph:
            raise MTCompileError(
                "expected a graph view with 'tenants' and 'nodes' "
                f"(made by mtcompile.tools.viz.graph_view), got keys {sorted(graph)}"
            )
        return dict(graph)
    return graph_view(graph)


def select(
    view: dict, tenant: str | None = None, region: tuple[int, int] | None = None
) -> list[dict]:
    """The nodes of one tenant and/or of positions [start, stop) in graph order."""
    nodes = view["nodes"]
    if tenant is not None:
        if tenant not in view["tenants"]:
            raise MTCompileError(
                f"unknown tenant {tenant!r}; this graph has tenants {view['tenants']}"
            )
        ti = view["tenants"].index(tenant)
        nodes = [n for n in nodes if ti in n["tenants"]]
    if region is not None:
        start, stop = region
        if not 0 <= start < stop:
            raise MTCompileError(
                f"region {region!r} must be (start, stop) with "
                f"0 <= start < stop (graph positions 0..{len(view['nodes'])})"
            )
        pos = {n["name"]: i for i, n in enumerate(view["nodes"])}
        nodes = [n for n in nodes if start <= pos[n["name"]] < stop]
    return nodes


# --------------------------------------------------------------------------- graph drawing


def draw_graph(
    graph,
    tenant: str | None = None,
    region: tuple[int, int] | None = None,
    max_nodes: int = MAX_NODES,
) -> Picture:
    """The merged graph, layered top to bottom, coloured by tenant; shared and horizontally
    fused nodes marked, fusion groups boxed. More than `max_nodes` nodes selected: a summary
    (draw one tenant with ``tenant=``, or graph positions ``region=(start, stop)``)."""
    view = as_view(graph)
    nodes = select(view, tenant, region)
    if len(nodes) > max_nodes:
        return draw_summary(view, tenant, region, max_nodes)
    return _draw_layered(view, nodes, tenant, region)


def _layout(nodes: list[dict], tenants: list[str]) -> tuple[dict, int, int]:
    """Positions: y = longest path from the selection's sources; x = a band of columns per
    tenant set (shared nodes in their own band), nodes ordered by their inputs' columns."""
    names = {n["name"] for n in nodes}
    depth: dict[str, int] = {}
    for n in nodes:  # nodes are in topological order
        depth[n["name"]] = 1 + max((depth[i] for i in n["inputs"] if i in names), default=-1)
    users: dict[str, list[str]] = {}
    for n in nodes:
        for i in n["inputs"]:
            users.setdefault(i, []).append(n["name"])
    for n in reversed(nodes):  # values made from weights alone: right above their first user
        if n["op"] != "input" and not any(i in names for i in n["inputs"]) and n["name"] in users:
            depth[n["name"]] = min(depth[u] for u in users[n["name"]]) - 1
    bands = sorted({tuple(n["tenants"]) for n in nodes}, key=lambda b: (min(b), -len(b), b))
    layers: dict[tuple, dict[int, list[dict]]] = {b: {} for b in bands}
    for n in nodes:
        layers[tuple(n["tenants"])].setdefault(depth[n["name"]], []).append(n)
    pos: dict[str, tuple[float, float]] = {}
    x0 = 0
    for b in bands:
        width = max(len(v) for v in layers[b].values())
        for d in sorted(layers[b]):
            row = layers[b][d]
            # barycentre of the inputs already placed keeps chains straight
            row.sort(
                key=lambda n: (
                    sum(pos[i][0] for i in n["inputs"] if i in pos)
                    / max(1, sum(1 for i in n["inputs"] if i in pos))
                    if any(i in pos for i in n["inputs"])
                    else x0
                )
            )
            for k, n in enumerate(row):
                pos[n["name"]] = (x0 + k + (width - len(row)) / 2, -d)
        x0 += width + 0.6
    return pos, int(x0), 1 + max(depth.values(), default=0)


def _label(n: dict) -> str:
    op = n["op"].removeprefix("nn.")
    if op == "input":
        return "in " + n["name"].rsplit(".", 1)[-1]
    call = n.get("call")
    if call:  # the kernel (and its variant) over what it applies: bias, epilogue
        head = call["kernel"] + ("[" + call["variant"] + "]" if call["variant"] else "")
        tail = ("+bias" if call["bias"] else "") + (
            "+" + call["epilogue"] if call["epilogue"] else ""
        )
        return "\n".join(_cut(x) for x in (head, tail) if x)
    return _cut(op)


def _cut(text: str) -> str:
    return text if len(text) <= 14 else text[:13] + "…"


def _draw_node_box(ax, n: dict, x: float, y: float, kind: str, served: list, colors) -> None:
    """The node's box, coloured by its kind, its label inside; under a shared or fused node
    a strip of the served tenants' colours."""
    from matplotlib.patches import FancyBboxPatch, Rectangle

    face = {"own": colors[served[0]], "shared": SHARED_COLOR, "hfused": HFUSED_COLOR}[kind]
    box = FancyBboxPatch(
        (x - 0.45, y - 0.2),
        0.9,
        0.4,
        boxstyle="round,pad=0.02",
        facecolor=face,
        edgecolor="#222" if kind != "own" else face,
        linewidth=1.6 if kind != "own" else 0.5,
        zorder=3,
    )
    box.set_gid(_gid("node", n["name"]))
    ax.add_patch(box)
    if kind != "own":  # a strip of the served tenants' colours under the box
        w = 0.9 / len(served)
        for k, t in enumerate(served):
            ax.add_patch(
                Rectangle(
                    (x - 0.45 + k * w, y - 0.27),
                    w,
                    0.07,
                    facecolor=colors[t],
                    linewidth=0,
                    zorder=3,
                )
            )
    ax.text(
        x,
        y,
        _label(n),
        ha="center",
        va="center",
        fontsize=6.5,
        zorder=4,
        color="white" if kind == "own" else "black",
    )


def _draw_nodes(
    ax, nodes: list[dict], pos: dict, tenants: list[str], colors: dict[str, str]
) -> tuple[dict, dict]:
    """A box per node coloured by its kind, a strip of the served tenants' colours under a
    shared or fused one; returns the fusion groups' node positions and the count per kind."""
    groups: dict[str, list[tuple[float, float]]] = {}
    kinds = {"own": 0, "shared": 0, "hfused": 0}
    for n in nodes:
        x, y = pos[n["name"]]
        served = [tenants[t] for t in n["tenants"]]
        kind = node_kind(n["name"], served)
        kinds[kind] += 1
        _draw_node_box(ax, n, x, y, kind, served, colors)
        if n.get("group"):
            groups.setdefault(n["group"], []).append((x, y))
    return groups, kinds


def _draw_groups(ax, groups: dict[str, list[tuple[float, float]]]) -> None:
    """A dashed box around the nodes of each fusion group."""
    from matplotlib.patches import FancyBboxPatch

    for g, pts in groups.items():
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        box = FancyBboxPatch(
            (min(xs) - 0.55, min(ys) - 0.33),
            max(xs) - min(xs) + 1.1,
            max(ys) - min(ys) + 0.63,
            boxstyle="round,pad=0.02",
            fill=False,
            edgecolor="#555",
            linestyle="--",
            linewidth=0.9,
            zorder=2,
        )
        box.set_gid(_gid("group", g))
        ax.add_patch(box)


def _layered_handles(
    nodes: list[dict], tenants: list[str], colors: dict[str, str], kinds: dict, groups: dict
) -> list:
    """Legend entries: the tenants drawn, then shared, fused and fusion groups when present."""
    from matplotlib.patches import Patch

    handles = [
        Patch(facecolor=colors[t], label=t)
        for t in tenants
        if any(tenants.index(t) in n["tenants"] for n in nodes)
    ]
    if kinds["shared"]:
        handles.append(
            Patch(
                facecolor=SHARED_COLOR,
                edgecolor="#222",
                label=f"shared by several tenants ({kinds['shared']})",
            )
        )
    if kinds["hfused"]:
        handles.append(
            Patch(
                facecolor=HFUSED_COLOR,
                edgecolor="#222",
                label=f"horizontally fused ({kinds['hfused']})",
            )
        )
    if groups:
        handles.append(
            Patch(
                fill=False,
                edgecolor="#555",
                linestyle="--",
                label=f"fusion group = 1 kernel ({len(groups)})",
            )
        )
    return handles


def _draw_layered(view: dict, nodes: list[dict], tenant, region) -> Picture:
    """The selected nodes in layers: edges, node boxes, fusion groups, a title and legend."""
    from matplotlib.collections import LineCollection

    tenants, colors = view["tenants"], tenant_colors(view["tenants"])
    pos, width, height = _layout(nodes, tenants)
    fig = _figure(min(22.0, 2.2 + 1.25 * max(width, 2)), 1.2 + 0.45 * max(height, 3))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    edges = [(pos[i], pos[n["name"]]) for n in nodes for i in n["inputs"] if i in pos]
    ax.add_collection(LineCollection(edges, colors="#9a9a9a", linewidths=0.7, zorder=1))
    groups, kinds = _draw_nodes(ax, nodes, pos, tenants, colors)
    _draw_groups(ax, groups)
    ax.set_xlim(-0.8, max(width, 2) - 0.2)
    ax.set_ylim(-height + 0.3, 0.7)
    handles = _layered_handles(nodes, tenants, colors, kinds, groups)
    what = f"tenant {tenant}" if tenant else "merged graph"
    where = f", positions {region[0]}..{region[1] - 1}" if region else ""
    ax.set_title(
        f"{what}{where}: {len(nodes)} nodes (a strip under a node: the tenants it serves)",
        fontsize=10,
        pad=8,
    )
    _mark_tenants(
        ax.legend(
            handles=handles,
            loc="lower center",
            ncol=min(len(handles), 4),
            bbox_to_anchor=(0.5, 1.0 + 0.35 / height),
            frameon=False,
        ),
        tenants,
    )
    return Picture(fig)


def _draw_strip(strip, nodes: list[dict], tenants: list[str], colors: dict[str, str]) -> dict:
    """A row per tenant marking where its own, shared and fused nodes lie in graph order, a
    row for fusion groups; returns the node count per tenant and kind."""
    counts = {t: {"own": 0, "shared": 0, "hfused": 0} for t in tenants}
    for ti, t in enumerate(tenants):
        for kind, color in (("own", colors[t]), ("shared", "#555"), ("hfused", HFUSED_COLOR)):
            xs = [
                i
                for i, n in enumerate(nodes)
                if ti in n["tenants"] and node_kind(n["name"], n["tenants"]) == kind
            ]
            counts[t][kind] = len(xs)
            if xs:
                strip.vlines(
                    xs,
                    ti - 0.4,
                    ti + 0.4,
                    colors=color,
                    linewidth=1.2,
                    gid=_gid("strip", f"{t}-{kind}"),
                )
    groups = [i for i, n in enumerate(nodes) if n.get("group")]
    if groups:
        strip.vlines(groups, len(tenants) - 0.35, len(tenants) + 0.35, colors="#333", linewidth=1.2)
    labels = tenants + (["in a fusion group"] if groups else [])
    strip.set_yticks(range(len(labels)), labels)
    strip.set_ylim(len(labels) - 0.5, -0.5)
    strip.set_xlim(-1, len(nodes))
    strip.set_xlabel("graph position (pick region=(start, stop) from this axis)")
    strip.set_title(
        "where each tenant's nodes lie: colour own, grey shared, gold horizontally fused",
        fontsize=9,
    )
    return counts


def _draw_kind_bars(bars, tenants: list[str], colors: dict[str, str], counts: dict) -> None:
    """Stacked bars per tenant: its own, shared and horizontally fused node counts."""
    left = [0] * len(tenants)
    for kind, color, label in (
        ("own", None, "own"),
        ("shared", "#555", "shared"),
        ("hfused", HFUSED_COLOR, "horizontally fused"),
    ):
        vals = [counts[t][kind] for t in tenants]
        cs = [colors[t] for t in tenants] if color is None else color
        bars.barh(tenants, vals, left=left, color=cs, label=label)
        left = [a + b for a, b in zip(left, vals, strict=True)]
    bars.invert_yaxis()
    bars.set_xlabel("nodes serving the tenant")
    bars.legend(fontsize=7, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=3)


def _draw_top_ops(ops, nodes: list[dict]) -> None:
    """Bars of the ten most frequent ops."""
    freq: dict[str, int] = {}
    for n in nodes:
        freq[n["op"]] = freq.get(n["op"], 0) + 1
    top = sorted(freq.items(), key=lambda kv: -kv[1])[:10]
    ops.barh([k for k, _ in top], [v for _, v in top], color="#8c8c8c")
    ops.invert_yaxis()
    ops.set_xlabel("nodes")
    ops.set_title("most frequent ops", fontsize=9)


def _summary_hint(
    view: dict, tenant: str | None, region: tuple[int, int] | None, max_nodes: int
) -> str:
    """The summary's title: sizes, why it is a summary and how to draw a part instead."""
    tenants, nodes = view["tenants"], view["nodes"]
    chosen = len(select(view, tenant, region))
    return (
        f"{len(nodes)} nodes, {len(tenants)} tenants; "
        + (
            f"the selection has {chosen} nodes (> max_nodes={max_nodes}); "
            if tenant or region
            else f"more than max_nodes={max_nodes}: summarized; "
        )
        + f"draw one tenant: draw_graph(g, tenant={tenants[0]!r}) or a region: "
        f"draw_graph(g, region=(0, {min(len(nodes), max_nodes // 2)}))"
    )


def draw_summary(
    graph,
    tenant: str | None = None,
    region: tuple[int, int] | None = None,
    max_nodes: int = MAX_NODES,
) -> Picture:
    """A large graph at a glance: where each tenant's nodes lie in graph order (shared and
    fused marked), node counts by kind per tenant, and the most frequent ops."""
    view = as_view(graph)
    tenants, colors, nodes = view["tenants"], tenant_colors(view["tenants"]), view["nodes"]
    fig = _figure(11, 3.2 + 0.45 * len(tenants))
    grid = fig.add_gridspec(2, 2, height_ratios=[1.2, 1], hspace=0.55, wspace=0.35)
    strip, bars, ops = (
        fig.add_subplot(grid[0, :]),
        fig.add_subplot(grid[1, 0]),
        fig.add_subplot(grid[1, 1]),
    )
    counts = _draw_strip(strip, nodes, tenants, colors)
    _draw_kind_bars(bars, tenants, colors, counts)
    _draw_top_ops(ops, nodes)
    fig.suptitle(_summary_hint(view, tenant, region, max_nodes), fontsize=9)
    fig.set_gid("graph-summary")
    return Picture(fig)


# --------------------------------------------------------------------------- schedules


def _check_keys(what: str, d: Any, keys: Sequence[str]) -> None:
    if not isinstance(d, Mapping) or any(k not in d for k in keys):
        got = sorted(d) if isinstance(d, Mapping) else type(d).__name__
        raise MTCompileError(f"{what} needs a dict with keys {list(keys)}, got {got}")


def _draw_lane_bars(ax, rows: list, colors: dict[str, str], end: float) -> None:
    """A bar per kernel on its stream's row from start_us to end_us, coloured by tenant,
    labelled when wide enough."""
    for r in rows:
        s, e = float(r["start_us"]), float(r["end_us"])
        (bar,) = ax.barh(
            r["stream"],
            e - s,
            left=s,
            height=0.6,
            color=colors[r["tenant"]],
            edgecolor="white",
            linewidth=0.4,
        ).patches
        bar.set_gid(_gid("lane", r["kernel"]))
        if e - s > 0.06 * end:  # label only bars wide enough to hold it
            ax.text(
                (s + e) / 2,
                r["stream"],
                r["kernel"][:18],
                ha="center",
                va="center",
                fontsize=6,
                color="white",
            )


def _draw_syncs(ax, lanes: Mapping, rows: list) -> list:
    """An arrow from the end of each sync's producer to the start of its consumer (syncs
    naming kernels not in `rows` are left out); the syncs drawn."""
    by_kernel = {r["kernel"]: r for r in rows}
    syncs = [(a, b) for a, b in lanes.get("syncs", []) if a in by_kernel and b in by_kernel]
    for a, b in syncs:
        p, c = by_kernel[a], by_kernel[b]
        ax.annotate(
            "",
            xy=(float(c["start_us"]), c["stream"]),
            xytext=(float(p["end_us"]), p["stream"]),
            arrowprops={"arrowstyle": "->", "color": "#c00", "lw": 0.8},
        )
    return syncs


def draw_streams(lanes: Mapping) -> Picture:
    """Stream lanes (Gantt): one row per stream, one bar per kernel from start_us to end_us
    coloured by tenant; arrows for the syncs between streams."""
    _check_keys("draw_streams", lanes, ["num_streams", "lanes"])
    rows = list(lanes["lanes"])
    tenants = _tenant_order(r["tenant"] for r in rows)
    colors = tenant_colors(tenants)
    n = max(int(lanes["num_streams"]), 1 + max((int(r["stream"]) for r in rows), default=0))
    fig = _figure(12, 1.6 + 0.55 * n)
    ax = fig.add_axes((0.08, 0.2, 0.9, 0.62))
    end = max((float(r["end_us"]) for r in rows), default=1.0) or 1.0
    _draw_lane_bars(ax, rows, colors, end)
    syncs = _draw_syncs(ax, lanes, rows)
    ax.set_yticks(range(n), [f"stream {i}" for i in range(n)])
    ax.set_ylim(n - 0.4, -0.6)
    ax.set_xlim(0, end * 1.01)
    ax.set_xlabel("time (us)")

    _tenant_legend(ax, colors, tenants)
    ax.set_title(
        f"{len(rows)} kernels on {n} stream(s), {len(syncs)} sync(s), makespan {end:.1f} us",
        fontsize=10,
    )
    return Picture(fig)


def draw_memory(timeline: Mapping) -> Picture:
    """Memory timeline: each tensor a rectangle at its arena offset across its lifetime
    (kernel indices first..last), coloured by tenant; arena size and lower bound marked."""
    _check_keys("draw_memory", timeline, ["kernels", "arena_bytes", "lower_bound_bytes", "tensors"])
    from matplotlib.patches import Rectangle

    tensors = list(timeline["tensors"])
    tenants = _tenant_order(t["tenant"] for t in tensors)
    colors = tenant_colors(tenants)
    kib = 1024.0
    arena, bound = timeline["arena_bytes"] / kib, timeline["lower_bound_bytes"] / kib
    fig = _figure(12, 4.5)
    ax = fig.add_axes((0.08, 0.14, 0.9, 0.7))
    top = max([arena, bound] + [(t["offset"] + t["size"]) / kib for t in tensors])
    for t in tensors:  # a few-byte tensor still gets a visible sliver
        r = Rectangle(
            (t["first"], t["offset"] / kib),
            t["last"] - t["first"] + 1,
            max(t["size"] / kib, 0.006 * top),
            facecolor=colors[t["tenant"]],
            edgecolor="white",
            linewidth=0.5,
            alpha=0.9,
        )
        r.set_gid(_gid("tensor", t["tensor"]))
        ax.add_patch(r)
    ax.axhline(arena, color="#222", linewidth=1.2, gid="arena-line")
    ax.axhline(bound, color="#c00", linewidth=1.0, linestyle="--", gid="lower-bound-line")
    ax.text(0, arena, f" arena {arena:.1f} KiB", va="bottom", fontsize=7)
    ax.text(
        len(timeline["kernels"]),
        bound,
        f"lower bound {bound:.1f} KiB ",
        va="top",
        ha="right",
        fontsize=7,
        color="#c00",
    )
    ax.set_xlim(0, max(1, len(timeline["kernels"])))
    ax.set_ylim(0, top * 1.08 or 1)
    ax.set_xlabel("kernel (execution order)")
    ax.set_ylabel("arena offset (KiB)")
    _tenant_legend(ax, colors, tenants)
    func = timeline.get("function", "")
    ax.set_title(
        f"memory of {func}: {len(tensors)} tensors in an arena of {arena:.1f} KiB "
        f"(lower bound {bound:.1f} KiB)",
        fontsize=10,
    )
    return Picture(fig)


def draw_passes(rows: Sequence[Mapping]) -> Picture:
    """Nodes, kernels and weight bytes after each pass, one panel each."""
    rows = [pass_row(r) for r in rows]
    if not rows:
        raise MTCompileError("draw_passes needs at least one pass row")
    names = [r["name"] for r in rows]
    panels = [
        ("nodes_after", "nodes", 1),
        ("kernels_after", "kernels", 1),
        ("weight_bytes_after", "weights (MiB)", 1 << 20),
    ]
    panels = [p for p in panels if any(r[p[0]] is not None for r in rows)]
    fig = _figure(3.6 * len(panels), 2.8)
    for i, (key, label, scale) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        vals = [(r[key] or 0) / scale for r in rows]
        bars = ax.bar(
            range(len(rows)), vals, color=["#4e79a7" if r["changed"] else "#b0b0b0" for r in rows]
        )
        for b, v in zip(bars, vals, strict=True):
            ax.text(
                b.get_x() + b.get_width() / 2, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7
            )
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{label} after each pass", fontsize=9)
        ax.margins(y=0.15)
    fig.suptitle("per-pass summary (grey: the pass changed nothing)", fontsize=10)
    fig.subplots_adjust(bottom=0.3, wspace=0.35, top=0.8)
    return Picture(fig)


def install_display() -> bool:
    """Make Jupyter show a `Graph` as its drawing (the IR imports no drawing code, so the
    picture is registered here, on import of this module). False outside IPython."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None:
        return False
    shell.display_formatter.formatters["image/svg+xml"].for_type(Graph, lambda g: draw_graph(g).svg)
    return True


install_display()

__all__ = [
    "graph_view",
    "node_kind",
    "pass_row",
    "draw_graph",
    "draw_summary",
    "draw_streams",
    "draw_memory",
    "draw_passes",
    "install_display",
    "tenant_colors",
    "Picture",
]
