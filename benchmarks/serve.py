"""Serving under independent per-tenant traffic: open-loop Poisson arrivals per tenant (equal
or skewed mix) at a sweep of total rates against three contenders behind the same scheduler:
(a) `merged` (the bundle: windows of several tenants become one merged call), (b) `entries`
(the bundle, each tenant's own entry only) and (c) `onnxruntime` (one session per tenant).
Reports throughput, p50/p99 latency (arrival to answer) and, per contender and mix, the
highest offered rate whose p99 stays under the target with nothing rejected or lost.

    python -m benchmarks.serve OUT/ --set heterogeneous --via inproc --rates 20,50,100,200 \
        --duration 5 --p99-ms 50 -o serve.md

`--via inproc` submits to a `Scheduler` in this process (isolates the scheduler); `--via
http` starts `mtcompile.serving.server` (MLServer, KServe v2 JSON) per contender in a
subprocess on 127.0.0.1 and sends the requests over HTTP (what users see). Every trial is
bounded by `--duration` seconds and `--max-requests` arrivals; the answers it still waits
for after `--drain` seconds count as lost. The onnxruntime contender needs the `compile` and
`verify` extras (the tenants are exported to ONNX), the http mode the `serve` extra.
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

import mtcompile
from mtcompile.runtime.inputs import seeded_inputs

CONTENDERS = ("merged", "entries", "onnxruntime")
V2 = {"float32": "FP32", "float64": "FP64", "int64": "INT64", "int32": "INT32", "bool": "BOOL"}


# --------------------------------------------------------------------------- the contenders
class OrtBundle:
    """One onnxruntime session per tenant, with the bundle's manifest (same signatures): what
    the scheduler calls `run` and `run_all` run session by session."""

    def __init__(self, bundle, set_name: str):
        from benchmarks.run import ort_sessions, torch_twins
        from mtcompile.models import get_set

        tenants = get_set(set_name)
        self.manifest = bundle.manifest
        self._sessions = {
            t: s for t, (s, _) in ort_sessions(tenants, torch_twins(set_name, tenants, 1)).items()
        }

    def run(self, tenant: str, *arrays):
        sess = self._sessions[tenant]
        feed = {i.name: a for i, a in zip(sess.get_inputs(), arrays, strict=True)}
        return sess.run(None, feed)

    def run_all(self, inputs: dict, *args, **kwargs) -> dict:
        return {t: self.run(t, *xs) for t, xs in inputs.items()}

    run_some = run_all


def backend(name: str, bundle_dir: str, set_name: str, threads: int | None):
    bundle = mtcompile.load(bundle_dir, threads=threads)
    if name == "onnxruntime":
        return OrtBundle(bundle, set_name)
    if name == "entries":
        from mtcompile.serving.server import EntriesOnly

        return EntriesOnly(bundle)
    return bundle


# --------------------------------------------------------------------------- the senders
class InProc:
    """Requests submitted to a scheduler in this process."""

    def __init__(self, be, max_delay_ms: float, max_queue: int):
        from mtcompile.serving import Scheduler

        self.scheduler = Scheduler(be, max_delay_ms, max_queue)

    def send(self, tenant: str, arrays) -> Future:
        return self.scheduler.submit(tenant, *arrays)

    def close(self) -> None:
        self.scheduler.close(drain=True, timeout=30)


class Http:
    """`mtcompile.serving.server` in a subprocess; requests as v2 JSON from a thread pool
    (one keep-alive connection per thread), so that arrivals never wait for answers."""

    def __init__(self, contender: str, args):
        self.port = _free_port()
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.serve",
            args.bundle,
            "--child",
            contender,
            "--port",
            str(self.port),
            "--set",
            args.set,
            "--max-delay-ms",
            str(args.max_delay_ms),
            "--max-queue",
            str(args.max_queue),
        ]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.pool = ThreadPoolExecutor(args.clients)
        self.local = threading.local()
        deadline = time.monotonic() + 600
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the {contender} server did not start: "
                    f"{self.proc.stderr.read().decode()[-2000:]}"
                )
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            c.request("GET", "/v2/health/ready")
            return c.getresponse().status == 200
        except OSError:
            return False

    def _post(self, tenant: str, body: bytes) -> int:
        c = getattr(self.local, "conn", None)
        if c is None:
            c = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        c.request("POST", f"/v2/models/{tenant}/infer", body, {"content-type": "application/json"})
        r = c.getresponse()
        r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}")
        return r.status

    def send(self, tenant: str, body: bytes) -> Future:
        return self.pool.submit(self._post, tenant, body)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def v2_body(sig, arrays) -> bytes:
    return json.dumps(
        {
            "inputs": [
                {
                    "name": s.name,
                    "shape": list(a.shape),
                    "datatype": V2[str(a.dtype)],
                    "data": a.ravel().tolist(),
                }
                for s, a in zip(sig.inputs, arrays, strict=True)
            ]
        }
    ).encode()


# --------------------------------------------------------------------------- one trial
def arrivals(rates: dict[str, float], duration: float, cap: int, seed: int):
    """Poisson arrivals per tenant, merged in time order: [(t_seconds, tenant)]."""
    rng = np.random.default_rng(seed)
    out = []
    for tenant, rate in rates.items():
        if rate <= 0:
            continue
        gaps = rng.exponential(1.0 / rate, size=int(rate * duration * 1.5) + 16)
        times = np.cumsum(gaps)
        out += [(float(t), tenant) for t in times[times < duration]]
    return sorted(out)[:cap]


def trial(sender, payloads: dict, rates: dict[str, float], args, seed: int) -> dict:
    """Send one schedule of arrivals; latency is from each request's scheduled arrival."""
    plan = arrivals(rates, args.duration, args.max_requests, seed)
    lat: list[float] = []
    errors = {"rejected": 0, "failed": 0}
    lock = threading.Lock()
    pending = []
    t0 = time.perf_counter()

    def done(at: float, f: Future) -> None:
        with lock:
            if f.exception() is None:
                lat.append(time.perf_counter() - at)
            else:
                errors["failed"] += 1

    for at, tenant in plan:
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        try:
            f = sender.send(tenant, payloads[tenant])
        except Exception:  # a full queue
            errors["rejected"] += 1
            continue
        f.add_done_callback(lambda f, a=t0 + at: done(a, f))
        pending.append(f)
    deadline = time.perf_counter() + args.drain
    for f in pending:
        left = deadline - time.perf_counter()
        if left <= 0:
            break
        try:
            f.result(timeout=left)
        except Exception:
            pass
    end = time.perf_counter()
    with lock:
        ms = np.asarray(lat) * 1e3
        lost = len(pending) - len(lat) - errors["failed"]
        return {
            "offered": sum(rates.values()),
            "sent": len(plan),
            "done": len(lat),
            "throughput": len(lat) / (end - t0),
            "lost": lost,
            **errors,
            "p50": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
            "p99": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
        }


