"""libstarflow on STARFlow-V exports: `starflow-run` reproduces the official video goldens, equals
`Pipeline.sample` (1e-5, the same iteration counts, per image too) on the embedded moving-digits
model, a clip rolled through a smaller window included, runs that model end to end (prompt ->
clip, the learned denoiser) as `starflow generate --frames` does, and refuses bad frame counts and
windows with a status, also under AddressSanitizer + UBSan. Skipped without a build, as
test_libstarflow.py."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from starflow.core.errors import StarflowError
from starflow.core.generation import make_noise
from starflow.core.outputs import to_unit_images, upscale
from starflow.runtime import Generator, JacobiSettings, Pipeline, SampleOptions
from tests.conftest import VIDEO
from tests.runtime.cpp.test_libstarflow import (
    ASAN_BUILD,
    BUILD,
    COUNTS,
    _set_digest,
    built,
    cpp_sample,
    run,
    same_counts,
)

FIXTURE_JACOBI = JacobiSettings(block_size=4, max_iter=64, threshold=1e-6)  # the video fixture's settings


PER_IMAGE_COUNTS = (*COUNTS, "image_iterations")  # clips: iterations per image too


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    if not VIDEO.is_dir():
        pytest.skip(f"shared fixtures not found at {VIDEO}")
    return load_file(VIDEO / "golden.safetensors")


@pytest.mark.parametrize("method", ["sequential", "jacobi"])
@pytest.mark.parametrize("cfg", [False, True])
def test_official_video_goldens_through_starflow_run(video_export, golden, tmp_path, method, cfg):
    """Frame-local shallow blocks, the flip inside each frame, later chunks 4x longer, warm start."""
    options = SampleOptions(1.5 if cfg else 0.0, method, FIXTURE_JACOBI)
    y_null = golden["y_null"] if cfg else None
    ours, cpp_stats = cpp_sample(video_export, tmp_path, golden["noise"], golden["y"], y_null, options)
    key = f"reverse.{method}" + (".cfg" if cfg else "")
    assert ours.shape == (2, 3, 4, 4, 4) and np.abs(ours - golden[key]).max() <= 1e-4
    ref, stats = Pipeline.load(video_export, threads=1).sample(
        golden["noise"], golden["y"], y_null, options, return_stats=True
    )
    assert np.abs(ours - ref).max() <= 1e-5 and same_counts(cpp_stats, stats, PER_IMAGE_COUNTS)


@pytest.mark.parametrize(
    ("frames", "options", "flags"),
    [
        (4, SampleOptions(2.0), ()),  # the export's settings: no window, warm start
        (  # 7 frames through a 3-frame window re-encoding 1 (2 rolls), each row stopping alone
            7,
            SampleOptions(2.0, window=3, context=1, stop="row", jacobi=JacobiSettings(16, 32, 1e-3)),
            ("--window", "3", "--context", "1"),
        ),
        (3, SampleOptions(0.0, warm_start=False), ("--no-warm-start",)),
    ],
    ids=["official", "rolled-row-stop", "no-warm-start"],
)
def test_moving_digits_clips_equal_the_python_runtime(demo_video_export, tmp_path, frames, options, flags):
    generator = Generator.load(demo_video_export, threads=1)
    y = generator.encode(["3", "8"])
    y_null = (
        np.ascontiguousarray(np.broadcast_to(generator.encode([""]), y.shape)) if options.guidance else None
    )
    noise = make_noise(7, (2, frames, 1, 10, 10))
    ref, stats = generator.pipeline.sample(noise, y, y_null, options, return_stats=True)
    ours, cpp_stats = cpp_sample(demo_video_export, tmp_path, noise, y, y_null, options, *flags)
    assert np.abs(ours - ref).max() <= 1e-5
    assert same_counts(cpp_stats, stats, PER_IMAGE_COUNTS)
    if options.stop == "row":  # the rows did stop apart, and the roll re-encoded (one call per roll)
        assert any(len(set(chunk)) > 1 for s in stats for chunk in s.image_iterations)
        assert stats[0].evaluations == sum(stats[0].iterations) + 2


def test_moving_digits_model_end_to_end_equals_starflow_generate(demo_video_export, tmp_path):
    """prompt -> label id -> text encoder -> flow (guidance, frame-local blocks) -> the learned
    denoiser -> frames, as `starflow generate --frames 8` (Generator.generate) gives them."""
    generator = Generator.load(demo_video_export, threads=1)
    generation = generator.generate(["2", "5"], seed=3, frames=8)
    np.save(tmp_path / "noise.npy", make_noise(3, (2, 8, 1, 10, 10)))
    base = ["--artifacts", demo_video_export, "--prompt", "2", "--prompt", "5", "--frames", "8"]
    base += ["--threads", "1"]
    args = [*base, "--noise", tmp_path / "noise.npy", "--latents-out", tmp_path / "latents.npy"]
    result = run(built(BUILD) / "starflow-run", *args, "--out", tmp_path / "clips.npy")
    assert result.returncode == 0, result.stderr
    assert "generated 2 clips of 8 frames 10x10 -> " in result.stdout
    clips = np.load(tmp_path / "clips.npy")
    assert clips.shape == (2, 8, 10, 10, 1) and np.abs(clips - generation.images).max() <= 1e-4
    assert np.abs(np.load(tmp_path / "latents.npy") - generation.latents).max() <= 1e-4
    # --seed 3 draws numpy's noise, as generate(seed=3) does
    result = run(BUILD / "starflow-run", *base, "--seed", "3", "--out", tmp_path / "seeded.npy")
    assert result.returncode == 0, result.stderr
    assert np.abs(np.load(tmp_path / "seeded.npy") - generation.images).max() <= 1e-4

    # a folder: one PNG per clip and frame, named and drawn as `starflow generate --frames` writes them
    result = run(BUILD / "starflow-run", *args, "--out", tmp_path / "frames")
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (tmp_path / "frames").iterdir())
    assert names == [f"clip{n:03d}_frame{t:04d}.png" for n in range(2) for t in range(8)]
    from PIL import Image

    with Image.open(tmp_path / "frames" / "clip001_frame0006.png") as image:
        pixels = np.asarray(image)
    expected = upscale(np.round(generation.images[1, 6] * 255).astype(np.uint8), 13)[..., 0]  # 10x10 -> 130
    assert np.abs(pixels.astype(int) - expected).max() <= 1


def test_clips_run_in_calls_of_the_rows_a_frame_local_block_allows(demo_video_export, tmp_path):
    """9 clips of 16 frames are 144 frame rows, more than the export's 128: both runtimes split the
    batch by the same rule (Manifest.images_per_batch with frames) and give the same clips."""
    generator = Generator.load(demo_video_export, threads=1)
    assert generator.manifest.max_rows < 9 * 16 and generator.images_per_batch(0.0, 16) < 9
    prompts = [str(n) for n in range(9)]
    generation = generator.generate(prompts, seed=5, frames=16, latent_size=(5, 5))
    np.save(tmp_path / "noise.npy", make_noise(5, (9, 16, 1, 5, 5)))
    args = ["--artifacts", demo_video_export, *(a for p in prompts for a in ("--prompt", p))]
    args += ["--frames", "16", "--noise", tmp_path / "noise.npy", "--threads", "1"]
    result = run(built(BUILD) / "starflow-run", *args, "--out", tmp_path / "clips.npy")
    assert result.returncode == 0, result.stderr
    assert np.abs(np.load(tmp_path / "clips.npy") - generation.images).max() <= 1e-4


def test_a_failing_clip_folder_leaves_no_output(demo_video_export, tmp_path):
    """The PNGs are staged in a hidden sibling folder and the latents written only once every output
    is made: a folder in the way of one frame's name leaves no new file, no latents, no staging."""
    out = tmp_path / "frames"
    (out / "clip000_frame0001.png" / "inner").mkdir(parents=True)  # a non-empty folder: no rename over it
    np.save(tmp_path / "noise.npy", make_noise(1, (1, 2, 1, 5, 5)))
    args = ["--artifacts", demo_video_export, "--prompt", "1", "--frames", "2"]
    args += ["--noise", tmp_path / "noise.npy"]
    args += ["--latents-out", tmp_path / "latents.npy", "--stats", tmp_path / "stats.json", "--out", out]
    result = run(built(BUILD) / "starflow-run", *args)
    phrase = "frames/clip000_frame0001.png: is a directory; expected a new name or a regular file"
    assert result.returncode != 0 and phrase in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames", "noise.npy"]
    assert [p.name for p in out.iterdir()] == ["clip000_frame0001.png"]
    (out / "clip000_frame0001.png" / "inner").rmdir()
    (out / "clip000_frame0001.png").rmdir()
    result = run(BUILD / "starflow-run", *args)  # the same call, nothing in the way: all of it written
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["clip000_frame0000.png", "clip000_frame0001.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames", "latents.npy", "noise.npy", "stats.json"]
    assert json.loads((tmp_path / "stats.json").read_text())


