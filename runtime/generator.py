"""Prompts to images through an export: text encoder -> flow blocks -> self-denoise -> decoder.

Every stage is a graph named by the manifest; this module only orders them and batches the work
to the export's batch profile. The noise comes from numpy's PCG64 (`make_noise`), shared with
the PyTorch reference so that both paths can be compared image for image.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from starflow.errors import StarflowError
from starflow.runtime.backends import open_runner
from starflow.runtime.image import Decoder, Denoiser, to_unit_images
from starflow.runtime.pipeline import METHODS, Pipeline, Progress
from starflow.runtime.sizes import aspect_bucket, parse_size
from starflow.runtime.text import TextEncoderRunner
from starflow.stats import BlockStats


def make_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """The prior sample both engines use: standard normal float32 from numpy's default generator."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


@dataclasses.dataclass
class Generation:
    images: np.ndarray  # (N, H, W, C) float32 in [0, 1]
    latents: np.ndarray  # (N, C, h, w) sampled (and denoised) latents, before decoding
    prompts: list[str]  # the prompt of each image
    stats: list[BlockStats]  # per batch, per block in sampling order
    seconds: dict[str, float]  # text, flow, denoise, decode, total


class Generator:
    """A loaded export, ready to turn prompts into images."""

    def __init__(
        self,
        pipeline: Pipeline,
        text: TextEncoderRunner | None,
        denoiser: Denoiser | None,
        decoder: Decoder | None,
    ):
        self.pipeline = pipeline
        self.manifest = pipeline.manifest
        self.text = text
        self.denoiser = denoiser
        self.decoder = decoder
        decoding = self.manifest["decoder"]
        self.factor = decoding["factor"] if decoding["kind"] == "sd-vae" else 1

    @classmethod
    def load(
        cls,
        artifacts_dir: str | Path,
        backend: str = "onnxruntime",
        precision: str = "fp32",
        providers: list[Any] | None = None,
        threads: int | None = None,
    ) -> Generator:
        """Load the flow graphs (`backend`) and the components (ONNX Runtime, fp32 graphs)."""
        directory = Path(artifacts_dir)
        pipeline = Pipeline.load(directory, backend, precision, providers, threads)
        manifest = pipeline.manifest
        graphs = {g["name"]: g for g in manifest["graphs"]}

        def runner(name: str):
            # components have no engines: with backend tensorrt they run on ONNX Runtime's CPU EP
            ort_providers = providers if backend == "onnxruntime" else None
            return open_runner("onnxruntime", name, directory / graphs[name]["file"], ort_providers, threads)

        component = (manifest["text"] or {}).get("component")
        text = TextEncoderRunner(directory, component, runner(component["graph"])) if component else None
        channels, multiple = manifest["latent"]["channels"], manifest["latent"]["multiple_of"]
        text_dim = manifest["text"]["dim"] if manifest["text"] else 0
        denoise = manifest["denoise"]
        denoiser = Denoiser(runner(denoise["graph"]), channels, text_dim, multiple) if denoise else None
        graph = manifest["decoder"].get("graph")
        decoder = Decoder(runner(graph), channels) if graph else None
        return cls(pipeline, text, denoiser, decoder)

    # ---- sizes ----------------------------------------------------------------------------------
    def latent_size(self, aspect_ratio: str | None = None, size: str | None = None) -> tuple[int, int]:
        """Latent (H, W) for an aspect-ratio bucket or an `HxW` image size; default: training size."""
        if aspect_ratio and size:
            raise StarflowError("give --aspect-ratio or --size, not both")
        latent = self.manifest["latent"]
        if size:
            return parse_size(size, self.factor, latent["multiple_of"])
        if aspect_ratio:
            return aspect_bucket(aspect_ratio, latent["train"][0], latent["multiple_of"])
        return tuple(latent["train"])  # type: ignore[return-value]

    def images_per_batch(self, guidance: float) -> int:
        rows = self.manifest["dims"]["batch"]["max"]
        return rows // 2 if guidance > 0 else rows

    # ---- generation -----------------------------------------------------------------------------
    def generate(
        self,
        prompts: list[str],
        num_images: int = 1,
        negative_prompt: str | None = None,
        guidance: float | None = None,
        seed: int = 0,
        latent_size: tuple[int, int] | None = None,
        method: str = "jacobi",
        jacobi_block_size: int | None = None,
        jacobi_max_iter: int | None = None,
        jacobi_threshold: float | None = None,
        denoise: bool = True,
        progress: Progress | None = None,
    ) -> Generation:
        """`num_images` images per prompt; the unconditional text is the negative prompt or ""."""
        manifest = self.manifest
        guidance = manifest["guidance"]["default_weight"] if guidance is None else guidance
        self._check(prompts, num_images, negative_prompt, guidance, method, denoise)
        jacobi = manifest["jacobi"]
        settings = dict(
            method=method,
            jacobi_block_size=jacobi_block_size or jacobi["block_size"],
            jacobi_max_iter=jacobi_max_iter or jacobi["max_iter"],
            jacobi_threshold=jacobi["threshold"] if jacobi_threshold is None else jacobi_threshold,
        )
        H, W = latent_size or self.latent_size()
        per_image = [p for p in prompts for _ in range(num_images)]
        noise = make_noise(seed, (len(per_image), manifest["latent"]["channels"], H, W))
        seconds = dict.fromkeys(("text", "flow", "denoise", "decode"), 0.0)
        began = time.perf_counter()

        def timed(stage: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            seconds[stage] += time.perf_counter() - start
            return result

        y = y_uncond = None
        if self.text is not None:
            y = timed("text", self.text.encode, per_image)
            if guidance > 0:
                uncond = timed("text", self.text.encode, [negative_prompt or ""])
                y_uncond = np.repeat(uncond, len(per_image), axis=0)
        latents, stats = [], []
        step = self.images_per_batch(guidance)
        for first in range(0, len(per_image), step):
            part = slice(first, first + step)
            cond = None if y is None else y[part]
            uncond = None if y_uncond is None else y_uncond[part]
            x, block_stats = timed(
                "flow",
                self.pipeline.sample,
                noise[part],
                cond,
                uncond,
                guidance,
                return_stats=True,
                progress=progress,
                **settings,
            )
            stats += block_stats
            if denoise:
                x = timed("denoise", self.denoiser.denoise, x, cond, manifest["denoise"]["noise_std"])
            latents.append(x)
        latent = np.concatenate(latents)
        image = timed("decode", self.decoder.decode, latent) if self.decoder else latent
        seconds["total"] = time.perf_counter() - began
        return Generation(to_unit_images(image), latent, per_image, stats, seconds)

    def _check(
        self,
        prompts: list[str],
        num_images: int,
        negative_prompt: str | None,
        guidance: float,
        method: str,
        denoise: bool,
    ) -> None:
        """Everything a user can get wrong, before any graph runs."""
        manifest = self.manifest
        if not prompts:
            raise StarflowError("no prompt given: pass at least one --prompt")
        if num_images < 1:
            raise StarflowError(f"--num-images: must be >= 1, got {num_images}")
        if method not in METHODS:
            raise StarflowError(f"--method: expected one of {list(METHODS)}, got {method!r}")
        if manifest["text"] is None:
            if any(prompts) or negative_prompt or guidance > 0:
                raise StarflowError(
                    "this model is unconditional: give no prompt text, negative prompt or guidance"
                )
        elif self.text is None:
            raise StarflowError(
                f"{self.pipeline.directory}: this export has no text encoder; re-export with "
                f"--text-encoder DIR (a local copy of {manifest['text']['encoder'] or 'the model encoder'})"
            )
        if denoise and self.denoiser is None:
            raise StarflowError(
                f"{self.pipeline.directory}: this export has no denoise graph; pass --no-denoise "
                "or re-export without --no-denoise"
            )
        decoding = manifest["decoder"]
        if decoding["kind"] == "sd-vae" and self.decoder is None:
            raise StarflowError(
                f"{self.pipeline.directory}: this latent model's export has no decoder; re-export with "
                f"--vae DIR (a local copy of {decoding['source']})"
            )
