"""Build cache: a bundle's library and manifest kept under a hash of everything that goes
into them, so that a build whose inputs did not change loads them instead of compiling.

The key covers the tenants (name, kind, content hash, input signature, shared inputs), the
bundle name, target (and TVM's target: a GPU's architecture), CPU and its features, kernel
providers, the pipeline with its options, the thread count passes plan for, the tuning
database's content hash and the versions of mtcompile, TVM, tvm-ffi, torch, onnx, Python
and the native kernels' sources. An entry is
``<dir>/<key>/`` holding ``<name>.so``, ``manifest.json`` and ``key.json`` (the key, what
went into it, and the manifest's hash). Entries are written into a temporary directory and
renamed into place, so two builds writing one entry at once leave one whole entry; an entry
whose hashes do not check is removed and rebuilt, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mtcompile import bundle_manifest, native
from mtcompile.backend.lowering import HOST_CPU, make_target
from mtcompile.backend.tuning import RECORDS, WORKLOADS
from mtcompile.compiled import CompiledBundle
from mtcompile.errors import MTCompileError
from mtcompile.ir.graph import TensorTy
from mtcompile.runtime import artifact
from mtcompile.runtime.abi import MANIFEST

log = logging.getLogger(__name__)
KEY_FILE = "key.json"
KEY_FORMAT = 5  # bump when what goes into the key changes


def default_dir() -> Path:
    """``$MTCOMPILE_CACHE_DIR/builds``, else ``$XDG_CACHE_HOME`` or ``~/.cache`` +
    ``mtcompile/builds`` (the base the native kernels' cache uses too)."""
    base = os.environ.get("MTCOMPILE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mtcompile"
    )
    return Path(base) / "builds"


def resolve_dir(cache: bool | str | os.PathLike | None) -> Path | None:
    """The cache directory `compile(cache=...)` asks for: None (off) for False/None, the
    default for True, else the given path."""
    if cache is None or cache is False:
        return None
    return default_dir() if cache is True else Path(cache)


def check_dir(directory: Path) -> None:
    """Raise `MTCompileError` unless `directory` can hold cache entries (made if missing,
    a file written and removed there): said before the compile, not after it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe.", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise MTCompileError(
            f"build cache directory {directory} cannot be used: "
            f"{e.strerror or e}; give a writable --cache-dir (API: cache=) "
            "or --no-cache (cache=None)"
        ) from e


def tuning_db_hash(directory: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a tuning database's two JSON files (content, not path)."""
    h = hashlib.sha256()
    for name in (WORKLOADS, RECORDS):
        h.update(name.encode() + b"\0" + (Path(directory) / name).read_bytes() + b"\0")
    return f"sha256:{h.hexdigest()}"


def key_doc(
    *,
    name: str,
    target: str,
    cpu: str | None,
    cpu_features: Sequence[str] | None,
    providers: dict[str, str],
    pipeline,
    cores: int,
    tuning_db: str | None,
    tenants: Sequence,
    imported: Sequence,
    graphs: Sequence,
    subsets: dict | None = None,
) -> dict:
    """Everything that goes into a bundle's library and manifest, as plain JSON."""
    return {
        "format": KEY_FORMAT,
        "name": name,
        "target": target,
        "cpu": cpu,
        # TVM's own target: the GPU architecture of a cuda build, the llvm target of a CPU one
        "tvm_target": str(make_target(target, cpu or HOST_CPU)),
        "cpu_features": sorted(cpu_features or ()),
        "kernels": dict(sorted(providers.items())),
        "pipeline": [[p.name, json.loads(json.dumps(p.options(), default=str))] for p in pipeline],
        "threads": cores,
        "tuning_db": tuning_db,
        "versions": _versions(),
        "tenants": _tenant_docs(tenants, imported, graphs),
        "subsets": {f: list(ts) for f, ts in sorted((subsets or {}).items())},
    }


def _versions() -> dict:
    """The versions a build depends on: the manifest's, tvm_ffi's, Python's and the native
    kernels' source hash."""
    versions = bundle_manifest.versions()
    try:
        import tvm_ffi

        versions["tvm_ffi"] = tvm_ffi.__version__
    except (ImportError, AttributeError):  # pragma: no cover - tvm needs it
        versions["tvm_ffi"] = "none"
    versions.update(python=platform.python_version(), native_kernels=native.source_hash())
    return versions


def _tenant_docs(tenants: Sequence, imported: Sequence, graphs: Sequence) -> list[dict]:
    """Per tenant: name, source kind and hash, input types and shared inputs."""
    return [
        {
            "name": t.name,
            "kind": it.kind,
            "source_sha256": it.source_hash,
            "inputs": [[local, _type(g.node(node).ty)] for local, node in g.tenants[t.name].inputs],
            "shared_inputs": dict(sorted((t.shared_inputs or {}).items())),
        }
        for t, it, g in zip(tenants, imported, graphs, strict=True)
    ]


def _type(ty) -> list | str:
    # a symbolic dim: its name and bounds (the bounds size the memory plan)
    return (
        [[d if isinstance(d, int) else [d.text, d.lo, d.hi] for d in ty.shape], ty.dtype]
        if isinstance(ty, TensorTy)
        else str(ty)
    )


def build_key(doc: dict) -> str:
    """The entry name of a key document: its sha256."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _discard(entry: Path) -> None:
    """Remove an entry: renamed away first, so no reader sees it half deleted."""
    gone = entry.with_name(f".{entry.name}.gone.{os.getpid()}")
    try:
        os.rename(entry, gone)
    except OSError:
        return  # another process removed or replaced it
    shutil.rmtree(gone, ignore_errors=True)


def lookup(directory: Path, key: str, *, sources: dict, threads: int | None):
    """The bundle cached under `key`, loaded and checked, or None (absent or corrupt: a
    corrupt entry is removed, so the build that follows replaces it)."""
    entry = directory / key
    if not entry.is_dir():
        return None
    try:
        recorded = json.loads((entry / KEY_FILE).read_text())
        if recorded.get("key") != key:
            raise MTCompileError(f"{KEY_FILE} names key {str(recorded.get('key'))[:16]}")
        got = artifact.sha256_file(entry / MANIFEST)
        if got != recorded.get("manifest_sha256"):
            raise MTCompileError(f"{MANIFEST} sha256 {got[:16]}... is not the recorded one")
        # load checks the library against the manifest's hash and the embedded manifest
        return CompiledBundle.load(entry, sources=sources, threads=threads)
    except (MTCompileError, OSError, ValueError, AttributeError) as e:
        log.warning("build cache: entry %s is corrupt (%s); rebuilding it", key[:16], e)
        _discard(entry)
        return None


def store(directory: Path, key: str, doc: dict, bundle: CompiledBundle) -> None:
    """Write `bundle` as the entry of `key`, whole or not at all. Afterwards the bundle
    saves by copying the entry's library (no second export) when its bytes are the ones
    this build made."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.", dir=directory))
    entry = directory / key
    try:
        saved = artifact.save(
            tmp, bundle.manifest, bundle.executable, weights=bundle.weights.arrays
        )
        (tmp / KEY_FILE).write_text(
            json.dumps(
                {
                    "key": key,
                    "manifest_sha256": artifact.sha256_file(tmp / MANIFEST),
                    "inputs": doc,
                },
                indent=1,
                sort_keys=True,
            )
            + "\n"
        )
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would keep a shared cache from others
        try:
            os.rename(tmp, entry)
        except OSError:  # another build wrote this entry first: keep theirs
            log.info("build cache: entry %s was written by another build", key[:16])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lib = entry / saved.library
    if lib.is_file() and artifact.sha256_file(lib) == saved.library_sha256:
        bundle.manifest = saved
        bundle._library_path = lib
