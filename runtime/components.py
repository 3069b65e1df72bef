"""After the flow, in numpy: the self-denoise step, the VAE decoder, and [0, 1] images.

`LearnedDenoiserRunner` and `DecoderRunner` each wrap the Runner of one graph (`denoise.fp32`,
`decoder.fp32`) and check their inputs before running it, so a wrong shape or dtype fails with a
message instead of deep inside a backend; `GradientDenoiser` takes its gradient from the blocks'
forward and vjp graphs, through an fp32 `Pipeline`. Like a Runner they are not
thread-safe; returned arrays belong to the caller. Pixel-space models have no decoder: their
samples go straight to `starflow.core.outputs.to_unit_images`.
"""

from __future__ import annotations

import math

import numpy as np

from starflow.core.checks import check_float32, check_latent, check_text
from starflow.core.errors import StarflowError
from starflow.core.sampler import denoise_windows
from starflow.runtime.backends import Runner
from starflow.runtime.pipeline import Pipeline


def _check_latent(x: np.ndarray, channels: int, patch_size: int, name: str, ranks: tuple[int, ...]) -> None:
    """`checks.check_latent` on a float32 numpy array (what the graphs take)."""
    check_float32(x, name)
    check_latent(x, channels, patch_size, name, ranks)


def _check_text(text: np.ndarray | None, batch: int, text_dim: int) -> None:
    """`checks.check_text` (no length limit), then float32: what a graph with a `text` input takes."""
    check_text(text, batch, text_dim, None, "text")
    if text is not None:
        check_float32(text, "text")


def _check_graph(runner: Runner, inputs: list[str], outputs: list[str], kind: str) -> None:
    if sorted(runner.input_names) != sorted(inputs) or not set(outputs) <= set(runner.output_names):
        raise StarflowError(
            f"graph {runner.name}: inputs {runner.input_names}, outputs {runner.output_names}; "
            f"a {kind} graph takes {inputs} and gives {outputs}"
        )


class DecoderRunner:
    """Sampled latents (B, C, h, w) -> images (B, 3, f*h, f*w) in about [-1, 1], not clamped.

    The graph takes the raw sampled latent: it divides by the VAE scale itself.
    """

    def __init__(self, runner: Runner, channels: int):
        _check_graph(runner, ["latent"], ["image"], "decoder")
        self.runner = runner
        self.channels = channels

    def decode(self, latent: np.ndarray) -> np.ndarray:
        _check_latent(latent, self.channels, 1, "latent", (4,))
        return self.runner.run({"latent": np.ascontiguousarray(latent)})["image"]


class GradientDenoiser:
    """The official self-denoise: one Tweedie step x - noise_std^2 * grad_x NLL(x) per sample, the
    gradient chained over the blocks' fp32 forward and vjp graphs (`Pipeline.nll_gradient`)."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline

    def denoise(self, x: np.ndarray, text: np.ndarray | None, noise_std: float) -> np.ndarray:
        """x (B, C, H, W) (or clips (B, F, C, H, W)) float32, text (B, L, text_dim) float32 or None ->
        the denoised x."""
        if not math.isfinite(noise_std) or noise_std < 0:
            raise StarflowError(f"noise_std: must be a finite number >= 0, got {noise_std}")
        grad = self.pipeline.nll_gradient(x, text)
        return x - np.float32(noise_std**2) * grad  # float32 whatever the type of noise_std


class LearnedDenoiserRunner:
    """STARFlow-V's learned denoiser: clips x (B, F, C, H, W) -> x - step * correction, clips longer
    than the sampling window in overlapping windows (`starflow.core.sampler.denoise_windows`).

    `text_dim` 0 means a denoiser without text (the graph has no `text` input); `multiple_of` is the
    patch size, since the graph only sees whole patches.
    """

    def __init__(self, runner: Runner, channels: int, text_dim: int = 0, multiple_of: int = 1):
        _check_graph(runner, ["x", "text"] if text_dim else ["x"], ["correction"], "learned denoise")
        self.runner = runner
        self.channels = channels
        self.text_dim = text_dim
        self.multiple_of = multiple_of

    def denoise(
        self, x: np.ndarray, text: np.ndarray | None, step: float, window: int | None, overlap: int | None
    ) -> np.ndarray:
        """x (B, F, C, H, W) float32, text (B, L, text_dim) or None -> the denoised clips."""
        _check_latent(x, self.channels, self.multiple_of, "x", (5,))
        feeds = {}
        if self.text_dim:  # a denoiser without text (`conditional_denoiser` off) takes none
            _check_text(text, x.shape[0], self.text_dim)
            feeds["text"] = np.ascontiguousarray(text)

        def apply(clip: np.ndarray) -> np.ndarray:
            correction = self.runner.run({"x": np.ascontiguousarray(clip)} | feeds)["correction"]
            return clip - np.float32(step) * correction

        return denoise_windows(x.copy(), apply, window, overlap)
