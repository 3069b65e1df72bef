"""Training data: the embedded digits, an image folder, and precomputed latent shards.

Every dataset returns whole batches by index (`batch(indices) -> (x, cond)`), so the trainer can
draw one global batch per step from a seeded permutation and give each rank its slice: that is
what makes multi-process runs equal single-process ones and resumes exact.
`x` is (B, C, H, W) float32; `cond` is class labels (B,) int64 for the digits and image folders,
or text embeddings (B, L, txt_dim) for latent shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from starflow.core.errors import StarflowError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DIGITS_PATH = ASSETS / "digits.npz"
DIGITS_LEVELS = 16  # scikit-learn's digits hold integers 0..16
# An image's suffix -> the format PIL must find in it
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".webp": "WEBP"}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits as shipped in the package: images uint8 0..16, labels."""
    with np.load(DIGITS_PATH) as f:
        return f["images"], f["labels"]


def digits_split(split: str, test_fraction: float = 0.15, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, seeded train/test split, so test bits/dim and the classifier use unseen digits."""
    images, labels = digits_arrays()
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = int(round(len(images) * test_fraction))
    chosen = {"test": order[:n_test], "train": order[n_test:], "all": order}.get(split)
    if chosen is None:
        raise StarflowError(f"digits split: expected 'train', 'test' or 'all', got {split!r}")
    return images[chosen], labels[chosen]


def to_model_range(pixels: np.ndarray, max_value: float) -> Tensor:
    """Pixels (N, H, W[, C]) in [0, max_value] -> (N, C, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(pixels.astype(np.float32) / max_value * 2 - 1)
    return x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()


@dataclass
class TensorDataset:
    """Images and class labels held in memory (the digits, an image folder)."""

    x: Tensor  # (N, C, H, W) in [-1, 1]
    labels: Tensor  # (N,) int64
    classes: list[str]  # label index -> prompt text

    def __len__(self) -> int:
        return self.x.size(0)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        return self.x[indices], self.labels[indices]


def digits_dataset(split: str = "train") -> TensorDataset:
    images, labels = digits_split(split)
    classes = [str(k) for k in range(10)]
    return TensorDataset(to_model_range(images, DIGITS_LEVELS), torch.from_numpy(labels).long(), classes)


def image_folder_dataset(root: Path) -> TensorDataset:
    """`root/<class>/*.png`: one sub-folder per class, labels in sorted folder-name order."""
    if not root.is_dir():
        raise StarflowError(f"dataset {root}: no such folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not class_dirs:
        raise StarflowError(f"dataset {root}: no class sub-folders (expected {root}/<class>/<image>.png)")
    images, labels, first = [], [], None
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_FORMATS)
        if not files:
            raise StarflowError(f"dataset {root}: class folder {class_dir.name!r} holds no images")
        for path in files:
            array = read_image(path)
            if first is None:
                first = (path, array.shape)
            elif array.shape != first[1]:
                raise StarflowError(
                    f"dataset {root}: mixed image sizes: {first[0].relative_to(root)} is {first[1]}, "
                    f"{path.relative_to(root)} is {array.shape}; resize them to one size first"
                )
            images.append(array)
            labels.append(label)
    x = to_model_range(np.stack(images), 255.0)
    return TensorDataset(x, torch.tensor(labels, dtype=torch.int64), [p.name for p in class_dirs])


def read_image(path: Path) -> np.ndarray:
    """One training image, (H, W) grey or (H, W, 3) RGB uint8; a file that is not a whole image of
    the format its name says (a folder, empty, truncated, corrupt, a JPEG named .png) is a
    one-line error naming it."""
    from PIL import Image

    if not path.is_file():
        raise StarflowError(f"dataset {path}: not a regular file (named like an image)")
    try:
        with Image.open(path) as img:
            if img.format != IMAGE_FORMATS[path.suffix.lower()]:
                raise StarflowError(
                    f"dataset {path}: holds a {img.format} image, not the {path.suffix} its name says"
                )
            return np.asarray(img.convert("L" if img.mode in ("1", "L", "I", "I;16") else "RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        if isinstance(err, StarflowError):
            raise
        raise StarflowError(f"dataset {path}: not a readable image ({err})") from None


class LatentShards:
    """Precomputed latents + text embeddings in `.safetensors` shards (`latents`, `text` keys).

    Rows are read on demand through safetensors slices, so shards larger than memory work.
    """

    classes: list[str] = []  # text-conditioned: no label encoder

    def __init__(self, root: Path):
        if not root.is_dir():
            raise StarflowError(f"dataset {root}: no such folder")
        paths = sorted(root.glob("*.safetensors"))
        if not paths:
            raise StarflowError(f"dataset {root}: no .safetensors shards")
        self.files, self.rows, shapes = [], [], set()
        for path in paths:
            f = open_shard(path)
            missing = {"latents", "text"} - set(f.keys())
            if missing:
                raise StarflowError(f"dataset {path}: missing tensor(s) {sorted(missing)}")
            for key in ("latents", "text"):
                dtype = f.get_slice(key).get_dtype()
                if dtype not in FLOAT_DTYPES:
                    raise StarflowError(f"dataset {path}: {key} are {dtype}, expected floating point")
            latents, text = f.get_slice("latents").get_shape(), f.get_slice("text").get_shape()
            if len(latents) != 4 or len(text) != 3 or latents[0] != text[0]:
                raise StarflowError(
                    f"dataset {path}: expected latents (N, C, H, W) and text (N, L, D) with the same N, "
                    f"got {latents} and {text}"
                )
            shapes.add((tuple(latents[1:]), tuple(text[1:])))
            self.files.append(f)
            self.rows.extend((len(self.files) - 1, i) for i in range(latents[0]))
        if len(shapes) > 1:
            raise StarflowError(f"dataset {root}: shards disagree on latent/text shapes: {sorted(shapes)}")
        (self.image_shape, self.text_shape) = shapes.pop()
        if not self.rows:
            raise StarflowError(f"dataset {root}: the shards hold no rows")

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        xs, ys = [], []
        for i in indices.tolist():
            shard, row = self.rows[i]
            xs.append(self.files[shard].get_slice("latents")[row : row + 1])
            ys.append(self.files[shard].get_slice("text")[row : row + 1])
        return torch.cat(xs).float(), torch.cat(ys).float()


def open_shard(path: Path) -> Any:
    """A shard's safetensors handle; a folder or an empty, truncated or corrupt file is a one-line
    error naming it."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise StarflowError(f"dataset {path}: not a regular file (named like a shard)")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise StarflowError(f"dataset {path}: not a readable safetensors shard ({err})") from None


Dataset = TensorDataset | LatentShards


def open_dataset(spec: str) -> Dataset:
    """`digits` (the embedded training split), a folder of class sub-folders, or a folder of shards."""
    if spec == "digits":
        return digits_dataset("train")
    root = Path(spec)
    if root.is_dir() and any(root.glob("*.safetensors")):
        return LatentShards(root)
    return image_folder_dataset(root)
