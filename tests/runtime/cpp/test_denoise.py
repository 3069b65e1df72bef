"""The self-denoise in libstarflow (sf_pipeline_denoise) against the Python runtime: nll-gradient
exports chain the blocks' fp32 forward and vjp graphs (`starflow.core.sampler.nll_gradient`), in an
fp32 pipeline through its own sessions and in an fp16 one through fp32 graphs beside them; both
loaders refuse the same broken denoise sections. Skips without a build, as test_libstarflow.py.
"""

from __future__ import annotations

import ctypes
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from starflow.contract.manifest import MANIFEST_NAME, Manifest
from starflow.core.config import config_from_dict
from starflow.core.errors import StarflowError
from starflow.core.generation import make_noise
from starflow.export.onnx import ExportOptions, export_onnx
from starflow.model.checkpoint import save_model
from starflow.model.testing import random_model
from starflow.runtime import Generator
from tests.runtime.cpp.test_libstarflow import ASAN_BUILD, BUILD, GQA_SWIGLU_PATCH2, _set_digest, built, run

# The same graphs on the same ONNX Runtime at one thread, chained in the same order: the gradients
# agree to float32 rounding, relative to the largest of them.
GRADIENT_RTOL = 1e-5


class CApi:
    """The few libstarflow C calls these tests make, through ctypes; statuses raise StarflowError."""

    def __init__(self, library: Path):
        lib = self.lib = ctypes.CDLL(str(library))
        p, i64 = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)
        lib.sf_status_message.restype, lib.sf_status_message.argtypes = ctypes.c_char_p, [p]
        lib.sf_status_free.argtypes = [p]
        for name, args in {
            "sf_config_create": [ctypes.POINTER(p)],
            "sf_config_set_threads": [p, ctypes.c_int],
            "sf_config_set_precision": [p, ctypes.c_char_p],
            "sf_pipeline_load": [ctypes.c_char_p, p, ctypes.POINTER(p)],
            "sf_tensor_create": [ctypes.c_int, i64, ctypes.c_size_t, ctypes.POINTER(p)],
            "sf_pipeline_denoise": [p, p, p, ctypes.POINTER(p)],
        }.items():
            getattr(lib, name).restype, getattr(lib, name).argtypes = p, args
        lib.sf_tensor_data.restype, lib.sf_tensor_data.argtypes = p, [p]
        lib.sf_tensor_rank.restype, lib.sf_tensor_rank.argtypes = ctypes.c_size_t, [p]
        lib.sf_tensor_shape.restype, lib.sf_tensor_shape.argtypes = i64, [p]
        for name in ("sf_config_free", "sf_pipeline_free", "sf_tensor_free"):
            getattr(lib, name).argtypes = [p]

    def check(self, status: int | None) -> None:
        if status:
            message = self.lib.sf_status_message(status).decode()
            self.lib.sf_status_free(status)
            raise StarflowError(message)

    def load(self, directory: Path, precision: str = "fp32") -> ctypes.c_void_p:
        config, pipeline = ctypes.c_void_p(), ctypes.c_void_p()
        self.check(self.lib.sf_config_create(ctypes.byref(config)))
        try:
            self.check(self.lib.sf_config_set_threads(config, 1))
            self.check(self.lib.sf_config_set_precision(config, precision.encode()))
            self.check(self.lib.sf_pipeline_load(str(directory).encode(), config, ctypes.byref(pipeline)))
        finally:
            self.lib.sf_config_free(config)
        return pipeline

    def tensor(self, array: np.ndarray) -> ctypes.c_void_p:
        out = ctypes.c_void_p()
        shape = (ctypes.c_int64 * array.ndim)(*array.shape)
        self.check(self.lib.sf_tensor_create(1, shape, array.ndim, ctypes.byref(out)))  # SF_FLOAT32
        source = np.ascontiguousarray(array, np.float32)
        ctypes.memmove(self.lib.sf_tensor_data(out), source.ctypes.data, source.nbytes)
        return out

    def array(self, tensor: ctypes.c_void_p) -> np.ndarray:
        shape = tuple(self.lib.sf_tensor_shape(tensor)[i] for i in range(self.lib.sf_tensor_rank(tensor)))
        data = ctypes.cast(self.lib.sf_tensor_data(tensor), ctypes.POINTER(ctypes.c_float))
        return np.ctypeslib.as_array(data, (int(np.prod(shape)),)).copy().reshape(shape)

    def denoise(self, pipeline: ctypes.c_void_p, x: np.ndarray, text: np.ndarray | None) -> np.ndarray:
        tensors = [self.tensor(x), self.tensor(text) if text is not None else None]
        out = ctypes.c_void_p()
        try:
            self.check(self.lib.sf_pipeline_denoise(pipeline, tensors[0], tensors[1], ctypes.byref(out)))
            return self.array(out)
        finally:
            for t in (*tensors, out):
                self.lib.sf_tensor_free(t)