def test_a_video_export_with_a_vae_decoder_is_refused_before_any_work(demo_video_export, tmp_path):
    """Decoding VAE video latents is not built (the official STARFlow-V's Wan2.2 latents): generate
    refuses it up front, ahead of the noise's own check (a NaN clip), as Generator.check_stages."""
    vae = tmp_path / "vae"
    shutil.copytree(demo_video_export, vae)
    data = json.loads((vae / "manifest.json").read_text())
    data["decoder"]["kind"] = "sd-vae"
    _set_digest(vae, data)
    np.save(tmp_path / "noise.npy", np.full((1, 2, 1, 5, 5), np.nan, np.float32))
    args = ["--artifacts", vae, "--prompt", "1", "--frames", "2", "--noise", tmp_path / "noise.npy"]
    result = run(built(BUILD) / "starflow-run", *args, "--out", tmp_path / "clips.npy")
    assert result.returncode != 0 and "decoding sd-vae video latents is not built yet" in result.stderr
    assert not (tmp_path / "clips.npy").exists()


def test_a_later_chunk_factor_other_than_4_is_refused_by_both_runtimes(demo_video_export, tmp_path):
    """Both samplers run the official rule (later chunks 4x the block size): another factor in the
    manifest is refused by both readers, naming the key, not silently sampled differently."""
    other = tmp_path / "other"
    shutil.copytree(demo_video_export, other)
    data = json.loads((other / "manifest.json").read_text())
    data["video"]["later_chunk_factor"] = 2
    _set_digest(other, data)
    with pytest.raises(StarflowError, match="video.later_chunk_factor is 2"):
        Generator.load(other, threads=1)
    args = ["--artifacts", other, "--prompt", "1", "--frames", "2", "--out", tmp_path / "clips.npy"]
    result = run(built(BUILD) / "starflow-run", *args)
    assert result.returncode != 0 and "key 'video.later_chunk_factor' is 2; this runtime" in result.stderr


