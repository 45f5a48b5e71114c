"""Optional offline tuning: MetaSchedule over the merged module's TVM kernels, kept as a database.

Tasks are extracted from the merged module, so a kernel that several tenants share (same
shapes, same code) is one task, tuned once. The JSON database is reapplied by
``compile(..., tuning_db=DIR)`` without re-tuning.
"""

from __future__ import annotations

import contextlib
import importlib
import signal
import sys
import threading
import types
from collections.abc import Iterator
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
        raise MTCompileError(
            f"{d} is not a tuning database: expected {WORKLOADS} and {RECORDS} "
            "(written by `mtcompile tune`)"
        )
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


def repair_database(out: Path) -> int:
    """Drop a torn last line (a run killed while writing); return the records kept.

    MetaSchedule appends one flushed JSON line per measured candidate after each batch, so
    a stopped run keeps every batch it finished; only the line being written can be cut.
    """
    kept = 0
    for name in (WORKLOADS, RECORDS):
        path = out / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
            path.write_bytes(data)
        if name == RECORDS:
            kept = data.count(b"\n")
    return kept


def _task_tenants(fused, extracted) -> list[list[str]]:
    """For each extracted task, the Relax functions (tenant entries, run_all) that call it."""
    import tvm_ffi
    from tvm import relax, tirx

    callers: dict[str, set[str]] = {}
    for gv, func in fused.functions.items():
        if isinstance(func, relax.Function):
            for callee in relax.analysis.all_global_vars(func):
                callers.setdefault(callee.name_hint, set()).add(gv.name_hint)
    prims = [
        (gv.name_hint, f.with_attr("global_symbol", "main"))
        for gv, f in fused.functions.items()
        if isinstance(f, tirx.PrimFunc)
    ]
    out = []
    for task in extracted:
        main = task.dispatched[0]["main"]
        users = set().union(
            *[callers.get(name, set()) for name, f in prims if tvm_ffi.structural_equal(f, main)]
        )
        out.append(sorted(users))
    return out


def _measured(database, contexts) -> list[tuple[int, int, float | None]]:
    """(records, failed ones, best mean seconds or None) in the database, for each task."""
    by_workload: dict[int, list] = {}
    workloads = []
    for ctx in contexts:
        workloads.append(
            database.commit_workload(ctx.mod) if database.has_workload(ctx.mod) else None
        )
    for record in database.get_all_tuning_records():
        for i, w in enumerate(workloads):
            if w is not None and record.workload.same_as(w):
                by_workload.setdefault(i, []).append(record)
                break
    out = []
    for i in range(len(contexts)):
        records = by_workload.get(i, [])
        times = [_mean(r.run_secs) for r in records]
        valid = [t for t in times if t is not None]
        out.append((len(records), len(times) - len(valid), min(valid) if valid else None))
    return out


def _mean(run_secs) -> float | None:
    """Mean seconds of one measurement; None for a failed one (MetaSchedule stores 1e10)."""
    secs = [float(s) for s in run_secs or []]
    mean = sum(secs) / len(secs) if secs else None
    return mean if mean is not None and mean < 1e9 else None


def _measure_callback(on_batch):
    """A MetaSchedule measure callback: ``on_batch(task_id, [mean secs or None, ...])``."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class _Batch(PyMeasureCallback):
        def apply(
            self, task_scheduler, task_id, measure_candidates, builder_results, runner_results
        ) -> None:
            on_batch(task_id, [_mean(r.run_secs) for r in runner_results])

    return _Batch()


@contextlib.contextmanager
def _stop_after_batch(flag: list[bool]):
    """While tuning, the first Ctrl-C sets `flag` (the run stops after the batch being
    measured, which the database keeps); a second one interrupts at once.

    A KeyboardInterrupt raised inside MetaSchedule's builders is swallowed by its task loop
    (the run went on to the end), so the measure callback raises it between batches.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def first(_signum, _frame) -> None:
        flag.append(True)
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _reads_indices(task) -> bool:
    """Whether a task's kernel takes an integer tensor (a gather's indices: MetaSchedule
    measures on random values, and TVM's fast take reads wherever they point)."""
    func = next(f for _, f in task.dispatched[0].functions_items())
    return any(str(_buffer_dtype(p)).startswith(("int", "uint")) for p in func.params)


def _buffer_dtype(param) -> str | None:
    """A PrimFunc parameter's element dtype (its buffer's; None for a scalar parameter)."""
    try:
        return param.dtype  # TVM 0.27: a buffer parameter is a Var of BufferType
    except AttributeError:
        return None


