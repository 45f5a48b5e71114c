"""Bundle: one executable with an entry per tenant and ``run_all``; save and load.

The runtime needs TVM (and torch only where a library kernel is used), never the
frontends or the passes: a loaded bundle runs without any model code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from mtcompile.errors import ArtifactError, InputError, MTCompileError
from mtcompile.runtime.abi import FORMAT, MANIFEST, MANIFEST_FN, RUN_ALL


def _sig_str(inputs: list[dict]) -> str:
    return ", ".join(f"{i['name']}: {i['dtype']}{list(i['shape'])}" for i in inputs)


def _to_array(x) -> np.ndarray:
    # np.asarray(order="C"), not np.ascontiguousarray: that one turns a 0-d array into 1-d.
    if isinstance(x, np.ndarray):
        return np.asarray(x, order="C")
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().cpu().contiguous().numpy()
    return np.asarray(x, order="C")


# TVM 0.27 logs one "Scope Saving:"/"Scope Loaded:" warning per constant when an
# executable is exported or loaded (a leftover debug LOG in vm/executable.cc).
_NATIVE_NOISE = ("Scope Saving:", "Scope Loaded:")


@contextmanager
def quiet_native_log():
    """Drop TVM's per-constant debug lines from fd 2; everything else is passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines(keepends=True):
                if not any(p in line for p in _NATIVE_NOISE):
                    sys.stderr.write(line)


def _load_library(lib: Path):
    """``tvm.runtime.load_module`` through a fresh path: dlopen hands back a library already
    loaded from the same (real) path, so a bundle re-saved into a directory this process
    loaded from before would otherwise run the old code. A hard link costs nothing; a copy
    is the fallback across file systems."""
    import tvm

    with tempfile.TemporaryDirectory(prefix="mtcompile-") as tmp:
        private = Path(tmp) / lib.name
        try:
            os.link(lib, private)
        except OSError:
            shutil.copyfile(lib, private)
        return tvm.runtime.load_module(str(private))


