"""`starflow serve` on Ray Serve: one `ModelDeployment` per served export, one `Ingress` holding
the HTTP app (`api.create_app`) over a `RayClient` per model.

A model replica holds a `ModelWorker`; its `Batcher` gathers the requests that reach it while
the sampler is busy (an idle one waits `batch_wait_timeout_s`), and the worker runs those with
the same settings as one sampler call. A
request the model refuses comes back as a value, so it fails alone. Overload is bounded twice:
a replica takes `max_ongoing_requests`, and each caller queues at most `max_queued_requests`
more; beyond that Ray raises `BackPressureError` at once, which the `RayClient` turns into a 429.
A replica lost mid-request (its node died) is a 503: generation is deterministic, so the client
may retry. Every result names the node and replica that made it (X-Starflow-Node, -Replica) and
each request's queue time, batch size, block calls, Jacobi iterations and stage times go to Ray's
Prometheus endpoint through `ray.serve.metrics`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import serve
from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError
from ray.serve import metrics
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from starflow.core.errors import StarflowError
from starflow.core.request import GenerateRequest
from starflow.serving import api
from starflow.serving.api import Overloaded, create_app
from starflow.serving.batcher import Batcher
from starflow.serving.config import APP_NAME, ModelConfig, ServeConfig
from starflow.serving.types import ModelInfo, Served
from starflow.serving.worker import ModelWorker

# A request whose replica went away: nothing was wrong with it (503, retry)
LOST = (RayActorError, NodeDiedError, WorkerCrashedError, ReplicaUnavailableError, DeploymentUnavailableError)
INGRESS = "Ingress"
QUIET = {"enable_access_log": False}  # Serve's own access lines: the app writes one per request
HEAD_NODE = "node:__internal_head__"  # the resource Ray gives the head node alone
SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
COUNTS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384]


class _Metrics:
    """What each request cost, on Ray's Prometheus endpoint (names prefixed ray_ by Ray)."""

    def __init__(self, model: str):
        tags = ("model",)
        self.requests = metrics.Counter(
            "starflow_requests", "Requests a replica answered, by outcome.", tag_keys=("model", "outcome")
        )
        self.queue = metrics.Histogram(
            "starflow_queue_seconds", "Arrival at the replica to the start of its sampler call.",
            boundaries=SECONDS, tag_keys=tags,
        )  # fmt: skip
        self.batch = metrics.Histogram(
            "starflow_batch_requests", "Requests in the sampler call a request shared.", boundaries=COUNTS,
            tag_keys=tags,
        )  # fmt: skip
        self.block_calls = metrics.Histogram(
            "starflow_block_calls", "Flow block calls of the sampler call a request shared.",
            boundaries=COUNTS, tag_keys=tags,
        )  # fmt: skip
        self.iterations = metrics.Histogram(
            "starflow_jacobi_iterations", "Jacobi iterations of each image over every block.",
            boundaries=COUNTS, tag_keys=tags,
        )  # fmt: skip
        self.stage = metrics.Histogram(
            "starflow_stage_seconds", "Seconds per stage of the sampler call a request shared.",
            boundaries=SECONDS, tag_keys=("model", "stage"),
        )  # fmt: skip
        for metric in (self.requests, self.queue, self.batch, self.block_calls, self.iterations, self.stage):
            metric.set_default_tags({"model": model})

    def record(self, outcome: Served | StarflowError) -> None:
        if isinstance(outcome, StarflowError):
            self.requests.inc(tags={"outcome": "refused"})
            return
        self.requests.inc(tags={"outcome": "served"})
        self.queue.observe(outcome.seconds["queue"])
        self.batch.observe(outcome.batch_requests)
        self.block_calls.observe(outcome.block_calls)
        for iterations in outcome.iterations:
            self.iterations.observe(iterations)
        for stage, seconds in outcome.seconds.items():
            if stage != "queue":
                self.stage.observe(seconds, tags={"stage": stage})


