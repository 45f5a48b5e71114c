"""``python -m mtcompile.core``: build the native runtime core; print its path."""

from mtcompile.core import library_path

print(library_path())
