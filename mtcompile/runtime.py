"""Bundle: one executable with an entry per tenant and ``run_all``; save and load.

The runtime needs TVM (and torch only where a library kernel is used), never the
frontends or the passes: a loaded bundle runs without any model code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .abi import FORMAT, MANIFEST, MANIFEST_FN, RUN_ALL
from .errors import ArtifactError, InputError, MTCompileError


def _sig_str(inputs: list[dict]) -> str:
    return ", ".join(f"{i['name']}: {i['dtype']}{list(i['shape'])}" for i in inputs)


def _to_array(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x)
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().cpu().contiguous().numpy()
    return np.ascontiguousarray(np.asarray(x))


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
    def _fn(self, entry: str):
        cache = getattr(self._local, "fns", None)
        if cache is None:
            import tvm
            from tvm import relax

            dev = tvm.cuda(0) if self.target == "cuda" else tvm.cpu(0)
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
            a = _to_array(x)
            if tuple(a.shape) != tuple(s["shape"]) or str(a.dtype) != s["dtype"]:
                raise InputError(f"tenant '{name}', input '{s['name']}': expected "
                                 f"{s['dtype']}{list(s['shape'])}, got {a.dtype}{list(a.shape)} "
                                 f"(signature: {_sig_str(sig)})")
            bound = s.get("index_bound")
            if bound is not None and a.size and (a.min() < 0 or a.max() >= bound):
                raise InputError(f"tenant '{name}', input '{s['name']}': values index a table "
                                 f"of {bound} rows and must be in [0, {bound}); got values in "
                                 f"[{a.min()}, {a.max()}]")
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
        arrays = []
        for t in self.tenant_names:
            given = inputs[t]
            given = tuple(given) if isinstance(given, list | tuple) else (given,)
            arrays += self._check(t, given)
        flat = self._call(RUN_ALL, arrays)
        out, i = {}, 0
        for t in self.tenant_names:
            k = len(self.signature(t)["outputs"])
            out[t], i = flat[i:i + k], i + k
        return out

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
        rep.update(self.compile_report)
        return json.loads(json.dumps(rep))

    def verify(self, inputs: dict[str, tuple] | None = None, seed: int = 0,
               atol: float = 1e-4) -> dict:
        """Run each tenant's source model and the bundle on the same inputs; compare.

        Returns ``{"ok": bool, "tenants": {name: {"outputs": [{max_abs, max_rel}], ...}}}``.
        Needs the source models (a compiled bundle, or `sources` passed to `load`).
        """
        from .verify import verify_bundle

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
            readable = dict(self.manifest, library_sha256=sha256_file(tmp_lib))
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
        if manifest.get("format") != FORMAT:
            raise ArtifactError(f"{mpath}: format {manifest.get('format')!r}, "
                                f"this mtcompile reads {FORMAT!r}")
        manifest["tenants"], manifest["tenant_order"], manifest["target"]  # noqa: B018
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
    import tvm

    try:
        with quiet_native_log():
            module = tvm.runtime.load_module(str(lib))
    except Exception as e:
        raise ArtifactError(f"{lib}: cannot be loaded by TVM: {e}") from e
    bundle = Bundle(module, manifest, sources=sources, library_path=lib)
    try:
        embedded = json.loads(bytes(bundle._fn(MANIFEST_FN)().numpy()).decode())
    except Exception as e:
        raise ArtifactError(f"{lib}: has no readable embedded manifest: {e}") from e
    readable = {k: v for k, v in manifest.items() if k != "library_sha256"}
    if embedded != readable:
        diff = sorted(k for k in set(embedded) | set(readable)
                      if embedded.get(k) != readable.get(k))
        raise ArtifactError(f"{lib} and {mpath} disagree on {diff}")
    return bundle


__all__ = ["Bundle", "load", "MTCompileError"]
