"""`GenerateRequest`: what to generate and how, defined and checked once for every caller.

`starflow generate` parses its flags into it, the Python API takes it, and the server takes it
as its JSON body. It is a pydantic model because one definition then gives the checks, a JSON
Schema and errors that name the field; `request()` turns pydantic's error into one
`StarflowError` line. It holds no file paths: where the model comes from (`ModelSource`) and
where the images go are the caller's arguments, so a server's client cannot name files.
`resolve(generator)` fills what the request leaves unset from the loaded export or model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from starflow.core.config import PRESETS
from starflow.core.errors import StarflowError
from starflow.core.generation import ImageGenerator
from starflow.core.limits import check_threads
from starflow.core.sampler import SampleOptions, with_overrides
from starflow.core.sampling_presets import OFFICIAL
from starflow.core.sizes import ASPECT_RATIOS

ENGINES = ("runtime", "pytorch")
BACKENDS = ("onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16")
DEFAULT_ENGINE = "runtime"
DEFAULT_BACKEND = "onnxruntime"
DEFAULT_PRECISION = "fp32"
DEFAULT_NUM_IMAGES = 1
DEFAULT_SEED = 0
RUNTIME_ONLY = ("backend", "precision")  # request fields the PyTorch engine has no use for

Count = Annotated[int, Field(strict=True, ge=1)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


MAX_SEED = 2**64 - 1


class GenerateRequest(BaseModel):
    """Images (or clips, with `frames`) of `prompts`: unset sampling settings are the model's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # what to generate
    prompts: list[str] = Field(description='One entry per prompt; "" is the unconditional one.')
    num_images: Count = Field(DEFAULT_NUM_IMAGES, description="Images (clips) per prompt.")
    # libstarflow's noise takes a uint64 seed; numpy's takes any, but the two must agree
    seed: Annotated[int, Field(strict=True, ge=0, le=MAX_SEED)] = Field(
        DEFAULT_SEED, description="Seed of the noise (0 to 2**64-1)."
    )
    size: tuple[Count, Count] | None = Field(None, description='Image [H, W] in pixels, or "HxW".')
    aspect_ratio: str | None = Field(None, description=f"A bucket W:H, one of {', '.join(ASPECT_RATIOS)}.")
    frames: Count | None = Field(None, description="Clips of this many frames (a video model).")
    fps: Annotated[Finite, Field(gt=0)] | None = Field(None, description="Clips' frame rate; the model's.")
    negative_prompt: str | None = Field(None, description='Unconditional text of the guidance ("").')
    # how
    engine: Literal["runtime", "pytorch"] = DEFAULT_ENGINE
    sampler: str = Field(OFFICIAL, description="official (the model's settings) or a calibrated preset.")
    guidance: Annotated[Finite, Field(ge=0)] | None = Field(None, description="CFG weight; the model's.")
    method: Literal["jacobi", "sequential"] | None = None
    jacobi_block_size: Count | None = None
    jacobi_max_iter: Count | None = None
    jacobi_threshold: Annotated[Finite, Field(ge=0)] | None = None
    jacobi_stop: Literal["batch", "row"] | None = Field(
        None, description='Stop test: "batch" (official, default) or "row" (each image alone; servers).'
    )
    denoise: bool = Field(True, description="The self-denoise step after the flow.")
    precision: Literal["fp32", "fp16"] | None = Field(None, description=f"runtime; {DEFAULT_PRECISION}.")
    backend: Literal["onnxruntime", "tensorrt"] | None = Field(
        None, description=f"runtime; {DEFAULT_BACKEND}."
    )
    threads: int | None = Field(None, description="CPU threads; unset: every core.")
    check_finite: bool = Field(True, description="Fail (writing nothing) on NaN or inf in a sample.")

    @field_validator("prompts")
    @classmethod
    def _some_prompt(cls, prompts: list[str]) -> list[str]:
        if not prompts:
            raise ValueError('pass at least one ("" is the unconditional prompt)')
        return prompts

    @field_validator("size", mode="before")
    @classmethod
    def _parse_size(cls, size: Any) -> Any:
        """'HxW' text (the command line's form) as well as [H, W]."""
        if not isinstance(size, str):
            return size
        try:
            sides = tuple(int(p) for p in size.lower().split("x"))
        except ValueError:
            sides = ()
        if len(sides) != 2 or min(sides) <= 0:
            raise ValueError(f"expected HxW in image pixels (for example 256x384), got {size!r}")
        return sides

    @field_validator("aspect_ratio")
    @classmethod
    def _known_ratio(cls, ratio: str | None) -> str | None:
        if ratio is not None and ratio not in ASPECT_RATIOS:
            raise ValueError(
                f"{ratio!r} unknown; choose one of {', '.join(ASPECT_RATIOS)} or give a size HxW"
            )
        return ratio

    @field_validator("threads")
    @classmethod
    def _threads(cls, threads: int | None) -> int | None:
        check_threads(threads)  # the message every command gives
        return threads

    @model_validator(mode="after")
    def _consistent(self) -> GenerateRequest:
        if self.size is not None and self.aspect_ratio is not None:
            raise ValueError("give aspect_ratio or size, not both")
        if self.fps is not None and self.frames is None:
            raise ValueError("fps: a clip option; give frames too")
        if self.engine == "pytorch":
            wrong = [name for name in RUNTIME_ONLY if getattr(self, name) is not None]
            if wrong:
                raise ValueError(f"{', '.join(wrong)}: not an option of the pytorch engine")
        return self

    @property
    def clips(self) -> bool:
        return self.frames is not None

    def resolve(self, generator: ImageGenerator) -> Resolved:
        """The sampling settings (the preset's, then every setting given here) and the latent size,
        from the loaded export or model."""
        sampling = with_overrides(
            generator.sampling(self.sampler), guidance=self.guidance, method=self.method,
            block_size=self.jacobi_block_size, max_iter=self.jacobi_max_iter, threshold=self.jacobi_threshold,
            stop=self.jacobi_stop,
        )  # fmt: skip
        sampling.check()
        generator.check_frames(self.frames)
        latent = generator.latent_size(self.aspect_ratio, self.size)
        return Resolved(sampling, latent, (self.fps or generator.fps) if self.clips else None)


