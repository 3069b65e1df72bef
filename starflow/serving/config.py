"""`ServeConfig`: what `starflow serve` deploys, and its Ray Serve config file.

The flags, the file and the app builder all produce one `ServeConfig`. The file is Ray Serve's
own format (`applications[].import_path` + `args`, `http_options`, `proxy_location`), so
`serve deploy serve.yaml`, `serve run serve.yaml` and a KubeRay `RayService` deploy the same
application as `starflow serve --config serve.yaml`. Ray-free: bad settings are refused before
Ray is imported or started. The API key is never written: only the name of the environment
variable that holds it.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from starflow.core.bounded import read_yaml
from starflow.core.errors import StarflowError
from starflow.core.outputs import save_text
from starflow.serving.types import DEFAULT_TIMEOUT_S, Limits

APP_NAME = "starflow"
IMPORT_PATH = "starflow.serving.deployment:app_builder"
API_KEY_ENV = "STARFLOW_API_KEY"
EMBEDDED = ("digits", "digits-video")  # the embedded models a config names instead of a directory
MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # a Ray deployment name and a URL-safe model id

Positive = Annotated[int, Field(ge=1)]


class ModelConfig(BaseModel):
    """One served export and its Ray Serve deployment settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    embedded: Literal["digits", "digits-video"] | None = Field(None, description="An embedded model.")
    artifacts: str | None = Field(None, description="An export directory (absolute: replicas read it).")
    replicas: Positive | None = Field(None, description="A fixed replica count (1), or min/max_replicas.")
    min_replicas: Annotated[int, Field(ge=0)] | None = Field(None, description="Autoscaling lower bound.")
    max_replicas: Positive | None = Field(None, description="Autoscaling upper bound.")
    threads: Positive | None = Field(None, description="CPU threads per replica; unset: every core.")
    max_batch_size: Positive = Field(8, description="Most requests one sampler call gathers.")
    # an idle replica's wait for a burst's other requests (a busy one gathers them meanwhile anyway)
    batch_wait_timeout_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    max_ongoing_requests: Positive = Field(16, description="Per replica; room for a batch and the next.")
    max_queued_requests: Positive = Field(64, description="Per caller; beyond it requests get 429 at once.")
    max_replicas_per_node: Positive | None = Field(None, description="1 spreads replicas over nodes.")

    @field_validator("artifacts")
    @classmethod
    def _absolute(cls, artifacts: str | None) -> str | None:
        if artifacts is not None and not Path(artifacts).is_absolute():
            raise ValueError(f"expected an absolute path (replicas may run elsewhere), got {artifacts!r}")
        return artifacts

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if (self.embedded is None) == (self.artifacts is None):
            raise ValueError(f"give embedded ({' or '.join(EMBEDDED)}) or artifacts (a directory), one")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("min_replicas, max_replicas: autoscaling needs both")
        if self.max_replicas is not None:
            if self.replicas is not None:
                raise ValueError("replicas: a fixed count or min_replicas/max_replicas, not both")
            if self.min_replicas > self.max_replicas:  # type: ignore[operator]  # both set here
                raise ValueError(
                    f"min_replicas: {self.min_replicas} is over max_replicas {self.max_replicas}"
                )
        return self

    @property
    def most_replicas(self) -> int:
        return self.max_replicas or self.replicas or 1

    @property
    def cpus(self) -> int:
        """The CPUs Ray reserves for one replica (its threads; one when it takes every core)."""
        return self.threads or 1


