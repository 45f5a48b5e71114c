"""The one table of library kernels: what each computes, its arguments, its forms (bias,
epilogues, variant), and who provides it. Library call nodes (`mtcompile.ir.ops.LibraryCall`),
lowering, the ``torch`` provider's registrations and the native C++ registrations
(``kernels_table.h``, generated from this table at build time by `header`) all read it.

Adding a native kernel is one `Kernel` row here plus one source file defining its entry,
``void <entry>(const mtc::Call&)`` (see ``src/call.h``). Symbols are built from the rows
(`symbol`) and looked up (`SYMBOLS`), never parsed. Imports nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

PROVIDERS = ("native", "torch")  # who registers library kernels (mtcompile.<provider>.<name>)
# what a bias form may apply to its result before storing it: an activation, a residual of
# the output's shape added (its argument follows the bias), or both (added first);
# epilogue -> (takes a residual, activation)
EPILOGUES = {
    "relu": (False, "relu"),
    "gelu": (False, "gelu"),
    "add": (True, ""),
    "add_relu": (True, "relu"),
}
_ACTS = {"": "kActNone", "relu": "kActRelu", "gelu": "kActGelu"}  # C++ names (epilogue.h)
ATTENTION = "mtcompile.attention"  # what the attention kernel computes: a chain, not one op


@dataclass(frozen=True)
class Kernel:
    """One library kernel.

    name: the kernel (``matmul``); variant: a variant of it (``packed``: the weight packed at
    build time; ``bf16``: packed as bfloat16, the sums in float32; ``winograd``: a 3x3 conv's weight transformed at build time; ``patch``: a
    patch embedding's weight packed as a dense layer's; ``patch_bf16``: that as bfloat16); base: the symbols' stem (``dense_packed``); computes: the Relax op it
    computes (`ATTENTION`: a chain of them); inputs: its tensor arguments before a bias; entry: the C++ function that runs
    it; bias: whether it has a form with a 1-D per-channel bias after the inputs (``plain``:
    and one without); epilogues: what its bias form may apply (`EPILOGUES`, native only);
    params: whether a conv's 9 parameters follow (stride h/w, padding t/l/b/r, dilation h/w,
    groups); providers: who provides it."""

    name: str
    computes: str
    inputs: tuple[str, ...]
    entry: str
    base: str = ""
    variant: str = ""
    bias: bool = False
    plain: bool = True
    epilogues: tuple[str, ...] = ()
    params: bool = False
    providers: tuple[str, ...] = ("native",)

    @property
    def stem(self) -> str:
        """The stem of the kernel's symbols."""
        return self.base or self.name


KERNELS = (
    Kernel(
        "matmul",
        "relax.matmul",
        ("a", "b"),
        "matmul_run",
        bias=True,
        epilogues=tuple(EPILOGUES),
        providers=PROVIDERS,
    ),
    Kernel(
        "matmul",
        "relax.matmul",
        ("a", "packed weight"),
        "dense_packed_run",
        base="dense_packed",
        variant="packed",
        bias=True,
        epilogues=tuple(EPILOGUES),
    ),
    Kernel(
        "matmul",
        "relax.matmul",
        ("a", "bf16 weight"),
        "dense_bf16_run",
        base="dense_bf16",
        variant="bf16",
        bias=True,
        epilogues=tuple(EPILOGUES),
    ),
    Kernel(
        "conv2d",
        "relax.nn.conv2d",
        ("x", "weight"),
        "conv2d_run",
        bias=True,
        epilogues=tuple(EPILOGUES),
        params=True,
        providers=PROVIDERS,
    ),
    Kernel(
        "conv2d",
        "relax.nn.conv2d",
        ("x", "winograd weight"),
        "conv2d_winograd_run",
        base="conv2d_winograd",
        variant="winograd",
        bias=True,
        epilogues=tuple(EPILOGUES),
        params=True,
    ),
    Kernel(
        "conv2d",
        "relax.nn.conv2d",
        ("x", "bf16 Winograd weight"),
        "conv2d_winograd_bf16_run",
        base="conv2d_winograd_bf16",
        variant="winograd_bf16",
        bias=True,
        epilogues=tuple(EPILOGUES),
        params=True,
    ),
    Kernel(
        "conv2d",
        "relax.nn.conv2d",
        ("x", "packed weight"),
        "conv2d_patch_run",
        base="conv2d_patch",
        variant="patch",
        bias=True,
        epilogues=tuple(EPILOGUES),
        params=True,
    ),
    Kernel(
        "conv2d",
        "relax.nn.conv2d",
        ("x", "bf16 packed weight"),
        "conv2d_patch_bf16_run",
        base="conv2d_patch_bf16",
        variant="patch_bf16",
        bias=True,
        epilogues=tuple(EPILOGUES),
        params=True,
    ),
    Kernel("softmax", "relax.nn.softmax", ("x",), "softmax_run"),
    Kernel(
        "layer_norm", "relax.nn.layer_norm", ("x", "gamma", "beta", "epsilon"), "layer_norm_run"
    ),
    # softmax(scale * q @ kt) @ v per head: the chain fuse-attention matches (no Relax op)
    Kernel("attention", ATTENTION, ("q", "kt", "v", "scale"), "attention_run"),
)
KERNEL = {(k.name, k.variant): k for k in KERNELS}  # (name, variant) -> row


