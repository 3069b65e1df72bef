"""Flow properties over configs covering every architecture option: invertibility, density, denoise.

The sampling algorithm's own properties (Jacobi vs sequential, guidance) are tested in
tests/core/test_sampler.py on the cases defined here."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from starflow.core.config import config_from_dict
from starflow.core.sampler import SampleOptions
from starflow.model.testing import random_model

SEQUENTIAL = SampleOptions(method="sequential")

BASE = dict(
    channel_size=4,
    img_size=8,
    patch_size=1,
    channels=32,
    layers_per_block=[1, 1, 2],
    head_dim=16,
    rope=True,
    sos=True,
    txt_size=4,
    txt_dim=8,
    cond_top_only=True,
    use_softplus=True,
    use_final_norm=True,
    soft_clip=4.0,
    seq_order="L2R",
)

NAMED_CASES = {
    "official-like": {},
    "R2L": dict(seq_order="R2L"),
    "exp-scale": dict(use_softplus=False, soft_clip=0.0),
    "gqa": dict(channels=64, num_heads=4, num_kv_heads=2),
    "rms-norm": dict(norm_type="rms_norm", use_bias=False),
    "swiglu-qknorm-postnorm": dict(use_swiglu=True, use_qk_norm=True, use_post_norm=True),
    "patch-2": dict(patch_size=2, img_size=8),
    "no-text": dict(txt_size=0, txt_dim=0, cond_top_only=False),
    "text-in-every-block": dict(cond_top_only=False),
    "top-block-channels": dict(top_block_channels=64),
    "no-sos": dict(sos=False),
    "pos-embed": dict(rope=False),
    "identity-block": dict(layers_per_block=[0, 1, 2]),
    "no-final-norm": dict(use_final_norm=False),
}


def make_case(overrides: dict, seed: int = 0, square: bool = False):
    config = config_from_dict({**BASE, **overrides})
    model = random_model(config, seed)
    generator = torch.Generator().manual_seed(seed)
    H = W = config.latent_size
    if config.rope and not square:  # learned pos_embed only takes the training grid
        W = H + 4 * config.patch_size  # non-square latent (8x12 at patch 1)
    noise = torch.randn(2, config.channel_size, H, W, generator=generator)
    y = torch.randn(2, config.txt_size, config.txt_dim, generator=generator) if config.txt_dim else None
    return model, noise, y


def assert_round_trip(model, noise, y):
    sample = model.sample(noise, y, options=SEQUENTIAL)
    assert sample.shape == noise.shape
    assert (sample - noise).abs().max() > 1e-3  # the flow is not the identity
    z = model(sample, y).z
    assert (z - noise).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", list(NAMED_CASES))
def test_sequential_sampling_inverts_forward(name):
    assert_round_trip(*make_case(NAMED_CASES[name]))


def test_square_grid_round_trip_too():
    assert_round_trip(*make_case({}, square=True))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seq_order=st.sampled_from(["L2R", "R2L"]),
    use_softplus=st.booleans(),
    soft_clip=st.sampled_from([0.0, 2.0]),
    heads=st.sampled_from([(None, None), (4, 2), (4, 1)]),
    norm_type=st.sampled_from(["layer_norm", "rms_norm"]),
    use_swiglu=st.booleans(),
    use_qk_norm=st.booleans(),
    use_post_norm=st.booleans(),
    use_bias=st.booleans(),
    patch_size=st.sampled_from([1, 2]),
    text=st.sampled_from(["none", "deep", "all"]),
    rope=st.booleans(),
    sos=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_round_trip_property(
    seq_order,
    use_softplus,
    soft_clip,
    heads,
    norm_type,
    use_swiglu,
    use_qk_norm,
    use_post_norm,
    use_bias,
    patch_size,
    text,
    rope,
    sos,
    seed,
):
    num_heads, num_kv_heads = heads
    overrides = dict(
        seq_order=seq_order,
        use_softplus=use_softplus,
        soft_clip=soft_clip,
        channels=64,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        norm_type=norm_type,
        use_swiglu=use_swiglu,
        use_qk_norm=use_qk_norm,
        use_post_norm=use_post_norm,
        use_bias=use_bias,
        patch_size=patch_size,
        rope=rope,
        sos=sos,
        txt_size=0 if text == "none" else 4,
        txt_dim=0 if text == "none" else 8,
        cond_top_only=text == "deep",
    )
    assert_round_trip(*make_case(overrides, seed))


def test_nll_and_denoise():
    model, noise, y = make_case({})
    x = model.sample(noise, y, options=SEQUENTIAL)
    nll = model.nll(x, y)
    assert torch.isfinite(nll.loss) and nll.bits_per_dim > 0
    # denoise equals x - s^2 * grad of each sample's total NLL (0.5*sum z^2 - sum logdet)
    noise_std = 0.3
    x_req = x.clone().requires_grad_(True)
    out = model(x_req, y)
    total = 0.5 * out.z.pow(2).sum() - sum(ld.sum() for ld in out.logdets)
    (grad,) = torch.autograd.grad(total, [x_req])
    expected = x - noise_std**2 * grad
    denoised = model.denoise(x, y, noise_std)
    assert torch.allclose(denoised, expected, atol=1e-5)
    assert (denoised - x).abs().max() > 1e-4
    # per-sample: denoising one sample alone gives the same result
    assert torch.allclose(model.denoise(x[:1], y[:1], noise_std), denoised[:1], atol=1e-5)


def test_sampling_a_model_in_training_mode_equals_eval_mode():
    """Training runs draw sample grids from a model in train mode: the fused causal kernel that
    training uses must not serve a chunk against a cache (its mask would be misaligned)."""
    model, noise, y = make_case({})
    expected = model.sample(noise, y)
    model.train()
    try:
        sampled = model.sample(noise, y)
    finally:
        model.eval()
    assert (sampled - expected).abs().max() < 1e-5
