"""`starflow generate` and `starflow demo` on the embedded model: the deployed path end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from starflow.cli.main import app
from starflow.errors import StarflowError
from starflow.runtime.generator import Generator
from starflow.runtime.sizes import ASPECT_RATIOS, aspect_bucket, parse_size
from starflow.sampling import DEMO_CHECKPOINT, load_conditional
from starflow.t2i import text_to_image
from starflow.text_encoder import LabelTextEncoder

runner = CliRunner()


# ---- sizes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", ASPECT_RATIOS)
def test_buckets_keep_the_area_and_the_granularity(ratio: str) -> None:
    h, w = aspect_bucket(ratio, 32, 2)
    width, height = (int(v) for v in ratio.split(":"))
    assert h % 2 == 0 and w % 2 == 0
    assert abs(h * w / 32**2 - 1) < 0.15  # area near the training resolution squared
    assert abs((w / h) / (width / height) - 1) < 0.15


def test_landscape_bucket_is_wider_than_tall() -> None:
    assert aspect_bucket("16:9", 32, 1) == (24, 43)
    assert aspect_bucket("1:1", 32, 2) == (32, 32)


def test_unknown_aspect_ratio_lists_the_known_ones() -> None:
    with pytest.raises(StarflowError, match="unknown; choose one of 1:1"):
        aspect_bucket("5:1", 32, 1)


def test_size_must_fit_the_vae_and_patch() -> None:
    assert parse_size("256x384", 8, 2) == (32, 48)
    with pytest.raises(StarflowError, match="multiples of 16"):
        parse_size("250x384", 8, 2)
    with pytest.raises(StarflowError, match="expected HxW"):
        parse_size("big", 8, 2)


# ---- the runtime pipeline against the PyTorch one -------------------------------------------------
def test_runtime_images_equal_the_pytorch_pipeline(demo_export: Path) -> None:
    generator = Generator.load(demo_export)
    model, table = load_conditional(DEMO_CHECKPOINT)
    settings = dict(prompts=["3", "8"], num_images=2, guidance=1.0, seed=5)
    deployed = generator.generate(**settings)
    reference = text_to_image(model, LabelTextEncoder(table), batch_size=8, **settings)
    assert deployed.images.shape == reference.shape == (4, 8, 8, 1)
    assert np.abs(deployed.images - reference).max() < 1e-4
    assert deployed.prompts == ["3", "3", "8", "8"]


def test_negative_prompt_replaces_the_unconditional_text(demo_export: Path) -> None:
    generator = Generator.load(demo_export)
    plain = generator.generate(["4"], guidance=1.0, seed=1).images
    negative = generator.generate(["4"], guidance=1.0, seed=1, negative_prompt="9").images
    assert np.abs(plain - negative).max() > 1e-2


def test_batches_follow_the_export_profile(demo_export: Path) -> None:
    generator = Generator.load(demo_export)
    per_batch = generator.images_per_batch(1.0)
    result = generator.generate(["1"], num_images=per_batch + 1, guidance=1.0, denoise=False)
    assert len(result.images) == per_batch + 1
    assert len(result.stats) == 2 * len(generator.pipeline.plans)  # two batches


# ---- the CLI ---------------------------------------------------------------------------------------
def _classifier():
    from scripts.eval_demo import train_classifier

    return train_classifier()


def test_generate_sevens_are_read_as_sevens(tmp_path: Path, demo_export: Path) -> None:
    out = tmp_path / "x.npy"
    args = ["generate", "--prompt", "7", "--num-images", "16", "--seed", "0", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "time:" in result.output and "block calls" in result.output
    images = np.load(out)
    assert images.shape == (16, 8, 8, 1) and images.dtype == np.float32
    classifier, held_out = _classifier()
    assert held_out > 0.9
    with torch.no_grad():
        predicted = classifier(torch.from_numpy(images.reshape(16, 64))).argmax(1)
    assert (predicted == 7).float().mean().item() >= 0.9


def test_generate_folder_and_aspect_ratio(tmp_path: Path, demo_export: Path) -> None:
    out = tmp_path / "images"
    args = ["generate", "--prompt", "1", "--prompt", "2", "--aspect-ratio", "16:9", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in out.iterdir())
    assert files == ["0000-1.png", "0001-2.png"]
    assert "images 6x11" in result.output  # the 16:9 bucket of an 8x8 model


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num-images", "0"], "--num-images: must be >= 1"),
        (["--aspect-ratio", "5:1"], "unknown; choose one of"),
        (["--size", "0x8"], "expected HxW"),
        (["--prompt", "cat"], "knows the prompts"),
        (["--out", "missing-dir/x.png"], "does not exist"),
        (["--out", "x.jpg"], "expected a .png"),
        (["--method", "euler"], "--method: expected one of"),
    ],
)
def test_generate_bad_input(tmp_path: Path, demo_export: Path, args: list[str], message: str) -> None:
    base = ["generate", "--prompt", "3", "--out", str(tmp_path / "ok.png")]
    fixed = [str(tmp_path / a) if a.startswith(("missing-dir", "x.jpg")) else a for a in args]
    result = runner.invoke(app, base + fixed)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "ok.png").exists()


def test_generate_needs_a_prompt(tmp_path: Path) -> None:
    result = runner.invoke(app, ["generate", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "no prompt given" in result.output


def test_size_outside_the_export_range(tmp_path: Path, demo_export: Path) -> None:
    result = runner.invoke(
        app, ["generate", "--prompt", "3", "--size", "64x64", "--out", str(tmp_path / "x.png")]
    )
    assert result.exit_code == 2 and "outside this export's range" in result.output


def test_demo_writes_the_grid_and_the_timing(tmp_path: Path, demo_export: Path) -> None:
    from PIL import Image

    out = tmp_path / "demo.png"
    result = runner.invoke(app, ["demo", "--out", str(out), "--per-digit", "2"])
    assert result.exit_code == 0, result.output
    assert str(out.resolve()) in result.output
    assert "PyTorch reference:" in result.output and "runtime (ONNX Runtime, no torch)" in result.output
    difference = float(result.output.split("max pixel difference ")[1].split()[0])
    assert difference < 1e-4
    with Image.open(out) as picture:
        assert picture.size == (4 * (10 * 9 + 1), 4 * (2 * 9 + 1))  # 10 digit columns, 2 rows, x4
