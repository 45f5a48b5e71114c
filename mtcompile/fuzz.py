"""Differential fuzzer: random tenant sets through random pipelines, against the source framework.

    python -m mtcompile.fuzz --seed 0 --count 50 [--json FILE]

Case `i` of seed `s` is drawn from ``random.Random(s * 1_000_003 + i)``: two or three tenants
built from random layer stacks (Linear, Conv2d with random stride / padding / dilation /
groups, BatchNorm, pools, activations, LayerNorm, Embedding, residual adds; float32, now
and then float16), with shared modules (the same weights in two tenants) and repeated
architectures, and now and then an ONNX tenant: a small ONNX graph, often mutated (an
attribute, a shape or a dtype changed; many such models are invalid). Each set is compiled
with a random valid pipeline and options, then `CompiledBundle.verify` compares `run` and
`run_all` with PyTorch eager / onnxruntime at a tolerance that follows each output's dtype
and scale (float32: 1e-4 of max|source|). One case in seven or so also takes a model of
the real-model zoo (`mtcompile.models.hf`: BERT, GPT-2, ViT, Whisper, ...).

Every case must end as ``match`` or ``refused`` (an `MTCompileError`: the input was bad, or
something is not supported, and the message says so); ``mismatch`` (wrong numbers),
``error`` (any other exception), ``crash`` (the process died) and ``hang`` (no result within
the per-case timeout) are bugs. Refusals by an internal consistency check (`INTERNAL`: a
lowering, arena or stream error) are counted apart: no wrong answer, but a fault to fix.
Cases run in a worker process; a dead worker is reported
as a crash of the case it was on, and a fresh worker takes the next case.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
import warnings
from collections import Counter

BUGS = ("mismatch", "error", "crash", "hang")
# refusals that name no fault of the input: the compiler or runtime found itself inconsistent
INTERNAL = ("LoweringError", "ArenaError", "StreamError", "DeadlockError", "AnalysisError")
_MARK = "@@mtcompile.fuzz "  # a worker's result lines (whatever else TVM prints is skipped)


# ---------------------------------------------------------------- random tenants
def _stack(rng: random.Random, torch, nn):
    """A random nn.Module and its example input (a random layer stack)."""
    kind = rng.choice(["mlp", "cnn", "cnn", "tokens"])
    batch = rng.randint(1, 3)
    if kind == "tokens":
        return _token_stack(rng, torch, nn, batch)
    if kind == "mlp":
        return _mlp_stack(rng, torch, nn, batch)
    return _cnn_stack(rng, torch, nn, batch)


def _token_stack(rng: random.Random, torch, nn, batch: int):
    """An embedding, a LayerNorm and a Linear layer, and random token ids for them."""
    vocab, dim = rng.randint(5, 40), rng.choice([8, 16])
    layers = [nn.Embedding(vocab, dim), nn.LayerNorm(dim), nn.Linear(dim, rng.randint(3, 20))]
    x = torch.randint(0, vocab, (batch, rng.randint(1, 9)))
    return nn.Sequential(*layers), x


def _mlp_stack(rng: random.Random, torch, nn, batch: int):
    """Linear layers, each followed by an activation or a LayerNorm, maybe a Softmax."""
    layers = []
    width = rng.randint(3, 40)
    x = torch.randn(batch, width)
    for _ in range(rng.randint(1, 4)):
        out = rng.randint(2, 48)
        layers.append(nn.Linear(width, out, bias=rng.random() < 0.8))
        layers.append(
            rng.choice(
                [
                    nn.ReLU(),
                    nn.GELU(),
                    nn.Tanh(),
                    nn.Sigmoid(),
                    nn.LayerNorm(out),
                    nn.Identity(),
                ]
            )
        )
        width = out
    if rng.random() < 0.3:
        layers.append(nn.Softmax(dim=-1))
    return nn.Sequential(*layers), x


def _conv_layer(rng: random.Random, nn, c: int, h: int, w: int):
    """(a random Conv2d over `c` channels of h x w, its channels out, its output h, w)."""
    groups = rng.choice([1, 1, 1, c]) if c > 1 else 1
    out = groups * rng.randint(1, 4) if groups > 1 else rng.randint(1, 16)
    k, stride = rng.choice([1, 3, 3, 5]), rng.choice([1, 1, 2])
    pad, dil = rng.choice([0, k // 2]), rng.choice([1, 1, 2]) if k > 1 else 1
    span = (k - 1) * dil + 1  # the window must fit the padded input
    if span > min(h, w) + 2 * pad:
        k, pad, dil, span = 1, 0, 1, 1
    conv = nn.Conv2d(
        c,
        out,
        k,
        stride=stride,
        padding=pad,
        dilation=dil,
        groups=groups,
        bias=rng.random() < 0.7,
    )
    h, w = (h + 2 * pad - span) // stride + 1, (w + 2 * pad - span) // stride + 1
    return conv, out, h, w


def _cnn_stack(rng: random.Random, torch, nn, batch: int):
    """Conv2d layers (maybe BatchNorm, an activation, a pooling after each), then global
    average pooling and a Linear layer."""
    layers = []
    c, h, w = rng.randint(1, 8), rng.randint(5, 40), rng.randint(5, 40)
    x = torch.randn(batch, c, h, w)
    for _ in range(rng.randint(1, 4)):
        conv, out, h, w = _conv_layer(rng, nn, c, h, w)
        layers.append(conv)
        if rng.random() < 0.4:
            layers.append(nn.BatchNorm2d(out))
        layers.append(rng.choice([nn.ReLU(), nn.Identity(), nn.Sigmoid()]))
        if rng.random() < 0.2 and min(h, w) >= 2:
            ceil = rng.random() < 0.5
            layers.append(rng.choice([nn.MaxPool2d(2, ceil_mode=ceil), nn.AvgPool2d(2)]))
            h, w = (h + 1) // 2 if ceil else h // 2, (w + 1) // 2 if ceil else w // 2
        c = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, rng.randint(2, 10))]
    return nn.Sequential(*layers), x


def _torch_tenant(rng: random.Random, name: str, torch, nn, mtcompile):
    model, x = _stack(rng, torch, nn)
    with torch.no_grad():
        for p in model.parameters():  # seeded, not torch's global generator
            p.copy_(torch.from_numpy(_np_rand(rng, tuple(p.shape))))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.from_numpy(_np_rand(rng, tuple(m.running_mean.shape))))
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    if x.is_floating_point() and rng.random() < 0.1:
        model, x = model.half(), x.half()
    return mtcompile.Tenant(name, model, example_inputs=(x,)), model


def _np_rand(rng: random.Random, shape):
    import numpy as np

    return (np.random.default_rng(rng.randrange(2**32)).standard_normal(shape) * 0.5).astype(
        np.float32
    )


def _onnx_conv(rng: random.Random, n: int, c: int, h: int) -> tuple[list, list, list, list]:
    """(nodes, initializers, input shape, output shape) of a random Conv and activation."""
    from onnx import helper, numpy_helper

    o, k = rng.randint(1, 6), rng.choice([1, 3])
    pads = [rng.randint(0, 1) for _ in range(4)]
    stride = rng.choice([1, 2])
    w = _np_rand(rng, (o, c, k, k))
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["y0"], pads=pads, strides=[stride] * 2),
        helper.make_node(rng.choice(["Relu", "Sigmoid", "Tanh"]), ["y0"], ["y"]),
    ]
    inits = [numpy_helper.from_array(w, "w")]
    oh = (h + pads[0] + pads[2] - k) // stride + 1
    ow = (h + pads[1] + pads[3] - k) // stride + 1
    return nodes, inits, [n, c, h, h], [n, o, oh, ow]


def _onnx_matmul(rng: random.Random, n: int) -> tuple[list, list, list, list]:
    """(nodes, initializers, input shape, output shape) of a random MatMul, Add, Softmax."""
    from onnx import helper, numpy_helper

    f, g = rng.randint(2, 16), rng.randint(2, 16)
    w, b = _np_rand(rng, (f, g)), _np_rand(rng, (g,))
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y0"]),
        helper.make_node("Add", ["y0", "b"], ["y1"]),
        helper.make_node("Softmax", ["y1"], ["y"], axis=rng.choice([-1, 1])),
    ]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    return nodes, inits, [n, f], [n, g]


def _mutate(rng: random.Random, nodes: list, inits: list, xshape: list) -> str | None:
    """Maybe change an attribute, the input's shape or the weight's dtype (in place); which
    one, or None."""
    import numpy as np
    from onnx import numpy_helper

    mutation = rng.choice([None, None, None, "attr", "shape", "dtype"])
    if mutation == "attr":
        node = nodes[0]
        if node.op_type == "Conv":
            node.attribute[0].ints[rng.randrange(4)] = rng.choice([-1, 0, 2, 7])
        else:
            nodes[2].attribute[0].i = rng.choice([-3, 2, 5])
    elif mutation == "shape":
        xshape[rng.randrange(len(xshape))] += rng.choice([-1, 1, 3])
    elif mutation == "dtype":
        inits[0] = numpy_helper.from_array(
            np.asarray(numpy_helper.to_array(inits[0]), dtype=rng.choice([np.float64, np.int64])),
            "w",
        )
    return mutation


def _onnx_tenant(rng: random.Random, name: str, mtcompile):
    """A small ONNX graph (Conv or Gemm/MatMul, activation, Softmax or Transpose), often
    mutated: an attribute, a shape or a dtype changed."""
    from onnx import TensorProto, helper

    n, c, h = rng.randint(1, 2), rng.randint(1, 4), rng.randint(4, 12)
    if rng.random() < 0.5:
        nodes, inits, xshape, yshape = _onnx_conv(rng, n, c, h)
    else:
        nodes, inits, xshape, yshape = _onnx_matmul(rng, n)
    mutation = _mutate(rng, nodes, inits, xshape)
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, xshape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, yshape)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return mtcompile.Tenant(name, model), mutation


def _zoo_tenant(rng: random.Random, name: str, mtcompile):
    """A model of the real-model zoo (`mtcompile.models.hf`), with seeded weights."""
    from mtcompile.models.hf import REAL_ZOO, real_model

    model_name = rng.choice(sorted(REAL_ZOO))
    model, x = real_model(model_name, seed=rng.randrange(1000))
    return mtcompile.Tenant(name, model, example_inputs=x), model_name


def _pipeline(rng: random.Random):
    """A random valid pipeline (the default one, some passes dropped) and options."""
    from mtcompile.passes import DEFAULT_PIPELINE

    passes = [p for p in DEFAULT_PIPELINE if rng.random() < 0.8]
    if "assign-streams" in passes and "plan-memory" not in passes:  # streams need a plan after
        passes.append("plan-memory")
    opts: dict = {}
    if "fuse-horizontal" in passes and rng.random() < 0.5:
        opts["fuse-horizontal"] = {"min_group": 2, "max_group": rng.choice([2, 3, 64])}
    if "assign-streams" in passes and rng.random() < 0.5:
        opts["assign-streams"] = rng.choice(
            [{"policy": "max"}, {"streams": rng.randint(1, 3)}, {"policy": "sequential"}]
        )
    if "plan-memory" in passes and rng.random() < 0.5:
        opts["plan-memory"] = {
            "strategy": rng.choice(["greedy", "naive"]),
            "alignment": rng.choice([16, 64, 256]),
        }
    return passes, opts


def _random_tenants(rng: random.Random, torch, nn, mtcompile) -> tuple[list, list[str]]:
    """(tenants, a note on each): 2 or 3 torch stacks, ONNX graphs or an earlier module
    under another name."""
    tenants, notes = [], []
    for i in range(rng.randint(2, 3)):
        r = rng.random()
        if r < 0.2 and tenants and isinstance(tenants[-1].model, nn.Module):
            prev = tenants[-1]  # the same module (shared weights) under another name
            tenants.append(
                mtcompile.Tenant(f"t{i}", prev.model, example_inputs=prev.example_inputs)
            )
            notes.append("shared")
        elif r < 0.35:
            t, mutation = _onnx_tenant(rng, f"t{i}", mtcompile)
            tenants.append(t)
            notes.append(f"onnx:{mutation}")
        else:
            t, _ = _torch_tenant(rng, f"t{i}", torch, nn, mtcompile)
            tenants.append(t)
            notes.append("torch")
    return tenants, notes


def _outcome(desc: dict, tenants: list, passes: list[str], opts: dict, mtcompile) -> dict:
    """Compile and verify the case `desc` describes: matched, mismatched, refused (an
    MTCompileError) or an error (anything else, a bug)."""
    from mtcompile.errors import MTCompileError

    try:
        bundle = mtcompile.compile(tenants, passes=passes, pass_options=opts)
        with warnings.catch_warnings():  # near-zero outputs of random stacks: noted below
            warnings.simplefilter("ignore")
            result = bundle.verify()  # float32: 1e-4 of each output's scale
    except MTCompileError as e:
        return {
            **desc,
            "outcome": "refused",
            "error": type(e).__name__,
            "message": str(e).splitlines()[0][:160],
        }
    except Exception as e:  # noqa: BLE001 - anything else is a bug the fuzzer reports
        return {
            **desc,
            "outcome": "error",
            "error": type(e).__name__,
            "message": str(e).splitlines()[0][:300] if str(e) else "",
        }
    return {
        **desc,
        "outcome": "match" if result["ok"] else "mismatch",
        **({} if result["ok"] else {"detail": json.dumps(result, default=str)[:600]}),
    }


def case(seed: int, index: int) -> dict:
    """Draw, compile and check one case; its outcome."""
    import torch
    from torch import nn

    import mtcompile

    rng = random.Random(seed * 1_000_003 + index)
    torch.manual_seed(rng.randrange(2**31))
    tenants, notes = _random_tenants(rng, torch, nn, mtcompile)
    # a real architecture now and then, drawn apart so that the random stacks of a case
    # stay what they were before the zoo joined
    zoo = random.Random(f"zoo:{seed}:{index}")
    if zoo.random() < 0.15:
        t, model_name = _zoo_tenant(zoo, f"t{len(tenants)}", mtcompile)
        tenants.append(t)
        notes.append(f"zoo:{model_name}")
    passes, opts = _pipeline(rng)
    desc = {"seed": seed, "case": index, "tenants": notes, "passes": passes, "options": opts}
    return _outcome(desc, tenants, passes, opts, mtcompile)


def _worker(seed: int, start: int, stop: int) -> None:
    """Run cases [start, stop), one JSON line each (``{"start": i}`` before each)."""
    import warnings

    warnings.filterwarnings("ignore")
    for i in range(start, stop):
        print(_MARK + json.dumps({"start": i}), flush=True)
        print(_MARK + json.dumps(case(seed, i), default=str), flush=True)


def _spawn_worker(seed: int, start: int, count: int) -> subprocess.Popen:
    """A worker process that runs cases [start, count) of `seed`, its results on stdout."""
    cmd = [sys.executable, "-m", "mtcompile.fuzz", "--worker", str(seed), str(start), str(count)]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "TVM_LOG_DEBUG": "0"},
    )


def _outcome_line(msg: dict) -> str:
    """The progress line of a case's outcome (its error too, unless it matched)."""
    return f"case {msg['case']}: {msg['outcome']}" + (
        f" ({msg.get('error')}: {msg.get('message', '')[:100]})"
        if msg["outcome"] != "match"
        else ""
    )


