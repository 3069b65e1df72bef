"""The prompts-to-images loop, written once (against the array API, like the sampler).

`ImageGenerator.generate_many` draws the noise, encodes the prompts, samples in batches of the
engine's size, denoises and decodes, timing each stage, for several jobs at once: each job's
noise comes from its own seed, so with the per-row Jacobi stop test (`SampleOptions(stop="row")`)
a job's images are the same alone or sharing the batch with others (what a server needs).
`generate` is the one-job case. An engine supplies the stages:
`starflow.runtime.Generator` runs the graphs of an export, `starflow.model.reference.
ReferenceGenerator` the PyTorch modules. The noise is numpy's PCG64 (`make_noise`) for both, so
they give the same images for the same seed. Torch-free and backend-free.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from starflow.core.checks import check_count, check_prompt_list
from starflow.core.errors import StarflowError
from starflow.core.limits import check_fits
from starflow.core.outputs import to_unit_images
from starflow.core.sampler import Array, BlockStats, Progress, SampleOptions
from starflow.core.sizes import latent_size


def check_seed(seed: int) -> None:
    check_count(seed, "seed", 0)


def make_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """The prior sample both engines use: standard normal float32 from numpy's default generator."""
    check_seed(seed)
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class Job:
    """`num_images` images (clips) of each prompt from the noise of `seed`; the unconditional
    text of guidance is `negative_prompt` or ""."""

    prompts: list[str]
    num_images: int = 1
    seed: int = 0
    negative_prompt: str | None = None

    @property
    def images(self) -> int:
        return len(self.prompts) * self.num_images


@dataclasses.dataclass
class Generation:
    images: np.ndarray  # (N, H, W, C) float32 in [0, 1]; clips (N, T, H, W, C)
    latents: np.ndarray  # (N, C, h, w) (clips: (N, T, C, h, w)) sampled and denoised, before decoding
    prompts: list[str]  # the prompt of each image
    stats: list[BlockStats]  # per sampler call that held these images, per block in sampling order
    seconds: dict[str, float]  # text, flow, denoise, decode, total (of the whole `generate_many` call)
    iterations: list[int]  # Jacobi iterations (sequential: tokens) each image ran, over every block
    batch_images: int  # images in the `generate_many` call these came from

    def summary(self) -> str:
        """The timing line: images per second (or seconds per image) and where the time went."""
        s, n = self.seconds, len(self.images)
        calls = sum(b.evaluations for b in self.stats)
        unit = "image" if self.images.ndim == 4 else "clip"
        what = counted(n, unit) + ("" if unit == "image" else f" of {self.images.shape[1]} frames")
        return (
            f"time: {s['total']:.2f} s for {what} ({rate(n, s['total'], unit)}): "
            f"text {s['text']:.3f} s, flow {s['flow']:.3f} s ({counted(calls, 'block call')}), "
            f"denoise {s['denoise']:.3f} s, decode {s['decode']:.3f} s"
        )


