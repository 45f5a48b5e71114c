"""Errors raised by mtcompile. Each names what was wrong, where, and what was expected."""

from __future__ import annotations


class MTCompileError(Exception):
    """Base class of every error mtcompile raises on purpose."""


class TenantError(MTCompileError):
    """A tenant is malformed: bad name, missing shapes, duplicate, unreadable model."""


class UnsupportedOperatorError(TenantError):
    """A tenant uses an operator that TVM's importer cannot translate."""

    def __init__(self, tenant: str, ops: list[tuple[str, str]], frontend: str):
        self.tenant, self.ops, self.frontend = tenant, ops, frontend
        lines = [f"  - {op} (from {where})" for op, where in ops]
        super().__init__(
            f"tenant '{tenant}': {len(ops)} operator(s) not supported by TVM's {frontend} "
            "importer:\n" + "\n".join(lines)
        )


class InputError(MTCompileError):
    """Inputs given at run time do not match a tenant's signature."""


class IndexOutOfRangeError(InputError, IndexError):
    """At run time, an index (an input, or computed from inputs) lies outside the table it
    reads: the generated bounds check names the tenant and the inputs."""


class DivisionByZeroError(InputError, ZeroDivisionError):
    """At run time, an integer division or remainder (of inputs, or of values computed from
    them) divides by 0: the generated check names the tenant and the inputs (PyTorch raises
    too; the CPU would stop the process)."""


class ArtifactError(MTCompileError):
    """A saved bundle cannot be loaded: missing, corrupt or mismatched files."""


class SpecError(MTCompileError):
    """A TOML build spec is malformed."""


class VerifyError(MTCompileError):
    """The IR verifier found a broken invariant."""


class LoweringError(MTCompileError):
    """The graph could not be re-emitted as Relax."""


class ServingError(MTCompileError):
    """The scheduler (`mtcompile.serving`) refused or dropped a request."""


class QueueFullError(ServingError):
    """A tenant's queue holds as many requests as the scheduler allows: the request was not
    accepted."""

    def __init__(self, tenant: str, bound: int):
        self.tenant, self.bound = tenant, bound
        super().__init__(
            f"tenant '{tenant}': its queue is full ({bound} requests waiting, "
            f"max_queue={bound}); the request was not accepted: retry later, "
            "send more slowly, or make the Scheduler with a larger max_queue"
        )


class SchedulerClosedError(ServingError):
    """The scheduler is closed: it accepts no request, or (closed without draining) it
    dropped one it had accepted."""
