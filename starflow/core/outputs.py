"""Writing images and video clips: grids, folders of PNGs, .npy arrays, GIF and MP4; atomically.

Shared by `starflow generate` (runtime and PyTorch engines), `starflow demo`, training sample
grids and the server (`png_bytes`, `clip_bytes`: one image or clip in memory); numpy + Pillow
only, plus imageio (the `video` extra) for MP4. `output_kind` and `video_output_kind` check a
destination before any work is done for it. Every file goes through `starflow.core.atomic`'s
writer; a folder of PNGs is written into a hidden sibling first and moved into place once whole.
"""

from __future__ import annotations

import contextlib
import errno
import io
import math
import numbers
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from starflow.core.atomic import (
    atomic_file,
    atomic_path,
    check_target,
    fsync_path,
    partial_folder,
    partial_prefix,
)
from starflow.core.errors import StarflowError

if TYPE_CHECKING:
    from PIL import Image

SUFFIXES = (".png", ".npy")
VIDEO_SUFFIXES = (".mp4", ".gif", ".npy")
DEFAULT_FPS = 8.0  # clips are shown at this rate unless the export or the user says otherwise
VIDEO_SIDE = 128  # clips are upscaled (nearest) until their short side is at least this many pixels


def to_unit_images(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) float32 in [0, 1]: clip to [-1, 1], then (x + 1) / 2;
    clips (N, T, C, H, W) -> (N, T, H, W, C)."""
    if not isinstance(x, np.ndarray) or x.ndim not in (4, 5):
        shape = x.shape if isinstance(x, np.ndarray) else type(x).__name__
        raise StarflowError(f"images: expected an (N, C, H, W) or (N, T, C, H, W) array, got {shape}")
    x = np.clip(x.astype(np.float32, copy=False), -1.0, 1.0)
    order = (0, 2, 3, 1) if x.ndim == 4 else (0, 1, 3, 4, 2)
    return np.ascontiguousarray(((x + 1.0) / 2.0).transpose(order))


def from_unit_images(images: np.ndarray) -> np.ndarray:
    """`to_unit_images` undone: (N, H, W, C) in [0, 1] -> (N, C, H, W) float32 in [-1, 1]; clips
    (N, T, H, W, C) -> (N, T, C, H, W). A pixel-space model's latents are these."""
    order = (0, 3, 1, 2) if images.ndim == 4 else (0, 1, 4, 2, 3)
    return np.ascontiguousarray(images.transpose(order) * 2.0 - 1.0, dtype=np.float32)


def output_kind(path: Path) -> str:
    """'png' (grid), 'npy' or 'dir' (one PNG per image); the place must be writable, checked
    before any work by creating (and removing) a temporary file there, and a file output absent
    or a regular file (`check_target`: not a symlink or a device)."""
    return _destination_kind(
        path, SUFFIXES, "a .png (grid), a .npy (N, H, W, C) array, or a folder (one PNG per image)"
    )


def video_output_kind(path: Path) -> str:
    """'mp4', 'gif', 'npy' or 'dir' (one PNG per frame), checked like `output_kind`; an .mp4 also
    needs imageio, so a missing install fails here rather than after the clips were generated."""
    kind = _destination_kind(
        path,
        VIDEO_SUFFIXES,
        "an .mp4 (H.264), a .gif, a .npy (N, T, H, W, C) uint8 array, or a folder (one PNG per frame)",
    )
    if kind == "mp4":
        imageio_for_mp4(f"out {path}")
    return kind


def _destination_kind(path: Path, suffixes: tuple[str, ...], expected: str) -> str:
    if path.suffix and path.suffix not in suffixes:
        raise StarflowError(f"out {path}: expected {expected}")
    if not path.suffix and path.exists() and not path.is_dir():
        raise StarflowError(f"out {path}: exists and is not a folder")
    if path.suffix and path.is_dir():
        raise StarflowError(f"out {path}: is a directory, expected a {path.suffix} file")
    if path.suffix:
        check_output_file(path, f"out {path}")
    else:
        check_writable(path.parent, f"out {path}")
    return path.suffix[1:] if path.suffix else "dir"


def check_output_file(path: Path, what: str) -> None:
    """A file output checked before any work: absent or a regular file (`check_target`: the rename
    that writes it would replace a symlink or a device), in a folder where a file can be created."""
    check_target(path, what)
    check_writable(path.parent, what)


def check_writable(directory: Path, what: str) -> None:
    """An existing directory where a file can be created, or a one-line StarflowError naming `what`."""
    if not directory.is_dir():
        raise StarflowError(f"{what}: directory {directory} does not exist")
    try:
        # named as a partial: one a killed process leaves is removed like any other
        with tempfile.NamedTemporaryFile(dir=directory, prefix=partial_prefix(directory / "starflow-probe")):
            pass
    except OSError as err:
        raise StarflowError(f"{what}: cannot write in {directory} ({err.strerror or err})") from None


