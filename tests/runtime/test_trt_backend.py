"""GPU execution paths: the TensorRT backend and ONNX Runtime's CUDA/TensorRT providers.

Each test compares a GPU path with the ONNX Runtime CPU pipeline on the same noise, and skips
(saying why) when its library or a CUDA GPU is missing; scripts/gpu_check.sh runs them all.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from starflow.contract.manifest import Range
from starflow.core.errors import StarflowError
from starflow.export import trt
from starflow.runtime import Pipeline, SampleOptions
from tests.conftest import T2I

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not T2I.is_dir(), reason=f"shared fixtures not found at {T2I}"),
]
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2}  # max |gpu - cpu| over the sampled latent


@pytest.fixture(scope="module")
def artifacts(fixture_artifacts: Path) -> Path:
    """The session's shared fixture export (tests/conftest.py)."""
    return fixture_artifacts


def _inputs(pipeline: Pipeline, batch: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    latent, text = pipeline.manifest.latent, pipeline.manifest.text
    return [
        rng.standard_normal((batch, latent.channels, *latent.train), dtype=np.float32),
        rng.standard_normal((batch, text.max_length, text.dim), dtype=np.float32),
        np.zeros((batch, text.max_length, text.dim), np.float32),
    ]


def _compare(directory: Path, precision: str, **load: object) -> None:
    reference = Pipeline.load(directory, precision=precision)
    candidate = Pipeline.load(directory, precision=precision, **load)
    inputs = _inputs(reference)
    for method in ("sequential", "jacobi"):
        expected = reference.sample(*inputs, SampleOptions(guidance=1.5, method=method))
        got = candidate.sample(*inputs, SampleOptions(guidance=1.5, method=method))
        assert np.abs(got - expected).max() <= TOLERANCE[precision], (method, precision)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_backend_matches_onnxruntime(artifacts, tmp_path, precision):
    try:
        builder = trt.choose_builder()
    except StarflowError as err:
        pytest.skip(str(err))
    pytest.importorskip("cuda.bindings", reason="the TensorRT backend needs cuda-python")
    capability, _ = trt.current_gpu()
    if builder.rtx and capability not in trt.rtx_compute_capabilities(builder):
        pytest.skip(f"TensorRT-RTX {builder.version} does not target this GPU ({capability})")
    directory = tmp_path / "artifacts"
    shutil.copytree(artifacts, directory)
    targets = [capability] if builder.rtx else []
    options = trt.EngineOptions(
        precisions=(precision,),
        profiles=("default", "sequential"),
        grids=((8, 8),),
        batch=Range(1, 2, 4),
        optimization_level=1,
        compute_capabilities=tuple(targets),
    )
    trt.build_engines(directory, options)
    _compare(directory, precision, backend="tensorrt")
    pipeline = Pipeline.load(directory, precision=precision, backend="tensorrt")
    with pytest.raises(StarflowError, match="outside every optimization profile.*batch 1..4"):
        pipeline.sample(*_inputs(pipeline, batch=3), SampleOptions(guidance=1.5))  # 6 rows; engines stop at 4


@pytest.mark.parametrize("provider", ["CUDAExecutionProvider", "TensorrtExecutionProvider"])
def test_onnxruntime_gpu_providers_match_cpu(artifacts, provider):
    ort = pytest.importorskip("onnxruntime")
    if provider not in ort.get_available_providers():
        pytest.skip(f"{provider} not in this onnxruntime ({ort.get_available_providers()})")
    _compare(artifacts, "fp32", providers=[provider, "CPUExecutionProvider"])
