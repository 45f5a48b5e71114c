"""TVM's runtime without its compiler: ``libtvm_runtime.so`` loaded with ctypes, `tvm_ffi`, and
the Relax VMs, devices and tensors of a loaded bundle made through them.

``import tvm`` maps the 259 MB ``libtvm_compiler.so``; a saved bundle needs only the 3.4 MB
runtime library beside it in the wheel (the Relax VM, the thread pool, ``vm.builtin.*``).
``import tvm_ffi`` imports torch when it is installed (an optional DLPack bridge): unless
torch is loaded already, or the bundle calls PyTorch's kernels, it is imported here with
torch hidden. A function the bundle calls that these do not register is looked for in
``libtvm_runtime_extra.so`` (TVM's contrib sort and random kernels), then in the compiler
(``import tvm``); where neither has it the load says so (`provide`). CPU only: a cuda
bundle imports tvm, whose backends load TVM's CUDA runtime library.
"""

from __future__ import annotations

import ctypes
import importlib.abc
import importlib.metadata
import re
import sys
import threading
from contextlib import contextmanager

import numpy as np

from mtcompile import native
from mtcompile.runtime.inputs import numpy_dtype

POOLED_ALLOCATOR = 2  # TVM's allocator kinds: 1 naive, 2 pooled (relax.VirtualMachine's default)
CPU = 1  # DLPack's device type of the host CPU
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}  # runtime library name -> its handle
_fns: dict[str, object] = {}


class _Hidden(importlib.abc.MetaPathFinder):
    """Makes ``import <name>`` (and its submodules) fail while installed."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname, path, target=None):
        if fullname == self.name or fullname.startswith(self.name + "."):
            raise ImportError(f"{fullname} hidden while tvm_ffi is imported")
        return None


@contextmanager
def _hidden(name: str):
    finder = _Hidden(name)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


def ffi(torch: bool = False):
    """`tvm_ffi`, with TVM's runtime library loaded (once per process). torch: the caller
    needs PyTorch's kernels (tvm_ffi then imports torch as it does by itself)."""
    if "runtime" not in _loaded:
        with _lock:
            if "tvm_ffi" not in sys.modules and not torch and "torch" not in sys.modules:
                with _hidden("torch"):
                    import tvm_ffi  # noqa: F401
            import tvm_ffi  # noqa: F401  (loads libtvm_ffi.so, which the runtime links)

            if "runtime" not in _loaded:
                _loaded["runtime"] = ctypes.CDLL(
                    str(native.tvm_lib_dir() / "libtvm_runtime.so"), mode=ctypes.RTLD_GLOBAL
                )
    return sys.modules["tvm_ffi"]


def loaded_libraries() -> list[str]:
    """TVM's libraries this module loaded (``runtime``, ``runtime_extra``, ``compiler``)."""
    return sorted(_loaded) + (["compiler"] if "tvm" in sys.modules else [])


def tvm_version() -> str:
    """The installed TVM's version, as ``tvm.__version__`` says it, without importing tvm."""
    tvm = sys.modules.get("tvm")
    if tvm is not None:
        return tvm.__version__
    try:
        return importlib.metadata.version("apache-tvm")
    except importlib.metadata.PackageNotFoundError:  # a source build: only tvm knows
        import tvm

        return tvm.__version__


def load_module(path: str, target: str = "llvm"):
    """A shared library (a bundle's, built for `target`) as a TVM module. A cuda bundle's
    device code is loaded by ``libtvm_runtime_cuda.so``, which tvm loads: tvm is imported."""
    if target == "cuda":
        import tvm  # noqa: F401

    return ffi().load_module(path)


def device(target: str):
    """The device (number 0) a bundle built for `target` runs on. CUDA's device API lives in
    ``libtvm_runtime_cuda.so``, which tvm loads: a cuda bundle imports tvm."""
    if target == "cuda":
        import tvm

        return tvm.cuda(0)
    return ffi().device("cpu", 0)


def device_exists(dev) -> bool:
    """Whether TVM supports `dev` here and the device is present."""
    attr = ffi().get_global_func("runtime.GetDeviceAttr")
    return attr(dev.dlpack_device_type(), dev.index, 0) != 0  # 0: kExist


