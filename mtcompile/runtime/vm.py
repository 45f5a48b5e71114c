"""One Relax VM per calling thread over one executable (a VM is not thread-safe), its entries
looked up once per thread; calls take and give numpy arrays. A loaded bundle's VMs need
TVM's runtime library only (`mtcompile.runtime.tvmrt`), not its compiler."""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np

from mtcompile.errors import ArtifactError, MTCompileError
from mtcompile.runtime import tvmrt

# TVM 0.27 logs one "Scope Saving:"/"Scope Loaded:" warning per constant when an
# executable is exported or loaded (a leftover debug LOG in vm/executable.cc).
_NATIVE_NOISE = ("Scope Saving:", "Scope Loaded:")


@contextmanager
def quiet_native_log():
    """Drop TVM's per-constant debug lines from fd 2; everything else is passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines(keepends=True):
                if not any(p in line for p in _NATIVE_NOISE):
                    sys.stderr.write(line)


def device_for(target: str):
    """The TVM device a bundle built for `target` runs on (device 0)."""
    return tvmrt.device(target)


class ThreadVMs:
    """The VMs of one executable, one per calling thread, created on first use.

    Before the first VM: the device must exist, PyTorch's library kernels are registered
    when the bundle calls them (`torch`: the op kinds they run), and the executor's event
    points when its run_all runs on streams (`streams`): the executable looks both up by
    name. (Native
    kernels are registered by the build, or by loading the library they are linked into.)
    A function none of these register is looked for in TVM's other libraries
    (`tvmrt.provide`); where it is in none, creating the VM fails with `ArtifactError`.
    """

    def __init__(
        self,
        executable,
        target: str,
        *,
        torch: Sequence[str] = (),
        streams: bool = False,
        threads: int | None = None,
        weights=None,
    ):
        self.executable, self.target = executable, target
        self.weights = weights  # `runtime.weights.Weights`: each entry's trailing params
        self.torch_ops = tuple(torch)  # the heavy op kinds PyTorch's kernels run
        self.torch, self.streams = bool(self.torch_ops), streams
        self.threads = threads  # the PyTorch kernels' count on each calling thread
        self.marks = None  # `threads.run_marks`, found on the first VM's set-up
        self._local = threading.local()

    def _setup(self):
        dev = device_for(self.target)
        if not tvmrt.device_exists(dev):
            raise MTCompileError(
                f"this bundle was built for {self.target} and this machine has no such device"
            )
        if self.torch:
            from mtcompile.runtime import library

            try:
                library.register()
            except ImportError as e:
                raise MTCompileError(
                    "this bundle calls PyTorch kernels (kernel provider "
                    f"'torch': {sorted(self.torch_ops)}) and torch cannot be "
                    f"imported here ({e}); install torch, or rebuild it with "
                    "kernels='native' to run without torch"
                ) from e
            if self.threads:  # one pool's worth of threads, as TVM's pool has
                from mtcompile.runtime.threads import set_torch_threads

                set_torch_threads(self.threads)
        if self.streams:
            from mtcompile.runtime.executor import register

            register()
        self._local.vm = self.new_vm(dev)
        self._local.dev = dev
        from mtcompile.runtime.threads import run_marks

        self.marks = run_marks()  # the native pool's workers spin while a call runs
        self._local.arenas = {}
        self._local.fns = {}

    def new_vm(self, dev=None):
        """A fresh VM over the executable on `dev` (default: the target's device), for the
        calling thread; the functions it calls that TVM's runtime library does not register
        are loaded from TVM's other libraries first."""
        dev = device_for(self.target) if dev is None else dev
        while True:
            try:
                with quiet_native_log():
                    return tvmrt.make_vm(self.executable, dev)
            except Exception as e:
                name = tvmrt.missing_function(e)
                if name is None:
                    raise
                why = tvmrt.provide(name)
                if why is not None:
                    raise ArtifactError(
                        f"this bundle calls {name!r}, which this process cannot provide: {why}"
                    ) from e

    def vm(self):
        """This thread's VM."""
        if getattr(self._local, "fns", None) is None:
            self._setup()
        return self._local.vm

    def fn(self, entry: str):
        """This thread's VM function `entry`."""
        fns = getattr(self._local, "fns", None)
        if fns is None:
            self._setup()
            fns = self._local.fns
        if entry not in fns:
            fns[entry] = self._local.vm[entry]
        return fns[entry]

    def arena(self, function: str):
        """The storage zero-argument `function` returns, made once per thread's VM: a run
        of this thread uses it, and runs of one thread never overlap."""
        self.vm()
        arenas = self._local.arenas
        if function not in arenas:
            arenas[function] = self.fn(function)()
        return arenas[function]

    def tensors(self, arrays) -> list:
        """numpy arrays as TVM tensors on this thread's device."""
        self.vm()
        return [tvmrt.tensor(a, self._local.dev) for a in arrays]

    def call(self, entry: str, arrays) -> list[np.ndarray]:
        """Run `entry` on numpy arrays; its outputs as numpy arrays."""
        fn = self.fn(entry)
        tail = self.weights.args(entry, self._local.dev) if self.weights is not None else ()
        args = self.tensors(arrays)
        marks = self.marks
        if marks is not None:
            marks[0]()
        try:
            outs = fn(*args, *tail)
        except Exception as e:
            raise_index_error(e)
            raise
        finally:
            if marks is not None:
                marks[1]()
        return [tvmrt.to_numpy(o) for o in outs]


def raise_index_error(e: BaseException) -> None:
    """Raise `IndexOutOfRangeError` (`DivisionByZeroError`) if `e` is a failed bounds
    (divisor) check of the generated code, its message after `abi.INDEX_CHECK`
    (`abi.DIVISION_CHECK`); otherwise return."""
    from mtcompile.abi import DIVISION_CHECK, INDEX_CHECK
    from mtcompile.errors import DivisionByZeroError, IndexOutOfRangeError

    text = str(e)
    for marker, error in (
        (INDEX_CHECK, IndexOutOfRangeError),
        (DIVISION_CHECK, DivisionByZeroError),
    ):
        if marker in text:
            line = text[text.index(marker) + len(marker) :].splitlines()[0].strip()
            raise error(line) from None
