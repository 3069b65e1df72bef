"""Writing images: a PNG grid, a folder of PNGs, or a .npy array; atomically, never half-written.

Shared by `starflow generate` (runtime and PyTorch engines), `starflow demo` and training sample
grids; numpy + Pillow only. `output_kind` checks a destination before any work is done for it.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from starflow.atomic import atomic_path
from starflow.errors import StarflowError

SUFFIXES = (".png", ".npy")


def output_kind(path: Path) -> str:
    """'png' (grid), 'npy' or 'dir' (one PNG per image); the place must be writable, checked
    before any work by creating (and removing) a temporary file there."""
    if path.suffix and path.suffix not in SUFFIXES:
        raise StarflowError(
            f"out {path}: expected a .png (grid), a .npy (N, H, W, C) array, or a folder (one PNG per image)"
        )
    if not path.suffix and path.exists() and not path.is_dir():
        raise StarflowError(f"out {path}: exists and is not a folder")
    if path.suffix and path.is_dir():
        raise StarflowError(f"out {path}: is a directory, expected a {path.suffix} file")
    check_writable(path.parent, f"out {path}")
    return path.suffix[1:] if path.suffix else "dir"


def check_writable(directory: Path, what: str) -> None:
    """An existing directory where a file can be created, or a one-line StarflowError naming `what`."""
    if not directory.is_dir():
        raise StarflowError(f"{what}: directory {directory} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".starflow-probe-"):
            pass
    except OSError as err:
        raise StarflowError(f"{what}: cannot write in {directory} ({err.strerror or err})") from None


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
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            write(f)
    except OSError as err:  # the disk filled up or the place became read-only since the check
        raise StarflowError(
            f"out {path}: cannot write ({err.strerror or err}); nothing was written"
        ) from None


def save_text(path: Path, text: str) -> None:
    """Write a text file atomically (a report, JSON results)."""
    _atomic_write(path, lambda f: f.write(text.encode()))


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
    try:
        path.mkdir(exist_ok=True)
    except OSError as err:
        raise StarflowError(f"out {path}: cannot create the folder ({err.strerror or err})") from None
    names = prompts or [""] * len(images)
    files = [path / f"{i:04d}-{slug(p)}.png" for i, p in enumerate(names)]
    for file, image in zip(files, images, strict=True):
        _png(file, upscale(to_uint8(image), visible_scale(*image.shape[:2])))
    return files
