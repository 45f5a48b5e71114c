"""Tenant models -> per-tenant Relax modules, through TVM's own importers.

PyTorch modules go through ``torch.export``, fx GraphModules through ``from_fx``, ONNX
through ``from_onnx``. We write few op mappings (`converters` for ATen ops TVM lacks,
`onnx_converters` for ONNX ops TVM converts into TE computations); we check a model against
the importer's operator table first so that an unsupported operator is reported with the
tenant, the operator and where it came from.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtcompile.errors import TenantError, UnsupportedOperatorError
from mtcompile.frontend.lift import var_bounds
from mtcompile.runtime.inputs import to_array
from mtcompile.tenant import Tenant


@dataclass(frozen=True)
class ImportedTenant:
    """A tenant imported into Relax: the module, its input names and where it came from."""

    name: str
    mod: Any  # tvm.IRModule with a "main" function
    input_names: list[str]
    kind: str  # "torch.export" | "torch.fx" | "onnx"
    source_hash: str


@contextmanager
def _quiet_torch():
    """Hide torch's FutureWarnings about its own pytree internals (nothing a user can act on)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\..*")
        yield


@contextmanager
def eval_mode(module):
    """Run `module` in eval mode, then give every submodule back its own training flag
    (``train(was_training)`` would also flip submodules the caller froze, e.g. BatchNorm)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def _torch():
    import torch

    return torch


def to_numpy(x) -> np.ndarray:
    """A numpy array from a numpy array, torch tensor or array-like (bfloat16: ml_dtypes')."""
    if isinstance(x, _torch().Tensor):
        return to_array(x)
    return np.asarray(x)


def to_torch(x):
    """A torch tensor from a torch tensor or array-like (an ml_dtypes bfloat16 array too)."""
    torch = _torch()
    if isinstance(x, torch.Tensor):
        return x
    # np.asarray(order="C") keeps a 0-d input 0-d (np.ascontiguousarray makes it 1-d).
    a = np.asarray(x, order="C")
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _hash_torch(code: str, tensors) -> str:
    torch = _torch()
    h = hashlib.sha256(code.encode())
    for name, t in tensors:
        h.update(name.encode())
        t = t.detach().cpu().contiguous()
        try:
            h.update(t.numpy().tobytes())
        except TypeError:  # a dtype numpy lacks (bfloat16, float8): its raw bytes and name
            h.update(str(t.dtype).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _where(node) -> str:
    """Source line of an fx node, from its stack trace, else its name."""
    trace = (node.meta or {}).get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File")]
    return lines[-1] if lines else f"fx node {node.name}"


def _no_data(x) -> str | None:
    """Why torch tensor `x` cannot be compiled or hashed (a meta or sparse tensor), or None."""
    torch = _torch()
    if not isinstance(x, torch.Tensor):
        return None
    if x.is_meta:
        return "a meta tensor (shapes only, no data)"
    if x.layout != torch.strided:
        return f"a sparse tensor (layout {x.layout}); make it dense with .to_dense()"
    return None


def check_tensors(t: Tenant) -> None:
    """Refuse meta and sparse tensors among a tenant's example inputs and weights, naming
    the tensor (they have no dense data: export, hashing and verify cannot use them)."""
    torch = _torch()
    named = [(f"example input {i}", x) for i, x in enumerate(t.example_inputs or ())]
    model = t.model
    if isinstance(model, torch.export.ExportedProgram):
        named += [
            (f"weight {k!r}", v) for k, v in (*model.state_dict.items(), *model.constants.items())
        ]
    elif isinstance(model, torch.nn.Module):
        named += [
            (f"weight {k!r}", v) for k, v in (*model.named_parameters(), *model.named_buffers())
        ]
        named += [
            (f"constant {k!r}", v) for k, v in vars(model).items() if isinstance(v, torch.Tensor)
        ]
    for what, x in named:
        why = _no_data(x)
        if why is not None:
            hint = (
                " load real weights (e.g. load_state_dict(..., assign=True)) before compiling"
                if x.is_meta and what.startswith("weight")
                else ""
            )
            raise TenantError(f"tenant '{t.name}': {what} is {why}{';' if hint else ''}{hint}")


def _distinct(args: tuple) -> tuple:
    """`args` with a copy of every tensor whose memory an earlier one already holds:
    torch.export makes one graph input of a tensor passed twice, so ``f`` traced on
    ``(x, x)`` would compute ``f(a, a)`` when called with ``(a, b)``."""
    seen: set[int] = set()
    out = []
    for a in args:
        key = a.untyped_storage().data_ptr() if a.layout == _torch().strided else id(a)
        if key in seen and a.numel():
            a = a.clone()
        seen.add(key)
        out.append(a)
    return tuple(out)


@dataclass(frozen=True)
class DynamicAxis:
    """An axis of a (positional) example input that ``dynamic_shapes`` makes dynamic."""

    index: int  # position among the example inputs
    input: str  # the forward parameter's name
    axis: int  # in [0, ndim)
    dim: Any  # its torch.export.Dim (a derived Dim, ``2 * batch``, has ``root`` and ``fn``)

    @property
    def root(self):
        """The Dim the size derives from (the Dim itself unless derived)."""
        return getattr(self.dim, "root", self.dim)


def dynamic_axes(model, args: tuple, spec) -> list[DynamicAxis]:
    """The dynamic axes `spec` (torch.export's ``dynamic_shapes``: a dict by forward
    parameter name or a sequence by position, each ``{axis: Dim}`` or a sequence of Dims
    and Nones) gives the example inputs `args` of `model`. Dim hints (``Dim.AUTO``...)
    and entries that name no input are left to torch.export."""
    from torch.export import Dim

    if spec is None:
        return []
    try:
        params = [
            p.name
            for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    names = [params[i] if i < len(params) else f"#{i}" for i in range(len(args))]
    if isinstance(spec, dict):
        per_input = [spec.get(n) for n in names]
    elif isinstance(spec, list | tuple):
        per_input = list(spec)[: len(args)]
    else:
        return []
    out = []
    for i, axes in enumerate(per_input):
        ndim = getattr(args[i], "ndim", 0)
        items = (
            axes.items()
            if isinstance(axes, dict)
            else enumerate(axes)
            if isinstance(axes, list | tuple)
            else ()
        )
        for axis, d in items:
            if (
                isinstance(d, Dim)
                and isinstance(axis, int)
                and not isinstance(axis, bool)
                and -ndim <= axis < ndim
            ):
                out.append(DynamicAxis(i, names[i], axis % ndim, d))
    return out


def widened_sizes(args: tuple, dims: list[DynamicAxis]) -> dict[tuple[int, int], int]:
    """``{(input index, axis): size}``: where to widen the example inputs so that
    torch.export keeps their dynamic dims dynamic (it fixes a dim whose example has size
    1, its 0/1 specialization). A Dim whose examples all have size 1 is traced at
    ``max(2, Dim.min)`` when that is within its max; a Dim derived from it (``2 * batch``)
    at its value there, where its example has the value at 1."""
    out: dict[tuple[int, int], int] = {}
    by_root: dict[str, list[DynamicAxis]] = {}
    for a in dims:
        by_root.setdefault(a.root.__name__, []).append(a)
    for axes in by_root.values():
        plain = [a for a in axes if a.dim is a.root]
        if not plain or any(args[a.index].shape[a.axis] != 1 for a in plain):
            continue
        root = plain[0].root
        size = max(2, int(root.min or 0))
        if not size <= root.max:
            continue
        for a in axes:
            have = int(args[a.index].shape[a.axis])
            want = size if a.dim is a.root else int(a.dim.fn(size))
            if a.dim is not a.root and (have != int(a.dim.fn(1)) or have <= 0 or want % have):
                continue
            out[(a.index, a.axis)] = want
    return out


def widen_examples(args: tuple, sizes: dict[tuple[int, int], int]) -> tuple:
    """`args` with the inputs `sizes` (`widened_sizes`) names repeated along those axes to
    those sizes (new tensors: the caller's stay as they are)."""
    out = list(args)
    for (i, axis), size in sizes.items():
        reps = [1] * out[i].ndim
        reps[axis] = size // out[i].shape[axis]
        out[i] = out[i].repeat(*reps)
    return tuple(out)


def _small_example_hint(name: str, axes: list[DynamicAxis]) -> str:
    """The hint for a Dim that torch.export fixed because its example had size 0 or 1."""
    root = axes[0].root
    lo = max(2, int(root.min or 0))
    sizes = " and ".join(
        f"size in [{lo}, {root.max}] along input {a.input!r} axis {a.axis}"
        if a.dim is a.root
        else f"size {a.dim.__name__} (e.g. {int(a.dim.fn(lo))}) "
        f"along input {a.input!r} axis {a.axis}"
        for a in axes
    )
    return (
        f"Dim {name!r}: torch.export fixes a dynamic dim whose example has "
        f"size 0 or 1: give example inputs with {root.__name__} in "
        f"[{lo}, {root.max}]: {sizes}"
    )


def _reasons_hint(name: str, where: str, text: str) -> str:
    """The hint for a violated Dim: torch.export's reasons for it and its suggested fixes."""
    reasons = list(
        dict.fromkeys(
            ln.strip()[2:] for ln in text.splitlines() if ln.strip()[:2] == "- " and name in ln
        )
    )[:2]
    fixes = (
        [
            ln.strip()
            for ln in text.split("Suggested fixes:", 1)[-1].splitlines()
            if ln.strip().startswith(f"{name} =")
        ]
        if "Suggested fixes:" in text
        else []
    )
    return (
        f"Dim {name!r} ({where}): "
        + "; ".join(reasons or ["see torch.export's message"])
        + (f"; torch.export suggests {'; '.join(fixes)}" if fixes else "")
    )


def _dim_hint(name: str, dims: list[DynamicAxis], text: str) -> str:
    """What to give instead for the Dim `name` whose constraints torch.export's `text`
    says were violated."""
    axes = [a for a in dims if name in (a.dim.__name__, a.root.__name__)]
    where = " and ".join(f"input {a.input!r} axis {a.axis}" for a in axes) or "its inputs"
    const = re.search(
        rf"You marked {re.escape(name)} as dynamic but your code "
        r"specialized it to be a constant \((\d+)\)",
        text,
    )
    value = int(const.group(1)) if const else None
    if (
        const
        and axes
        and value
        in ({0, 1} if axes[0].dim is axes[0].root else {int(axes[0].dim.fn(v)) for v in (0, 1)})
    ):
        return _small_example_hint(name, axes)
    if const:
        return (
            f"Dim {name!r}: the model's code fixes {where} to {value}, "
            f"so it cannot vary: drop it from dynamic_shapes (a fixed size "
            f"{value}) or change the code that fixes it"
        )
    return _reasons_hint(name, where, text)


def _widened_hint(dims: list[DynamicAxis], widened: dict[tuple[int, int], int]) -> str:
    """The note that the model was traced at example inputs widened along `widened`."""
    names = {(a.index, a.axis): a.input for a in dims}
    return (
        "traced at a copy of the example inputs widened to "
        + ", ".join(f"size {n} along input {names[k]!r} axis {k[1]}" for k, n in widened.items())
        + " (torch.export fixes a dynamic dim whose example has size 1)"
    )


def _export_error(
    t: Tenant, e: Exception, dims: list[DynamicAxis], widened: dict[tuple[int, int], int]
) -> TenantError:
    """A `TenantError` for torch.export's failure `e`; for violated dynamic-shape
    constraints it says, per Dim, what to give instead."""
    text = str(e)
    first = text.splitlines()[0] if text else ""
    violated = re.match(r"Constraints violated \(([^)]*)\)!", first)
    if violated:  # its "run with TORCH_LOGS" advice: the hints below say more
        first = violated.group(0)
    msg = f"tenant '{t.name}': torch.export failed: {type(e).__name__}: {first}"
    names = [n.strip() for n in violated.group(1).split(",")] if violated else []
    hints = [_dim_hint(name, dims, text) for name in names]
    if widened:
        hints.append(_widened_hint(dims, widened))
    return TenantError(msg + ("; " + "; ".join(hints) if hints else ""))


def import_tenant(t: Tenant) -> ImportedTenant:
    """Import one tenant into Relax, or raise an error naming the tenant and the problem."""
    torch = _torch()
    check_tensors(t)
    model = t.model
    if isinstance(model, torch.fx.GraphModule):
        return _import_fx(t)
    if isinstance(model, torch.export.ExportedProgram):
        return _import_exported(t, model)
    if isinstance(model, torch.nn.Module):
        if t.example_inputs is None:
            raise TenantError(
                f"tenant '{t.name}': a torch.nn.Module needs example_inputs "
                "(a tuple of tensors) to be traced with torch.export"
            )
        dims, sizes = [], {}
        try:  # mtcompile compiles inference; the caller's modes come back afterwards
            args = _distinct(tuple(to_torch(x) for x in t.example_inputs))
            # torch.export fixes a dynamic dim whose example has size 1: trace on a copy
            # widened to size >= 2 along its dynamic dims (the user's tensors stay as given)
            dims = dynamic_axes(model, args, t.dynamic_shapes)
            sizes = widened_sizes(args, dims)
            args = widen_examples(args, sizes)
            with _quiet_torch(), eval_mode(model):
                ep = torch.export.export(model, args, dynamic_shapes=t.dynamic_shapes)
        except Exception as e:
            raise _export_error(t, e, dims, sizes) from e
        return _import_exported(t, ep)
    if t.dynamic_shapes is not None:
        raise TenantError(
            f"tenant '{t.name}': dynamic_shapes applies to a torch.nn.Module "
            "(torch.export's argument); an ONNX or fx tenant names its dims in "
            "its shapes and gives dim_bounds"
        )
    try:
        import onnx
    except ImportError:  # pragma: no cover - onnx is a dependency
        onnx = None
    if isinstance(model, str | os.PathLike) or (onnx and isinstance(model, onnx.ModelProto)):
        return _import_onnx(t)
    raise TenantError(
        f"tenant '{t.name}': model of type {type(model).__name__} is not "
        "supported; expected torch.nn.Module, torch.fx.GraphModule, "
        "torch.export.ExportedProgram, onnx.ModelProto or a path to an .onnx file"
    )


def _import_exported(t: Tenant, ep) -> ImportedTenant:
    from tvm.relax.frontend.torch import from_exported_program
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    from mtcompile.frontend.converters import CONVERTERS

    source_code = str(ep.graph_module.code)
    ep = _decomposed(t, ep)
    _warn_dropped_asserts(t, ep)
    known = ExportedProgramImporter().convert_map
    missing = [
        (n.target.__name__, _where(n))
        for n in ep.graph.nodes
        if n.op == "call_function"
        and n.target.__name__ not in known
        and n.target.__name__ not in CONVERTERS
    ]
    if missing:
        raise UnsupportedOperatorError(t.name, _unique(missing), "torch.export")
    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    try:
        with _quiet_torch():
            mod = from_exported_program(
                ep,
                keep_params_as_input=False,
                custom_convert_map={**_low_precision_map(known), **CONVERTERS},
                run_ep_decomposition=False,
            )
    except Exception as e:
        raise TenantError(
            f"tenant '{t.name}': TVM's torch.export importer failed: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    _check_output_types(t, ep, mod["main"])
    mod = _canonical_dims(t, mod, names, _export_dim_names(t, names), var_bounds(mod["main"]))
    state = sorted(ep.state_dict.items()) + sorted(ep.constants.items())
    return ImportedTenant(t.name, mod, names, "torch.export", _hash_torch(source_code, state))


def _warn_dropped_asserts(t: Tenant, ep) -> None:
    """Warn, once per message, of the checks on values the model makes at run time
    (``_assert_async``: ``one_hot``'s class range, ``torch._check`` on data), which TVM's
    importer drops: an input that breaks one gets a result where PyTorch raises."""
    said = []
    for n in ep.graph.nodes:
        if n.op == "call_function" and "_assert_async" in str(n.target):
            msg = str(n.args[1]) if len(n.args) > 1 else "(no message)"
            if msg not in said:
                said.append(msg)
    for msg in said:
        warnings.warn(
            f"tenant '{t.name}': the model checks at run time that {msg!r}; TVM's importer "
            "drops such checks, so an input that breaks it gets a result where PyTorch "
            "raises: check it before calling the bundle",
            stacklevel=4,
        )


def _check_output_types(t: Tenant, ep, main) -> None:
    """Refuse an import whose outputs differ from PyTorch's in dtype or in a static dim (a
    converter's fault: TVM's ``index.Tensor`` once gave ``w[i, :, j]`` the wrong shape),
    naming the tenant, the output and both types, instead of building a wrong model."""
    out = next(n for n in ep.graph.nodes if n.op == "output").args[0]
    user = [s.kind.name == "USER_OUTPUT" for s in ep.graph_signature.output_specs]
    vals = [getattr(a, "meta", {}).get("val") for a, u in zip(out, user, strict=False) if u]
    ty = main.body.ty
    fields = list(ty.fields) if hasattr(ty, "fields") else [ty]
    if len(fields) != len(vals):
        return  # outputs TVM's importer flattens otherwise: the lift checks what it gets
    for k, (v, f) in enumerate(zip(vals, fields, strict=True)):
        if v is None or not hasattr(v, "shape") or not hasattr(f, "shape") or f.shape is None:
            continue
        want = [int(d) if isinstance(d, int) else None for d in v.shape]
        got = [int(d) if hasattr(d, "value") else None for d in f.shape]
        same_dims = len(want) == len(got) and all(
            w is None or g is None or w == g for w, g in zip(want, got, strict=True)
        )
        if not same_dims or str(f.dtype) != str(v.dtype).removeprefix("torch."):
            raise TenantError(
                f"tenant '{t.name}': output {k}: TVM's importer gives {f.dtype}{got}, "
                f"PyTorch {str(v.dtype).removeprefix('torch.')}{want} (None: a dynamic dim); "
                "a converter computes something else than the model"
            )


def _decomposed(t: Tenant, ep):
    """`ep` decomposed to core ATen, as TVM's importer would before converting (so that the
    operator check sees what the importer sees); sparse weights are left as they are (the
    importer skips the decomposition for them too)."""
    torch = _torch()
    tensors = [*ep.state_dict.values(), *ep.constants.values()]
    if any(isinstance(x, torch.Tensor) and x.layout != torch.strided for x in tensors):
        return ep
    try:
        with _quiet_torch():
            return ep.run_decompositions()
    except Exception as e:
        kept = _decomposed_keeping_attention(ep)
        if kept is not None:
            return kept
        raise TenantError(
            f"tenant '{t.name}': torch.export's decomposition to core ATen "
            f"failed: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"
        ) from e


def _decomposed_keeping_attention(ep):
    """`ep` decomposed with ``scaled_dot_product_attention`` computed so that its result
    has the layout the graph was traced with, or None if it has none or that fails too.
    torch's own decomposition returns a contiguous (batch, heads, seq, dim) tensor where
    the traced op's result was laid out as (batch, seq, heads, dim), and a ``view`` traced
    after it then fails ("Cannot view a tensor with shape [2, 16, 64] and strides (64, 128,
    1)": transformers' GPT-2 at batch > 1, so any dynamic batch)."""
    torch = _torch()
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    if not any(n.target is sdpa for n in ep.graph.nodes):
        return None

    def attention(
        query,
        key,
        value,
        attn_mask=None,
        dropout_p=0.0,
        is_causal=False,
        scale=None,
        enable_gqa=False,
    ):
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            # as scaled_dot_product_attention itself: the math kernel adds a float mask
            attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(
                attn_mask.logical_not(), float("-inf")
            )
        out = torch.ops.aten._scaled_dot_product_attention_math.default(
            query,
            key,
            value,
            attn_mask,
            dropout_p,
            is_causal,
            None,
            scale=scale,
            enable_gqa=enable_gqa,
        )[0]
        return out.transpose(1, 2).contiguous().transpose(1, 2) if out.ndim == 4 else out

    table = torch.export.default_decompositions()
    table[sdpa] = attention
    try:
        with _quiet_torch():
            return ep.run_decompositions(table)
    except Exception:
        return None


# torch dtypes whose ops PyTorch computes in float32 and rounds back (and TVM's importer
# emits matmul/linear/conv with out_dtype float32 whatever the inputs' dtype)
_LOW_PRECISION = {"float16", "bfloat16"}
_FLOAT32_OUT = ("linear", "addmm", "mm", "bmm", "matmul", "baddbmm", "conv", "einsum")


def _low_precision_map(known) -> dict:
    """Converters for TVM's torch.export importer that keep fp16/bf16 models in their
    dtype: TVM's converters of matmuls and convolutions fix ``out_dtype="float32"``, so a
    float16 Linear's output came back float32 (and one with a bias failed to import: fp16
    bias + fp32 product). A node whose PyTorch output (``meta["val"]``) is not fp16/bf16 is
    converted as before; else an op of `_FLOAT32_OUT` gets its fp16/bf16 inputs cast to
    float32 first (PyTorch too accumulates them in float32), and a float32 result is cast
    back to the node's dtype. (The torch.fx importer has the same fault, not fixed here:
    its module converters take no importer and its nodes carry no output dtype.)"""
    from tvm import relax

    def convert(node, importer):
        original = importer.__dict__.get("_mt_original")
        if original is None:  # the importer's own converters, bound to it, built once
            original = importer._mt_original = importer.create_convert_map()
        fn = original[node.target.__name__]
        val = node.meta.get("val")
        want = str(val.dtype).removeprefix("torch.") if hasattr(val, "dtype") else None
        if want not in _LOW_PRECISION:
            return fn(node)
        saved = {}
        if node.target.__name__.split(".")[0].lstrip("_").startswith(_FLOAT32_OUT):
            for a in node.all_input_nodes:
                v = importer.env.get(a)
                if isinstance(v, relax.Expr) and getattr(v.ty, "dtype", None) == want:
                    saved[a] = v
                    importer.env[a] = importer.block_builder.emit(relax.op.astype(v, "float32"))
        try:
            out = fn(node)
        finally:
            importer.env.update(saved)
        if isinstance(out, relax.Expr) and getattr(out.ty, "dtype", None) == "float32":
            out = importer.block_builder.emit(relax.op.astype(out, want))
        return out

    return {name: convert for name in known if isinstance(name, str)}


def _export_dim_names(t: Tenant, names: list[str]) -> dict[tuple[int, int], str]:
    """``{(input index, axis): Dim name}`` from the tenant's ``dynamic_shapes`` (a dict by
    input name or a sequence by position, each ``{axis: Dim}`` or a sequence of Dims)."""
    spec = t.dynamic_shapes
    if spec is None:
        return {}
    per_input = [spec.get(n) for n in names] if isinstance(spec, dict) else list(spec)
    out = {}
    for i, axes in enumerate(per_input):
        items = axes.items() if isinstance(axes, dict) else enumerate(axes or ())
        for axis, dim in items:
            name = getattr(dim, "__name__", None)
            if isinstance(name, str) and name.isidentifier():
                out[(i, int(axis))] = name
    return out


def _canonical_dims(
    t: Tenant,
    mod,
    names: list[str],
    dim_names: dict[tuple[int, int], str],
    bounds: dict[str, tuple[int, int]],
):
    """`mod` with each size variable of main's inputs renamed ``<tenant>_<dim name>`` (one
    variable per tenant and name: tenants of one bundle take their own sizes) and its
    bounds set as TVM's ``tir_var_lower/upper_bound`` attrs (what lift, memory planning
    and TVM read). A variable without bounds is a `TenantError` naming it."""
    import tvm
    from tvm import tirx

    func = mod["main"]
    new: dict = {}  # old variable -> new one
    lo, hi = {}, {}
    for i, p in enumerate(func.params):
        shape = getattr(p.ty, "shape", None)
        for axis, d in enumerate(getattr(shape, "values", None) or ()):
            if not isinstance(d, tirx.Var) or d in new:
                continue
            user = dim_names.get((i, axis), d.name)
            if d.name not in bounds:
                raise TenantError(
                    f"tenant '{t.name}': input {names[i]!r} axis {axis}: symbolic dim "
                    f"{user!r} has no bounds; declare them (torch.export.Dim(name, min=, "
                    f"max=), or dim_bounds={{{user!r}: (lo, hi)}})"
                )
            new[d] = tirx.Var(f"{t.name}_{user}", "int64")
            lo[new[d].name], hi[new[d].name] = bounds[d.name]
    if not new:
        return mod
    func = _nonnegative_slice_axes(func.bind_symbolic_vars(new))
    func = func.with_attr("tir_var_lower_bound", lo).with_attr("tir_var_upper_bound", hi)
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    out["main"] = func
    return out


def _nonnegative_slice_axes(func):
    """`func` with every ``strided_slice`` axis counted from the front: TVM legalizes a
    slice of a tensor of symbolic shape without normalizing a negative axis ("Check
    failed: axis < src_tensor_dim (-1 vs. 2)": transformers' GPT-2 at a dynamic batch)."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class Normalize(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not (
                isinstance(call.op, tvm.ir.Op)
                and call.op.name == "relax.strided_slice"
                and isinstance(call.args[1], relax.Tuple)
                and getattr(call.args[0].ty, "ndim", -1) > 0
            ):
                return call
            rank = call.args[0].ty.ndim
            axes = [int(a.value) for a in call.args[1].fields]
            if all(a >= 0 for a in axes):
                return call
            return relax.op.strided_slice(
                call.args[0],
                [a % rank for a in axes],
                call.args[2],
                call.args[3],
                call.args[4] if len(call.args) > 4 else None,
                assume_inbound=call.attrs.assume_inbound,
            )

    return Normalize().visit_expr(func)


def _dims_of(t: Tenant, shapes: dict[str, tuple[list, str]]) -> tuple[dict, dict]:
    """Input shapes whose string dims became size variables (one per name), and the
    variables' bounds from ``t.dim_bounds`` (a name without bounds: a `TenantError`)."""
    from tvm import tirx

    made: dict[str, object] = {}
    out = {}
    for inp, (shape, dtype) in shapes.items():
        dims = []
        for axis, d in enumerate(shape):
            if isinstance(d, str):
                if d not in t.dim_bounds:
                    raise TenantError(
                        f"tenant '{t.name}': input {inp!r} axis {axis}: symbolic dim {d!r} "
                        f"has no bounds; give dim_bounds={{{d!r}: (lo, hi)}} (or a fixed "
                        "size in input_shapes)"
                    )
                d = made.setdefault(d, tirx.Var(d, "int64"))
            dims.append(d)
        out[inp] = (dims, dtype)
    unused = sorted(set(t.dim_bounds) - set(made))
    if unused:
        raise TenantError(
            f"tenant '{t.name}': dim_bounds names {unused}, which no input "
            f"dimension is called (symbolic dims: {sorted(made)})"
        )
    return out, {name: tuple(t.dim_bounds[name]) for name in made}


def _import_fx(t: Tenant) -> ImportedTenant:
    from tvm.relax.frontend.torch import from_fx
    from tvm.relax.frontend.torch.fx_translator import TorchFXImporter

    gm = t.model
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    shapes = _fx_shapes(t, placeholders)
    known = TorchFXImporter().convert_map
    modules = dict(gm.named_modules())
    missing = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and getattr(n.target, "__name__", str(n.target)) not in known:
            missing.append((getattr(n.target, "__name__", str(n.target)), _where(n)))
        elif n.op == "call_method" and n.target not in known:
            missing.append((f"Tensor.{n.target}", _where(n)))
        elif n.op == "call_module" and type(modules[n.target]) not in known:
            missing.append((type(modules[n.target]).__name__, f"submodule '{n.target}'"))
    if missing:
        raise UnsupportedOperatorError(t.name, _unique(missing), "torch.fx")
    shapes, bounds = _dims_of(t, shapes)
    try:
        mod = from_fx(gm, [shapes[p] for p in placeholders])
    except Exception as e:
        raise TenantError(
            f"tenant '{t.name}': TVM's fx importer failed: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    mod = _canonical_dims(t, mod, placeholders, {}, bounds)
    state = sorted(gm.state_dict().items())
    return ImportedTenant(t.name, mod, placeholders, "torch.fx", _hash_torch(str(gm.code), state))


def _fx_shapes(t: Tenant, placeholders: list[str]) -> dict[str, tuple[list[int], str]]:
    if t.input_shapes is not None:
        if list(t.input_shapes) != placeholders:
            raise TenantError(
                f"tenant '{t.name}': input_shapes names {list(t.input_shapes)} "
                f"do not match the GraphModule's inputs {placeholders}"
            )
        return {
            k: ([x if isinstance(x, str) else int(x) for x in s], str(d))
            for k, (s, d) in t.input_shapes.items()
        }
    if t.example_inputs is not None:
        if len(t.example_inputs) != len(placeholders):
            raise TenantError(
                f"tenant '{t.name}': {len(t.example_inputs)} example inputs for "
                f"a GraphModule with inputs {placeholders}"
            )
        arrays = [to_numpy(x) for x in t.example_inputs]
        return {p: (list(a.shape), str(a.dtype)) for p, a in zip(placeholders, arrays, strict=True)}
    raise TenantError(
        f"tenant '{t.name}': a torch.fx.GraphModule needs input_shapes "
        f"({{name: (shape, dtype)}} for inputs {placeholders}) or example_inputs"
    )


def load_onnx(t: Tenant):
    """The tenant's ONNX ModelProto, loaded and checked, or a clear error."""
    import onnx

    model = t.model
    if isinstance(model, str | os.PathLike):
        path = Path(model)
        if not path.is_file():
            raise TenantError(f"tenant '{t.name}': ONNX file {str(path)!r} does not exist")
        try:
            model = onnx.load(str(path))
        except Exception as e:
            raise TenantError(
                f"tenant '{t.name}': {str(path)!r} is not a readable ONNX file: "
                f"{type(e).__name__}: {e}"
            ) from e
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        # The checker names the node on later lines: keep them, on one line.
        raise TenantError(
            f"tenant '{t.name}': invalid ONNX model: {' '.join(str(e).split())}"
        ) from e
    if not model.graph.node:
        raise TenantError(f"tenant '{t.name}': the ONNX graph has no nodes")
    return model


def onnx_signature(t: Tenant, model) -> dict[str, tuple[tuple[int | str, ...], str]]:
    """Input name -> (shape, dtype) of an ONNX model, from the file or `t.input_shapes`;
    a symbolic dim is its name (``dim_param``)."""
    import onnx

    inits = {i.name for i in model.graph.initializer}
    sig = {}
    given = dict(t.input_shapes or {})
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        dtype = str(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        if inp.name in given:
            shape, dtype = given.pop(inp.name)
            sig[inp.name] = (tuple(d if isinstance(d, str) else int(d) for d in shape), str(dtype))
            continue
        dims = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.dim_param and d.dim_param.isidentifier():
                dims.append(d.dim_param)  # symbolic: bounds from t.dim_bounds
            else:
                raise TenantError(
                    f"tenant '{t.name}': ONNX input {inp.name!r} has an unnamed dimension "
                    f"{d.dim_param or '?'} at axis {i}; give input_shapes={{{inp.name!r}: "
                    "(shape, dtype)}"
                )
        sig[inp.name] = (tuple(dims), dtype)
    if given:
        raise TenantError(
            f"tenant '{t.name}': input_shapes names {sorted(given)} that are not "
            f"inputs of the ONNX model (inputs: {list(sig)})"
        )
    return sig


# Operator domains whose op names TVM's ONNX importer implements (com.microsoft: contrib ops).
_ONNX_DOMAINS = ("", "ai.onnx", "com.microsoft")


def _check_onnx_ops(t: Tenant, model) -> None:
    """Refuse a model with an op that TVM's ONNX importer (with our converters) lacks."""
    from mtcompile.frontend.onnx_converters import convert_map

    known = convert_map()  # TVM's converters, some replaced by ours (onnx_converters)
    # TVM's importer looks ops up by op_type alone: a custom-domain op named like a standard
    # one (com.example.Relu) would silently compile as the standard op, so reject it here.
    missing = [
        (
            f"{n.domain}.{n.op_type}" if n.domain not in _ONNX_DOMAINS else n.op_type,
            f"node {n.name!r}" if n.name else f"node #{i}",
        )
        for i, n in enumerate(model.graph.node)
        if n.domain not in _ONNX_DOMAINS
        or (n.op_type not in known and n.op_type not in ("Constant", "If"))
    ]
    if missing:
        raise UnsupportedOperatorError(t.name, _unique(missing), "ONNX")


def _convert_onnx(t: Tenant, model, sig: dict, shapes: dict):
    """(Relax module with constants folded, node origins) from TVM's ONNX importer; its
    failure as a `TenantError` naming the tenant."""
    from tvm import relax

    from mtcompile.frontend.onnx_converters import ConversionError, from_onnx

    try:
        mod, origin = from_onnx(
            model, {k: s for k, (s, _) in shapes.items()}, {k: d for k, (_, d) in sig.items()}
        )
        mod = relax.transform.FoldConstant()(mod)
    except ConversionError as e:  # names the node and its op
        raise TenantError(f"tenant '{t.name}': TVM's ONNX importer failed on {e}") from e
    except Exception as e:
        raise TenantError(
            f"tenant '{t.name}': TVM's ONNX importer failed: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    return mod, origin


def _check_no_call_tir(t: Tenant, mod, origin) -> None:
    """Refuse a module where a converter emitted a TE computation (call_tir) on non-constant
    inputs: mtcompile's graph takes Relax operators only."""
    from mtcompile.frontend.onnx_converters import leftover_call_tir

    left = leftover_call_tir(mod["main"], origin)
    if left:
        raise UnsupportedOperatorError(
            t.name,
            _unique(
                [
                    (
                        op,
                        f"node {node!r}: TVM's converter emits a TE computation ({prim}), "
                        "not a Relax operator",
                    )
                    for op, node, prim in left
                ]
            ),
            "ONNX",
        )


def _import_onnx(t: Tenant) -> ImportedTenant:
    """Import an ONNX tenant through TVM's importer, every op checked before and after."""
    model = load_onnx(t)
    _check_onnx_ops(t, model)
    sig = onnx_signature(t, model)
    shapes, bounds = _dims_of(t, {k: (list(s), d) for k, (s, d) in sig.items()})
    mod, origin = _convert_onnx(t, model, sig, shapes)
    _check_no_call_tir(t, mod, origin)
    mod = _canonical_dims(t, mod, list(sig), {}, bounds)
    digest = hashlib.sha256(model.SerializeToString()).hexdigest()
    return ImportedTenant(t.name, mod, list(sig), "onnx", digest)


def _unique(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen, out = set(), []
    for op, where in pairs:
        if op not in seen:
            seen.add(op)
            out.append((op, where))
    return out
