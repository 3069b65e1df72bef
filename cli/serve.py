"""`starflow serve`: the HTTP server on Ray Serve (local instance or a cluster), or its config file."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated, Any

import typer

from starflow.cli.errors import user_errors
from starflow.serving.config import API_KEY_ENV, EMBEDDED, ServeConfig
from starflow.serving.types import DEFAULT_TIMEOUT_S

DEPLOY = dict(rich_help_panel="Replicas (every model)")
LIMITS = dict(rich_help_panel="Limits on one request")
DEPLOY_FLAGS = ("replicas", "min_replicas", "max_replicas", "threads", "max_batch_size",
                "max_ongoing_requests", "max_queued_requests", "max_replicas_per_node")  # fmt: skip
LIMIT_FLAGS = ("max_images", "max_frames", "max_pixels", "max_guidance", "max_jacobi_iter",
               "max_prompt_chars", "max_body_bytes")  # fmt: skip
TOP_FLAGS = ("host", "port", "timeout_s")
# the flags that make a config (not with --config)
SETTINGS = ("artifacts", *TOP_FLAGS, *DEPLOY_FLAGS, "batch_wait_s", *LIMIT_FLAGS)


def serve(
    artifacts: Annotated[
        list[str] | None,
        typer.Option(
            help=f"NAME=DIR: serve the export in DIR as NAME (repeatable); default {', '.join(EMBEDDED)}."
        ),
    ] = None,
    host: Annotated[str | None, typer.Option(help="The HTTP address; default 127.0.0.1.")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="The HTTP port; default 8000.")] = None,
    address: Annotated[
        str | None,
        typer.Option(
            help="Deploy onto this Ray cluster (auto, HOST:PORT or ray://HOST:PORT); default: a "
            "local Ray instance, stopped on exit."
        ),
    ] = None,  # fmt: skip
    config: Annotated[
        Path | None, typer.Option(help="Serve what this Ray Serve config file (--write-config's) says.")
    ] = None,
    write_config: Annotated[
        Path | None,
        typer.Option(help="Write the Ray Serve config file of these flags (serve deploy, KubeRay) and exit."),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar=API_KEY_ENV, help="Require this bearer token on every route but /healthz and the docs."
        ),
    ] = None,
    timeout_s: Annotated[
        float | None,
        typer.Option(min=0.001, help=f"Per request (503 beyond it); default {DEFAULT_TIMEOUT_S:g}."),
    ] = None,
    replicas: Annotated[
        int | None, typer.Option(min=1, help="Replicas per model; default 1.", **DEPLOY)
    ] = None,
    min_replicas: Annotated[
        int | None, typer.Option(min=0, help="Autoscaling lower bound.", **DEPLOY)
    ] = None,
    max_replicas: Annotated[
        int | None, typer.Option(min=1, help="Autoscaling upper bound.", **DEPLOY)
    ] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="CPU threads per replica; default every core.", **DEPLOY)
    ] = None,
    max_batch_size: Annotated[
        int | None, typer.Option(min=1, help="Requests one sampler call gathers; default 8.", **DEPLOY)
    ] = None,
    batch_wait_s: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="An idle replica's wait for more requests; default 0 (a busy one gathers them anyway).",
            **DEPLOY,
        ),
    ] = None,
    max_ongoing_requests: Annotated[
        int | None, typer.Option(min=1, help="Requests one replica takes at a time; default 16.", **DEPLOY)
    ] = None,
    max_queued_requests: Annotated[
        int | None, typer.Option(min=1, help="Queued beyond those (then 429 at once); default 64.", **DEPLOY)
    ] = None,
    max_replicas_per_node: Annotated[
        int | None, typer.Option(min=1, help="1 spreads the replicas over the nodes.", **DEPLOY)
    ] = None,
    max_images: Annotated[
        int | None, typer.Option(min=1, help="Prompts x images; default 8.", **LIMITS)
    ] = None,
    max_frames: Annotated[int | None, typer.Option(min=1, help="Default: the export's.", **LIMITS)] = None,
    max_pixels: Annotated[int | None, typer.Option(min=1, help="H x W of an image.", **LIMITS)] = None,
    max_guidance: Annotated[float | None, typer.Option(min=0, help="Default 20.", **LIMITS)] = None,
    max_jacobi_iter: Annotated[
        int | None, typer.Option(min=1, help="Jacobi iterations per chunk; default 128.", **LIMITS)
    ] = None,
    max_prompt_chars: Annotated[int | None, typer.Option(min=1, help="Default 2000.", **LIMITS)] = None,
    max_body_bytes: Annotated[int | None, typer.Option(min=1, help="Default 1 MiB.", **LIMITS)] = None,
) -> None:
    """Serve the exports over HTTP (OpenAI Images API, /v1/generate, /v1/likelihood, /docs) on Ray
    Serve until Ctrl-C; every setting is checked before Ray starts."""
    fields = dict(locals())
    from starflow.core.errors import StarflowError
    from starflow.serving import config as C

    with user_errors():
        if config is not None:
            given = [f"--{name.replace('_', '-')}" for name in SETTINGS if fields[name] is not None]
            if given or write_config is not None:
                flags = ", ".join(given + (["--write-config"] if write_config is not None else []))
                raise StarflowError(f"--config: the file holds the settings; drop {flags}")
            settings = C.read_config(config)
        else:
            settings = _settings(fields)
        if api_key is not None:
            settings = settings.model_copy(update={"api_key_env": settings.api_key_env or API_KEY_ENV})
        if write_config is not None:
            C.write_config(settings, write_config)
            typer.echo(f"wrote {write_config} (serve deploy it, or starflow serve --config it)")
            return
        key = api_key if api_key is not None else settings.api_key()
        if address is None:
            C.check_local(settings)
            _export_embedded(settings)
        else:
            C.check_ray_address(address, "address")  # in seconds: Ray's own connect retries for minutes
    _run(settings, address, key)


def _settings(fields: dict[str, Any]) -> ServeConfig:
    """The flags as a `ServeConfig`: each model gets the replica flags."""
    from starflow.core.errors import StarflowError
    from starflow.serving.config import serve_config

    deploy = {name: fields[name] for name in DEPLOY_FLAGS}
    deploy["batch_wait_timeout_s"] = fields["batch_wait_s"]
    deploy = {name: value for name, value in deploy.items() if value is not None}
    models: dict[str, dict[str, Any]] = {}
    for item in fields["artifacts"] or []:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            raise StarflowError(f"--artifacts: expected NAME=DIR, got {item!r}")
        if name in models:
            raise StarflowError(f"--artifacts: {name} given twice")
        models[name] = {"artifacts": str(Path(directory).expanduser().resolve()), **deploy}
    if not models:
        models = {name: {"embedded": name, **deploy} for name in EMBEDDED}
    limits = {name: fields[name] for name in LIMIT_FLAGS if fields[name] is not None}
    top = {name: fields[name] for name in TOP_FLAGS if fields[name] is not None}
    return serve_config(models=models, limits=limits, **top)


def _export_embedded(settings: ServeConfig) -> None:
    """Export the embedded models once here, with progress, so the replicas find them cached."""
    from starflow.cli.progress import step_lines
    from starflow.export.cache import demo_artifacts

    for name in sorted({m.embedded for m in settings.models.values() if m.embedded}):
        demo_artifacts(step_lines(f"export ({name}): "), video=name == "digits-video")


def _run(settings: ServeConfig, address: str | None, api_key: str | None) -> None:
    """Start, say where, block until Ctrl-C (or SIGTERM), then stop what was started."""
    from starflow.serving.deployment import start, stop

    # Ctrl-C and a service manager's stop both clean up, even where SIGINT came ignored (a
    # background job of a non-interactive shell inherits SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with user_errors("interrupted while starting: what had started was stopped"):
        running = start(settings, address=address, api_key=api_key)
    try:
        models = ", ".join(settings.models)
        typer.echo(f"serving {models} at {running.url} (docs {running.url}/docs); first answer after "
                   f"{running.seconds:.1f} s")  # fmt: skip
        if running.metrics_url:
            typer.echo(f"metrics: {running.metrics_url}")
        typer.echo("Ctrl-C stops")
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        for stop_signal in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the stop short
            signal.signal(stop_signal, signal.SIG_IGN)
        stop(running)
    typer.echo("stopped")
