"""The optimization passes, registered in `mtcompile.pass_infra.REGISTRY`, and the default pipeline."""

from __future__ import annotations

from typing import Any

from mtcompile.errors import MTCompileError
from mtcompile.pass_infra import REGISTRY, Pass, check_pipeline, make_pass

from . import (  # noqa: F401  (importing registers the passes)
    assign_streams,
    dedup,
    eliminate_dead_nodes,
    fold_batch_norm,
    fuse_attention,
    fuse_horizontal,
    fuse_vertical,
    offload_library,
    plan_memory,
)

DEFAULT_PIPELINE: list[str] = [
    "dedup",  # compute what several tenants compute alike once
    "fuse-horizontal",  # batch same-architecture tenants through stacked weights (run_all)
    "eliminate-dead-nodes",  # drop values no tenant output needs
    "fold-batch-norm",  # inference batch-norm after a conv -> the conv's weight and a bias
    "offload-library",  # heavy ops whose provider is library -> library calls (bias folded)
    "fuse-attention",  # native matmul -> scale -> softmax -> matmul chains -> one call
    "fuse-vertical",  # fusion groups: each becomes exactly one kernel
    "assign-streams",  # run_all's kernels -> streams (auto: one stream unless it pays off)
    "plan-memory",  # one arena per function: offsets by liveness over the kernels that run
]


def build_pipeline(
    names: list[str] | None = None, options: dict[str, dict[str, Any]] | None = None
) -> list[Pass]:
    """Pass instances for `names` (default pipeline when None) with per-pass `options`,
    checked before any work: names, option names, types and values, and the order of the
    analyses the passes require and invalidate (`check_pipeline`)."""
    names = list(DEFAULT_PIPELINE if names is None else names)
    options = options or {}
    if not isinstance(options, dict):
        raise MTCompileError(
            f"pass options must be a dict of pass name -> {{option: value}}, "
            f"got {type(options).__name__}"
        )
    stray = set(options) - set(names)
    if stray:
        raise MTCompileError(
            f"options given for passes not in the pipeline: {sorted(stray)} (pipeline: {names})"
        )
    pipeline = [make_pass(n, options.get(n)) for n in names]
    check_pipeline(pipeline)
    return pipeline


__all__ = ["DEFAULT_PIPELINE", "REGISTRY", "build_pipeline"]
