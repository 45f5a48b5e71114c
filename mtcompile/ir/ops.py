"""The one table of op facts: per Relax operator its kind (heavy, elementwise, injective,
view, reduction, opaque), and which dtypes and layouts a library provider takes for a heavy op.

The kernel model (`mtcompile.analysis.schedule`), fuse-vertical, fuse-horizontal and
offload-library read their op sets here (TVM's ``TOpPattern``, onnxruntime's kernel
registry). Library call nodes (op ``mtcompile.native.*`` or ``mtcompile.torch.*``) are
named here too, so that passes, lowering and the runtime's kernels agree on them.
Imports no TVM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# elementwise over one tensor
UNARY = frozenset({
    "relax.nn.relu", "relax.nn.gelu", "relax.nn.silu", "relax.tanh", "relax.exp", "relax.erf",
    "relax.sigmoid", "relax.sqrt", "relax.rsqrt", "relax.negative", "relax.astype",
    "relax.abs", "relax.log"})
# elementwise over several tensors, with numpy broadcasting
BROADCAST = frozenset({
    "relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.power",
    "relax.maximum", "relax.minimum", "relax.less", "relax.greater", "relax.equal",
    "relax.where"})
ELEMWISE = UNARY | BROADCAST | {"relax.clip"}  # clip: one tensor and two scalar bounds
# each output element reads one input element (shapes, slices, joins, gathers)
INJECTIVE = frozenset({
    "relax.reshape", "relax.permute_dims", "relax.broadcast_to", "relax.expand_dims",
    "relax.squeeze", "relax.strided_slice", "relax.concat", "relax.stack", "relax.take"})
REDUCTION = frozenset({
    "relax.sum", "relax.mean", "relax.max", "relax.min", "relax.nn.softmax",
    "relax.nn.layer_norm", "relax.nn.batch_norm"})
# ops TVM computes with an extern kernel (an ``ir_builder`` loop nest, ``op_pattern`` opaque):
# sort and scan (``DispatchSortScan``), sampling (``DispatchSampling``), searchsorted. TVM's
# FuseOps never fuses them with another op, and FuseTIR fails on a primitive function that
# holds one beside another op ("Inconsistent buffers out_buf and lv mapped to the same relax
# var"): each is a kernel of its own that takes no followers.
OPAQUE = frozenset({
    "relax.cumsum", "relax.cumprod", "relax.sort", "relax.argsort", "relax.topk",
    "relax.bucketize", "relax.multinomial_from_uniform"})
# ops that only reinterpret the shape of a row-major tensor: TVM turns a kernel made of
# them alone into a view of its input (``RewriteDataflowReshape``). Inference dropout is an
# identity copy, which TVM also makes a view (seen on SqueezeNet).
VIEW = frozenset({
    "relax.reshape", "relax.expand_dims", "relax.squeeze", "relax.flatten",
    "relax.nn.dropout"})
# ops that are views when their result has their input's shape (an identity copy, which
# TVM also makes a view: ONNX Sum imports as broadcast_to + stack + sum)
VIEW_IF_SAME_SHAPE = frozenset({"relax.broadcast_to"})
# heavy ops -> the key of `kernels` (the providers) that chooses who computes them
HEAVY = {"relax.matmul": "matmul", "relax.nn.conv2d": "conv2d"}


# the library providers: who computes a heavy op the offload-library pass turns into a
# library call node (``native``: our C++ kernels, `mtcompile.native`; ``torch``: PyTorch's,
# `mtcompile.runtime.library`). Each registers its kernels as ``mtcompile.<provider>.<name>``.
LIBRARY_PROVIDERS = ("native", "torch")


@dataclass(frozen=True)
class LibraryKernel:
    """What the library providers take for one heavy op, and its kernels' names.

    name: the kernel's name (``matmul``; the bias kernel adds ``_bias``); layouts: attrs the
    op must have (attr name -> value); bias_axis: the output axis a per-channel bias runs
    along; bias_weight_rank: the weight rank the bias kernel needs (addmm takes a 2-D
    weight), None for any."""

    name: str
    dtypes: tuple[str, ...] = ("float32",)
    layouts: dict[str, str] = field(default_factory=dict)
    bias_axis: int = -1
    bias_weight_rank: int | None = None

    def call(self, provider: str, bias: bool = False, epilogue: str = "") -> str:
        """The name of `provider`'s kernel (with a bias argument when `bias`; applying
        `epilogue`, one of `EPILOGUES`, to its result: native bias kernels only)."""
        if provider not in LIBRARY_PROVIDERS:
            raise ValueError(f"{provider!r} is no library provider; expected one of "
                             f"{list(LIBRARY_PROVIDERS)}")
        if epilogue and (epilogue not in EPILOGUES or provider != "native" or not bias):
            raise ValueError(f"no {provider} kernel {self.name} with epilogue {epilogue!r} "
                             f"(bias={bias}); native bias kernels take {list(EPILOGUES)}")
        return (f"mtcompile.{provider}.{self.name}{'_bias' if bias else ''}"
                f"{'_' + epilogue if epilogue else ''}")


LIBRARY = {
    "relax.matmul": LibraryKernel("matmul", bias_axis=-1, bias_weight_rank=2),
    "relax.nn.conv2d": LibraryKernel(
        "conv2d", bias_axis=1,
        layouts={"data_layout": "NCHW", "kernel_layout": "OIHW", "out_layout": "NCHW"}),
}
# what a native bias kernel may apply to its result before storing it: an activation, a
# residual of the output's shape added (its argument follows the bias), or both (added first)
EPILOGUES = ("relu", "gelu", "add", "add_relu")
EPILOGUE_ACTS = {"relax.nn.relu": "relu", "relax.nn.gelu": "gelu"}  # activation op -> name
# library call node op -> the heavy op it computes, -> its provider, -> its epilogue
LIBRARY_CALLS = {k.call(p, b): op for op, k in LIBRARY.items()
                 for p in LIBRARY_PROVIDERS for b in (False, True)}
EPILOGUE_CALLS = {k.call("native", True, e): e for k in LIBRARY.values() for e in EPILOGUES}
LIBRARY_CALLS.update({name: LIBRARY_CALLS[name.rsplit("_bias", 1)[0] + "_bias"]
                      for name in EPILOGUE_CALLS})
# native row kernels (softmax, layer norm over the last axis) -> the op each computes; made by
# offload-library next to the native matmul kernels (see passes/offload_library.py)
ROW_CALLS = {"mtcompile.native.softmax": "relax.nn.softmax",
             "mtcompile.native.layer_norm": "relax.nn.layer_norm"}
LIBRARY_CALLS.update(ROW_CALLS)
CALL_PROVIDER = {name: name.split(".")[1] for name in LIBRARY_CALLS}
BIAS_CALLS = frozenset(name for name in LIBRARY_CALLS if "_bias" in name)


@dataclass(frozen=True)
class ConvParams:
    """The attrs of a library conv node, in the order its kernel takes them."""

    strides: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right
    dilation: tuple[int, int]
    groups: int

    def flat(self) -> list[int]:
        """stride h/w, padding top/left/bottom/right, dilation h/w, groups."""
        return [*self.strides, *self.padding, *self.dilation, self.groups]

    def __str__(self) -> str:
        return (f"strides={list(self.strides)}, padding={list(self.padding)}, "
                f"dilation={list(self.dilation)}, groups={self.groups}")


def is_library_call(op: str) -> bool:
    """Whether `op` is a library call node's op."""
    return op in LIBRARY_CALLS
