"""The torch-free runtime against the PyTorch reference: same latents for the same noise."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from starflow.core.config import config_from_dict, load_config
from starflow.core.errors import StarflowError
from starflow.export.onnx import ExportOptions, export_onnx
from starflow.model.checkpoint import load_model, save_model
from starflow.model.testing import random_model
from starflow.runtime import JacobiSettings, Pipeline, SampleOptions
from tests.conftest import T2I

JACOBI = JacobiSettings(block_size=16, max_iter=64, threshold=1e-6)  # the fixture's settings
FP16_TOLERANCE = 2e-3  # measured 5.6e-4 on the fixture (fp16 weights, matmuls and cache)

# Two small models that between them cover every exportable architecture option.
RANDOM_CONFIGS = {
    "gqa-rms-swiglu-r2l-exp": dict(
        channel_size=4, img_size=8, patch_size=1, channels=64, layers_per_block=[1, 2],
        head_dim=16, num_heads=4, num_kv_heads=2, rope=True, sos=True, txt_size=4, txt_dim=8,
        cond_top_only=True, use_softplus=False, use_final_norm=False, soft_clip=0.0,
        seq_order="R2L", norm_type="rms_norm", use_swiglu=True, use_qk_norm=True,
        use_post_norm=True, use_bias=False,
    ),
    "patch2-text-everywhere-wide-top": dict(
        channel_size=2, img_size=8, patch_size=2, channels=32, layers_per_block=[0, 1, 1],
        head_dim=16, rope=True, sos=True, txt_size=3, txt_dim=8, cond_top_only=False,
        use_softplus=True, use_final_norm=True, soft_clip=3.0, seq_order="L2R",
        top_block_channels=64,
    ),
}  # fmt: skip

pytestmark = pytest.mark.skipif(not T2I.is_dir(), reason=f"shared fixtures not found at {T2I}")


@pytest.fixture(scope="module", params=list(RANDOM_CONFIGS))
def random_export(request, tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    work = tmp_path_factory.mktemp(request.param)
    model = random_model(config_from_dict(RANDOM_CONFIGS[request.param]), seed=3)
    save_model(model, work / "model.safetensors")
    out = work / "artifacts"
    export_onnx(
        work / "model.safetensors", out, ExportOptions(precisions=("fp32",), validate=False, denoise=False)
    )
    return out, model


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    return load_file(T2I / "golden.safetensors")


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-4), ("fp16", FP16_TOLERANCE)])
@pytest.mark.parametrize("method", ["sequential", "jacobi"])
@pytest.mark.parametrize("cfg", [False, True])
def test_fixture_goldens_through_the_runtime(fixture_artifacts, golden, precision, tolerance, method, cfg):
    pipe = Pipeline.load(fixture_artifacts, precision=precision)
    options = SampleOptions(guidance=1.5 if cfg else 0.0, method=method, jacobi=JACOBI)
    sample = pipe.sample(golden["noise"], golden["y"], golden["y_null"] if cfg else None, options)
    key = f"reverse.{method}" + (".cfg" if cfg else "")
    assert np.abs(sample - golden[key]).max() < tolerance


def test_fixture_non_square_grid_matches_pytorch(fixture_artifacts):
    model = load_model(T2I / "config.yaml", T2I / "checkpoint.pth")
    pipe = Pipeline.load(fixture_artifacts)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((2, 4, 8, 12), dtype=np.float32)
    y = rng.standard_normal((2, 6, 32), dtype=np.float32)
    y_null = np.zeros_like(y)
    for method in ("sequential", "jacobi"):
        options = SampleOptions(guidance=1.5, method=method, jacobi=JACOBI)
        ours = pipe.sample(noise, y, y_null, options)
        ref = model.sample(torch.from_numpy(noise), torch.from_numpy(y), torch.from_numpy(y_null), options)
        assert np.abs(ours - ref.numpy()).max() < 1e-4


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("grid", [(8, 8), (8, 12)])
@pytest.mark.parametrize("method", ["sequential", "jacobi"])
@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_random_configs_match_pytorch(random_export, batch, grid, method, guidance):
    artifacts, model = random_export
    config = model.config
    pipe = Pipeline.load(artifacts)
    rng = np.random.default_rng(batch)
    noise = rng.standard_normal((batch, config.channel_size, *grid), dtype=np.float32)
    y = rng.standard_normal((batch, config.txt_size, config.txt_dim), dtype=np.float32)
    y_null = np.zeros_like(y) if guidance else None
    options = SampleOptions(guidance, method, JacobiSettings(block_size=8, threshold=1e-5))
    ours, stats = pipe.sample(noise, y, y_null, options, return_stats=True)
    ref, ref_stats = model.sample(
        torch.from_numpy(noise), torch.from_numpy(y),
        None if y_null is None else torch.from_numpy(y_null), options, return_stats=True,
    )  # fmt: skip
    assert np.abs(ours - ref.numpy()).max() < 1e-4
    counts = [(s.block, s.iterations, s.evaluations, s.tokens) for s in stats]
    assert counts == [(s.block, s.iterations, s.evaluations, s.tokens) for s in ref_stats]


def test_jacobi_options_keep_the_exact_fixed_point(random_export):
    """Per-block chunking and the chunk-mean first guess change the path, not the solution:
    iterated to the end (threshold 0, max_iter >= chunk length) they give sequential sampling."""
    artifacts, model = random_export
    config = model.config
    pipe = Pipeline.load(artifacts)
    rng = np.random.default_rng(7)
    noise = rng.standard_normal((2, config.channel_size, 8, 8), dtype=np.float32)
    y = rng.standard_normal((2, config.txt_size, config.txt_dim), dtype=np.float32)
    tokens = 64 // config.patch_size**2
    options = SampleOptions(
        guidance=2.0,
        jacobi=JacobiSettings(block_size=8, max_iter=8, threshold=0.0, init="chunk-mean"),
        shallow_jacobi=JacobiSettings(block_size=64, max_iter=tokens, threshold=0.0, init="chunk-mean"),
    )
    ours, stats = pipe.sample(noise, y, np.zeros_like(y), options, return_stats=True)
    exact = model.sample(
        torch.from_numpy(noise), torch.from_numpy(y), torch.zeros(y.shape), SampleOptions(2.0, "sequential")
    )
    assert np.abs(ours - exact.numpy()).max() < 1e-4
    deep, shallow = stats[0], [s for s in stats[1:] if s.evaluations]
    assert deep.iterations == [8] * (tokens // 8) and deep.tokens == 2 * 2 * 8 * tokens  # [cond ; uncond]
    assert shallow and all(s.iterations == [tokens] for s in shallow)


def test_chunk_mean_first_guess_is_used(pipe):
    """One iteration per chunk returns mu + sigma * z evaluated at the first guess, so the two
    first guesses must give different latents after the first chunk."""
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    y = rng.standard_normal((1, 6, 32), dtype=np.float32)
    from_noise = pipe.sample(
        noise, y, options=SampleOptions(jacobi=JacobiSettings(block_size=16, max_iter=1))
    )
    chunk_mean = JacobiSettings(block_size=16, max_iter=1, init="chunk-mean")
    from_mean = pipe.sample(noise, y, options=SampleOptions(jacobi=chunk_mean))
    assert np.abs(from_noise - from_mean).max() > 1e-3


def test_runtime_runs_with_torch_unimportable(fixture_artifacts):
    code = textwrap.dedent(
        f"""
        import sys

        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")

        sys.meta_path.insert(0, BlockTorch())
        import numpy as np
        from starflow.runtime import JacobiSettings, Pipeline

        pipe = Pipeline.load({str(fixture_artifacts)!r})
        noise = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
        y = np.zeros((1, 6, 32), np.float32)
        out = pipe.sample(noise, y)
        assert out.shape == (1, 4, 8, 8) and np.isfinite(out).all()
        assert "torch" not in sys.modules
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def pipe(fixture_artifacts) -> Pipeline:
    return Pipeline.load(fixture_artifacts)


