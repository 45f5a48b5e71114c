"""The bundle users get: the runtime's `Bundle` plus what needs the tools (verify against the
source models, the HTML display), reached only when called, so that `load` + `run` import
no frontend, pass or tool. `mtcompile.load` returns one; `mtcompile.runtime.bundle.load`
the lean runtime bundle."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from mtcompile.runtime.bundle import Bundle
from mtcompile.runtime.manifest import Manifest

if TYPE_CHECKING:  # the lean import path (load + run) imports no analysis
    from mtcompile.analysis.manager import AnalysisManager


class CompiledBundle(Bundle):
    """A `Bundle` with `module` (the optimized module of functions), `analyses` (its
    `AnalysisManager`: each function's kernel DAG, streams, memory plan), `graph` (its
    run_all, the merged graph), `sources` (the tenants as given) and `compile_report`: all
    on a freshly compiled bundle; a loaded one has the `sources` passed to `load` only."""

    def __init__(
        self,
        executable,
        manifest: Manifest,
        *,
        graph=None,
        sources=None,
        compile_report: dict | None = None,
        library_path: Path | None = None,
        threads: int | None = None,
        weights=None,
        module=None,
        analyses: AnalysisManager | None = None,
    ):
        super().__init__(
            executable, manifest, library_path=library_path, threads=threads, weights=weights
        )
        self.module = module
        self.analyses = analyses
        self.graph = graph
        self.sources = sources or {}
        self.compile_report = compile_report or {}

    def report(self) -> dict:
        """The runtime's report plus compile times, build facts and per-pass records."""
        return json.loads(json.dumps({**super().report(), **self.compile_report}))

    def verify(
        self,
        inputs: dict[str, tuple] | None = None,
        seed: int = 0,
        atol: float | None = None,
        rtol: float | None = None,
    ) -> dict:
        """Run each tenant's source model and the bundle on the same inputs; compare.

        A float output passes when max|bundle - source| <= atol + rtol * max|source|; by
        default (None) atol and rtol follow the tenant's least precise float dtype (float32:
        1e-4 of max|source|, no absolute floor; `mtcompile.tools.verify.TOLERANCES`);
        integer outputs must be equal, and output dtypes must be the source model's. A
        source output that is zero or near zero everywhere (max|source| <= 1e-6) gets a
        warning, here and in the result: such a check proves little. Returns
        ``{"ok": bool, "tenants": {name: {"outputs": [{max_abs, max_rel}], ...}}}``.
        Needs the source models (a compiled bundle, or `sources` passed to `load`).
        """
        from mtcompile.tools.verify import verify_bundle

        return verify_bundle(self, inputs, seed, atol, rtol)

    def _repr_html_(self) -> str:
        """Jupyter: tables and pictures of the bundle (see `mtcompile.tools.html_report`)."""
        from mtcompile.tools.html_report import bundle_html

        return bundle_html(self)


def load(
    directory: str | os.PathLike,
    sources: dict | None = None,
    *,
    threads: int | None = None,
    verify_key: bytes | str | None = None,
    require_signature: bool = False,
) -> CompiledBundle:
    """Load a saved bundle; the runtime core checks its format, TVM version, that this CPU
    has the features its kernels were compiled for, and that the library and the manifest
    agree. `sources` optionally maps tenant names to their source `Tenant`s, for `verify`;
    threads: TVM's thread pool size for this process (default: the machine's cores; a
    ``TVM_NUM_THREADS`` set by the user wins). verify_key (else the environment's
    ``MTCOMPILE_VERIFY_KEY``): the bundle must carry a signature made with this key
    (``save(..., sign_key=)``), else `ArtifactError`; without one the library's hash is
    checked against accidental damage only. require_signature: refuse to load without a
    key (a service that must run signed bundles only)."""
    return CompiledBundle.load(
        directory,
        sources=sources,
        threads=threads,
        verify_key=verify_key,
        require_signature=require_signature,
    )
