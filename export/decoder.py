"""The `decoder.fp32` graph: sampled latents -> images, through a diffusers `AutoencoderKL`.

The graph takes the raw sampled latent and divides by the VAE scale itself, so the runtime never
handles the constant. Batch, height and width stay symbolic: the output's spatial dims are the
exporter's expressions of them (`8*height` for SD-VAE, whose decoder upsamples three times).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from starflow.contract.manifest import Decoder, TensorSpec, Tolerance
from starflow.export.graphs import ComponentGraph, GraphSpec
from starflow.model.vae import decode, upsampling

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

TOLERANCE = Tolerance(atol=1e-4, rtol=0.0)  # images are about [-1, 1]
# (batch, latent height, width) checked after export; none is the export example (2, 3, 5).
CASES = ((2, 4, 6), (1, 6, 5))


class DecoderGraph(nn.Module):
    """latent (B, C, h, w) -> image (B, 3, f*h, f*w): `starflow.model.vae.decode` as a module."""

    def __init__(self, vae: AutoencoderKL, scale: float):
        super().__init__()
        self.vae = vae
        self.scale = scale

    def forward(self, latent: Tensor) -> Tensor:
        return self.vae.decode(latent / self.scale, return_dict=False)[0]


def decoder_spec(vae: AutoencoderKL) -> GraphSpec:
    """latent (batch, C, height, width) -> image (batch, 3, f*height, f*width)."""
    f = upsampling(vae)
    scaled = (f"{f}*height", f"{f}*width") if f > 1 else ("height", "width")
    return GraphSpec(
        None,
        "decoder",
        "fp32",
        (TensorSpec("latent", "float32", ("batch", vae.config.latent_channels, "height", "width")),),
        (TensorSpec("image", "float32", ("batch", vae.config.out_channels, *scaled)),),
    )


def decoder_graph(vae: AutoencoderKL, scale: float, source: str, seed: int = 0) -> ComponentGraph:
    """`decoder.fp32` of the VAE loaded from the directory named `source`, checked on `CASES`
    against `starflow.model.vae.decode`."""
    spec, channels = decoder_spec(vae), vae.config.latent_channels
    generator = torch.Generator().manual_seed(seed)
    cases = {
        f"batch {batch}, latent {h}x{w}": {
            "latent": torch.randn(batch, channels, h, w, generator=generator).numpy()
        }
        for batch, h, w in CASES
    }
    return ComponentGraph(
        spec=spec,
        module=DecoderGraph(vae, scale).eval(),
        example=(torch.randn(2, channels, 3, 5),),  # every symbolic dim >= 2 and distinct
        cases=cases,
        reference=lambda feeds: {"image": decode(vae, torch.from_numpy(feeds["latent"]), scale).numpy()},
        tolerance=TOLERANCE,
        entry=Decoder("sd-vae", source, scale, spec.name, upsampling(vae)),
    )
