"""What the server and the bulk job exchange: the request body, a model's description, the limits
a server puts on requests, and a served result. Torch-free and Ray-free, so the HTTP app, the Ray
deployments, the bulk job and their tests share one definition.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from starflow.core.errors import StarflowError
from starflow.core.request import GenerateRequest

# What a client may not choose: the server's configuration (its engine, backend, precision and threads)
SERVER_FIELDS = ("engine", "backend", "precision", "threads")
IMAGE_FORMATS = ("png", "npy")
CLIP_FORMATS = ("gif", "mp4", "npy", "png")  # png: one PNG per frame
DEFAULT_TIMEOUT_S = 300.0  # a request's answer, or 503


class ServeRequest(GenerateRequest):
    """`POST /v1/generate`'s body: a `GenerateRequest` naming the model and the output format."""

    model: str | None = Field(None, description="A served model's name; default: the first one.")
    output_format: Literal["png", "gif", "mp4", "npy"] | None = Field(
        None, description="png for images, gif for clips by default; npy: float32 arrays in [0, 1]."
    )

    @model_validator(mode="after")
    def _no_server_settings(self) -> ServeRequest:
        wrong = [name for name in SERVER_FIELDS if name in self.model_fields_set]
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: set by the server, not by a request")
        return self

    def generate_request(self) -> GenerateRequest:
        """The request without the serving fields, as every engine takes it."""
        return GenerateRequest(**self.model_dump(exclude={"model", "output_format"}, exclude_unset=True))


class Limits(BaseModel):
    """Bounds a server puts on one request, before it is queued (each configurable)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_images: Annotated[int, Field(ge=1)] = 8  # prompts x num_images
    max_frames: Annotated[int, Field(ge=1)] | None = None  # None: the export's maximum
    max_pixels: Annotated[int, Field(ge=1)] = 1024 * 1024  # height x width of one image
    max_guidance: Annotated[float, Field(ge=0)] = 20.0
    max_jacobi_iter: Annotated[int, Field(ge=1)] = 128  # per chunk (threshold 0 runs every one)
    max_prompt_chars: Annotated[int, Field(ge=1)] = 2000
    max_body_bytes: Annotated[int, Field(ge=1)] = 1 << 20

    def check(self, request: GenerateRequest, model: ModelInfo) -> None:
        """A one-line StarflowError naming the first field over its bound."""
        images = len(request.prompts) * request.num_images
        if images > self.max_images:
            raise StarflowError(f"num_images: {images} images asked; this server allows {self.max_images}")
        for field, texts in (
            ("prompts", request.prompts),
            ("negative_prompt", [request.negative_prompt or ""]),
        ):
            longest = max(len(p) for p in texts)
            if longest > self.max_prompt_chars:
                raise StarflowError(
                    f"{field}: a prompt of {longest} characters; this server allows {self.max_prompt_chars}"
                )
        if request.jacobi_max_iter is not None and request.jacobi_max_iter > self.max_jacobi_iter:
            raise StarflowError(
                f"jacobi_max_iter: {request.jacobi_max_iter}; at most {self.max_jacobi_iter} here"
            )
        if request.frames is not None and model.frames is not None:
            most = min(self.max_frames or model.frames[1], model.frames[1])
            if not model.frames[0] <= request.frames <= most:
                raise StarflowError(
                    f"frames: {request.frames}; this server allows {model.frames[0]} .. {most}"
                )
        if request.size is not None and request.size[0] * request.size[1] > self.max_pixels:
            raise StarflowError(
                f"size: {request.size[0]}x{request.size[1]}; at most {self.max_pixels} pixels"
            )
        if request.guidance is not None and request.guidance > self.max_guidance:
            raise StarflowError(
                f"guidance: {request.guidance:g}; this server allows at most {self.max_guidance:g}"
            )


class ModelInfo(BaseModel):
    """A served export as `GET /v1/models` lists it (sizes in image pixels)."""

    name: str
    kind: Literal["image", "video"]
    text_conditioned: bool
    prompts: list[str] | None  # a label-table model's known prompts (None: free text)
    size: tuple[int, int]  # the training size (H, W)
    min_size: tuple[int, int]
    max_size: tuple[int, int]
    multiple_of: int  # both sides are multiples of this
    frames: tuple[int, int] | None  # video: the frame range
    fps: float | None
    samplers: list[str]  # "official" and the export's calibrated presets
    default_guidance: float
    images_per_call: int  # the most images one sampler call holds (without guidance)
    channels: int  # latent channels
    pixel_space: bool  # the decoder is the identity: images are latents (/v1/likelihood takes images)


@dataclasses.dataclass
class Served:
    """One request's images, with what it cost (the sampler call it shared)."""

    images: np.ndarray  # (N, H, W, C) float32 in [0, 1]; clips (N, T, H, W, C)
    prompts: list[str]  # the prompt of each image
    seed: int
    fps: float | None  # clips
    iterations: list[int]  # Jacobi iterations of each image over every block
    batch_requests: int  # requests in the shared call
    batch_images: int  # images in the shared call
    block_calls: int  # flow block calls of the sampler calls that held these images
    seconds: dict[str, float]  # text, flow, denoise, decode, total of the shared call
    # where it ran, for the response headers X-Starflow-<Key> (a Ray replica sets "node", "replica")
    served_by: dict[str, str] = dataclasses.field(default_factory=dict)
