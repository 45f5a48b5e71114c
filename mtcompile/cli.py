"""The `mtcompile` command line: build, run, inspect, demo, passes."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from mtcompile.errors import InputError, MTCompileError
from mtcompile.runtime.manifest import Manifest, MemoryInfo, TenantSig, signature_text


def _say(msg: str) -> None:
    print(msg, flush=True)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def print_verify(result: dict) -> None:
    """One line per tenant output: ok/FAIL with the max abs and relative error."""
    for name, entry in result["tenants"].items():
        if "error" in entry:
            _say(f"  {name:<12} FAIL  {entry['error']}")
            continue
        for i, o in enumerate(entry["outputs"]):
            status = "ok  " if o["ok"] and entry["run_all_ok"] else "FAIL"
            detail = o.get("error") or f"max_abs={o['max_abs']:.2e}  max_rel={o['max_rel']:.2e}"
            _say(f"  {name:<12} {status}  output{i}: {detail}")
    _say(f"numerics: {'PASS' if result['ok'] else 'FAIL'} (tolerance {result['atol']:g} abs, "
         "run and run_all vs the source model)")


def _compile(tenants, name: str, target: str, passes, options, args) -> object:
    import mtcompile
    from mtcompile.pass_infra import DumpToDir, PrintAfter

    instruments = []
    if getattr(args, "dump_passes", None):
        instruments.append(DumpToDir(args.dump_passes))
    if getattr(args, "print_after", None):
        instruments.append(PrintAfter(None if args.print_after == "all"
                                      else args.print_after.split(",")))
    if getattr(args, "passes", None) is not None:
        passes = [p for p in args.passes.split(",") if p]
    return mtcompile.compile(tenants, target=target, passes=passes, pass_options=options,
                             name=name, kernels=parse_kernels(getattr(args, "kernels", None)),
                             tuning_db=getattr(args, "tuning_db", None), instruments=instruments,
                             progress=_say, cpu=getattr(args, "cpu", None) or "host",
                             threads=getattr(args, "threads", None))


def parse_kernels(text: str | None) -> str | dict[str, str] | None:
    """``native``, ``torch``, ``tvm`` or ``matmul=tvm,conv2d=torch`` -> what `compile` takes."""
    if not text or "=" not in text:
        return text
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if any(len(p) != 2 for p in pairs):
        raise MTCompileError(f"--kernels {text!r}: expected PROVIDER or KIND=PROVIDER,...")
    return dict(pairs)


def cmd_build(args) -> int:
    from mtcompile.tools.spec import load_spec

    spec = load_spec(args.spec)
    target = args.target or spec.target
    _say(f"building {len(spec.tenants)} tenant(s) from {args.spec} for {target}")
    bundle = _compile(spec.tenants, spec.name, target, spec.passes, spec.pass_options, args)
    ok = True
    if not args.no_verify:
        t0 = time.perf_counter()
        result = bundle.verify()
        _say(f"verify   {time.perf_counter() - t0:7.2f} s")
        print_verify(result)
        ok = result["ok"]
    out = bundle.save(args.output)
    lib = out / bundle.manifest.library
    _say(f"saved {lib} ({_fmt_bytes(lib.stat().st_size)}) and {out / 'manifest.json'}")
    return 0 if ok else 2


def _parse_inputs(items: list[str], sig: TenantSig, tenant: str) -> list[np.ndarray]:
    given = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"--input {item!r}: expected NAME=FILE.npy")
        k, v = item.split("=", 1)
        try:
            given[k] = np.load(v, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(f"--input {k}: cannot read {v!r} as .npy: {e}") from e
    names = [s.name for s in sig.inputs]
    if set(given) != set(names):
        raise InputError(f"tenant '{tenant}' takes inputs ({signature_text(sig.inputs)}); got "
                         f"{sorted(given) or 'none'}")
    return [given[n] for n in names]


def cmd_run(args) -> int:
    import mtcompile

    bundle = mtcompile.load(args.bundle, threads=args.threads)
    sig = bundle.signature(args.tenant)
    outs = bundle.run(args.tenant, *_parse_inputs(args.input, sig, args.tenant))
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    for spec, arr in zip(sig.outputs, outs, strict=True):
        path = out_dir / f"{args.tenant}.{spec.name}.npy"
        np.save(path, arr)
        _say(f"wrote {path}  {arr.dtype}{list(arr.shape)}")
    return 0


def describe(manifest: Manifest, library_bytes: int | None = None) -> str:
    """A readable summary of a bundle manifest."""
    m = manifest
    lines = [f"bundle {m.name!r}  target={m.target}  format={m.format}"]
    if library_bytes is not None:
        lines.append(f"library  {m.library} ({_fmt_bytes(library_bytes)})")
    v = m.versions
    lines.append("built by " + ", ".join(f"{k} {v[k]}" for k in sorted(v)))
    if m.cpu is not None:
        lines.append(f"cpu      {m.cpu} ({len(m.cpu_features or ())} LLVM features; loading "
                     "needs them)")
    g = m.graph
    lines.append(f"graph    {g.nodes} nodes, {g.constants} constants, weights "
                 f"{_fmt_bytes(g.weight_bytes)} (tenants separately: "
                 f"{_fmt_bytes(g.weight_bytes_before_merge)})")
    lines.append("pipeline " + (" -> ".join(p.name for p in m.pipeline) or "(none)"))
    lines.append("kernels  " + ", ".join(f"{k}: {v}" for k, v in sorted(m.kernels.items()))
                 + (f"; tuning database {m.tuning_db}" if m.tuning_db else ""))
    if m.memory is not None:
        lines.append(_memory_line(m.memory))
    lines.append("tenants")
    for t in m.tenant_order:
        s = m.tenants[t]
        lines.append(f"  {t:<12} [{s.source}, sha256 {s.source_sha256[:12]}]  "
                     f"({signature_text(s.inputs)}) -> ({signature_text(s.outputs)})")
    lines.append("entries  " + ", ".join(m.tenant_order) + ", run_all")
    return "\n".join(lines)


def _memory_line(mem: MemoryInfo) -> str:
    """run_all's arena against its lower bound, TVM's own plan, no planning, and the
    tenants' plans compiled separately."""
    if not mem.planned:
        return (f"memory   run_all: TVM's plan {_fmt_bytes(mem.tvm_plan_bytes)} "
                "(plan-memory not in the pipeline)")
    return (f"memory   run_all arena {_fmt_bytes(mem.arena_bytes)} (lower bound "
            f"{_fmt_bytes(mem.lower_bound_bytes)}, TVM's plan "
            f"{_fmt_bytes(mem.tvm_plan_bytes)}, no planning {_fmt_bytes(mem.naive_bytes)}, "
            f"tenants compiled separately {_fmt_bytes(mem.separate_plans_bytes)})")