def parse_target(spec: str | dict | None):
    """The tuning target: None (this machine's CPU), ``"llvm"``, or an llvm target dict
    (or its JSON text) describing the device the candidates run on."""
    import json

    import tvm

    from mtcompile.backend.lowering import make_target

    if spec is None or spec == "llvm":
        return make_target("llvm")
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError:
            raise MTCompileError(
                f"tuning target {spec!r}: expected llvm or a TVM target "
                'dict such as {"kind": "llvm", "mcpu": "skylake"}'
            ) from None
    if not isinstance(spec, dict) or spec.get("kind") != "llvm":
        raise MTCompileError(
            f"tuning target {spec!r}: tuning databases are applied for "
            'target llvm only (a dict needs "kind": "llvm")'
        )
    try:
        return tvm.target.Target(spec)
    except Exception as e:  # noqa: BLE001 - TVM's own message names the bad key
        raise MTCompileError(f"tuning target {spec!r}: {e}") from e


def tune(
    mod,
    target,
    out_dir: str | Path,
    trials: int,
    progress=print,
    on_trials=None,
    *,
    devices=None,
    builders: int | None = None,
    on_task=None,
) -> dict:
    """Tune every TVM kernel task of `mod` up to `trials` trials each; write the database.

    `mod` must be lowered from a graph the same passes made (the offload-library pass with
    the same providers) and prepared as the build does (`kernels.prepare`). Measurements
    already in `out_dir`'s database count: a run continues where a stopped one left off, and
    a task that has `trials` successful ones is not tuned again. devices: a checked tracker
    (`tuning_remote.Devices`) whose servers measure the candidates (else this machine
    does); builders: parallel build workers (default the cores). on_trials: ``(trials just
    measured, most trials in all)`` and on_task: a task's row (as in the returned
    ``table``), after each batch. TrackerError when every server is gone mid-run.
    """
    import time

    cost_model = _cost_model()
    light_tensor_intrin()
    builders, tracker, servers, cores = _measuring(devices, builders)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fused, extracted, contexts, weights = _tasks(
        mod, _with_cores(target, cores), out, builders, progress
    )
    kept, database, rows = _resume(out, contexts, fused, extracted)
    run = _Run(rows, trials, tracker, on_trials, on_task)
    progress(_plan(run, len(contexts), kept, cost_model, servers, tracker))
    if run.todo():
        _tune_todo(run, contexts, weights, builders, tracker, servers, out, database, cost_model)
    return {
        "tasks": len(contexts),
        "records": len(database),
        "measured": run.measured,
        "resumed_from": kept,
        "seconds": round(time.perf_counter() - t0, 1),
        "cost_model": cost_model,
        "servers": servers,
        "table": rows,
    }


def _measuring(devices, builders: int | None) -> tuple[int, object, int, int]:
    """(build workers, tracker or None, its servers, cores of a measuring device): the
    tracker's servers measure with `devices`, else this machine does."""
    import os

    builders = builders or os.cpu_count() or 1
    tracker = devices and devices.tracker
    servers, cores = (devices.servers, devices.threads) if devices else (0, os.cpu_count() or 1)
    return builders, tracker, servers, cores


def _resume(out: Path, contexts, fused, extracted) -> tuple[int, object, list[dict]]:
    """(records kept, database, task rows) of the database in `out`, repaired (a stopped
    run's torn tail dropped) and opened: what earlier runs measured counts."""
    from tvm.s_tir import meta_schedule as ms

    kept = repair_database(out)
    database = ms.database.JSONDatabase(str(out / WORKLOADS), str(out / RECORDS))
    return kept, database, _task_rows(database, contexts, fused, extracted)


def _plan(run, tasks: int, kept: int, cost_model: str, servers: int, tracker) -> str:
    """The line that says what the run will tune, and where it measures."""
    return (
        f"tuning {len(run.todo())} of {tasks} task(s), up to {run.trials} trial(s) "
        f"each ({kept} already in the database), cost model {cost_model}, "
        + (f"measured on {servers} server(s)" if tracker else "measured here")
    )


def _tune_todo(
    run, contexts, weights, builders: int, tracker, servers: int, out: Path, database, cost_model
) -> None:
    """Tune the run's tasks with trials left, one ``tune_tasks`` per group of tasks with the
    same budget left, measured by the tracker's servers (else on this machine)."""
    from tvm.s_tir import meta_schedule as ms

    builder = ms.builder.LocalBuilder(
        max_workers=builders, timeout_sec=600, initializer=light_tensor_intrin
    )
    runner = tracker.runner(servers) if tracker is not None else ms.runner.LocalRunner()
    # tune_tasks has one budget for every task: tasks with the same budget left go together
    for budget, group in run.groups():
        run.tune_group(
            group,
            budget,
            tasks=[contexts[i] for i in group],
            task_weights=[weights[i] for i in group],
            work_dir=str(out / "logs"),
            builder=builder,
            runner=runner,
            database=database,
            cost_model=cost_model,
        )


def _with_cores(target, cores: int):
    """`target` with the measuring device's core count: MetaSchedule sizes parallel loops by
    it (a target that names num-cores keeps its own). The database keys records by
    workload."""
    import tvm

    return tvm.target.Target({"num-cores": cores, **dict(target.export())})


