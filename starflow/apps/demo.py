"""`starflow demo`: the embedded digits model, exported on first use, drawn through the torch-free
runtime, and timed against the PyTorch reference on the same noise (unless `pytorch=False`: the
runtime alone, without loading torch once the export is cached); then a clip of every digit from
the embedded moving-digits video model, through the runtime too."""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import numpy as np

from starflow.apps.timing import interleaved
from starflow.core.checks import check_count, check_fps
from starflow.core.errors import StarflowError
from starflow.core.generation import Generation, ImageGenerator, check_images_fit, check_seed
from starflow.core.limits import check_threads
from starflow.core.outputs import output_kind, save_png, video_output_kind, write_video
from starflow.core.sampler import Progress
from starflow.export.cache import demo_artifacts
from starflow.runtime.generator import Generator

DIGITS = [str(d) for d in range(10)]


@dataclasses.dataclass
class DemoResult:
    out: Path
    per_digit: int
    runtime: Generation
    runtime_seconds: float  # median of the interleaved rounds
    reference_seconds: float | None  # None: the PyTorch reference was not timed
    max_difference: float | None  # max |runtime - reference| over every pixel
    threads: int  # both engines'
    rounds: int
    load: tuple[float, float]  # the 1-minute load average before and after the timing
    video_out: Path | None = None
    video: Generation | None = None  # one clip of every digit

    def lines(self) -> list[str]:
        n, r = len(self.runtime.images), self.runtime_seconds
        if self.reference_seconds is not None:
            engines = (
                f"PyTorch reference: {self.reference_seconds:.2f} s; runtime (ONNX Runtime, no torch): "
                f"{r:.2f} s for the same {n} images ({self.reference_seconds / r:.2f}x); "
                f"max pixel difference {self.max_difference:.1e}"
            )
        else:
            engines = f"runtime (ONNX Runtime, no torch): {r:.2f} s for {n} images (PyTorch not timed)"
        return [
            f"wrote {self.out.resolve()}: {self.per_digit} samples of each digit 0-9 (columns), "
            "through the runtime",
            engines,
            f"timing: medians of {self.rounds} {'interleaved ' if self.reference_seconds else ''}rounds, "
            f"{self.threads} threads each, "
            f"load average {self.load[0]:.2f} -> {self.load[1]:.2f} on {os.cpu_count()} cores",
            "runtime " + self.runtime.summary(),
        ] + ([] if self.video is None else [
            f"wrote {self.video_out.resolve()}: one {self.video.images.shape[1]}-frame clip of each "
            "digit 0-9 from the moving-digits video model, through the runtime",
            "runtime " + self.video.summary(),
        ])  # fmt: skip


def run_demo(
    out: Path,
    per_digit: int = 4,
    seed: int = 0,
    threads: int | None = None,
    export_progress: Progress[str] | None = None,
    rounds: int = 3,
    video_out: Path | None = None,
    frames: int = 8,
    video_export_progress: Progress[str] | None = None,
    pytorch: bool = True,
) -> DemoResult:
    """Draw `per_digit` samples of every digit into the PNG grid `out` (column = digit), and time
    both engines at the same explicit thread count (default: every core) in `rounds` alternating
    rounds: torch's default OpenMP threads collapse when other jobs share the cores, which made
    one-shot timings of the two engines incomparable. With `video_out` (a .gif or .mp4), one
    `frames`-frame clip of every digit from the embedded video model goes there. `pytorch=False`
    times the runtime alone."""
    if out.suffix != ".png":
        raise StarflowError(f"out {out}: the demo writes a .png grid")
    output_kind(out)
    video_kind = video_output_kind(video_out) if video_out is not None else None
    check_count(per_digit, "per_digit")
    check_images_fit(len(DIGITS) * per_digit)
    check_threads(threads)
    check_seed(seed)
    threads = threads or os.cpu_count() or 1
    generator = Generator.load(demo_artifacts(export_progress), threads=threads)
    sampling = generator.default_sampling()
    generator.check_memory(len(DIGITS) * per_digit, None, generator.latent_size(), sampling.guidance)
    settings = dict(num_images=per_digit, seed=seed, sampling=sampling)
    runners: dict[str, ImageGenerator] = {"runtime": generator}
    if pytorch:
        import torch

        from starflow.model.reference import ReferenceGenerator

        torch.set_num_threads(threads)
        runners["pytorch"] = ReferenceGenerator.load(
            batch_size=generator.manifest.images_per_batch(sampling.guidance)
        )
    for runner in runners.values():  # warm-up: sessions, caches
        runner.generate(DIGITS, **{**settings, "num_images": 1})
    before = os.getloadavg()[0]
    timed = interleaved(
        {name: functools.partial(r.generate, DIGITS, **settings) for name, r in runners.items()}, rounds
    )
    load = (before, os.getloadavg()[0])
    runtime_seconds, runtime = timed["runtime"]
    reference_seconds, expected = timed.get("pytorch", (None, None))

    images = runtime.images
    by_digit = images.reshape(10, per_digit, *images.shape[1:]).swapaxes(0, 1)  # row = sample
    save_png(out, by_digit.reshape(-1, *images.shape[1:]), columns=10)
    difference = None if expected is None else float(np.abs(images - expected.images).max())
    video = None
    if video_out is not None:
        clips = Generator.load(demo_artifacts(video_export_progress, video=True), threads=threads)
        check_fps(clips.fps, video_kind, "fps (the video model's)")
        video = clips.generate(DIGITS, seed=seed, frames=frames)
        write_video(np.round(video.images * 255).astype(np.uint8), video_out, clips.fps, columns=10)
    return DemoResult(
        out, per_digit, runtime, runtime_seconds, reference_seconds, difference, threads, rounds, load,
        video_out, video,
    )  # fmt: skip
