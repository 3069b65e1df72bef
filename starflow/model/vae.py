"""The SD-VAE that turns latent STARFlow samples into images (diffusers `AutoencoderKL`).

The official sampler decodes the final latent with `vae.decode(z / 0.18215)`; pixel-space models
have no VAE (their samples already are images in [-1, 1]). diffusers is an export-time extra
(`starflow[components]`), imported only when a VAE is loaded, and only from local files.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from starflow.core import outputs
from starflow.core.bounded import read_json
from starflow.core.errors import StarflowError

MAX_VAE_CONFIG_BYTES = 1 << 20  # a diffusers config.json is about 1 KB

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

    from starflow.core.config import StarFlowConfig


def load_vae(directory: str | Path) -> AutoencoderKL:
    """An `AutoencoderKL` saved with `save_pretrained` (config.json + weights), in fp32, eval mode."""
    directory = Path(directory)
    if not directory.is_dir():
        raise StarflowError(f"VAE directory {directory}: no such directory")
    config = directory / "config.json"
    if not config.is_file():
        raise StarflowError(
            f"VAE directory {directory}: no config.json; expected a diffusers AutoencoderKL saved with "
            "save_pretrained (for a whole pipeline, pass its vae/ folder)"
        )
    document = read_json(config, MAX_VAE_CONFIG_BYTES, "VAE config")
    if not isinstance(document, dict):
        raise StarflowError(f"VAE config {config}: not a JSON object")
    name = document.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise StarflowError(f"VAE directory {directory}: holds a {name}, expected an AutoencoderKL (SD-VAE)")
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise StarflowError(
            "loading a VAE needs the diffusers package: pip install 'starflow[components]'"
        ) from None
    try:
        vae = AutoencoderKL.from_pretrained(directory, local_files_only=True, torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as err:
        raise StarflowError(
            f"VAE directory {directory}: cannot load it ({type(err).__name__}: {err})"
        ) from None
    return vae.eval()


def check_channels(vae: AutoencoderKL, expected: int) -> None:
    """The VAE must decode latents with the model's channel count."""
    found = vae.config.latent_channels
    if found != expected:
        raise StarflowError(
            f"the VAE decodes {found}-channel latents, the model samples {expected} channels (channel_size)"
        )


def vae_for(config: StarFlowConfig, directory: str | Path | None) -> AutoencoderKL | None:
    """The VAE in `directory` (None: none given), checked to decode the flow's latents."""
    if directory is None:
        return None
    if config.vae is None:
        raise StarflowError(f"vae {directory}: this is a pixel-space model (its config names no VAE)")
    vae = load_vae(directory)
    check_channels(vae, config.channel_size)
    return vae


def upsampling(vae: AutoencoderKL) -> int:
    """Pixels per latent pixel: every decoder block but the last doubles the size."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def decode(vae: AutoencoderKL, latent: Tensor, scale: float) -> Tensor:
    """Sampled latents (B, C, h, w) -> images (B, 3, f*h, f*w), about [-1, 1] and not clamped."""
    return vae.decode(latent / scale, return_dict=False)[0]


def to_unit_images(x: Tensor | np.ndarray) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) float32 in [0, 1]; the runtime's arithmetic exactly."""
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return outputs.to_unit_images(x)
