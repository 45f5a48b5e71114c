"""The `mtcompile` command line: build, run, inspect, tune, demo, profile, report, passes.

Made for pipelines: logs (stage lines, warnings) go to stderr through `logging` (``-v`` /
``-q``), results to stdout, ``--json`` makes stdout one JSON document, a progress bar shows
long work on a terminal, and each failure class has its own exit code (`EXIT_CODES`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

from mtcompile.errors import InputError, MTCompileError
from mtcompile.runtime.manifest import Manifest, MemoryInfo, TenantSig, signature_text
from mtcompile.version import __version__

EXIT_OK, EXIT_INPUT, EXIT_USAGE, EXIT_NUMERICS, EXIT_INTERNAL = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130
EXIT_STDOUT_CLOSED = 141  # 128 + SIGPIPE, what a shell reports for a tool a pipe's reader left
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_INPUT: "bad input: spec, model, tuning database, inputs or bundle files (one line "
    "'mtcompile: error: ...' on stderr)",
    EXIT_USAGE: "usage: unknown command or option, bad option value",
    EXIT_NUMERICS: "numerics failure: the bundle (saved) differs from the source models "
    "beyond --atol/--rtol",
    EXIT_INTERNAL: "internal error: a bug in mtcompile or TVM (-v prints the traceback)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
    EXIT_STDOUT_CLOSED: "stdout closed early: its reader exited (e.g. `| head`); says nothing",
}
log = logging.getLogger("mtcompile")


class _StderrHandler(logging.StreamHandler):
    """Writes to what ``sys.stderr`` is when a record comes (a progress bar redirects it,
    so that lines print above the bar; tests capture it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        return msg if record.levelno < logging.WARNING else f"mtcompile: warning: {msg}"


def setup_logging(verbosity: int) -> None:
    """The ``mtcompile`` logger to stderr: INFO by default, DEBUG with -v, WARNING with -q."""
    for h in [h for h in log.handlers if isinstance(h, _StderrHandler)]:
        log.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    log.addHandler(handler)
    log.setLevel(
        logging.DEBUG if verbosity > 0 else logging.INFO if verbosity == 0 else logging.WARNING
    )


class Progress:
    """Logs each progress line and, on a terminal (not with -q), advances a progress bar
    on stderr by one of `total` steps (rich's; plain lines when rich is missing)."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.bar = self.task = self.trials_task = None
        self.measured = 0
        if not enabled:
            return
        try:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
            )
            from rich.progress import Progress as Bar
        except ImportError:
            return
        self.bar = Bar(
            TextColumn("{task.description:<24}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.task = self.bar.add_task(label, total=total)

    def __enter__(self) -> Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, msg: str) -> None:
        log.info(msg)
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=(msg.split() or [""])[0][:24])

    def trials(self, n: int, total: int) -> None:
        """MetaSchedule measured `n` more candidates, of at most `total` (a bar of its own)."""
        self.measured += n
        if self.bar is None:
            log.info(f"trials   {self.measured}/{total}")
            return
        if self.trials_task is None:
            self.trials_task = self.bar.add_task("trials", total=total)
        self.bar.update(self.trials_task, advance=n)


def _progress(args, total: int, label: str) -> Progress:
    return Progress(total, label, sys.stderr.isatty() and args.verbose >= 0)


def _say(args, text: str) -> None:
    """A result line on stdout (nothing with --json: stdout is then one JSON document)."""
    if not args.json:
        print(text, flush=True)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def verify_lines(result: dict) -> list[str]:
    """One line per tenant output: ok/FAIL with the max abs and relative error."""
    lines = []
    for name, entry in result["tenants"].items():
        if "error" in entry:
            lines.append(f"  {name:<12} FAIL  {entry['error']}")
            continue
        for i, o in enumerate(entry["outputs"]):
            status = "ok  " if o["ok"] and entry["run_all_ok"] else "FAIL"
            detail = o.get("error") or f"max_abs={o['max_abs']:.2e}  max_rel={o['max_rel']:.2e}"
            lines.append(f"  {name:<12} {status}  output{i}: {detail}")
            if o.get("warning"):
                lines.append(f"  {'':<12} note  output{i}: {o['warning']}")
    atol, rtol = result.get("atol"), result.get("rtol")
    bf16 = any(e.get("precision") == "bfloat16 kernels" for e in result["tenants"].values())
    tol = (
        "by each output's dtype and scale (float32: 1e-4 x max|source|"
        + ("; with bfloat16 kernels 2e-2" if bf16 else "")
        + ")"
        if atol is None and rtol is None
        else f"{atol or 0:g} abs + {rtol or 0:g} x max|source|"
    )
    lines.append(
        f"numerics: {'PASS' if result['ok'] else 'FAIL'} (tolerance {tol}, "
        "run and run_all vs the source model)"
    )
    return lines


def _cache_option(args):
    """What `compile(cache=...)` gets from --no-cache / --cache-dir."""
    if getattr(args, "no_cache", True):
        return None
    return args.cache_dir or True


def _compile(
    tenants, name: str, target: str, passes, options, args, progress, subsets=()
) -> object:
    import mtcompile
    from mtcompile.pass_infra import DumpToDir, PrintAfter

    instruments = []
    if getattr(args, "dump_passes", None):
        instruments.append(DumpToDir(args.dump_passes))
    if getattr(args, "print_after", None):
        instruments.append(
            PrintAfter(None if args.print_after == "all" else args.print_after.split(","))
        )
    if getattr(args, "passes", None) is not None:
        passes = [p for p in args.passes.split(",") if p]
    if getattr(args, "kernel_precision", None) is not None:
        offload = {**(options or {}).get("offload-library", {})}
        offload["precision"] = args.kernel_precision
        options = {**(options or {}), "offload-library": offload}
    return mtcompile.compile(
        tenants,
        target=target,
        passes=passes,
        pass_options=options,
        name=name,
        kernels=parse_kernels(getattr(args, "kernels", None)),
        tuning_db=getattr(args, "tuning_db", None),
        instruments=instruments,
        progress=progress,
        cpu=getattr(args, "cpu", None) or "host",
        threads=getattr(args, "threads", None),
        cache=_cache_option(args),
        subsets=subsets,
    )


def parse_kernels(text: str | None) -> str | dict[str, str] | None:
    """``native``, ``torch``, ``tvm`` or ``matmul=tvm,conv2d=torch`` -> what `compile` takes."""
    if not text or "=" not in text:
        return text
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if any(len(p) != 2 for p in pairs):
        raise MTCompileError(f"--kernels {text!r}: expected PROVIDER or KIND=PROVIDER,...")
    return dict(pairs)


def _verify(bundle, args, inputs=None) -> dict:
    """Verify a saved bundle: the result, or ``{"ok": None, "skipped": why}`` when it cannot
    run here (an ONNX tenant without onnxruntime): said, not fatal, the bundle is saved."""
    t0 = time.perf_counter()
    try:
        result = bundle.verify(inputs, atol=args.atol, rtol=args.rtol)
    except MTCompileError as e:
        log.warning("numerics not checked: %s (the bundle is saved)", e)
        return {"ok": None, "skipped": str(e)}
    log.info(f"verify   {time.perf_counter() - t0:7.2f} s")
    for line in verify_lines(result):
        _say(args, line)
    return result


def cmd_build(args) -> tuple[int, dict]:
    from mtcompile.runtime.artifact import sha256_file
    from mtcompile.tools.spec import load_spec

    spec = load_spec(args.spec)
    sign_key = _key(args, "sign_key_file")  # an unreadable key fails before the compile
    target = args.target or spec.target
    log.info(f"building {len(spec.tenants)} tenant(s) from {args.spec} for {target}")
    # steps: each tenant's import, then import, cache, merge, passes, lower, build, store, save
    with _progress(args, len(spec.tenants) + 8, "build") as progress:
        bundle = _compile(
            spec.tenants,
            spec.name,
            target,
            spec.passes,
            spec.pass_options,
            args,
            progress,
            spec.subsets,
        )
        t0 = time.perf_counter()
        # saved first: a failed or impossible check keeps it
        out = bundle.save(args.output, sign_key=sign_key)
        progress(f"save     {time.perf_counter() - t0:7.2f} s")
    lib = out / bundle.manifest.library
    log.info(f"saved {lib} ({_fmt_bytes(lib.stat().st_size)}) and {out / 'manifest.json'}")
    report = bundle.compile_report
    doc = {
        "command": "build",
        "output": str(out),
        "library": str(lib),
        "library_bytes": lib.stat().st_size,
        "library_sha256": sha256_file(lib),
        "manifest_sha256": sha256_file(out / "manifest.json"),
        "cache": report.get("cache"),
        "stages_s": report.get("stages_s", {}),
    }
    doc["verify"] = None if args.no_verify else _verify(bundle, args)
    code = EXIT_NUMERICS if doc["verify"] and doc["verify"]["ok"] is False else EXIT_OK
    return code, {**doc, "ok": code == EXIT_OK, "exit_code": code}


def _key(args, option: str) -> bytes | None:
    """The key in the file `option` names (`signing.read_key_file`), None without it."""
    from mtcompile.runtime.signing import read_key_file

    path = getattr(args, option, None)
    return None if path is None else read_key_file(path, "--" + option.replace("_", "-"))


def _load(args):
    """The bundle `args.bundle`, its signature checked with --verify-key-file; a signed
    bundle loaded without a key is said (its signature is not checked)."""
    import mtcompile

    key = _key(args, "verify_key_file")
    bundle = mtcompile.load(args.bundle, threads=args.threads, verify_key=key)
    if bundle.manifest.bundle_signature is not None and key is None:
        log.warning(
            f"{args.bundle}: the bundle is signed; its signature is NOT verified "
            "(no --verify-key-file)"
        )
    return bundle


def _parse_inputs(items: list[str], sig: TenantSig, tenant: str) -> list[np.ndarray]:
    given = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"--input {item!r}: expected NAME=FILE.npy")
        k, v = item.split("=", 1)
        if Path(v).exists() and not Path(v).is_file():  # /dev/zero would be read forever
            raise InputError(f"--input {k}: {v} is not a regular file")
        try:
            given[k] = np.load(v, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(f"--input {k}: cannot read {v!r} as .npy: {e}") from e
    names = [s.name for s in sig.inputs]
    if set(given) != set(names):
        raise InputError(
            f"tenant '{tenant}' takes inputs ({signature_text(sig.inputs)}); got "
            f"{sorted(given) or 'none'}"
        )
    return [given[n] for n in names]


def cmd_run(args) -> tuple[int, dict]:
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(
            f"-o {out_dir}: is a file, not a directory (outputs are written into "
            "a directory as <tenant>.<output>.npy, replacing files of those names)"
        )
    bundle = _load(args)
    sig = bundle.signature(args.tenant)
    outs = bundle.run(args.tenant, *_parse_inputs(args.input, sig, args.tenant))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"-o {out_dir}: cannot make the output directory: {e}") from e
    written = []
    for spec, arr in zip(sig.outputs, outs, strict=True):
        path = out_dir / spec.file  # the name the build recorded: safe, unique
        np.save(path, arr)
        written.append(
            {
                "name": spec.name,
                "path": str(path),
                "dtype": str(arr.dtype),
                "shape": list(arr.shape),
            }
        )
        _say(args, f"wrote {path}  {arr.dtype}{list(arr.shape)}")
    return EXIT_OK, {
        "command": "run",
        "tenant": args.tenant,
        "outputs": written,
        "ok": True,
        "exit_code": EXIT_OK,
    }


def describe(manifest: Manifest, library_bytes: int | None = None) -> str:
    """A readable summary of a bundle manifest."""
    m = manifest
    lines = [f"bundle {m.name!r}  target={m.target}  format={m.format}"]
    if library_bytes is not None:
        lines.append(f"library  {m.library} ({_fmt_bytes(library_bytes)})")
    v = m.versions
    lines.append("built by " + ", ".join(f"{k} {v[k]}" for k in sorted(v)))
    if m.cpu is not None:
        lines.append(
            f"cpu      {m.cpu} ({len(m.cpu_features or ())} LLVM features; loading needs them)"
        )
    g = m.graph
    lines.append(
        f"graph    {g.nodes} nodes, {g.constants} constants, weights "
        f"{_fmt_bytes(g.weight_bytes)} (tenants separately: "
        f"{_fmt_bytes(g.weight_bytes_before_merge)})"
    )
    lines.append("pipeline " + (" -> ".join(p.name for p in m.pipeline) or "(none)"))
    lines.append(
        "kernels  "
        + ", ".join(f"{k}: {v}" for k, v in sorted(m.kernels.items()))
        + (f"; tuning database {m.tuning_db}" if m.tuning_db else "")
        + (
            f"; bfloat16 dense layers and convs ({', '.join(sorted(bf16))})"
            if (bf16 := m.bf16_tenants())
            else ""
        )
    )
    if m.memory is not None:
        dynamic = any(s.dims for sig in m.tenants.values() for s in sig.inputs)
        lines.append(
            _memory_line(m.memory) + (" (dynamic dims at their upper bounds)" if dynamic else "")
        )
    lines.append("tenants")
    for t in m.tenant_order:
        s = m.tenants[t]
        lines.append(
            f"  {t:<12} [{s.source}, sha256 {s.source_sha256[:12]}]  "
            f"({signature_text(s.inputs)}) -> ({signature_text(s.outputs)})"
        )
    lines.append("entries  " + ", ".join(m.tenant_order) + ", run_all")
    return "\n".join(lines)


def _memory_line(mem: MemoryInfo) -> str:
    """run_all's arena against its lower bound, TVM's own plan, no planning, and the
    tenants' plans compiled separately."""
    if not mem.planned:
        return (
            f"memory   run_all: TVM's plan {_fmt_bytes(mem.tvm_plan_bytes)} "
            "(plan-memory not in the pipeline)"
        )
    return (
        f"memory   run_all arena {_fmt_bytes(mem.arena_bytes)} (lower bound "
        f"{_fmt_bytes(mem.lower_bound_bytes)}, TVM's plan "
        f"{_fmt_bytes(mem.tvm_plan_bytes)}, no planning {_fmt_bytes(mem.naive_bytes)}, "
        f"tenants compiled separately {_fmt_bytes(mem.separate_plans_bytes)})"
    )


def cmd_inspect(args) -> tuple[int, dict | None]:
    """The manifest read as JSON: no TVM, no device (the library is only measured)."""
    from mtcompile.runtime import footprint
    from mtcompile.runtime.artifact import read_manifest, sha256_file, verify_signature
    from mtcompile.runtime.contract import VERIFY_KEY_ENV
    from mtcompile.runtime.signing import state

    key = _key(args, "verify_key_file")
    if key is not None or os.environ.get(VERIFY_KEY_ENV):
        manifest, verified = verify_signature(args.bundle, key)
    else:
        manifest, verified = read_manifest(args.bundle), False
    signature = state(manifest.bundle_signature, verified)
    lib = Path(args.bundle) / manifest.library
    if not lib.is_file():
        log.warning(f"{lib}: the library the manifest names is missing")
    elif sha256_file(lib) != manifest.library_sha256:
        log.warning(
            f"{lib}: does not match the manifest's library_sha256 (another build's "
            "files?); `mtcompile.load` refuses it"
        )
    if args.json:  # the manifest says whether it is signed; stderr whether it was checked
        if signature["signed"] and not signature["verified"]:
            log.warning(f"{args.bundle}: {signature['note']}")
        print(manifest.to_json(), end="", flush=True)  # the manifest is the JSON document
        return EXIT_OK, None
    size = lib.stat().st_size if lib.is_file() else None
    _say(args, describe(manifest, size))
    _say(args, f"signature {signature['note']}")
    fp = footprint.report(manifest, None, size)  # nothing is loaded here: computed

    def part(k: str) -> str:
        return "?" if fp[k] is None else _fmt_bytes(fp[k])

    _say(
        args,
        f"resident (computed) runtime <= {part('runtime')} (its library files), code "
        f"{part('code')}, weights {part('weights')}, arena {part('arena')}; "
        "Bundle.footprint() measures them on load",
    )
    return EXIT_OK, None


def _log_task(args):
    """The callback that logs a task's row after each measured batch."""

    def on_task(row: dict) -> None:
        log.info(
            f"task {row['task']}: {row['trials'] - row['failed']}/{args.trials} trials "
            f"({row['failed']} failed), best "
            + ("-" if row["best_us"] is None else f"{row['best_us']:.2f} us")
        )

    return on_task


def _say_task_table(args, table: list[dict]) -> None:
    """Print the tuned tasks: trials, failed ones, best time and the tenants using each."""
    width = max(len("task"), *(len(r["task"]) for r in table))
    _say(args, f"{'task':<{width}}  trials  failed   best us  used by")
    for r in table:
        best = "-" if r["best_us"] is None else f"{r['best_us']:.2f}"
        _say(
            args,
            f"{r['task']:<{width}}  {r['trials']:>6}  {r['failed']:>6}  {best:>8}  "
            f"{', '.join(r['tenants']) or '-'}",
        )


def _say_tuned(args, res: dict) -> None:
    """Print what a tuning run did: tasks (merged and alone), the task table, records."""
    _say(
        args,
        f"tasks: {res['tasks']} in the merged module, {res['tasks_tenants_alone']} for "
        f"the tenants compiled alone ({res['tasks_removed_by_merge']} removed by merging)",
    )
    if res["table"]:
        _say_task_table(args, res["table"])
    _say(
        args,
        f"records: {res['records']} in {args.output} ({res['measured']} measured now, "
        f"{res['resumed_from']} before), {res['seconds']:.1f} s; build with "
        f"--tuning-db {args.output} --kernels {args.kernels or 'tvm'}",
    )


def cmd_tune(args) -> tuple[int, dict]:
    from mtcompile.api import tune
    from mtcompile.tools.spec import load_spec

    spec = load_spec(args.spec)
    log.info(f"tuning {len(spec.tenants)} tenant(s) from {args.spec} into {args.output}")
    # MetaSchedule logs its task tables to stdout (and to DIR/logs): to stderr, -v only
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(
        logging.DEBUG if args.verbose > 0 else logging.WARNING
    )
    with (
        _progress(args, len(spec.tenants) + 6, "tune") as progress,
        contextlib.redirect_stdout(sys.stderr),
    ):
        res = tune(
            spec.tenants,
            args.output,
            args.trials,
            spec.passes,
            spec.pass_options,
            kernels=parse_kernels(args.kernels) or "tvm",
            target=args.target,
            rpc_tracker=args.rpc_tracker,
            rpc_key=args.rpc_key,
            rpc_wait_s=args.rpc_wait,
            builders=args.builders,
            progress=progress,
            on_trials=progress.trials,
            on_task=_log_task(args),
        )
    _say_tuned(args, res)
    return EXIT_OK, {
        "command": "tune",
        "output": str(args.output),
        **res,
        "ok": True,
        "exit_code": EXIT_OK,
    }


def cmd_profile(args) -> tuple[int, dict]:
    bundle = _load(args)
    prof = bundle.profile(repeat=args.repeat)
    for name, p in prof["tenants"].items():
        _say(
            args, f"{name}: {p['total_us']:.0f} us in {sum(k['calls'] for k in p['kernels'])} calls"
        )
        for k in p["kernels"][: args.top]:
            _say(
                args,
                f"  {100 * k['share']:5.1f}%  {k['total_us']:9.1f} us  x{k['calls']:<3} "
                f"{k['name']}",
            )
    return EXIT_OK, {"command": "profile", **prof, "ok": True, "exit_code": EXIT_OK}


def cmd_demo(args) -> tuple[int, dict]:
    from mtcompile.models import get_set

    tenants = get_set(args.set, batch=args.batch)
    log.info(
        f"demo set {args.set!r}: {len(tenants)} tenants "
        f"({', '.join(t.name for t in tenants)}), batch {args.batch}"
    )
    with _progress(args, len(tenants) + 6, "demo") as progress:
        bundle = _compile(tenants, args.set.replace("-", "_"), "llvm", None, None, args, progress)
        out = bundle.save(args.output)
    log.info(f"saved {out / bundle.manifest.library}")
    _say(args, describe(bundle.manifest))
    inputs = {t.name: t.example_inputs for t in tenants}
    t0 = time.perf_counter()
    outputs = bundle.run_all(inputs)
    first = time.perf_counter() - t0
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        bundle.run_all(inputs)
        times.append(time.perf_counter() - t0)
    median = sorted(times)[10]
    _say(
        args,
        f"run_all  {1e3 * median:7.2f} ms median of 20 calls "
        f"(first call {1e3 * first:.1f} ms, with VM start-up)",
    )
    for name, outs in outputs.items():
        _say(args, f"  {name:<12} -> " + ", ".join(f"{o.dtype}{list(o.shape)}" for o in outs))
    result = _verify(bundle, args, inputs)
    code = EXIT_NUMERICS if result["ok"] is False else EXIT_OK
    return code, {
        "command": "demo",
        "set": args.set,
        "output": str(out),
        "run_all_ms": round(1e3 * median, 3),
        "first_call_ms": round(1e3 * first, 3),
        "verify": result,
        "ok": code == EXIT_OK,
        "exit_code": code,
    }


def cmd_report(args) -> tuple[int, dict]:
    from mtcompile.tools.html_report import write_report

    try:
        import matplotlib  # noqa: F401  (the report's pictures)
    except ImportError as e:
        raise MTCompileError(
            "mtcompile report draws with matplotlib, which is not installed: "
            "pip install 'mtcompile[viz]'"
        ) from e
    profile = None
    if args.profile:  # the per-kernel profile by tenant, on seeded inputs
        import mtcompile

        profile = mtcompile.load(args.bundle, threads=args.threads).profile(repeat=args.profile)
    out = write_report(args.bundle, args.output, profile=profile)
    _say(args, f"wrote {out} ({out.stat().st_size // 1024} KiB, self-contained HTML)")
    return EXIT_OK, {
        "command": "report",
        "output": str(out),
        "bytes": out.stat().st_size,
        "ok": True,
        "exit_code": EXIT_OK,
    }


def cmd_serve(args) -> tuple[int, dict]:
    try:
        from mtcompile.serving import server
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in ("mlserver", "fastapi", "uvicorn", "grpc"):
            raise
        raise InputError(
            f"`mtcompile serve` needs {e.name}, which is not installed here: "
            "pip install 'mtcompile[serve]'"
        ) from e
    bundle = _load(args)
    _say(
        args,
        f"serving {bundle.manifest.name} ({', '.join(bundle.manifest.tenant_order)}) "
        f"on http://{args.host}:{args.port}/v2 (KServe v2); Ctrl-C stops it",
    )
    server.serve(
        bundle,
        port=args.port,
        host=args.host,
        grpc_port=args.grpc_port,
        max_delay_ms=args.max_delay_ms,
        max_queue=args.max_queue,
        no_stack=args.no_stack,
        entries_only=args.entries_only,
    )
    return EXIT_OK, {"command": "serve", "bundle": args.bundle, "ok": True, "exit_code": EXIT_OK}


def cmd_passes(args) -> tuple[int, dict]:
    import mtcompile.passes as passes
    from mtcompile.pass_infra import REGISTRY

    rows = []
    for name in sorted(REGISTRY):
        doc = (sys.modules[REGISTRY[name].__module__].__doc__ or "").strip().splitlines()
        rows.append(
            {
                "name": name,
                "default": name in passes.DEFAULT_PIPELINE,
                "doc": doc[0].split(":", 1)[-1].strip() if doc else "",
            }
        )
        _say(args, f"{name}{' (default)' if rows[-1]['default'] else ''}: {rows[-1]['doc']}")
    return EXIT_OK, {
        "command": "passes",
        "passes": rows,
        "default_pipeline": list(passes.DEFAULT_PIPELINE),
        "ok": True,
        "exit_code": EXIT_OK,
    }


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def _tolerance(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return v


class _Parser(argparse.ArgumentParser):
    """argparse, whose usage errors (exit 2) also print a JSON document under --json."""

    json_wanted = False

    def error(self, message: str):
        if _Parser.json_wanted:
            print(
                json.dumps(
                    {"ok": False, "exit_code": EXIT_USAGE, "error": f"{self.prog}: {message}"}
                )
            )
        super().error(message)


def _epilog() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:<4} {what}" for code, what in EXIT_CODES.items())


def parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per verb, each with the flags every command takes."""
    p = _Parser(
        prog="mtcompile",
        description="Compile several models into one multi-tenant "
        "TVM executable. Logs go to stderr, results to stdout (--json: one JSON "
        "document).",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"mtcompile {__version__}")
    common = _common_flags()
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help: str):
        return sub.add_parser(
            name,
            help=help,
            parents=[common],
            epilog=_epilog(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    for add in (
        _build_command,
        _run_command,
        _inspect_command,
        _demo_command,
        _tune_command,
        _profile_command,
        _report_command,
        _serve_command,
        _passes_command,
    ):
        add(command)
    return p


def _common_flags() -> argparse.ArgumentParser:
    """The flags of every command: verbosity and --json."""
    common = _Parser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log lines on stderr (debug)"
    )
    common.add_argument(
        "-q",
        "--quiet",
        action="store_const",
        const=-1,
        dest="verbose",
        help="warnings and errors only, no progress bar",
    )
    common.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document on stdout (results, or the error)",
    )
    return common


def _threads_flag(sp) -> None:
    sp.add_argument(
        "--threads",
        type=_positive,
        metavar="N",
        help="TVM thread pool size (default: the machine's cores; TVM_NUM_THREADS, if set, wins)",
    )


def _verify_flag(sp) -> None:
    sp.add_argument(
        "--verify-key-file",
        "--verify-key",
        metavar="FILE",
        help="the bundle "
        "must carry a signature made with the key in FILE (one trailing "
        "newline is not part of the key)",
    )


def _pass_flags(sp) -> None:
    """The flags of the commands that compile (build, demo): passes, kernels, CPU, numerics."""
    sp.add_argument(
        "--kernels",
        metavar="PROVIDER",
        help="heavy-op provider: native | torch | "
        "tvm | matmul=tvm,conv2d=torch (default: native on CPU)",
    )
    sp.add_argument("--passes", help="comma-separated pass names (default pipeline if absent)")
    sp.add_argument("--dump-passes", metavar="DIR", help="write the graph after each pass")
    sp.add_argument(
        "--print-after",
        metavar="PASSES",
        help="print the graph after these passes (comma-separated, or 'all')",
    )
    sp.add_argument(
        "--cpu",
        default="host",
        help="CPU the kernels are compiled for: host "
        "(this machine's, default) | generic (any x86-64) | an LLVM CPU name",
    )
    _threads_flag(sp)
    sp.add_argument(
        "--kernel-precision",
        choices=("float32", "bfloat16"),
        help="precision of the native dense layers, Winograd convs and patch embeddings "
        "(offload-library's "
        "precision; default: "
        "the spec's, else float32): bfloat16 is about twice as fast on CPUs with AVX-512 BF16",
    )
    sp.add_argument(
        "--atol",
        type=_tolerance,
        default=None,
        help="numerics: absolute tolerance (default: by the outputs' dtype, 0 for float32)",
    )
    sp.add_argument(
        "--rtol",
        type=_tolerance,
        default=None,
        help="numerics: tolerance "
        "relative to max|source output| (default: by dtype, 1e-4 for float32)",
    )


def _build_command(command) -> None:
    b = command("build", "build a TOML spec of tenants into OUT/, then check its numerics")
    b.add_argument("spec")
    b.add_argument("-o", "--output", required=True, help="output directory")
    b.add_argument("--target", choices=["llvm", "cuda"], help="override the spec's target")
    b.add_argument("--no-verify", action="store_true", help="skip the numerics check")
    b.add_argument("--tuning-db", metavar="DIR", help="apply schedules written by `tune`")
    b.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="build cache directory (default: "
        "$MTCOMPILE_CACHE_DIR/builds or ~/.cache/mtcompile/builds)",
    )
    b.add_argument("--no-cache", action="store_true", help="neither use nor fill the cache")
    b.add_argument(
        "--sign-key-file",
        "--sign-key",
        metavar="FILE",
        help="sign the bundle "
        "(HMAC-SHA256 of manifest and library) with the key in FILE (one trailing "
        "newline is not part of the key)",
    )
    _pass_flags(b)
    b.set_defaults(fn=cmd_build)


def _run_command(command) -> None:
    r = command("run", "run one tenant of a saved bundle on .npy inputs")
    r.add_argument("bundle")
    r.add_argument("--tenant", required=True)
    r.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy")
    r.add_argument("-o", "--output", default="outputs", help="directory for <tenant>.<output>.npy")
    _threads_flag(r)
    _verify_flag(r)
    r.set_defaults(fn=cmd_run)


def _inspect_command(command) -> None:
    i = command(
        "inspect",
        "summarize a saved bundle (reads its manifest; needs no TVM); "
        "--json prints the whole manifest",
    )
    i.add_argument("bundle")
    _verify_flag(i)
    i.set_defaults(fn=cmd_inspect)


def _demo_command(command) -> None:
    d = command("demo", "build, run and check a bundled demo tenant set")
    d.add_argument(
        "--set",
        default="heterogeneous",
        choices=["heterogeneous", "same-arch", "shared-backbone", "bert4", "mixed"],
    )
    d.add_argument("--batch", type=int, default=1)
    d.add_argument("-o", "--output", default="out/demo")
    _pass_flags(d)
    d.set_defaults(fn=cmd_demo)


def _tune_command(command) -> None:
    t = command("tune", "tune the TVM kernels of a spec into a database (offline)")
    t.add_argument("spec")
    t.add_argument("-o", "--output", required=True, help="database directory")
    t.add_argument("--trials", type=_positive, default=64, help="trials per task")
    t.add_argument("--kernels", default="tvm", help="providers the build will use (default tvm)")
    t.add_argument(
        "--target",
        help="the device measured: llvm (this machine's CPU, default) "
        'or a TVM target dict as JSON, e.g. \'{"kind": "llvm", "mcpu": "skylake"}\'',
    )
    t.add_argument(
        "--rpc-tracker",
        metavar="HOST:PORT",
        help="measure on this RPC tracker's "
        "servers (python -m tvm.exec.rpc_tracker) instead of this machine",
    )
    t.add_argument("--rpc-key", metavar="KEY", help="the key of the tracker's servers to use")
    t.add_argument(
        "--rpc-wait",
        type=_positive,
        default=30,
        metavar="S",
        help="seconds to wait for the tracker and a server with the key (default 30)",
    )
    t.add_argument(
        "--builders",
        type=_positive,
        metavar="N",
        help="parallel build workers (default: this machine's cores)",
    )
    t.set_defaults(fn=cmd_tune)


def _profile_command(command) -> None:
    pr = command("profile", "time per kernel of a saved bundle, by tenant")
    pr.add_argument("bundle")
    pr.add_argument("--repeat", type=_positive, default=10)
    pr.add_argument("--top", type=_positive, default=8, help="kernels shown per tenant")
    _threads_flag(pr)
    _verify_flag(pr)
    pr.set_defaults(fn=cmd_profile)


def _report_command(command) -> None:
    rp = command("report", "write a self-contained HTML report of a saved bundle")
    rp.add_argument("bundle")
    rp.add_argument("-o", "--output", default="report.html", help="HTML file to write")
    rp.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="add the per-kernel profile by tenant (median of N runs on seeded inputs)",
    )
    _threads_flag(rp)
    rp.set_defaults(fn=cmd_report)


def _serve_command(command) -> None:
    sv = command(
        "serve",
        "serve a saved bundle over the KServe v2 / Open Inference Protocol "
        "(REST and gRPC, each tenant a model; needs the `serve` extra)",
    )
    sv.add_argument("bundle")
    sv.add_argument("--port", type=_positive, default=8080, help="REST port (default 8080)")
    sv.add_argument("--grpc-port", type=_positive, help="gRPC port (default: --port + 1)")
    sv.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default "
        "127.0.0.1; 0.0.0.0 serves every interface, as in a container)",
    )
    sv.add_argument(
        "--max-delay-ms",
        type=float,
        default=2.0,
        metavar="MS",
        help="the scheduler's window: how long the oldest request waits for others",
    )
    sv.add_argument(
        "--max-queue",
        type=_positive,
        default=256,
        metavar="N",
        help="requests each tenant may have waiting (then 503)",
    )
    sv.add_argument(
        "--no-stack",
        action="append",
        default=[],
        metavar="TENANT",
        help="never stack this tenant's requests along its dynamic dim",
    )
    sv.add_argument(
        "--entries-only",
        action="store_true",
        help="each tenant's own entry only, no merged call (for comparison)",
    )
    _threads_flag(sv)
    _verify_flag(sv)
    sv.set_defaults(fn=cmd_serve)


def _passes_command(command) -> None:
    ps = command("passes", "list the registered passes")
    ps.set_defaults(fn=cmd_passes)


def _missing_module(e: ModuleNotFoundError) -> tuple[int, str]:
    """A package the `compile` extra installs is missing: say so (bad input, not a bug)."""
    from mtcompile import _COMPILE_PACKAGES

    top = (e.name or "").split(".")[0]
    if top in _COMPILE_PACKAGES:
        return EXIT_INPUT, (
            f"mtcompile: error: this command needs {top}, which is not "
            "installed here: this is a serving install (it loads and runs saved "
            "bundles); pip install 'mtcompile[compile]' to compile"
        )
    log.debug("".join(traceback.format_exception(e)).rstrip())
    return EXIT_INTERNAL, (
        f"mtcompile: internal error: {type(e).__name__}: {e} (a bug; -v shows the traceback)"
    )


def _stdout_closed() -> int:
    """stdout's reader exited (`mtcompile inspect out | head -3`): stop quietly, as a Unix
    tool would, and point stdout at /dev/null so that Python's flush at exit cannot fail."""
    with contextlib.suppress(OSError, ValueError):  # ValueError: a stdout with no fileno
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_STDOUT_CLOSED


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (`EXIT_CODES`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    _Parser.json_wanted = "--json" in argv
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    # torch and TVM importers warn about their own internals; users cannot act on those.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        code, doc = args.fn(args)
        if args.json and doc is not None:
            print(json.dumps(doc, indent=1, default=str), flush=True)
        return code
    except BrokenPipeError:  # before the handlers below: not a bug, nor bad input
        return _stdout_closed()
    except MTCompileError as e:
        code, error = EXIT_INPUT, f"mtcompile: error: {e}"
    except KeyboardInterrupt:
        code, error = EXIT_INTERRUPTED, "mtcompile: interrupted"
    except ModuleNotFoundError as e:  # a compile command in a serving install, else a bug
        code, error = _missing_module(e)
    except Exception as e:  # a bug: one line, the traceback with -v
        log.debug("".join(traceback.format_exception(e)).rstrip())
        code = EXIT_INTERNAL
        error = (
            f"mtcompile: internal error: {type(e).__name__}: {e} (a bug; -v shows the traceback)"
        )
    print(error, file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                {
                    "command": args.command,
                    "ok": False,
                    "exit_code": code,
                    "error": error.split(": ", 1)[1],
                }
            )
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
