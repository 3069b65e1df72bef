"""Bad input to the model gets a specific StarflowError (a ValueError), before any work."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from starflow.core.config import load_config
from starflow.core.errors import StarflowError
from starflow.core.sampler import JacobiSettings, SampleOptions
from starflow.model.flow import StarFlow
from starflow.model.testing import random_model


@pytest.fixture(scope="module")
def model() -> StarFlow:
    return random_model(load_config("tiny-t2i"))


def test_error_type_is_a_value_error():
    assert issubclass(StarflowError, ValueError)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 3, 8, 8), "expected 4 latent channels"),
        ((2, 4, 8), "expected a (B, C, H, W) latent array"),
        ((2, 4, 0, 8), "not a positive multiple of patch_size"),
    ],
)
def test_bad_latent_shapes(model, shape, message):
    y = torch.zeros(2, 6, 32)
    with pytest.raises(StarflowError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model(torch.zeros(shape), y)
    with pytest.raises(StarflowError):
        model.sample(torch.zeros(shape), y)


def test_odd_size_not_divisible_by_patch():
    config = replace(load_config("tiny-t2i"), patch_size=2)
    model = StarFlow(config)
    with pytest.raises(StarflowError, match="latent size 8x7 is not a positive multiple of patch_size 2"):
        model.sample(torch.zeros(1, 4, 8, 7), torch.zeros(1, 6, 32))


def test_text_of_the_wrong_width_or_batch(model):
    noise = torch.zeros(2, 4, 8, 8)
    with pytest.raises(StarflowError, match=r"expected text embeddings of shape \(2, L, 32\).*\(2, 6, 16\)"):
        model.sample(noise, torch.zeros(2, 6, 16))
    with pytest.raises(StarflowError, match=r"got \(3, 6, 32\)"):
        model(noise, torch.zeros(3, 6, 32))
    with pytest.raises(StarflowError, match="this model is text-conditioned"):
        model.sample(noise, None)


def test_guidance_needs_y_uncond_of_the_same_shape(model):
    noise, y = torch.zeros(2, 4, 8, 8), torch.zeros(2, 6, 32)
    with pytest.raises(StarflowError, match="guidance > 0 needs y_uncond"):
        model.sample(noise, y, options=SampleOptions(guidance=1.5))
    with pytest.raises(StarflowError, match=r"y_uncond: expected shape \(2, 6, 32\)"):
        model.sample(noise, y, torch.zeros(2, 5, 32), SampleOptions(guidance=1.5))
    for weight in (-1.0, float("nan"), float("inf")):
        with pytest.raises(StarflowError, match="guidance: must be a finite number >= 0"):
            model.sample(noise, y, y, SampleOptions(guidance=weight))


def test_unconditional_model_rejects_text_and_guidance():
    config = replace(load_config("tiny-t2i"), txt_size=0, txt_dim=0, cond_top_only=False)
    model = StarFlow(config)
    noise = torch.zeros(1, 4, 8, 8)
    with pytest.raises(StarflowError, match="not text-conditioned"):
        model.sample(noise, torch.zeros(1, 6, 32))
    with pytest.raises(StarflowError, match="guidance > 0 needs a text-conditioned model"):
        model.sample(noise, options=SampleOptions(guidance=2.0))


def test_bad_sampler_settings(model):
    noise, y = torch.zeros(1, 4, 8, 8), torch.zeros(1, 6, 32)
    with pytest.raises(StarflowError, match=r"method: expected one of \['jacobi', 'sequential'\]"):
        model.sample(noise, y, options=SampleOptions(method="gauss-seidel"))
    with pytest.raises(StarflowError, match="jacobi.block_size: must be an integer >= 1"):
        model.sample(noise, y, options=SampleOptions(jacobi=JacobiSettings(block_size=0)))


def test_pos_embed_model_only_takes_its_training_grid():
    config = replace(load_config("tiny-t2i"), rope=False)
    model = StarFlow(config)
    with pytest.raises(StarflowError, match="only takes its training grid 8x8"):
        model.sample(torch.zeros(1, 4, 8, 12), torch.zeros(1, 6, 32))
    with pytest.raises(StarflowError, match="Jacobi sampling needs a model with `sos: 1`"):
        no_sos = StarFlow(replace(config, sos=False))
        no_sos.sample(torch.zeros(1, 4, 8, 8), torch.zeros(1, 6, 32), options=SampleOptions(method="jacobi"))


def test_text_size_without_text_width_is_refused():
    config = replace(load_config("tiny-t2i"), txt_dim=0)
    with pytest.raises(StarflowError, match="txt_size > 0 but no txt_dim"):
        StarFlow(config)
