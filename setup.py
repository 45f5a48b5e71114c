"""Builds the native runtime core (``mtcompile/core/libmtcompile_core.so``) and the driver
(``mtcompile/driver/mtcompile-run``) when the package is built: a wheel carries them (so it is
a platform wheel), an editable install builds them in the checkout. The rest of the package's
metadata is in pyproject.toml; the build is `mtcompile.core.build`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel

_HERE = Path(__file__).resolve().parent


def _native_build():
    # by path: the package is not installed (nor importable) while it is being built
    path = _HERE / "mtcompile" / "core" / "build.py"
    spec = importlib.util.spec_from_file_location("_mtcompile_native_build", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class BuildNative(build_py):
    """build_py, then the core and the driver into the build tree (or, for an editable
    install, into the checkout)."""

    def run(self):
        super().run()
        build = _native_build()
        root = _HERE if getattr(self, "editable_mode", False) else Path(self.build_lib)
        for target in (build.CORE, build.DRIVER):
            dest = root / target.file.parent.relative_to(_HERE)
            try:
                out = build.build_ahead(target, dest, editable=root == _HERE)
            except build.BuildError as e:
                # SystemExit: an editable install would only warn about an Exception
                raise SystemExit(f"error: {e}") from None
            print(f"built {target.what}: {out}")


class PlatformWheel(bdist_wheel):
    """A wheel for this platform (it carries native code) but any Python 3: the native
    parts use tvm-ffi's C ABI, not Python's."""

    def get_tag(self):
        _, _, plat = super().get_tag()
        return "py3", "none", plat


class NativeDistribution(Distribution):
    def has_ext_modules(self):
        return True  # platlib, and a platform tag


setup(
    distclass=NativeDistribution,
    cmdclass={"build_py": BuildNative, "bdist_wheel": PlatformWheel},
)