def cmd_inspect(args) -> int:
    import mtcompile

    bundle = mtcompile.load(args.bundle)
    if args.json:
        print(bundle.manifest.to_json(), end="")
        return 0
    lib = Path(args.bundle) / bundle.manifest.library
    _say(describe(bundle.manifest, lib.stat().st_size))
    return 0


def cmd_tune(args) -> int:
    from mtcompile.api import tune
    from mtcompile.tools.spec import load_spec

    spec = load_spec(args.spec)
    _say(f"tuning {len(spec.tenants)} tenant(s) from {args.spec} into {args.output}")
    res = tune(spec.tenants, args.output, args.trials, spec.passes, spec.pass_options,
               kernels=parse_kernels(args.kernels) or "tvm", progress=_say)
    _say(f"tasks: {res['tasks']} in the merged module, {res['tasks_tenants_alone']} for the "
         f"tenants compiled alone ({res['tasks_removed_by_merge']} removed by merging)")
    _say(f"records: {res['records']} in {args.output}, {res['seconds']:.1f} s; build with "
         f"--tuning-db {args.output} --kernels {args.kernels or 'tvm'}")
    return 0


def cmd_profile(args) -> int:
    import mtcompile

    bundle = mtcompile.load(args.bundle, threads=args.threads)
    prof = bundle.profile(repeat=args.repeat)
    for name, p in prof["tenants"].items():
        _say(f"{name}: {p['total_us']:.0f} us in {sum(k['calls'] for k in p['kernels'])} calls")
        for k in p["kernels"][:args.top]:
            _say(f"  {100 * k['share']:5.1f}%  {k['total_us']:9.1f} us  x{k['calls']:<3} "
                 f"{k['name']}")
    return 0


def cmd_demo(args) -> int:
    from mtcompile.models import get_set

    tenants = get_set(args.set, batch=args.batch)
    _say(f"demo set {args.set!r}: {len(tenants)} tenants ({', '.join(t.name for t in tenants)}), "
         f"batch {args.batch}")
    bundle = _compile(tenants, args.set.replace("-", "_"), "llvm", None, None, args)
    out = bundle.save(args.output)
    _say(f"saved {out / bundle.manifest.library}")
    _say(describe(bundle.manifest))
    inputs = {t.name: t.example_inputs for t in tenants}
    t0 = time.perf_counter()
    outputs = bundle.run_all(inputs)
    first = time.perf_counter() - t0
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        bundle.run_all(inputs)
        times.append(time.perf_counter() - t0)
    _say(f"run_all  {1e3 * sorted(times)[10]:7.2f} ms median of 20 calls "
         f"(first call {1e3 * first:.1f} ms, with VM start-up)")
    for name, outs in outputs.items():
        _say(f"  {name:<12} -> " + ", ".join(f"{o.dtype}{list(o.shape)}" for o in outs))
    result = bundle.verify(inputs)
    print_verify(result)
    return 0 if result["ok"] else 2


