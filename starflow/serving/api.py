"""The HTTP app of `starflow serve`: one FastAPI app over named models, each behind a `ModelClient`.

The app checks and answers; the clients generate. Ray Serve's deployments give it clients that
call model replicas (`deployment.py`); `LocalClient` runs a `ModelWorker` in this process (tests,
embedding without Ray). Routes:

- `POST /v1/images/generations`: the OpenAI Images API (prompt, n, size "WIDTHxHEIGHT",
  response_format b64_json) with our request's options as extra fields (seed, guidance, ...);
- `POST /v1/generate`: a `ServeRequest`, images as base64 png / npy (clips gif / mp4 / npy / png
  frames) with what they cost;
- `POST /v1/likelihood`: bits per dimension of given images (pixel-space models) or latents;
- `GET /v1/models`, `GET /v1/models/{name}`, `GET /healthz`, the OpenAPI docs at `/docs`.

Errors are OpenAI's shape, `{"error": {"message", "type"}}`, never a traceback: 400 a bad body,
field or limit, or a request the model refuses (the message names the field); 401 a missing or
wrong bearer token (`api_key`; /healthz and the docs stay open); 404 an unknown model or route;
413 a body over `Limits.max_body_bytes`; 429 / 503 with Retry-After when a client raises
`Overloaded` (a full queue / no replica free), 503 too when no answer came within `timeout_s`
(the caller may retry; overload is never a hang); 500 anything else, logged here with its
traceback. One log line per request goes to the "starflow.serve" logger.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hmac
import io
import logging
import math
import threading
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import anyio.to_thread
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from starflow.core.errors import StarflowError
from starflow.core.outputs import clip_bytes, from_unit_images, imageio_for_mp4, png_bytes, to_uint8
from starflow.core.request import Count, GenerateRequest, one_line
from starflow.core.request import request as checked_request
from starflow.serving.types import (
    CLIP_FORMATS,
    DEFAULT_TIMEOUT_S,
    IMAGE_FORMATS,
    SERVER_FIELDS,
    Limits,
    ModelInfo,
    Served,
    ServeRequest,
)

if TYPE_CHECKING:
    from starflow.serving.worker import ModelWorker

log = logging.getLogger("starflow.serve")
T = TypeVar("T")
OPEN_PATHS = ("/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json")  # no token needed
LOGGED = ("model", "images", "batch_requests", "batch_images")  # what a route tells the log line
SERVED_BY_HEADER = "X-Starflow-"  # + Served.served_by's key, capitalised: X-Starflow-Node, X-Starflow-Replica


# ---- what the app calls ---------------------------------------------------------------------------
class Overloaded(Exception):
    """Raised by a `ModelClient` that cannot take a request now: 503 (no replica free) or 429
    (too many requests queued), answered at once with Retry-After."""

    def __init__(self, message: str, *, status: Literal[429, 503] = 503, retry_after_s: float = 1.0):
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class ModelClient(Protocol):
    """One served model as the app sees it."""

    info: ModelInfo

    async def generate(self, request: GenerateRequest) -> Served:
        """The request's images; a StarflowError for a request the model refuses, `Overloaded`
        when it cannot take it now."""
        ...

    async def bits_per_dim(self, latents: np.ndarray, prompts: list[str] | None) -> list[float]:
        """Each latent's bits per dimension (`ModelWorker.bits_per_dim`)."""
        ...


class LocalClient:
    """A `ModelClient` over a `ModelWorker` in this process: one call at a time, in a worker
    thread so the event loop keeps answering; a caller that gave up (timeout) before its turn
    costs no work."""

    def __init__(self, worker: ModelWorker):
        self.worker = worker
        self.info = worker.info()
        self._lock = threading.Lock()

    async def generate(self, request: GenerateRequest) -> Served:
        (outcome,) = await self._run(self.worker.run, [request])
        if isinstance(outcome, StarflowError):
            raise outcome
        return outcome

    async def bits_per_dim(self, latents: np.ndarray, prompts: list[str] | None) -> list[float]:
        return await self._run(self.worker.bits_per_dim, latents, prompts)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        gone = threading.Event()

        def turn() -> T:
            with self._lock:
                if gone.is_set():
                    raise StarflowError("the caller gave up before its turn")  # nobody reads this
                return fn(*args)

        try:
            return await anyio.to_thread.run_sync(turn, abandon_on_cancel=True)
        finally:
            gone.set()


