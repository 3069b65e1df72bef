"""libstarflow (runtime/cpp, built by `make cpp` / `make cpp-asan`) against the Python runtime.

`starflow-run` must give `Pipeline.sample`'s numbers (1e-5 in fp32, the same Jacobi iteration
counts), the official goldens, and `starflow generate`'s images; the C API must refuse bad input
with a status (runtime/cpp/tests/api_tests.cpp), also under AddressSanitizer + UBSan. Without a
build these tests skip, except under CI (CI=true), where a missing build is a failure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from starflow.contract.manifest import MANIFEST_NAME, RECORD_NAME, SCHEMA_VERSION, Manifest
from starflow.core.config import config_from_dict
from starflow.core.errors import StarflowError
from starflow.core.generation import make_noise
from starflow.core.outputs import grid, slug, to_uint8, upscale
from starflow.export.onnx import ExportOptions, export_onnx
from starflow.model.checkpoint import save_model
from starflow.model.testing import random_model
from starflow.runtime import Generator, JacobiSettings, Pipeline, SampleOptions
from tests.conftest import ROOT, T2I

# STARFLOW_CPP_BUILD / STARFLOW_CPP_ASAN_BUILD: other build folders (parallel local builds)
BUILD = Path(os.environ.get("STARFLOW_CPP_BUILD", ROOT / "build" / "cpp"))
ASAN_BUILD = Path(os.environ.get("STARFLOW_CPP_ASAN_BUILD", ROOT / "build" / "cpp-asan"))
FIXTURE_JACOBI = JacobiSettings(block_size=16, max_iter=64, threshold=1e-6)
FP16_TOLERANCE = 2e-3  # the Python runtime's fp16 limit (tests/runtime/test_pipeline.py)
# GQA, SwiGLU, RMSNorm, patch 2, text in every block: latent 16x24 is an 8x12 token grid.
GQA_SWIGLU_PATCH2 = dict(
    channel_size=2, img_size=16, patch_size=2, channels=64, layers_per_block=[1, 2],
    head_dim=16, num_heads=4, num_kv_heads=2, rope=True, sos=True, txt_size=4, txt_dim=8,
    cond_top_only=False, use_softplus=True, use_final_norm=True, soft_clip=3.0,
    seq_order="L2R", norm_type="rms_norm", use_swiglu=True,
)  # fmt: skip


def built(build: Path) -> Path:
    if not (build / "starflow-run").is_file():
        message = (
            f"{build}/starflow-run is not built (run `make cpp`, or `make cpp-asan` for {ASAN_BUILD.name})"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return build


def run(program: Path, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(program), *map(str, args)], capture_output=True, text=True, timeout=600)


def cpp_sample(
    artifacts: Path,
    work: Path,
    noise: np.ndarray,
    y: np.ndarray | None,
    y_uncond: np.ndarray | None,
    options: SampleOptions,
    *extra: str,
    build: Path = BUILD,
) -> tuple[np.ndarray, list[dict]]:
    """`starflow-run` in latent mode with `options` spelt out as flags; returns (latent, stats)."""
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "noise.npy", noise)
    args = ["--artifacts", artifacts, "--noise", work / "noise.npy", "--out", work / "out.npy"]
    args += ["--stats", work / "stats.json", "--threads", "1", "--guidance", str(options.guidance)]
    args += ["--method", options.method, "--block-size", str(options.jacobi.block_size)]
    args += ["--max-iter", str(options.jacobi.max_iter), "--threshold", repr(options.jacobi.threshold)]
    args += ["--init", options.jacobi.init, "--stop", options.stop]
    if options.shallow_jacobi:
        s = options.shallow_jacobi
        args += ["--shallow-jacobi", f"{s.block_size},{s.max_iter},{s.threshold!r},{s.init}"]
    for name, array in (("text", y), ("text-uncond", y_uncond)):
        if array is not None:
            np.save(work / f"{name}.npy", array)
            args += [f"--{name}", work / f"{name}.npy"]
    result = run(built(build) / "starflow-run", *args, *extra)
    assert result.returncode == 0, result.stderr
    return np.load(work / "out.npy"), json.loads((work / "stats.json").read_text())


COUNTS = ("block", "iterations", "evaluations", "tokens")  # what same_counts compares by default


def same_counts(cpp_stats: list[dict], stats: list, fields: tuple[str, ...] = COUNTS) -> bool:
    """starflow-run's stats JSON and the Python BlockStats agree on `fields`, block by block."""
    ours = [tuple(s[f] for f in fields) for s in cpp_stats]
    return ours == [tuple(getattr(s, f) for f in fields) for s in stats]