def mix_rates(tenants: list[str], mix: str, total: float) -> dict[str, float]:
    """equal: the same rate each; skewed: the first tenant 70%, the rest share 30%."""
    if mix == "equal" or len(tenants) == 1:
        return {t: total / len(tenants) for t in tenants}
    rest = 0.3 * total / (len(tenants) - 1)
    return {t: (0.7 * total if i == 0 else rest) for i, t in enumerate(tenants)}


# --------------------------------------------------------------------------- the table
def table(rows: list[dict], args, command: str) -> str:
    lines = [
        f"# serve: {args.bundle} ({args.via}, window {args.max_delay_ms} ms, "
        f"{args.duration} s per trial, p99 target {args.p99_ms} ms)",
        "",
        f"`{command}`",
        "",
        "| mix | contender | offered req/s | sent | done | throughput req/s | p50 ms | "
        "p99 ms | rejected | failed | lost |",
        "|---" * 11 + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mix']} | {r['contender']} | {r['offered']:.0f} | {r['sent']} | "
            f"{r['done']} | {r['throughput']:.1f} | {r['p50']:.2f} | {r['p99']:.2f} | "
            f"{r['rejected']} | {r['failed']} | {r['lost']} |"
        )
    lines += [
        "",
        "| mix | contender | sustainable req/s: the highest offered rate below the "
        "first that misses the p99 target or drops a request |",
        "|---|---|---|",
    ]
    for mix in args.mixes:
        for c in args.contenders:
            best = None
            for r in sorted(
                (r for r in rows if r["mix"] == mix and r["contender"] == c),
                key=lambda r: r["offered"],
            ):
                if r["p99"] > args.p99_ms or r["rejected"] + r["failed"] + r["lost"]:
                    break
                best = r["offered"]
            lines.append(
                f"| {mix} | {c} | {best:.0f} |"
                if best is not None
                else f"| {mix} | {c} | below the lowest rate tried |"
            )
    return "\n".join(lines) + "\n"


