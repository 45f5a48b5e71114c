"""CI's serving-host check: a bundle saved by the full install runs in a base install (no torch)
with the full install's outputs, importing neither tvm (the compiler) nor torch.

    python .ci/serving_check.py save BUNDLE REF.npz    # in the full install: inputs + outputs
    python .ci/serving_check.py check BUNDLE REF.npz   # in the serving install: compare
    python .ci/serving_check.py serve BUNDLE REF.npz   # with the `serve` extra: `mtcompile
        serve` on 127.0.0.1 answers each tenant's v2 request with the same outputs
"""

from __future__ import annotations

import sys

import numpy as np

import mtcompile
from mtcompile.runtime.inputs import seeded_inputs


def save(bundle_dir: str, ref: str) -> None:
    import torch  # noqa: F401  (the full install: torch and the compiler loaded too)
    import tvm  # noqa: F401

    b = mtcompile.load(bundle_dir)
    inputs = {t: seeded_inputs(b.signature(t), i) for i, t in enumerate(b.tenant_names)}
    out = b.run_all(inputs)
    np.savez(
        ref,
        **{f"in.{t}.{i}": a for t, xs in inputs.items() for i, a in enumerate(xs)},
        **{f"out.{t}.{i}": a for t, xs in out.items() for i, a in enumerate(xs)},
    )


def check(bundle_dir: str, ref: str) -> None:
    z = np.load(ref)
    b = mtcompile.load(bundle_dir)
    inputs = {
        t: [z[f"in.{t}.{i}"] for i in range(len(b.signature(t).inputs))] for t in b.tenant_names
    }
    got = b.run_all(inputs)
    for t in b.tenant_names:
        alone = b.run(t, *inputs[t])
        for i, (a, r) in enumerate(zip(got[t], alone, strict=True)):
            np.testing.assert_array_equal(a, z[f"out.{t}.{i}"], err_msg=f"run_all: {t} {i}")
            np.testing.assert_array_equal(r, z[f"out.{t}.{i}"], err_msg=f"run: {t} {i}")
    _check_driver(bundle_dir, b, inputs, z)
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tvm", "torch"))
    if heavy:
        raise SystemExit(f"the serving install imported {heavy[:5]}")
    fp = b.footprint()
    print(
        f"serving install: {b.manifest.name} ({len(b.tenant_names)} tenants) ran with the "
        f"full install's outputs; resident runtime {fp['runtime'] >> 20} MiB, code "
        f"{fp['code'] >> 10} KiB, weights {fp['weights'] >> 10} KiB, arena "
        f"{(fp['arena'] or 0) >> 10} KiB"
    )


def _check_driver(bundle_dir: str, b, inputs, z) -> None:
    """mtcompile-run, as installed (prebuilt), runs each tenant with the same outputs."""
    import subprocess
    import tempfile
    from pathlib import Path

    from mtcompile import driver

    with tempfile.TemporaryDirectory() as d:
        ins, outs = Path(d) / "in", Path(d) / "out"
        ins.mkdir()
        outs.mkdir()
        for t in b.tenant_names:
            for io, a in zip(b.manifest.tenants[t].inputs, inputs[t], strict=True):
                np.save(ins / f"{t}.{io.name}.npy", a)
            res = subprocess.run(
                driver.command(bundle_dir, t, ins, outs), capture_output=True, text=True
            )
            if res.returncode != 0:
                raise SystemExit(f"mtcompile-run {t}: exit {res.returncode}: {res.stderr}")
            for i, io in enumerate(b.manifest.tenants[t].outputs):
                got = np.load(outs / io.file)
                np.testing.assert_array_equal(got, z[f"out.{t}.{i}"], err_msg=f"driver: {t} {i}")
    print(f"mtcompile-run ({driver.build()}) ran each tenant with the same outputs")


def serve(bundle_dir: str, ref: str) -> None:
    import json
    import os
    import signal
    import socket
    import subprocess
    import time
    import urllib.request

    z = np.load(ref)
    b = mtcompile.load(bundle_dir)
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    exe = os.path.join(os.path.dirname(sys.executable), "mtcompile")
    proc = subprocess.Popen(
        [exe, "serve", bundle_dir, "--port", str(ports[0]), "--grpc-port", str(ports[1])],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{ports[0]}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"mtcompile serve did not start: {proc.stdout.read()[-2000:]}")
            time.sleep(0.2)
        for t in b.tenant_names:
            sig = b.signature(t)
            body = {
                "inputs": [
                    {
                        "name": s.name,
                        "shape": list(z[f"in.{t}.{i}"].shape),
                        "datatype": {"float32": "FP32", "int64": "INT64"}[s.dtype],
                        "data": z[f"in.{t}.{i}"].ravel().tolist(),
                    }
                    for i, s in enumerate(sig.inputs)
                ]
            }
            req = urllib.request.Request(
                f"{url}/v2/models/{t}/infer",
                json.dumps(body).encode(),
                {"content-type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=60) as r:
                outs = json.load(r)["outputs"]
            for i, o in enumerate(outs):
                want = z[f"out.{t}.{i}"]
                got = np.asarray(o["data"], want.dtype).reshape(o["shape"])
                np.testing.assert_array_equal(got, want, err_msg=f"serve: {t} {i}")
        with open(f"/proc/{proc.pid}/status") as f:
            rss = next(int(x.split()[1]) for x in f if x.startswith("VmRSS"))
        proc.send_signal(signal.SIGTERM)
        if proc.wait(timeout=60) != 0:
            raise SystemExit(f"mtcompile serve exited {proc.returncode}")
    finally:
        if proc.poll() is None:
            proc.kill()
    print(
        f"serving install + serve extra: `mtcompile serve` answered {len(b.tenant_names)} "
        f"tenants over HTTP with the full install's outputs; resident {rss >> 10} MiB"
    )


if __name__ == "__main__":
    {"save": save, "check": check, "serve": serve}[sys.argv[1]](sys.argv[2], sys.argv[3])
