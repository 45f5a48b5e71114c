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
import struct
import tempfile
import threading
from pathlib import Path

from mtcompile import native
from mtcompile.errors import ArtifactError, MTCompileError
from mtcompile.runtime import contract, footprint, signing, tvmrt
from mtcompile.runtime.abi import MANIFEST
from mtcompile.runtime.cpu import missing_features
from mtcompile.runtime.manifest import MUST_MATCH, Manifest
from mtcompile.runtime.vm import quiet_native_log
from mtcompile.runtime.weights import export_addon as weights_addon
from mtcompile.runtime.weights import mapped as weights_mapped


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


def save(directory: str | os.PathLike, manifest: Manifest, executable,
         library_path: Path | None = None, sign_key: bytes | str | None = None,
         weights: list | None = None) -> Manifest:
    """Write ``<name>.so`` (from `library_path` when the bundle was loaded from one, else
    exported from `executable`, with `weights` linked in as the manifest's table lays them
    out) and ``manifest.json`` into `directory`; returns the manifest with the library's
    hash (and its signature, with `sign_key`).

    A failure at any step leaves a directory that loads the earlier bundle or the new one:
    the library goes first under its content-hash name (`staged_name`), then the manifest
    is replaced (from here on the new bundle loads, from the staged library), then the
    staged library takes the bundle's name. Files get the modes a fresh write gets under
    the umask; nothing time- or path-dependent is written into them."""
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"cannot save a bundle to {out}: it is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"cannot save a bundle to {out}: {e}") from e
    key = signing.as_key(sign_key, "sign_key")
    fd, tmp = tempfile.mkstemp(prefix=f".{manifest.library}.", suffix=".tmp", dir=out)
    os.close(fd)
    tmp_lib, staged = Path(tmp), None
    tmp_manifest = out / f".{MANIFEST}.tmp"
    final_lib = out / manifest.library
    mask = _umask()
    manifest_replaced = keep_staged = False
    try:
        if library_path is not None:
            try:
                shutil.copyfile(library_path, tmp_lib)
            except FileNotFoundError as e:
                raise ArtifactError(f"{library_path}, which this bundle was loaded from, is "
                                    "gone; load the bundle again before saving") from e
        else:
            options = native.export_options() if links_native(manifest) else {}
            with weights_addon(weights or [], manifest.weights) as addons, quiet_native_log():
                options["addons"] = [*options.get("addons", []), *addons]
                executable.export_library(str(tmp_lib), **options)
        os.chmod(tmp_lib, 0o777 & ~mask)  # as the linker makes it (mkstemp's is 0600)
        digest = sha256_file(tmp_lib)
        if library_path is not None and digest != manifest.library_sha256:
            raise ArtifactError(f"{library_path} changed since this bundle was loaded from it; "
                                "load it again before saving")
        saved = manifest.with_(library_sha256=digest, bundle_signature=None)
        if key is not None:
            saved = saved.with_(bundle_signature=signing.sign(
                key, json.loads(saved.to_json()), tmp_lib))
        tmp_manifest.write_text(saved.to_json())
        os.chmod(tmp_manifest, 0o666 & ~mask)
        staged = out / staged_name(manifest.library, digest)
        # one left by a stopped save of these same bytes may be what the manifest names
        keep_staged = staged.exists()
        os.replace(tmp_lib, staged)
        os.replace(tmp_manifest, out / MANIFEST)
        manifest_replaced = True
        os.replace(staged, final_lib)
    except BaseException:
        tmp_lib.unlink(missing_ok=True)
        tmp_manifest.unlink(missing_ok=True)
        if staged is not None and not manifest_replaced and not keep_staged:
            staged.unlink(missing_ok=True)  # the old manifest does not name it
        raise
    stale = re.compile(re.escape(staged_name(manifest.library, "")) + "[0-9a-f]{16}")
    for old in out.iterdir():  # staged libraries of saves that stopped before their end
        if stale.fullmatch(old.name):
            old.unlink(missing_ok=True)
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


def check_versions(manifest: Manifest, where: Path) -> None:
    """Refuse a bundle built with another TVM: its executable format is not stable across
    versions (torch and onnx versions are recorded for information only)."""
    here = {"tvm": tvmrt.tvm_version()}
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


