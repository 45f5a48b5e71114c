"""Optional offline tuning: MetaSchedule over the merged module's TVM kernels, kept as a database.

Tasks are extracted from the merged module, so a kernel that several tenants share (same
shapes, same code) is one task, tuned once. The JSON database is reapplied by
``compile(..., tuning_db=DIR)`` without re-tuning.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

from mtcompile.errors import MTCompileError

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"


def load_database(path: str | Path, target: str) -> str:
    """The checked directory of a MetaSchedule JSON database written by `tune`."""
    if target != "llvm":
        raise MTCompileError("tuning databases are applied for target llvm only")
    d = Path(path)
    if not (d / WORKLOADS).is_file() or not (d / RECORDS).is_file():
        raise MTCompileError(f"{d} is not a tuning database: expected {WORKLOADS} and {RECORDS} "
                             "(written by `mtcompile tune`)")
    return str(d.resolve())


def light_tensor_intrin() -> None:
    """Register only the x86 tensor intrinsics.

    ``import tvm.s_tir.tensor_intrin`` parses every target's intrinsics (35-90 s here);
    builder workers do it for each build and time out. Pre-seeding the package with only
    its x86 part makes that import free. Used as the builder workers' initializer.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    import tvm.s_tir

    pkg = types.ModuleType(name)
    pkg.__path__ = [str(Path(tvm.s_tir.__file__).parent / "tensor_intrin")]
    sys.modules[name] = pkg
    importlib.import_module(f"{name}.x86")


def fused_module(mod, target):
    """The module as TVM's CPU pipeline sees it before scheduling (legalized, fused)."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    with target:
        return tvm.transform.Sequential(cpu.legalize_passes(target))(mod)


def count_tasks(mod, target) -> int:
    """Number of distinct tuning tasks in a prepared (offloaded) module."""
    from tvm.s_tir import meta_schedule as ms

    return len(ms.relax_integration.extract_tasks(fused_module(mod, target), target))


def _trials_callback(on_trials, total: int):
    """A MetaSchedule measure callback that reports ``on_trials(measured, total)``."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class _Trials(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                  runner_results) -> None:
            on_trials(len(runner_results), total)

    return _Trials()


def tune(mod, target, out_dir: str | Path, trials: int, progress=print,
         on_trials=None) -> dict:
    """Tune every TVM kernel task of `mod` with up to `trials` trials each; write the database.

    `mod` must be lowered from a graph the same passes made (the offload-library pass with
    the same providers) and prepared as the build does (`kernels.prepare`); on_trials: called
    ``(trials just measured, most trials in all)`` after each batch (a progress bar). Returns
    task counts and timings.
    """
    import time

    from tvm.s_tir import meta_schedule as ms

    try:
        import cloudpickle  # noqa: F401
        import psutil  # noqa: F401
    except ImportError as e:
        raise MTCompileError("tuning needs psutil and cloudpickle: pip install -e '.[tune]'") from e
    try:
        import xgboost  # noqa: F401

        cost_model = "xgb"
    except ImportError:
        cost_model = "random"
    import os

    import tvm

    light_tensor_intrin()
    # MetaSchedule needs the core count in the target; the database keys records by workload.
    target = tvm.target.Target({**dict(target.export()), "num-cores": os.cpu_count() or 1})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    extracted = ms.relax_integration.extract_tasks(fused_module(mod, target), target)
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        extracted, str(out / "logs"), num_threads=2)
    progress(f"tuning {len(contexts)} task(s), up to {trials} trial(s) each, "
             f"cost model {cost_model}")
    database = ms.database.JSONDatabase(str(out / WORKLOADS), str(out / RECORDS))
    if contexts:
        builder = ms.builder.LocalBuilder(max_workers=2, timeout_sec=600,
                                          initializer=light_tensor_intrin)
        callbacks = ms.measure_callback.MeasureCallback.create("default")
        if on_trials is not None:
            callbacks = [*callbacks, _trials_callback(on_trials, trials * len(contexts))]
        ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(out / "logs"),
                      max_trials_global=trials * len(contexts), max_trials_per_task=trials,
                      num_trials_per_iter=min(trials, 32), builder=builder, runner="local",
                      database=database, cost_model=cost_model, measure_callbacks=callbacks)
    return {"tasks": len(contexts), "records": len(database),
            "seconds": round(time.perf_counter() - t0, 1), "cost_model": cost_model}
