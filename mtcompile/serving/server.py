"""A saved bundle over the KServe v2 / Open Inference Protocol, served by MLServer: each tenant
one model of the server, every request through one `Scheduler`, so that requests of several
tenants pending in one window share a merged call.

Needs the `serve` extra (``pip install "mtcompile[serve]"``); nothing in mtcompile's core
imports this module (an import-linter contract in pyproject.toml). The models run in the
server's own process (``parallel_workers=0``): they share the one scheduler and the one
bundle. REST on `port` (``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{tenant}``,
``/v2/models/{tenant}/ready``, ``/v2/models/{tenant}/infer``) and gRPC on `grpc_port`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import tempfile
import uuid
from collections.abc import Iterable

import numpy as np
from mlserver import MLModel, MLServer
from mlserver.codecs import NumpyCodec
from mlserver.codecs.numpy import to_datatype
from mlserver.errors import MLServerError
from mlserver.handlers import custom_handler
from mlserver.settings import ModelParameters, ModelSettings, Settings
from mlserver.types import InferenceRequest, InferenceResponse, MetadataTensor, ResponseOutput

from mtcompile.errors import InputError, ServingError
from mtcompile.runtime.manifest import IOSpec
from mtcompile.serving.scheduler import Scheduler

log = logging.getLogger("mtcompile.serving.server")

# the schedulers of this process, by key: MLServer makes each model from its settings (an
# import path and JSON parameters), so the model finds its scheduler here by the key it names
_SCHEDULERS: dict[str, Scheduler] = {}


class TenantModel(MLModel):
    """One tenant of a bundle as an MLServer model: decodes a v2 request's tensors by name,
    submits them to the process's scheduler and encodes the tenant's outputs."""

    async def load(self) -> bool:
        extra = self.settings.parameters.extra
        self._scheduler = _SCHEDULERS[extra["scheduler"]]
        self._tenant = extra["tenant"]
        sig = self._scheduler.bundle.manifest.tenants[self._tenant]
        self._inputs = [s.name for s in sig.inputs]
        self._outputs = [s.name for s in sig.outputs]
        return True

    @custom_handler(rest_path="/mtcompile/metrics", rest_method="GET")
    async def scheduler_metrics(self) -> dict:
        """The scheduler's metrics (`Scheduler.metrics`): queue depths, batch sizes, calls."""
        return self._scheduler.metrics()

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        arrays = self._decode(payload)
        try:
            future = self._scheduler.submit(self._tenant, *arrays)
        except InputError as e:  # the request's own fault
            raise MLServerError(str(e), 400) from e
        except ServingError as e:  # a full queue, a closing server: try again later
            raise MLServerError(str(e), 503) from e
        try:
            outs = await asyncio.wrap_future(future)
        except Exception as e:  # its call raised: this request alone fails
            raise MLServerError(f"tenant '{self._tenant}': {type(e).__name__}: {e}", 500) from e
        wanted = [o.name for o in payload.outputs or []]
        unknown = sorted(set(wanted) - set(self._outputs))
        if unknown:
            raise MLServerError(
                f"tenant '{self._tenant}' has no outputs {unknown}; its "
                f"outputs are {self._outputs}",
                400,
            )
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[
                _encode(n, o)
                for n, o in zip(self._outputs, outs, strict=True)
                if not wanted or n in wanted
            ],
        )

    def _decode(self, payload: InferenceRequest) -> list[np.ndarray]:
        """The request's tensors in the tenant's input order (each named once)."""
        given = [i.name for i in payload.inputs]
        if sorted(given) != sorted(self._inputs):
            raise MLServerError(
                f"tenant '{self._tenant}' takes inputs {self._inputs}; the request has {given}", 400
            )
        by_name = {i.name: i for i in payload.inputs}
        try:
            return [NumpyCodec.decode_input(by_name[n]) for n in self._inputs]
        except Exception as e:  # data that does not fill its shape, an unknown datatype
            raise MLServerError(
                f"tenant '{self._tenant}': cannot decode the inputs: {e}", 400
            ) from e


def _encode(name: str, array: np.ndarray) -> ResponseOutput:
    """An output as a v2 tensor of its own shape (MLServer's codec would make a 1-d array
    (n,) a column (n, 1): its batch convention, not the tenant's signature)."""
    out = NumpyCodec.encode_output(name, np.ascontiguousarray(array))
    out.shape = list(array.shape)
    return out


