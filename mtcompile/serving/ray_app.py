"""Replicas of a bundle behind one endpoint, on Ray Serve: each replica loads the bundle and
runs its own `Scheduler`; Ray Serve's proxy spreads the requests over the replicas and its
autoscaler adds or removes them. The endpoint speaks the KServe v2 REST protocol's JSON form
(``/v2/health/ready``, ``/v2/models/{tenant}``, ``/v2/models/{tenant}/infer``).

Needs the `ray` extra (``pip install "mtcompile[ray]"``); nothing in mtcompile's core imports
this module. Run it with ``serve run mtcompile.serving.ray_app:build_app bundle=OUT/
num_replicas=2`` or from Python with ``ray.serve.run(app("OUT/", num_replicas=2))``.
"""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations as types

import asyncio
import os
import socket
from typing import Any

import numpy as np
from fastapi import Body, FastAPI, HTTPException
from ray import serve

from mtcompile.errors import InputError, ServingError
from mtcompile.serving.scheduler import Scheduler

# the v2 protocol's tensor datatypes and numpy's
DATATYPES = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
_V2_NAMES = {np.dtype(v): k for k, v in DATATYPES.items()}

api = FastAPI()


def decode(tensor: dict) -> np.ndarray:
    """A v2 JSON tensor (``name``, ``shape``, ``datatype``, flat ``data``) as an array."""
    dtype = DATATYPES.get(tensor.get("datatype", ""))
    if dtype is None:
        raise InputError(
            f"input {tensor.get('name')!r}: datatype {tensor.get('datatype')!r} "
            f"is not one of {sorted(DATATYPES)}"
        )
    try:
        return np.asarray(tensor["data"], dtype=dtype).reshape(tensor["shape"])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"input {tensor.get('name')!r}: {type(e).__name__}: {e}") from e


def encode(name: str, array: np.ndarray) -> dict:
    """An array as a v2 JSON tensor."""
    return {
        "name": name,
        "shape": list(array.shape),
        "datatype": _V2_NAMES[array.dtype],
        "data": array.ravel().tolist(),
    }


def _bind_replica_grpc(host: str) -> None:
    """Ray Serve (2.59) starts each replica's inter-deployment gRPC server on every interface
    (``[::]:0``, not configurable); on a one-machine cluster it can listen on `host` only.
    Defined before the deployment: `serve.deployment` pickles the class as it stands.
    Called in the replica before Ray Serve starts that server (after the user's __init__)."""
    from ray.serve._private import replica

    add = replica.add_port_to_grpc_server
    if getattr(add, "_mtcompile_host", None) == host:
        return

    def on_host(server, address: str):
        return add(server, address.replace("[::]", host, 1))

    on_host._mtcompile_host = host
    replica.add_port_to_grpc_server = on_host


