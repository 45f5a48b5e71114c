"""The saved bundle on disk: ``<name>.so`` and ``manifest.json``, written atomically, and
read back with every check (format, TVM version, library hash, embedded manifest).

A bundle whose kernels include the ``native`` provider carries its kernels: they are linked
into ``<name>.so`` (registered when it loads), and the BLAS and TVM runtime they link
against are loaded (`mtcompile.native.preload`) before it is opened."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from mtcompile import native
from mtcompile.errors import ArtifactError, MTCompileError
from mtcompile.runtime.abi import MANIFEST
from mtcompile.runtime.cpu import missing_features
from mtcompile.runtime.manifest import MUST_MATCH, Manifest
from mtcompile.runtime.vm import quiet_native_log


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def links_native(manifest: Manifest) -> bool:
    """Whether the bundle's library links the native kernels (a heavy op kind uses them)."""
    return "native" in manifest.kernels.values()


def save(directory: str | os.PathLike, manifest: Manifest, executable,
         library_path: Path | None = None) -> Manifest:
    """Write ``<name>.so`` (from `library_path` when the bundle was loaded from one, else
    exported from `executable`) and ``manifest.json`` into `directory`; returns the manifest
    with the library's hash. Files are written under temporary names and renamed into
    place, so a failure leaves any earlier bundle in `directory` intact."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{manifest.library}.", suffix=".so", dir=out)
    os.close(fd)
    tmp_lib = Path(tmp)
    tmp_manifest = out / f".{MANIFEST}.tmp"
    try:
        if library_path is not None:
            shutil.copyfile(library_path, tmp_lib)
        else:
            options = native.export_options() if links_native(manifest) else {}
            with quiet_native_log():
                executable.export_library(str(tmp_lib), **options)
        digest = sha256_file(tmp_lib)
        if library_path is not None and digest != manifest.library_sha256:
            raise ArtifactError(f"{library_path} changed since this bundle was loaded from it; "
                                "load it again before saving")
        saved = manifest.with_(library_sha256=digest)
        tmp_manifest.write_text(saved.to_json())
        os.replace(tmp_lib, out / manifest.library)
        os.replace(tmp_manifest, out / MANIFEST)
    except BaseException:
        tmp_lib.unlink(missing_ok=True)
        tmp_manifest.unlink(missing_ok=True)
        raise
    return saved


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """The checked manifest of a saved bundle (no library loaded: no TVM needed)."""
    d = Path(directory)
    path = d / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{d}: no {MANIFEST}; is this a directory written by Bundle.save?")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} cannot be read: {e}") from e
    return Manifest.from_json(text, path)


def check_versions(manifest: Manifest, where: Path) -> None:
    """Refuse a bundle built with another TVM: its executable format is not stable across
    versions (torch and onnx versions are recorded for information only)."""
    import tvm

    here = {"tvm": tvm.__version__}
    for k in MUST_MATCH:
        if manifest.versions[k] != here[k]:
            raise ArtifactError(f"{where}: built with {k.upper()} {manifest.versions[k]}, this "
                                f"process has {k.upper()} {here[k]}; TVM's executable format "
                                "is not stable across versions: rebuild the bundle with this TVM")


def check_cpu(manifest: Manifest, where: Path, flags: frozenset[str] | None = None) -> None:
    """Refuse a bundle whose kernels use instructions this CPU lacks (they would crash with
    an illegal instruction); `flags`: the host's cpuinfo flags (default: read here)."""
    missing = missing_features(manifest.cpu_features or (), flags)
    if missing:
        raise ArtifactError(f"{where}: built for CPU {manifest.cpu!r}, whose features "
                            f"{missing} this machine's CPU lacks; rebuild it here, or with "
                            "cpu='generic' (CLI --cpu generic) for any x86-64")


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
        with quiet_native_log():
            return tvm.runtime.load_module(str(private))


def open_library(directory: str | os.PathLike) -> tuple[Manifest, object, Path]:
    """(manifest, loaded library module, library path) of a saved bundle, every check
    passed except the embedded manifest's (`check_embedded`, which needs a VM)."""
    d = Path(directory)
    mpath = d / MANIFEST
    manifest = read_manifest(d)
    if manifest.library_sha256 is None:
        raise ArtifactError(f"{mpath} is corrupt: key 'library_sha256': missing")
    check_versions(manifest, mpath)
    check_cpu(manifest, mpath)
    lib = d / manifest.library
    if not lib.is_file():
        raise ArtifactError(f"{d}: the manifest names library {manifest.library!r}, which is "
                            "missing")
    actual = sha256_file(lib)
    if actual != manifest.library_sha256:
        raise ArtifactError(f"{lib} does not match {mpath}: library sha256 {actual[:16]}..., "
                            f"manifest expects {manifest.library_sha256[:16]}...; the files "
                            "come from different builds")
    try:
        if links_native(manifest):
            native.preload()
        module = _load_library(lib)
    except Exception as e:
        hint = (" (a bundle built for cuda loads only where TVM finds a CUDA GPU and driver)"
                if manifest.target == "cuda" else "")
        raise ArtifactError(f"{lib}: cannot be loaded by TVM: {e}{hint}") from e
    return manifest, module, lib


def check_embedded(manifest: Manifest, read_embedded, lib: Path) -> None:
    """The manifest embedded in the library must equal ``manifest.json`` (less what is
    known only after the build). `read_embedded()` returns the embedded bytes."""
    try:
        embedded = json.loads(bytes(read_embedded()).decode())
    except MTCompileError:
        raise  # no device, no torch for library kernels: said plainly by the VM set-up
    except Exception as e:
        raise ArtifactError(f"{lib}: has no readable embedded manifest: {e}") from e
    readable = manifest.embedded()
    if embedded != readable:
        diff = sorted(k for k in set(embedded) | set(readable)
                      if embedded.get(k) != readable.get(k))
        raise ArtifactError(f"{lib} and {lib.parent / MANIFEST} disagree on {diff}")
