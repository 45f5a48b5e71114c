"""A self-contained HTML report of a bundle (tables and inline SVG pictures), made from its
manifest alone so that offline pipelines can report on a saved bundle without TVM."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from mtcompile.abi import RUN_ALL
from mtcompile.analysis.manager import AnalysisManager
from mtcompile.analysis.memory import MemoryPlan
from mtcompile.errors import ArtifactError
from mtcompile.ir.view import call_name
from mtcompile.native.table import SYMBOLS
from mtcompile.runtime import artifact
from mtcompile.runtime.abi import MANIFEST
from mtcompile.runtime.manifest import Manifest, signature_text
from mtcompile.tools import viz

_CSS = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1300px; }
h1 { font-size: 22px; } h2 { font-size: 17px; border-bottom: 1px solid #ccc; margin-top: 28px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pic svg { max-width: 100%; height: auto; } .note { color: #a33; font-style: italic; }
details { margin: 6px 0; } summary { cursor: pointer; font-weight: bold; }
"""


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest of a saved bundle directory, or one clear `ArtifactError`."""
    d = Path(directory)
    if not d.is_dir():
        raise ArtifactError(f"{d} is not a directory (expected a bundle written by save)")
    if not (d / MANIFEST).is_file():
        raise ArtifactError(f"{d} is not a bundle: it has no {MANIFEST}")
    return artifact.read_manifest(d)


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _table(head: list[str], rows: list[list[Any]]) -> str:
    def cell(v):
        num = isinstance(v, int | float) and not isinstance(v, bool)
        return f"<td class='num'>{v}</td>" if num else f"<td>{escape(str(v))}</td>"

    body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
    return (
        "<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>" + body + "</table>"
    )


def _pic(picture: viz.Picture) -> str:
    svg = picture.svg
    picture.figure.clear()  # figures hold a lot of memory; the SVG text is all we keep
    return f"<div class='pic'>{svg}</div>"


def _missing(what: str, key: str) -> str:
    return (
        f"<p class='note'>{escape(what)}: not available in this bundle (its manifest has "
        f"no '{escape(key)}').</p>"
    )


def kernel_name(symbol: str) -> str:
    """A profiled function by kernel and epilogue (``native matmul[packed]+bias+relu``) when
    it is a library kernel of the table; its symbol otherwise (TVM kernels, VM builtins)."""
    form = SYMBOLS.get(symbol)
    if form is None:
        return symbol
    return f"{form.provider} " + call_name(
        {
            "kernel": form.kernel.name,
            "variant": form.kernel.variant,
            "bias": form.bias,
            "epilogue": form.epilogue,
        }
    )


def library_calls_section(view: dict | None) -> str:
    """The merged graph's library calls, by kernel and epilogue: how many, for which tenants."""
    if not view:
        return ""
    rows: dict[str, list] = {}
    for n in view["nodes"]:
        call = n.get("call")
        if call:
            key = f"{call['provider']} {call_name(call)}"
            row = rows.setdefault(key, [key, 0, set(), call["symbol"]])
            row[1] += 1
            row[2].update(view["tenants"][t] for t in n["tenants"])
    if not rows:
        return "<h2>Library calls</h2><p class='note'>none: every op is TVM code.</p>"
    body = [[k, c, ", ".join(sorted(t)), sym] for k, c, t, sym in sorted(rows.values())]
    return "<h2>Library calls</h2>" + _table(["kernel", "calls", "tenants", "symbol"], body)


def verify_section(result: dict | None) -> str:
    """The build's numerics check (`CompiledBundle.verify`): per tenant output, ok or not and
    its errors against the source model."""
    if result is None:
        return ""
    rows = []
    for name, entry in result["tenants"].items():
        if "error" in entry:
            rows.append([name, "-", "FAIL", entry["error"], "-"])
            continue
        for i, o in enumerate(entry["outputs"]):
            ok = o["ok"] and entry["run_all_ok"]
            rows.append(
                [
                    name,
                    f"output{i}",
                    "ok" if ok else "FAIL",
                    o.get("error") or f"{o['max_abs']:.2e}",
                    f"{o.get('max_rel', 0):.2e}",
                ]
            )
    head = f"<h2>Numerics: {'PASS' if result['ok'] else 'FAIL'}</h2>"
    return head + _table(["tenant", "output", "status", "max abs", "max rel"], rows)


def profile_section(result: dict | None) -> str:
    """The per-kernel profile by tenant (`Bundle.profile`): library kernels named by kernel
    and epilogue."""
    if result is None:
        return ""
    rows = [
        [t, kernel_name(k["name"]), k["calls"], round(k["total_us"], 1), f"{100 * k['share']:.1f}%"]
        for t, p in result["tenants"].items()
        for k in p["kernels"]
    ]
    return f"<h2>Profile (median of {result['repeat']} runs)</h2>" + _table(
        ["tenant", "kernel", "calls", "us", "share"], rows
    )


def _build_section(manifest: Manifest) -> str:
    rows = []
    for t in manifest.tenant_order:
        s = manifest.tenants[t]
        rows.append([t, s.source, signature_text(s.inputs), signature_text(s.outputs)])
    g = manifest.graph
    facts = [
        ["nodes (merged, after passes)", g.nodes],
        ["constants", g.constants],
        ["weights stored", _fmt_bytes(g.weight_bytes)],
        ["weights of the tenants separately", _fmt_bytes(g.weight_bytes_before_merge)],
        ["pipeline", " -> ".join(p.name for p in manifest.pipeline) or "none"],
        ["kernel providers", ", ".join(f"{k}: {v}" for k, v in sorted(manifest.kernels.items()))],
    ]
    return (
        "<h2>Tenants</h2>"
        + _table(["tenant", "source", "inputs", "outputs"], rows)
        + "<h2>Build</h2>"
        + _table(["what", "value"], facts)
    )