@serve.deployment
@serve.ingress(api)
class BundleReplica:
    """One replica: the bundle loaded with `threads` and a scheduler over it."""

    def __init__(
        self,
        bundle_dir: str,
        max_delay_ms: float = 2.0,
        max_queue: int = 256,
        threads: int | None = None,
        bind_host: str | None = None,
    ):
        from mtcompile.runtime.bundle import load

        if bind_host is not None:
            _bind_replica_grpc(bind_host)
        self.bundle = load(bundle_dir, threads=threads)
        self.scheduler = Scheduler(self.bundle, max_delay_ms, max_queue)
        self.replica = f"{socket.gethostname()}:{os.getpid()}"  # one process per replica

    def __del__(self):
        if hasattr(self, "scheduler"):
            self.scheduler.close(drain=True)

    @api.get("/v2/health/live")
    @api.get("/v2/health/ready")
    async def ready(self) -> dict:
        return {"live": True, "ready": True}

    @api.get("/v2/models/{tenant}")
    async def metadata(self, tenant: str) -> dict:
        sig = self._sig(tenant)

        def meta(s) -> dict:
            return {
                "name": s.name,
                "datatype": _V2_NAMES[np.dtype(s.dtype)],
                "shape": [d if isinstance(d, int) else -1 for d in s.shape],
            }

        return {
            "name": tenant,
            "versions": [self.bundle.manifest.name],
            "platform": "mtcompile",
            "inputs": [meta(s) for s in sig.inputs],
            "outputs": [meta(s) for s in sig.outputs],
        }

    @api.post("/v2/models/{tenant}/infer")
    async def infer(self, tenant: str, body: dict = Body(...)) -> dict:  # noqa: B008
        sig = self._sig(tenant)
        names = [s.name for s in sig.inputs]
        given = {t.get("name"): t for t in body.get("inputs", [])}
        if sorted(given) != sorted(names):
            raise HTTPException(
                400, f"tenant '{tenant}' takes inputs {names}; the request has {list(given)}"
            )
        try:
            future = self.scheduler.submit(tenant, *[decode(given[n]) for n in names])
        except InputError as e:
            raise HTTPException(400, str(e)) from e
        except ServingError as e:
            raise HTTPException(503, str(e)) from e
        try:
            outs = await asyncio.wrap_future(future)
        except Exception as e:
            raise HTTPException(500, f"tenant '{tenant}': {type(e).__name__}: {e}") from e
        return {
            "model_name": tenant,
            "model_version": self.bundle.manifest.name,
            "id": body.get("id", ""),
            "parameters": {"replica": self.replica},
            "outputs": [
                encode(s.name, np.ascontiguousarray(o))
                for s, o in zip(sig.outputs, outs, strict=True)
            ],
        }

    @api.get("/mtcompile/metrics")
    async def metrics(self) -> dict:
        return {"replica": self.replica, **self.scheduler.metrics()}

    def _sig(self, tenant: str):
        sig = self.bundle.manifest.tenants.get(tenant)
        if sig is None:
            raise HTTPException(
                404,
                f"unknown tenant {tenant!r}; this bundle serves "
                f"{list(self.bundle.manifest.tenant_order)}",
            )
        return sig


def app(
    bundle_dir: str | os.PathLike,
    *,
    num_replicas: int | None = None,
    autoscaling: dict | None = None,
    max_ongoing_requests: int = 64,
    num_cpus: float = 1.0,
    threads: int | None = None,
    max_delay_ms: float = 2.0,
    max_queue: int = 256,
    bind_host: str | None = None,
):
    """The Ray Serve application: `num_replicas` fixed replicas, or `autoscaling` (Ray
    Serve's ``autoscaling_config``: ``min_replicas``, ``max_replicas``,
    ``target_ongoing_requests``, ...). `num_cpus`: Ray's CPUs per replica; `threads`: the
    bundle's TVM pool per replica (default: `num_cpus`, at least 1). `bind_host`: the
    address each replica's internal gRPC server listens on (default: every interface, Ray's
    choice; "127.0.0.1" for a one-machine cluster on loopback)."""
    if num_replicas is not None and autoscaling is not None:
        raise ValueError("give num_replicas or autoscaling, not both")
    options: dict[str, Any] = {
        "max_ongoing_requests": max_ongoing_requests,
        "ray_actor_options": {"num_cpus": num_cpus},
    }
    if autoscaling is not None:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = 1 if num_replicas is None else num_replicas
    threads = threads if threads is not None else max(1, int(num_cpus))
    return BundleReplica.options(**options).bind(
        os.fspath(os.path.abspath(bundle_dir)), max_delay_ms, max_queue, threads, bind_host
    )


def build_app(args: dict[str, str]):
    """``serve run mtcompile.serving.ray_app:build_app bundle=OUT/ [num_replicas=N |
    min_replicas=A max_replicas=B target_ongoing_requests=T] [num_cpus=C]``."""
    args = dict(args)
    bundle = args.pop("bundle")
    scaling = {
        k: float(args.pop(k)) if k == "target_ongoing_requests" else int(args.pop(k))
        for k in ("min_replicas", "max_replicas", "target_ongoing_requests")
        if k in args
    }
    kwargs: dict[str, Any] = {"autoscaling": scaling or None}
    for k, kind in (
        ("bind_host", str),
        ("num_replicas", int),
        ("num_cpus", float),
        ("threads", int),
        ("max_delay_ms", float),
        ("max_queue", int),
        ("max_ongoing_requests", int),
    ):
        if k in args:
            kwargs[k] = kind(args.pop(k))
    if args:
        raise ValueError(f"unknown arguments {sorted(args)}")
    return app(bundle, **kwargs)