def zeros(*shape: int, dtype: type = np.float32) -> np.ndarray:
    return np.zeros(shape, dtype)


@pytest.mark.parametrize(
    "noise, y, kwargs, message",
    [
        (zeros(1, 4, 8, 8, dtype=np.float64), zeros(1, 6, 32), {}, "expected a float32"),
        (zeros(1, 3, 8, 8), zeros(1, 6, 32), {}, "expected 4 latent channels"),
        (zeros(4, 8, 8), zeros(1, 6, 32), {}, r"\(B, C, H, W\)"),
        (zeros(1, 4, 8, 8), zeros(1, 6, 16), {}, r"text embeddings of shape \(1, L, 32\)"),
        (zeros(1, 4, 8, 8), zeros(1, 7, 32), {}, r"with 1 <= L <= 6"),
        (zeros(1, 4, 8, 8), None, {}, "this model is text-conditioned"),
        (zeros(1, 4, 8, 8), zeros(1, 6, 32), {"guidance": 2.0}, "needs y_uncond"),
        (zeros(1, 4, 8, 8), zeros(1, 6, 32), {"guidance": 2.0, "y_uncond": zeros(1, 5, 32)}, "y_uncond"),
        (zeros(1, 4, 2, 8), zeros(1, 6, 32), {}, "outside this export's range"),
        (zeros(1, 4, 40, 8), zeros(1, 6, 32), {}, "outside this export's range"),
        (
            zeros(9, 4, 8, 8),
            zeros(9, 6, 32),
            {"guidance": 1.0, "y_uncond": zeros(9, 6, 32)},
            "allows 1 .. 16 rows",
        ),
        (zeros(1, 4, 8, 8), zeros(1, 6, 32), {"method": "gs"}, "method"),
        (zeros(1, 4, 8, 8), zeros(1, 6, 32), {"jacobi": JacobiSettings(block_size=0)}, "block_size: must be"),
        (
            zeros(1, 4, 8, 8),
            zeros(1, 6, 32),
            {"jacobi": JacobiSettings(threshold=-1.0)},
            "threshold: must be",
        ),
        (
            zeros(1, 4, 8, 8),
            zeros(1, 6, 32),
            {"jacobi": JacobiSettings(init="zeros")},
            "init: must be one of",
        ),
        (
            zeros(1, 4, 8, 8),
            zeros(1, 6, 32),
            {"shallow_jacobi": JacobiSettings(max_iter=0)},
            "shallow_jacobi.max_iter: must be",
        ),
    ],
)
def test_bad_input_is_refused_before_any_work(pipe, noise, y, kwargs, message):
    y_uncond = kwargs.pop("y_uncond", None)
    with pytest.raises(StarflowError, match=message):
        pipe.sample(noise, y, y_uncond, SampleOptions(**kwargs))