@dataclasses.dataclass(frozen=True)
class Resolved:
    """What a request left to the model, filled in."""

    sampling: SampleOptions
    latent_size: tuple[int, int]  # (H, W) latent pixels
    fps: float | None  # clips only


def request(**fields: Any) -> GenerateRequest:
    """A `GenerateRequest`, or a one-line StarflowError naming the first bad field."""
    try:
        return GenerateRequest(**fields)
    except ValidationError as err:
        raise one_line(err) from None


def request_from_json(text: str | bytes) -> GenerateRequest:
    """A request from a JSON body; bad JSON or a bad field is a one-line StarflowError."""
    try:
        return GenerateRequest.model_validate_json(text)
    except ValidationError as err:
        raise one_line(err) from None


def one_line(err: ValidationError) -> StarflowError:
    """The first of pydantic's errors as 'field: what was expected, got value'."""
    first = err.errors(include_url=False)[0]
    field = ".".join(str(part) for part in first["loc"])
    message = first["msg"]
    if message.startswith(("Value error, ", "Assertion failed, ")):
        message = message.split(", ", 1)[1]  # our own validators' messages say what they got
    elif first["type"] == "extra_forbidden":
        message = f"not a request field; the fields are {', '.join(GenerateRequest.model_fields)}"
    else:
        message = f"{message[0].lower()}{message[1:]}, got {first['input']!r}"
        if first["type"] == "json_invalid":
            message = f"the request is not JSON: {first['msg']}"
    named = not field or message.startswith(f"{field}: ")  # a shared check's message names it already
    return StarflowError(message if named else f"{field}: {message}")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where the model comes from: the caller's choice, never a request's. Unset: the embedded
    model (the runtime engine exports it on first use)."""

    artifacts: Path | None = None  # runtime: an export directory
    checkpoint: Path | None = None  # pytorch: a checkpoint
    config: str | None = None  # pytorch: a preset name or the YAML config of an official .pth
    text_encoder: Path | None = None  # pytorch: a local Hugging Face encoder directory
    vae: Path | None = None  # pytorch: a local diffusers AutoencoderKL directory

    def check(self, engine: str) -> None:
        """Options of the other engine refused and every path there, before any import or work."""
        other = ("checkpoint", "config", "text_encoder", "vae") if engine == "runtime" else ("artifacts",)
        wrong = [name for name in other if getattr(self, name) is not None]
        if wrong:
            raise StarflowError(f"{', '.join(wrong)}: not an option of the {engine} engine")
        if self.artifacts is not None:
            _directory(self.artifacts, "artifacts")
            if not (self.artifacts / "manifest.json").is_file():
                raise StarflowError(
                    f"artifacts {self.artifacts}: holds no manifest.json; expected a directory written by "
                    "`starflow export onnx`"
                )
        if self.checkpoint is not None and not self.checkpoint.is_file():
            raise StarflowError(f"checkpoint {self.checkpoint}: no such file")
        if self.config is not None and self.config not in PRESETS and not Path(self.config).is_file():
            raise StarflowError(
                f"config {self.config!r}: no such file and not a preset; presets are {sorted(PRESETS)}"
            )
        for name in ("text_encoder", "vae"):
            if getattr(self, name) is not None:
                _directory(getattr(self, name), name)


def _directory(path: Path, field: str) -> None:
    if not path.is_dir():
        raise StarflowError(f"{field} {path}: no such directory")
