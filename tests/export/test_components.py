"""After the flow: the SD-VAE decoder and self-denoise graphs, exported and run by the runtime.

Tiny random models keep the file fast: a two-level AutoencoderKL (so the decoder upsamples 2x)
and a one-block text model for the denoise graph, whose export traces forward and backward.
Several flow blocks, and a model without text, are checked on the PyTorch side (`NLLGradient`),
which the export traces as is.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from starflow.contract.manifest import VAE_SCALE, TensorSpec
from starflow.core.config import PRESETS, StarFlowConfig, load_config
from starflow.core.errors import StarflowError
from starflow.core.outputs import to_unit_images
from starflow.export import denoise
from starflow.export.components import export_component
from starflow.export.defaults import DEFAULT_OPSET
from starflow.export.denoise import NLLGradient, denoise_spec
from starflow.export.worker import DenoiseJob
from starflow.model.checkpoint import save_model
from starflow.model.flow import StarFlow
from starflow.model.testing import random_model
from starflow.runtime.backends import OrtRunner
from starflow.runtime.components import DecoderRunner, DenoiserRunner

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


def one_block_t2i() -> StarFlow:
    """The tiny-t2i layers (RoPE with text, soft-clip, softplus, final norm) in one text block."""
    return random_model(StarFlowConfig(**{**PRESETS["tiny-t2i"], "layers_per_block": [1], "blocks": 1}), 1)


@pytest.fixture(scope="module")
def t2i() -> StarFlow:
    return one_block_t2i()


@pytest.fixture(scope="module")
def denoise_graph(t2i, tmp_path_factory: pytest.TempPathFactory) -> Path:
    graph = denoise.denoise_graph(t2i)
    directory = tmp_path_factory.mktemp("denoise")
    export_component(graph, directory)
    spec, path = graph.spec, directory / "denoise.fp32.onnx"
    assert spec == denoise_spec(t2i)
    assert [t.name for t in spec.inputs] == ["x", "text"] and spec.outputs[0].name == "grad"
    assert spec.inputs[1].shape == ("batch", "text", 32)
    return path


@pytest.fixture(scope="module")
def denoiser(denoise_graph) -> DenoiserRunner:
    return DenoiserRunner(OrtRunner("denoise.fp32", denoise_graph), channels=4, text_dim=32)


def test_a_worker_process_exports_the_same_denoise_graph(t2i, denoise_graph, tmp_path):
    """`export_onnx` runs the denoise export in a worker beside the block graphs: same file."""
    checkpoint = tmp_path / "model.safetensors"
    save_model(t2i, checkpoint)
    job = DenoiseJob(checkpoint, None, tmp_path, DEFAULT_OPSET)
    job.wait()
    assert (tmp_path / "denoise.fp32.onnx").read_bytes() == denoise_graph.read_bytes()


def test_a_failing_or_cancelled_worker(tmp_path):
    job = DenoiseJob(tmp_path / "missing.safetensors", None, tmp_path, DEFAULT_OPSET)
    with pytest.raises(
        StarflowError, match=r"graph denoise\.fp32 \(worker process\) failed: .*missing\.safetensors"
    ):
        job.wait()
    checkpoint = tmp_path / "model.safetensors"
    save_model(one_block_t2i(), checkpoint)
    job = DenoiseJob(checkpoint, None, tmp_path, DEFAULT_OPSET)
    job.cancel()  # at once: the export fails elsewhere
    assert job._process.returncode is not None and not (tmp_path / "denoise.fp32.onnx").exists()


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("size", [(4, 4), (4, 6)])
def test_runtime_denoiser_matches_model(t2i, denoiser, batch, size):
    generator = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 4, *size, generator=generator)
    text = torch.randn(batch, 6, 32, generator=generator)
    expected = t2i.denoise(x, text, NOISE_STD).numpy()
    out = denoiser.denoise(x.numpy(), text.numpy(), NOISE_STD)
    assert out.dtype == np.float32
    assert np.abs(out - expected).max() <= 1e-4


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
    """What the denoise graph traces, against `StarFlow.denoise`, at a non-square latent."""
    model = random_model(config, 0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, config.channel_size, 4, 6, generator=generator)
    text = torch.randn(2, 3, config.txt_dim, generator=generator) if config.txt_dim else None
    step = x - NOISE_STD**2 * NLLGradient(model)(x, text)
    torch.testing.assert_close(step, model.denoise(x, text, NOISE_STD), rtol=0, atol=1e-5)
    inputs = denoise_spec(model).inputs
    assert [t.name for t in inputs] == (["x", "text"] if config.txt_dim else ["x"])


class ZeroGradient:
    """A stand-in runner for a graph without text: records the feeds, returns a zero gradient."""

    name, input_names, output_names = "denoise.fp32", ["x"], ["grad"]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.feeds = feeds
        return {"grad": np.zeros_like(feeds["x"])}


def test_denoiser_without_text_feeds_only_x():
    runner = ZeroGradient()
    x = np.ones((1, 3, 4, 4), np.float32)
    np.testing.assert_array_equal(DenoiserRunner(runner, channels=3, multiple_of=2).denoise(x, None, 0.1), x)
    assert list(runner.feeds) == ["x"]
    with pytest.raises(StarflowError, match="not text-conditioned"):
        DenoiserRunner(runner, channels=3).denoise(x, np.zeros((1, 2, 8), np.float32), 0.1)
    with pytest.raises(StarflowError, match="not a positive multiple of patch_size 2"):
        DenoiserRunner(runner, channels=3, multiple_of=2).denoise(np.ones((1, 3, 4, 5), np.float32), None, 0)


def test_denoiser_rejects_bad_inputs(denoiser, decoder):
    x, text = np.zeros((2, 4, 4, 4), np.float32), np.zeros((2, 6, 32), np.float32)
    bad = [
        ((np.zeros((2, 3, 4, 4), np.float32), text, 0.3), "x: expected 4 latent channels"),
        ((x.astype(np.float64), text, 0.3), "x: expected a float32 numpy array, got float64"),
        ((x, None, 0.3), r"text: this model is text-conditioned; pass \(2, L, 32\) text embeddings"),
        ((x, text[:, :, :16], 0.3), r"text: expected text embeddings of shape \(2, L, 32\).*\(2, 6, 16\)"),
        ((x, text[:1], 0.3), r"got \(1, 6, 32\)"),
        ((x, text.astype(np.float64), 0.3), "text: expected a float32 numpy array, got float64"),
        ((x, text, -1.0), "noise_std: must be a finite number >= 0"),
    ]
    for args, message in bad:
        with pytest.raises(StarflowError, match=message):
            denoiser.denoise(*args)
    with pytest.raises(StarflowError, match=r"a denoise graph takes \['x', 'text'\]"):
        DenoiserRunner(decoder.runner, channels=4, text_dim=32)
