"""Moving digits: the embedded video model's training clips, and measures of generated clips.

Each clip is one 8x8 scikit-learn digit drifting across a small canvas at a constant integer
velocity, so a video model has to keep one digit's identity and motion over time. Two motions:
"bounce" (a random direction per clip, reflected at the edges) and "scroll" (every clip drifts
right and wraps around, as on a torus). On the embedded model's 10x10 canvas a bouncing digit has
3 positions per axis and revisits one every 4 frames or less, so a small model learns to copy
frame t - 4 and draws frames 1-3 as new samples; scrolling revisits none in 10 frames and makes
every frame the previous one moved by one fixed offset: a fixed relative position, which RoPE
attention expresses directly.

The measures read generated clips (N, T, H, W) in the model's range [-1, 1] (background -1, as
`x` of the dataset and the model's samples are); they work on "ink", the pixels mapped to [0, 1]
(background 0, clipped), which is what the digit classifier reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from starflow.core.checks import check_count
from starflow.core.errors import StarflowError

if TYPE_CHECKING:
    from torch import Tensor

DIGIT = 8  # the digits are 8x8
# (dy, dx) of every non-zero velocity with components in {-1, 0, 1}
DIRECTIONS = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])
MOTIONS = ("bounce", "scroll")


def make_clips(
    images: np.ndarray,
    labels: np.ndarray,
    frames: int = 8,
    canvas: int = 12,
    seed: int = 0,
    clips_per_digit: int = 1,
    speed: int = 1,
    motion: str = "bounce",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Digits (N, 8, 8) in pixel units -> clips (M, T, canvas, canvas) float32 in the same units
    (background 0), labels (M,) and top-left (row, col) positions (M, T, 2), M = N * clips_per_digit
    (clip i shows digit i // clips_per_digit).

    Every clip starts at a random position with a random velocity (dy, dx in {-1, 0, 1} times
    `speed` pixels per frame, not both 0); when a step would leave the canvas, that component of
    the velocity is reflected, so the digit is always whole. Positions are multiples of `speed`:
    with `speed` equal to a model's patch size the digit moves by whole patches. (On an axis with
    no room for a step the digit stays put.) With `motion="scroll"` every clip starts whole and
    moves `speed` pixels right a frame, wrapping around the canvas' edge.
    """
    check_count(frames, "frames", 2)
    check_count(canvas, "canvas", DIGIT)
    check_count(clips_per_digit, "clips_per_digit")
    check_count(speed, "speed")
    if motion not in MOTIONS:
        raise StarflowError(f"make_clips: motion must be one of {MOTIONS}, got {motion!r}")
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 3 or images.shape[1:] != (DIGIT, DIGIT) or len(labels) != len(images):
        raise StarflowError(
            f"make_clips: expected images (N, 8, 8) and labels (N,), got {images.shape} and {labels.shape}"
        )
    images = np.repeat(images, clips_per_digit, axis=0).astype(np.float32)
    labels = np.repeat(labels, clips_per_digit)
    n, span = len(images), canvas - DIGIT  # positions run over 0..span on both axes
    rng = np.random.default_rng(seed)
    span -= span % speed  # the last position a whole number of steps from 0
    position = rng.integers(0, span // speed + 1, size=(n, 2)) * speed
    velocity = DIRECTIONS[rng.integers(0, len(DIRECTIONS), size=n)] * speed
    paths = np.empty((n, frames, 2), dtype=np.int64)
    paths[:, 0] = position
    for t in range(1, frames):
        if motion == "scroll":
            position = (position + (0, speed)) % canvas
        else:
            step = position + velocity
            velocity = np.where((step < 0) | (step > span), -velocity, velocity)
            position = np.clip(position + velocity, 0, span)
        paths[:, t] = position
    clips = np.zeros((n, frames, canvas, canvas), dtype=np.float32)
    offsets = np.arange(DIGIT)
    rows = (paths[:, :, 0, None, None] + offsets[:, None]) % canvas  # (n, T, 8, 1)
    cols = (paths[:, :, 1, None, None] + offsets[None, :]) % canvas  # (n, T, 1, 8)
    clip, frame = np.arange(n)[:, None, None, None], np.arange(frames)[None, :, None, None]
    clips[clip, frame, rows, cols] = images[:, None]
    return clips, labels, paths


@dataclass
class ClipDataset:
    """Clips and class labels held in memory, with `TensorDataset`'s `batch` contract."""

    x: Tensor  # (N, T, 1, H, W) in [-1, 1]: the video model's (B, T, C, H, W) layout
    labels: Tensor  # (N,) int64
    classes: list[str]  # label index -> prompt text

    def __len__(self) -> int:
        return self.x.size(0)

    @property
    def clip_shape(self) -> tuple[int, int, int, int]:
        """One sample's (T, C, H, W)."""
        return tuple(self.x.shape[1:])

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        return self.x[indices], self.labels[indices]


def moving_digits_dataset(
    split: str = "train",
    frames: int = 8,
    canvas: int = 12,
    clips_per_digit: int = 1,
    seed: int = 0,
    speed: int = 1,
    motion: str = "bounce",
) -> ClipDataset:
    """Clips of the digits of `split` (the same fixed split as the image model and the classifier;
    `seed` only draws the motion, `speed` is pixels per frame, `motion` as in `make_clips`)."""
    import torch

    from starflow.training.data import DIGITS_LEVELS, digits_split, to_model_range

    images, labels = digits_split(split)
    clips, labels, _ = make_clips(images, labels, frames, canvas, seed, clips_per_digit, speed, motion)
    n = len(clips)
    x = to_model_range(clips.reshape(n * frames, canvas, canvas), DIGITS_LEVELS)
    x = x.reshape(n, frames, 1, canvas, canvas)
    return ClipDataset(x, torch.from_numpy(labels).long(), [str(k) for k in range(10)])


def _ink(x: np.ndarray, ndim: int, what: str) -> np.ndarray:
    """[-1, 1] -> float64 ink in [0, 1], after checking the shape."""
    x = np.asarray(x)
    if x.ndim != ndim or x.shape[-1] < DIGIT or x.shape[-2] < DIGIT:
        raise StarflowError(f"{what}: expected {ndim} dimensions with H, W >= {DIGIT}, got shape {x.shape}")
    return np.clip((x.astype(np.float64) + 1) / 2, 0, 1)


def _window_sums(ink: np.ndarray) -> np.ndarray:
    """Ink (F, H, W) -> (F, H - 7, W - 7): the ink in the 8x8 window at every top-left corner."""
    summed = np.pad(ink.cumsum(1).cumsum(2), ((0, 0), (1, 0), (1, 0)))
    sums = summed[:, DIGIT:, DIGIT:] - summed[:, :-DIGIT, DIGIT:] - summed[:, DIGIT:, :-DIGIT]
    return sums + summed[:, :-DIGIT, :-DIGIT]


def _locate(ink: np.ndarray) -> np.ndarray:
    """Ink (F, H, W) -> top-left (F, 2) of each frame's 8x8 window with the most ink.

    Most digits have empty border columns, so several windows hold all the ink; of those, the
    one that centres the ink's bounding box is taken (the first in row-major order on a tie), which
    gives back where a real digit was drawn in ~92% of frames and a crop shifted by one otherwise.
    """
    f, h, w = ink.shape
    sums = _window_sums(ink)
    best = sums >= sums.max(axis=(1, 2), keepdims=True) * (1 - 1e-9)

    def box_centre(any_ink: np.ndarray) -> np.ndarray:  # (F, L) -> (F,); the canvas centre if blank
        first, last = any_ink.argmax(1), any_ink.shape[1] - 1 - any_ink[:, ::-1].argmax(1)
        return (first + last) / 2

    inked = ink > 0
    cy, cx = box_centre(inked.any(2)), box_centre(inked.any(1))
    rows, cols = np.arange(h - DIGIT + 1), np.arange(w - DIGIT + 1)
    distance = (rows[None, :, None] + (DIGIT - 1) / 2 - cy[:, None, None]) ** 2
    distance = distance + (cols[None, None, :] + (DIGIT - 1) / 2 - cx[:, None, None]) ** 2
    index = np.where(best, distance, np.inf).reshape(f, -1).argmin(1)
    return np.stack(np.unravel_index(index, sums.shape[1:]), axis=1)


def locate_digit(frame: np.ndarray) -> tuple[int, int]:
    """Top-left (row, col) of the 8x8 window of a frame (H, W) in [-1, 1] holding the most ink."""
    row, col = _locate(_ink(frame, 2, "locate_digit")[None])[0]
    return int(row), int(col)


def _crops(ink: np.ndarray) -> np.ndarray:
    """Ink (F, H, W) -> each frame's located 8x8 window (F, 8, 8) float32."""
    corner = _locate(ink)
    offsets = np.arange(DIGIT)
    rows = corner[:, 0, None, None] + offsets[:, None]
    cols = corner[:, 1, None, None] + offsets[None, :]
    return ink[np.arange(len(ink))[:, None, None], rows, cols].astype(np.float32)


def crop_digit(frame: np.ndarray) -> np.ndarray:
    """The located 8x8 digit of a frame (H, W) in [-1, 1], as ink in [0, 1] float32: the input
    range of `starflow.apps.quality`'s classifier (`score_digit` flattens it)."""
    return _crops(_ink(frame, 2, "crop_digit")[None])[0]


def _unwrap(ink: np.ndarray) -> np.ndarray:
    """Ink (F, H, W) of scrolling frames (a digit may wrap around an edge) -> each frame rolled so
    the 8x8 window with the most ink on the torus sits in the middle: a wrapped digit made whole."""
    f, h, w = ink.shape
    # (F, H, W): the window starting at every torus position
    sums = _window_sums(np.pad(ink, ((0, 0), (0, DIGIT - 1), (0, DIGIT - 1)), mode="wrap"))
    top, left = np.unravel_index(sums.reshape(f, -1).argmax(1), (h, w))
    rows = (top[:, None] - (h - DIGIT) // 2 + np.arange(h)) % h  # (F, H)
    cols = (left[:, None] - (w - DIGIT) // 2 + np.arange(w)) % w  # (F, W)
    return ink[np.arange(f)[:, None, None], rows[:, :, None], cols[:, None, :]]


def frame_crops(clips: np.ndarray, wrap: bool = False) -> np.ndarray:
    """Clips (N, T, H, W) in [-1, 1] -> every frame's digit (N * T, 8, 8) float32 in [0, 1], clip by
    clip, so `score_digit` can read generated video frame by frame. `wrap`: the clips scroll (a
    digit may wrap around an edge; see `make_clips`)."""
    ink = _ink(clips, 4, "frame_crops")
    ink = ink.reshape(-1, *ink.shape[2:])
    return _crops(_unwrap(ink) if wrap else ink)


def translate(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """x (..., H, W) moved by (dy, dx) on the last two axes, filled with background (0), no wrap."""
    h, w = x.shape[-2:]
    out = np.zeros_like(x)
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
        ..., max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def _aligned_errors(a: np.ndarray, b: np.ndarray, max_shift: int, wrap: bool) -> np.ndarray:
    """Ink (..., H, W) pairs -> (...) mean |shifted a - b| at the best shift in [-max_shift, max_shift]^2
    (shifted around the edges with `wrap`, else filled with background)."""
    check_count(max_shift, "max_shift", 0)
    shifts = range(-max_shift, max_shift + 1)

    def move(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
        return np.roll(x, (dy, dx), axis=(-2, -1)) if wrap else translate(x, dy, dx)

    errors = [np.abs(move(a, dy, dx) - b).mean(axis=(-2, -1)) for dy in shifts for dx in shifts]
    return np.min(errors, axis=0)


def shift_aligned_error(a: np.ndarray, b: np.ndarray, max_shift: int = 2, wrap: bool = False) -> float:
    """How far frame b (H, W) is from frame a moved by the best integer shift, both in [-1, 1]:
    the mean absolute ink difference in [0, 1] (0: b is a moved copy of a; `wrap`: moved around
    the edges, as scrolling clips move)."""
    a, b = _ink(a, 2, "shift_aligned_error"), _ink(b, 2, "shift_aligned_error")
    if a.shape != b.shape:
        raise StarflowError(f"shift_aligned_error: frames of different shapes {a.shape} and {b.shape}")
    return float(_aligned_errors(a, b, max_shift, wrap))


def temporal_consistency(clips: np.ndarray, max_shift: int = 2, wrap: bool = False) -> float:
    """Mean `shift_aligned_error` over clips (N, T, H, W) in [-1, 1] and their consecutive frame
    pairs: near 0 when each frame is the previous one's digit moved a little (real clips score
    exactly 0), high when each frame is a new sample; compare with `baseline_unrelated`."""
    ink = _ink(clips, 4, "temporal_consistency")
    if ink.shape[1] < 2:
        raise StarflowError(f"temporal_consistency: clips need >= 2 frames, got shape {ink.shape}")
    return float(_aligned_errors(ink[:, :-1], ink[:, 1:], max_shift, wrap).mean())


def baseline_unrelated(clips: np.ndarray, max_shift: int = 2, seed: int = 0, wrap: bool = False) -> float:
    """`temporal_consistency`'s measure with frame t + 1 taken from another clip, chosen at random
    for every pair: the level of "a new, unrelated sample every frame"."""
    ink = _ink(clips, 4, "baseline_unrelated")
    n, frames = ink.shape[:2]
    if n < 2 or frames < 2:
        raise StarflowError(f"baseline_unrelated: needs >= 2 clips of >= 2 frames, got shape {ink.shape}")
    rng = np.random.default_rng(seed)
    other = (np.arange(n)[:, None] + rng.integers(1, n, size=(n, frames - 1))) % n
    following = ink[other, np.arange(1, frames)]
    return float(_aligned_errors(ink[:, :-1], following, max_shift, wrap).mean())