# ---- request and response bodies ---------------------------------------------------------------------
# GenerateRequest's options the OpenAI route takes as extra fields (prompt, n and size are OpenAI's)
OPTIONS = {
    name: (field.annotation, field)
    for name, field in GenerateRequest.model_fields.items()
    if name not in ("prompts", "num_images", "size", *SERVER_FIELDS)
}
IGNORED = ("quality", "style", "user", "moderation", "safety_identifier")  # OpenAI hints with no meaning here

ImagesRequest = create_model(
    "ImagesRequest",
    __config__=ConfigDict(extra="forbid", frozen=True),
    __doc__="OpenAI's image request; our options as extra fields (the openai package's `extra_body`).",
    prompt=(str, Field(description='The prompt ("" is the unconditional one).')),
    model=(str | None, Field(None, description="A served model's name; default: the first one.")),
    n=(Count | None, Field(None, description="Images (1).")),
    size=(str | None, Field(None, description='"WIDTHxHEIGHT" in pixels, or "auto": the model\'s size.')),
    response_format=(Literal["b64_json", "url"] | None, Field(None, description="b64_json only.")),
    output_format=(Literal["png", "gif"] | None, Field(None, description="png (images), gif (clips).")),
    stream=(Literal[False] | None, Field(None, description="false only: one answer, no events.")),
    **{name: (str | None, Field(None, description="Accepted and ignored.")) for name in IGNORED},
    **OPTIONS,
)  # fmt: skip


class ImageData(BaseModel):
    b64_json: str  # a PNG (a clip: an animated GIF)


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str
    size: str  # WIDTHxHEIGHT


class GenerateResponse(BaseModel):
    model: str
    output_format: str
    images: list[str] | list[list[str]] = Field(
        description="Base64, one per image or clip: png (the exact pixels), npy (float32 in [0, 1]); "
        "clips gif or mp4 (shown as `starflow generate` writes them), npy, or png: a list of frames each."
    )
    prompts: list[str]  # each image's
    seed: int
    size: tuple[int, int]  # (H, W) pixels
    frames: int | None
    fps: float | None
    iterations: list[int]  # each image's Jacobi iterations over every block
    batch_requests: int  # requests in the sampler call this one shared
    batch_images: int
    block_calls: int
    seconds: dict[str, float]  # per stage of the shared call


class LikelihoodRequest(BaseModel):
    """Samples to score: base64 .npy arrays or nested lists, images or latents (one of them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(None, description="A served model's name; default: the first one.")
    images: str | list[Any] | None = Field(
        None, description="(N, H, W, C) in [0, 1] (clips (N, T, H, W, C)); pixel-space models only."
    )
    latents: str | list[Any] | None = Field(None, description="(N, C, h, w) (clips (N, T, C, h, w)).")
    prompts: list[str] | None = Field(None, description="One per sample (text models).")


class LikelihoodResponse(BaseModel):
    model: str
    bits_per_dim: list[float]  # per sample


class ModelCard(ModelInfo):
    """OpenAI's model object with what `ModelInfo` says."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "starflow"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- the app ---------------------------------------------------------------------------------------
