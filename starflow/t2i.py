"""The PyTorch reference of the whole text-to-image pipeline, stage for stage as the runtime's.

prompts -> text encoder (HF T5 or the label table) -> `StarFlow.sample` on `[cond ; uncond]`
-> self-denoise -> SD-VAE decode (or identity). The noise is `make_noise`, the same numpy
draw the runtime makes, and the images are split into the same batches, so the two paths can
be compared image for image (the Jacobi stop test averages over the batch).
"""

from __future__ import annotations

import numpy as np
import torch

from starflow.model import StarFlow
from starflow.runtime.generator import make_noise
from starflow.runtime.image import to_unit_images
from starflow.stats import BlockStats
from starflow.text_encoder import TextEncoder


@torch.no_grad()
def text_to_image(
    model: StarFlow,
    encoder: TextEncoder | None,
    prompts: list[str],
    num_images: int = 1,
    negative_prompt: str | None = None,
    guidance: float = 0.0,
    seed: int = 0,
    latent_size: tuple[int, int] | None = None,
    method: str = "jacobi",
    jacobi_block_size: int = 16,
    jacobi_max_iter: int = 32,
    jacobi_threshold: float = 1e-3,
    denoise: bool = True,
    vae: torch.nn.Module | None = None,
    batch_size: int | None = None,
    stats: list[BlockStats] | None = None,
) -> np.ndarray:
    """`num_images` images per prompt -> (N, H, W, C) float32 in [0, 1]."""
    from starflow.export.manifest import VAE_SCALE

    cfg = model.config
    H, W = latent_size or (cfg.latent_size, cfg.latent_size)
    per_image = [p for p in prompts for _ in range(num_images)]
    noise = torch.from_numpy(make_noise(seed, (len(per_image), cfg.channel_size, H, W)))
    y = y_uncond = None
    if encoder is not None:
        y = encoder.encode(per_image).float()
        if guidance > 0:
            y_uncond = encoder.encode([negative_prompt or ""]).float().expand_as(y)
    step = batch_size or len(per_image)
    latents = []
    for first in range(0, len(per_image), step):
        part = slice(first, first + step)
        cond = None if y is None else y[part]
        x, block_stats = model.sample(
            noise[part],
            cond,
            None if y_uncond is None else y_uncond[part],
            guidance,
            method=method,
            jacobi_block_size=jacobi_block_size,
            jacobi_max_iter=jacobi_max_iter,
            jacobi_threshold=jacobi_threshold,
            return_stats=True,
        )
        if stats is not None:
            stats.extend(block_stats)
        latents.append(model.denoise(x, cond, cfg.noise_std) if denoise else x)
    latent = torch.cat(latents)
    if vae is not None:
        from starflow.vae import decode

        latent = decode(vae, latent, VAE_SCALE)
    return to_unit_images(latent.numpy())
