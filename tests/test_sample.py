"""`starflow sample` on the embedded digits model: outputs, prompts, errors, the shipped checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

from starflow import load_model
from starflow.cli.main import app
from starflow.sampling import DEMO_CHECKPOINT, generate, load_conditional

runner = CliRunner()


def test_demo_checkpoint_is_small_and_loads_alone() -> None:
    assert DEMO_CHECKPOINT.stat().st_size <= 10 * 2**20
    config = load_model(None, DEMO_CHECKPOINT).config
    tokens = (config.latent_size // config.patch_size) ** 2
    assert tokens >= 64 and config.sos  # Jacobi has 64-token sequences to work on


def test_sample_npy_is_nhwc_in_unit_range(tmp_path: Path) -> None:
    out = tmp_path / "x.npy"
    result = runner.invoke(app, ["sample", "--prompt", "3", "--num-images", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    images = np.load(out)
    assert images.shape == (2, 8, 8, 1) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0.1


def test_sample_png_grid(tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "grid.png"
    result = runner.invoke(app, ["sample", "--prompt", "0", "--num-images", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with Image.open(out) as picture:
        assert picture.size == (4 * (3 * 9 + 1), 4 * 10)  # 3 tiles of 8 px + 1 px gaps, x4


def test_unknown_prompt_lists_the_known_ones(tmp_path: Path) -> None:
    out = tmp_path / "x.npy"
    result = runner.invoke(app, ["sample", "--prompt", "cat", "--out", str(out)])
    assert result.exit_code == 2
    assert "'0', '1'" in result.output and not out.exists()


def test_bad_output_suffix(tmp_path: Path) -> None:
    result = runner.invoke(app, ["sample", "--out", str(tmp_path / "x.jpg")])
    assert result.exit_code == 2 and "expected a .png (grid), a .npy" in result.output
    assert not list(tmp_path.iterdir())


def test_jacobi_matches_sequential() -> None:
    model, encoder = load_conditional(DEMO_CHECKPOINT)
    labels = torch.tensor([1, 7])
    jacobi = generate(
        model, encoder, labels, seed=3, jacobi_threshold=1e-7, jacobi_max_iter=64, denoise=False
    )
    sequential = generate(model, encoder, labels, seed=3, method="sequential", denoise=False)
    assert np.abs(jacobi - sequential).max() < 1e-3
