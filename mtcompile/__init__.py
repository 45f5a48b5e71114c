"""mtcompile: compile several deep-learning models into one multi-tenant TVM executable.

bundle = mtcompile.compile([mtcompile.Tenant("vision", module, example_inputs=(x,)), ...])
bundle.run("vision", x); bundle.run_all({...}); bundle.save("out/"); mtcompile.load("out/")
"""

from mtcompile.errors import (
    ArtifactError,
    DivisionByZeroError,
    IndexOutOfRangeError,
    InputError,
    MTCompileError,
    QueueFullError,
    SchedulerClosedError,
    ServingError,
    SpecError,
    TenantError,
    UnsupportedOperatorError,
    VerifyError,
)
from mtcompile.tenant import Tenant
from mtcompile.version import __version__  # noqa: F401  (the public version)

# what compiling imports that a serving install (the base, without the `compile` extra) lacks
_COMPILE_PACKAGES = ("torch", "onnx", "networkx")


def _installed(package: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(package) is not None  # found, not imported
    except (ImportError, ValueError):
        return False


def __getattr__(name):
    # compile pulls in TVM's compiler and torch, load + run TVM's runtime library only: import
    # them on first use, keep `import mtcompile` light.
    if name == "compile":
        missing = [p for p in _COMPILE_PACKAGES if not _installed(p)]
        if missing:
            raise MTCompileError(
                f"mtcompile.compile needs {', '.join(missing)}, not installed "
                "here: this is a serving install (it loads and runs saved "
                "bundles); pip install 'mtcompile[compile]' to compile"
            )
        from mtcompile.api import compile

        return compile
    if name in ("load", "CompiledBundle"):  # load + run import no frontend, pass or tool
        from mtcompile import compiled

        return getattr(compiled, name)
    if name == "Bundle":
        from mtcompile.runtime.bundle import Bundle

        return Bundle
    raise AttributeError(f"module 'mtcompile' has no attribute {name!r}")


__all__ = [
    "Tenant",
    "compile",
    "load",
    "Bundle",
    "CompiledBundle",
    "MTCompileError",
    "TenantError",
    "UnsupportedOperatorError",
    "InputError",
    "DivisionByZeroError",
    "IndexOutOfRangeError",
    "ArtifactError",
    "SpecError",
    "VerifyError",
    "ServingError",
    "QueueFullError",
    "SchedulerClosedError",
]
