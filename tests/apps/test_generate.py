"""`starflow generate` (runtime and PyTorch engines) and `starflow demo` on the embedded model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from starflow import load_model
from starflow.cli.main import app
from starflow.core.config import DEMO_CHECKPOINT
from starflow.core.errors import StarflowError
from starflow.core.sampler import JacobiSettings, SampleOptions
from starflow.core.sizes import ASPECT_RATIOS, aspect_bucket, latent_of_size
from starflow.model.reference import ReferenceGenerator
from starflow.runtime.generator import Generator

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
    assert latent_of_size((256, 384), 8, 2) == (32, 48)
    with pytest.raises(StarflowError, match="multiples of 16"):
        latent_of_size((250, 384), 8, 2)


# ---- the runtime pipeline against the PyTorch one -------------------------------------------------
def test_demo_checkpoint_is_small_and_loads_alone() -> None:
    assert DEMO_CHECKPOINT.stat().st_size <= 10 * 2**20
    config = load_model(None, DEMO_CHECKPOINT).config
    tokens = (config.latent_size // config.patch_size) ** 2
    assert tokens >= 64 and config.sos  # Jacobi has 64-token sequences to work on


def test_runtime_images_equal_the_pytorch_pipeline(demo_export: Path) -> None:
    generator = Generator.load(demo_export)
    reference = ReferenceGenerator.load(batch_size=8)
    settings = dict(num_images=2, seed=5, sampling=SampleOptions(guidance=1.0))
    deployed = generator.generate(["3", "8"], **settings)
    expected = reference.generate(["3", "8"], **settings)
    assert deployed.images.shape == expected.images.shape == (4, 8, 8, 1)
    assert np.abs(deployed.images - expected.images).max() < 1e-4
    assert deployed.prompts == expected.prompts == ["3", "3", "8", "8"]
    assert [s.iterations for s in deployed.stats] == [s.iterations for s in expected.stats]


def test_reference_jacobi_matches_sequential() -> None:
    reference = ReferenceGenerator.load()
    tight = SampleOptions(guidance=1.0, jacobi=JacobiSettings(threshold=1e-7, max_iter=64))
    jacobi = reference.generate(["1", "7"], seed=3, sampling=tight, denoise=False).images
    sequential = reference.generate(
        ["1", "7"], seed=3, sampling=SampleOptions(1.0, "sequential"), denoise=False
    )
    assert np.abs(jacobi - sequential.images).max() < 1e-3


def test_negative_prompt_replaces_the_unconditional_text(demo_export: Path) -> None:
    generator = Generator.load(demo_export)
    guided = SampleOptions(guidance=1.0)
    plain = generator.generate(["4"], seed=1, sampling=guided).images
    negative = generator.generate(["4"], seed=1, sampling=guided, negative_prompt="9").images
    assert np.abs(plain - negative).max() > 1e-2


def test_batches_follow_the_export_profile(demo_export: Path) -> None:
    generator = Generator.load(demo_export)
    per_batch = generator.images_per_batch(1.0)
    result = generator.generate(["1"], num_images=per_batch + 1, sampling=SampleOptions(1.0), denoise=False)
    assert len(result.images) == per_batch + 1
    assert len(result.stats) == 2 * len(generator.pipeline.blocks)  # two batches


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


def test_generate_with_the_pytorch_engine(tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "grid.png"
    args = ["generate", "--engine", "pytorch", "--prompt", "0", "--num-images", "3", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "with the pytorch engine" in result.output and "block calls" in result.output
    with Image.open(out) as picture:
        assert picture.size == (4 * (3 * 9 + 1), 4 * 10)  # 3 tiles of 8 px + 1 px gaps, x4
    npy = tmp_path / "x.npy"
    result = runner.invoke(app, ["generate", "--engine", "pytorch", "--prompt", "3", "--out", str(npy)])
    assert result.exit_code == 0, result.output
    images = np.load(npy)
    assert (
        images.shape == (1, 8, 8, 1) and images.dtype == np.float32 and 0 <= images.min() <= images.max() <= 1
    )


BAD_INPUT = [
    (["--num-images", "0"], "num_images: input should be greater than or equal to 1, got 0"),
    (["--seed", "-1"], "seed: input should be greater than or equal to 0, got -1"),
    (["--aspect-ratio", "5:1"], "unknown; choose one of"),
    (["--size", "0x8"], "expected HxW"),
    (["--prompt", "cat"], "knows the prompts"),
    (["--out", "missing-dir/x.png"], "does not exist"),
    (["--out", "x.jpg"], "expected a .png"),
    (["--out", "/proc/x.png"], "cannot write in /proc"),
    (["--method", "euler"], "method: input should be 'jacobi' or 'sequential', got 'euler'"),
    (["--guidance", "nan"], "guidance: input should be a finite number, got nan"),
    (["--jacobi-block-size", "0"], "jacobi_block_size: input should be greater than or equal to 1, got 0"),
    (["--engine", "tvm"], "engine: input should be 'runtime' or 'pytorch', got 'tvm'"),
    (["--threads", "0"], "threads: must be an integer >= 1 (or unset for all cores), got 0"),
]


@pytest.mark.parametrize("engine", ["runtime", "pytorch"])
@pytest.mark.parametrize("args, message", BAD_INPUT)
def test_generate_bad_input(
    tmp_path: Path, demo_export: Path, engine: str, args: list[str], message: str
) -> None:
    """Exit code 2, one line, no traceback, and nothing written (for both engines)."""
    base = ["generate", "--engine", engine, "--prompt", "3", "--out", str(tmp_path / "ok.png")]
    fixed = [str(tmp_path / a) if a.startswith(("missing-dir", "x.jpg")) else a for a in args]
    result = runner.invoke(app, base + fixed)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: ")
    assert list(tmp_path.iterdir()) == []


def test_generate_refuses_options_of_the_other_engine(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["generate", "--prompt", "3", "--checkpoint", "x.pth", "--out", str(tmp_path / "x.png")]
    )
    assert result.exit_code == 2 and "checkpoint: not an option of the runtime engine" in result.output
    result = runner.invoke(
        app,
        [
            "generate",
            "--engine",
            "pytorch",
            "--prompt",
            "3",
            "--backend",
            "tensorrt",
            "--out",
            str(tmp_path / "x.png"),
        ],
    )
    assert result.exit_code == 2 and "backend: not an option of the pytorch engine" in result.output


def test_generate_needs_a_prompt(tmp_path: Path, demo_export: Path) -> None:
    result = runner.invoke(app, ["generate", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "prompts: pass at least one" in result.output


def test_size_outside_the_export_range(tmp_path: Path, demo_export: Path) -> None:
    result = runner.invoke(
        app, ["generate", "--prompt", "3", "--size", "64x64", "--out", str(tmp_path / "x.png")]
    )
    assert result.exit_code == 2 and "outside this export's range" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "/proc/x.png"], "cannot write in /proc"),
        (["--seed", "-1"], "seed: must be an integer >= 0"),
        (["--video-out", "x.avi"], "expected an .mp4 (H.264), a .gif"),
    ],
)
def test_demo_bad_input(tmp_path: Path, demo_export: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["demo", "--video-out", str(tmp_path / "x.gif"), *args])
    assert result.exit_code == 2 and message in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


def test_demo_writes_the_grid_and_the_timing(tmp_path: Path, demo_export: Path) -> None:
    from PIL import Image

    out, clips = tmp_path / "demo.png", tmp_path / "demo.gif"
    result = runner.invoke(app, ["demo", "--out", str(out), "--per-digit", "2", "--video-out", str(clips)])
    assert result.exit_code == 0, result.output
    assert f"wrote {clips.resolve()}: one 8-frame clip of each digit 0-9" in result.output
    with Image.open(clips) as gif:
        assert gif.n_frames == 8
    assert str(out.resolve()) in result.output
    assert "PyTorch reference:" in result.output and "runtime (ONNX Runtime, no torch)" in result.output
    assert f"medians of 3 interleaved rounds, {os.cpu_count()} threads each, load average" in result.output
    difference = float(result.output.split("max pixel difference ")[1].split()[0])
    assert difference < 1e-4
    with Image.open(out) as picture:
        assert picture.size == (4 * (10 * 9 + 1), 4 * (2 * 9 + 1))  # 10 digit columns, 2 rows, x4


def test_demo_without_pytorch_times_the_runtime_alone(tmp_path: Path, demo_export: Path) -> None:
    out = tmp_path / "demo.png"
    result = runner.invoke(app, ["demo", "--no-pytorch", "--no-video", "--per-digit", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "runtime (ONNX Runtime, no torch):" in result.output and "(PyTorch not timed)" in result.output
    assert "PyTorch reference:" not in result.output and out.is_file()
