"""Serving: a multi-tenant scheduler over a loaded bundle (`Scheduler`). Part of the
runtime side: it imports the runtime and no compiler module, so a serving host runs it."""

from mtcompile.errors import QueueFullError, SchedulerClosedError, ServingError
from mtcompile.serving.batching import BatchDim, batch_dim
from mtcompile.serving.scheduler import Scheduler

__all__ = [
    "BatchDim",
    "QueueFullError",
    "Scheduler",
    "SchedulerClosedError",
    "ServingError",
    "batch_dim",
]
