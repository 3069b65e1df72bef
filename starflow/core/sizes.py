"""Image sizes: aspect-ratio buckets and explicit `HxW` sizes, in latent pixels.

The rule is the official bucketing one: keep the area near the training resolution squared and
round each side to the model's granularity (patch size in latent pixels, i.e. 8*patch image
pixels behind an SD-VAE). RoPE positions are normalised by the grid's mean side, so one set of
weights serves every bucket.
"""

from __future__ import annotations

import math

from starflow.core.errors import StarflowError

# width:height, the buckets STARFlow-style T2I models are trained and served at
ASPECT_RATIOS = ("1:1", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16", "21:9", "9:21")


def aspect_bucket(aspect_ratio: str, train_side: int, multiple: int) -> tuple[int, int]:
    """'W:H' -> latent (H, W) with H*W close to train_side**2, both multiples of `multiple`."""
    if aspect_ratio not in ASPECT_RATIOS:
        raise StarflowError(
            f"aspect_ratio {aspect_ratio!r}: unknown; choose one of {', '.join(ASPECT_RATIOS)} "
            "(width:height) or give a size HxW"
        )
    width, height = (int(v) for v in aspect_ratio.split(":"))
    ratio = width / height
    h = max(multiple, round(train_side / math.sqrt(ratio) / multiple) * multiple)
    w = max(multiple, round(train_side * math.sqrt(ratio) / multiple) * multiple)
    return h, w


def latent_of_size(size: tuple[int, int], factor: int, multiple: int) -> tuple[int, int]:
    """An image size (H, W) in pixels -> latent (H, W); sides must be multiples of factor*multiple."""
    step = factor * multiple
    if min(size) <= 0 or size[0] % step or size[1] % step:
        raise StarflowError(
            f"size {size[0]}x{size[1]}: both sides must be positive multiples of {step} image pixels "
            f"(patch {multiple} x {factor} pixels per latent pixel)"
        )
    return size[0] // factor, size[1] // factor


def latent_size(
    aspect_ratio: str | None, size: tuple[int, int] | None, train_side: int, multiple: int, factor: int
) -> tuple[int, int]:
    """Latent (H, W) of an aspect-ratio bucket or an image size (H, W) in pixels; default: the
    training size. `factor` is image pixels per latent pixel, `multiple` the patch size."""
    if aspect_ratio and size:
        raise StarflowError("give aspect_ratio or size, not both")
    if size:
        return latent_of_size(size, factor, multiple)
    if aspect_ratio:
        return aspect_bucket(aspect_ratio, train_side, multiple)
    return train_side, train_side
