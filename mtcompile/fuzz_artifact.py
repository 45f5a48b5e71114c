"""Artifact fuzzer: damaged copies of a saved bundle, through `mtcompile.load` (and, with
``--driver``, ``mtcompile-run``), against the untouched bundle's outputs.

    python -m mtcompile.fuzz_artifact BUNDLE_DIR --seed 0 --count 200 [--driver] [--json F]

Case `i` of seed `s` is drawn from ``random.Random(s * 1_000_003 + i)``: one to three
mutations of a fresh copy of the bundle, each one of
- ``lib-bytes``: bytes of the library overwritten, inserted, or the file truncated; the
  manifest's ``library_sha256`` left alone (the hash must refuse it) or, in one case in
  five, a copy signed with `KEY`, loaded with that key, whose hash is updated after the
  damage (only the signature can refuse it);
- ``manifest``: one field of ``manifest.json`` anywhere in its tree (a weight's offset, a
  shape, a name, a format, the library's name...) replaced by a value of another kind or a
  nearby one, or deleted.
Every case must end ``refused`` (an `MTCompileError`, the driver's exit 3) or ``same``
(every entry and ``run_all`` give the untouched bundle's outputs, bit for bit). ``differ``
(other outputs: a silent difference), ``error`` (another exception, exit 4), ``crash`` (the
process died) and ``hang`` are bugs; with ``--driver`` a refusal whose first line is not the
Python one is ``disagree``. Loads run in a worker process (a fresh one after a crash).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

BUGS = ("differ", "error", "crash", "hang", "disagree")
KEY = b"fuzz key"  # a signed copy's key (the lib-bytes cases that rehash)
_MARK = "@@mtcompile.fuzz_artifact "


# ---------------------------------------------------------------- mutations
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _mutate_library(rng: random.Random, lib: Path) -> str:
    b = bytearray(lib.read_bytes())
    if not b:  # truncated to nothing by an earlier mutation
        lib.write_bytes(b"\x7fELF")
        return "lib-bytes refilled"
    what = rng.choice(["flip", "overwrite", "truncate", "insert", "zero-page"])
    at = rng.randrange(len(b))
    if what == "flip":
        b[at] ^= 1 << rng.randrange(8)
    elif what == "overwrite":
        n = rng.randint(1, 64)
        b[at : at + n] = bytes(rng.randrange(256) for _ in range(n))
    elif what == "truncate":
        del b[at:]
    elif what == "insert":
        b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    else:
        b[at - at % 4096 : at - at % 4096 + 4096] = bytes(min(4096, len(b) - at + at % 4096))
    lib.write_bytes(bytes(b))
    return f"lib-bytes {what} at {at}"


def _paths(v, prefix=()):
    """Every (path, value) of a JSON tree."""
    yield prefix, v
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _paths(x, (*prefix, k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _paths(x, (*prefix, i))


def _other(rng: random.Random, v):
    """A value near `v`, or of another kind."""
    if isinstance(v, bool):
        return rng.choice([not v, 0, None, "true"])
    if isinstance(v, int):
        return rng.choice([v + 1, v - 1, v + 64, -v - 1, 0, 2**62, 2**31, 1.5, str(v), None])
    if isinstance(v, float):
        return rng.choice([v * 2, -v, float("nan"), 0, None])
    if isinstance(v, str):
        return rng.choice([v + "x", v[:-1], "", "../" + v, v.upper(), "a/b", 7, None])
    if isinstance(v, list):
        return rng.choice([v[::-1], v[:-1], [*v, v[-1]] if v else [0], {}, "x", None])
    return rng.choice([{}, [], "x", None, {"x": 1}])


def _mutate_manifest(rng: random.Random, m: dict) -> str:
    # the weights table and the tenants more often: they drive memory and inputs
    roots = [k for k in m if k not in ("graph_view",)]
    root = rng.choice(["weights", "tenants", "run_all_inputs", *roots])
    paths = [p for p, _ in _paths(m.get(root), (root,))] if root in m else [(root,)]
    path = rng.choice(paths)
    parent = m
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    if isinstance(parent, dict) and key in parent and rng.random() < 0.15:
        del parent[key]
        return f"manifest del {'.'.join(map(str, path))}"
    old = (
        parent[key]
        if (isinstance(parent, dict) and key in parent) or isinstance(parent, list)
        else None
    )
    parent[key] = _other(rng, old)
    return f"manifest {'.'.join(map(str, path))}: {old!r:.40} -> {parent[key]!r:.40}"


def make_case(seed: int, index: int, original: Path, signed: Path, out: Path) -> dict:
    """Case `index` of `seed`: a damaged copy at `out` of `original`, or of `signed` (the
    same bundle signed with `KEY`) for a library rehashed after its damage; what was done."""
    rng = random.Random(seed * 1_000_003 + index)
    key = rng.random() < 0.2
    shutil.copytree(signed if key else original, out)
    mpath = out / "manifest.json"
    m = json.loads(mpath.read_text())
    lib = out / m["library"]  # the library's file (the manifest's field may be mutated)
    changes = [_mutate_library(rng, lib)] if key else []
    for _ in range(rng.choice([1, 1, 1, 2, 3]) - len(changes)):
        if rng.random() < 0.3:
            changes.append(_mutate_library(rng, lib))
        else:
            changes.append(_mutate_manifest(rng, m))
    if key:
        m["library_sha256"] = _sha256(lib)  # only the signature can tell
        changes.append("library_sha256 updated")
    mpath.write_text(json.dumps(m))
    return {"index": index, "changes": changes, "key": key}


# ---------------------------------------------------------------- the worker
def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0]


def _inputs(b):
    from mtcompile.runtime.inputs import seeded_inputs

    return {t: seeded_inputs(b.signature(t), i) for i, t in enumerate(b.tenant_names)}


def _outputs(b, inputs) -> dict:
    got = {f"run_all.{t}": xs for t, xs in b.run_all(inputs).items()}
    got.update({t: b.run(t, *inputs[t]) for t in inputs})
    return got


def _worker(original: str) -> None:
    import numpy as np

    import mtcompile
    from mtcompile.errors import MTCompileError

    ref = mtcompile.load(original)
    inputs = _inputs(ref)
    want = _outputs(ref, inputs)
    print(_MARK + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        try:
            b = mtcompile.load(job["dir"], verify_key=KEY if job["key"] else None)
            got = _outputs(b, inputs)
            same = got.keys() == want.keys() and all(
                len(got[k]) == len(want[k])
                and all(
                    a.dtype == w.dtype
                    and a.shape == w.shape
                    and np.array_equal(a, w, equal_nan=True)
                    for a, w in zip(got[k], want[k], strict=True)
                )
                for k in want
            )
            res = {"outcome": "same" if same else "differ"}
        except MTCompileError as e:
            res = {"outcome": "refused", "line": _first_line(e), "type": type(e).__name__}
        except Exception as e:  # noqa: BLE001  (a bug: reported, not raised)
            res = {"outcome": "error", "line": f"{type(e).__name__}: {_first_line(e)}"}
        print(_MARK + json.dumps(res), flush=True)


class _Worker:
    def __init__(self, original: Path):
        self.original = original
        self.proc = None

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mtcompile.fuzz_artifact", "--worker", str(self.original)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        if self._read(300) != {"ready": True}:
            raise RuntimeError("the fuzz worker did not start")

    def _read(self, timeout: float):
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            if not ready:
                return "hang"
            line = self.proc.stdout.readline()
            if not line:
                return "crash"
            if line.startswith(_MARK):
                return json.loads(line[len(_MARK) :])

    def run(self, d: Path, key: bool, timeout: float) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps({"dir": str(d), "key": key}) + "\n")
        self.proc.stdin.flush()
        res = self._read(timeout)
        if isinstance(res, str):  # the worker died or hung: a fresh one takes the next case
            self.close()
            return {"outcome": res}
        return res

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def _driver(d: Path, original: Path, key: bool, work: Path, timeout: float) -> dict:
    """The same case through mtcompile-run (run_all, else each tenant)."""
    import numpy as np

    from mtcompile.driver import command
    from mtcompile.runtime.artifact import read_manifest

    m = read_manifest(original)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    keyfile = None
    if key:
        keyfile = work / "key"
        keyfile.write_bytes(KEY)
    entry = "run_all" if m.streams.run is None else m.tenant_order[0]
    try:
        res = subprocess.run(
            command(d, entry, work / "in", out, verify_key_file=keyfile),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"outcome": "hang"}
    lines = res.stderr.strip().splitlines()
    if res.returncode == 3:
        return {"outcome": "refused", "line": lines[-1].removeprefix("mtcompile-run: ")}
    if res.returncode != 0:
        return {
            "outcome": "crash" if res.returncode < 0 or res.returncode > 128 else "error",
            "line": f"exit {res.returncode}: {lines[-1] if lines else ''}",
        }
    ref = work / "ref"
    same = all(
        np.array_equal(np.load(ref / f.name), np.load(f), equal_nan=True)
        for f in ref.iterdir()
        if (out / f.name).exists()
    ) and all((out / f.name).exists() for f in ref.iterdir())
    return {"outcome": "same" if same else "differ"}


def _driver_setup(original: Path, work: Path, timeout: float) -> None:
    """Inputs for the driver (seeded, as the worker's) and its outputs on the original."""
    import numpy as np

    import mtcompile
    from mtcompile.driver import command
    from mtcompile.runtime.contract import file_name

    b = mtcompile.load(original)
    (work / "in").mkdir()
    for t, xs in _inputs(b).items():
        for s, x in zip(b.signature(t).inputs, xs, strict=True):
            np.save(work / "in" / file_name(t, s.name), x)
    (work / "ref").mkdir()
    entry = "run_all" if b.manifest.streams.run is None else b.manifest.tenant_order[0]
    res = subprocess.run(
        command(original, entry, work / "in", work / "ref"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if res.returncode != 0:
        raise RuntimeError(f"mtcompile-run fails on the untouched bundle: {res.stderr[-2000:]}")


def run(
    original: str | os.PathLike,
    seed: int,
    count: int,
    driver: bool = False,
    timeout: float = 120.0,
    progress=print,
) -> list[dict]:
    """Cases ``0..count-1`` of `seed` on the bundle at `original`; each case's outcome
    (and the driver's, with `driver`)."""
    original = Path(original).resolve()
    results = []
    worker = _Worker(original)
    with tempfile.TemporaryDirectory(prefix="mtcompile-fuzz-artifact-") as tmp:
        work = Path(tmp)
        import mtcompile

        signed = work / "signed"
        mtcompile.load(original).save(signed, sign_key=KEY)
        if driver:
            _driver_setup(original, work, timeout)
        try:
            for i in range(count):
                d = work / f"case{i}"
                case = make_case(seed, i, original, signed, d)
                case.update(worker.run(d, case["key"], timeout))
                if driver:
                    case["driver"] = _driver(d, original, case["key"], work, timeout)
                    if (
                        case["outcome"] == case["driver"]["outcome"] == "refused"
                        and case["driver"]["line"] != case["line"]
                    ):
                        case["disagree"] = True
                shutil.rmtree(d, ignore_errors=True)
                results.append(case)
                if progress:
                    progress(
                        f"case {i}: {case['outcome']}"
                        + (f" / driver {case['driver']['outcome']}" if driver else "")
                        + f"  {'; '.join(case['changes'])}"
                    )
        finally:
            worker.close()
    return results


def summary(results: list[dict]) -> dict:
    """Counts: cases, outcomes (Python; the driver's apart), bugs by kind."""
    py = Counter(r["outcome"] for r in results)
    drv = Counter(r["driver"]["outcome"] for r in results if "driver" in r)
    bugs = {k: py[k] + drv[k] for k in BUGS if k != "disagree"}
    bugs["disagree"] = sum(1 for r in results if r.get("disagree"))
    return {
        "cases": len(results),
        "python": dict(py),
        "driver": dict(drv),
        "refused": py["refused"],
        "same": py["same"],
        "crashes": bugs["crash"],
        "silent_differences": bugs["differ"],
        "bugs": bugs,
        "ok": not any(bugs.values()),
    }


def main(argv: list[str] | None = None) -> int:
    """The command line; exit 1 when a case found a bug."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        _worker(argv[1])
        return 0
    ap = argparse.ArgumentParser(
        prog="python -m mtcompile.fuzz_artifact", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("bundle", help="a saved bundle (left untouched: cases work on copies)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--driver", action="store_true", help="each case through mtcompile-run too")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per case")
    ap.add_argument("--json", help="write every case's outcome and the summary here")
    a = ap.parse_args(argv)
    results = run(a.bundle, a.seed, a.count, a.driver, a.timeout)
    s = summary(results)
    print(json.dumps(s, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": s, "cases": results}, indent=1))
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