class VM:
    """A Relax VM over a loaded executable module, as ``relax.VirtualMachine`` makes it:
    pooled allocator on `dev` and on the host CPU (which runs shape computations)."""

    def __init__(self, module, dev):
        self.module = module["vm_load_executable"]()
        args = [dev.dlpack_device_type(), dev.index, POOLED_ALLOCATOR]
        if dev.dlpack_device_type() != CPU:
            args += [CPU, 0, POOLED_ALLOCATOR]
        self.module["vm_initialization"](*args)

    def __getitem__(self, name: str):
        return self.module[name]

    def set_instrument(self, instrument) -> None:
        """Call `instrument` around every VM call (None: stop); see relax.VirtualMachine."""
        self.module["set_instrument"](instrument)


def make_vm(executable, dev):
    """A VM over `executable`: a loaded library (`VM`) or, freshly compiled, a
    ``relax.VirtualMachine`` (the compiler is loaded then)."""
    if isinstance(executable, ffi().Module):
        return VM(executable, dev)
    from tvm import relax

    return relax.VirtualMachine(executable, dev)


def _fn(name: str):
    f = _fns.get(name)
    if f is None:
        f = _fns[name] = ffi().get_global_func(name)
    return f


ALIGN = 64  # bytes: TVM's allocator aligns tensors so, and its generated code may assume it


def tensor(a: np.ndarray, dev):
    """Numpy array `a` as a TVM tensor on `dev`. On the CPU a C-contiguous array aligned as
    TVM aligns its own is shared (DLPack, no copy: the VM never writes its inputs), any
    other goes through an aligned copy; a dtype DLPack cannot carry (bfloat16) and other
    devices get a copy in TVM's allocator. One call costs ~0.5 us shared, ~17 us through
    TVM's allocator (measured on the demo's inputs)."""
    tvm_ffi = ffi()
    if dev.dlpack_device_type() == CPU:
        try:
            if not (a.flags.c_contiguous and a.ctypes.data % ALIGN == 0):
                a = _aligned_copy(a)
            return tvm_ffi.from_dlpack(a)
        except (BufferError, TypeError, ValueError):  # no DLPack dtype (bfloat16), read-only
            pass
    t = _fn("runtime.TVMTensorAllocWithScope")(
        tvm_ffi.Shape([int(d) for d in a.shape]), tvm_ffi.dtype(str(a.dtype)), dev, None
    )
    a = np.ascontiguousarray(a)
    _fn("runtime.TVMTensorCopyFromBytes")(t, a.ctypes.data_as(ctypes.c_void_p), a.nbytes)
    return t


def _aligned_copy(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of `a` whose data starts on an `ALIGN`-byte boundary."""
    buf = np.empty(a.nbytes + ALIGN, np.uint8)
    start = -buf.ctypes.data % ALIGN
    out = buf[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
    np.copyto(out, a)
    return out


def to_numpy(t) -> np.ndarray:
    """A copy of TVM tensor `t` as a numpy array (bfloat16 as ml_dtypes' dtype)."""
    if t.device.dlpack_device_type() == CPU:
        try:
            return np.from_dlpack(t).copy()
        except (BufferError, TypeError, ValueError, RuntimeError):  # bfloat16: below
            pass
    out = np.empty(tuple(int(d) for d in t.shape), numpy_dtype(str(t.dtype)))
    _fn("runtime.TVMTensorCopyToBytes")(t, out.ctypes.data_as(ctypes.c_void_p), out.nbytes)
    return out


_MISSING = re.compile(r"Cannot find ffi::Function ([\w.]+)")


def missing_function(e: BaseException) -> str | None:
    """The function a VM failed to find (its error names it), or None for any other error."""
    m = _MISSING.search(str(e))
    return m.group(1) if m else None


def provide(name: str) -> str | None:
    """Load what registers global function `name`: TVM's extra runtime library, else the
    compiler. Returns None when it is registered now, else why it is not."""
    tvm_ffi = ffi()
    with _lock:
        if "runtime_extra" not in _loaded:
            path = native.tvm_lib_dir() / "libtvm_runtime_extra.so"
            if path.is_file():  # RTLD_LOCAL, as tvm loads it: only its registrations count
                _loaded["runtime_extra"] = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
    if tvm_ffi.get_global_func(name, allow_missing=True) is not None:
        return None
    try:
        import tvm  # noqa: F401  (the compiler registers the rest of TVM's functions)
    except ImportError as e:
        return f"importing tvm (the compiler package) failed: {e}"
    if tvm_ffi.get_global_func(name, allow_missing=True) is not None:
        return None
    return "neither TVM's runtime libraries nor its compiler register it"
