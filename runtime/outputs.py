"""Writing images: a PNG grid, a folder of PNGs, or a .npy array; atomically, never half-written.

Shared by `starflow sample` (PyTorch) and `starflow generate` (runtime); numpy + Pillow only.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from starflow.atomic import atomic_path
from starflow.errors import StarflowError

SUFFIXES = (".png", ".npy")


def output_kind(path: Path) -> str:
    """'png' (grid), 'npy' or 'dir' (one PNG per image); checks the place exists before any work."""
    if path.suffix in SUFFIXES:
        if not path.parent.is_dir():
            raise StarflowError(f"--out {path}: directory {path.parent} does not exist")
        return path.suffix[1:]
    if path.suffix:
        raise StarflowError(
            f"--out {path}: expected a .png (grid), a .npy (N, H, W, C) array, or a folder "
            "(one PNG per image)"
        )
    if path.exists() and not path.is_dir():
        raise StarflowError(f"--out {path}: exists and is not a folder")
    if not path.parent.is_dir():
        raise StarflowError(f"--out {path}: directory {path.parent} does not exist")
    return "dir"


def grid(images: np.ndarray, columns: int, pad: int = 1) -> np.ndarray:
    """(N, H, W, C) in [0, 1] -> one (rows*(H+pad)+pad, columns*(W+pad)+pad, C) uint8 mosaic."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    canvas = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        canvas[top : top + h, left : left + w] = to_uint8(image)
    return canvas


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def visible_scale(height: int, width: int, smallest_side: int = 32) -> int:
    """The integer factor that brings tiny images (8x8 digits) to a visible size."""
    return max(1, smallest_side // min(height, width))


def upscale(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of an (H, W, C) array."""
    return pixels.repeat(factor, 0).repeat(factor, 1)


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    if not path.parent.is_dir():
        raise StarflowError(f"--out {path}: directory {path.parent} does not exist")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def _png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    picture = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    _atomic_write(path, lambda f: picture.save(f, format="PNG"))


def save_png(path: Path, images: np.ndarray, columns: int, scale: int | None = None) -> None:
    """A grid PNG; tiles are upscaled (nearest) so that the smallest side is >= 32 px."""
    _png(path, upscale(grid(images, columns), scale or visible_scale(*images.shape[1:3])))


def slug(prompt: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", prompt).strip("-")[:limit] or "unconditional"


def save_images(path: Path, images: np.ndarray, columns: int, prompts: list[str] | None = None) -> list[Path]:
    """Write `images` (N, H, W, C) in [0, 1] as `output_kind(path)` says; returns the files written."""
    kind = output_kind(path)
    if kind == "png":
        save_png(path, images, columns)
        return [path]
    if kind == "npy":
        _atomic_write(path, lambda f: np.save(f, images.astype(np.float32)))
        return [path]
    path.mkdir(exist_ok=True)
    names = prompts or [""] * len(images)
    files = [path / f"{i:04d}-{slug(p)}.png" for i, p in enumerate(names)]
    for file, image in zip(files, images, strict=True):
        _png(file, upscale(to_uint8(image), visible_scale(*image.shape[:2])))
    return files
