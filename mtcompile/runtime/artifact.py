"""The saved bundle on disk: ``<name>.so`` and ``manifest.json``, written so that a failure
leaves the old or the new bundle, and read back with every check (format, TVM version,
library hash, optional signature, ELF headers, embedded manifest).

A bundle whose kernels include the ``native`` provider carries its kernels: they are linked
into ``<name>.so`` (registered when it loads), and the BLAS and TVM runtime they link
against are loaded (`mtcompile.native.preload`) before it is opened. Libraries are loaded by
TVM's runtime library (`mtcompile.runtime.tvmrt`): loading imports neither tvm nor torch."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

from mtcompile import native
from mtcompile.errors import ArtifactError, MTCompileError
from mtcompile.runtime import contract, footprint, signing, tvmrt
from mtcompile.runtime.abi import MANIFEST
from mtcompile.runtime.manifest import Manifest
from mtcompile.runtime.vm import quiet_native_log
from mtcompile.runtime.weights import arrays as weights_arrays
from mtcompile.runtime.weights import export_addon as weights_addon


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def links_native(manifest: Manifest) -> bool:
    """Whether the bundle's library links the native kernels (a heavy op kind uses them)."""
    return "native" in manifest.kernels.values()


def _umask() -> int:
    """The process umask (read without changing it where /proc says it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def staged_name(library: str, digest: str) -> str:
    """Where `save` puts a library under its content hash before it takes the bundle's name
    (`load` reads it from there when a save stopped between the two renames)."""
    return f".{library}.{digest[:16]}"


def _bundle_directory(directory: str | os.PathLike) -> Path:
    """The directory to save a bundle into, created if missing (an existing file refused)."""
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"cannot save a bundle to {out}: it is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"cannot save a bundle to {out}: {e}") from e
    return out


def _write_library(
    tmp_lib: Path, manifest: Manifest, executable, library_path: Path | None, weights, mask: int
) -> str:
    """Write the library to `tmp_lib` (a copy of `library_path`, else `executable` exported
    with the native kernels when it links them and `weights` linked in) with the mode a
    fresh write gets under `mask`; returns its sha256 (a copy must hash as the manifest
    says)."""
    if library_path is not None:
        try:
            shutil.copyfile(library_path, tmp_lib)
        except FileNotFoundError as e:
            raise ArtifactError(
                f"{library_path}, which this bundle was loaded from, is "
                "gone; load the bundle again before saving"
            ) from e
    else:
        options = native.export_options() if links_native(manifest) else {}
        with weights_addon(weights or [], manifest.weights) as addons, quiet_native_log():
            options["addons"] = [*options.get("addons", []), *addons]
            executable.export_library(str(tmp_lib), **options)
    os.chmod(tmp_lib, 0o777 & ~mask)  # as the linker makes it (mkstemp's is 0600)
    digest = sha256_file(tmp_lib)
    if library_path is not None and digest != manifest.library_sha256:
        raise ArtifactError(
            f"{library_path} changed since this bundle was loaded from it; "
            "load it again before saving"
        )
    return digest


def _saved_manifest(manifest: Manifest, digest: str, key, tmp_lib: Path) -> Manifest:
    """The manifest naming the library's hash, signed over it and `tmp_lib` with `key`."""
    saved = manifest.with_(library_sha256=digest, bundle_signature=None)
    if key is not None:
        saved = saved.with_(
            bundle_signature=signing.sign(key, json.loads(saved.to_json()), tmp_lib)
        )
    return saved


def _remove_stale_staged(out: Path, library: str) -> None:
    """Remove the staged libraries of saves that stopped before their end."""
    stale = re.compile(re.escape(staged_name(library, "")) + "[0-9a-f]{16}")
    for old in out.iterdir():
        if stale.fullmatch(old.name):
            old.unlink(missing_ok=True)


def save(
    directory: str | os.PathLike,
    manifest: Manifest,
    executable,
    library_path: Path | None = None,
    sign_key: bytes | str | None = None,
    weights: list | None = None,
) -> Manifest:
    """Write ``<name>.so`` (from `library_path` when the bundle was loaded from one, else
    exported from `executable`, with `weights` linked in as the manifest's table lays them
    out) and ``manifest.json`` into `directory`; returns the manifest with the library's
    hash (and its signature, with `sign_key`).

    A failure at any step leaves a directory that loads the earlier bundle or the new one:
    the library goes first under its content-hash name (`staged_name`), then the manifest
    is replaced (from here on the new bundle loads, from the staged library), then the
    staged library takes the bundle's name. Files get the modes a fresh write gets under
    the umask; nothing time- or path-dependent is written into them."""
    out = _bundle_directory(directory)
    key = signing.as_key(sign_key, "sign_key")
    fd, tmp = tempfile.mkstemp(prefix=f".{manifest.library}.", suffix=".tmp", dir=out)
    os.close(fd)
    tmp_lib, staged = Path(tmp), None
    tmp_manifest = out / f".{MANIFEST}.tmp"
    mask = _umask()
    manifest_replaced = keep_staged = False
    try:
        digest = _write_library(tmp_lib, manifest, executable, library_path, weights, mask)
        saved = _saved_manifest(manifest, digest, key, tmp_lib)
        tmp_manifest.write_text(saved.to_json())
        os.chmod(tmp_manifest, 0o666 & ~mask)
        staged = out / staged_name(manifest.library, digest)
        # one left by a stopped save of these same bytes may be what the manifest names
        keep_staged = staged.exists()
        os.replace(tmp_lib, staged)
        os.replace(tmp_manifest, out / MANIFEST)
        manifest_replaced = True
        os.replace(staged, out / manifest.library)
    except BaseException:
        tmp_lib.unlink(missing_ok=True)
        tmp_manifest.unlink(missing_ok=True)
        if staged is not None and not manifest_replaced and not keep_staged:
            staged.unlink(missing_ok=True)  # the old manifest does not name it
        raise
    _remove_stale_staged(out, manifest.library)
    return saved