def create_app(
    models: dict[str, ModelClient],
    *,
    limits: Limits = Limits(),
    api_key: str | None = None,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> FastAPI:
    """The app serving `models` by name (the first is the default)."""
    if not models:
        raise StarflowError("models: serve at least one")
    started = int(time.time())
    default = next(iter(models))
    app = FastAPI(
        title="starflow", summary="Text-to-image and text-to-video flows: generation and exact likelihoods."
    )
    app.add_middleware(_Gate, api_key=api_key, max_body_bytes=limits.max_body_bytes)

    @app.exception_handler(StarflowError)
    async def refused(_: Request, err: StarflowError) -> JSONResponse:
        return _error(400, "invalid_request_error", str(err))

    @app.exception_handler(_NotFound)
    async def not_found(_: Request, err: _NotFound) -> JSONResponse:
        return _error(404, "not_found_error", str(err))

    @app.exception_handler(Overloaded)
    async def overloaded(_: Request, err: Overloaded) -> JSONResponse:
        kind = "rate_limit_error" if err.status == 429 else "overloaded_error"
        return _error(err.status, kind, str(err), {"Retry-After": str(math.ceil(err.retry_after_s))})

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return _error(
            err.status_code, kind, f"{err.detail}: {request.method} {request.url.path}", err.headers
        )

    def client(name: str | None, request: Request) -> tuple[str, ModelClient]:
        name = name or default
        request.state.model = name
        if name not in models:
            raise _NotFound(f"model: {name!r} is not served here; the models are {', '.join(models)}")
        return name, models[name]

    async def answer(call: Coroutine[Any, Any, T]) -> T:
        """`call`'s result, or 503 when none came within `timeout_s`."""
        try:
            return await asyncio.wait_for(call, timeout_s)
        except TimeoutError:
            raise Overloaded(f"no answer within {timeout_s:g} s; retry later") from None

    async def serve(
        request: Request, model: ModelClient, job: GenerateRequest, kind: str
    ) -> tuple[Served, list[str] | list[list[str]]]:
        """The job's images, and each encoded as `kind` in base64."""
        limits.check(job, model.info)
        served = await answer(model.generate(job))
        request.state.images = len(served.images)
        request.state.batch_requests = served.batch_requests
        request.state.batch_images = served.batch_images
        if "queue" in served.seconds:
            request.state.queue_s = served.seconds["queue"]
        return served, await run_in_threadpool(_encode, served.images, kind, served.fps)

    def headers(served: Served) -> dict[str, str]:
        return {f"{SERVED_BY_HEADER}{key.capitalize()}": value for key, value in served.served_by.items()}

    @app.post(
        "/v1/images/generations", response_model=ImagesResponse, openapi_extra=_body(ImagesRequest),
        summary="Generate images (OpenAI Images API)",
    )  # fmt: skip
    async def images(request: Request) -> JSONResponse:
        body = _parse(ImagesRequest, await request.body())
        if body.response_format == "url":
            raise StarflowError("response_format: url is not supported; this server answers b64_json only")
        name, model = client(body.model, request)
        options = body.model_dump(include=set(OPTIONS), exclude_unset=True)
        job = checked_request(
            prompts=[body.prompt], num_images=body.n or 1, size=_openai_size(body.size), **options
        )
        kind = _output_format(body.output_format, job.clips, ("gif",) if job.clips else ("png",))
        served, encoded = await serve(request, model, job, kind)
        h, w = served.images.shape[-3:-1]
        response = ImagesResponse(
            created=int(time.time()), data=[ImageData(b64_json=item) for item in encoded], output_format=kind,
            size=f"{w}x{h}",
        )  # fmt: skip
        return JSONResponse(response.model_dump(), headers=headers(served))

    @app.post(
        "/v1/generate", response_model=GenerateResponse, openapi_extra=_body(ServeRequest),
        summary="Generate images or clips with every option",
    )  # fmt: skip
    async def generate(request: Request) -> JSONResponse:
        body = _parse(ServeRequest, await request.body())
        name, model = client(body.model, request)
        job = body.generate_request()
        kind = _output_format(body.output_format, job.clips, CLIP_FORMATS if job.clips else IMAGE_FORMATS)
        served, encoded = await serve(request, model, job, kind)
        response = GenerateResponse(
            model=name, output_format=kind, images=encoded, prompts=served.prompts, seed=served.seed,
            size=served.images.shape[-3:-1], frames=job.frames, fps=served.fps, iterations=served.iterations,
            batch_requests=served.batch_requests, batch_images=served.batch_images,
            block_calls=served.block_calls, seconds=served.seconds,
        )  # fmt: skip
        return JSONResponse(response.model_dump(), headers=headers(served))

    @app.post(
        "/v1/likelihood", response_model=LikelihoodResponse, openapi_extra=_body(LikelihoodRequest),
        summary="Bits per dimension of images or latents (exact: the model is a flow)",
    )  # fmt: skip
    async def likelihood(request: Request) -> LikelihoodResponse:
        body = _parse(LikelihoodRequest, await request.body())
        name, model = client(body.model, request)
        latents = _latents(body, model.info)  # how many and how long: bounded by the body's size
        bits = await answer(model.bits_per_dim(latents, body.prompts))
        request.state.images = len(latents)
        return LikelihoodResponse(model=name, bits_per_dim=bits)

    @app.get("/v1/models", response_model=ModelList, summary="The models served")
    async def list_models() -> ModelList:
        return ModelList(data=[_card(name, m.info, started) for name, m in models.items()])

    @app.get("/v1/models/{name}", response_model=ModelCard, summary="One served model")
    async def show_model(name: str, request: Request) -> ModelCard:
        return _card(name, client(name, request)[1].info, started)

    @app.get("/healthz", summary="Liveness (no token needed)")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "models": list(models)}

    return app