def test_likelihood_checks_prompts_and_out_before_the_export_loads(tmp_path):
    """The --prompt count and --out's folder are checked before the export loads (a missing export
    would be the first error otherwise)."""
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 4, 4), np.float32))
    base = ["--artifacts", tmp_path / "missing", "--likelihood-latents", tmp_path / "x.npy"]
    result = run(built(BUILD) / "starflow-run", *base, "--prompt", "1")
    assert result.returncode != 0 and "--prompt: give one per sample (2 in " in result.stderr
    result = run(BUILD / "starflow-run", *base, "--out", tmp_path / "no" / "bits.npy")
    assert result.returncode != 0 and f"--out {tmp_path / 'no' / 'bits.npy'}: directory " in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


def test_denoiser_windows_and_the_export_window(demo_video_export, tmp_path):
    """An export whose video section sets a 3-frame window (and the denoiser an overlap of 1): the
    clip rolls by default and the learned denoiser runs in overlapping windows, as in Python."""
    windowed = tmp_path / "windowed"
    shutil.copytree(demo_video_export, windowed)
    data = json.loads((windowed / "manifest.json").read_text())
    data["video"]["window"], data["denoise"]["overlap"] = 3, 1
    _set_digest(windowed, data)
    generator = Generator.load(windowed, threads=1)
    assert generator.default_sampling().window == 3
    generation = generator.generate(["6"], seed=4, frames=6, latent_size=(5, 5))
    np.save(tmp_path / "noise.npy", make_noise(4, (1, 6, 1, 5, 5)))
    args = ["--artifacts", windowed, "--prompt", "6", "--frames", "6", "--noise", tmp_path / "noise.npy"]
    result = run(built(BUILD) / "starflow-run", *args, "--threads", "1", "--out", tmp_path / "clips.npy")
    assert result.returncode == 0, result.stderr
    assert np.abs(np.load(tmp_path / "clips.npy") - generation.images).max() <= 1e-4
    # no window at all: 6 frames do not fit the export's 3-frame caches (refused, not run past them)
    pipeline, y = Pipeline.load(windowed, threads=1), generator.encode(["6"])
    with pytest.raises(StarflowError, match="noise: 6 frames without a window are more than this export's"):
        pipeline.sample(make_noise(4, (1, 6, 1, 5, 5)), y, options=SampleOptions(window=None))