# manifest entries known only once the library is built: in manifest.json, not embedded
BUILT_AFTER = ("library_sha256", "memory")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Bundle:
    """A compiled multi-tenant executable and its manifest.

    `graph` (the merged, optimized Graph), `sources` (the tenants as given) and
    `compile_report` exist on a freshly compiled bundle; a loaded one has the
    manifest and the library only.
    """

    def __init__(self, executable, manifest: dict, *, graph=None, sources=None,
                 compile_report: dict | None = None, library_path: Path | None = None):
        self.executable = executable
        self.manifest = manifest
        self.graph = graph
        self.sources = sources or {}
        self.compile_report = compile_report or {}
        self._library_path = library_path
        self._local = threading.local()  # one VM per thread: a VM is not thread-safe

    # ------------------------------------------------------------------ signatures
    @property
    def tenant_names(self) -> list[str]:
        """Tenant names in bundle order (the order of ``run_all``'s inputs and outputs)."""
        return list(self.manifest["tenant_order"])

    @property
    def target(self) -> str:
        return self.manifest["target"]

    def signature(self, name: str) -> dict:
        """The manifest entry of a tenant: its inputs and outputs with shapes and dtypes."""
        if name not in self.manifest["tenants"]:
            raise InputError(f"unknown tenant {name!r}; this bundle has {self.tenant_names}")
        return self.manifest["tenants"][name]

    # ------------------------------------------------------------------ running
    def _vm(self):
        self._fn(RUN_ALL)
        return self._local.vm

    def _fn(self, entry: str):
        cache = getattr(self._local, "fns", None)
        if cache is None:
            import tvm
            from tvm import relax

            dev = tvm.cuda(0) if self.target == "cuda" else tvm.cpu(0)
            if not dev.exist:
                raise MTCompileError(f"this bundle was built for {self.target} and this "
                                     "machine has no such device")
            if "library" in self.manifest.get("kernels", {}).values():
                from mtcompile.runtime import library

                try:
                    library.register()  # the executable calls PyTorch kernels by name
                except ImportError as e:
                    raise MTCompileError("this bundle calls PyTorch kernels (kernel provider "
                                         f"'library') and needs torch installed: {e}") from e
            if self.num_streams > 1:  # the stream functions call the event points by name
                from mtcompile.runtime.executor import register

                register()
            with quiet_native_log():
                self._local.vm = relax.VirtualMachine(self.executable, dev)
            self._local.dev = dev
            cache = self._local.fns = {}
        if entry not in cache:
            cache[entry] = self._local.vm[entry]
        return cache[entry]

    def _check(self, name: str, inputs: tuple) -> list[np.ndarray]:
        sig = self.signature(name)["inputs"]
        if len(inputs) != len(sig):
            raise InputError(f"tenant '{name}' takes {len(sig)} input(s) ({_sig_str(sig)}), "
                             f"got {len(inputs)}")
        arrays = []
        for x, s in zip(inputs, sig, strict=True):
            try:
                a = _to_array(x)
            except (TypeError, ValueError) as e:  # e.g. a bfloat16 tensor, a ragged list
                raise InputError(f"tenant '{name}', input '{s['name']}': cannot use a "
                                 f"{type(x).__name__} as an array ({e}); expected "
                                 f"{s['dtype']}{list(s['shape'])}") from e
            if tuple(a.shape) != tuple(s["shape"]) or str(a.dtype) != s["dtype"]:
                raise InputError(f"tenant '{name}', input '{s['name']}': expected "
                                 f"{s['dtype']}{list(s['shape'])}, got {a.dtype}{list(a.shape)} "
                                 f"(signature: {_sig_str(sig)})")
            if "index_range" in s and a.size:
                lo, hi = s["index_range"]
                if a.min() < lo or a.max() >= hi:
                    raise InputError(f"tenant '{name}', input '{s['name']}': values index a "
                                     f"table of {hi} rows and must be in [{lo}, {hi}); got "
                                     f"values in [{a.min()}, {a.max()}]")
            arrays.append(a)
        return arrays

    def _call(self, entry: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
        import tvm

        fn = self._fn(entry)
        dev = self._local.dev
        out = fn(*[tvm.runtime.tensor(a, dev) for a in arrays])
        return [o.numpy() for o in out]

    def run(self, name: str, *inputs) -> list[np.ndarray]:
        """Run one tenant; inputs are numpy arrays or torch tensors; returns its outputs."""
        return self._call(name, self._check(name, inputs))

    def run_all(self, inputs: dict[str, Any]) -> dict[str, list[np.ndarray]]:
        """Run every tenant in one call: ``{name: inputs}`` -> ``{name: [outputs]}``."""
        if not isinstance(inputs, dict):
            raise InputError("run_all takes a dict {tenant name: tuple of inputs}")
        unknown = sorted(set(inputs) - set(self.tenant_names))
        missing = [t for t in self.tenant_names if t not in inputs]
        if unknown or missing:
            raise InputError(f"run_all needs inputs for exactly the tenants {self.tenant_names}; "
                             f"missing {missing}, unknown {unknown}")
        checked = {}
        for t in self.tenant_names:
            given = inputs[t]
            given = tuple(given) if isinstance(given, list | tuple) else (given,)
            sig = self.signature(t)["inputs"]
            checked.update({(t, s["name"]): a
                            for s, a in zip(sig, self._check(t, given), strict=True)})
        arrays = []
        for uses in self.manifest["run_all_inputs"]:
            first = checked[tuple(uses[0])]
            for use in uses[1:]:  # one shared tensor: the tenants must agree on its value
                other = checked[tuple(use)]
                if other is not first and not np.array_equal(other, first):
                    raise InputError(f"tenants '{uses[0][0]}' and '{use[0]}' share input "
                                     f"'{uses[0][1]}'/'{use[1]}' but were given different "
                                     "values")
            arrays.append(first)
        streamed = "functions" in self.manifest.get("streams", {})
        flat = self._run_streams(arrays) if streamed else self._call(RUN_ALL, arrays)
        out, i = {}, 0
        for t in self.tenant_names:
            k = len(self.signature(t)["outputs"])
            out[t], i = flat[i:i + k], i + k
        return out

    @property
    def num_streams(self) -> int:
        """Streams ``run_all`` runs on (1: the sequential ``run_all`` entry)."""
        s = self.manifest.get("streams", {})
        return int(s.get("num_streams", 1)) if "functions" in s else 1

    def _executor(self):
        ex = self.__dict__.get("_stream_executor")
        if ex is None:
            import tvm

            from mtcompile.runtime.executor import StreamExecutor

            self._fn(RUN_ALL)  # device check, library kernels registered
            s = self.manifest["streams"]
            dev = tvm.cuda(0) if self.target == "cuda" else tvm.cpu(0)
            ex = self._stream_executor = StreamExecutor(
                self.executable, dev, s["functions"], s["num_events"],
                event_streams=[tuple(e) for e in s["event_streams"]],
                stream_tenants=s["stream_tenants"], kernel_tenant=s["kernel_tenant"])
        return ex

    def _run_streams(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """run_all on the stream functions at once (`StreamExecutor`): one arena per run,
        shared by the streams; outputs copied to numpy once every stream is done."""
        import tvm

        s = self.manifest["streams"]
        ex = self._executor()
        dev = self._local.dev
        storage = self._fn(s["arena_function"])()
        tensors = [tvm.runtime.tensor(a, dev) for a in arrays]
        from mtcompile.runtime.executor import StreamError

        try:
            results = ex.run([[storage, *(tensors[j] for j in ins)]
                              for ins in s["stream_inputs"]])
        except StreamError:  # fresh threads and VMs next time (they look kernels up anew)
            ex.close()
            self._stream_executor = None
            raise
        flat: list = [None] * sum(len(o) for o in s["stream_outputs"])
        for outs, res in zip(s["stream_outputs"], results, strict=True):
            for j, r in zip(outs, list(res)[:len(outs)], strict=True):  # then kept exports
                flat[j] = r.numpy()
        return flat

    def trace(self, entry: str, arrays: list[np.ndarray], repeat: int = 1) -> list[list]:
        """Run `entry` `repeat` times under the VM instrument; per run, the calls it made
        as ``(symbol, microseconds)`` in order (kernels, library calls and VM builtins)."""
        import time

        runs: list[list] = []
        starts: list[float] = []

        def instrument(func, symbol, before, ret, *args):
            if before:
                starts.append(time.perf_counter())
            else:
                runs[-1].append((symbol, 1e6 * (time.perf_counter() - starts.pop())))
            return 0

        vm = self._vm()
        vm.set_instrument(instrument)
        try:
            for _ in range(repeat):
                runs.append([])
                self._call(entry, arrays)
        finally:
            vm.set_instrument(None)
        return runs

    def profile(self, inputs: dict[str, Any] | None = None, repeat: int = 10,
                warmup: int = 3) -> dict:
        """Time per kernel, grouped by tenant (each tenant's entry run `repeat` times).

        Returns ``{"tenants": {name: {"total_us", "kernels": [{name, calls, total_us,
        mean_us, share}]}}}``, kernels sorted by time; each call's time is its median over
        the repeats. VM builtins (allocation, shape checks) appear as ``vm.builtin.*``.
        """
        from mtcompile.tools.verify import seeded_inputs

        inputs = dict(inputs or {})
        result: dict[str, Any] = {"repeat": repeat, "tenants": {}}
        for i, name in enumerate(self.tenant_names):
            given = inputs.get(name)
            arrays = (self._check(name, tuple(given)) if given is not None
                      else list(seeded_inputs(self.signature(name), i)))
            for _ in range(warmup):
                self._call(name, arrays)
            runs = self.trace(name, arrays, repeat)
            kernels: dict[str, dict] = {}
            for calls in zip(*runs, strict=True):
                symbol = calls[0][0]
                k = kernels.setdefault(symbol, {"name": symbol, "calls": 0, "total_us": 0.0})
                k["calls"] += 1
                k["total_us"] += float(np.median([us for _, us in calls]))
            total = sum(k["total_us"] for k in kernels.values())
            rows = sorted(kernels.values(), key=lambda k: -k["total_us"])
            for k in rows:
                k["mean_us"] = k["total_us"] / k["calls"]
                k["share"] = k["total_us"] / total if total else 0.0
            result["tenants"][name] = {"total_us": total, "kernels": rows}
        return result

    # ------------------------------------------------------------------ reports
    def report(self) -> dict:
        """A JSON-serializable summary: tenants, pipeline, sizes, compile times."""
        m = self.manifest
        rep = {
            "name": m["name"],
            "target": m["target"],
            "tenants": {t: {"source": m["tenants"][t]["source"],
                            "inputs": _sig_str(m["tenants"][t]["inputs"]),
                            "outputs": _sig_str(m["tenants"][t]["outputs"])}
                        for t in self.tenant_names},
            "pipeline": m["pipeline"],
            "graph": m["graph"],
            "versions": m["versions"],
        }
        if "memory" in m:
            rep["memory"] = m["memory"]
        rep["streams"] = m.get("streams") or {"num_streams": 1, "num_syncs": 0,
                                              "estimated_speedup": 1.0, "policy": None}
        rep.update(self.compile_report)
        return json.loads(json.dumps(rep))

    def _repr_html_(self) -> str:
        """Jupyter: tables and pictures of the bundle (see `mtcompile.tools.html_report`)."""
        from mtcompile.tools.html_report import bundle_html

        return bundle_html(self)

    def verify(self, inputs: dict[str, tuple] | None = None, seed: int = 0,
               atol: float = 1e-4) -> dict:
        """Run each tenant's source model and the bundle on the same inputs; compare.

        Returns ``{"ok": bool, "tenants": {name: {"outputs": [{max_abs, max_rel}], ...}}}``.
        Needs the source models (a compiled bundle, or `sources` passed to `load`).
        """
        from mtcompile.tools.verify import verify_bundle

        return verify_bundle(self, inputs, seed, atol)

    # ------------------------------------------------------------------ artifact
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``<name>.so`` (manifest embedded) and ``manifest.json`` into `directory`.

        Files are written under temporary names and renamed into place, so a failure
        leaves any earlier bundle in `directory` intact.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        lib_name = self.manifest["library"]
        fd, tmp = tempfile.mkstemp(prefix=f".{lib_name}.", suffix=".so", dir=out)
        os.close(fd)
        tmp_lib = Path(tmp)
        tmp_manifest = out / f".{MANIFEST}.tmp"
        try:
            if self._library_path is not None:
                shutil.copyfile(self._library_path, tmp_lib)
            else:
                with quiet_native_log():
                    self.executable.export_library(str(tmp_lib))
            digest = sha256_file(tmp_lib)
            if self._library_path is not None and digest != self.manifest.get("library_sha256"):
                raise ArtifactError(f"{self._library_path} changed since this bundle was loaded "
                                    "from it; load it again before saving")
            readable = dict(self.manifest, library_sha256=digest)
            tmp_manifest.write_text(json.dumps(readable, indent=2, sort_keys=True) + "\n")
            os.replace(tmp_lib, out / lib_name)
            os.replace(tmp_manifest, out / MANIFEST)
        except BaseException:
            tmp_lib.unlink(missing_ok=True)
            tmp_manifest.unlink(missing_ok=True)
            raise
        return out


def load(directory: str | os.PathLike, sources: dict | None = None) -> Bundle:
    """Load a saved bundle; checks that the library and the manifest agree.

    `sources` optionally maps tenant names to their source `Tenant`s, for `verify`.
    """
    d = Path(directory)
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{d}: no {MANIFEST}; is this a directory written by Bundle.save?")
    try:
        manifest = json.loads(mpath.read_text())
        lib_name, lib_hash = manifest["library"], manifest["library_sha256"]
        if not isinstance(lib_name, str) or not lib_name or Path(lib_name).name != lib_name:
            raise ValueError(f"library {lib_name!r} is not a file name")
        if not isinstance(lib_hash, str):
            raise TypeError(f"library_sha256 {lib_hash!r} is not a string")
        if manifest.get("format") != FORMAT:
            raise ArtifactError(f"{mpath}: format {manifest.get('format')!r}, "
                                f"this mtcompile reads {FORMAT!r}")
        manifest["tenants"], manifest["tenant_order"], manifest["target"]  # noqa: B018
        manifest["run_all_inputs"]  # noqa: B018
    except ArtifactError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{mpath} is corrupt: {type(e).__name__}: {e}") from e
    lib = d / lib_name
    if not lib.is_file():
        raise ArtifactError(f"{d}: the manifest names library {lib_name!r}, which is missing")
    actual = sha256_file(lib)
    if actual != lib_hash:
        raise ArtifactError(f"{lib} does not match {mpath}: library sha256 {actual[:16]}..., "
                            f"manifest expects {lib_hash[:16]}...; the files come from "
                            "different builds")
    try:
        with quiet_native_log():
            module = _load_library(lib)
    except Exception as e:
        hint = (" (a bundle built for cuda loads only where TVM finds a CUDA GPU and driver)"
                if manifest["target"] == "cuda" else "")
        raise ArtifactError(f"{lib}: cannot be loaded by TVM: {e}{hint}") from e
    bundle = Bundle(module, manifest, sources=sources, library_path=lib)
    try:
        embedded = json.loads(bytes(bundle._fn(MANIFEST_FN)().numpy()).decode())
    except MTCompileError:
        raise  # no device, no torch for library kernels: said plainly by _fn
    except Exception as e:
        raise ArtifactError(f"{lib}: has no readable embedded manifest: {e}") from e
    readable = {k: v for k, v in manifest.items() if k not in BUILT_AFTER}
    if embedded != readable:
        diff = sorted(k for k in set(embedded) | set(readable)
                      if embedded.get(k) != readable.get(k))
        raise ArtifactError(f"{lib} and {mpath} disagree on {diff}")
    return bundle


__all__ = ["Bundle", "load", "MTCompileError"]