def _metadata(spec: IOSpec) -> MetadataTensor:
    """A tensor of the v2 metadata: a dynamic dim is -1."""
    return MetadataTensor(
        name=spec.name,
        datatype=to_datatype(np.dtype(spec.dtype)),
        shape=[d if isinstance(d, int) else -1 for d in spec.shape],
    )


def model_settings(scheduler: Scheduler, key: str) -> list[ModelSettings]:
    """One MLServer model per tenant of the scheduler's bundle, named as the tenant."""
    m = scheduler.bundle.manifest
    return [
        ModelSettings(
            name=t,
            implementation=TenantModel,
            platform="mtcompile",
            versions=[m.name],
            inputs=[_metadata(s) for s in m.tenants[t].inputs],
            outputs=[_metadata(s) for s in m.tenants[t].outputs],
            parameters=ModelParameters(version=m.name, extra={"scheduler": key, "tenant": t}),
        )
        for t in m.tenant_order
    ]


def server_settings(host: str, port: int, grpc_port: int, repository: str) -> Settings:
    """MLServer's settings: models in this process, no metrics port, nothing loaded from the
    working directory (MLServer would otherwise scan it for model-settings.json)."""
    return Settings(
        host=host,
        http_port=port,
        grpc_port=grpc_port,
        parallel_workers=0,
        metrics_endpoint=None,
        load_models_at_startup=False,
        model_repository_root=repository,
        debug=False,
        server_name="mtcompile",
    )


async def serve_async(scheduler: Scheduler, host: str, port: int, grpc_port: int) -> None:
    """Serve `scheduler`'s bundle until SIGINT/SIGTERM; then the servers stop accepting, the
    requests they accepted complete, and the scheduler drains and closes."""
    key = uuid.uuid4().hex
    _SCHEDULERS[key] = scheduler
    try:
        with tempfile.TemporaryDirectory(prefix="mtcompile-serve-") as repo:
            server = MLServer(server_settings(host, port, grpc_port, repo))
            loop, stop = asyncio.get_running_loop(), _stopper(scheduler, server)
            for sig in (signal.SIGINT, signal.SIGTERM):  # in place of MLServer's own
                loop.add_signal_handler(sig, stop)
            await server.start(model_settings(scheduler, key))
    finally:
        scheduler.close(drain=True)
        del _SCHEDULERS[key]


def _stopper(scheduler: Scheduler, server: MLServer):
    """On a signal: the scheduler takes no new request and serves what it accepted at once
    (it does not wait out its window), while the servers stop accepting connections and
    answer those they have. A second signal changes nothing."""
    stopping: list[bool] = []

    def stop() -> None:
        if stopping:
            return
        stopping.append(True)
        log.info("stopping: draining the accepted requests")
        scheduler.close(drain=True, timeout=0)  # returns at once; the loop drains
        asyncio.ensure_future(server.stop(signal.SIGTERM))

    return stop


def serve(
    bundle,
    *,
    port: int = 8080,
    host: str = "127.0.0.1",
    grpc_port: int | None = None,
    max_delay_ms: float = 2.0,
    max_queue: int = 256,
    no_stack: Iterable[str] = (),
    entries_only: bool = False,
) -> None:
    """Serve a loaded bundle (or any object with its ``manifest``, ``run`` and ``run_all``)
    on `host`:`port` until SIGINT/SIGTERM. `entries_only`: each tenant's own entry serves
    its requests, never a merged call (the benchmark's contender). `grpc_port`: default
    `port` + 1."""
    if entries_only:
        bundle = EntriesOnly(bundle)
    scheduler = Scheduler(bundle, max_delay_ms, max_queue, no_stack=no_stack)
    log.debug(
        "serving %s (%s) on http://%s:%d",
        bundle.manifest.name,
        ", ".join(bundle.manifest.tenant_order),
        host,
        port,
    )
    asyncio.run(serve_async(scheduler, host, port, port + 1 if grpc_port is None else grpc_port))


class EntriesOnly:
    """A bundle whose merged calls are made of its tenants' own entries, one after another:
    the scheduler's windows and stacking are kept, the merged graph is not."""

    def __init__(self, bundle):
        self.manifest, self._bundle = bundle.manifest, bundle

    def run(self, tenant: str, *arrays):
        return self._bundle.run(tenant, *arrays)

    def run_all(self, inputs: dict, *args, **kwargs) -> dict:
        return {t: self._bundle.run(t, *xs) for t, xs in inputs.items()}

    run_some = run_all  # a merged call over a subset (issue 26 item 1), also per entry