@pytest.fixture(scope="module")
def random_export(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("cpp-random")
    model = random_model(config_from_dict(GQA_SWIGLU_PATCH2), seed=5)
    save_model(model, work / "model.safetensors")
    options = ExportOptions(precisions=("fp32",), validate=False, denoise=False, max_latent=(16, 24))
    export_onnx(work / "model.safetensors", work / "artifacts", options)
    return work / "artifacts"


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("method", ["sequential", "jacobi"])
@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_random_config_matches_the_python_runtime(random_export, tmp_path, batch, method, guidance):
    rng = np.random.default_rng(batch)
    noise = rng.standard_normal((batch, 2, 16, 24), dtype=np.float32)
    y = rng.standard_normal((batch, 4, 8), dtype=np.float32)
    y_null = np.zeros_like(y) if guidance else None
    options = SampleOptions(guidance, method, JacobiSettings(block_size=8, threshold=1e-5))
    ref, stats = Pipeline.load(random_export, threads=1).sample(noise, y, y_null, options, return_stats=True)
    ours, cpp_stats = cpp_sample(random_export, tmp_path, noise, y, y_null, options)
    assert np.abs(ours - ref).max() <= 1e-5
    assert same_counts(cpp_stats, stats)


def test_jacobi_options_match_the_python_runtime(random_export, tmp_path):
    """The chunk-mean first guess and separate shallow-block settings, as the Python runtime."""
    rng = np.random.default_rng(9)
    noise = rng.standard_normal((2, 2, 16, 16), dtype=np.float32)
    y = rng.standard_normal((2, 4, 8), dtype=np.float32)
    options = SampleOptions(
        1.5,
        jacobi=JacobiSettings(block_size=8, max_iter=6, threshold=1e-4, init="chunk-mean"),
        shallow_jacobi=JacobiSettings(block_size=32, max_iter=3, threshold=1e-2, init="chunk-mean"),
    )
    ref, stats = Pipeline.load(random_export, threads=1).sample(
        noise, y, np.zeros_like(y), options, return_stats=True
    )
    ours, cpp_stats = cpp_sample(random_export, tmp_path, noise, y, np.zeros_like(y), options)
    assert np.abs(ours - ref).max() <= 1e-5
    assert same_counts(cpp_stats, stats)


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_per_row_stop_matches_the_python_runtime(random_export, tmp_path, guidance):
    """stop="row": each row stops on its own test, then keeps its values and its last inputs, as
    the Python runtime does; an image then comes out as it does sampled alone."""
    rng = np.random.default_rng(4)
    noise = rng.standard_normal((3, 2, 16, 24), dtype=np.float32)
    y = rng.standard_normal((3, 4, 8), dtype=np.float32)
    y_null = np.zeros_like(y) if guidance else None
    options = SampleOptions(guidance, jacobi=JacobiSettings(block_size=8, threshold=1e-3), stop="row")
    ref, stats = Pipeline.load(random_export, threads=1).sample(noise, y, y_null, options, return_stats=True)
    assert any(len(set(chunk)) > 1 for s in stats for chunk in s.image_iterations)  # rows stopped apart
    ours, cpp_stats = cpp_sample(random_export, tmp_path / "batch", noise, y, y_null, options)
    assert np.abs(ours - ref).max() <= 1e-5
    assert same_counts(cpp_stats, stats)
    alone, _ = cpp_sample(
        random_export, tmp_path / "alone", noise[1:2], y[1:2], y_null[1:2] if guidance else None, options
    )
    assert np.abs(alone[0] - ours[1]).max() <= 1e-5


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    if not T2I.is_dir():
        pytest.skip(f"shared fixtures not found at {T2I}")
    return load_file(T2I / "golden.safetensors")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("method", ["sequential", "jacobi"])
@pytest.mark.parametrize("cfg", [False, True])
def test_official_goldens_through_starflow_run(fixture_artifacts, golden, tmp_path, precision, method, cfg):
    options = SampleOptions(1.5 if cfg else 0.0, method, FIXTURE_JACOBI)
    y_null = golden["y_null"] if cfg else None
    ours, cpp_stats = cpp_sample(
        fixture_artifacts, tmp_path, golden["noise"], golden["y"], y_null, options, "--precision", precision
    )
    pipe = Pipeline.load(fixture_artifacts, precision=precision, threads=1)
    ref, stats = pipe.sample(golden["noise"], golden["y"], y_null, options, return_stats=True)
    key = f"reverse.{method}" + (".cfg" if cfg else "")
    if precision == "fp32":
        assert np.abs(ours - ref).max() <= 1e-5 and same_counts(cpp_stats, stats)
        assert np.abs(ours - golden[key]).max() <= 1e-4
    else:  # fp16 graphs: the Python runtime's fp16 tolerance against the official fp32 numbers
        assert np.abs(ours - golden[key]).max() <= FP16_TOLERANCE
        assert np.abs(ours - ref).max() <= FP16_TOLERANCE


def test_digits_model_end_to_end_equals_starflow_generate(demo_export, tmp_path):
    """prompt -> label id -> text encoder -> flow (guidance) -> self-denoise -> image, in C++."""
    generator = Generator.load(demo_export, threads=1)
    prompts = ["3", "7", ""]
    generation = generator.generate(prompts, num_images=2, seed=11)
    noise = make_noise(11, (6, 1, *generator.latent_size()))
    np.save(tmp_path / "noise.npy", noise)
    args = ["--artifacts", demo_export, "--noise", tmp_path / "noise.npy", "--threads", "1"]
    for prompt in prompts:
        args += ["--prompt", prompt]
    args += ["--num-images", "2", "--latents-out", tmp_path / "latents.npy"]
    result = run(built(BUILD) / "starflow-run", *args, "--out", tmp_path / "images.npy")
    assert result.returncode == 0, result.stderr
    assert np.abs(np.load(tmp_path / "images.npy") - generation.images).max() <= 1e-4
    assert np.abs(np.load(tmp_path / "latents.npy") - generation.latents).max() <= 1e-4

    result = run(BUILD / "starflow-run", *args, "--out", tmp_path / "digits")  # a folder: one PNG each
    assert result.returncode == 0, result.stderr
    from PIL import Image

    names = ["0000-3", "0001-3", "0002-7", "0003-7", "0004-unconditional", "0005-unconditional"]
    assert sorted(p.name for p in (tmp_path / "digits").iterdir()) == [f"{n}.png" for n in names]
    with Image.open(tmp_path / "digits" / "0005-unconditional.png") as image:
        pixels = np.asarray(image)
    expected = upscale(to_uint8(generation.images[5]), 4)[..., 0]  # 8x8 drawn 4x, as generate does
    assert np.abs(pixels.astype(int) - expected).max() <= 1


def _set_digest(directory: Path, data: dict) -> None:
    """Rewrite manifest.json with `data` and record.json with its sha256 (the digest only detects
    edits)."""
    text = json.dumps(data, indent=2).encode()
    (directory / MANIFEST_NAME).write_bytes(text)
    record = json.loads((directory / RECORD_NAME).read_text())
    record["manifest_sha256"] = hashlib.sha256(text).hexdigest()
    (directory / RECORD_NAME).write_text(json.dumps(record))


def _bad_exports(good: Path, root: Path) -> Path:
    """Broken copies of `good`, each with the phrase its load error must contain."""
    root.mkdir()
    step = json.loads((good / "manifest.json").read_text())["blocks"][0]["graphs"]["fp32"]["step"] + ".onnx"

    def case(name: str, phrase: str) -> tuple[Path, dict]:
        directory = root / name
        shutil.copytree(good, directory)
        (directory / "expect.txt").write_text(phrase)
        return directory, json.loads((directory / "manifest.json").read_text())

    directory, _ = case("missing-graph", "is missing")
    (directory / step).unlink()
    directory, _ = case("tampered-graph", "does not match its sha256")
    with open(directory / step, "ab") as graph:
        graph.write(b"\0")
    old = SCHEMA_VERSION - 1
    directory, data = case(
        "schema-version", f"schema_version {old}, this libstarflow reads {SCHEMA_VERSION}; re-export"
    )
    (directory / "manifest.json").write_text(json.dumps({**data, "schema_version": old}))
    preset = next(iter(json.loads((good / MANIFEST_NAME).read_text())["sampling_presets"]))
    directory, data = case(
        "preset-stop", f"key 'sampling_presets.{preset}.stop' is not valid: stop: expected"
    )
    data["sampling_presets"][preset]["stop"] = "column"
    _set_digest(directory, data)
    directory, data = case("preset-without-stop", f"key 'sampling_presets.{preset}.stop' is missing")
    del data["sampling_presets"][preset]["stop"]
    _set_digest(directory, data)
    directory, _ = case("missing-record", "no readable record.json beside it")
    (directory / RECORD_NAME).unlink()
    directory, data = case("video-without-frames", "key 'video.frames' is missing")
    data["video"] = {"window": None, "context": None, "later_chunk_factor": 4, "warm_start": True, "fps": 8.0}
    _set_digest(directory, data)
    directory, data = case("learned-denoiser-without-step", "key 'denoise.step' must be a number")
    data["denoise"] |= {"kind": "learned", "step": None}
    _set_digest(directory, data)
    directory, data = case("edited-field", "digest mismatch")
    data["jacobi"]["threshold"] = 0.5
    (directory / "manifest.json").write_text(json.dumps(data))
    directory, data = case("path-outside", "not a plain file or graph name")
    data["graphs"][0]["file"] = "../outside.onnx"
    _set_digest(directory, data)
    directory, _ = case("symlink-outside", "leads outside the export directory")
    outside = root.parent / "outside.onnx"
    shutil.copy(directory / step, outside)
    (directory / step).unlink()
    (directory / step).symlink_to(outside)
    return root


@pytest.mark.parametrize("build", [BUILD, ASAN_BUILD], ids=["release", "asan-ubsan"])
def test_c_api_refuses_bad_input(demo_export, tmp_path, build):
    result = run(built(build) / "starflow-tests", demo_export, _bad_exports(demo_export, tmp_path / "bad"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed: 0 failure(s)" in result.stdout
    assert "Sanitizer" not in result.stderr and "runtime error" not in result.stderr


# Floats printed differently by JSON printers (Python's shortest repr vs C's %.17g for the first
# three; exponent forms for the last two): a digest over a re-printed document would differ between
# languages; one over manifest.json's bytes cannot.
SHORTEST_REPR_FLOATS = (0.1, 1.1, 1e-07, 2.0000000000000004, 1e22)


def test_the_digest_is_manifest_json_bytes_in_both_languages(demo_export, tmp_path):
    directory = tmp_path / "floats"
    shutil.copytree(demo_export, directory)
    manifest = Manifest.load(directory)
    first = manifest.blocks[0]
    edge = SampleOptions(1.1, "jacobi", JacobiSettings(16, 6, 1e-07), JacobiSettings(64, 2, 1e22))
    dataclasses.replace(
        manifest,
        jacobi=dataclasses.replace(manifest.jacobi, threshold=2.0000000000000004),
        sampling_presets={**manifest.sampling_presets, "edge": edge},
        blocks=(dataclasses.replace(first, sos_embed=(0.1, *first.sos_embed[1:])), *manifest.blocks[1:]),
    ).write(directory)
    text = (directory / MANIFEST_NAME).read_text()
    assert all(repr(f) in text for f in SHORTEST_REPR_FLOATS)
    assert [f"{f:.17g}" in text for f in SHORTEST_REPR_FLOATS[:3]] == [False] * 3
    loaded = Manifest.load(directory)
    assert loaded.sampling("edge") == edge and loaded.jacobi.threshold == 2.0000000000000004
    args = ["--artifacts", directory, "--prompt", "4", "--seed", "5", "--threads", "1", "--no-denoise"]
    result = run(built(BUILD) / "starflow-run", *args, "--sampler", "edge", "--out", tmp_path / "a.npy")
    assert result.returncode == 0, result.stderr
    # The same values printed another way: equal JSON, other bytes, so both languages refuse it.
    (directory / MANIFEST_NAME).write_text(text.replace("1e-07", "1e-7"))
    with pytest.raises(StarflowError, match="digest mismatch"):
        Manifest.load(directory)
    result = run(built(BUILD) / "starflow-run", *args, "--out", tmp_path / "b.npy")
    assert result.returncode != 0 and "digest mismatch" in result.stderr


@pytest.mark.parametrize("stop", ["batch", "row"])
def test_sampling_under_sanitizers_matches_release(demo_export, tmp_path, stop):
    generator = Generator.load(demo_export, threads=1)
    y = generator.encode(["2", "8"])
    y_null = np.ascontiguousarray(np.broadcast_to(generator.encode([""]), y.shape))
    noise = make_noise(3, (2, 1, 8, 8))
    options = SampleOptions(1.0, "jacobi", JacobiSettings(8, 16, 1e-3, init="chunk-mean"), stop=stop)
    release, _ = cpp_sample(demo_export, tmp_path / "release", noise, y, y_null, options)
    checked, _ = cpp_sample(
        demo_export, tmp_path / "asan", noise, y, y_null, options, build=built(ASAN_BUILD)
    )
    assert np.abs(release - checked).max() <= 1e-6


def test_c_example_samples_with_guidance(demo_export, tmp_path):
    example = built(BUILD) / "examples" / "sample_c"  # built through find_package(starflow)
    generator = Generator.load(demo_export, threads=1)
    y = generator.encode(["1", "9"])
    y_null = np.ascontiguousarray(np.broadcast_to(generator.encode([""]), y.shape))
    noise = make_noise(4, (2, 1, 8, 8))
    for name, array in (("noise", noise), ("y", y), ("y_null", y_null)):
        np.save(tmp_path / f"{name}.npy", array)
    inputs = [tmp_path / f"{name}.npy" for name in ("noise", "y", "y_null")]
    result = run(example, demo_export, *inputs, "1.5", tmp_path / "latent.npy")
    assert result.returncode == 0, result.stderr
    ref = generator.pipeline.sample(noise, y, y_null, SampleOptions(1.5, jacobi=generator.manifest.jacobi))
    assert np.abs(np.load(tmp_path / "latent.npy") - ref).max() <= 1e-5


def test_driver_errors_are_one_line_and_write_nothing(demo_export, tmp_path):
    program = built(BUILD) / "starflow-run"
    assert run(program).returncode == 2
    help_text = run(program, "--help")
    assert help_text.returncode == 0 and "--artifacts DIR" in help_text.stdout
    np.save(tmp_path / "noise.npy", np.zeros((1, 3, 8, 8), np.float32))
    noise, out = ("--noise", tmp_path / "noise.npy"), ("--out", tmp_path / "o.npy")
    cases = [
        (("--frobnicate", "1"), "unknown option '--frobnicate'"),
        (("--artifacts", demo_export, *noise, *out), "noise: expected a (B, 1, H, W)"),
        (("--artifacts", tmp_path, *noise, *out), "no readable manifest.json"),
        (("--artifacts", demo_export, "--prompt", "3", *out, "--block-size", "0"), "--block-size: expected"),
        (
            ("--artifacts", demo_export, "--prompt", "3", *out, "--stop", "column"),
            "stop: expected 'batch' or 'row'",
        ),
        (("--artifacts", demo_export, "--prompt", "cat", *out), "this model knows the prompts"),
        (
            ("--artifacts", demo_export, "--prompt", "3", "--out", tmp_path / "o.txt"),
            "prompt mode writes images",
        ),
    ]
    for args, phrase in cases:
        result = run(program, *args)
        assert result.returncode == 1, args
        assert result.stderr.startswith("starflow-run: error: ") and phrase in result.stderr, result.stderr
    assert not (tmp_path / "o.npy").exists() and not (tmp_path / "o.txt").exists()


def test_token_ids_drive_the_text_encoder_graph(demo_export, tmp_path):
    """--token-ids: ids and mask straight to the text encoder graph (what a service with its own
    tokenizer passes), then the flow; equal to the Python runtime on the same embeddings."""
    generator = Generator.load(demo_export, threads=1)
    ids, mask = generator.text.tokenize(["6", "0"])
    uncond_ids, uncond_mask = generator.text.tokenize(["", ""])
    for name, array in (
        ("ids", ids),
        ("mask", mask),
        ("uncond_ids", uncond_ids),
        ("uncond_mask", uncond_mask),
    ):
        np.save(tmp_path / f"{name}.npy", array)
    noise = make_noise(8, (2, 1, 8, 8))
    y, y_null = generator.encode(["6", "0"]), generator.encode(["", ""])
    options = SampleOptions(1.0, jacobi=generator.manifest.jacobi)
    tokens = ["--token-ids", tmp_path / "ids.npy", "--attention-mask", tmp_path / "mask.npy"]
    tokens += [
        "--uncond-token-ids",
        tmp_path / "uncond_ids.npy",
        "--uncond-attention-mask",
        tmp_path / "uncond_mask.npy",
    ]
    ours, _ = cpp_sample(demo_export, tmp_path, noise, None, None, options, *map(str, tokens))
    assert np.abs(ours - generator.pipeline.sample(noise, y, y_null, options)).max() <= 1e-5


def test_tensorrt_adapter_option_fails_configuration_clearly(tmp_path):
    headers = ROOT / "build" / "cpp-deps" / "onnxruntime-dev" / "usr" / "include" / "onnxruntime"
    built(BUILD)
    command = ["cmake", "-S", ROOT / "runtime" / "cpp", "-B", tmp_path, "-G", "Ninja"]
    command += [f"-DONNXRUNTIME_INCLUDE_DIR={headers}", "-DSTARFLOW_TENSORRT=ON"]
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "NvInfer.h" in result.stdout + result.stderr


def test_sampler_presets_from_the_manifest(demo_export, tmp_path):
    """--sampler fast: the preset the export carries, as the Python runtime reads it."""
    generator = Generator.load(demo_export, threads=1)
    y = generator.encode(["5", "2"])
    y_null = np.ascontiguousarray(np.broadcast_to(generator.encode([""]), y.shape))
    noise = make_noise(6, (2, 1, 8, 8))
    fast = generator.sampling("fast")
    ref, stats = generator.pipeline.sample(noise, y, y_null, fast, return_stats=True)
    for name, array in (("noise", noise), ("y", y), ("y_null", y_null)):
        np.save(tmp_path / f"{name}.npy", array)
    args = ["--artifacts", demo_export, "--noise", tmp_path / "noise.npy", "--text", tmp_path / "y.npy"]
    args += ["--text-uncond", tmp_path / "y_null.npy", "--threads", "1", "--stats", tmp_path / "stats.json"]
    result = run(built(BUILD) / "starflow-run", *args, "--sampler", "fast", "--out", tmp_path / "out.npy")
    assert result.returncode == 0, result.stderr
    assert np.abs(np.load(tmp_path / "out.npy") - ref).max() <= 1e-5
    assert same_counts(json.loads((tmp_path / "stats.json").read_text()), stats)
    result = run(BUILD / "starflow-run", *args, "--sampler", "nope", "--out", tmp_path / "x.npy")
    assert (
        result.returncode == 1
        and "sampler 'nope': this export has the presets ['official', 'fast']" in result.stderr
    )


# ---- starflow-run's outputs and messages: as `starflow generate`'s ----------------------------------------
def _prompt_run(artifacts: Path, out: Path, *extra: str | Path) -> subprocess.CompletedProcess:
    args = ["--artifacts", artifacts, "--prompt", "3", "--prompt", "", "--num-images", "3", "--seed", "2"]
    return run(built(BUILD) / "starflow-run", *args, "--threads", "1", *extra, "--out", out)


def test_png_out_is_one_grid_as_starflow_generate_draws_it(demo_export, tmp_path):
    """--out x.png: one grid, a row per prompt, 1-pixel borders, 4x upscaled (8x8 digits), pixel
    for pixel starflow.core.outputs.grid of the same images; and one success line."""
    assert _prompt_run(demo_export, tmp_path / "images.npy").returncode == 0
    result = _prompt_run(demo_export, tmp_path / "grid.png")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "images.npy"]
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as image:
        pixels = np.asarray(image)
    images = np.load(tmp_path / "images.npy")
    assert images.shape == (6, 8, 8, 1)
    assert np.array_equal(pixels, upscale(grid(images, columns=3), 4)[..., 0])
    assert re.fullmatch(
        rf"generated 6 images 8x8 -> {re.escape(str(tmp_path / 'grid.png'))} in \d+\.\d\d s "
        r"\(\d+\.\d images/s\)\n",
        result.stdout,
    ), result.stdout


def test_folder_out_is_one_png_per_image_named_as_starflow_generate_names_them(demo_export, tmp_path):
    result = _prompt_run(demo_export, tmp_path / "images")
    assert result.returncode == 0, result.stderr
    files = sorted(p.name for p in (tmp_path / "images").iterdir())
    prompts = ["3"] * 3 + [""] * 3
    assert files == [f"{i:04d}-{slug(p)}.png" for i, p in enumerate(prompts)]
    assert files[3] == "0003-unconditional.png"
    assert result.stdout.startswith(f"generated 6 images 8x8 -> {tmp_path / 'images'}/ (6 PNGs) in ")


def test_latent_mode_prints_what_it_wrote(demo_export, tmp_path):
    np.save(tmp_path / "noise.npy", make_noise(1, (2, 1, 8, 8)))
    np.save(tmp_path / "y.npy", Generator.load(demo_export, threads=1).encode(["3", "7"]))
    args = ["--artifacts", demo_export, "--noise", tmp_path / "noise.npy", "--text", tmp_path / "y.npy"]
    args += ["--guidance", "0", "--threads", "1"]
    result = run(built(BUILD) / "starflow-run", *args, "--out", tmp_path / "latent.npy")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(
        rf"sampled a \(2, 1, 8, 8\) latent -> {re.escape(str(tmp_path / 'latent.npy'))} in \d+\.\d\d s\n",
        result.stdout,
    ), result.stdout


def test_export_without_denoise_needs_no_denoise_before_any_work(fixture_artifacts, tmp_path):
    """The fixture's export has no self-denoise: prompt mode names --no-denoise before sampling."""
    result = _prompt_run(fixture_artifacts, tmp_path / "x.png")
    assert result.returncode == 1 and result.stdout == ""
    assert "this export has no self-denoise step (exported without it); pass --no-denoise" in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("out", "phrase"),
    [
        ("missing/x.png", "directory {tmp}/missing does not exist"),
        ("file", "exists and is not a folder"),
        ("folder.png", "is a directory, expected a .png file"),
        ("x.jpg", "a .png (grid), a .npy (N, H, W, C) array or a folder (one PNG per image)"),
    ],
)
def test_bad_out_is_refused_before_loading(tmp_path, out, phrase):
    """Checked before the export is read: the artifacts directory here does not even exist."""
    (tmp_path / "file").write_text("")
    (tmp_path / "folder.png").mkdir()
    result = _prompt_run(tmp_path / "no-export", tmp_path / out)
    assert result.returncode == 1, result.stdout
    assert phrase.format(tmp=tmp_path) in result.stderr and "manifest" not in result.stderr, result.stderr


@pytest.mark.parametrize("export", ["demo_export", "demo_video_export"])
def test_pipelines_in_threads_equal_pipelines_alone(export, request):
    """starflow.h's promise: pipelines in different threads at once (loads overlapping) give the
    numbers each gives alone, images and clips (runtime/cpp/tests/threads_test.cpp; `make
    cpp-tsan` runs it under ThreadSanitizer)."""
    result = run(built(BUILD) / "starflow-threads-test", request.getfixturevalue(export), "3", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed: 3 thread(s) x 2 round(s), 0 failure(s)" in result.stdout
