"""Choosing the engine behind `starflow generate`, and its progress bars."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from starflow.cli.progress import block_bars, step_lines
from starflow.core.errors import StarflowError
from starflow.core.limits import check_threads
from starflow.core.sampler import Progress, SampleOptions

ENGINES = ("runtime", "pytorch")


def open_generator(
    engine: str,
    *,
    artifacts: Path | None,
    checkpoint: Path | None,
    config: str | None,
    text_encoder: Path | None,
    vae: Path | None,
    backend: str,
    precision: str,
    threads: int | None,
    video: bool = False,
) -> Any:
    """The runtime `Generator` of an export (by default the embedded model's, exported on first
    use: the digits model, or with `video` the moving-digits one), or the PyTorch
    `ReferenceGenerator` of a checkpoint; options of the other engine are refused."""
    if engine not in ENGINES:
        raise StarflowError(f"--engine: expected one of {list(ENGINES)}, got {engine!r}")
    check_threads(threads)
    other_engine = {
        "pytorch": {
            "--artifacts": artifacts,
            "--backend": backend != "onnxruntime",
            "--precision": precision != "fp32",
        },
        "runtime": {
            "--checkpoint": checkpoint,
            "--config": config,
            "--text-encoder": text_encoder,
            "--vae": vae,
        },
    }[engine]
    wrong = [flag for flag, value in other_engine.items() if value]
    if wrong:
        raise StarflowError(f"{', '.join(wrong)}: not an option of the {engine} engine")
    if engine == "pytorch":
        import torch

        from starflow.model.reference import ReferenceGenerator

        if threads:
            torch.set_num_threads(threads)
        if checkpoint is None and video:
            from starflow.core.config import DEMO_VIDEO_CHECKPOINT

            checkpoint = DEMO_VIDEO_CHECKPOINT
        return ReferenceGenerator.load(checkpoint, config, text_encoder, vae)
    from starflow.runtime import Generator

    if artifacts is None:
        from starflow.export.cache import demo_artifacts

        began = time.perf_counter()
        artifacts = demo_artifacts(step_lines("export: "), video=video)
        if time.perf_counter() - began > 1:
            typer.echo(
                f"exported the embedded demo model to {artifacts} ({time.perf_counter() - began:.1f} s)",
                err=True,
            )
    return Generator.load(artifacts, backend=backend, precision=precision, threads=threads)


@contextlib.contextmanager
def progress_bars(
    generator: Any, images: int, sampling: SampleOptions, frame_tokens: int | None = None
) -> Iterator[Progress]:
    """Per-block bars over every batch the generator will sample (frames of clips, given the
    tokens of one frame)."""
    batches = -(-images // generator.images_per_batch(sampling.guidance)) if images > 0 else 1
    with block_bars(batches, frame_tokens) as report:
        yield report
