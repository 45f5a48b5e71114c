"""A tenant's requests stacked along its dynamic batch dim into one call, and the call's
outputs split back per request."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mtcompile.runtime.manifest import TenantSig


@dataclass(frozen=True)
class BatchDim:
    """The dim a tenant's requests stack along: its name in the signature, the most rows
    one call takes (the dim's upper bound) and its axis in each input and each output."""

    name: str
    bound: int
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]


def batch_dim(sig: TenantSig) -> BatchDim | None:
    """The first symbolic dim of the first input that every input and every output carries
    at exactly one axis, by its plain name (an output dim such as ``batch * 4`` does not
    count); None: a static tenant, or one whose outputs do not keep the dim (served one
    request per call). Stacking assumes the rows along this dim are independent samples,
    as every dynamic batcher does."""
    if not sig.inputs:
        return None
    for d in sig.inputs[0].shape:
        if not isinstance(d, str):
            continue
        ins = [_axis(s.shape, d) for s in sig.inputs]
        outs = [_axis(s.shape, d) for s in sig.outputs]
        if None not in ins and None not in outs and sig.outputs:
            return BatchDim(d, sig.inputs[0].dims[d][1], tuple(ins), tuple(outs))
    return None


def _axis(shape: tuple[int | str, ...], name: str) -> int | None:
    at = [i for i, d in enumerate(shape) if d == name]
    return at[0] if len(at) == 1 else None


def rows(arrays: list[np.ndarray], bd: BatchDim | None) -> int:
    """Rows of one request along `bd` (1 for a tenant that does not stack)."""
    return 1 if bd is None else arrays[0].shape[bd.in_axes[0]]


def stack_key(arrays: list[np.ndarray], bd: BatchDim | None) -> tuple:
    """What must be equal for two requests to stack: every input's shape but the batch
    axis (another symbolic dim, such as a sequence length, must agree)."""
    if bd is None:
        return ()
    return tuple(a.shape[:ax] + a.shape[ax + 1 :] for a, ax in zip(arrays, bd.in_axes, strict=True))


def stack(requests: list[list[np.ndarray]], bd: BatchDim | None) -> list[np.ndarray]:
    """One call's inputs from several requests' (one request: its own arrays)."""
    if len(requests) == 1:
        return requests[0]
    assert bd is not None, "only a tenant with a batch dim stacks requests"
    return [np.concatenate([r[i] for r in requests], axis=ax) for i, ax in enumerate(bd.in_axes)]


def split(
    outputs: list[np.ndarray], sizes: list[int], bd: BatchDim | None
) -> list[list[np.ndarray]]:
    """Per request (of `sizes` rows each, in stacking order), its part of each output."""
    if len(sizes) == 1:
        return [list(outputs)]
    assert bd is not None, "only a tenant with a batch dim stacks requests"
    cuts = np.cumsum(sizes)[:-1]
    parts = [np.split(o, cuts, axis=ax) for o, ax in zip(outputs, bd.out_axes, strict=True)]
    return [list(p) for p in zip(*parts, strict=True)]
