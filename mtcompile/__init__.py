"""mtcompile: compile several deep-learning models into one multi-tenant TVM executable.

    bundle = mtcompile.compile([mtcompile.Tenant("vision", module, example_inputs=(x,)), ...])
    bundle.run("vision", x); bundle.run_all({...}); bundle.save("out/"); mtcompile.load("out/")
"""

__version__ = "0.1.0"

from mtcompile.errors import (  # noqa: E402
    ArtifactError,
    InputError,
    MTCompileError,
    SpecError,
    TenantError,
    UnsupportedOperatorError,
    VerifyError,
)
from mtcompile.tenant import Tenant  # noqa: E402


def __getattr__(name):
    # compile/load pull in TVM and torch: import them on first use, keep `import mtcompile` light.
    if name == "compile":
        from mtcompile.api import compile

        return compile
    if name in ("load", "Bundle"):
        from mtcompile.runtime import bundle as runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'mtcompile' has no attribute {name!r}")


__all__ = ["Tenant", "compile", "load", "Bundle", "MTCompileError", "TenantError",
           "UnsupportedOperatorError", "InputError", "ArtifactError", "SpecError", "VerifyError"]
