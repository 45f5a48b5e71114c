"""A tenant: a name, a model, and the shapes and dtypes of its inputs."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mtcompile.abi import MANIFEST_FN, RUN_ALL, RUN_SOME, subset_function
from mtcompile.errors import TenantError

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
# Entry names of the executable that a tenant entry must not clash with.
RESERVED_NAMES = frozenset({RUN_ALL, RUN_SOME, MANIFEST_FN, "main"})
# Names lowering generates: run_all's helpers (``run_all__arena``, the stream functions
# ``run_all__s{i}``, its fused kernels ``run_all_<group>``), the subsets' functions
# (``run_some__a__b``) and anything ``mtcompile_``.
RESERVED_PATTERN = re.compile(rf"{RUN_ALL}_.*|{RUN_SOME}_.*|mtcompile_.*")


@dataclass(frozen=True)
class Tenant:
    """One model to compile into a bundle.

    model: a ``torch.nn.Module`` (needs ``example_inputs``), a ``torch.fx.GraphModule``
    (needs ``example_inputs`` or ``input_shapes``), a ``torch.export.ExportedProgram``,
    an ``onnx.ModelProto`` or a path to an ``.onnx`` file (shapes from the file unless
    ``input_shapes`` is given).

    input_shapes: ``{input_name: (shape, dtype)}`` in the model's input order.
    example_inputs: a tuple of tensors/arrays; also used as the inputs of ``verify``.
    shared_inputs: ``{input_name: shared_name}``: inputs of different tenants declared
    with the same shared name are one tensor (e.g. the same camera frame); ``run_all``
    then reads it once and the ``dedup`` pass can share the work done on it.

    Dynamic sizes (one bundle serves any size within bounds): dynamic_shapes, for a
    ``torch.nn.Module``, is exactly ``torch.export``'s argument (``{"x": {0:
    Dim("batch", min=1, max=16)}}``); dim_bounds: ``{dim name: (lo, hi)}`` for the
    dimensions an ONNX file names (``dim_param``) or an ``input_shapes`` entry names by
    a string (fx and ONNX tenants).
    """

    name: str
    model: Any
    example_inputs: tuple | None = None
    input_shapes: dict[str, tuple[tuple[int, ...], str]] | None = None
    shared_inputs: dict[str, str] = field(default_factory=dict)
    dynamic_shapes: Any = None
    dim_bounds: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self):
        # fullmatch, not match: "$" would also accept a trailing newline.
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise TenantError(
                f"tenant name {self.name!r} is not valid: expected a letter followed by "
                "letters, digits or '_' (it becomes a function name in the executable)"
            )
        if self.name in RESERVED_NAMES:
            raise TenantError(f"tenant name {self.name!r} is reserved; choose another name")
        if RESERVED_PATTERN.fullmatch(self.name):
            raise TenantError(
                f"tenant name {self.name!r} is reserved: names matching "
                f"'{RESERVED_PATTERN.pattern}' are generated symbols of the "
                "executable; choose another name"
            )
        for local, shared in self.shared_inputs.items():
            if not isinstance(shared, str) or not _NAME.fullmatch(shared):
                raise TenantError(
                    f"tenant {self.name!r}: shared input name {shared!r} for "
                    f"{local!r} is not valid (a letter, then letters, digits, '_')"
                )
        for dim, b in self.dim_bounds.items():
            if not isinstance(dim, str) or not _NAME.fullmatch(dim):
                raise TenantError(
                    f"tenant {self.name!r}: dim_bounds names {dim!r}, which is "
                    "not a valid dimension name (a letter, then letters, "
                    "digits, '_')"
                )
            if (
                not isinstance(b, tuple | list)
                or len(b) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in b)
                or not 1 <= b[0] <= b[1]
            ):
                raise TenantError(
                    f"tenant {self.name!r}: dim_bounds[{dim!r}] = {b!r}; "
                    "expected (lo, hi) integers with 1 <= lo <= hi"
                )
        if self.example_inputs is not None and not isinstance(self.example_inputs, tuple):
            object.__setattr__(self, "example_inputs", tuple(self.example_inputs))


def check_subsets(
    subsets: Iterable[Iterable[str]] | None, order: Sequence[str]
) -> dict[str, tuple[str, ...]]:
    """The subset functions to build: name -> tenants in bundle order (`order`). A subset
    names known tenants, at least two and not all of them (one is its entry, all run_all)."""
    out: dict[str, tuple[str, ...]] = {}
    for subset in subsets or ():
        names = [subset] if isinstance(subset, str) else list(subset)
        unknown = sorted(set(names) - set(order))
        if unknown or len(set(names)) != len(names):
            raise TenantError(
                f"subset {names}: unknown or repeated tenant(s) "
                f"{unknown or names}; the tenants are {list(order)}"
            )
        if not 2 <= len(names) < len(order):
            raise TenantError(
                f"subset {names}: a subset names at least two tenants and not "
                "all of them (one tenant is its entry, all of them run_all)"
            )
        present = tuple(t for t in order if t in names)
        name = subset_function(present)
        if name in out and out[name] != present:
            raise TenantError(
                f"subsets {list(out[name])} and {list(present)} would both be "
                f"the function {name!r}: rename a tenant"
            )
        out[name] = present
    return out
