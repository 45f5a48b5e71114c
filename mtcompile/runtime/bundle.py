"""Bundle: one executable with an entry per tenant, ``run_all`` and merged functions over
subsets of tenants (``run_some``), and its manifest; load.

Composed of the runtime's parts: `manifest` (what the bundle is), `inputs` (checks and
conversions), `vm` (one VM per thread), `executor` (run_all on stream functions),
`artifact` (save, load and their checks) and `profile` (time per call). The runtime
imports no frontend, pass or tool: a loaded bundle runs without any model code. The
compiler's bundle adds verify and pictures on top (`mtcompile.compiled`).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from mtcompile.abi import MANIFEST_FN, RUN_ALL
from mtcompile.errors import InputError, MTCompileError
from mtcompile.runtime import artifact, footprint, profile, signing, tvmrt
from mtcompile.runtime.inputs import check_inputs, run_all_arrays, seeded_inputs
from mtcompile.runtime.manifest import Manifest, TenantSig, signature_text
from mtcompile.runtime.threads import configure as configure_threads
from mtcompile.runtime.vm import ThreadVMs, device_for, raise_index_error
from mtcompile.runtime.weights import Weights


class Bundle:
    """A compiled multi-tenant executable and its manifest (a `Manifest`)."""

    def __init__(
        self,
        executable,
        manifest: Manifest,
        *,
        library_path: Path | None = None,
        threads: int | None = None,
        weights: list[np.ndarray] | None = None,
    ):
        self.executable = executable
        self.manifest = manifest
        # the entries' trailing parameters: arrays in memory after a compile, mapped from
        # the library after a load (`runtime.weights`)
        self.weights = Weights(list(weights or []), manifest.weights)
        self._library_path = library_path  # set when loaded: save copies it, no re-export
        # TVM's pool (the one pool of a run) sized before this bundle's first parallel call
        self.threads = configure_threads(threads)
        self._vms = ThreadVMs(
            executable,
            manifest.target,
            torch=[k for k, p in manifest.kernels.items() if p == "torch"],
            streams=manifest.streams.run is not None,
            threads=self.threads.pool,
            weights=self.weights,
        )
        self._stream_executor = None
        self._executor_lock = threading.Lock()  # one executor, whichever thread calls first
        self.signature_verified = False  # set by `load` when a verify key checked it

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        *,
        verify_key: bytes | str | None = None,
        require_signature: bool = False,
        **extra,
    ) -> Bundle:
        """A saved bundle, checked by the runtime core (format, TVM version, host CPU
        features, library hash, ELF headers, weights tables, embedded manifest, and with a
        verify key, `verify_key` or else ``MTCOMPILE_VERIFY_KEY``, its signature; with
        `require_signature` there must be a key); `extra` (``threads=``...) goes to the
        constructor of `cls`."""
        manifest, (module, weights), lib, text, verified = artifact.open_library(
            directory, verify_key, require_signature
        )
        bundle = cls(module, manifest, library_path=lib, weights=weights, **extra)
        bundle.signature_verified = verified
        artifact.check_embedded(
            directory, text, lambda: tvmrt.to_numpy(bundle._vms.fn(MANIFEST_FN)()), lib
        )
        return bundle

    # ------------------------------------------------------------------ signatures
    @property
    def tenant_names(self) -> list[str]:
        """Tenant names in bundle order (the order of ``run_all``'s inputs and outputs)."""
        return list(self.manifest.tenant_order)

    @property
    def target(self) -> str:
        return self.manifest.target

    def signature(self, name: str) -> TenantSig:
        """A tenant's inputs and outputs (names, shapes, dtypes) and source."""
        sig = self.manifest.signature(name)
        if sig is None:
            raise InputError(f"unknown tenant {name!r}; this bundle has {self.tenant_names}")
        return sig

    @property
    def num_streams(self) -> int:
        """Streams ``run_all`` runs on (1: the sequential ``run_all`` entry)."""
        s = self.manifest.streams
        return s.num_streams if s.run is not None else 1

    # ------------------------------------------------------------------ running
    def prepare(self, entry: str = RUN_ALL, weights: bool = True) -> None:
        """Create this thread's VM and look `entry` up, as a first call would, and (with
        `weights`) read the pages of the weights `entry` takes, which a load maps from the
        library without reading: a server's first request, timings and memory probes then
        leave the start-up out."""
        self._vms.fn(entry)
        if weights:
            self.weights.fault_in(entry)

    def run(self, name: str, *inputs) -> list[np.ndarray]:
        """Run one tenant; inputs are numpy arrays or torch tensors; returns its outputs."""
        return self._vms.call(name, check_inputs(name, self.signature(name), inputs))

    def run_all(self, inputs: dict[str, Any]) -> dict[str, list[np.ndarray]]:
        """Run every tenant in one call: ``{name: inputs}`` -> ``{name: [outputs]}``."""
        m = self.manifest
        arrays = run_all_arrays(inputs, m.tenants, m.tenant_order, m.run_all_inputs)
        flat = (
            self._run_streams(arrays)
            if m.streams.run is not None
            else self._vms.call(RUN_ALL, arrays)
        )
        return self._split(self.tenant_names, flat)

    @property
    def subsets(self) -> dict[tuple[str, ...], str]:
        """The merged functions over subsets of tenants: tenants (bundle order) -> name."""
        return {s.tenants: f for f, s in self.manifest.subsets.items()}

    def run_some(self, inputs: dict[str, Any]) -> dict[str, list[np.ndarray]]:
        """Run the tenants `inputs` names (``{name: inputs}`` -> ``{name: [outputs]}``, as
        `run_all`): in one call of the merged function built for exactly those tenants
        (``compile(subsets=...)``), or of run_all when all are present, else each tenant's
        own entry in turn."""
        m = self.manifest
        if not isinstance(inputs, dict) or not inputs:
            raise InputError(
                "run_some takes a dict {tenant name: tuple of inputs} naming one tenant or more"
            )
        unknown = sorted(set(inputs) - set(m.tenant_order))
        if unknown:
            raise InputError(
                f"run_some: unknown tenant(s) {unknown}; this bundle has {self.tenant_names}"
            )
        present = tuple(t for t in m.tenant_order if t in inputs)
        if present == m.tenant_order:
            return self.run_all(inputs)
        fname = self.subsets.get(present)
        if fname is None:
            return {t: self.run(t, *_as_tuple(inputs[t])) for t in present}
        arrays = run_all_arrays(inputs, m.tenants, present, m.subsets[fname].inputs, fname)
        return self._split(present, self._vms.call(fname, arrays))

    def _split(self, tenants, flat: list) -> dict[str, list[np.ndarray]]:
        """A merged call's flat outputs, by tenant."""
        out, i = {}, 0
        for t in tenants:
            k = len(self.manifest.tenants[t].outputs)
            out[t], i = flat[i : i + k], i + k
        return out

    def _executor(self):
        with self._executor_lock:
            return self._stream_executor or self._new_executor()

    def _new_executor(self):
        if self._stream_executor is None:
            from mtcompile.runtime.executor import StreamExecutor

            self._vms.vm()  # device check, library kernels and event points registered
            s = self.manifest.streams.run
            self._stream_executor = StreamExecutor(
                self.executable,
                device_for(self.target),
                s.functions,
                s.num_events,
                event_streams=s.event_streams,
                stream_tenants=s.stream_tenants,
                kernel_tenant=s.kernel_tenant,
                threads_per_stream=max(1, self.threads.pool // len(s.functions)),
            )
        return self._stream_executor

    def _run_streams(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """run_all on the stream functions at once (`StreamExecutor`, the runtime core's):
        one arena, made once per calling thread's VM and shared by the streams of each of its
        runs (the core runs one at a time); outputs copied to numpy once every stream is
        done."""
        from mtcompile.runtime.executor import StreamError

        s = self.manifest.streams.run
        ex = self._executor()
        storage = self._vms.arena(s.arena_function)
        tensors = self._vms.tensors(arrays)
        dev = device_for(self.target)
        try:
            results = ex.run(
                [
                    [storage, *(tensors[j] for j in ins), *self.weights.args(f, dev)]
                    for f, ins in zip(s.functions, s.stream_inputs, strict=True)
                ]
            )
        except StreamError as e:
            # the failure is this call's alone: the core's executor stays ready for the next
            raise_index_error(e.cause)
            raise
        flat: list = [None] * sum(len(o) for o in s.stream_outputs)
        for outs, res in zip(s.stream_outputs, results, strict=True):
            for j, r in zip(outs, list(res)[: len(outs)], strict=True):  # then kept exports
                flat[j] = tvmrt.to_numpy(r)
        return flat

    # ------------------------------------------------------------------ timing
    def trace(self, entry: str, arrays: list[np.ndarray], repeat: int = 1) -> list[list]:
        """Run `entry` `repeat` times; per run, the calls it made as ``(symbol, us)``."""
        return profile.trace(self._vms, entry, arrays, repeat)

    def profile(
        self, inputs: dict[str, Any] | None = None, repeat: int = 10, warmup: int = 3
    ) -> dict:
        """Time per kernel, grouped by tenant (each tenant's entry run `repeat` times).

        Returns ``{"repeat", "tenants": {name: {"total_us", "kernels": [{name, calls,
        total_us, mean_us, share}]}}}``, kernels sorted by time; each call's time is its
        median over the repeats. VM builtins (allocation, shape checks) appear as
        ``vm.builtin.*``. Tenants without `inputs` get seeded random ones.
        """
        inputs = dict(inputs or {})
        result: dict[str, Any] = {"repeat": repeat, "tenants": {}}
        for i, name in enumerate(self.tenant_names):
            given = inputs.get(name)
            arrays = (
                check_inputs(name, self.signature(name), tuple(given))
                if given is not None
                else list(seeded_inputs(self.signature(name), i))
            )
            for _ in range(warmup):
                self._vms.call(name, arrays)
            result["tenants"][name] = profile.kernel_table(self.trace(name, arrays, repeat))
        return result

    # ------------------------------------------------------------------ reports
    def report(self) -> dict:
        """A JSON-serializable summary: tenants, pipeline, sizes, memory, streams and the
        resident footprint (`footprint`)."""
        m = self.manifest
        rep = {
            "name": m.name,
            "target": m.target,
            "tenants": {
                t: {
                    "source": m.tenants[t].source,
                    "inputs": signature_text(m.tenants[t].inputs),
                    "outputs": signature_text(m.tenants[t].outputs),
                }
                for t in self.tenant_names
            },
            "pipeline": [asdict(p) for p in m.pipeline],
            "graph": asdict(m.graph),
            "versions": m.versions,
            "streams": m.streams.view(),
            "threads": asdict(self.threads),
            "cpu": {"name": m.cpu, "features": list(m.cpu_features or ())},
            "signature": signing.state(m.bundle_signature, self.signature_verified),
        }
        if m.memory is not None:
            rep["memory"] = asdict(m.memory)
        rep["footprint"] = self.footprint()
        return json.loads(json.dumps(rep))

    def footprint(self) -> dict:
        """Resident bytes of this bundle, by part: ``runtime`` (TVM's runtime, tvm-ffi, the
        BLAS), ``code`` (the library's pages), ``weights`` (its constants unpacked),
        ``arena`` (run_all's planned intermediates) and ``total``; ``source`` says which
        were measured on load and which computed (`mtcompile.runtime.footprint`)."""
        lib = self._library_path
        measured = artifact.measured_footprint(self.manifest.library_sha256) if lib else None
        size = lib.stat().st_size if lib is not None and lib.is_file() else None
        return footprint.report(self.manifest, measured, size)

    # ------------------------------------------------------------------ artifact
    def save(self, directory: str | os.PathLike, *, sign_key: bytes | str | None = None) -> Path:
        """Write ``<name>.so`` (manifest embedded) and ``manifest.json`` into `directory`;
        a failure leaves a directory that loads the earlier bundle or this one. With
        `sign_key`, the manifest carries an HMAC-SHA256 of itself and the library, which
        ``load(..., verify_key=)`` checks."""
        artifact.save(
            directory,
            self.manifest,
            self.executable,
            self._library_path,
            sign_key=sign_key,
            weights=self.weights.arrays,
        )
        return Path(directory)


def _as_tuple(given) -> tuple:
    return tuple(given) if isinstance(given, list | tuple) else (given,)


def load(
    directory: str | os.PathLike,
    threads: int | None = None,
    *,
    verify_key: bytes | str | None = None,
    require_signature: bool = False,
) -> Bundle:
    """Load a saved bundle; the runtime core checks its format, TVM version, host CPU, and
    that the library and the manifest agree; with a verify key (`verify_key`, else the
    environment's ``MTCOMPILE_VERIFY_KEY``) that they carry a signature made with it, and
    with `require_signature` that there is such a key. threads: TVM's pool size (default:
    the machine's cores)."""
    return Bundle.load(
        directory, threads=threads, verify_key=verify_key, require_signature=require_signature
    )


__all__ = ["Bundle", "load", "MTCompileError"]
