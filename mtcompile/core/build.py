"""Building the native runtime core and ``mtcompile-run``: ahead of time when the package is
built (``setup.py``: a wheel carries them, an editable install builds them in place), and at
run time only where that build is absent or stale (a source edited since, another tvm-ffi or
TVM installed), then with a one-line notice, cached by sources and flags.

Standard library only, and nothing of mtcompile: ``setup.py`` loads this file by path before
the package is installed. A prebuilt file has a ``<file>.json`` beside it recording the hash of
its sources and the versions it was built against; `stale` compares them with what is here."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CORE",
    "DRIVER",
    "BuildError",
    "Env",
    "Target",
    "build_ahead",
    "cached",
    "find_compiler",
    "sources_hash",
    "stale",
    "versions",
]

_PKG = Path(__file__).resolve().parent.parent  # the mtcompile package
# what a prebuilt file depends on besides its sources: the headers and libraries it links
VERSIONED = ("apache-tvm-ffi", "apache-tvm", "scipy-openblas32")


class BuildError(RuntimeError):
    """A native part of mtcompile cannot be built (or found prebuilt) here."""


@dataclass(frozen=True)
class Env:
    """Where the headers and libraries a build uses are (the installed wheels')."""

    ffi_dir: Path  # the tvm_ffi package: include/, lib/libtvm_ffi.so
    dlpack_include: Path
    tvm_lib: Path | None  # libtvm_runtime.so (the driver links it)
    blas_lib: Path | None  # libscipy_openblas.so (likewise)
    tvm_version: str | None

    @staticmethod
    def here() -> Env:
        """The installed wheels' headers and libraries (no ``tvm`` import: its compiler)."""
        import tvm_ffi.libinfo as info

        return Env(
            ffi_dir=Path(info.find_libtvm_ffi()).resolve().parent.parent,
            dlpack_include=Path(info.find_dlpack_include_path()),
            tvm_lib=_dist_dir("apache-tvm", "tvm/lib", "libtvm_runtime.so"),
            blas_lib=_dist_dir("scipy-openblas32", "scipy_openblas32/lib", "libscipy_openblas.so"),
            tvm_version=versions().get("apache-tvm"),
        )


def _dist_dir(dist: str, sub: str, probe: str) -> Path | None:
    try:
        d = Path(importlib.metadata.distribution(dist).locate_file(sub))
    except importlib.metadata.PackageNotFoundError:
        return None
    return d if (d / probe).is_file() else None


def versions() -> dict[str, str | None]:
    """The installed versions of what a prebuilt file was built against (None: absent)."""
    out: dict[str, str | None] = {}
    for d in VERSIONED:
        try:
            out[d] = importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            out[d] = None
    return out


def _common(env: Env, src: Path, rpaths: list[str]) -> list[str]:
    tvm = [f'-DMTC_TVM_VERSION="{env.tvm_version}"'] if env.tvm_version else []
    return [
        "-std=c++17",
        "-O2",
        *tvm,
        f"-I{_PKG / 'core' / 'src'}",
        f"-I{env.ffi_dir / 'include'}",
        f"-I{env.dlpack_include}",
        # no build or site-packages path inside the file: it does not depend on where it was built
        f"-ffile-prefix-map={_PKG}=mtcompile",
        f"-ffile-prefix-map={env.ffi_dir}=tvm_ffi",
        str(src),
        f"-L{env.ffi_dir / 'lib'}",
        "-ltvm_ffi",
        *[f"-Wl,-rpath,{r}" for r in rpaths],
    ]


def _rpaths_here(env: Env) -> list[str]:
    """Where a build that stays on this machine finds tvm-ffi (the driver: TVM's runtime and
    the BLAS too): where they are now."""
    return [str(p) for p in (env.ffi_dir / "lib", env.tvm_lib, env.blas_lib) if p]


def _rpaths_installed(rel: str, editable: bool) -> list[str]:
    """Where a prebuilt file finds them: the wheels beside mtcompile in site-packages
    ($ORIGIN-relative, `rel` from the file to site-packages); an editable install stays in the
    checkout, so also the site-packages of the interpreter it is installed into."""
    subs = ("tvm_ffi/lib", "tvm/lib", "scipy_openblas32/lib")
    out = [f"$ORIGIN/{rel}/{s}" for s in subs]
    return out + ([f"{site}/{s}" for site in _sites() for s in subs] if editable else [])


def _sites() -> list[str]:
    """site-packages of the interpreter being installed into, as it sees them when not in pip's
    isolated build environment (an editable install stays in the checkout, so the wheels'
    relative place is unknown): where its tvm-ffi, TVM and BLAS are or will be."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    code = "import json, site, sysconfig; print(json.dumps([sysconfig.get_paths()['purelib'], *site.getsitepackages()]))"
    try:
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        return list(dict.fromkeys(json.loads(res.stdout)))
    except (OSError, ValueError):
        return []


def core_flags(env: Env, rpaths: list[str]) -> list[str]:
    """The compiler flags of the runtime core (a shared library)."""
    return ["-shared", "-fPIC", *_common(env, _PKG / "core" / "src" / "core.cc", rpaths)]


def driver_flags(env: Env, rpaths: list[str]) -> list[str]:
    """The compiler flags of ``mtcompile-run``: it links TVM's runtime and the BLAS by name
    (--no-as-needed: a bundle's library needs them loaded first, as mtcompile.native.preload
    does for Python)."""
    if env.tvm_lib is None or env.blas_lib is None:
        raise BuildError("building mtcompile-run needs the apache-tvm and scipy-openblas32 wheels")
    libs = ["-Wl,--no-as-needed", f"-L{env.tvm_lib}", "-ltvm_runtime"]
    libs += [f"-L{env.blas_lib}", "-lscipy_openblas"]
    return [*_common(env, _PKG / "driver" / "src" / "run_bundle.cc", rpaths), *libs]


@dataclass(frozen=True)
class Target:
    """One native part: its name in messages, its file, and how it is built."""

    what: str
    file: Path  # where the prebuilt file lies in the package
    source_dirs: tuple[Path, ...]
    flags: Callable[[Env, list[str]], list[str]]
    rel: str  # from the file's directory to site-packages, in an installed wheel


CORE = Target(
    "mtcompile's runtime core",
    _PKG / "core" / "libmtcompile_core.so",
    (_PKG / "core" / "src",),
    core_flags,
    "../..",
)
DRIVER = Target(
    "mtcompile-run",
    _PKG / "driver" / "mtcompile-run",
    (_PKG / "driver" / "src", _PKG / "core" / "src"),
    driver_flags,
    "../..",
)


def sources_hash(dirs) -> str:
    """A hash of the ``.cc``/``.h`` files of `dirs` (names and bytes)."""
    h = hashlib.sha256()
    for d in dirs:
        for p in sorted(Path(d).iterdir()):
            if p.suffix in (".cc", ".h"):
                h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def find_compiler() -> str | None:
    """The C++ compiler: ``$CXX`` when it exists, else g++ or c++ on PATH; None if none."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx)
    return shutil.which("g++") or shutil.which("c++")


def _compile(cxx: str, flags: list[str], out: Path, what: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    res = subprocess.run([cxx, *flags, "-o", str(tmp)], capture_output=True, text=True)
    if res.returncode != 0:
        raise BuildError(f"building {what} failed:\n{res.stderr[-4000:]}")
    os.replace(tmp, out)  # atomic: a concurrent build of the same key writes the same file


def build_ahead(t: Target, dest: Path, editable: bool) -> Path:
    """Build `t` into `dest` (its directory in a wheel's tree, or the checkout for an
    editable install) with ``<file>.json`` beside it; the file's path."""
    cxx = find_compiler()
    if cxx is None:
        raise BuildError(f"building {t.what} needs a C++ compiler (g++, c++ or $CXX); none found")
    out = dest / t.file.name
    _compile(cxx, t.flags(Env.here(), _rpaths_installed(t.rel, editable)), out, t.what)
    info = {"sources": sources_hash(t.source_dirs), "versions": versions()}
    Path(f"{out}.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    return out


def stale(t: Target) -> str | None:
    """Why the prebuilt `t` cannot be used here (absent, sources edited, other versions), or
    None when it can."""
    info_path = Path(f"{t.file}.json")
    if not t.file.is_file() or not info_path.is_file():
        return f"there is no prebuilt {t.file.name} (mtcompile was not built by its installer)"
    info = json.loads(info_path.read_text())
    if info.get("sources") != sources_hash(t.source_dirs):
        return f"its sources changed since {t.file.name} was built"
    here, then = versions(), info.get("versions", {})
    changed = [f"{d} {then.get(d)} -> {here[d]}" for d in VERSIONED if then.get(d) != here[d]]
    return (
        f"{t.file.name} was built against other versions ({', '.join(changed)})"
        if changed
        else None
    )


def cached(t: Target, cache_dir: Path, hint: str = "") -> str:
    """The prebuilt `t` when it is current; else `t` compiled once with the system compiler
    (a one-line notice on stderr), cached under `cache_dir` by its sources and flags."""
    reason = stale(t)
    if reason is None:
        return str(t.file)
    env = Env.here()
    flags = t.flags(env, _rpaths_here(env))
    key = hashlib.sha256((sources_hash(t.source_dirs) + repr(flags)).encode()).hexdigest()[:16]
    out = cache_dir / f"{t.file.stem.removeprefix('lib')}-{key}" / t.file.name
    if out.exists():
        return str(out)
    cxx = find_compiler()
    if cxx is None:
        raise BuildError(
            f"{t.what} cannot be loaded: {reason}, and no C++ compiler (g++, c++ or $CXX) is "
            f"here to build it{hint}"
        )
    print(f"mtcompile: {t.what}: {reason}; compiling it with {cxx} (once, cached)", file=sys.stderr)
    _compile(cxx, flags, out, t.what)
    return str(out)
