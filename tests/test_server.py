"""`mtcompile serve` (MLServer, KServe v2 protocol) with a real client: the server runs in a
subprocess on 127.0.0.1, `tritonclient.http` (and gRPC, through MLServer's own stubs of the
protocol: tritonclient's gRPC client needs an older protobuf) calls it from this process's
threads, and every answer is checked against PyTorch. Ordering is arranged through the scheduler (a window that
closes only when every tenant has a request, or at shutdown) and read back from its metrics,
never with sleeps; every wait is bounded."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import seeded_input, tiny_tenants, torch_outputs

pytest.importorskip("mlserver", reason="the `serve` extra is not installed")
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402

# two `mtcompile serve` subprocesses (MLServer's start takes seconds each on 2 cores)
pytestmark = pytest.mark.slow

WAIT = 120  # seconds any wait lasts at most
TOL = {"atol": 1e-5, "rtol": 1e-5}
MODULES = {t.name: t.model for t in tiny_tenants()}
SHAPES = {"lin": (2, 8), "conv": (1, 3, 8, 8), "multi": (3, 5)}
INPUT = {"lin": "x", "conv": "x", "multi": "x"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mtcompile serve DIR` in a subprocess, ready when `start` returns."""

    def __init__(self, bundle_dir, *flags: str):
        self.port, grpc = free_port(), free_port()
        self.url, self.grpc_url = f"127.0.0.1:{self.port}", f"127.0.0.1:{grpc}"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mtcompile",
                "serve",
                str(bundle_dir),
                "--port",
                str(self.port),
                "--grpc-port",
                str(grpc),
                "--threads",
                "1",
                *flags,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        client = httpclient.InferenceServerClient(self.url)
        deadline = time.monotonic() + WAIT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited: {self.proc.stdout.read()[-3000:]}")
            try:
                if client.is_server_ready():
                    break
            except Exception:  # not listening yet
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
        client.close()

    def metrics(self) -> dict:
        with urllib.request.urlopen(f"http://{self.url}/mtcompile/metrics", timeout=WAIT) as r:
            return json.load(r)

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return self.proc.returncode, out


@pytest.fixture(scope="module")
def server(tiny_saved):
    """The tiny bundle served with the default 2 ms window."""
    s = Server(tiny_saved)
    yield s
    s.stop()


def infer(url: str, tenant: str, x: np.ndarray, client=None):
    """One v2 inference of `tenant` on `x` (JSON tensors): its outputs, in order."""
    own = client is None
    client = client or httpclient.InferenceServerClient(url, network_timeout=WAIT)
    try:
        inp = httpclient.InferInput(INPUT[tenant], list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=False)
        meta = client.get_model_metadata(tenant)
        names = [o["name"] for o in meta["outputs"]]
        res = client.infer(
            tenant,
            [inp],
            outputs=[httpclient.InferRequestedOutput(n, binary_data=False) for n in names],
        )
        return [res.as_numpy(n) for n in names]
    finally:
        if own:
            client.close()


def check(tenant: str, x: np.ndarray, got: list[np.ndarray]) -> None:
    import torch

    want = torch_outputs(MODULES[tenant], (torch.from_numpy(x),))
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, (tenant, g.shape, g.dtype, w.dtype)
        np.testing.assert_allclose(g, w, **TOL)


def sample(tenant: str, seed: int) -> np.ndarray:
    return seeded_input(seed, *SHAPES[tenant]).numpy()


def test_health_metadata_and_each_tenant_against_pytorch(server):
    c = httpclient.InferenceServerClient(server.url)
    assert c.is_server_live() and c.is_server_ready()
    assert all(c.is_model_ready(t) for t in MODULES)
    assert not c.is_model_ready("nope")
    meta = c.get_model_metadata("conv")
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [1, 3, 8, 8]}]
    assert [o["datatype"] for o in c.get_model_metadata("multi")["outputs"]] == [
        "FP32",
        "FP32",
        "INT64",
    ]
    for i, t in enumerate(MODULES):
        x = sample(t, i)
        check(t, x, infer(server.url, t, x, c))
    c.close()


def grpc_infer(stub, tenant: str, x: np.ndarray) -> list[np.ndarray]:
    """One v2 inference over gRPC (MLServer's own stubs of the protocol): the outputs."""
    from mlserver.grpc import dataplane_pb2 as pb

    tensor = pb.ModelInferRequest.InferInputTensor(
        name=INPUT[tenant],
        datatype="FP32",
        shape=list(x.shape),
        contents=pb.InferTensorContents(fp32_contents=x.ravel().tolist()),
    )
    res = stub.ModelInfer(pb.ModelInferRequest(model_name=tenant, inputs=[tensor]), timeout=WAIT)
    dtypes = {"FP32": (np.float32, "fp32_contents"), "INT64": (np.int64, "int64_contents")}
    outs = []
    for i, o in enumerate(res.outputs):
        dtype, field = dtypes[o.datatype]
        flat = (
            np.frombuffer(res.raw_output_contents[i], dtype)
            if res.raw_output_contents
            else np.asarray(getattr(o.contents, field), dtype)
        )
        outs.append(flat.reshape(tuple(o.shape)))
    return outs