@serve.deployment
class ModelDeployment:
    """One export's replica. The sampler runs in a worker thread, one call at a time (batches,
    likelihoods and health checks share the lock), so the replica keeps taking requests into
    the next batch while one runs."""

    def __init__(self, name: str, model: ModelConfig):
        artifacts = Path(model.artifacts) if model.artifacts else None
        video = model.embedded == "digits-video"
        self.worker = ModelWorker.load(name, artifacts, video=video, threads=model.threads)
        self.batcher = Batcher(self._batch, model.max_batch_size, model.batch_wait_timeout_s)
        replica = serve.get_replica_context().replica_id.unique_id
        self.served_by = {"node": ray.get_runtime_context().get_node_id(), "replica": replica}
        self.metrics = _Metrics(name)
        self.lock = asyncio.Lock()

    def info(self) -> ModelInfo:
        return self.worker.info()

    async def generate(self, request: GenerateRequest) -> Served | StarflowError:
        """The request's images, or the one-line error that refused it (returned, not raised:
        Ray would wrap a raised one in its traceback)."""
        return await self.batcher.submit((request, time.perf_counter()))

    async def _batch(self, items: list[tuple[GenerateRequest, float]]) -> list[Served | StarflowError]:
        async with self.lock:
            began = time.perf_counter()
            outcomes = await asyncio.to_thread(self.worker.run, [request for request, _ in items])
        answered = []
        for (_, arrived), outcome in zip(items, outcomes, strict=True):
            if isinstance(outcome, Served):
                outcome = dataclasses.replace(
                    outcome, seconds={**outcome.seconds, "queue": began - arrived}, served_by=self.served_by
                )
            self.metrics.record(outcome)
            answered.append(outcome)
        return answered

    async def bits_per_dim(
        self, latents: np.ndarray, prompts: list[str] | None
    ) -> list[float] | StarflowError:
        async with self.lock:
            try:
                return await asyncio.to_thread(self.worker.bits_per_dim, latents, prompts)
            except StarflowError as err:
                return err

    async def check_health(self) -> None:
        """Ray's periodic health check: a tiny sample through every stage."""
        async with self.lock:
            await asyncio.to_thread(self.worker.health)


class RayClient:
    """A `ModelClient` over a model deployment's handle."""

    def __init__(self, name: str, handle: DeploymentHandle, info: ModelInfo):
        self.name = name
        self.handle = handle
        self.info = info

    async def generate(self, request: GenerateRequest) -> Served:
        return await self._call(self.handle.generate.remote, request)

    async def bits_per_dim(self, latents: np.ndarray, prompts: list[str] | None) -> list[float]:
        return await self._call(self.handle.bits_per_dim.remote, latents, prompts)

    async def _call(self, method: Callable[..., Any], *args: Any) -> Any:
        """The call's result; a refusal raised as its StarflowError, a full queue as a 429, a lost
        replica as a 503; a caller that gives up (the app's timeout) cancels the call."""
        response = method(*args)
        try:
            outcome = await response
        except asyncio.CancelledError:
            response.cancel()
            raise
        except BackPressureError:
            raise Overloaded(
                f"model {self.name}: every replica is busy and the queue is full; retry later", status=429
            ) from None
        except LOST:
            raise Overloaded(f"model {self.name}: the replica serving this request was lost; retry") from None
        if isinstance(outcome, StarflowError):
            raise outcome
        return outcome


@serve.deployment
@serve.ingress()
class Ingress:
    """The HTTP app, built in the replica (`__serve_build_asgi_app__`) once every model has
    said what it is."""

    def __init__(self, models: dict[str, DeploymentHandle], config: ServeConfig):
        self.models = models
        self.config = config
        self.api_key = config.api_key()  # an unset variable fails the deployment, never opens it
        # the app's one line per request goes where Serve's replica logs go (its access log is off)
        api.log.setLevel(logging.INFO)
        api.log.propagate = False
        api.log.handlers = list(logging.getLogger("ray.serve").handlers)

    async def __serve_build_asgi_app__(self) -> Any:
        infos = await asyncio.gather(*(handle.info.remote() for handle in self.models.values()))
        clients = {
            name: RayClient(name, handle, info)
            for (name, handle), info in zip(self.models.items(), infos, strict=True)
        }
        return create_app(
            clients, limits=self.config.limits, api_key=self.api_key, timeout_s=self.config.timeout_s
        )