@pytest.fixture(scope="module")
def capi() -> CApi:
    return CApi(built(BUILD) / "libstarflow.so")


def check_denoise(capi: CApi, artifacts: Path, precision: str, x: np.ndarray, prompts: list[str] | None,
                  text: np.ndarray | None = None) -> float:  # fmt: skip
    """C++ denoise == Generator.denoise at `precision`; returns the largest difference of the
    gradients, relative to the largest gradient (Pipeline.nll_gradient's)."""
    generator = Generator.load(artifacts, precision=precision, threads=1)
    if prompts is not None:
        text = generator.encode(prompts)
    expected = generator.denoise(x, text)
    grad = generator.denoiser.pipeline.nll_gradient(x, text)
    pipeline = capi.load(artifacts, precision)
    try:
        ours = capi.denoise(pipeline, x, text)
    finally:
        capi.lib.sf_pipeline_free(pipeline)
    assert ours.shape == x.shape and ours.dtype == np.float32
    noise_std = Manifest.load(artifacts).denoise.noise_std
    # x - s * grad in float32: a difference in grad shows as s * it, plus x's rounding
    scale = np.float32(noise_std**2)
    tolerance = scale * GRADIENT_RTOL * np.abs(grad).max() + np.spacing(np.abs(x).max())
    error = np.abs(ours - expected).max()
    assert error <= tolerance, (error, tolerance)
    return float(error / (scale * np.abs(grad).max()))


def test_digits_denoise_equals_python_nll_gradient(capi, demo_export):
    """The digits export (text in the deep block, flips between blocks): a batch of three with
    prompts, at the training size and a non-square one."""
    manifest = Manifest.load(demo_export)
    assert manifest.denoise.kind == "nll-gradient" and manifest.denoise.graph is None
    assert all({"forward", "vjp"} <= set(block.graphs["fp32"]) for block in manifest.blocks)
    for shape in ((3, 1, 8, 8), (2, 1, 6, 12)):
        x = make_noise(7, shape)
        check_denoise(capi, demo_export, "fp32", x, [str(i) for i in range(shape[0])])


@pytest.fixture(scope="module")
def random_denoise_export(tmp_path_factory) -> Path:
    """A random GQA/SwiGLU model with patch 2 and text in every block, fp32 and fp16 graphs, with
    the nll-gradient self-denoise (fp32 forward and vjp graphs per block)."""
    work = tmp_path_factory.mktemp("cpp-denoise")
    save_model(random_model(config_from_dict(GQA_SWIGLU_PATCH2), seed=3), work / "model.safetensors")
    options = ExportOptions(precisions=("fp32", "fp16"), validate=False, max_latent=(16, 24))
    export_onnx(work / "model.safetensors", work / "artifacts", options)
    return work / "artifacts"


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_denoise_runs_fp32_graphs_at_either_precision(capi, random_denoise_export, precision):
    manifest = Manifest.load(random_denoise_export)
    assert manifest.denoise.kind == "nll-gradient"
    assert all("vjp" not in block.graphs["fp16"] for block in manifest.blocks)  # fp32 only
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 2, 16, 24), dtype=np.float32)
    text = rng.standard_normal((2, 3, 8), dtype=np.float32)
    check_denoise(capi, random_denoise_export, precision, x, None, text)


# The official tiny video structure (frame-local shallow blocks, flips inside each frame) without
# its learned denoiser: its export's self-denoise is the nll-gradient one, over clips.
VIDEO_WITHOUT_DENOISER = dict(
    channel_size=4, img_size=4, patch_size=1, channels=64, layers_per_block=[1, 1, 2], head_dim=32,
    rope=True, sos=True, txt_size=5, txt_dim=16, cond_top_only=True, use_softplus=True,
    use_final_norm=True, soft_clip=4.0, seq_order="L2R", temporal_causal=1, shallow_block_local=True,
    learnable_self_denoiser=False,
)  # fmt: skip


def test_clip_denoise_equals_python_nll_gradient(capi, tmp_path):
    """Clips through frame-local blocks (each frame its own row) and flip-in-frame permutations."""
    save_model(random_model(config_from_dict(VIDEO_WITHOUT_DENOISER), seed=2), tmp_path / "model.safetensors")
    options = ExportOptions(precisions=("fp32",), validate=False, max_frames=3)
    export_onnx(tmp_path / "model.safetensors", tmp_path / "artifacts", options)
    manifest = Manifest.load(tmp_path / "artifacts")
    assert manifest.denoise.kind == "nll-gradient"
    assert [(b.frame_local, b.permutation) for b in manifest.blocks] == [
        (False, "flip-in-frame"), (True, "identity"), (True, "flip-in-frame"),
    ]  # fmt: skip
    rng = np.random.default_rng(0)
    for shape in ((2, 3, 4, 4, 4), (1, 2, 4, 4, 4)):
        x = rng.standard_normal(shape, dtype=np.float32)
        text = rng.standard_normal((shape[0], 5, 16), dtype=np.float32)
        check_denoise(capi, tmp_path / "artifacts", "fp32", x, None, text)