# ---- checks and conversions ------------------------------------------------------------------------
class _NotFound(Exception):
    """An unknown model (404)."""


M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], body: bytes) -> M:
    """The JSON body as `model`, or one line naming the first bad field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        if first["type"] != "extra_forbidden":
            raise one_line(err) from None
        field = ".".join(str(part) for part in first["loc"])
        if field in SERVER_FIELDS:
            raise StarflowError(f"{field}: set by the server, not by a request") from None
        fields = [name for name in model.model_fields if name not in SERVER_FIELDS]
        raise StarflowError(
            f"{field}: not a field of this request; the fields are {', '.join(fields)}"
        ) from None


def _body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of a route that parses its body itself (`_parse`: one-line errors)."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _openai_size(size: str | None) -> tuple[int, int] | None:
    """OpenAI's "WIDTHxHEIGHT" -> our (H, W); "auto" or unset: the model's size."""
    if size is None or size == "auto":
        return None
    try:
        width, height = (int(side) for side in size.lower().split("x"))
    except ValueError:
        raise StarflowError(
            f'size: expected "WIDTHxHEIGHT" in pixels (for example 256x384) or "auto", got {size!r}'
        ) from None
    return height, width


def _output_format(asked: str | None, clips: bool, formats: tuple[str, ...]) -> str:
    """The output format (default: the first of the route's `formats`), checked before any work."""
    kind = asked or formats[0]
    if kind not in formats:
        what = "clips" if clips else "images"
        raise StarflowError(
            f"output_format: {kind} is not a format for {what}; choose one of {', '.join(formats)}"
        )
    if kind == "mp4":
        imageio_for_mp4("output_format mp4")
    return kind


def _encode(images: np.ndarray, kind: str, fps: float | None) -> list[str] | list[list[str]]:
    """Each image or clip as base64 of a `kind` file (in memory)."""
    if kind == "npy":
        return [_b64(_npy(x.astype(np.float32))) for x in images]
    pixels = to_uint8(images)
    if images.ndim == 4:
        return [_b64(png_bytes(p)) for p in pixels]
    if kind == "png":
        return [[_b64(png_bytes(frame)) for frame in clip] for clip in pixels]
    return [_b64(clip_bytes(clip, kind, fps or 0.0)) for clip in pixels]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _npy(array: np.ndarray) -> bytes:
    f = io.BytesIO()
    np.save(f, array)
    return f.getvalue()


def _array(value: str | list[Any], field: str) -> np.ndarray:
    """A base64 .npy array or nested lists of numbers -> finite float32."""
    if isinstance(value, str):
        try:
            array = np.load(io.BytesIO(base64.b64decode(value, validate=True)), allow_pickle=False)
        except (binascii.Error, ValueError, OSError, EOFError) as err:
            raise StarflowError(f"{field}: expected a base64 .npy array ({err})") from None
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu":
            raise StarflowError(f"{field}: expected a base64 .npy array of numbers")
    else:
        try:
            array = np.asarray(value, dtype=np.float32)
        except (ValueError, TypeError):
            raise StarflowError(
                f"{field}: expected nested lists of numbers, every row the same length"
            ) from None
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise StarflowError(f"{field}: holds NaN or inf")
    return array


def _latents(body: LikelihoodRequest, info: ModelInfo) -> np.ndarray:
    """The latents to score: given, or a pixel-space model's images converted."""
    if (body.images is None) == (body.latents is None):
        raise StarflowError("images, latents: give one of them")
    field = "images" if body.images is not None else "latents"
    array = _array(body.images if body.images is not None else body.latents, field)  # type: ignore[arg-type]
    clips = info.kind == "video"
    if field == "images":
        axes, channel = ("(N, T, H, W, C)", -1) if clips else ("(N, H, W, C)", -1)
    else:
        axes, channel = ("(N, T, C, h, w)", 2) if clips else ("(N, C, h, w)", 1)
    if array.ndim != len(axes.split(",")) or array.shape[0] < 1 or array.shape[channel] != info.channels:
        raise StarflowError(
            f"{field}: expected {axes} with N >= 1 and C = {info.channels} for the {info.kind} model "
            f"{info.name}, got shape {array.shape}"
        )
    if field == "latents":
        return array
    if not info.pixel_space:
        raise StarflowError(f"images: model {info.name} decodes latents to images; give its latents instead")
    return from_unit_images(array)


def _card(name: str, info: ModelInfo, created: int) -> ModelCard:
    return ModelCard(id=name, created=created, **info.model_dump())


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)


