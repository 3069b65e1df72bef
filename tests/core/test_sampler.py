"""The sampling algorithm (starflow.core.sampler) through the PyTorch adapter: block-wise Jacobi
with one-token chunks is exactly sequential sampling, looser thresholds stay further from it, and
guidance changes the sample. The runtime's and libstarflow's adapters are held to the same numbers
in tests/runtime/."""

from __future__ import annotations

import pytest
import torch

from starflow.core.errors import StarflowError
from starflow.core.sampler import JacobiSettings, SampleOptions
from tests.model.test_flow import NAMED_CASES, SEQUENTIAL, make_case


@pytest.mark.parametrize("name", ["official-like", "gqa", "text-in-every-block", "patch-2"])
@pytest.mark.parametrize("threshold", [0.0, 1e-3, 10.0])
def test_jacobi_block_1_equals_sequential_exactly(name, threshold):
    model, noise, y = make_case(NAMED_CASES[name])
    y_uncond = torch.zeros_like(y)
    for guidance in (0.0, 2.0):
        uncond = y_uncond if guidance else None
        sequential = model.sample(noise, y, uncond, SampleOptions(guidance, "sequential"))
        settings = JacobiSettings(block_size=1, max_iter=3, threshold=threshold)
        jacobi = model.sample(noise, y, uncond, SampleOptions(guidance, "jacobi", settings))
        assert torch.equal(jacobi, sequential)


def test_jacobi_converges_towards_sequential():
    model, noise, y = make_case({})
    sequential = model.sample(noise, y, options=SEQUENTIAL)
    loose = model.sample(
        noise, y, options=SampleOptions(jacobi=JacobiSettings(block_size=16, threshold=1e-1))
    )
    tight = JacobiSettings(block_size=16, threshold=1e-8, max_iter=64)
    tight = model.sample(noise, y, options=SampleOptions(jacobi=tight))
    assert (tight - sequential).abs().max() < (loose - sequential).abs().max()
    assert (tight - sequential).abs().max() < 1e-2


def test_guidance_changes_the_sample_and_drops_uncond_half():
    model, noise, y = make_case({})
    plain = model.sample(noise, y, options=SEQUENTIAL)
    guided = model.sample(noise, y, torch.zeros_like(y), SampleOptions(guidance=3.0, method="sequential"))
    assert guided.shape == noise.shape
    assert (guided - plain).abs().max() > 1e-3


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_row_stop_gives_each_row_the_result_it_has_alone(guidance):
    """stop="row": row 0 sampled inside a batch equals row 0 sampled alone, iteration counts too;
    the official whole-batch rule couples the rows (so the comparison can fail)."""
    model, noise, y = make_case({})
    noise = torch.cat([noise, 3 * torch.flip(noise, dims=[0])])  # rows that converge differently
    y = torch.cat([y, -y])
    uncond = torch.zeros_like(y) if guidance else None
    jacobi = JacobiSettings(block_size=4, threshold=1e-3, max_iter=16)

    def run(stop: str, rows: slice):
        options = SampleOptions(guidance, "jacobi", jacobi, stop=stop)
        u = None if uncond is None else uncond[rows]
        return model.sample(noise[rows], y[rows], u, options, return_stats=True)

    alone, alone_stats = run("row", slice(0, 1))
    batched, batched_stats = run("row", slice(0, 4))
    assert (batched[:1] - alone).abs().max() < 1e-5
    for one, many in zip(alone_stats, batched_stats, strict=True):
        assert [chunk[0] for chunk in many.image_iterations] == [chunk[0] for chunk in one.image_iterations]
    iterations = {tuple(chunk) for block in batched_stats for chunk in block.image_iterations}
    assert any(len(set(chunk)) > 1 for chunk in iterations)  # the rows did stop at different times
    coupled, _ = run("batch", slice(0, 4))
    assert (coupled[:1] - alone).abs().max() > 1e-4


def test_unknown_stop_rule_is_refused():
    with pytest.raises(StarflowError, match=r"stop: expected one of \['batch', 'row'\], got 'each'"):
        SampleOptions(stop="each").check()