@pytest.mark.parametrize("build", [BUILD, ASAN_BUILD], ids=["release", "asan-ubsan"])
def test_bad_frames_and_windows_are_refused_with_a_status(demo_video_export, demo_export, tmp_path, build):
    """Each through the C API (starflow-run's statuses), before any work; then one rolled, row-stop,
    denoised clip, which under ASan + UBSan must run clean."""
    program = built(build) / "starflow-run"
    clip = tmp_path / "clip.npy"
    np.save(clip, make_noise(1, (1, 3, 1, 5, 5)))  # 3 frames of 5x5, the export's smallest
    np.save(tmp_path / "big.npy", np.zeros((9, 16, 1, 5, 5), np.float32))
    np.save(tmp_path / "image.npy", np.zeros((1, 1, 8, 8), np.float32))
    y = Generator.load(demo_video_export, threads=1).encode(["1"] * 9)
    np.save(tmp_path / "y.npy", y)
    np.save(tmp_path / "y1.npy", y[:1])
    video, image = ("--artifacts", demo_video_export), ("--artifacts", demo_export)
    prompt, out = (*video, "--prompt", "4", "--threads", "1"), ("--out", tmp_path / "o.npy")

    def latent(noise: str, text: str) -> tuple:
        return (*video, "--noise", tmp_path / noise, "--text", tmp_path / text, "--guidance", "0", *out)

    cases = [
        ((*prompt, "--frames", "17", *out), "frames: 17 frames is outside this export's range 1 .. 16"),
        ((*prompt, "--frames", "3", "--window", "17", *out), "window: 17 frames is more than this export's"),
        ((*prompt, "--frames", "3", "--window", "2", "--context", "2", *out), "context: must be fewer"),
        ((*prompt, "--frames", "3", "--window", "4294967298", *out), "--window: expected an integer from 1"),
        ((*prompt, *out), "this is a video model: ask for clips with frames=N (--frames N)"),
        ((*prompt, "--frames", "3", "--out", tmp_path / "o.png"), "--out: clips are written to a .npy"),
        (
            (*image, "--prompt", "4", "--frames", "3", *out),
            "frames: 3 asked of an image model; clips need a video model",
        ),
        ((*image, "--noise", clip, *out), "got float32 (1, 3, 1, 5, 5) (clips need a video model)"),
        (
            latent("image.npy", "y1.npy"),
            "this is a video export; pass clips (B, F, C, H, W) of 1 .. 16 frames",
        ),
        (latent("clip.npy", "y.npy"), "y: expected float32 text embeddings of shape (1, L, 32)"),
        (latent("big.npy", "y.npy"), "batch 9 of 16 frame(s) runs as 144 graph rows"),
        (
            (*prompt, "--frames", "3", "--window", "2", "--method", "sequential", *out),
            "3 frames roll past the 2-frame window, which needs method='jacobi'",
        ),
    ]
    for args, phrase in cases:
        result = run(program, *args)
        assert result.returncode == 1 and phrase in result.stderr, (args, result.stderr)
        assert result.stderr.startswith("starflow-run: error: ") and result.stderr.count("\n") == 1
    assert not (tmp_path / "o.npy").exists() and not (tmp_path / "o.png").exists()
    args = [*prompt, "--noise", clip, "--window", "2", "--context", "1", "--stop", "row"]
    result = run(program, *args, "--out", tmp_path / "clip-out.npy")
    assert result.returncode == 0, result.stderr
    assert "Sanitizer" not in result.stderr and "runtime error" not in result.stderr
    generator = Generator.load(demo_video_export, threads=1)
    options = dataclasses.replace(generator.default_sampling(), window=2, context=1, stop="row")
    y = generator.encode(["4"])
    latents = generator.denoise(
        generator.pipeline.sample(np.load(clip), y, generator.encode([""]), options), y
    )
    assert np.abs(np.load(tmp_path / "clip-out.npy") - to_unit_images(latents)).max() <= 1e-4