def _passes_section(view: dict | None) -> str:
    if not (view and view.get("passes")):
        return "<h2>Passes</h2>" + _missing("per-pass summary", "graph_view")
    prow = [
        [
            r["name"],
            "yes" if r["changed"] else "no",
            r["nodes_after"],
            r["kernels_after"] if r["kernels_after"] is not None else "-",
            _fmt_bytes(r["weight_bytes_after"]),
        ]
        for r in map(viz.pass_row, view["passes"])
    ]
    return (
        "<h2>Passes</h2>"
        + _table(["pass", "changed", "nodes after", "kernels after", "weights after"], prow)
        + _pic(viz.draw_passes(view["passes"]))
    )


def _graph_section(view: dict | None) -> str:
    if not view:
        return "<h2>Merged graph</h2>" + _missing("graph structure", "graph_view")
    out = ["<h2>Merged graph</h2>", _pic(viz.draw_graph(view))]
    for t in view["tenants"]:
        n = len(viz.select(view, t))
        if len(view["nodes"]) > viz.MAX_NODES and n <= viz.MAX_NODES:
            out.append(
                f"<details><summary>tenant {escape(t)} ({n} nodes)</summary>"
                + _pic(viz.draw_graph(view, tenant=t))
                + "</details>"
            )
    return "\n".join(out)


def _streams_section(streams: dict | None) -> str:
    if streams and streams.get("lanes"):
        return "<h2>Stream lanes</h2>" + _pic(viz.draw_streams(streams))
    # no assignment, or only its summary (e.g. one stream): nothing to draw
    return "<h2>Stream lanes</h2>" + _missing("stream lanes", "streams.lanes")


def _memory_section(t: dict | None) -> str:
    if not t:
        return "<h2>Memory</h2>" + _missing("memory plan", "memory.timeline")
    return (
        "<h2>Memory</h2>"
        + _table(
            ["function", "tensors", "arena", "lower bound"],
            [
                [
                    t.get("function", ""),
                    len(t["tensors"]),
                    _fmt_bytes(t["arena_bytes"]),
                    _fmt_bytes(t["lower_bound_bytes"]),
                ]
            ],
        )
        + _pic(viz.draw_memory(t))
    )


def sections(
    manifest: Manifest,
    memory: dict | None = None,
    streams: dict | None = None,
    checks: dict | None = None,
    profile: dict | None = None,
) -> str:
    """The report body: tables and pictures of `manifest` (memory timeline and stream lanes
    default to the manifest's own), with the numerics check's results (`checks`) and the
    per-kernel profile (`profile`) when given."""
    view = manifest.graph_view
    memory = memory or (manifest.memory.timeline if manifest.memory else None)
    return "\n".join(
        [
            _build_section(manifest),
            _passes_section(view),
            _graph_section(view),
            library_calls_section(view),
            verify_section(checks),
            profile_section(profile),
            _streams_section(streams or manifest.streams.view()),
            _memory_section(memory),
        ]
    )


def render(
    manifest: Manifest,
    memory: dict | None = None,
    streams: dict | None = None,
    checks: dict | None = None,
    profile: dict | None = None,
) -> str:
    """A whole self-contained HTML page (inline CSS and SVG, no scripts, no links)."""
    name = escape(manifest.name)
    v = manifest.versions
    sub = f"target {escape(manifest.target)}, " + ", ".join(
        f"{escape(k)} {escape(str(x))}" for k, x in sorted(v.items())
    )
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>mtcompile report: "
        f"{name}</title><style>{_CSS}</style></head><body><h1>mtcompile bundle {name}</h1>"
        f"<p>{sub}</p>{sections(manifest, memory, streams, checks, profile)}</body></html>\n"
    )


def write_report(
    directory: str | Path, out: str | Path, checks: dict | None = None, profile: dict | None = None
) -> Path:
    """Render the report of the saved bundle in `directory` into the file `out` (with the
    numerics check's results and the profile, when given)."""
    html = render(read_manifest(directory), checks=checks, profile=profile)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html)
    return path


def bundle_html(bundle, checks: dict | None = None, profile: dict | None = None) -> str:
    """Rich display of a Bundle: the report body, with the memory timeline and stream lanes
    of its report when the manifest has none (and `checks`, `profile` when given)."""
    rep = bundle.report()
    memory = (rep.get("memory") or {}).get("timeline") or graph_timeline(
        getattr(bundle, "analyses", None)
    )
    body = sections(bundle.manifest, memory, rep.get("streams"), checks, profile)
    return f"<div><b>mtcompile bundle {escape(bundle.manifest.name)}</b>{body}</div>"


def graph_timeline(analyses: AnalysisManager | None, function: str = RUN_ALL) -> dict | None:
    """The memory timeline of `function`'s `MemoryPlan` in `analyses` (a compiled bundle's
    `AnalysisManager`), if ``plan-memory`` computed one."""
    plan = analyses.cached(function, MemoryPlan) if analyses is not None else None
    return plan.functions[function].timeline() if plan and function in plan.functions else None