def check_elf(path: Path, where: Path) -> None:
    """Refuse a library whose ELF headers point past its end (a truncated file): dlopen
    would map the missing pages and die with SIGBUS on first touch."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            _refuse(where, f"not a 64-bit little-endian ELF shared library ({size} bytes)")
        phoff, shoff = struct.unpack_from("<QQ", head, 0x20)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", head, 0x36)
        need = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
        if need > size:
            _refuse(where, f"truncated: its ELF headers need {need} bytes, the file has {size}")
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        offset, _, _, filesz = struct.unpack_from("<QQQQ", table, i * phentsize + 8)
        if offset + filesz > size:
            _refuse(where, f"truncated: ELF segment {i} ends at byte {offset + filesz}, the "
                    f"file has {size}")


def _refuse(lib: Path, why: str):
    raise ArtifactError(f"{lib}: cannot be loaded by TVM: {why}")


def _copy_checked(src: Path, dst: Path, mac) -> str:
    """Copy `src` to `dst`; the sha256 of the bytes copied (and `mac` fed them): what is
    checked is what gets loaded, whatever happens to `src` meanwhile."""
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        for chunk in iter(lambda: fi.read(1 << 20), b""):
            h.update(chunk)
            if mac is not None:
                mac.update(chunk)
            fo.write(chunk)
    return h.hexdigest()


def _private_copy(d: Path, manifest: Manifest, raw: dict, key: bytes | None,
                  private: Path) -> Path:
    """Copy the bundle's library to `private` and check it against the manifest (hash, and
    signature with `key`); returns the file it came from: ``<name>.so``, or its staged copy
    when a save stopped after replacing the manifest (`staged_name`)."""
    mpath = d / MANIFEST
    want = manifest.library_sha256
    lib = d / manifest.library
    staged = d / staged_name(manifest.library, want)
    found = None
    for src in (lib, staged):
        if not src.is_file():
            continue
        mac = signing.signer(key, raw) if key is not None else None
        try:
            digest = _copy_checked(src, private, mac)
        except OSError as e:
            raise ArtifactError(f"{src} cannot be read: {e}") from e
        if digest == want:
            if mac is not None:
                signing.check(mac, raw, mpath)
            return src
        found = found or digest
    if found is None:
        raise ArtifactError(f"{d}: the manifest names library {manifest.library!r}, which is "
                            "missing")
    raise ArtifactError(f"{lib} does not match {mpath}: library sha256 {found[:16]}..., "
                        f"manifest expects {want[:16]}...; the files come from different "
                        "builds")


def _hashed_manifest(d: Path) -> tuple[Path, str, Manifest]:
    """(path, text, parsed) of a saved bundle's manifest, which must record its library's
    hash."""
    mpath, text = _manifest_text(d)
    manifest = Manifest.from_json(text, mpath)
    if manifest.library_sha256 is None:
        raise ArtifactError(f"{mpath} is corrupt: key 'library_sha256': missing")
    return mpath, text, manifest


def verify_signature(directory: str | os.PathLike, verify_key: bytes | str) -> Manifest:
    """The manifest of a saved bundle whose library matches its hash and whose signature
    was made with `verify_key` (else `ArtifactError`); nothing is loaded, no TVM needed."""
    d = Path(directory)
    key = signing.as_key(verify_key, "verify_key")
    mpath, text, manifest = _hashed_manifest(d)
    with tempfile.TemporaryDirectory(prefix="mtcompile-") as tmp:
        _private_copy(d, manifest, json.loads(text), key, Path(tmp) / manifest.library)
    return manifest


def open_library(directory: str | os.PathLike, verify_key: bytes | str | None = None
                 ) -> tuple[Manifest, object, Path]:
    """(manifest, (loaded library module, its weights mapped), library path) of a saved
    bundle, every check
    passed except the embedded manifest's (`check_embedded`, which needs a VM). With
    `verify_key`, the bundle must carry a signature made with it (`signing`).

    The library is copied to a private file, checked there (hash, signature, ELF headers)
    and loaded from it: dlopen hands back a library already loaded from the same path, and
    the copy cannot change between the check and the load. The copy is removed on every
    path; the same bytes loaded before reuse their module (`_MODULES`)."""
    d = Path(directory)
    key = signing.as_key(verify_key, "verify_key")
    mpath, text, manifest = _hashed_manifest(d)
    check_versions(manifest, mpath)
    check_cpu(manifest, mpath)
    with tempfile.TemporaryDirectory(prefix="mtcompile-") as tmp:
        private = Path(tmp) / manifest.library
        lib = _private_copy(d, manifest, json.loads(text), key, private)
        with _MODULES_LOCK:
            cached = _MODULES.get(manifest.library_sha256)
            if cached is None:
                check_elf(private, lib)
                module, _FOOTPRINTS[manifest.library_sha256] = _load(manifest, private, lib)
                # the library's own table, checked against its weights symbol: what is
                # cached never depends on a manifest.json
                cached = _MODULES[manifest.library_sha256] = (
                    module, weights_mapped(private, lib))
    module, mapped = cached
    if manifest.weights is not None:  # its own words first (bounds), then the equality
        contract.check_weights(manifest.weights, mapped.size, mpath)
    contract.check_same_weights(manifest.weights, mapped.table, mpath)
    return manifest, (module, mapped.arrays), lib


def _load(manifest: Manifest, private: Path, lib: Path) -> tuple[object, dict]:
    """The library as a TVM module, loaded by TVM's runtime library (no compiler), and the
    resident bytes loading it took (`footprint.measure_load`)."""
    try:
        tvmrt.ffi(torch="torch" in manifest.kernels.values())
        if links_native(manifest):
            native.preload()
        with quiet_native_log():
            return footprint.measure_load(
                lambda: tvmrt.load_module(str(private), manifest.target), private)
    except Exception as e:
        hint = (" (a bundle built for cuda loads only where TVM finds a CUDA GPU and driver)"
                if manifest.target == "cuda" else "")
        raise ArtifactError(f"{lib}: cannot be loaded by TVM: {e}{hint}") from e


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
