"""The one table of op facts: per Relax operator its kind (heavy, elementwise, injective,
reduction, opaque), and which dtypes and layouts a library provider takes for a heavy op.

`mtcompile.analysis.schedule.op_kind`, fuse-vertical, fuse-horizontal and
offload-library read their op sets here (TVM's ``TOpPattern``, onnxruntime's kernel
registry). Library call nodes (op ``library_call``, attrs `LibraryCall`: provider, kernel,
variant, bias, epilogue) are typed here; the kernels they name are the rows of
`mtcompile.native.table`, which the C++ registrations are generated from. Imports no TVM.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mtcompile.native import table

# elementwise over one tensor
UNARY = frozenset(
    {
        "relax.nn.relu",
        "relax.nn.gelu",
        "relax.nn.silu",
        "relax.tanh",
        "relax.exp",
        "relax.erf",
        "relax.sigmoid",
        "relax.sqrt",
        "relax.rsqrt",
        "relax.negative",
        "relax.astype",
        "relax.abs",
        "relax.log",
    }
)
# elementwise over several tensors, with numpy broadcasting
BROADCAST = frozenset(
    {
        "relax.add",
        "relax.subtract",
        "relax.multiply",
        "relax.divide",
        "relax.power",
        "relax.maximum",
        "relax.minimum",
        "relax.less",
        "relax.greater",
        "relax.equal",
        "relax.where",
    }
)
ELEMWISE = UNARY | BROADCAST | {"relax.clip"}  # clip: one tensor and two scalar bounds
# each output element reads one input element (shapes, slices, joins, gathers)
INJECTIVE = frozenset(
    {
        "relax.reshape",
        "relax.permute_dims",
        "relax.broadcast_to",
        "relax.expand_dims",
        "relax.squeeze",
        "relax.strided_slice",
        "relax.concat",
        "relax.stack",
        "relax.take",
    }
)
REDUCTION = frozenset(
    {
        "relax.sum",
        "relax.mean",
        "relax.max",
        "relax.min",
        "relax.nn.softmax",
        "relax.nn.layer_norm",
        "relax.nn.batch_norm",
    }
)
# ops TVM computes with an extern kernel (an ``ir_builder`` loop nest, ``op_pattern`` opaque):
# sort and scan (``DispatchSortScan``), sampling (``DispatchSampling``), searchsorted. TVM's
# FuseOps never fuses them with another op, and FuseTIR fails on a primitive function that
# holds one beside another op ("Inconsistent buffers out_buf and lv mapped to the same relax
# var"): each is a kernel of its own that takes no followers.
OPAQUE = frozenset(
    {
        "relax.cumsum",
        "relax.cumprod",
        "relax.sort",
        "relax.argsort",
        "relax.topk",
        "relax.bucketize",
        "relax.multinomial_from_uniform",
    }
)
# heavy ops -> the key of `kernels` (the providers) that chooses who computes them
HEAVY = {"relax.matmul": "matmul", "relax.nn.conv2d": "conv2d"}


# the library providers: who computes a heavy op the offload-library pass turns into a
# library call node (``native``: our C++ kernels, `mtcompile.native`; ``torch``: PyTorch's,
# `mtcompile.runtime.library`). Which kernels each registers is `mtcompile.native.table`.
LIBRARY_PROVIDERS = table.PROVIDERS
LIBRARY_CALL = "library_call"  # the op of every library call node (attrs: `LibraryCall`)


@dataclass(frozen=True)
class LibraryKernel:
    """What the library providers take for one heavy op.

    kernel: the kernel's name in `mtcompile.native.table`; layouts: attrs the op must have
    (attr name -> value); bias_axis: the output axis a per-channel bias runs along;
    bias_weight_rank: the weight rank the bias kernel needs (addmm takes a 2-D weight), None
    for any."""

    kernel: str
    dtypes: tuple[str, ...] = ("float32",)
    layouts: dict[str, str] = field(default_factory=dict)
    bias_axis: int = -1
    bias_weight_rank: int | None = None


LIBRARY = {
    "relax.matmul": LibraryKernel("matmul", bias_axis=-1, bias_weight_rank=2),
    "relax.nn.conv2d": LibraryKernel(
        "conv2d",
        bias_axis=1,
        layouts={"data_layout": "NCHW", "kernel_layout": "OIHW", "out_layout": "NCHW"},
    ),
}
EPILOGUES = tuple(table.EPILOGUES)  # what a native bias kernel may apply (see the table)
EPILOGUE_ACTS = {"relax.nn.relu": "relu", "relax.nn.gelu": "gelu"}  # activation op -> name
# native row kernels (softmax, layer norm over the last axis): op -> the table's kernel; made
# by offload-library next to the native matmul kernels (see passes/offload_library.py)
ROW_KERNELS = {"relax.nn.softmax": "softmax", "relax.nn.layer_norm": "layer_norm"}


@dataclass(frozen=True)
class ConvParams:
    """A library conv call's parameters (`LibraryCall.conv`), in the order its kernel takes them."""

    strides: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right
    dilation: tuple[int, int]
    groups: int

    def flat(self) -> list[int]:
        """stride h/w, padding top/left/bottom/right, dilation h/w, groups."""
        return [*self.strides, *self.padding, *self.dilation, self.groups]

    def __str__(self) -> str:
        return (
            f"strides={list(self.strides)}, padding={list(self.padding)}, "
            f"dilation={list(self.dilation)}, groups={self.groups}"
        )