def build_app(config: ServeConfig, *, api_key: str | None = None) -> serve.Application:
    """The application: a deployment per model, named after it, and the ingress. `api_key`:
    a token the caller holds (`starflow serve --api-key`), handed to the ingress's environment
    as `config.api_key_env`; unset, the ingress reads that variable from the cluster's."""
    models = {
        name: ModelDeployment.options(**_deployment_options(name, model, config.timeout_s)).bind(name, model)
        for name, model in config.models.items()
    }
    # what the models take and queue, 4 times over: a burst reaches their queues (429 in JSON)
    # before the ingress's (Ray's plain 503)
    capacity = 4 * sum(
        m.most_replicas * m.max_ongoing_requests + m.max_queued_requests for m in config.models.values()
    )
    actor: dict[str, Any] = {"num_cpus": 0}
    if config.proxy_location == "HeadOnly":  # beside the one proxy: a worker node's loss leaves it up
        actor["resources"] = {HEAD_NODE: 0.001}
    if api_key is not None:
        if config.api_key_env is None:
            raise StarflowError("api_key_env: name the environment variable that holds the API key")
        actor["runtime_env"] = {"env_vars": {config.api_key_env: api_key}}
    ingress = Ingress.options(
        name=INGRESS, num_replicas=1, max_ongoing_requests=capacity, max_queued_requests=capacity,
        ray_actor_options=actor, logging_config=QUIET,
    )  # fmt: skip
    return ingress.bind(models, config)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Ray Serve's entry point for a config file's `import_path` (its `args`: `ServeConfig`)."""
    from starflow.serving.config import serve_config

    return build_app(serve_config(**args))


def _deployment_options(name: str, model: ModelConfig, timeout_s: float) -> dict[str, Any]:
    """A model's deployment: its replicas (or autoscaling bounds), CPUs, bounds on requests; its
    health check waits behind the running batch, so it may take as long as a request may."""
    options: dict[str, Any] = dict(
        name=name, ray_actor_options={"num_cpus": model.cpus}, logging_config=QUIET,
        health_check_timeout_s=max(timeout_s, 30.0),
        max_ongoing_requests=model.max_ongoing_requests, max_queued_requests=model.max_queued_requests,
    )  # fmt: skip
    if model.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = model.max_replicas_per_node
    if model.max_replicas is None:
        options["num_replicas"] = model.most_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": model.min_replicas, "max_replicas": model.max_replicas,
            "target_ongoing_requests": model.max_batch_size,  # a full batch in flight per replica
        }  # fmt: skip
    return options


# ---- starting and stopping (`starflow serve`) ---------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Running:
    """A deployed application and what this process started for it."""

    url: str
    seconds: float  # from the call to the first healthy answer
    started_serve: bool  # Serve's controller and proxy (else only the application is ours)
    metrics_url: str | None  # the local instance's Prometheus endpoint


def start(config: ServeConfig, *, address: str | None = None, api_key: str | None = None) -> Running:
    """Deploy `config` on a local Ray instance (address None) or the cluster at `address`
    ("auto", "HOST:PORT" or "ray://HOST:PORT"), and wait for the first healthy answer."""
    began = time.perf_counter()
    try:
        # "local": a new instance, never a cluster that RAY_ADDRESS or `ray start` left around
        context = ray.init(address=address or "local")
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = f"address {address}: cannot join a Ray cluster there" if address else "cannot start Ray here"
        raise StarflowError(f"{where} ({err})") from None
    port = context.address_info.get("metrics_export_port") if address is None else None
    metrics_url = f"http://127.0.0.1:{port}/metrics" if port else None
    status = serve.status()
    if APP_NAME in status.applications:
        ray.shutdown()
        raise StarflowError(
            f"address {address}: the cluster already serves an application named {APP_NAME!r}; "
            "delete it first (serve shutdown, or the starflow serve that runs it)"
        )
    running = Running(f"http://{config.host}:{config.port}", 0.0, not status.proxies, metrics_url)
    try:
        serve.start(
            http_options={"host": config.host, "port": config.port}, proxy_location=config.proxy_location
        )
        try:
            serve.run(build_app(config, api_key=api_key), name=APP_NAME, route_prefix="/")
        except RuntimeError as err:  # Ray's "Deploying app ... failed" with the replica's traceback
            lines = [line for line in str(err).splitlines() if line.strip()]
            raise StarflowError(f"the application failed to deploy: {lines[-1] if lines else err}") from None
        _wait_healthy(f"{running.url}/healthz", timeout_s=60.0)
    except BaseException:
        stop(running)
        raise
    return dataclasses.replace(running, seconds=time.perf_counter() - began)


def stop(running: Running) -> None:
    """Remove what `start` made and disconnect: Serve (with this application) if it started it,
    else only the application; Ray's local instance if it started one."""
    if running.started_serve:
        serve.shutdown()
    else:
        serve.delete(APP_NAME)
    ray.shutdown()


def _wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise StarflowError(f"{url}: no healthy answer within {timeout_s:g} s")
        time.sleep(0.2)