def counted(n: int, noun: str) -> str:
    """'1 image', '2 images'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def rate(n: int, seconds: float, unit: str) -> str:
    """'12.5 images/s', or '3.20 s per image' below one a second (where /s would print 0.0)."""
    if n <= 0 or seconds <= 0:
        return f"no {unit}s timed"
    per_second = n / seconds
    if per_second >= 1:
        return f"{per_second:.{1 if per_second < 100 else 0}f} {unit}s/s"
    return f"{seconds / n:.2f} s per {unit}"


def array_bytes(
    images: int, frames: int | None, latent_size: tuple[int, int], channels: int, factor: int
) -> int:
    """What the loop holds whole: noise, latents (float32, `channels`) and the decoded RGB images;
    the working set of one batch is far smaller."""
    H, W = latent_size
    return 4 * images * (frames or 1) * H * W * (channels * 2 + 3 * factor**2)


def check_images_fit(images: int, frames: int | None = None, size: tuple[int, int] | None = None) -> None:
    """Before any engine loads: refuse a count no model could hold, by the least any needs (the
    decoded float32 RGB images of `size` pixels, or of one pixel). Its cost does not grow with the
    count, so `--num-images 100000000000` fails at once instead of after an export and a load."""
    check_count(images, "num_images")
    pixels = size[0] * size[1] if size else 1
    what = counted(images, "clip" if frames else "image") + (f" of {frames} frames" if frames else "")
    check_fits(4 * 3 * images * (frames or 1) * pixels, f"{what} (their decoded pixels alone)")


class ImageGenerator:
    """The prompts-to-images loop over an engine's stages (the methods subclasses define)."""

    # latent sizes: channels, training side, granularity (patch), image pixels per latent pixel
    channels: int
    train_side: int
    multiple_of: int
    factor: int
    video: bool  # a STARFlow-V model: it makes clips, `frames` is required
    fps: float  # the frame rate clips are shown at
    text_conditioned: bool  # prompts are read (else the model is unconditional)

    # ---- the stages ----------------------------------------------------------------------------
    def check(
        self,
        prompts: list[str],
        num_images: int,
        seed: int,
        sampling: SampleOptions,
        denoise: bool,
        frames: int | None = None,
    ) -> None:
        """Everything a caller can get wrong, before any work."""
        sampling.check()
        check_prompts(prompts, num_images, seed, sampling.guidance, self.text_conditioned)
        self.check_frames(frames)
        self.check_stages(denoise, frames)

    def check_stages(self, denoise: bool, frames: int | None) -> None:
        """What this engine's loaded stages cannot do (no text encoder, denoiser or decoder loaded)."""
        raise NotImplementedError

    def check_frames(self, frames: int | None) -> None:
        """Clips from a video model, stills from an image model (the frame count's range is the
        engine's to check)."""
        if not self.video:
            if frames is not None:
                raise StarflowError(f"frames: {frames} asked of an image model; clips need a video model")
            return
        if frames is None:
            raise StarflowError("this is a video model: ask for clips with frames=N (--frames N)")
        check_count(frames, "frames")

    def default_sampling(self) -> SampleOptions:
        raise NotImplementedError

    def sampling(self, preset: str = "official") -> SampleOptions:
        """The model's default settings ("official") or one of its calibrated presets."""
        raise NotImplementedError

    def images_per_batch(self, guidance: float, frames: int | None = None) -> int:
        """Images (clips of `frames`) per sampler call."""
        raise NotImplementedError

    def cache_bytes_per_token(self) -> int:
        """The largest flow block's keys and values per token (float32)."""
        raise NotImplementedError

    def check_memory(
        self, images: int, frames: int | None, latent_size: tuple[int, int], guidance: float
    ) -> None:
        """Refuse what the machine cannot hold, before the noise is drawn: the arrays the loop holds
        whole, plus the largest block's key/value cache for one batch (clips: every frame the deep
        block attends to, so long clips grow it)."""
        H, W = latent_size
        arrays = array_bytes(images, frames, (H, W), self.channels, self.factor)
        rows = min(images, self.images_per_batch(guidance, frames)) * (2 if guidance > 0 else 1)
        tokens = rows * (frames or 1) * (H // self.multiple_of) * (W // self.multiple_of)
        what = counted(images, "clip" if frames else "image")
        if frames:
            what += f" of {frames} frames"
        check_fits(arrays + tokens * self.cache_bytes_per_token(), f"{what} of {H}x{W} latent pixels")

    def check_texts(self, texts: list[str]) -> None:
        """Prompts the text encoder cannot take (a label table's unknown ones), before any work."""

    def noise(self, seed: int, shape: tuple[int, ...]) -> Array:
        raise NotImplementedError

    def encode(self, prompts: list[str]) -> Array | None:
        """Text embeddings (B, L, dim); None for a model without text."""
        raise NotImplementedError

    def sample(self, noise: Array, y: Array | None, y_uncond: Array | None, sampling: SampleOptions,
               progress: Progress[int] | None) -> tuple[Array, list[BlockStats]]:  # fmt: skip
        raise NotImplementedError

    def denoise(self, x: Array, y: Array | None) -> Array:
        raise NotImplementedError

    def decode(self, latent: Array) -> Array:
        """Latents -> images (B, C, H, W) in about [-1, 1]."""
        raise NotImplementedError

    def to_numpy(self, x: Array) -> np.ndarray:
        return np.asarray(x)

    # ---- the loop ------------------------------------------------------------------------------
    def latent_size(
        self, aspect_ratio: str | None = None, size: tuple[int, int] | None = None
    ) -> tuple[int, int]:
        """Latent (H, W) of an aspect-ratio bucket or an image size (H, W) in pixels; default: the
        training size."""
        return latent_size(aspect_ratio, size, self.train_side, self.multiple_of, self.factor)

    def generate(
        self,
        prompts: list[str],
        *,
        num_images: int = 1,
        negative_prompt: str | None = None,
        seed: int = 0,
        latent_size: tuple[int, int] | None = None,
        sampling: SampleOptions | None = None,
        denoise: bool = True,
        progress: Progress[int] | None = None,
        check_finite: bool = False,
        frames: int | None = None,
    ) -> Generation:
        """`num_images` images (clips of `frames` frames, for a video model) per prompt; the
        unconditional text is the negative prompt or "".

        With `check_finite`, NaN or inf anywhere in the result ends with a StarflowError.
        """
        job = Job(prompts, num_images, seed, negative_prompt)
        return self.generate_many(
            [job], latent_size=latent_size, sampling=sampling, denoise=denoise, progress=progress,
            check_finite=check_finite, frames=frames,
        )[0]  # fmt: skip

    def generate_many(
        self,
        jobs: list[Job],
        *,
        latent_size: tuple[int, int] | None = None,
        sampling: SampleOptions | None = None,
        denoise: bool = True,
        progress: Progress[int] | None = None,
        check_finite: bool = False,
        frames: int | None = None,
    ) -> list[Generation]:
        """Several jobs with the same settings in shared sampler calls, a `Generation` each.

        Each job's noise is drawn from its own seed, as if it ran alone; with `sampling.stop`
        "row" its images are then the same as alone (the "batch" rule couples the rows of a call).
        With `check_finite`, NaN or inf anywhere in the result ends with a StarflowError.
        """
        options = sampling or self.default_sampling()
        if not jobs:
            raise StarflowError("jobs: pass at least one")
        for job in jobs:
            self.check(job.prompts, job.num_images, job.seed, options, denoise, frames)
            self.check_texts([*job.prompts, job.negative_prompt or ""])
        H, W = latent_size or self.latent_size()
        total = sum(job.images for job in jobs)
        self.check_memory(total, frames, (H, W), options.guidance)
        clip = () if frames is None else (frames,)
        per_image = [p for job in jobs for p in job.prompts for _ in range(job.num_images)]
        noise = [self.noise(job.seed, (job.images, *clip, self.channels, H, W)) for job in jobs]
        xp = array_namespace(noise[0])
        noise = xp.concat(noise)
        seconds = dict.fromkeys(("text", "flow", "denoise", "decode"), 0.0)
        began = time.perf_counter()

        def timed(stage: str, fn: Callable[..., Any], *args: Any) -> Any:
            start = time.perf_counter()
            result = fn(*args)
            seconds[stage] += time.perf_counter() - start
            return result

        y = timed("text", self.encode, per_image)
        y_uncond = None
        if options.guidance > 0:
            negatives = [job.negative_prompt or "" for job in jobs]
            unique = sorted(set(negatives))
            encoded = timed("text", self.encode, unique)
            y_uncond = xp.concat(
                [xp.broadcast_to(encoded[unique.index(n) : unique.index(n) + 1], (job.images, *y.shape[1:]))
                 for n, job in zip(negatives, jobs, strict=True)]
            )  # fmt: skip
        latents, calls, iterations = [], [], []
        step = self.images_per_batch(options.guidance, frames)
        for first in range(0, total, step):
            part = slice(first, first + step)
            cond = None if y is None else y[part]
            uncond = None if y_uncond is None else y_uncond[part]
            x, block_stats = timed("flow", self.sample, noise[part], cond, uncond, options, progress)
            calls.append((first, first + x.shape[0], block_stats))
            iterations += [sum(b.iterations_of(i) for b in block_stats) for i in range(x.shape[0])]
            latents.append(timed("denoise", self.denoise, x, cond) if denoise else x)
        latent = xp.concat(latents)
        image = timed("decode", self.decode, latent)
        seconds["total"] = time.perf_counter() - began
        latents, images = self.to_numpy(latent), self.to_numpy(image)
        if check_finite and not (np.isfinite(latents).all() and np.isfinite(images).all()):
            raise StarflowError(
                "the sampled latents or images contain NaN or inf: the model overflowed on these inputs "
                "(nothing was written)"
            )
        images = to_unit_images(images)
        results, first = [], 0
        for job in jobs:
            last = first + job.images
            stats = [b for lo, hi, block_stats in calls if lo < last and first < hi for b in block_stats]
            results.append(
                Generation(
                    images[first:last], latents[first:last], per_image[first:last], stats, seconds,
                    iterations[first:last], total,
                )
            )  # fmt: skip
            first = last
        return results


def check_request(prompts: list[str], num_images: int, seed: int) -> None:
    """What any generator refuses, known before one is loaded (the command line checks it first)."""
    check_prompt_list(prompts)
    check_count(num_images, "num_images")
    check_seed(seed)


def check_prompts(prompts: list[str], num_images: int, seed: int, guidance: float, text_model: bool) -> None:
    """`check_request`, and no prompt text or guidance for a model without text."""
    check_request(prompts, num_images, seed)
    if not text_model and (any(prompts) or guidance > 0):
        raise StarflowError("this model is unconditional: give no prompt text and no guidance")