def test_grpc_each_tenant_against_pytorch_and_a_bad_shape(server):
    import grpc
    from mlserver.grpc import dataplane_pb2 as pb
    from mlserver.grpc import dataplane_pb2_grpc as rpc

    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = rpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=WAIT).live
        assert stub.ModelReady(pb.ModelReadyRequest(name="conv"), timeout=WAIT).ready
        for i, t in enumerate(MODULES):
            x = sample(t, 300 + i)
            check(t, x, grpc_infer(stub, t, x))
        with pytest.raises(grpc.RpcError) as bad:
            grpc_infer(stub, "lin", np.zeros((2, 9), np.float32))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "expected float32[2, 8], got float32[2, 9]" in bad.value.details()
        x = sample("lin", 8)
        check("lin", x, grpc_infer(stub, "lin", x))  # still serving


def test_concurrent_clients_on_several_tenants(server):
    before = server.metrics()["tenants"]
    per_client, jobs = 8, [(t, k) for t in MODULES for k in range(2)]

    def client_loop(t: str, k: int) -> int:
        c = httpclient.InferenceServerClient(server.url, network_timeout=WAIT)
        for i in range(per_client):
            x = sample(t, 1000 * k + i)
            check(t, x, infer(server.url, t, x, c))
        c.close()
        return per_client

    with ThreadPoolExecutor(len(jobs)) as pool:
        assert sum(pool.map(lambda j: client_loop(*j), jobs)) == len(jobs) * per_client
    after = server.metrics()["tenants"]
    for t in MODULES:
        assert after[t]["done"] - before[t]["done"] == 2 * per_client
        assert after[t]["failed"] == before[t]["failed"]


def test_bad_requests_get_the_protocols_error_and_leave_others_alone(server):
    c = httpclient.InferenceServerClient(server.url)
    failed = server.metrics()["tenants"]["lin"]["failed"]
    with ThreadPoolExecutor(2) as pool:  # good requests of two tenants meanwhile
        good = [
            pool.submit(lambda t=t, i=i: (t, x := sample(t, 50 + i), infer(server.url, t, x)))
            for i in range(4)
            for t in ("lin", "conv")
        ]
        with pytest.raises(InferenceServerException) as wrong_shape:
            infer(server.url, "lin", np.zeros((2, 9), np.float32), c)
        with pytest.raises(InferenceServerException) as unknown:
            c.infer(
                "nope",
                [
                    httpclient.InferInput("x", [2, 8], "FP32").set_data_from_numpy(
                        np.zeros((2, 8), np.float32), binary_data=False
                    )
                ],
            )
        with pytest.raises(InferenceServerException) as wrong_name:
            inp = httpclient.InferInput("y", [2, 8], "FP32")
            inp.set_data_from_numpy(np.zeros((2, 8), np.float32), binary_data=False)
            c.infer("lin", [inp])
        for f in good:
            check(*f.result(timeout=WAIT))
    assert wrong_shape.value.status() == "400"
    assert wrong_shape.value.message() == (
        "tenant 'lin', input 'x': expected float32[2, 8], "
        "got float32[2, 9] (signature: x: float32[2, 8])"
    )
    assert unknown.value.status() == "404" and "nope" in unknown.value.message()
    assert wrong_name.value.status() == "400"
    assert "takes inputs ['x']; the request has ['y']" in wrong_name.value.message()
    assert server.metrics()["tenants"]["lin"]["failed"] == failed + 1  # the wrong shape
    x = sample("lin", 7)
    check("lin", x, infer(server.url, "lin", x, c))  # the server still serves
    c.close()


def test_merged_calls_then_shutdown_loses_no_accepted_request(tiny_saved):
    """A window that only a full set of tenants (or shutdown) closes: rounds of one request
    per tenant are each one merged ``run_all``; requests of two tenants then wait in the
    scheduler until SIGTERM, and every one of them is answered before the server exits."""
    s = Server(tiny_saved, "--max-delay-ms", "600000")
    try:
        rounds = 3
        with ThreadPoolExecutor(len(MODULES)) as pool:
            for r in range(rounds):
                xs = {t: sample(t, 100 * r + i) for i, t in enumerate(MODULES)}
                done = {t: pool.submit(infer, s.url, t, xs[t]) for t in MODULES}
                for t, f in done.items():
                    check(t, xs[t], f.result(timeout=WAIT))
        m = s.metrics()
        assert m["calls"] == {"run_all": rounds}
        assert all(m["tenants"][t]["calls"] == {"run_all": rounds} for t in MODULES)

        pending = [(t, sample(t, 900 + i)) for i in range(3) for t in ("lin", "conv")]
        with ThreadPoolExecutor(len(pending)) as pool:
            futures = [pool.submit(infer, s.url, t, x) for t, x in pending]
            deadline = time.monotonic() + WAIT
            while sum(q["queue_depth"] for q in s.metrics()["tenants"].values()) < len(pending):
                assert time.monotonic() < deadline, s.metrics()
                time.sleep(0.05)
            code, out = s.stop()
            for (t, x), f in zip(pending, futures, strict=True):
                check(t, x, f.result(timeout=WAIT))
        assert code == 0, out[-3000:]
        with pytest.raises(Exception):  # noqa: B017 (refused: nothing listens any more)
            infer(s.url, "lin", sample("lin", 0))
    finally:
        s.stop()