def cmd_report(args) -> int:
    from mtcompile.tools.html_report import write_report

    out = write_report(args.bundle, args.output)
    _say(f"wrote {out} ({out.stat().st_size // 1024} KiB, self-contained HTML)")
    return 0


def cmd_passes(args) -> int:
    import mtcompile.passes as passes
    from mtcompile.pass_infra import REGISTRY

    for name in sorted(REGISTRY):
        doc = (sys.modules[REGISTRY[name].__module__].__doc__ or "").strip().splitlines()
        default = " (default)" if name in passes.DEFAULT_PIPELINE else ""
        _say(f"{name}{default}: {doc[0].split(':', 1)[-1].strip() if doc else ''}")
    return 0


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtcompile", description="Compile several models into one "
                                "multi-tenant TVM executable.")
    sub = p.add_subparsers(dest="command", required=True)

    def pass_flags(sp):
        sp.add_argument("--kernels", metavar="PROVIDER", help="heavy-op provider: native | torch | "
                        "tvm | matmul=tvm,conv2d=torch (default: native on CPU)")
        sp.add_argument("--passes", help="comma-separated pass names (default pipeline if absent)")
        sp.add_argument("--dump-passes", metavar="DIR", help="write the graph after each pass")
        sp.add_argument("--print-after", metavar="PASSES", help="print the graph after these "
                        "passes (comma-separated, or 'all')")
        sp.add_argument("--cpu", default="host", help="CPU the kernels are compiled for: host "
                        "(this machine's, default) | generic (any x86-64) | an LLVM CPU name")
        threads_flag(sp)

    def threads_flag(sp):
        sp.add_argument("--threads", type=_positive, metavar="N", help="TVM thread pool size "
                        "(default: the machine's cores; TVM_NUM_THREADS, if set, wins)")

    b = sub.add_parser("build", help="build a TOML spec of tenants into OUT/")
    b.add_argument("spec")
    b.add_argument("-o", "--output", required=True, help="output directory")
    b.add_argument("--target", choices=["llvm", "cuda"], help="override the spec's target")
    b.add_argument("--no-verify", action="store_true", help="skip the numerics check")
    b.add_argument("--tuning-db", metavar="DIR", help="apply schedules written by `tune`")
    pass_flags(b)
    b.set_defaults(fn=cmd_build)

    r = sub.add_parser("run", help="run one tenant of a saved bundle on .npy inputs")
    r.add_argument("bundle")
    r.add_argument("--tenant", required=True)
    r.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy")
    r.add_argument("-o", "--output", default="outputs", help="directory for <tenant>.<output>.npy")
    threads_flag(r)
    r.set_defaults(fn=cmd_run)

    i = sub.add_parser("inspect", help="summarize a saved bundle")
    i.add_argument("bundle")
    i.add_argument("--json", action="store_true", help="print the whole manifest")
    i.set_defaults(fn=cmd_inspect)

    d = sub.add_parser("demo", help="build, run and check a bundled demo tenant set")
    d.add_argument("--set", default="heterogeneous",
                   choices=["heterogeneous", "same-arch", "shared-backbone", "bert4", "mixed"])
    d.add_argument("--batch", type=int, default=1)
    d.add_argument("-o", "--output", default="out/demo")
    pass_flags(d)
    d.set_defaults(fn=cmd_demo)

    t = sub.add_parser("tune", help="tune the TVM kernels of a spec into a database (offline)")
    t.add_argument("spec")
    t.add_argument("-o", "--output", required=True, help="database directory")
    t.add_argument("--trials", type=int, default=64, help="trials per task")
    t.add_argument("--kernels", default="tvm", help="providers the build will use (default tvm)")
    t.set_defaults(fn=cmd_tune)

    pr = sub.add_parser("profile", help="time per kernel of a saved bundle, by tenant")
    pr.add_argument("bundle")
    pr.add_argument("--repeat", type=int, default=10)
    pr.add_argument("--top", type=int, default=8, help="kernels shown per tenant")
    threads_flag(pr)
    pr.set_defaults(fn=cmd_profile)

    rp = sub.add_parser("report", help="write a self-contained HTML report of a saved bundle")
    rp.add_argument("bundle")
    rp.add_argument("-o", "--output", default="report.html", help="HTML file to write")
    rp.set_defaults(fn=cmd_report)

    ps = sub.add_parser("passes", help="list the registered passes")
    ps.set_defaults(fn=cmd_passes)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # torch and TVM importers warn about their own internals; users cannot act on those.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        return args.fn(args)
    except MTCompileError as e:
        print(f"mtcompile: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mtcompile: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
