"""`Generator`: an export's graphs behind the prompts-to-images loop (`starflow.core.generation`).

It loads the flow graphs (ONNX Runtime or TensorRT) and the components (text encoder, denoiser,
decoder) and supplies the loop's stages as numpy arrays; it never imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from starflow.contract.manifest import Manifest, inside
from starflow.core.errors import StarflowError
from starflow.core.generation import ImageGenerator, make_noise
from starflow.core.outputs import DEFAULT_FPS
from starflow.core.sampler import SampleOptions, nll_per_sample, to_bits_per_dim
from starflow.runtime.backends import OrtRunner
from starflow.runtime.components import DecoderRunner, GradientDenoiser, LearnedDenoiserRunner
from starflow.runtime.pipeline import Pipeline, graph_blocks
from starflow.runtime.text import TextEncoderRunner


class Generator(ImageGenerator):
    """A loaded export, ready to turn prompts into images (no torch)."""

    def __init__(
        self,
        pipeline: Pipeline,
        text: TextEncoderRunner | None,
        denoiser: GradientDenoiser | LearnedDenoiserRunner | None,
        decoder: DecoderRunner | None,
    ):
        self.pipeline = pipeline
        self.manifest: Manifest = pipeline.manifest
        self.text = text
        self.denoiser = denoiser
        self.decoder = decoder
        latent = self.manifest.latent
        self.channels = latent.channels
        self.train_side, self.multiple_of = latent.train[0], latent.multiple_of
        self.factor = self.manifest.decoder.factor or 1
        self.video = self.manifest.video is not None
        self.text_conditioned = self.manifest.text is not None
        self.fps = self.manifest.video.fps if self.manifest.video else DEFAULT_FPS

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

        # components have no engines: with backend tensorrt they run on ONNX Runtime's CPU EP
        ort_providers = providers if backend == "onnxruntime" else None

        def runner(name: str) -> OrtRunner:
            return OrtRunner(name, inside(directory, manifest.graph(name).file), ort_providers, threads)

        text, latent, denoise, decoding = manifest.text, manifest.latent, manifest.denoise, manifest.decoder
        component = text.component if text else None
        text_runner = TextEncoderRunner(directory, component, runner(component.graph)) if component else None
        denoiser = None
        if denoise is not None and denoise.learned:
            graph = manifest.graph(denoise.graph)
            text_dim = text.dim if text and any(t.name == "text" for t in graph.inputs) else 0
            denoiser = LearnedDenoiserRunner(
                runner(denoise.graph), latent.channels, text_dim, latent.multiple_of
            )
        elif denoise is not None:  # the gradient's graphs are fp32: this pipeline's, or fp32 ones beside it
            shared = backend == "onnxruntime" and precision == "fp32"
            blocks = (
                pipeline.blocks
                if shared
                else graph_blocks(directory, manifest, "fp32", "onnxruntime", ort_providers, threads)
            )
            denoiser = GradientDenoiser(Pipeline(directory, manifest, blocks, "fp32"))
        decoder = DecoderRunner(runner(decoding.graph), latent.channels) if decoding.graph else None
        return cls(pipeline, text_runner, denoiser, decoder)

    def check_stages(self, denoise: bool, frames: int | None) -> None:
        manifest, directory = self.manifest, self.pipeline.directory
        if frames is not None:
            self.pipeline.check_frames(frames)
        video = manifest.video
        if manifest.text is not None and self.text is None:
            raise StarflowError(
                f"{directory}: this export has no text encoder; re-export with text_encoder=DIR "
                f"(a local copy of {manifest.text.encoder or 'the model encoder'})"
            )
        if denoise and self.denoiser is None:
            raise StarflowError(
                f"{directory}: this export has no self-denoise step; pass denoise=False or re-export with it"
            )
        if video is not None and manifest.decoder.kind != "identity":
            raise StarflowError(f"decoding {manifest.decoder.source} video latents is not built yet")
        if manifest.decoder.kind == "sd-vae" and self.decoder is None:
            raise StarflowError(
                f"{directory}: this latent model's export has no decoder; re-export with vae=DIR "
                f"(a local copy of {manifest.decoder.source})"
            )

    def default_sampling(self) -> SampleOptions:
        """The export's defaults: its guidance weight and Jacobi settings."""
        return self.manifest.sampling("official")

    def sampling(self, preset: str = "official") -> SampleOptions:
        return self.manifest.sampling(preset)

    def images_per_batch(self, guidance: float, frames: int | None = None) -> int:
        """The export's batch profile (halved under guidance; clips: a row per frame when a block is
        frame-local)."""
        return self.manifest.images_per_batch(guidance, frames)

    def cache_bytes_per_token(self) -> int:
        return max((4 * 2 * b.layers * b.kv_heads * b.head_dim for b in self.manifest.blocks), default=0)

    def noise(self, seed: int, shape: tuple[int, ...]) -> np.ndarray:
        return make_noise(seed, shape)

    def check_texts(self, texts: list[str]) -> None:
        if self.text is not None:
            self.text.check_known(texts)

    def encode(self, prompts: list[str]) -> np.ndarray | None:
        return None if self.text is None else self.text.encode(prompts)

    def sample(self, noise, y, y_uncond, sampling, progress):  # noqa: ANN001 (ImageGenerator.sample)
        y_uncond = None if y_uncond is None else np.ascontiguousarray(y_uncond)
        return self.pipeline.sample(noise, y, y_uncond, sampling, return_stats=True, progress=progress)

    def denoise(self, x: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        entry = self.manifest.denoise
        if entry.learned:
            window = self.manifest.video.window if self.manifest.video else None
            clips = x if x.ndim == 5 else x[:, None]
            out = self.denoiser.denoise(clips, y, entry.step, window, entry.overlap)
            return out if x.ndim == 5 else out[:, 0]
        return self.denoiser.denoise(x, y, entry.noise_std)

    def decode(self, latent: np.ndarray) -> np.ndarray:
        return self.decoder.decode(latent) if self.decoder else latent

    def bits_per_dim(self, latents: np.ndarray, prompts: list[str] | None = None) -> np.ndarray:
        """Each latent's (clip's) exact negative log-likelihood under the flow, in bits per latent
        dimension (`StarFlow.nll`'s per sample), given its prompt (text models: one per latent)."""
        if self.text_conditioned and (prompts is None or len(prompts) != len(latents)):
            got = "none" if prompts is None else len(prompts)
            raise StarflowError(
                f"prompts: this model reads text; give one per latent ({len(latents)}), got {got}"
            )
        if not self.text_conditioned and prompts and any(prompts):
            raise StarflowError("prompts: this model is unconditional: give no prompt text")
        step, bits = self.images_per_batch(0.0, latents.shape[1] if latents.ndim == 5 else None), []
        for first in range(0, len(latents), step):
            x = np.ascontiguousarray(latents[first : first + step], dtype=np.float32)
            y = self.encode(prompts[first : first + step]) if self.text_conditioned else None
            z, logdets = self.pipeline.forward(x, y)
            bits.append(to_bits_per_dim(nll_per_sample(z, logdets)))
        return np.concatenate(bits)