def _follow(proc, seed: int, count: int, timeout: float, results: list, progress) -> int:
    """Add a worker's outcomes to `results` until it ends, crashes or hangs (then killed,
    and that case noted); returns the next case to run."""
    import selectors

    current, last = None, time.monotonic()
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    while True:
        if not sel.select(timeout=1.0):
            if current is not None and time.monotonic() - last > timeout:
                proc.kill()
                proc.wait()
                results.append({"seed": seed, "case": current, "outcome": "hang"})
                progress(f"case {current}: hang (> {timeout:.0f} s)")
                nxt = current + 1
                break
            continue
        line = proc.stdout.readline()
        if not line:  # the worker ended: done, or died during `current`
            rc = proc.wait()
            if current is not None:
                results.append(
                    {"seed": seed, "case": current, "outcome": "crash", "returncode": rc}
                )
                progress(f"case {current}: crash (exit {rc})")
                nxt = current + 1
            else:
                nxt = count
            break
        if not line.startswith(_MARK):
            continue
        msg = json.loads(line[len(_MARK) :])
        if "start" in msg:
            current, last = msg["start"], time.monotonic()
            continue
        results.append(msg)
        progress(_outcome_line(msg))
        current = None
    sel.close()
    return nxt


def run(seed: int, count: int, timeout: float = 300.0, progress=print) -> list[dict]:
    """Every case's outcome, each run in a worker process (restarted after a crash or hang)."""
    results: list[dict] = []
    nxt = 0
    while nxt < count:
        proc = _spawn_worker(seed, nxt, count)
        nxt = _follow(proc, seed, count, timeout, results, progress)
    return results


def summary(results: list[dict]) -> dict:
    """Counts by outcome, refusals by error class, and the bugs."""
    refused = [r for r in results if r["outcome"] == "refused"]
    return {
        "cases": len(results),
        "outcomes": dict(Counter(r["outcome"] for r in results)),
        "refused_by": dict(Counter(r.get("error") for r in refused)),
        "internal": [r for r in refused if r.get("error") in INTERNAL],
        "bugs": [r for r in results if r["outcome"] in BUGS],
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        _worker(*(int(a) for a in argv[1:4]))
        return 0
    ap = argparse.ArgumentParser(
        prog="python -m mtcompile.fuzz", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per case")
    ap.add_argument("--json", help="write every case's outcome and the summary here")
    args = ap.parse_args(argv)
    results = run(
        args.seed,
        args.count,
        args.timeout,
        progress=lambda m: print(m, file=sys.stderr, flush=True),
    )
    s = summary(results)
    print(
        json.dumps(
            {k: v for k, v in s.items() if k not in ("bugs", "internal")}
            | {"internal": len(s["internal"]), "bugs": len(s["bugs"])}
        )
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": s, "cases": results}, f, indent=1, default=str)
    return 1 if s["bugs"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
