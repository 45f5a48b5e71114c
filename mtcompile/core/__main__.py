"""``python -m mtcompile.core``: the native runtime core and ``mtcompile-run``, built here where
they are not prebuilt (or are stale); print their paths."""

from mtcompile.core import build, native_path

for target in (build.CORE, build.DRIVER):
    print(native_path(target))
