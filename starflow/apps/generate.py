"""`starflow generate` as one library call: a request and a model source in, files written.

Everything a caller can get wrong (the request, every path, the output) is checked before the
engines are imported: torch, onnx and onnxruntime load in tens of seconds on a busy machine,
and a wrong flag must not wait for them. The engines are imported lazily for that reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np

from starflow.core.checks import check_fps
from starflow.core.generation import Generation, ImageGenerator, check_images_fit, counted
from starflow.core.outputs import output_kind, save_images, video_output_kind, write_video
from starflow.core.request import DEFAULT_BACKEND, DEFAULT_PRECISION, GenerateRequest, ModelSource, Resolved
from starflow.core.sampler import Progress

DEFAULT_IMAGES_OUT = Path("starflow-generate.png")
DEFAULT_CLIPS_OUT = Path("starflow-generate.gif")
GRID_COLUMNS = 8  # most tiles per grid row
# (batches, tokens of one frame or None) -> a context yielding the sampler's progress callback
Bars = Callable[[int, int | None], AbstractContextManager[Progress[int]]]


@dataclasses.dataclass
class GenerateResult:
    request: GenerateRequest
    resolved: Resolved
    generation: Generation
    out: Path
    files: list[Path]

    def lines(self) -> list[str]:
        """What was written, with which settings, and the timing line."""
        request, sampling, images = self.request, self.resolved.sampling, self.generation.images
        h, w = images.shape[-3:-1]
        what = counted(len(images), "clip" if request.clips else "image")
        if request.clips:
            what += f" of {request.frames} frames"
        where = self.out if len(self.files) == 1 else f"{self.out}/ ({counted(len(self.files), 'PNG')})"
        return [
            f"generated {what} {h}x{w} with the {request.engine} engine ({request.sampler} sampler, "
            f"{sampling.method}, guidance {sampling.guidance:g}, seed {request.seed}) -> {where}",
            self.generation.summary(),
        ]


def default_out(request: GenerateRequest) -> Path:
    return DEFAULT_CLIPS_OUT if request.clips else DEFAULT_IMAGES_OUT


def check_out(request: GenerateRequest, out: Path) -> str:
    """A destination of the right kind in a writable directory (its kind), the clips' frame rate
    one it can show, and a count some machine could hold: before anything loads."""
    if not request.clips:
        kind = output_kind(out)
    else:
        kind = video_output_kind(out)
        if request.fps is not None:
            check_fps(request.fps, kind)
    check_images_fit(len(request.prompts) * request.num_images, request.frames, request.size)
    return kind


def generate(
    request: GenerateRequest,
    source: ModelSource = ModelSource(),
    out: Path | None = None,
    *,
    export_progress: Progress[str] | None = None,
    bars: Bars | None = None,
    log: Callable[[str], None] = print,
) -> GenerateResult:
    """Check everything, open the engine, sample, write `out` (default: `default_out`).

    `export_progress` sees the steps of a first-use export of the embedded model (`log` then
    gets one line saying so); `bars` shows per-block progress while sampling."""
    out = out or default_out(request)
    source.check(request.engine)
    kind = check_out(request, out)
    generator = open_generator(request, source, export_progress, log)
    resolved = request.resolve(generator)
    if request.clips:
        check_fps(
            resolved.fps, kind, "fps" if request.fps else f"fps (the model's; pass --fps for a .{kind})"
        )
    batches = -(
        -len(request.prompts) * request.num_images // generator.images_per_batch(resolved.sampling.guidance)
    )
    frame_tokens = None
    if request.clips:
        frame_tokens = resolved.latent_size[0] * resolved.latent_size[1] // generator.multiple_of**2
    with bars(batches, frame_tokens) if bars else contextlib.nullcontext() as report:
        result = generator.generate(
            request.prompts, num_images=request.num_images, negative_prompt=request.negative_prompt,
            seed=request.seed, latent_size=resolved.latent_size, sampling=resolved.sampling,
            denoise=request.denoise, progress=report, check_finite=request.check_finite,
            frames=request.frames,
        )  # fmt: skip
    columns = min(request.num_images, GRID_COLUMNS)
    if request.clips:
        video = np.round(result.images * 255).astype(np.uint8)
        files = write_video(video, out, resolved.fps, columns=columns)
    else:
        files = save_images(out, result.images, columns=columns, prompts=result.prompts)
    return GenerateResult(request, resolved, result, out, files)


def open_generator(
    request: GenerateRequest,
    source: ModelSource = ModelSource(),
    export_progress: Progress[str] | None = None,
    log: Callable[[str], None] = print,
) -> ImageGenerator:
    """The runtime `Generator` of an export (default: the embedded model's, exported on first use:
    the digits model, or for clips the moving-digits one), or the PyTorch `ReferenceGenerator` of
    a checkpoint (default: the embedded model)."""
    source.check(request.engine)
    if request.engine == "pytorch":
        import torch

        from starflow.core.config import DEMO_VIDEO_CHECKPOINT
        from starflow.model.reference import ReferenceGenerator

        if request.threads:
            torch.set_num_threads(request.threads)
        checkpoint = source.checkpoint or (DEMO_VIDEO_CHECKPOINT if request.clips else None)
        return ReferenceGenerator.load(checkpoint, source.config, source.text_encoder, source.vae)
    from starflow.runtime import Generator

    artifacts = source.artifacts
    if artifacts is None:
        from starflow.export.cache import demo_export

        began = time.perf_counter()
        artifacts, exported = demo_export(export_progress, video=request.clips)
        if exported:
            log(f"exported the embedded demo model to {artifacts} ({time.perf_counter() - began:.1f} s)")
    return Generator.load(
        artifacts, backend=request.backend or DEFAULT_BACKEND,
        precision=request.precision or DEFAULT_PRECISION, threads=request.threads,
    )  # fmt: skip