def test_missing_or_tampered_graph_is_refused(fixture_artifacts, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(fixture_artifacts, tampered)
    step = tampered / "block2.step.fp32.onnx"
    data = bytearray(step.read_bytes())
    data[-1] ^= 0xFF
    step.write_bytes(bytes(data))
    with pytest.raises(StarflowError, match="block2.step.fp32.*does not match its sha256"):
        Pipeline.load(tampered)
    step.unlink()
    with pytest.raises(StarflowError, match="is missing"):
        Pipeline.load(tampered)
    with pytest.raises(StarflowError, match="no manifest.json"):
        Pipeline.load(tmp_path)


def test_unknown_precision_and_backend(fixture_artifacts, tmp_path):
    with pytest.raises(StarflowError, match="no fp8 graphs"):
        Pipeline.load(fixture_artifacts, precision="fp8")
    with pytest.raises(StarflowError, match="backend 'tvm' is not available"):
        Pipeline.load(fixture_artifacts, backend="tvm")


def test_caches_are_allocated_once(pipe):
    noise = np.zeros((1, 4, 8, 8), np.float32)
    y = np.zeros((1, 6, 32), np.float32)
    pipe.sample(noise, y)
    caches = {(b.index, k): id(v[0]) for b in pipe.blocks for k, v in b._caches.items()}
    pipe.sample(noise + 1, y)
    assert {(b.index, k): id(v[0]) for b in pipe.blocks for k, v in b._caches.items()} == caches


def test_block_order_is_deep_first(pipe):
    assert [b.index for b in pipe.blocks] == [2, 1, 0]
    assert pipe.blocks[0].deep and pipe.blocks[0].text_conditioned
    assert replace(load_config("tiny-t2i")).num_blocks == len(pipe.blocks)


def test_forward_graphs_match_golden_density(pipe, golden):
    z, logdets = pipe.forward(golden["x"], golden["y"])
    assert np.abs(z - golden["forward.z"]).max() < 1e-4
    assert len(logdets) == 3
    for i, logdet in enumerate(logdets):
        assert np.abs(logdet - golden[f"forward.logdet.{i}"]).max() < 1e-4


def test_bench_rows_on_the_fixture_artifacts(fixture_artifacts):
    from starflow.apps.bench import BenchOptions, format_table, run_bench

    sampling = SampleOptions(guidance=1.5, jacobi=JacobiSettings(block_size=16))
    options = BenchOptions(
        preset=str(T2I / "config.yaml"), artifacts=fixture_artifacts, checkpoint=T2I / "checkpoint.pth",
        sampling=sampling, options_row=replace(sampling, shallow_jacobi=JacobiSettings(block_size=64)),
        throughput_batch=2, repeats=1,
    )  # fmt: skip
    result = run_bench(options, log=lambda line: None)
    assert result["threads"] == os.cpu_count() and len(result["load_average"]) == 2  # explicit, not torch's
    assert "load average" in format_table(result)
    rows = {(r["engine"], r["name"]): r for r in result["rows"]}
    assert len(rows) == 7
    assert result["options"]["shallow_jacobi"]["block_size"] == 64
    assert rows[("runtime", "jacobi, options")]["max_abs"] < 1.0
    assert rows[("runtime", "jacobi sampling")]["compute"] == rows[("pytorch", "jacobi sampling")]["compute"]
    # layers [1, 1, 2]; the guided deep block runs [cond ; uncond]: (1 + 1 + 2 * 2) / 4 forward passes
    assert rows[("runtime", "sequential sampling")]["compute"] == pytest.approx(1.5)
    assert rows[("pytorch", "sequential sampling")]["max_abs"] == 0.0  # the reference itself
    assert rows[("runtime", "sequential sampling")]["max_abs"] < 1e-4
    assert (
        rows[("runtime", "jacobi sampling")]["evaluations"]
        == rows[("pytorch", "jacobi sampling")]["evaluations"]
    )
    assert rows[("runtime", "sequential sampling")]["evaluations"] == 3 * 64
    assert result["throughput"]["runtime_jacobi_images_per_s"] > 0
    table = format_table(result)
    assert "runtime Jacobi is" in table and "images/s" in table
