"""Bad training inputs (issue 29): each bad image or shard is a one-line error naming the file."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from starflow.core.errors import StarflowError
from starflow.training.data import open_dataset


def png(pixels: np.ndarray, format: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=format)
    return out.getvalue()


GOOD = png(np.full((8, 8), 128, np.uint8))
BAD_IMAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "empty": (lambda p: p.write_bytes(b""), "not a readable image"),
    "truncated": (lambda p: p.write_bytes(GOOD[: len(GOOD) // 2]), "not a readable image"),
    "corrupt": (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64), "not a readable image"),
    "text": (lambda p: p.write_text("not an image"), "not a readable image"),
    "a JPEG named .png": (
        lambda p: p.write_bytes(png(np.zeros((8, 8), np.uint8), "JPEG")),
        "holds a JPEG image, not the .png its name says",
    ),
    "a folder named .png": (lambda p: p.mkdir(), "not a regular file"),
}


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_a_bad_image_is_named_in_one_line(tmp_path, case):
    make, message = BAD_IMAGES[case]
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        (tmp_path / label / "0.png").write_bytes(GOOD)
    bad = tmp_path / "b" / "1.png"
    make(bad)
    with pytest.raises(StarflowError, match=f"^dataset {bad}: {message}") as err:
        open_dataset(str(tmp_path))
    assert "\n" not in str(err.value)


def shard(path: Path, **overrides: torch.Tensor) -> None:
    tensors = {"latents": torch.zeros(2, 4, 2, 2), "text": torch.zeros(2, 3, 8)} | overrides
    save_file(tensors, path)


BAD_SHARDS: dict[str, tuple[Callable[[Path], None], str]] = {
    "empty": (lambda p: p.write_bytes(b""), "not a readable safetensors shard"),
    "truncated": (
        lambda p: (shard(p), p.write_bytes(p.read_bytes()[:-10])),
        "not a readable safetensors shard",
    ),
    "corrupt": (lambda p: p.write_bytes(b"\xff" * 64), "not a readable safetensors shard"),
    "integer latents": (
        lambda p: shard(p, latents=torch.zeros(2, 4, 2, 2, dtype=torch.int64)),
        "latents are I64, expected floating point",
    ),
    "a folder named .safetensors": (lambda p: p.mkdir(), "not a regular file"),
}


@pytest.mark.parametrize("case", BAD_SHARDS)
def test_a_bad_shard_is_named_in_one_line(tmp_path, case):
    make, message = BAD_SHARDS[case]
    shard(tmp_path / "0.safetensors")
    bad = tmp_path / "1.safetensors"
    make(bad)
    with pytest.raises(StarflowError, match=f"^dataset {bad}: {message}") as err:
        open_dataset(str(tmp_path))
    assert "\n" not in str(err.value)


def test_good_images_and_shards_still_load(tmp_path):
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        (tmp_path / "images" / label / "0.png").write_bytes(GOOD)
    (tmp_path / "images" / "b" / "1.JPG").write_bytes(png(np.zeros((8, 8), np.uint8), "JPEG"))
    assert len(open_dataset(str(tmp_path / "images"))) == 3
    (tmp_path / "shards").mkdir()
    shard(tmp_path / "shards" / "0.safetensors", latents=torch.zeros(2, 4, 2, 2, dtype=torch.bfloat16))
    assert len(open_dataset(str(tmp_path / "shards"))) == 2