def grid(images: np.ndarray, columns: int, pad: int = 1, what: str = "images") -> np.ndarray:
    """(N, H, W, C) in [0, 1] -> one (rows*(H+pad)+pad, columns*(W+pad)+pad, C) uint8 mosaic."""
    return _mosaic(to_uint8(images, what), columns, pad)


def _mosaic(tiles: np.ndarray, columns: int, pad: int = 1) -> np.ndarray:
    """`grid` for tiles that are uint8 already (video frames)."""
    n, h, w, c = tiles.shape
    rows = -(-n // columns)
    canvas = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        canvas[top : top + h, left : left + w] = tile
    return canvas


def to_uint8(image: np.ndarray, what: str = "images") -> np.ndarray:
    """[0, 1] -> 0..255; NaN or inf has no pixel value, so it is refused (naming `what`), not cast
    to an arbitrary byte."""
    bad = image.size - np.count_nonzero(np.isfinite(image))
    if bad:
        raise StarflowError(
            f"{what}: {bad} pixel values are NaN or inf, which an image cannot hold "
            "(a .npy output keeps them)"
        )
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def visible_scale(height: int, width: int, smallest_side: int = 32) -> int:
    """The integer factor that brings tiny images (8x8 digits) to a visible size."""
    return max(1, smallest_side // min(height, width))


def upscale(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of an (H, W, C) array."""
    return pixels.repeat(factor, 0).repeat(factor, 1)


@contextlib.contextmanager
def _write_errors(path: Path, what: str | None = None) -> Iterator[None]:
    try:
        yield
    except OSError as err:  # the disk filled up or the place became read-only since the check
        raise StarflowError(
            f"{what or f'out {path}'}: cannot write ({err.strerror or err}); nothing was written"
        ) from None


def _atomic_write(path: Path, write: Callable[[BinaryIO], None], what: str | None = None) -> None:
    with _write_errors(path, what), atomic_file(path, what or f"out {path}") as f:
        write(f)


def save_text(path: Path, text: str, what: str | None = None) -> None:
    """Write a text file atomically (a report, JSON results); errors name `what` (default: out PATH)."""
    _atomic_write(path, lambda f: f.write(text.encode()), what)


def _picture(pixels: np.ndarray) -> Image.Image:
    """(H, W, C) uint8 -> a Pillow image ('L' for one channel, 'RGB' for three)."""
    from PIL import Image

    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


def png_bytes(pixels: np.ndarray) -> bytes:
    """(H, W, C) uint8 -> a PNG file's bytes."""
    f = io.BytesIO()
    _picture(pixels).save(f, format="PNG")
    return f.getvalue()


def _png(path: Path, pixels: np.ndarray) -> None:
    picture = _picture(pixels)
    _atomic_write(path, lambda f: picture.save(f, format="PNG"))


def save_png(path: Path, images: np.ndarray, columns: int, scale: int | None = None) -> None:
    """A grid PNG; tiles are upscaled (nearest) so that the smallest side is >= 32 px."""
    pixels = grid(images, columns, what=f"out {path}")
    _png(path, upscale(pixels, scale or visible_scale(*images.shape[1:3])))


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
    pixels = to_uint8(images, f"out {path}")  # all refused before the first file
    names = [f"{i:04d}-{slug(p)}.png" for i, p in enumerate(prompts or [""] * len(images))]
    scale = visible_scale(*images.shape[1:3])
    return _png_folder(path, names, (upscale(p, scale) for p in pixels))


# ---- video clips (STARFlow-V) -------------------------------------------------------------------------
def write_video(clips: np.ndarray, path: Path, fps: float, columns: int | None = None) -> list[Path]:
    """Write `clips` (N, T, H, W, C) uint8 as `video_output_kind(path)` says; returns the files written.

    .npy keeps the array as is; .gif and .mp4 show the N clips as one grid (`columns` wide, at most 8
    by default) per frame; a folder gets one PNG per clip and frame. Bad input fails before any work.
    """
    _check_clips(clips, fps)
    kind = video_output_kind(path)
    if kind != "npy" and clips.shape[-1] not in (1, 3):
        raise StarflowError(
            f"clips: {clips.shape[-1]} channels (shape {clips.shape}) can be written as .npy only; "
            ".gif, .mp4 and PNG frames need 1 or 3"
        )
    if kind == "npy":
        _atomic_write(path, lambda f: np.save(f, clips))
        return [path]
    if kind == "dir":
        n, t, h, w, _ = clips.shape
        scale = _video_scale(h, w)
        names = [f"clip{i:03d}_frame{j:04d}.png" for i in range(n) for j in range(t)]
        return _png_folder(path, names, (upscale(p, scale) for p in clips.reshape(n * t, h, w, -1)))
    frames = _grid_frames(clips, columns or min(len(clips), 8))
    if kind == "gif":
        _atomic_write(path, lambda f: _gif(f, frames, fps))
        return [path]
    iio = imageio_for_mp4(f"out {path}")
    with _write_errors(path), atomic_path(path, f"out {path}") as tmp:
        _mp4(iio, tmp, frames, fps)
    return [path]


def clip_bytes(clip: np.ndarray, kind: str, fps: float) -> bytes:
    """One clip (T, H, W, C) uint8 as the bytes of a .gif or .mp4 (`kind`) that `write_video` would
    write for it; mp4 needs `imageio_for_mp4`."""
    _check_clips(clip[None], fps)
    frames = _grid_frames(clip[None], 1)
    if kind == "gif":
        f = io.BytesIO()
        _gif(f, frames, fps)
        return f.getvalue()
    return _mp4(imageio_for_mp4(kind), "<bytes>", frames, fps)


def _mp4(iio: ModuleType, target: Path | str, frames: Iterator[np.ndarray], fps: float) -> bytes | None:
    """H.264 in an MP4 container, to a file or (target "<bytes>") returned as bytes."""
    return iio.imwrite(
        target, frames, is_batch=True, plugin="FFMPEG", extension=".mp4", fps=fps, codec="libx264",
        pixelformat="yuv420p", macro_block_size=1, output_params=["-f", "mp4"],  # no suffix on a partial
    )  # fmt: skip


def _check_clips(clips: np.ndarray, fps: float) -> None:
    shape = getattr(clips, "shape", None)
    if not isinstance(clips, np.ndarray) or clips.ndim != 5:
        raise StarflowError(f"clips: expected an (N, T, H, W, C) array, got shape {shape}")
    if clips.dtype != np.uint8:
        raise StarflowError(f"clips: expected uint8 pixels (0..255), got {clips.dtype}")
    if min(shape[:4]) < 1:
        raise StarflowError(f"clips: expected at least one clip, frame, row and column, got shape {shape}")
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not (math.isfinite(fps) and fps > 0):
        raise StarflowError(f"fps: expected a finite number > 0, got {fps!r}")


def imageio_for_mp4(what: str) -> ModuleType:
    """imageio.v3 with its ffmpeg plugin (imageio-ffmpeg ships the ffmpeg binary), imported only for
    .mp4; missing, a one-line error naming `what` (the destination, or the server's mp4 format)."""
    try:
        import imageio.v3 as iio
        import imageio_ffmpeg  # noqa: F401  the FFMPEG plugin needs it; fail here, not mid-write
    except ImportError as err:
        raise StarflowError(
            f"{what}: writing .mp4 needs imageio and imageio-ffmpeg ({err.name} is missing): "
            "pip install 'starflow[video]'"
        ) from None
    return iio


def _video_scale(height: int, width: int) -> int:
    """The integer factor that brings a clip's short side to at least VIDEO_SIDE pixels."""
    return -(-VIDEO_SIDE // min(height, width))


def _grid_frames(clips: np.ndarray, columns: int) -> Iterator[np.ndarray]:
    """Per time step, the N clips' frames as one upscaled grid, padded to even sides (H.264 yuv420p
    stores colour at half resolution and refuses odd sizes); one frame at a time, for long clips."""
    scale = _video_scale(*clips.shape[2:4])
    for step in range(clips.shape[1]):
        frame = upscale(_mosaic(clips[:, step], columns), scale)
        yield np.pad(frame, ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0)))


def _gif(f: BinaryIO, frames: Iterator[np.ndarray], fps: float) -> None:
    """An animated GIF that loops forever. GIF delays are whole 1/100 s; Pillow merges identical
    consecutive frames (adding up their delays)."""
    first, *rest = (_picture(frame) for frame in frames)
    delay = 10 * max(1, round(100 / fps))  # in ms
    first.save(f, format="GIF", save_all=True, append_images=rest, duration=delay, loop=0)


def _png_folder(path: Path, names: list[str], pictures: Iterable[np.ndarray]) -> list[Path]:
    """One PNG per name (clips: `clip{n:03d}_frame{t:04d}.png`). They are written into a hidden
    sibling folder first, so a failure (a full disk) leaves nothing behind; then that folder is
    renamed into place, or, when the folder exists (reused), its files are moved in, replacing
    same-named regular files (anything else at a name is refused before any file is written)."""
    files = [path / name for name in names]
    if path.is_dir():
        for file in files:
            check_target(file, f"out {file}")
    with _write_errors(path):
        staged = partial_folder(path)
        try:
            for name, pixels in zip(names, pictures, strict=True):
                with open(staged / name, "xb") as f:
                    _picture(pixels).save(f, format="PNG")
                    f.flush()
                    os.fsync(f.fileno())
            fsync_path(staged)
            if not path.is_dir():
                try:
                    os.replace(staged, path)
                    fsync_path(path.parent)
                    return files
                except OSError as err:
                    if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise  # else another writer has just made the folder: move the files in
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
    try:
        for name in names:
            os.replace(staged / name, path / name)
        fsync_path(path)
    except OSError as err:
        moved = sum(not (staged / name).exists() for name in names)
        raise StarflowError(
            f"out {path}: cannot move the files into place ({err.strerror or err}); {moved} of "
            f"{len(names)} were moved in, the rest removed"
        ) from None
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return files
