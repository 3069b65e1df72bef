"""The `decoder.fp32` graph: sampled latents -> images, through a diffusers `AutoencoderKL`.

The graph takes the raw sampled latent and divides by the VAE scale itself, so the runtime never
handles the constant. Batch, height and width stay symbolic: the output's spatial dims are the
exporter's expressions of them (`8*height` for SD-VAE, whose decoder upsamples three times).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from starflow.contract.manifest import Comparison, TensorSpec, Tolerance
from starflow.export.exporter import DEFAULT_OPSET, dynamic_shapes_of, export_module
from starflow.export.graphs import GraphSpec
from starflow.export.validate import check_results, compare
from starflow.model.vae import decode, upsampling
from starflow.runtime.backends import OrtRunner

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


def export_decoder(vae: AutoencoderKL, path: Path, scale: float, opset: int = DEFAULT_OPSET) -> GraphSpec:
    """Export and validate `decoder.fp32` of `vae` to `path`; returns its spec."""
    spec = decoder_spec(vae)
    args = (torch.randn(2, vae.config.latent_channels, 3, 5),)  # every symbolic dim >= 2 and distinct
    export_module(DecoderGraph(vae, scale).eval(), args, dynamic_shapes_of(spec), spec, path, opset)
    check_results(validate_decoder(vae, path, scale))
    return spec


def validate_decoder(vae: AutoencoderKL, path: Path, scale: float, seed: int = 0) -> list[Comparison]:
    """Run the graph through ONNX Runtime on `CASES` against `starflow.model.vae.decode`."""
    generator = torch.Generator().manual_seed(seed)
    runner = OrtRunner("decoder.fp32", path)
    results = []
    for batch, h, w in CASES:
        latent = torch.randn(batch, vae.config.latent_channels, h, w, generator=generator)
        expected = decode(vae, latent, scale).numpy()
        actual = runner.run({"latent": latent.numpy()})["image"]
        results.append(
            compare("decoder.fp32", f"batch {batch}, latent {h}x{w}", "image", actual, expected, TOLERANCE)
        )
    return results
