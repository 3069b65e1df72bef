"""Likelihood in libstarflow (sf_pipeline_log_likelihood, `starflow-run --likelihood`) against the
Python runtime (`Pipeline.forward`, `Generator.bits_per_dim`) and the PyTorch model (`StarFlow`'s
per-sample NLL): bits per dimension per sample, and a status for every bad input (also under
AddressSanitizer + UBSan). Skips without a build, as tests/runtime/cpp/test_libstarflow.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

import starflow
from starflow.contract.manifest import MANIFEST_NAME, Manifest
from starflow.core.outputs import from_unit_images
from starflow.core.sampler import nll_per_sample, to_bits_per_dim
from starflow.runtime import Generator, Pipeline
from tests.conftest import T2I
from tests.runtime.cpp.test_libstarflow import ASAN_BUILD, BUILD, _set_digest, built, run

# The C++ sums float32 as numpy does and runs the same graphs with the same ONNX Runtime: equal to
# the Python runtime but for batches split differently (other GEMM shapes); PyTorch within 1e-4.
SAME_BATCHES = 1e-6
OTHER_BATCHES = 1e-5
PYTORCH = 1e-4


def cpp_bits(artifacts: Path, work: Path, *args: str | Path, build: Path = BUILD) -> np.ndarray:
    """`starflow-run --likelihood...` with `args`; returns the (N,) bits it wrote."""
    work.mkdir(parents=True, exist_ok=True)
    result = run(built(build) / "starflow-run", "--artifacts", artifacts, "--threads", "1", *args, "--out",
                 work / "bits.npy")  # fmt: skip
    assert result.returncode == 0, result.stderr
    bits = np.load(work / "bits.npy")
    assert result.stdout.splitlines()[0] == f"0: {bits[0]:.6f} bits/dim" + (
        f" (prompt '{args[args.index('--prompt') + 1]}')" if "--prompt" in args else ""
    )
    return bits


def prompt_args(prompts: list[str]) -> list[str]:
    return [arg for p in prompts for arg in ("--prompt", p)]


def save(work: Path, **arrays: np.ndarray) -> dict[str, Path]:
    work.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        np.save(work / f"{name}.npy", array)
    return {name: work / f"{name}.npy" for name in arrays}


def test_fixture_bits_equal_in_pytorch_python_and_cpp(fixture_artifacts, tmp_path):
    """The official tiny T2I fixture: its golden latents (and a batch over the export's rows, run in
    parts) score the same in PyTorch, the Python runtime and C++, and as the official goldens'
    z and logdets give."""
    manifest = Manifest.load(fixture_artifacts)
    assert all("forward" in block.graphs["fp32"] for block in manifest.blocks)  # the density graphs
    golden = load_file(T2I / "golden.safetensors")
    rng = np.random.default_rng(0)
    n = manifest.max_rows + 3  # one batch of max_rows, then 3
    x = golden["x"][np.arange(n) % 2] + 0.1 * rng.standard_normal((n, 4, 8, 8), dtype=np.float32)
    y = np.ascontiguousarray(golden["y"][np.arange(n) % 2])

    model = starflow.load_model(T2I / "config.yaml", T2I / "checkpoint.pth")
    with torch.no_grad():
        out = model(torch.from_numpy(x), torch.from_numpy(y))
        torch_bits = to_bits_per_dim(nll_per_sample(out.z, out.logdets)).numpy()
        official = to_bits_per_dim(
            nll_per_sample(golden["forward.z"], [golden[f"forward.logdet.{i}"] for i in range(3)])
        )
    pipeline = Pipeline.load(fixture_artifacts, threads=1)
    step = manifest.max_rows
    python_bits = np.concatenate(
        [
            to_bits_per_dim(nll_per_sample(*pipeline.forward(x[i : i + step], y[i : i + step])))
            for i in (0, step)
        ]
    )
    paths = save(tmp_path, x=x, y=y)
    ours = cpp_bits(fixture_artifacts, tmp_path, "--likelihood-latents", paths["x"], "--text", paths["y"])

    assert ours.dtype == np.float32 and ours.shape == (n,)
    assert np.abs(ours - python_bits).max() <= SAME_BATCHES
    assert np.abs(ours - torch_bits).max() <= PYTORCH and np.abs(python_bits - torch_bits).max() <= PYTORCH
    paths = save(tmp_path / "golden", x=golden["x"], y=golden["y"])
    golden_bits = cpp_bits(
        fixture_artifacts, tmp_path / "golden", "--likelihood-latents", paths["x"], "--text", paths["y"]
    )
    assert np.abs(golden_bits - official).max() <= PYTORCH


def test_digits_images_with_prompts_equal_generator_bits_per_dim(demo_export, tmp_path):
    """Images in [0, 1] as `starflow generate` writes them, one prompt each, 20 (over the export's
    16 rows): Generator.bits_per_dim of their latents, and a sample alone scores as in the batch."""
    generator = Generator.load(demo_export, threads=1)
    generated = generator.generate(["3", "7", ""], seed=2).images
    rng = np.random.default_rng(1)
    images = np.concatenate([generated, rng.uniform(0, 1, (17, 8, 8, 1)).astype(np.float32)])
    prompts = ["3", "7", "", *[str(i % 10) for i in range(17)]]
    expected = generator.bits_per_dim(from_unit_images(images), prompts)
    paths = save(tmp_path, images=images)
    ours = cpp_bits(demo_export, tmp_path, "--likelihood", paths["images"], *prompt_args(prompts))
    assert np.abs(ours - expected).max() <= SAME_BATCHES
    assert ours[:3].mean() < ours[3:].mean()  # the model's own digits are likelier than noise
    one = save(tmp_path / "alone", one=images[4:5])["one"]
    alone = cpp_bits(demo_export, tmp_path / "alone", "--likelihood", one, "--prompt", prompts[4])
    assert np.abs(alone[0] - ours[4]) <= OTHER_BATCHES


def test_moving_digits_clips_equal_generator_bits_per_dim(demo_video_export, tmp_path):
    """Clips (frame-local shallow blocks, the flip inside each frame): 9 clips of 16 frames run as
    8 + 1 (a frame-local block takes a row per frame, 128 rows), in both runtimes."""
    generator = Generator.load(demo_video_export, threads=1)
    rng = np.random.default_rng(3)
    clips = rng.uniform(0, 1, (9, 16, 10, 10, 1)).astype(np.float32)
    prompts = [str(i) for i in range(9)]
    latents = from_unit_images(clips)
    expected = generator.bits_per_dim(latents, prompts)
    paths = save(tmp_path, clips=clips, latents=latents)
    ours = cpp_bits(demo_video_export, tmp_path, "--likelihood", paths["clips"], *prompt_args(prompts))
    assert np.abs(ours - expected).max() <= SAME_BATCHES
    given = cpp_bits(
        demo_video_export, tmp_path, "--likelihood-latents", paths["latents"], *prompt_args(prompts)
    )
    assert np.array_equal(given, ours)


def broken_copies(demo_export: Path, root: Path) -> tuple[Path, Path]:
    """The demo export without its density graphs, and one that says its decoder is a VAE."""
    no_density, vae = root / "no-density", root / "vae"
    for copy in (no_density, vae):
        shutil.copytree(demo_export, copy)
    data = json.loads((no_density / MANIFEST_NAME).read_text())
    for block in data["blocks"]:
        del block["graphs"]["fp32"]["forward"]
    data["denoise"] = None  # its gradient runs the forward graphs: an export without them has none
    _set_digest(no_density, data)
    data = json.loads((vae / MANIFEST_NAME).read_text())
    data["decoder"] = {"kind": "sd-vae", "source": "a-vae", "scale": 0.18215, "graph": None, "factor": 8}
    _set_digest(vae, data)
    return no_density, vae


NO_DENSITY = "block 3 has no fp32 forward graph (the density graphs, which likelihoods run); re-export"


def test_bad_likelihood_options_are_refused_in_one_line(demo_export, tmp_path):
    """starflow-run's own checks (the library's statuses are runtime/cpp/tests/api_tests.cpp's):
    exit 1, one `starflow-run: error:` line naming what was wrong, nothing written."""
    program = built(BUILD) / "starflow-run"
    no_density, vae = broken_copies(demo_export, tmp_path)
    good = np.full((2, 8, 8, 1), 0.5, np.float32)
    nan = good.copy()
    nan[1, 3, 4, 0] = np.nan
    paths = save(
        tmp_path, good=good, nan=nan, ints=np.zeros((2, 8, 8, 1), np.int64),
        channels=np.zeros((2, 8, 8, 3), np.float32), text=np.zeros((3, 1, 32), np.float32),
        latents=np.zeros((2, 1, 8, 8), np.float32),
    )  # fmt: skip
    images, prompts = ("--likelihood", paths["good"]), ("--prompt", "1", "--prompt", "2")
    d = demo_export
    cases = [
        (d, (*images, "--prompt", "1"), "--prompt: give one per sample (2 in "),
        (d, images, "y: this model is text-conditioned; pass (2, L, 32) text embeddings"),
        (d, ("--likelihood", paths["nan"], *prompts), "latents: contains NaN or inf"),
        (d, ("--likelihood", paths["ints"], *prompts), "expected float32 images (N, H, W, 1)"),
        (d, ("--likelihood", paths["channels"], *prompts), "got float32 (2, 8, 8, 3)"),
        (d, (*images, "--likelihood-latents", paths["latents"], *prompts), "not both"),
        (d, (*images, *prompts, "--guidance", "1"), "--guidance applies to sampling, not"),
        (d, (*images, *prompts, "--text", paths["text"]), "give the text once"),
        (d, ("--likelihood", tmp_path / "missing.npy", *prompts), "cannot read"),
        (d, (*images, *prompts, "--out", tmp_path / "bits.txt"), "writes an (N,) float32 .npy"),
        (no_density, (*images, *prompts), NO_DENSITY),
        (vae, (*images, *prompts), "no encoder to turn images into latents; pass"),
    ]  # fmt: skip
    for artifacts, args, phrase in cases:
        out = () if "--out" in args else ("--out", tmp_path / "bits.npy")
        result = run(program, "--artifacts", artifacts, *out, *args)
        assert result.returncode == 1 and result.stderr.startswith("starflow-run: error: "), (
            args,
            result.stderr,
        )
        assert phrase in result.stderr and result.stderr.count("\n") == 1, (phrase, result.stderr)
    assert not (tmp_path / "bits.npy").exists() and not (tmp_path / "bits.txt").exists()
    result = run(program, "--artifacts", demo_export, *images, *prompts)  # --out is optional
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and len(lines) == 3 and lines[2].startswith("mean "), result.stderr


def test_likelihood_under_sanitizers_matches_release(demo_export, tmp_path):
    """ASan + UBSan: images to latents, a batch in two parts, and a refused export, clean."""
    rng = np.random.default_rng(5)
    paths = save(tmp_path, images=rng.uniform(0, 1, (20, 8, 8, 1)).astype(np.float32))
    prompts = prompt_args([str(i % 10) for i in range(20)])
    release = cpp_bits(demo_export, tmp_path / "release", "--likelihood", paths["images"], *prompts)
    checked = cpp_bits(demo_export, tmp_path, "--likelihood", paths["images"], *prompts, build=ASAN_BUILD)
    assert np.array_equal(checked, release)
    no_density, _ = broken_copies(demo_export, tmp_path / "broken")
    result = run(
        ASAN_BUILD / "starflow-run", "--artifacts", no_density, "--likelihood", paths["images"], *prompts
    )
    assert result.returncode == 1 and NO_DENSITY in result.stderr and result.stderr.count("\n") == 1, (
        result.stderr
    )
