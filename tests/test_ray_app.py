"""Ray Serve scale-out (`mtcompile.serving.ray_app`): a local Ray cluster started here, bound to
127.0.0.1 with no dashboard, runs two replicas of the tiny bundle behind one endpoint; a
bounded set of v2 JSON requests gets PyTorch's outputs, a bad one the protocol's error, and
the cluster is shut down. Skipped where the `ray` extra is not installed."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest
from conftest import seeded_input, tiny_tenants, torch_outputs

# Ray replaces 127.0.0.1 with the machine's outward address unless told that this is no
# cluster (the flag's name is historical); read when ray is imported, and by `ray start`
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
os.environ.update(LOOPBACK)
ray = pytest.importorskip("ray", reason="the `ray` extra (ray[serve]) is not installed")
serve = pytest.importorskip("ray.serve")

pytestmark = pytest.mark.slow  # starts a Ray cluster (head, controller, proxy, 2 replicas)

WAIT = 120
SHAPES = {"lin": (2, 8), "conv": (1, 3, 8, 8), "multi": (3, 5)}
MODULES = {t.name: t.model for t in tiny_tenants()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), method="POST", headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=WAIT) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


@pytest.fixture(scope="module")
def cluster(tiny_saved):
    from mtcompile.serving.ray_app import app

    env = dict(os.environ, **LOOPBACK)  # 127.0.0.1 only; no usage stats
    gcs = free_port()
    head = [
        os.path.join(os.path.dirname(sys.executable), "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--num-cpus=2",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    subprocess.run(head, env=env, check=True, timeout=5 * WAIT, capture_output=True)
    port = free_port()
    try:
        ray.init(address=f"127.0.0.1:{gcs}", _node_ip_address="127.0.0.1", log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(
            app(tiny_saved, num_replicas=2, num_cpus=0.5, bind_host="127.0.0.1"),
            name="tiny",
            route_prefix="/",
        )
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        subprocess.run([head[0], "stop", "--force"], env=env, timeout=WAIT, capture_output=True)


def test_two_replicas_answer_as_pytorch(cluster):
    status = serve.status().applications["tiny"]
    assert status.status == "RUNNING"
    (dep,) = status.deployments.values()
    assert dep.replica_states == {"RUNNING": 2}
    with urllib.request.urlopen(f"{cluster}/v2/health/ready", timeout=WAIT) as r:
        assert json.load(r)["ready"] is True
    with urllib.request.urlopen(f"{cluster}/v2/models/multi", timeout=WAIT) as r:
        assert [o["datatype"] for o in json.load(r)["outputs"]] == ["FP32", "FP32", "INT64"]

    def one(job: tuple[str, int]) -> str:
        t, seed = job
        x = seeded_input(seed, *SHAPES[t])
        code, body = post(
            f"{cluster}/v2/models/{t}/infer",
            {
                "inputs": [
                    {
                        "name": "x",
                        "shape": list(x.shape),
                        "datatype": "FP32",
                        "data": x.numpy().ravel().tolist(),
                    }
                ]
            },
        )
        assert code == 200, body
        want = torch_outputs(MODULES[t], (x,))
        for out, w in zip(body["outputs"], want, strict=True):
            got = np.asarray(out["data"], dtype=w.dtype).reshape(out["shape"])
            assert got.shape == w.shape
            np.testing.assert_allclose(got, w, atol=1e-5, rtol=1e-5)
        return body["parameters"]["replica"]  # host:pid of the replica that answered

    # every socket the cluster listens on is on loopback (head, raylet, proxy, replicas)
    ray_pids = {
        p.pid
        for p in psutil.process_iter(["name", "cmdline"])
        if "ray" in " ".join(p.info["cmdline"] or [])
        or (p.info["name"] or "").startswith(("ray::", "gcs_server", "raylet"))
    }
    listening = {
        (c.pid, c.laddr.ip)
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.pid in ray_pids
    }
    assert listening and all(
        ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for _, ip in listening
    ), listening

    jobs = [(t, 10 * i + k) for i in range(8) for k, t in enumerate(SHAPES)]
    start = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        replicas = list(pool.map(one, jobs))
    assert len(replicas) == len(jobs) and time.monotonic() - start < WAIT
    code, body = post(
        f"{cluster}/v2/models/lin/infer",
        {"inputs": [{"name": "x", "shape": [2, 9], "datatype": "FP32", "data": [0.0] * 18}]},
    )
    assert code == 400 and "expected float32[2, 8], got float32[2, 9]" in body["detail"]
    code, body = post(f"{cluster}/v2/models/nope/infer", {"inputs": []})
    assert code == 404 and "unknown tenant 'nope'" in body["detail"]