def run(args) -> list[dict]:
    rows = []
    for contender in args.contenders:
        if args.via == "http":
            sender = Http(contender, args)
            bundle = mtcompile.load(args.bundle, threads=1)  # signatures and inputs only
        else:
            be = backend(contender, args.bundle, args.set, args.threads)
            sender, bundle = InProc(be, args.max_delay_ms, args.max_queue), be
        m = bundle.manifest
        inputs = {t: seeded_inputs(m.tenants[t], i) for i, t in enumerate(m.tenant_order)}
        payloads = (
            {t: v2_body(m.tenants[t], xs) for t, xs in inputs.items()}
            if args.via == "http"
            else inputs
        )
        try:
            for mix in args.mixes:
                for k, total in enumerate(args.rates):
                    r = trial(
                        sender, payloads, mix_rates(list(m.tenant_order), mix, total), args, seed=k
                    )
                    rows.append({"mix": mix, "contender": contender, **r})
                    print(
                        f"{mix:7s} {contender:12s} {total:7.0f} req/s: {r['throughput']:7.1f} "
                        f"done/s  p50 {r['p50']:7.2f} ms  p99 {r['p99']:8.2f} ms  "
                        f"rejected {r['rejected']} failed {r['failed']} lost {r['lost']}",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            sender.close()
    return rows


def overhead(args) -> str:
    """--overhead N: N requests one at a time (closed loop, one client) per tenant, through
    the scheduler in this process and through the HTTP server: the server's cost per
    request (MLServer, JSON, loopback) is the difference of the medians."""
    be = backend("merged", args.bundle, args.set, args.threads)
    m = be.manifest
    inputs = {t: seeded_inputs(m.tenants[t], i) for i, t in enumerate(m.tenant_order)}
    inproc = InProc(be, 0.0, args.max_queue)
    args.clients = 1
    web = Http("merged", argparse.Namespace(**{**vars(args), "max_delay_ms": 0.0}))
    lines = [
        "| tenant | in-process p50 ms | HTTP p50 ms | server overhead ms |",
        "|---|---|---|---|",
    ]
    try:
        for t, xs in inputs.items():
            body = v2_body(m.tenants[t], xs)
            med = []
            for send, payload in ((inproc, xs), (web, body)):
                times = []
                for _ in range(args.overhead):
                    start = time.perf_counter()
                    send.send(t, payload).result(timeout=60)
                    times.append(time.perf_counter() - start)
                med.append(float(np.median(times[len(times) // 10 :])) * 1e3)  # warm-up out
            lines.append(f"| {t} | {med[0]:.2f} | {med[1]:.2f} | {med[1] - med[0]:.2f} |")
    finally:
        inproc.close()
        web.close()
    return "\n".join(lines) + "\n"


def child(args) -> None:
    """--child CONTENDER: serve one contender over HTTP (the http mode's subprocess)."""
    from mtcompile.serving.server import serve

    be = backend(args.child, args.bundle, args.set, args.threads)
    serve(
        be,
        port=args.port,
        grpc_port=_free_port(),
        max_delay_ms=args.max_delay_ms,
        max_queue=args.max_queue,
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", help="a saved bundle (mtcompile demo -o DIR)")
    p.add_argument(
        "--set",
        default="heterogeneous",
        help="the demo set it was built from (the onnxruntime contender's tenants)",
    )
    p.add_argument("--via", choices=["inproc", "http"], default="inproc")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--mixes", default="equal,skewed")
    p.add_argument("--rates", default="20,50,100,200", help="total offered req/s to sweep")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of arrivals a trial")
    p.add_argument("--max-requests", type=int, default=5000, help="arrivals a trial at most")
    p.add_argument("--drain", type=float, default=30.0, help="seconds to wait for answers")
    p.add_argument("--p99-ms", type=float, default=50.0)
    p.add_argument("--max-delay-ms", type=float, default=2.0)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--threads", type=int, help="the bundle's TVM pool (default: all cores)")
    p.add_argument("--clients", type=int, default=32, help="http mode: sender threads")
    p.add_argument("-o", "--output", help="write the markdown table here too")
    p.add_argument(
        "--overhead",
        type=int,
        metavar="N",
        help="instead of the sweep: N "
        "sequential requests per tenant in-process and over HTTP (window 0)",
    )
    p.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    if args.overhead:
        text = overhead(args)
        print(text)
        if args.output:
            with open(args.output, "w") as f:
                f.write(text)
        return
    args.contenders = args.contenders.split(",")
    args.mixes = args.mixes.split(",")
    args.rates = [float(r) for r in args.rates.split(",")]
    command = "python -m benchmarks.serve " + " ".join(sys.argv[1:] if argv is None else argv)
    text = table(run(args), args, command)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