@dataclass(frozen=True)
class Form:
    """One registered function: a kernel of a provider, with or without a bias, with an
    epilogue or none."""

    kernel: Kernel
    provider: str
    bias: bool = False
    epilogue: str = ""

    @property
    def symbol(self) -> str:
        """The global function's name (``mtcompile.native.dense_packed_bias_add_relu``)."""
        return (
            f"mtcompile.{self.provider}.{self.kernel.stem}{'_bias' if self.bias else ''}"
            f"{'_' + self.epilogue if self.epilogue else ''}"
        )

    @property
    def residual(self) -> bool:
        """Whether a residual argument follows the bias."""
        return EPILOGUES[self.epilogue][0] if self.epilogue else False

    @property
    def act(self) -> str:
        """The activation of the epilogue (``""``: none)."""
        return EPILOGUES[self.epilogue][1] if self.epilogue else ""


def forms(kernel: Kernel) -> list[Form]:
    """Every registered form of `kernel`, per provider."""
    out = []
    for p in kernel.providers:
        if kernel.plain:
            out.append(Form(kernel, p))
        if kernel.bias:
            out.append(Form(kernel, p, True))
            out += [Form(kernel, p, True, e) for e in kernel.epilogues if p == "native"]
    return out


FORMS = tuple(f for k in KERNELS for f in forms(k))
SYMBOLS = {f.symbol: f for f in FORMS}  # symbol -> form (a lookup, not a parse)


def find(
    provider: str, name: str, variant: str = "", bias: bool = False, epilogue: str = ""
) -> Form:
    """The form of kernel `name` (`variant`) `provider` registers; ValueError if none."""
    k = KERNEL.get((name, variant))
    f = Form(k, provider, bias, epilogue) if k is not None else None
    if f is None or f not in FORMS:
        raise ValueError(
            f"no {provider} library kernel {name!r}{f' ({variant})' if variant else ''} with "
            f"bias={bias}, epilogue={epilogue!r}; the table has "
            f"{sorted(SYMBOLS)}"
        )
    return f


def header() -> str:
    """``kernels_table.h``: the native entries' declarations and one registration row per
    native form (`mtc::KernelRow`, ``src/call.h``)."""
    native = [f for f in FORMS if f.provider == "native"]
    entries = dict.fromkeys(f.kernel.entry for f in native)
    rows = [
        f'    {{"{f.symbol}", &{f.kernel.entry}, {len(f.kernel.inputs)}, '
        f"{str(f.bias).lower()}, {str(f.residual).lower()}, "
        f"{str(f.kernel.params).lower()}, {_ACTS[f.act]}}},"
        for f in native
    ]
    return "\n".join(
        [
            "// Generated from mtcompile/native/table.py at build time: do not edit.",
            "#pragma once",
            '#include "call.h"',
            "namespace mtc {",
            *(f"void {e}(const Call& c);" for e in entries),
            "inline const KernelRow kKernelRows[] = {",
            *rows,
            "};",
            "}  // namespace mtc",
            "",
        ]
    )
