"""The input checks every layer shares: counts, latents, text embeddings, prompt lists.

Each is written once here, torch-free, so the PyTorch model, the runtime and the command line
refuse the same bad input with the same one-line `StarflowError` naming the field.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from starflow.core.errors import StarflowError

LATENT_LAYOUTS = {4: "a (B, C, H, W) latent array", 5: "a (B, F, C, H, W) clip array"}


def check_count(value: Any, name: str, minimum: int = 1, note: str = "") -> None:
    """An integer (a bool is not one) >= `minimum`; `note` is added to the message in brackets."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        extra = f" ({note})" if note else ""
        raise StarflowError(f"{name}: must be an integer >= {minimum}{extra}, got {value!r}")


def shape_of(x: Any) -> Any:
    """What a message shows of an input: its shape, or its type when it has none."""
    return tuple(x.shape) if hasattr(x, "shape") else type(x).__name__


def check_latent(
    x: Any, channels: int, patch_size: int, name: str, ranks: tuple[int, ...] = (4,)
) -> tuple[int, int]:
    """A non-empty batch of `ranks` dims (4: images (B, C, H, W), 5: clips (B, F, C, H, W)) with
    the model's channels and whole patches; returns the token grid (h, w) of one frame."""
    if not hasattr(x, "shape") or len(x.shape) not in ranks:
        wanted = " or ".join(LATENT_LAYOUTS[rank] for rank in ranks)
        hint = " (clips need a video model)" if ranks == (4,) and len(getattr(x, "shape", ())) == 5 else ""
        raise StarflowError(f"{name}: expected {wanted}, got {shape_of(x)}{hint}")
    B, C, H, W = x.shape[0], *x.shape[-3:]
    if C != channels:
        raise StarflowError(f"{name}: expected {channels} latent channels, got shape {shape_of(x)}")
    if B == 0 or (len(x.shape) == 5 and x.shape[1] == 0):
        raise StarflowError(f"{name}: the batch is empty, shape {shape_of(x)}")
    if H == 0 or W == 0 or H % patch_size or W % patch_size:
        raise StarflowError(
            f"{name}: latent size {H}x{W} is not a positive multiple of patch_size {patch_size}"
        )
    return H // patch_size, W // patch_size


def check_text(y: Any, batch: int, dim: int, max_length: int | None, name: str) -> None:
    """Text embeddings (B, L, dim) with 1 <= L (<= max_length), or None for a model without text
    (`dim` 0)."""
    if dim == 0:
        if y is not None:
            raise StarflowError(f"{name}: this model is not text-conditioned; pass no text and no guidance")
        return
    if y is None:
        raise StarflowError(
            f"{name}: this model is text-conditioned; pass ({batch}, L, {dim}) text embeddings"
        )
    longest = max_length or math.inf
    if (
        not hasattr(y, "shape")
        or len(y.shape) != 3
        or y.shape[0] != batch
        or y.shape[2] != dim
        or not 1 <= y.shape[1] <= longest
    ):
        limit = f"1 <= L <= {max_length}" if max_length else "L >= 1"
        raise StarflowError(
            f"{name}: expected text embeddings of shape ({batch}, L, {dim}) with {limit}, got {shape_of(y)}"
        )


def check_float32(x: Any, name: str) -> None:
    """A float32 numpy array: what the runtime's graphs take (a backend would fail deep inside)."""
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        got = getattr(x, "dtype", type(x).__name__)
        raise StarflowError(f"{name}: expected a float32 numpy array, got {got}")


def check_prompt_list(prompts: list[str]) -> None:
    """At least one prompt: what a text encoder and the generation loop take."""
    if not prompts:
        raise StarflowError('prompts: pass at least one ("" is the unconditional prompt)')


# Frame rates each clip format can show. A GIF frame's delay is a whole number of 1/100 s from 1
# to 65535 (a 16-bit field); Pillow writes what it is given and fails past 65535 after the clips
# were made. MP4: ffmpeg takes 1e-6..2e9 fps, but over 1000 fps exceeds every H.264 level's rate.
GIF_FPS = (100 / 65535, 100.0)
MP4_FPS = (1e-3, 1000.0)
CLIP_FPS = {"gif": GIF_FPS, "mp4": MP4_FPS}


def check_fps(fps: Any, kind: str, name: str = "fps") -> None:
    """A finite frame rate > 0 that a `kind` clip file ('gif', 'mp4'; others keep no rate) shows."""
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not (math.isfinite(fps) and fps > 0):
        raise StarflowError(f"{name}: expected a finite number > 0, got {fps!r}")
    low, high = CLIP_FPS.get(kind, (0.0, math.inf))
    if not low <= fps <= high:
        delay = " (GIF frame delays are whole 1/100 s, 1..65535)" if kind == "gif" else ""
        raise StarflowError(
            f"{name}: {fps:g} frames per second; a .{kind} shows {low:.4g} to {high:g}{delay}"
        )
