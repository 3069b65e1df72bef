"""After the flow: the SD-VAE decoder graph and the self-denoise, exported and run by the runtime.

A tiny random two-level AutoencoderKL keeps the decoder fast (it upsamples 2x). The self-denoise
is the runtime's chain of the blocks' forward and vjp graphs: checked on the PyTorch blocks for
several models, and through the embedded digits model's export.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from starflow.contract.manifest import VAE_SCALE, TensorSpec
from starflow.core import sampler
from starflow.core.config import DEMO_CHECKPOINT, PRESETS, StarFlowConfig, load_config
from starflow.core.errors import StarflowError
from starflow.core.outputs import to_unit_images
from starflow.export.components import export_component
from starflow.model.checkpoint import load_model
from starflow.model.flow import StarFlow
from starflow.model.testing import random_model
from starflow.runtime.backends import OrtRunner
from starflow.runtime.components import DecoderRunner, GradientDenoiser
from starflow.runtime.generator import Generator

# ---- decoder -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae(vae_dir: Path):
    from starflow.model.vae import load_vae

    return load_vae(vae_dir)


@pytest.fixture(scope="module")
def decoder(vae, tmp_path_factory: pytest.TempPathFactory) -> DecoderRunner:
    from starflow.export.decoder import decoder_graph

    graph = decoder_graph(vae, VAE_SCALE, "tiny-sd-vae")
    directory = tmp_path_factory.mktemp("decoder")
    results = export_component(graph, directory)
    spec, path = graph.spec, directory / "decoder.fp32.onnx"
    assert spec.name == "decoder.fp32" and spec.file == path.name
    assert [r.case for r in results] == ["batch 2, latent 4x6", "batch 1, latent 6x5"]
    assert spec.inputs == (TensorSpec("latent", "float32", ("batch", 4, "height", "width")),)
    assert spec.outputs == (TensorSpec("image", "float32", ("batch", 3, "2*height", "2*width")),)
    return DecoderRunner(OrtRunner(spec.name, path), channels=4)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("size", [(4, 4), (4, 6)])
def test_runtime_decoder_matches_diffusers(vae, decoder, batch, size):
    from starflow.model.vae import decode

    latent = torch.randn(batch, 4, *size, generator=torch.Generator().manual_seed(batch))
    expected = decode(vae, latent, VAE_SCALE).numpy()
    image = decoder.decode(latent.numpy())
    assert image.shape == (batch, 3, 2 * size[0], 2 * size[1]) == expected.shape
    assert np.abs(image - expected).max() <= 1e-4


def test_unit_images_agree_between_torch_and_numpy():
    from starflow.model.vae import to_unit_images as torch_unit_images

    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0)) * 2  # beyond [-1, 1]
    images = to_unit_images(x.numpy())
    assert images.shape == (2, 4, 5, 3) and images.dtype == np.float32
    assert images.min() == 0.0 and images.max() == 1.0  # clipped
    np.testing.assert_array_equal(images, torch_unit_images(x))
    np.testing.assert_array_equal(images[1, 2, 3], (np.clip(x[1, :, 2, 3].numpy(), -1, 1) + 1) / 2)


def test_decoder_rejects_bad_latents(decoder):
    with pytest.raises(StarflowError, match="latent: expected 4 latent channels"):
        decoder.decode(np.zeros((1, 3, 4, 4), np.float32))
    with pytest.raises(StarflowError, match="latent: expected a float32 numpy array, got float64"):
        decoder.decode(np.zeros((1, 4, 4, 4)))
    with pytest.raises(StarflowError, match=r"latent: expected a \(B, C, H, W\) latent array"):
        decoder.decode(np.zeros((4, 4, 4), np.float32))


def test_load_vae_errors(tmp_path, vae):
    from starflow.model.vae import check_channels, load_vae

    with pytest.raises(StarflowError, match="no such directory"):
        load_vae(tmp_path / "missing")
    with pytest.raises(StarflowError, match="no config.json"):
        load_vae(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(StarflowError, match="holds a UNet2DModel, expected an AutoencoderKL"):
        load_vae(tmp_path)
    check_channels(vae, 4)
    with pytest.raises(StarflowError, match="decodes 4-channel latents, the model samples 16"):
        check_channels(vae, 16)


# ---- denoise -----------------------------------------------------------------------------------
NOISE_STD = 0.3


@pytest.mark.parametrize(
    "config",
    [
        load_config("tiny-t2i"),  # three blocks: flips, a text-free shallow block, the deep one
        StarFlowConfig(
            **{**PRESETS["tiny-t2i"], "txt_size": 0, "txt_dim": 0, "cond_top_only": False, "patch_size": 2}
        ),
    ],
    ids=["tiny-t2i", "no-text-patch-2"],
)
def test_nll_gradient_is_the_model_denoise_step(config):
    """The runtimes' loop over per-block vjp steps, on the PyTorch blocks (what the vjp graphs
    trace), against `StarFlow.denoise`'s whole-model autograd, at a non-square latent."""
    model = random_model(config, 0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, config.channel_size, 4, 6, generator=generator)
    text = torch.randn(2, 3, config.txt_dim, generator=generator) if config.txt_dim else None
    step = x - NOISE_STD**2 * sampler.nll_gradient(model.blocks, x, text, patch_size=config.patch_size)
    torch.testing.assert_close(step, model.denoise(x, text, NOISE_STD), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def digits(demo_export: Path) -> tuple[StarFlow, GradientDenoiser]:
    """The embedded digits model and its export's self-denoise (the runtime's chain of graphs)."""
    generator = Generator.load(demo_export)
    assert isinstance(generator.denoiser, GradientDenoiser)
    return load_model(None, DEMO_CHECKPOINT), generator.denoiser


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("size", [(8, 8), (4, 12)])
def test_runtime_denoiser_matches_model(digits, batch, size):
    model, denoiser = digits
    generator = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 1, *size, generator=generator)
    text = torch.randn(batch, 1, 32, generator=generator)
    expected = model.denoise(x, text, NOISE_STD).numpy()
    out = denoiser.denoise(x.numpy(), text.numpy(), NOISE_STD)
    assert out.dtype == np.float32
    assert np.abs(out - expected).max() <= 1e-4


def test_denoiser_rejects_bad_inputs(digits):
    _, denoiser = digits
    x, text = np.zeros((2, 1, 8, 8), np.float32), np.zeros((2, 1, 32), np.float32)
    bad = [
        ((np.zeros((2, 3, 8, 8), np.float32), text, 0.3), "latents: expected 1 latent channels"),
        ((x.astype(np.float64), text, 0.3), "latents: expected a float32 numpy array, got float64"),
        ((np.zeros((2, 1, 2, 8), np.float32), text, 0.3), r"latent 2x8 is outside this export's range"),
        ((x, None, 0.3), r"y: this model is text-conditioned; pass \(2, L, 32\) text embeddings"),
        ((x, text[:, :, :16], 0.3), r"y: expected text embeddings of shape \(2, L, 32\).*\(2, 1, 16\)"),
        ((x, text[:1], 0.3), r"got \(1, 1, 32\)"),
        ((x, text.astype(np.float64), 0.3), "y: expected a float32 numpy array, got float64"),
        ((x, text, -1.0), "noise_std: must be a finite number >= 0"),
    ]
    for args, message in bad:
        with pytest.raises(StarflowError, match=message):
            denoiser.denoise(*args)