def _tasks(mod, target, out: Path, builders: int, progress) -> tuple:
    """The fused module, its tunable tasks and their tune contexts and weights."""
    from tvm.s_tir import meta_schedule as ms

    fused = fused_module(mod, target)
    extracted = _tunable_tasks(ms.relax_integration.extract_tasks(fused, target), progress)
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        extracted, str(out / "logs"), num_threads=builders
    )
    return fused, extracted, contexts, weights


def _task_rows(database, contexts, fused, extracted) -> list[dict]:
    """A row per task (`tune`'s ``table``): trials in the database so far, failed ones among
    them, the best time and the tenants that run the kernel."""
    return [
        {
            "task": t.task_name,
            "trials": n,
            "failed": f,
            "best_us": None if b is None else b * 1e6,
            "tenants": u,
        }
        for t, (n, f, b), u in zip(
            extracted, _measured(database, contexts), _task_tenants(fused, extracted), strict=True
        )
    ]


def _cost_model() -> str:
    """MetaSchedule's cost model: ``xgb`` where xgboost is installed, else ``random``; an
    MTCompileError when what tuning needs at all (psutil, cloudpickle) is missing."""
    try:
        import cloudpickle  # noqa: F401
        import psutil  # noqa: F401
    except ImportError as e:
        raise MTCompileError("tuning needs psutil and cloudpickle: pip install -e '.[tune]'") from e
    try:
        import xgboost  # noqa: F401
    except ImportError:
        return "random"
    return "xgb"


def _tunable_tasks(extracted: list, progress) -> list:
    """The extracted tasks without gathers (measured on random inputs, a gather reads out of
    bounds and kills the runner), said through `progress` when there are any."""
    gathers = [t.task_name for t in extracted if _reads_indices(t)]
    if gathers:
        progress(
            f"not tuned (gathers: random indices would read out of bounds): {', '.join(gathers)}"
        )
    return [t for t in extracted if not _reads_indices(t)]


class _Run:
    """One tuning run's tasks (`rows`, as `tune` returns them, updated after each measured
    batch), the trials measured, and what stops it: a first Ctrl-C (after the batch being
    measured) or the tracker losing every server."""

    def __init__(self, rows: list[dict], trials: int, tracker, on_trials, on_task):
        self.rows, self.trials, self.tracker = rows, trials, tracker
        self.on_trials, self.on_task = on_trials, on_task
        self.measured = 0
        self.stopped: list[BaseException] = []
        self.interrupted: list[bool] = []
        self.total = sum(self.left(i) for i in self.todo())

    def left(self, i: int) -> int:
        """Trials task `i` still needs: failed runs do not count (a candidate lost with its
        server is measured again)."""
        row = self.rows[i]
        return self.trials - (row["trials"] - row["failed"])

    def todo(self) -> list[int]:
        """The tasks with trials left."""
        return [i for i in range(len(self.rows)) if self.left(i) > 0]

    def groups(self) -> Iterator[tuple[int, list[int]]]:
        """(budget, tasks) for each budget of trials left at the start, largest first; a
        group is the tasks with that budget left when its turn comes."""
        todo = self.todo()
        for budget in sorted({self.left(i) for i in todo}, reverse=True):
            yield budget, [i for i in todo if self.left(i) == budget]

    def tune_group(self, group: list[int], budget: int, **tune_args) -> None:
        """MetaSchedule's ``tune_tasks`` over `group`, each task up to `budget` trials."""
        from tvm.s_tir import meta_schedule as ms

        callbacks = [
            *ms.measure_callback.MeasureCallback.create("default"),
            _measure_callback(lambda task_id, secs: self.on_batch(group, task_id, secs)),
        ]
        try:
            with _stop_after_batch(self.interrupted):
                ms.tune_tasks(
                    **tune_args,
                    max_trials_global=budget * len(group),
                    max_trials_per_task=budget,
                    num_trials_per_iter=min(budget, 32),
                    measure_callbacks=callbacks,
                )
        except Exception:
            # what the callback raised comes back through TVM as a RuntimeError
            if self.stopped:
                raise self.stopped[0] from None
            raise

    def on_batch(self, group: list[int], task_id: int, secs: list[float | None]) -> None:
        """A measured batch of task `group[task_id]`: its row updated, the callbacks told;
        raises to stop the run (interrupted, or every server gone)."""
        row = self.rows[group[task_id]]
        row["trials"] += len(secs)
        row["failed"] += sum(s is None for s in secs)
        times = [s * 1e6 for s in secs if s is not None] + (
            [row["best_us"]] if row["best_us"] is not None else []
        )
        row["best_us"] = min(times) if times else None
        self.measured += len(secs)
        if self.on_trials is not None:
            self.on_trials(len(secs), self.total)
        if self.on_task is not None:
            self.on_task(dict(row))
        if self.interrupted:
            self.stopped.append(KeyboardInterrupt())
            raise self.stopped[-1]
        if self.tracker is not None:
            try:
                self.tracker.lost(sum(s is None for s in secs))
            except MTCompileError as e:
                self.stopped.append(e)
                raise
