"""STARFlow-V in the reference model: the official tiny video checkpoint reproduces the official
golden tensors, rolling generation is the fixed point of the re-encoded window, and the video
options are checked before any work."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import starflow
from starflow.core import sampler
from starflow.core.config import PRESETS, config_from_dict, load_config
from starflow.core.errors import StarflowError
from starflow.core.sampler import JacobiSettings, SampleOptions
from starflow.model.flow import StarFlow
from tests.conftest import FIXTURES

VIDEO = FIXTURES / "official-video-tiny"
JACOBI = JacobiSettings(block_size=4, max_iter=64, threshold=1e-6)  # the fixture's settings
TIGHT = JacobiSettings(block_size=4, max_iter=200, threshold=1e-12)  # iterate to the fixed point

needs_fixture = pytest.mark.skipif(not VIDEO.is_dir(), reason=f"shared fixtures not found at {VIDEO}")


@pytest.fixture(scope="module")
def model() -> StarFlow:
    return starflow.load_model(VIDEO / "config.yaml", VIDEO / "checkpoint.pth")


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(VIDEO / "golden.safetensors")


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@needs_fixture
def test_official_video_config_and_checkpoint_load_strictly(model):
    config = model.config
    assert config.video and config.temporal_causal == 1 and config.shallow_block_local
    assert config.learnable_self_denoiser and not config.conditional_denoiser
    assert [b.frame_local for b in model.blocks] == [True, True, False]
    # seq_order L2R with flip-in-frame: blocks 0 and 2 flip inside each frame
    assert [b.flip for b in model.blocks] == [True, False, True]
    assert len(model.learnable_self_denoiser.attn_blocks) == 8


@needs_fixture
def test_forward_matches_golden(model, golden):
    out = model(golden["x"], golden["y"])
    assert max_err(out.z, golden["forward.z"]) < 1e-5
    # frame-local shallow blocks: (B, T, h*w, D); the deep block: (B, T*h*w, D)
    assert [tuple(ld.shape) for ld in out.logdets] == [(2, 3, 16, 4), (2, 3, 16, 4), (2, 48, 4)]
    for i, logdet in enumerate(out.logdets):
        assert max_err(logdet, golden[f"forward.logdet.{i}"]) < 1e-5
    for i, output in enumerate(out.outputs):
        assert max_err(output, golden[f"forward.output.{i}"]) < 1e-5


@needs_fixture
def test_learned_denoiser_matches_golden(model, golden):
    x, y = golden["reverse.sequential"], golden["y"]
    grid = torch.tensor([4, 4])
    correction = model.learnable_self_denoiser(sampler.patchify(x, 1), y, grid)
    assert max_err(sampler.unpatchify(correction, 1, 4, 4, 3), golden["denoiser.output"]) < 1e-5
    # the sampler's step: x - 0.3 * D(x), the official `noise_std_const`
    denoised = model.denoise(x, y, noise_std=model.config.noise_std)
    assert max_err(denoised, x - 0.3 * golden["denoiser.output"]) < 1e-5


@needs_fixture
@pytest.mark.parametrize("method", ["sequential", "jacobi"])
@pytest.mark.parametrize("cfg", [False, True])
def test_sampling_matches_golden(model, golden, method, cfg):
    options = SampleOptions(guidance=1.5 if cfg else 0.0, method=method, jacobi=JACOBI)
    sample = model.sample(golden["noise"], golden["y"], golden["y_null"] if cfg else None, options)
    key = f"reverse.{method}" + (".cfg" if cfg else "")
    assert max_err(sample, golden[key]) < 1e-4


@needs_fixture
def test_video_jacobi_needs_the_warm_start_and_longer_later_chunks(model, golden):
    """The golden Jacobi sample is reproduced only with the official video rules."""
    cold, stats = model.sample(
        golden["noise"],
        golden["y"],
        options=SampleOptions(jacobi=JACOBI, warm_start=False),
        return_stats=True,
    )
    assert max_err(cold, golden["reverse.jacobi"]) > 1e-4
    deep = stats[0]
    # chunks of 4 while they start within the first frame (the official `start <= frame` test:
    # 0, 4, 8, 12, 16), then of 16 (20-36, and 36-48 cut at the end)
    assert deep.chunks == 5 + 2


@needs_fixture
@pytest.mark.parametrize("window, context", [(3, 2), (3, 1), (2, 1)])
def test_rolling_window_is_the_fixed_point_of_the_reencoded_context(model, golden, window, context):
    """Past `window` frames the deep block restarts from the last `context` frames: each new
    frame must then satisfy the flow's density on [context ; new frames] as a fresh clip."""
    deep, frames, F = model.sampling_blocks()[0], 7, 16
    noise = torch.randn(2, frames, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    y, grid = golden["y"], torch.tensor([4, 4])
    options = SampleOptions(jacobi=TIGHT, window=window, context=context)
    rolled, stats = sampler.sample([deep], noise, y, None, options, patch_size=1, guide_deep_only=True)
    whole, _ = sampler.sample(
        [deep], noise, y, None, SampleOptions(jacobi=TIGHT), patch_size=1, guide_deep_only=True
    )
    assert max_err(rolled[:, :window], whole[:, :window]) < 1e-5  # causal: the first window is the same
    assert max_err(rolled[:, window:], whole[:, window:]) > 1e-2  # and later frames see less
    tokens, z = sampler.patchify(rolled, 1), sampler.patchify(noise, 1)
    end, rolls = window, 0
    while end < frames:
        first, new_end = end - context, min(end + window - context, frames)
        fresh, _ = deep(tokens[:, first * F : new_end * F], y, grid, new_end - first)
        assert max_err(fresh[:, context * F :], z[:, end * F : new_end * F]) < 1e-5
        end, rolls = new_end, rolls + 1
    assert rolls >= 2
    assert stats[0].tokens > 2 * frames * F  # the re-encoded context frames count as work


@needs_fixture
def test_window_covering_the_clip_changes_nothing(model, golden):
    options = SampleOptions(jacobi=JACOBI)
    plain = model.sample(golden["noise"], golden["y"], options=options)
    windowed = model.sample(golden["noise"], golden["y"], options=SampleOptions(jacobi=JACOBI, window=3))
    assert torch.equal(plain, windowed)


@needs_fixture
def test_denoising_in_windows_follows_the_official_overlap(model, golden):
    x, y = golden["reverse.sequential"], golden["y"]
    step = model.learned_denoise_step(y)
    calls = []

    def counted(frames: torch.Tensor) -> torch.Tensor:
        calls.append(frames.shape[1])
        return step(frames)

    assert torch.equal(sampler.denoise_windows(x.clone(), counted, None), step(x))
    assert calls == [x.shape[1]]  # one window holds the clip: no second window writing nothing
    # window 2, overlap 1: frames 0-1 from the first window, frame 2 from the window [1, 3)
    expected = x.clone()
    expected[:, :2] = step(x[:, :2])
    expected[:, 2:] = step(expected[:, 1:3])[:, 1:]
    assert max_err(sampler.denoise_windows(x.clone(), step, 2), expected) == 0
    with pytest.raises(StarflowError, match="overlap 2 must be fewer frames than the window 2"):
        sampler.denoise_windows(x.clone(), step, 2, overlap=2)


@needs_fixture
def test_bad_video_requests_are_refused_before_any_work(model, golden):
    with pytest.raises(StarflowError, match="needs method='jacobi'"):
        model.sample(golden["noise"], golden["y"], options=SampleOptions(method="sequential", window=2))
    with pytest.raises(StarflowError, match="context: must be fewer frames than the window"):
        model.sample(golden["noise"], golden["y"], options=SampleOptions(window=2, context=2))
    with pytest.raises(StarflowError, match=r"window: must be an integer >= 1 \(frames\), got 0"):
        model.sample(golden["noise"], golden["y"], options=SampleOptions(window=0))
    with pytest.raises(StarflowError, match="expected 4 latent channels"):
        model.sample(torch.randn(1, 3, 3, 4, 4), golden["y"][:1])


def test_image_model_refuses_clips():
    model = StarFlow(load_config("tiny-t2i"))
    with pytest.raises(StarflowError, match=r"clips need a video model"):
        model(torch.randn(1, 2, 4, 8, 8), torch.randn(1, 6, 32))


@pytest.mark.parametrize(
    "change, key, message",
    [
        (
            {"cond_top_only": False, "shallow_block_local": True},
            "shallow_block_local",
            "requires cond_top_only",
        ),
        ({"local_attn_window": 4}, "local_attn_window", "requires shallow_block_local"),
        ({"temporal_causal": 1, "seq_order": "R2L"}, "temporal_causal", "requires seq_order: L2R"),
        ({"temporal_causal": 1, "rope": False}, "temporal_causal", "need rope: 1 and txt_size > 0"),
        ({"conditional_denoiser": True}, "conditional_denoiser", "requires learnable_self_denoiser"),
        ({"denoiser_window": 0}, "denoiser_window", "must be a positive number of frames"),
    ],
)
def test_video_config_rules_name_the_key(change, key, message):
    with pytest.raises(StarflowError, match=f"config key '{key}'") as err:
        config_from_dict({**PRESETS["tiny-t2i"], **change})
    assert message in str(err.value)


def test_starflow_v_preset_has_the_published_size():
    """The official 7B config's shapes (Wan2.2 latents: 48 channels, 640 px / 16), built unallocated."""
    config = load_config("starflow-v")
    assert config.latent_size == 40 and config.deep_channels == 4096
    with torch.device("meta"):
        model = StarFlow(config)
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters == 6_890_096_528  # "7B"; 912,884,784 of them the learned denoiser
    assert abs(parameters - config.estimated_parameters()) / parameters < 0.01
