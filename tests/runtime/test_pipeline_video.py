"""STARFlow-V through the export and the torch-free runtime: the official video fixture exported
through the CLI (with a label table beside it, so prompts work), its goldens reproduced by
`Pipeline`, rolling generation equal to the PyTorch reference's, clips from `starflow generate`,
and bad frame requests refused before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from typer.testing import CliRunner

from starflow.cli.main import app
from starflow.contract.manifest import SCHEMA_VERSION, Manifest
from starflow.core.errors import StarflowError
from starflow.model.checkpoint import load_model
from starflow.runtime import Generator, JacobiSettings, Pipeline, SampleOptions
from tests.conftest import VIDEO, VIDEO_MAX_FRAMES

JACOBI = JacobiSettings(block_size=4, max_iter=64, threshold=1e-6)  # the fixture's settings

pytestmark = pytest.mark.skipif(not VIDEO.is_dir(), reason=f"shared fixtures not found at {VIDEO}")


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    return load_file(VIDEO / "golden.safetensors")


@pytest.fixture(scope="module")
def model():
    return load_model(VIDEO / "config.yaml", VIDEO / "checkpoint.pth")


def test_manifest_describes_the_video_model(video_export):
    manifest = Manifest.load(video_export)
    assert manifest.schema_version == SCHEMA_VERSION
    video = manifest.video
    assert (video.frames.min, video.frames.max) == (1, VIDEO_MAX_FRAMES)
    assert video.later_chunk_factor == 4 and video.warm_start and video.window is None
    assert [(b.index, b.permutation, b.frame_local) for b in manifest.blocks] == [
        (2, "flip-in-frame", False),
        (1, "identity", True),
        (0, "flip-in-frame", True),
    ]
    assert manifest.denoise.kind == "learned" and manifest.denoise.step == 0.3
    cases = {v.case for v in manifest.validation}
    assert any("3 frames" in c for c in cases) and any("2 frames" in c for c in cases)
    assert "clips of 1..6 frames" in manifest.summary()


@pytest.mark.parametrize("method", ["sequential", "jacobi"])
@pytest.mark.parametrize("cfg", [False, True])
def test_fixture_goldens_through_the_runtime(video_export, golden, method, cfg):
    pipe = Pipeline.load(video_export)
    options = SampleOptions(guidance=1.5 if cfg else 0.0, method=method, jacobi=JACOBI)
    sample = pipe.sample(golden["noise"], golden["y"], golden["y_null"] if cfg else None, options)
    key = f"reverse.{method}" + (".cfg" if cfg else "")
    assert np.abs(sample - golden[key]).max() < 1e-4


def test_learned_denoiser_through_the_runtime(video_export, golden):
    generator = Generator.load(video_export)
    x = golden["reverse.sequential"]
    denoised = generator.denoise(x, golden["y"])
    assert np.abs(denoised - (x - 0.3 * golden["denoiser.output"])).max() < 1e-5


def test_rolling_generation_matches_pytorch(video_export, model, golden):
    """6 frames through a 2-frame window (3 rolls), guided, as the PyTorch reference rolls them."""
    noise = np.random.default_rng(1).standard_normal((2, VIDEO_MAX_FRAMES, 4, 4, 4), dtype=np.float32)
    options = SampleOptions(guidance=1.5, jacobi=JACOBI, window=2, context=1)
    y, y_null = golden["y"], golden["y_null"]
    ours = Pipeline.load(video_export).sample(noise, y, y_null, options)
    reference = model.sample(torch.from_numpy(noise), torch.from_numpy(y), torch.from_numpy(y_null), options)
    assert np.abs(ours - reference.numpy()).max() < 1e-4
    unrolled = Pipeline.load(video_export).sample(
        noise, y, y_null, SampleOptions(guidance=1.5, jacobi=JACOBI)
    )
    assert np.abs(ours[:, 2:] - unrolled[:, 2:]).max() > 1e-3  # the window did change the later frames


def test_bad_frame_requests_fail_before_any_work(video_export, golden):
    pipe = Pipeline.load(video_export)
    y = golden["y"]
    with pytest.raises(StarflowError, match=r"7 frames is outside this export's range 1 \.\. 6"):
        pipe.sample(np.zeros((2, 7, 4, 4, 4), np.float32), y)
    with pytest.raises(StarflowError, match="^noise: this is a video export; pass clips"):
        pipe.sample(np.zeros((2, 4, 4, 4), np.float32), y)
    with pytest.raises(StarflowError, match="more than this export's caches hold"):
        pipe.sample(np.zeros((2, 3, 4, 4, 4), np.float32), y, options=SampleOptions(window=7))
    generator = Generator.load(video_export)
    with pytest.raises(StarflowError, match="this is a video model: ask for clips"):
        generator.generate(["up"])
    with pytest.raises(StarflowError, match="outside this export's range"):
        generator.generate(["up"], frames=9)


def test_image_export_refuses_clips(fixture_artifacts):
    with pytest.raises(StarflowError, match="clips need a video model"):
        Pipeline.load(fixture_artifacts).sample(
            np.zeros((1, 2, 4, 8, 8), np.float32), np.zeros((1, 6, 32), np.float32)
        )
    generator = Generator.load(fixture_artifacts)
    with pytest.raises(StarflowError, match="frames: 3 asked of an image model"):
        generator.generate(["a photo"], frames=3)


def test_generate_writes_latent_clips_as_npy(video_export, tmp_path):
    """A 4-channel latent model without a decoder: .npy takes its clips, pictures refuse them."""
    out = tmp_path / "clips.npy"
    args = ["generate", "--artifacts", str(video_export), "--prompt", "up", "--prompt", "down"]
    result = CliRunner().invoke(app, [*args, "--frames", "3", "--fps", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "generated 2 clips of 3 frames 4x4" in result.output
    clips = np.load(out)
    assert clips.shape == (2, 3, 4, 4, 4) and clips.dtype == np.uint8


def test_generate_refuses_frame_options_without_a_video_model(fixture_artifacts, tmp_path):
    args = ["generate", "--artifacts", str(fixture_artifacts), "--prompt", "a photo"]
    result = CliRunner().invoke(app, [*args, "--fps", "4", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "fps: a clip option" in result.output
    result = CliRunner().invoke(app, [*args, "--frames", "3", "--fps", "0", "--out", str(tmp_path / "x.gif")])
    assert result.exit_code == 2 and "fps: input should be greater than 0, got 0.0" in result.output
    result = CliRunner().invoke(app, [*args, "--frames", "3", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "expected an .mp4 (H.264), a .gif" in result.output
    result = CliRunner().invoke(app, [*args, "--frames", "3", "--out", str(tmp_path / "x.gif")])
    assert result.exit_code == 2 and "asked of an image model" in result.output
    assert not (tmp_path / "x.gif").exists()
    manifest = json.loads((fixture_artifacts / "manifest.json").read_text())
    assert manifest["video"] is None