# ---- every request: the token, the body's size, the catch-all error, the log line ---------------------
class _TooLarge(Exception):
    """The body grew past the limit while being read."""


@dataclasses.dataclass
class _Gate:
    """Pure ASGI middleware: refuses a missing or wrong token before the body is read and a body
    over `max_body_bytes` (by its Content-Length, else while it is read), turns an unexpected
    exception into a logged generic 500, and writes one log line per request from what the route
    put in `request.state`."""

    app: ASGIApp
    api_key: str | None
    max_body_bytes: int

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        began = time.perf_counter()
        state = scope.setdefault("state", {})
        status = 0
        read = 0

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        async def receiving() -> Message:
            nonlocal read
            message = await receive()
            read += len(message.get("body", b""))
            if read > self.max_body_bytes:
                raise _TooLarge
            return message

        too_large = _error(
            413, "request_too_large", f"the body is over this server's limit of {self.max_body_bytes} bytes"
        )
        headers = Headers(scope=scope)
        length = headers.get("content-length", "")
        try:
            if self.api_key is not None and scope["path"] not in OPEN_PATHS and not self._authorised(headers):
                refusal = _error(
                    401, "authentication_error", "missing or wrong token: send Authorization: Bearer KEY"
                )
                refusal.headers["WWW-Authenticate"] = "Bearer"
                await refusal(scope, receive, sending)
            elif length.isdigit() and int(length) > self.max_body_bytes:
                await too_large(scope, receive, sending)
            else:
                await self.app(scope, receiving, sending)
        except _TooLarge:
            if not status:
                await too_large(scope, receive, sending)
        except Exception:
            log.exception("%s %s failed", scope["method"], scope["path"])
            if not status:
                await _error(500, "server_error", "internal error; the server logged it")(
                    scope, receive, sending
                )
        finally:
            told = " ".join(f"{key}={state[key]}" for key in LOGGED if key in state)
            queue = f" queue={state['queue_s']:.3f}s" if "queue_s" in state else ""
            seconds = time.perf_counter() - began
            log.info("%s %s %d %.3fs %s%s", scope["method"], scope["path"], status, seconds, told, queue)

    def _authorised(self, headers: Headers) -> bool:
        assert self.api_key is not None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        )