@dataclass(frozen=True)
class LibraryCall:
    """A library call node's attrs: which kernel runs it, decided once by offload-library.

    provider: ``native`` or ``torch``; kernel, variant: a row of `mtcompile.native.table`
    (``matmul``, ``packed``: its weight argument packed at build time); bias: a 1-D bias
    argument follows the inputs; epilogue: what the kernel applies to its result (``relu``,
    ``add_relu``...: a residual argument follows the bias); conv: a conv's parameters (the
    kernel's last argument before out). Lowering and the pictures read these; the kernel's
    symbol comes from the table (`form`)."""

    provider: str
    kernel: str
    variant: str = ""
    bias: bool = False
    epilogue: str = ""
    conv: ConvParams | None = None

    def __post_init__(self) -> None:
        self.form  # noqa: B018  (a form the table lists, else ValueError)

    @property
    def form(self) -> table.Form:
        """The table's form of this call (its symbol, arguments)."""
        return table.find(self.provider, self.kernel, self.variant, self.bias, self.epilogue)

    @property
    def symbol(self) -> str:
        """The global function lowering calls."""
        return self.form.symbol

    @property
    def computes(self) -> str:
        """The Relax op the call computes."""
        return self.form.kernel.computes

    @property
    def label(self) -> str:
        """A short name for pictures: ``native matmul[packed] +bias +add_relu``."""
        return (
            f"{self.provider} {self.kernel}{f'[{self.variant}]' if self.variant else ''}"
            f"{' +bias' if self.bias else ''}{f' +{self.epilogue}' if self.epilogue else ''}"
        )

    def replace(self, **changes) -> LibraryCall:
        """The same call with some attributes changed."""
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        parts = [f"kernel={self.kernel}", f"provider={self.provider}"]
        parts += [f"variant={self.variant}"] if self.variant else []
        parts += ["bias=true"] if self.bias else []
        parts += [f"epilogue={self.epilogue}"] if self.epilogue else []
        return ", ".join(parts + ([str(self.conv)] if self.conv is not None else []))


def is_library_call(op: str) -> bool:
    """Whether `op` is a library call node's op."""
    return op == LIBRARY_CALL


def computes(node) -> str:
    """The Relax op a node computes: its own, or the one its library call computes."""
    return node.attrs.computes if node.op == LIBRARY_CALL else node.op


def library_call(node) -> LibraryCall | None:
    """A library call node's `LibraryCall` (None for any other node)."""
    return node.attrs if node.op == LIBRARY_CALL else None
