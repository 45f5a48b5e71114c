"""The cost of one library call from the VM: native C++ kernel, empty Python callback, PyTorch.

    python -m benchmarks.calls [--calls 200] [--repeat 200] [--write]

One Relax function makes `calls` chained ``call_dps_packed`` calls on 1x1 float32 tensors
(a 1x1 matmul: no work to speak of), compiled once per callee: the native kernel
(``mtcompile.native.matmul``), an empty Python function registered under a TVM global name,
and the PyTorch provider's kernel (``mtcompile.torch.matmul``). A zero-call function times the
VM's own entry; ``(t - t0) / calls`` is the cost of one call, allocation of its output included.
Rounds alternate the contenders in one process.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from mtcompile import native
from mtcompile.runtime import library

from .coverage import round_times as measure

EMPTY = "mtcompile.bench.empty"


def chain(callee: str, calls: int) -> tvm.IRModule:
    """main(x: [1, 1]) -> `calls` chained ``callee(x, x) -> [1, 1]`` calls."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 1], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            v = x
            for _ in range(calls):
                v = bb.emit(
                    relax.op.call_dps_packed(
                        callee, relax.Tuple([v, v]), relax.TensorType([1, 1], "float32")
                    )
                )
            out = bb.emit_output(v)
        bb.emit_func_output(out)
    return bb.get()


def run(calls: int, repeat: int, warmup: int) -> dict:
    native.register()
    library.register()

    @tvm_ffi.register_global_func(EMPTY, override=True)
    def _empty(a, b, out):
        pass

    x = tvm.runtime.tensor(np.ones((1, 1), np.float32))
    fns = {}
    matmul = native.table.find("native", "matmul").symbol
    for name, callee, n in [
        ("vm entry (0 calls)", matmul, 0),
        ("native C++ kernel", matmul, calls),
        ("empty Python callback", EMPTY, calls),
        ("PyTorch kernel (Python)", library.MATMUL, calls),
    ]:
        ex = tvm.compile(chain(callee, n), "llvm")
        vm = relax.VirtualMachine(ex, tvm.cpu())
        fns[name] = lambda f=vm["main"]: f(x)
    times = measure(fns, repeat, warmup)
    med = {k: float(np.median(v)) * 1e6 for k, v in times.items()}
    base = med.pop("vm entry (0 calls)")
    return {
        "calls": calls,
        "repeat": repeat,
        "entry_us": base,
        "per_call_us": {k: (v - base) / calls for k, v in med.items()},
    }


def table(res: dict) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"### library call cost ({res['calls']} chained calls per function)",
        "",
        f"`python -m benchmarks.calls --calls {res['calls']} --repeat {res['repeat']}` "
        f"— {stamp}. The VM's entry alone: {res['entry_us']:.1f} us.",
        "",
        "| callee | us per call |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.2f} |" for k, v in res["per_call_us"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--write", action="store_true", help="append to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    text = table(run(args.calls, args.repeat, args.warmup))
    print(text)
    if args.write:
        with open(Path(__file__).parent / "RESULTS.md", "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