def test_bad_denoise_input_is_refused_as_in_python(capi, demo_export):
    """Pipeline.nll_gradient's checks, in its words (its first array is `latents`)."""
    generator = Generator.load(demo_export, threads=1)
    text = generator.encode(["1", "2"])
    x, many = make_noise(2, (2, 1, 8, 8)), make_noise(2, (17, 1, 8, 8))
    nan = x.copy()
    nan[1, 0, 2, 3] = np.nan
    cases = [
        (x, None, "y: this model is text-conditioned; pass (2, L, 32) text embeddings"),
        (x, text[:1], "text embeddings of shape (2, L, 32) with 1 <= L <= 1, got"),
        (nan, text, "latents: contains NaN or inf"),
        (x[:, :, :3], text, "latents: latent 3x8 is outside this export's range"),
        (many, generator.encode(["1"] * 17), "latents: batch 17 of 1 frame(s) runs as 17 graph rows"),
    ]
    pipeline = capi.load(demo_export)
    try:
        for latents, y, phrase in cases:
            with pytest.raises(StarflowError) as python:
                generator.denoise(latents, y)
            with pytest.raises(StarflowError) as cpp:
                capi.denoise(pipeline, latents, y)
            messages = str(python.value), str(cpp.value)
            assert all(phrase in message for message in messages), messages
    finally:
        capi.lib.sf_pipeline_free(pipeline)


def broken_denoise(demo_export: Path, root: Path) -> list[tuple[Path, str]]:
    """Copies of the digits export whose denoise section the contract refuses, each with the phrase
    both loaders' errors share."""
    cases = []

    def case(name: str, phrase: str, change) -> None:
        directory = root / name
        shutil.copytree(demo_export, directory)
        data = json.loads((directory / MANIFEST_NAME).read_text())
        change(data)
        _set_digest(directory, data)
        cases.append((directory, phrase))

    def drop(kind: str):
        return lambda data: data["blocks"][1]["graphs"]["fp32"].pop(kind)

    without = "denoise nll-gradient chains the blocks' fp32 forward and vjp graphs; block 2 has no fp32"
    case("without-vjp", f"{without} vjp graph", drop("vjp"))
    case("without-forward", f"{without} forward graph", drop("forward"))
    step = "block3.step.fp32"
    case("nll-gradient-with-graph", "nll-gradient", lambda data: data["denoise"].update(graph=step))
    learned = {"kind": "learned", "step": 0.5}
    case("learned-without-graph", "learned denoiser", lambda data: data["denoise"].update(learned))
    return cases


@pytest.mark.parametrize("build", [BUILD, ASAN_BUILD], ids=["release", "asan-ubsan"])
def test_broken_denoise_sections_are_refused_by_both_loaders(demo_export, tmp_path, build):
    program = built(build) / "starflow-run"
    for directory, phrase in broken_denoise(demo_export, tmp_path):
        with pytest.raises(StarflowError) as python:
            Manifest.load(directory)
        args = ["--artifacts", directory, "--prompt", "1", "--no-denoise", "--out", tmp_path / "x.npy"]
        result = run(program, *args)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert phrase in str(python.value) and phrase in result.stderr, (str(python.value), result.stderr)
        if directory.name.endswith("graph"):  # the rule on denoise.graph, named by both
            assert "denoise.graph" in result.stderr and "graph" in str(python.value)
        assert "Sanitizer" not in result.stderr and "runtime error" not in result.stderr
    assert not (tmp_path / "x.npy").exists()


def test_generate_with_denoise_under_sanitizers_matches_release(demo_export, tmp_path):
    """Prompt mode runs the nll-gradient chain after sampling: under ASan + UBSan, clean and equal."""
    args = ["--artifacts", demo_export, "--prompt", "5", "--prompt", "", "--seed", "9", "--threads", "1"]
    outputs = {}
    for name, build in (("release", BUILD), ("asan", ASAN_BUILD)):
        out, images = tmp_path / f"{name}.npy", tmp_path / f"{name}-images.npy"
        result = run(built(build) / "starflow-run", *args, "--latents-out", out, "--out", images)
        assert result.returncode == 0, result.stderr
        assert "Sanitizer" not in result.stderr and "runtime error" not in result.stderr
        outputs[name] = np.load(out)
    assert np.abs(outputs["asan"] - outputs["release"]).max() <= 1e-6
