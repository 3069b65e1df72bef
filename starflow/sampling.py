"""`starflow sample`: class-conditional images from a checkpoint (by default the embedded digits model)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from starflow.checkpoint import load_model
from starflow.config import DEMO_CHECKPOINT
from starflow.errors import StarflowError
from starflow.label_encoder import LabelEncoder, labels_path, load_label_encoder
from starflow.model import StarFlow
from starflow.runtime.outputs import output_kind, save_images, save_png
from starflow.stats import BlockStats

__all__ = ["DEMO_CHECKPOINT", "generate", "load_conditional", "sample_report", "save_images", "save_png"]


def load_conditional(checkpoint: Path, config: str | None = None) -> tuple[StarFlow, LabelEncoder]:
    """A flow checkpoint and the label encoder saved beside it (`<name>.labels.safetensors`)."""
    if checkpoint.suffix != ".safetensors":
        raise StarflowError(
            f"--checkpoint {checkpoint}: sampling images needs our .safetensors with its label encoder; "
            "official .pth T2I checkpoints need a text encoder, which is not built yet"
        )
    model = load_model(config, checkpoint)
    cfg = model.config
    if cfg.vae is not None:
        raise StarflowError(
            f"--checkpoint {checkpoint}: a latent model ({cfg.vae}); VAE decoding is not built yet"
        )
    return model, load_label_encoder(labels_path(checkpoint), cfg.txt_size, cfg.txt_dim)


@torch.no_grad()
def generate(
    model: StarFlow,
    encoder: LabelEncoder,
    labels: Tensor,
    seed: int = 0,
    guidance: float = 0.0,
    method: str = "jacobi",
    jacobi_block_size: int = 16,
    jacobi_max_iter: int = 32,
    jacobi_threshold: float = 1e-3,
    denoise: bool = True,
    stats: list[BlockStats] | None = None,
) -> np.ndarray:
    """Labels (N,) -> images (N, H, W, C) float32 in [0, 1]; block stats are appended to `stats`."""
    cfg = model.config
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(labels), cfg.channel_size, cfg.latent_size, cfg.latent_size, generator=generator)
    noise = noise.to(device)
    y = encoder(labels.to(device)).float()
    y_uncond = (
        encoder(torch.full_like(labels, encoder.null_label).to(device)).float() if guidance > 0 else None
    )
    x, block_stats = model.sample(
        noise,
        y,
        y_uncond,
        guidance,
        method=method,
        jacobi_block_size=jacobi_block_size,
        jacobi_max_iter=jacobi_max_iter,
        jacobi_threshold=jacobi_threshold,
        return_stats=True,
    )
    if stats is not None:
        stats.extend(block_stats)
    if denoise:
        x = model.denoise(x, y, cfg.noise_std)
    images = ((x.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)  # (N, H, W, C) in [0, 1]
    return images.cpu().numpy().astype(np.float32)


def sample_report(
    checkpoint: Path | None,
    config: str | None,
    prompt: str,
    num_images: int,
    seed: int,
    guidance: float | None,
    method: str,
    jacobi_block_size: int,
    jacobi_max_iter: int,
    jacobi_threshold: float,
    denoise: bool,
    out: Path,
) -> list[str]:
    """Sample `num_images` images of `prompt`, save them, and return report lines."""
    output_kind(out)
    checkpoint = checkpoint or DEMO_CHECKPOINT
    model, encoder = load_conditional(checkpoint, config)
    guidance = model.config.cfg if guidance is None else guidance
    labels = torch.full((num_images,), encoder.label_of(prompt), dtype=torch.int64)
    stats: list[BlockStats] = []
    began = time.perf_counter()
    images = generate(
        model, encoder, labels, seed, guidance, method, jacobi_block_size, jacobi_max_iter,
        jacobi_threshold, denoise, stats,
    )  # fmt: skip
    seconds = time.perf_counter() - began
    save_images(out, images, columns=min(num_images, 8))
    lines = [
        f"model: {checkpoint}",
        f"sampled {num_images} images of {prompt!r} {images.shape[1:]} with {method}, guidance "
        f"{guidance:g} in {seconds:.2f} s ({sum(s.evaluations for s in stats)} block calls) -> {out}",
    ]
    for s in stats:
        lines.append(
            f"  block {s.block}: {s.chunks} chunks, {sum(s.iterations) / max(s.chunks, 1):.2f} "
            f"iterations/chunk, {s.evaluations} calls"
        )
    return lines
