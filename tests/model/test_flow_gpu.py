"""The reference model on CUDA: same golden tensors as on CPU (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import starflow
from starflow.core.sampler import JacobiSettings, SampleOptions
from tests.conftest import FIXTURES

T2I = FIXTURES / "official-t2i-tiny"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not T2I.is_dir(), reason=f"shared fixtures not found at {T2I}"),
]


@pytest.fixture(scope="module")
def cuda_model() -> starflow.StarFlow:
    return starflow.load_model(T2I / "config.yaml", T2I / "checkpoint.pth", device="cuda")


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return {k: v.cuda() for k, v in load_file(T2I / "golden.safetensors").items()}


def test_forward_on_cuda_matches_golden(cuda_model, golden):
    torch.backends.cuda.matmul.allow_tf32 = False
    out = cuda_model(golden["x"], golden["y"])
    assert (out.z - golden["forward.z"]).abs().max() < 1e-4


@pytest.mark.parametrize("method", ["sequential", "jacobi"])
def test_guided_sampling_on_cuda_matches_golden(cuda_model, golden, method):
    torch.backends.cuda.matmul.allow_tf32 = False
    settings = JacobiSettings(block_size=16, max_iter=64, threshold=1e-6)
    options = SampleOptions(guidance=1.5, method=method, jacobi=settings)
    sample = cuda_model.sample(golden["noise"], golden["y"], golden["y_null"], options)
    assert (sample - golden[f"reverse.{method}.cfg"]).abs().max() < 1e-3


def test_bf16_model_samples_close_to_fp32(cuda_model, golden):
    bf16 = starflow.load_model(T2I / "config.yaml", T2I / "checkpoint.pth", device="cuda").to(torch.bfloat16)
    sample = bf16.sample(golden["noise"], golden["y"], options=SampleOptions(method="sequential"))
    assert sample.dtype == torch.float32  # the flow arithmetic stays fp32
    assert (sample - golden["reverse.sequential"]).abs().max() < 0.1
