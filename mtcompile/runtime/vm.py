"""One Relax VM per calling thread over one executable (a VM is not thread-safe), its entries
looked up once per thread; calls take and give numpy arrays."""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from contextlib import contextmanager

import numpy as np

from mtcompile.errors import MTCompileError

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
    import tvm

    return tvm.cuda(0) if target == "cuda" else tvm.cpu(0)


class ThreadVMs:
    """The VMs of one executable, one per calling thread, created on first use.

    Before the first VM: the device must exist, PyTorch's library kernels are registered
    when the bundle calls them (`torch`), and the executor's event points when its
    run_all runs on streams (`streams`): the executable looks both up by name. (Native
    kernels are registered by the build, or by loading the library they are linked into.)
    """

    def __init__(self, executable, target: str, *, torch: bool = False,
                 streams: bool = False, threads: int | None = None):
        self.executable, self.target = executable, target
        self.torch, self.streams = torch, streams
        self.threads = threads  # the PyTorch kernels' count on each calling thread
        self._local = threading.local()

    def _setup(self):
        from tvm import relax

        dev = device_for(self.target)
        if not dev.exist:
            raise MTCompileError(f"this bundle was built for {self.target} and this machine "
                                 "has no such device")
        if self.torch:
            from mtcompile.runtime import library

            try:
                library.register()
            except ImportError as e:
                raise MTCompileError("this bundle calls PyTorch kernels (kernel provider "
                                     f"'torch') and needs torch installed: {e}") from e
            if self.threads:  # one pool's worth of threads, as TVM's pool has
                from mtcompile.runtime.threads import set_torch_threads

                set_torch_threads(self.threads)
        if self.streams:
            from mtcompile.runtime.executor import register

            register()
        with quiet_native_log():
            self._local.vm = relax.VirtualMachine(self.executable, dev)
        self._local.dev = dev
        self._local.fns = {}

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

    def tensors(self, arrays) -> list:
        """numpy arrays as TVM tensors on this thread's device."""
        import tvm

        self.vm()
        return [tvm.runtime.tensor(a, self._local.dev) for a in arrays]

    def call(self, entry: str, arrays) -> list[np.ndarray]:
        """Run `entry` on numpy arrays; its outputs as numpy arrays."""
        fn = self.fn(entry)
        try:
            outs = fn(*self.tensors(arrays))
        except Exception as e:
            raise_index_error(e)
            raise
        return [o.numpy() for o in outs]


def raise_index_error(e: BaseException) -> None:
    """Raise `IndexOutOfRangeError` if `e` is a failed bounds check of the generated code
    (its message starts with `abi.INDEX_CHECK`); otherwise return."""
    from mtcompile.errors import IndexOutOfRangeError
    from mtcompile.runtime.abi import INDEX_CHECK

    text = str(e)
    if INDEX_CHECK in text:
        line = text[text.index(INDEX_CHECK) + len(INDEX_CHECK):].splitlines()[0].strip()
        raise IndexOutOfRangeError(line) from None
