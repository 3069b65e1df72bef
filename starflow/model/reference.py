"""The PyTorch reference of prompts -> images: `ImageGenerator`'s loop over the PyTorch modules.

prompts -> text encoder (HF T5 or the label table) -> `StarFlow.sample` on `[cond ; uncond]`
-> self-denoise -> SD-VAE decode (or identity). The loop, the noise (`make_noise`) and the
batching are the runtime `Generator`'s, so the two give the same images for the same seed (the
Jacobi stop test averages over a batch: give `batch_size` the export's batch to compare).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from starflow.contract.manifest import VAE_SCALE
from starflow.core.config import DEMO_CHECKPOINT
from starflow.core.errors import StarflowError
from starflow.core.generation import ImageGenerator, make_noise
from starflow.core.outputs import DEFAULT_FPS
from starflow.core.sampler import BlockStats, Progress, SampleOptions
from starflow.core.sampling_presets import DIGITS_PRESETS, OFFICIAL, choose, load_presets
from starflow.model.checkpoint import load_model
from starflow.model.flow import StarFlow
from starflow.model.text_encoder import TextEncoder, text_encoder_for


class ReferenceGenerator(ImageGenerator):
    """A PyTorch model with its text encoder (and VAE), ready to turn prompts into images.

    `batch_size` images are sampled together (default: all).
    """

    def __init__(
        self, model: StarFlow, encoder: TextEncoder | None, vae: Any = None, batch_size: int | None = None
    ):
        self.model, self.encoder, self.vae, self.batch_size = model, encoder, vae, batch_size
        self.presets: dict[str, SampleOptions] = {}  # calibrated sampling presets, by name
        config = model.config
        self.channels = config.channel_size
        self.train_side, self.multiple_of = config.latent_size, config.patch_size
        self.factor = config.img_size // config.latent_size if config.vae else 1
        self.video, self.fps = config.video, DEFAULT_FPS
        self.text_conditioned = model.text_dim > 0
        self.device = next(model.parameters()).device

    @classmethod
    def load(
        cls,
        checkpoint: str | Path | None = None,
        config: str | Path | None = None,
        text_encoder: str | Path | None = None,
        vae: str | Path | None = None,
        device: str = "cpu",
        batch_size: int | None = None,
    ) -> ReferenceGenerator:
        """A checkpoint (default: the embedded digits model) with its text encoder: a local Hugging
        Face directory, or the label table saved beside a class-conditional `.safetensors`."""
        from starflow.model.vae import vae_for

        checkpoint = Path(checkpoint or DEMO_CHECKPOINT)
        model = load_model(config, checkpoint, device)
        encoder = text_encoder_for(model.config, checkpoint, text_encoder)
        loaded_vae = vae_for(model.config, vae)
        if encoder is not None:
            encoder = encoder.to(device)
        if loaded_vae is not None:
            loaded_vae = loaded_vae.to(device)
        generator = cls(model, encoder, loaded_vae, batch_size)
        if checkpoint == DEMO_CHECKPOINT and DIGITS_PRESETS.is_file():
            generator.presets = load_presets(DIGITS_PRESETS)
        return generator

    def check_stages(self, denoise: bool, frames: int | None) -> None:
        model, cfg = self.model, self.model.config
        if cfg.video and cfg.vae:
            raise StarflowError(f"decoding {cfg.vae} video latents is not built yet")
        if model.text_dim and self.encoder is None:
            raise StarflowError(
                "this model is text-conditioned: load it with text_encoder=DIR (or its label table)"
            )
        if cfg.vae and self.vae is None:
            raise StarflowError(f"this latent model decodes through {cfg.vae}: load it with vae=DIR")

    def default_sampling(self) -> SampleOptions:
        """The checkpoint's guidance weight (its config's cfg) and the official Jacobi settings."""
        return SampleOptions(guidance=self.model.config.cfg)

    def sampling(self, preset: str = OFFICIAL) -> SampleOptions:
        """The defaults, or a preset calibrated for this checkpoint (the embedded model's)."""
        return choose(preset, self.default_sampling(), self.presets, "this model")

    def images_per_batch(self, guidance: float, frames: int | None = None) -> int:
        return self.batch_size or 2**31

    def cache_bytes_per_token(self) -> int:
        blocks = self.model.sampling_blocks()
        return max((4 * 2 * len(b.attn_blocks) * b.num_kv_heads * b.head_dim for b in blocks), default=0)

    def noise(self, seed: int, shape: tuple[int, ...]) -> Tensor:
        return torch.from_numpy(make_noise(seed, shape)).to(self.device)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Tensor | None:
        return None if self.encoder is None else self.encoder.encode(prompts).float()

    def sample(
        self, noise: Tensor, y: Tensor | None, y_uncond: Tensor | None, sampling: SampleOptions,
        progress: Progress[int] | None,
    ) -> tuple[Tensor, list[BlockStats]]:  # fmt: skip
        return self.model.sample(noise, y, y_uncond, sampling, return_stats=True, progress=progress)

    def denoise(self, x: Tensor, y: Tensor | None) -> Tensor:
        config = self.model.config
        return self.model.denoise(x, y, config.noise_std, window=config.local_attn_window)

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        if self.vae is None:
            return latent
        from starflow.model.vae import decode

        return decode(self.vae, latent, VAE_SCALE)

    def to_numpy(self, x: Tensor) -> np.ndarray:
        return x.float().cpu().numpy()