class ServeConfig(BaseModel):
    """The models served by name (the first is the default), the limits on a request, the
    request timeout, the API key's environment variable, and where the HTTP proxy listens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: dict[str, ModelConfig] = Field(
        default_factory=lambda: {name: ModelConfig(embedded=name) for name in EMBEDDED}  # type: ignore[arg-type]
    )
    limits: Limits = Limits()
    timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = DEFAULT_TIMEOUT_S
    api_key_env: str | None = Field(None, description="The environment variable holding the bearer token.")
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    proxy_location: Literal["HeadOnly", "EveryNode"] = "HeadOnly"  # EveryNode: one proxy per machine

    @field_validator("models")
    @classmethod
    def _named(cls, models: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        if not models:
            raise ValueError("serve at least one model")
        for name in models:
            if not re.match(MODEL_NAME, name):
                raise ValueError(f"{name!r}: a name is letters, digits, '_', '.', '-' (at most 64)")
            if name == "Ingress":
                raise ValueError("'Ingress' is the HTTP deployment's name; choose another")
        return models

    def api_key(self) -> str | None:
        """The bearer token from `api_key_env` (None: no token asked); an unset variable is an
        error, so a server meant to be closed never starts open."""
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise StarflowError(f"api_key_env: the environment variable {self.api_key_env} is not set")
        return key


def check_local(config: ServeConfig) -> None:
    """What serving from this machine needs, checked before Ray starts: an export in every
    directory, and a CPU for every replica's threads (else the replicas would wait forever)."""
    for name, model in config.models.items():
        if model.artifacts is not None and not (Path(model.artifacts) / "manifest.json").is_file():
            raise StarflowError(
                f"models.{name}.artifacts: {model.artifacts} holds no export (no manifest.json)"
            )
    needed = sum(m.most_replicas * m.cpus for m in config.models.values())
    available = os.cpu_count() or 1
    if needed > available:
        raise StarflowError(
            f"replicas: the models need {needed} CPUs (replicas x threads) and this machine has {available}; "
            "lower the replicas or threads, or join a cluster (--address)"
        )


def serve_config(**fields: Any) -> ServeConfig:
    """A `ServeConfig`, or a one-line StarflowError naming the first bad field."""
    try:
        return ServeConfig(**fields)
    except ValidationError as err:
        raise _one_line(err, "") from None


def app_args(config: ServeConfig) -> dict[str, Any]:
    """What the app builder takes (the HTTP settings live in Ray's own keys)."""
    return config.model_dump(mode="json", exclude={"host", "port", "proxy_location"}, exclude_none=True)


def ray_config(config: ServeConfig) -> dict[str, Any]:
    """The Ray Serve config file's content (`serve deploy`, KubeRay's `serveConfigV2`)."""
    return {
        "proxy_location": config.proxy_location,
        "http_options": {"host": config.host, "port": config.port},
        "applications": [
            {"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH, "args": app_args(config)}
        ],
    }


def write_config(config: ServeConfig, path: Path) -> None:
    """`ray_config` as YAML, atomically."""
    save_text(path, yaml.safe_dump(ray_config(config), sort_keys=False), f"write_config {path}")


def read_config(path: Path) -> ServeConfig:
    """The `ServeConfig` of a Ray Serve config file holding one starflow application."""
    document = read_yaml(path, "config")
    if not isinstance(document, dict) or not isinstance(document.get("applications"), list):
        raise StarflowError(f"config {path}: expected a Ray Serve config file with an 'applications' list")
    ours = [
        a for a in document["applications"] if isinstance(a, dict) and a.get("import_path") == IMPORT_PATH
    ]
    if len(ours) != 1:
        raise StarflowError(f"config {path}: expected one application with import_path {IMPORT_PATH}")
    (app,) = ours
    if app.get("deployments"):
        raise StarflowError(
            f"config {path}: deployments: per-deployment overrides are not read; set them in args.models"
        )
    http = document.get("http_options") or {}
    fields = dict(app.get("args") or {})
    fields.update({key: http[key] for key in ("host", "port") if key in http})
    if "proxy_location" in document:
        fields["proxy_location"] = document["proxy_location"]
    try:
        return ServeConfig(**fields)
    except ValidationError as err:
        raise _one_line(err, f"config {path}: ") from None


def _one_line(err: ValidationError, where: str) -> StarflowError:
    """The first of pydantic's errors as 'field: what was expected'."""
    first = err.errors(include_url=False)[0]
    field = ".".join(str(part) for part in first["loc"])
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message.split(", ", 1)[1]
    elif first["type"] == "extra_forbidden":
        message = "not a setting"
    else:
        message = f"{message[0].lower()}{message[1:]}, got {first['input']!r}"
    return StarflowError(f"{where}{field}: {message}" if field else f"{where}{message}")


def check_ray_address(address: str, field: str = "ray") -> None:
    """`local`, `auto`, or a HOST:PORT (ray://HOST:PORT) that answers, checked in seconds (Ray's
    own connect retries for minutes)."""
    if address in ("local", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise StarflowError(f"{field}: {address!r}; expected local, auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise StarflowError(f"{field} {address}: nothing answers there ({err.strerror or err})") from None