def _manifest_text(d: Path) -> tuple[Path, str]:
    path = d / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{d}: no {MANIFEST}; is this a directory written by Bundle.save?")
    try:
        return path, path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} cannot be read: {e}") from e


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """The checked manifest of a saved bundle (no library loaded: no TVM needed)."""
    path, text = _manifest_text(Path(directory))
    return Manifest.from_json(text, path)


# Loaded library modules by the sha256 of their bytes. A library linking the native kernels
# cannot be unloaded (their C++ code has STB_GNU_UNIQUE symbols, which make glibc's dlclose
# a no-op), so each load from a fresh path would map another copy for good (the library and
# its weights); the same bytes loaded again reuse the module instead.
_MODULES: dict[str, object] = {}
_MODULES_LOCK = threading.Lock()
# what loading each of them cost, measured then (`footprint.measure_load`), by the same hash
_FOOTPRINTS: dict[str, dict] = {}


def measured_footprint(library_sha256: str) -> dict | None:
    """The resident bytes measured when the library with this hash was loaded (runtime,
    compiler, code, weights; `mtcompile.runtime.footprint`), None if it was not loaded."""
    return _FOOTPRINTS.get(library_sha256)


def verify_signature(
    directory: str | os.PathLike, verify_key: bytes | str | None, require_signature: bool = False
) -> tuple[Manifest, bool]:
    """(manifest, whether a key verified its signature) of a saved bundle checked as `load`
    checks it before any dlopen (the runtime core: hash, signature with `verify_key` or
    MTCOMPILE_VERIFY_KEY, ELF headers...); nothing is loaded."""
    d = Path(directory)
    key = signing.as_key(verify_key, "verify_key")
    with tempfile.TemporaryDirectory(prefix="mtcompile-") as tmp:
        opened = contract.open_checked(d, Path(tmp) / "library.so", key, require_signature)
    return Manifest.from_json(opened.text, d / MANIFEST), opened.verified


def open_library(
    directory: str | os.PathLike,
    verify_key: bytes | str | None = None,
    require_signature: bool = False,
):
    """(manifest, (loaded library module, its weights mapped), library path, whether a key
    verified the signature) of a saved bundle, every check of the runtime core passed except
    the embedded manifest's (`check_embedded`, which needs a VM). The key is `verify_key`,
    else ``MTCOMPILE_VERIFY_KEY``; with `require_signature` there must be one.

    The core copies the library to a private file, checks it there (hash, signature, ELF
    headers) and the library is loaded from it: dlopen hands back a library already loaded
    from the same path, and the copy cannot change between the check and the load. The copy
    is removed on every path; the same bytes loaded before reuse their module (`_MODULES`)."""
    d = Path(directory)
    key = signing.as_key(verify_key, "verify_key")
    with tempfile.TemporaryDirectory(prefix="mtcompile-") as tmp:
        private = Path(tmp) / "library.so"
        opened = contract.open_checked(d, private, key, require_signature)
        try:
            manifest = Manifest.from_json(opened.text, d / MANIFEST)
        except ArtifactError:
            # the driver's next checks first (the library's weights, its embedded manifest):
            # a rule the core finds broken is named as mtcompile-run names it
            tvmrt.ffi()
            native.preload()
            with quiet_native_log():
                contract.check_loaded(d, opened.text, private, opened.source)
            raise
        with _MODULES_LOCK:
            cached = _MODULES.get(manifest.library_sha256)
            if cached is None:
                module, _FOOTPRINTS[manifest.library_sha256] = _load(
                    manifest, private, opened.source
                )
                # the library's own table, checked against its weights symbol: what is
                # cached never depends on a manifest.json
                lib_weights = contract.library_weights(private, opened.source)
                cached = _MODULES[manifest.library_sha256] = (
                    module,
                    lib_weights,
                    weights_arrays(lib_weights),
                )
    module, lib_weights, arrays = cached
    contract.check_weights(d, opened.text, lib_weights, opened.source)
    return manifest, (module, arrays), opened.source, opened.text, opened.verified


def _load(manifest: Manifest, private: Path, lib: Path) -> tuple[object, dict]:
    """The library as a TVM module, loaded by TVM's runtime library (no compiler), and the
    resident bytes loading it took (`footprint.measure_load`)."""
    try:
        tvmrt.ffi(torch="torch" in manifest.kernels.values())
        if links_native(manifest):
            native.preload()
        with quiet_native_log():
            return footprint.measure_load(
                lambda: tvmrt.load_module(str(private), manifest.target), private
            )
    except Exception as e:
        hint = (
            " (a bundle built for cuda loads only where TVM finds a CUDA GPU and driver)"
            if manifest.target == "cuda"
            else ""
        )
        raise ArtifactError(f"{lib}: cannot be loaded by TVM: {e}{hint}") from e


def check_embedded(directory, text: str, read_embedded, lib: Path) -> None:
    """The manifest embedded in the library must equal ``manifest.json`` (`text`), less what
    is known only after the build (the core's rule embedded-manifest). `read_embedded()`
    returns the embedded bytes."""
    try:
        embedded = bytes(read_embedded())
    except MTCompileError:
        raise  # no device, no torch for library kernels: said plainly by the VM set-up
    except Exception as e:
        raise ArtifactError(f"{lib}: has no readable embedded manifest: {e}") from e
    contract.check_embedded(directory, text, embedded, lib)
