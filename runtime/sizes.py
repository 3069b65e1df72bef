"""Image sizes: aspect-ratio buckets and explicit `HxW` sizes, in latent pixels.

The rule is the official bucketing one: keep the area near the training resolution squared and
round each side to the model's granularity (patch size in latent pixels, i.e. 8*patch image
pixels behind an SD-VAE). RoPE positions are normalised by the grid's mean side, so one set of
weights serves every bucket.
"""

from __future__ import annotations

import math

from starflow.errors import StarflowError

# width:height, the buckets STARFlow-style T2I models are trained and served at
ASPECT_RATIOS = ("1:1", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16", "21:9", "9:21")


def aspect_bucket(aspect_ratio: str, train_side: int, multiple: int) -> tuple[int, int]:
    """'W:H' -> latent (H, W) with H*W close to train_side**2, both multiples of `multiple`."""
    if aspect_ratio not in ASPECT_RATIOS:
        raise StarflowError(
            f"--aspect-ratio {aspect_ratio!r}: unknown; choose one of {', '.join(ASPECT_RATIOS)} "
            "(width:height) or give --size HxW"
        )
    width, height = (int(v) for v in aspect_ratio.split(":"))
    ratio = width / height
    h = max(multiple, round(train_side / math.sqrt(ratio) / multiple) * multiple)
    w = max(multiple, round(train_side * math.sqrt(ratio) / multiple) * multiple)
    return h, w


def parse_hw(text: str, option: str, unit: str, example: str, square: bool = False) -> tuple[int, int]:
    """'HxW' (or 'N' for N x N when `square`) -> (H, W), both positive; the error names `option`."""
    try:
        sides = [int(p) for p in text.lower().split("x")]
    except ValueError:
        sides = []
    if square and len(sides) == 1:
        sides *= 2
    if len(sides) != 2 or min(sides) <= 0:
        raise StarflowError(f"{option}: expected HxW in {unit} (for example {example}), got {text!r}")
    return sides[0], sides[1]


def parse_size(text: str, factor: int, multiple: int) -> tuple[int, int]:
    """'HxW' image pixels -> latent (H, W); sides must be multiples of factor*multiple."""
    sides = parse_hw(text, "--size", "image pixels", "256x384")
    step = factor * multiple
    if sides[0] % step or sides[1] % step:
        raise StarflowError(
            f"--size {text}: both sides must be multiples of {step} image pixels "
            f"(patch {multiple} x {factor} pixels per latent pixel)"
        )
    return sides[0] // factor, sides[1] // factor
