"""``python -m mtcompile.driver``: build the C++ driver ``mtcompile-run``; print its path."""

from mtcompile.driver import build

print(build())
